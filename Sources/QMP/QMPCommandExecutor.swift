import Foundation
import Machine
import Schema
import Synchronization

/// Runs checked QMP commands against the machine: the thin handlers behind the schema's
/// command table. Each method turns into one call on `MachineControl` or the chardev registry.
///
/// One executor per connection; its methods run on that connection's command queue, one at a
/// time. `quit` does not end the machine at once: it records the request, and the connection
/// calls `MachineControl.quit()` after the reply has been sent (see `takeQuitRequest`).
public final class QMPCommandExecutor: QMPCommandHandler {
    private let control: any MachineControl
    private let chardevs: any ChardevRegistry
    /// The display, VNC server and block devices; nil for a machine with none of them.
    let devices: (any DeviceRegistry)?
    private let version: VersionInfo
    private let quitRequested = Mutex(false)

    /// Creates an executor for one connection.
    public init(control: any MachineControl, chardevs: any ChardevRegistry, devices: (any DeviceRegistry)? = nil,
                version: VersionInfo) {
        self.control = control
        self.chardevs = chardevs
        self.devices = devices
        self.version = version
    }

    /// True (once) when the last command asked to quit; the caller then calls `control.quit()`
    /// after the reply is on the wire.
    public func takeQuitRequest() -> Bool {
        quitRequested.withLock { q in
            defer { q = false }
            return q
        }
    }

    /// Runs `command` and returns the reply's `return` value, or the mapped QMP error.
    public func run(_ command: QMPCommand) -> Result<JSONValue, QMPError> {
        do {
            return .success(try command.execute(on: self))
        } catch {
            return .failure(QMPError.from(error))
        }
    }

    /// The machine, for the migration commands (which need `MachineMigration` too).
    var controlForMigration: any MachineControl { control }

    /// Only reachable after negotiation, where it always fails (the session handles the first one).
    public func qmpCapabilities(_ arguments: QmpCapabilitiesArguments) throws {
        throw QMPError(.commandNotFound, "Capabilities negotiation is already complete, command ignored")
    }

    /// The server version.
    public func queryVersion() throws -> VersionInfo { version }

    /// Every command of the schema.
    public func queryCommands() throws -> [CommandInfo] { QMPCommand.names.map { CommandInfo(name: $0) } }

    /// The machine's name.
    public func queryName() throws -> NameInfo { NameInfo(name: control.machineName) }

    /// The run state; `singlestep` is always false (QEMU 7 reports it).
    public func queryStatus() throws -> StatusInfo {
        let state = control.runState
        let status = Schema.RunState(rawValue: state.rawValue) ?? .internalError
        return StatusInfo(running: state == .running, singlestep: false, status: status)
    }

    /// Pauses the vCPUs.
    public func stop() throws { control.stop() }

    /// Resumes the vCPUs.
    public func cont() throws { control.cont() }

    /// Resets the machine.
    public func systemReset() throws { control.systemReset() }

    /// Presses the power button (POWERDOWN; KEY_POWER on the virtio keyboard if there is one).
    public func systemPowerdown() throws { control.systemPowerdown() }

    /// Records the quit request; the connection acts on it after replying.
    public func quit() throws { quitRequested.withLock { $0 = true } }

    /// The vCPUs.
    public func queryCpusFast() throws -> [CpuInfoFast] {
        control.cpus().map {
            CpuInfoFast(cpuIndex: Int64($0.index), qomPath: "/machine/soc0/harts[\($0.index)]",
                        threadId: Int64($0.threadID), target: .riscv64)
        }
    }

    /// The chardevs.
    public func queryChardev() throws -> [ChardevInfo] {
        chardevs.chardevs().map { ChardevInfo(label: $0.id, filename: $0.filename, frontendOpen: $0.isConnected) }
    }

    /// Sends bytes to the guest through a ring-buffer chardev.
    public func ringbufWrite(_ arguments: RingbufWriteArguments) throws {
        let bytes: [UInt8]
        switch arguments.format ?? .utf8 {
        case .utf8: bytes = Array(arguments.data.utf8)
        case .base64:
            guard let d = Data(base64Encoded: arguments.data) else {
                throw QMPError(.genericError, "Parameter 'data' is not valid base64")
            }
            bytes = Array(d)
        }
        try chardevs.writeRingbuf(id: arguments.device, bytes: bytes)
    }

