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
    let control: any MachineControl
    private let chardevs: any ChardevRegistry
    /// The display, VNC server and block devices; nil for a machine with none of them.
    let devices: (any DeviceRegistry)?
    private let version: VersionInfo
    private let quitRequested = Mutex(false)
    /// The descriptors this connection's client passed (`getfd`); nil on a connection that
    /// cannot carry them (TCP, tests).
    let descriptors: PassedDescriptors?

    /// Creates an executor for one connection.
    public init(control: any MachineControl, chardevs: any ChardevRegistry, devices: (any DeviceRegistry)? = nil,
                version: VersionInfo, descriptors: PassedDescriptors? = nil) {
        self.control = control
        self.chardevs = chardevs
        self.devices = devices
        self.version = version
        self.descriptors = descriptors
    }

    /// Keeps the descriptor that came with this command under `fdname`.
    public func getfd(_ arguments: GetfdArguments) throws {
        guard let descriptors else { throw QMPError(.genericError, "No file descriptor supplied via SCM_RIGHTS") }
        try descriptors.claim(name: arguments.fdname)
    }

    /// Closes a descriptor kept with getfd.
    public func closefd(_ arguments: ClosefdArguments) throws {
        guard let descriptors else { throw QMPError(.genericError, "File descriptor named '\(arguments.fdname)' not found") }
        try descriptors.close(name: arguments.fdname)
    }

    /// A migration URI with `fd:NAME` turned into `fd:N` (the named descriptor taken out of
    /// this connection's table); other URIs unchanged. `numericAllowed`: whether `fd:N`
    /// (an inherited descriptor) may be used as it is (incoming only).
    func resolveDescriptorURI(_ uri: String, numericAllowed: Bool) throws -> String {
        guard uri.hasPrefix("fd:") else { return uri }
        let name = String(uri.dropFirst(3))
        if let first = name.first, first.isNumber {
            guard numericAllowed else {
                throw QMPError(.genericError, "fd:\(name): an outgoing migration takes a descriptor passed with getfd, by name")
            }
            return uri
        }
        guard let fd = descriptors?.take(name: name) else {
            throw QMPError(.genericError, "File descriptor named '\(name)' has not been found")
        }
        return "fd:\(fd)"
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

    /// The machine's UUID (all zeros when none was given, as QEMU reports).
    public func queryUuid() throws -> UuidInfo {
        UuidInfo(uuid: control.machineUUID ?? "00000000-0000-0000-0000-000000000000")
    }

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

    /// Runs a human-monitor command line and returns its output (lines end in CRLF, like QEMU);
    /// see HumanMonitor.swift. `cpu-index` picks the CPU for `info registers`, `info cpus` and `x`.
    public func humanMonitorCommand(_ arguments: HumanMonitorCommandArguments) throws -> String {
        try runHumanMonitorCommand(arguments.commandLine, cpuIndex: arguments.cpuIndex.map { Int(clamping: $0) })
    }

    /// The schema of every command, event and type.
    public func queryQmpSchema() throws -> [SchemaInfo] { try QMPIntrospection.schemaInfo() }
}
