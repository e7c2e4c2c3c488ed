import ArgumentParser
import Foundation
import Schema

/// The `machine-server` command line: a machine description file plus a few overrides.
///
/// Parsed on the main thread before anything starts; `Launch` turns it into a running machine.
struct MachineServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "machine-server",
        abstract: "Run a headless RISC-V 64 machine (QEMU-style 'virt' board) driven over QMP, with a built-in VNC server.",
        discussion: """
        The machine is described by a JSON file (--config). A minimal description that boots OpenSBI and a Linux kernel with its console on this terminal:

          {
            "version": 2,
            "machine": "virt",
            "cpus": 2,
            "memory": "512M",
            "kernel": "Image",
            "initrd": "rootfs.cpio.gz",
            "append": "console=ttyS0 earlycon=sbi",
            "serial": {"backend": "stdio"},
            "qmp": [{"backend": "unix", "path": "/tmp/machine.qmp"}]
          }

        Relative paths in the file are relative to the file's own directory. Without "firmware" the server looks for OpenSBI's fw_dynamic.bin from the Debian 'opensbi' package; "firmware": "none" runs the kernel itself in M-mode. Command-line options override the file.

        Serial SPECs (--serial, and QEMU's chardev kinds in "serial"):
          stdio             this terminal (raw mode; Ctrl-A x quits, Ctrl-A h helps)
          unix:PATH         a unix socket server, one client at a time
          tcp:HOST:PORT     a TCP server on HOST only (e.g. tcp:127.0.0.1:4444)
          file:PATH         output to a file (truncated; add ,append=on to append)
          ringbuf[:SIZE]    kept in memory for QMP ringbuf-read / ringbuf-write
          pty               a new pseudo-terminal (its /dev/pts path is printed and in query-chardev)
          none              not connected

        Devices ("devices", each in its own virtio-mmio slot, at most 8): virtio-blk-device with "id" and "drive": {"file", "format": "raw"|"qcow2", "read-only"}; virtio-gpu-device (needs a VNC display); virtio-keyboard-device; virtio-tablet-device. A VNC display ("display": {"vnc": {"listen": "127.0.0.1:5900", "password": ..., "websocket": ...}} or --vnc) adds a GPU, keyboard and tablet when no GPU is listed.

        QMP SPECs (--qmp, repeatable): unix:PATH or tcp:HOST:PORT. Talk to it with any QMP client, for example:

          socat - UNIX-CONNECT:/tmp/machine.qmp

        Exit status: the guest's exit code when it powers off through the SiFive test device or HTIF, 0 after QMP 'quit', Ctrl-A x or SIGTERM, and 1 when the description or an option is wrong (the message names the field).
        """)

    @Option(name: .long, help: ArgumentHelp("The machine description (JSON).", valueName: "FILE"))
    var config: String

    @Option(name: .long, help: ArgumentHelp("Where the serial console goes; overrides \"serial\".", valueName: "SPEC"))
    var serial: String?

    @Option(name: .long, help: ArgumentHelp("A QMP listener (unix:PATH or tcp:HOST:PORT); repeatable; replaces \"qmp\".", valueName: "SPEC"))
    var qmp: [String] = []

    @Option(name: .long, help: ArgumentHelp("Serve the display over VNC on HOST:PORT (a bare PORT means 127.0.0.1:PORT); overrides display.vnc.listen. Adds a virtio GPU, keyboard and tablet when the description lists no GPU.", valueName: "HOST:PORT"))
    var vnc: String?

    @Option(name: .long, help: ArgumentHelp("The execution engine, jit or interpreter; overrides \"accel\": {\"engine\"}.", valueName: "ENGINE"))
    var accel: String?

    @Option(name: .long, help: ArgumentHelp("Serve GDB's remote protocol on tcp:HOST:PORT (like QEMU -gdb); overrides \"gdb\". With -S the machine waits for the debugger.", valueName: "SPEC"))
    var gdb: String?

    @Option(name: .long, help: ArgumentHelp("The machine's name (query-name); overrides \"name\".", valueName: "NAME"))
    var name: String?

    @Option(name: .long, help: ArgumentHelp("Receive the machine instead of booting: tcp:HOST:PORT or unix:PATH (listen for a live migration), file:PATH (RAM mapped from the file), exec:CMD (read from CMD's output), fd:N (an inherited descriptor, read from its offset), or defer (wait for QMP migrate-incoming). Disk images are opened without locks until the state arrives. The machine runs afterwards unless -S (or the source was paused).", valueName: "URI"))
    var incoming: String?

    @Flag(name: [.customShort("S"), .customLong("paused")], help: "Start with the vCPUs stopped until QMP 'cont' (like QEMU -S).")
    var paused = false

    @Flag(name: .customLong("print-description"), help: "Print the description with the options applied to it (JSON) and exit.")
    var printDescription = false

    func run() throws {
        var (description, base) = try LaunchPlan.loadDescription(configPath: config)
        if printDescription {
            if let name { description.name = name }
            if paused { description.start = .paused }
            print(description.json.serialized())
            Foundation.exit(0)
        }
        let plan = try LaunchPlan(description: description, baseDirectory: base, options: LaunchOverrides(
            serial: serial, qmp: qmp, vnc: vnc, accel: accel, name: name, incoming: incoming, paused: paused, gdb: gdb))
        Foundation.exit(try Launch(plan: plan).run())
    }
}