    /// Takes guest output from a ring-buffer chardev.
    public func ringbufRead(_ arguments: RingbufReadArguments) throws -> String {
        let bytes = try chardevs.readRingbuf(id: arguments.device, maxBytes: Int(clamping: arguments.size))
        switch arguments.format ?? .utf8 {
        case .utf8: return String(decoding: bytes, as: UTF8.self)
        case .base64: return Data(bytes).base64EncodedString()
        }
    }

    /// Runs a human-monitor command line and returns its output (lines end in CRLF, like QEMU).
    public func humanMonitorCommand(_ arguments: HumanMonitorCommandArguments) throws -> String {
        let words = arguments.commandLine.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        guard let verb = words.first else { return "" }
        if ["savevm", "loadvm", "delvm"].contains(verb) || (verb == "info" && words.count == 2 && words[1] == "snapshots"),
           let out = snapshotHMP(words) {
            return out
        }
        switch (verb, words.count) {
        case ("stop", 1): try stop(); return ""
        case ("cont", 1), ("c", 1): try cont(); return ""
        case ("system_reset", 1): try systemReset(); return ""
        case ("system_powerdown", 1): try systemPowerdown(); return ""
        case ("quit", 1), ("q", 1): try quit(); return ""
        case ("info", 2):
            switch words[1] {
            case "status":
                let s = try queryStatus()
                var line = "VM status: " + (s.running ? "running" : "paused")
                if !s.running && s.status != .paused { line += " (\(s.status.rawValue))" }
                return line + "\r\n"
            case "version":
                let v = version.qemu
                return "\(v.major).\(v.minor).\(v.micro) (\(version.package))\r\n"
            case "name":
                return control.machineName.map { "\($0)\r\n" } ?? ""
            case "cpus":
                return try queryCpusFast().enumerated().map { i, cpu in
                    "\(i == 0 ? "*" : " ") CPU #\(cpu.cpuIndex): thread_id=\(cpu.threadId)\r\n"
                }.joined()
            case "migrate":
                let m = try queryMigrate()
                guard let status = m.status else { return "" }
                var out = "Migration status: \(status.rawValue)\r\n"
                if let t = m.totalTime { out += "total time: \(t) ms\r\n" }
                if let d = m.downtime { out += "downtime: \(d) ms\r\n" }
                if let d = m.expectedDowntime { out += "expected downtime: \(d) ms\r\n" }
                if let d = m.setupTime { out += "setup: \(d) ms\r\n" }
                if let ram = m.ram {
                    out += "transferred ram: \(ram.transferred / 1024) kbytes\r\n"
                    out += "throughput: \(String(format: "%.2f", ram.mbps)) mbps\r\n"
                    out += "remaining ram: \(ram.remaining / 1024) kbytes\r\n"
                    out += "total ram: \(ram.total / 1024) kbytes\r\n"
                    out += "duplicate: \(ram.duplicate) pages\r\n"
                    out += "normal: \(ram.normal) pages\r\n"
                    out += "normal bytes: \(ram.normalBytes / 1024) kbytes\r\n"
                    out += "dirty sync count: \(ram.dirtySyncCount)\r\n"
                    out += "dirty pages rate: \(ram.dirtyPagesRate) pages\r\n"
                }
                if let t = m.cpuThrottlePercentage { out += "cpu throttle percentage: \(t)\r\n" }
                if let e = m.errorDesc { out += "error description: \(e)\r\n" }
                return out
            default:
                return "info: unknown item '\(words[1])' (known: status, version, name, cpus, migrate, snapshots)\r\n"
            }
        case ("migrate", 2):
            try migrate(MigrateArguments(uri: words[1]))
            return ""
        case ("migrate_cancel", 1):
            try migrateCancel()
            return ""
        default:
            return "unknown command: '\(arguments.commandLine)'\r\n"
        }
    }

    /// The schema of every command, event and type.
    public func queryQmpSchema() throws -> [SchemaInfo] { try QMPIntrospection.schemaInfo() }
}
