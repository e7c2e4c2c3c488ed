import ArgumentParser
import Foundation

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

    @Option(name: .long, help: ArgumentHelp("The machine's name (query-name); overrides \"name\".", valueName: "NAME"))
    var name: String?

    @Option(name: .long, help: ArgumentHelp("Receive the machine instead of booting: tcp:HOST:PORT or unix:PATH (listen for a live migration), file:PATH (RAM mapped from the file), exec:CMD (read from CMD's output), or defer (wait for QMP migrate-incoming). Disk images are opened without locks until the state arrives. The machine runs afterwards unless -S (or the source was paused).", valueName: "URI"))
    var incoming: String?

    @Flag(name: [.customShort("S"), .customLong("paused")], help: "Start with the vCPUs stopped until QMP 'cont' (like QEMU -S).")
    var paused = false

    func run() throws {
        let code = try Launch(options: self).run()
        Foundation.exit(code)
    }
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
    let command: MachineServerCommand
    do {
        command = try MachineServerCommand.parse(Array(CommandLine.arguments.dropFirst()))
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

/// Prints "machine-server: error: MESSAGE" on standard error and exits with status 1.
func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("machine-server: error: \(message)\n".utf8))
    exit(1)
}