/// The process-level options QEMU's command line has beside the machine: a pid file,
/// daemonizing, a log file. A plain value.
struct ProcessOptions {
    var pidfile: String?
    var daemonize = false
    var logFile: String?
}

/// What the native options override in the description, plus the process options.
/// Built by either front end on the main thread.
struct LaunchOverrides {
    var serial: String?
    var qmp: [String] = []
    var vnc: String?
    var accel: String?
    var name: String?
    var incoming: String?
    /// `-loadvm TAG`: load this internal snapshot before the vCPUs first run.
    var loadvm: String?
    var paused = false
    /// `--gdb tcp:HOST:PORT`, overriding the description's "gdb".
    var gdb: String?
    var process = ProcessOptions()
}

/// A problem with the options or the description that stops the server before anything runs.
/// `description` is the message after "machine-server: error: " and names the field.
struct LaunchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Parses the command line and runs the server; every error is reported as
/// "machine-server: error: <what>" with exit status 1 (help and --version exit 0).
func runMachineServer() -> Never {
    let arguments = Array(CommandLine.arguments.dropFirst())
    if QEMUCommandLine.looksLikeQEMU(arguments) { runQEMUFrontEnd(arguments) }
    let command: MachineServerCommand
    do {
        command = try MachineServerCommand.parse(arguments)
    } catch {
        if MachineServerCommand.exitCode(for: error) == .success {
            MachineServerCommand.exit(withError: error)  // --help
        }
        fail(MachineServerCommand.message(for: error) + " (see machine-server --help)")
    }
    do {
        try command.run()
    } catch {
        fail("\(error)")
    }
    exit(0)
}

/// Runs a QEMU-style command line: translates it into a description (QEMUCommandLine), then
/// launches it like --config would. Errors exit 1 with "machine-server: error: ...".
func runQEMUFrontEnd(_ arguments: [String]) -> Never {
    let invocation: QEMUInvocation
    do {
        invocation = try QEMUCommandLine.parse(arguments)
    } catch {
        fail("\(error)")
    }
    switch invocation.action {
    case .printVersion:
        FileHandle.standardOutput.write(Data(QEMUCommandLine.versionText.utf8))
        exit(0)
    case .printHelp:
        FileHandle.standardOutput.write(Data(QEMUCommandLine.helpText.utf8))
        exit(0)
    case .printDescription:
        print(invocation.description.json.serialized())
        exit(0)
    case .run:
        break
    }
    for w in invocation.warnings {
        FileHandle.standardError.write(Data("machine-server: warning: \(w)\n".utf8))
    }
    do {
        let overrides = LaunchOverrides(incoming: invocation.incoming, loadvm: invocation.loadvm, process: ProcessOptions(
            pidfile: invocation.pidfile, daemonize: invocation.daemonize, logFile: invocation.logFile))
        let plan = try LaunchPlan(description: invocation.description,
                                  baseDirectory: FileManager.default.currentDirectoryPath, options: overrides)
        exit(try Launch(plan: plan).run())
    } catch {
        fail("\(error)", timestamped: invocation.messageTimestamps)
    }
}

/// Prints "machine-server: error: MESSAGE" on standard error and exits with status 1; with
/// `timestamped` (QEMU's -msg timestamp=on) the line starts with the UTC time as QEMU writes it.
func fail(_ message: String, timestamped: Bool = false) -> Never {
    var prefix = ""
    if timestamped {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = tm()
        var seconds = ts.tv_sec
        gmtime_r(&seconds, &t)
        prefix = String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%06ldZ ", t.tm_year + 1900, t.tm_mon + 1, t.tm_mday,
                        t.tm_hour, t.tm_min, t.tm_sec, ts.tv_nsec / 1000)
    }
    FileHandle.standardError.write(Data("\(prefix)machine-server: error: \(message)\n".utf8))
    exit(1)
}
