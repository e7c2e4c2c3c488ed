// machine-server's entry point: parse the command line, run the machine, exit with its status.
// See Command.swift for the options and Launch.swift for how the machine is wired.
runMachineServer()
