import Board
import Dispatch
import Foundation
import Machine
import QMP
import Schema
import Synchronization
import Translator
import VNC

/// Builds and runs one machine from a checked `LaunchPlan`, on the main thread.
///
/// Order: check everything (`LaunchPlan`), take over the terminating signals, open the serial
/// backend, build the board and harts (`VirtualMachine`), start the protocol servers, start
/// the machine, wait for it to end, then tear down in reverse and return the exit status.
struct Launch {
    let plan: LaunchPlan

    func run() throws -> Int32 {
        // -D: diagnostics go to the log file from here on. -daemonize: fork now, while this
        // is the only thread; the parent waits for `daemon.ready()` and exits 0 then.
        if let log = plan.process.logFile { try ProcessSetup.redirectStandardError(to: log) }
        let daemon = plan.process.daemonize ? try ProcessSetup.daemonize() : nil
        let pidfile = try plan.process.pidfile.map { try ProcessSetup.PidFile(path: $0) }
        defer { pidfile?.remove() }
        if plan.isEmptyMachine { return try runEmptyMachine(daemon: daemon) }

        // Signals become an orderly shutdown (SHUTDOWN, cause host-signal). Installed before
        // the stdio backend, which then leaves these signals to us.
        let machineBox = MachineBox()
        let signalSources = [Int32(SIGINT), Int32(SIGTERM), Int32(SIGHUP)].map { sig -> any DispatchSourceSignal in
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { machineBox.requestHostShutdown(cause: .hostSignal) }
            source.resume()
            return source
        }
        signal(SIGPIPE, SIG_IGN)
        defer { for s in signalSources { s.cancel() } }

        let serial: (any CharBackend)?
        do {
            serial = try plan.serial.makeBackend(id: plan.serialID) {
                machineBox.requestHostShutdown(cause: .hostUI)
            }
        } catch {
            throw LaunchError("serial: \(error)")
        }
        let chardevs = MachineChardevs(serial.map { [$0] } ?? [])
        defer { chardevs.closeAll() }

        // Images are opened (and locked) before the board, so a busy or broken image stops the
        // launch with a message naming the device; they are flushed once the machine has ended.
        // Netdevs bind their forwarded ports before anything runs, so a port in use stops the launch.
        let network = try MachineNetwork(plan.netdevs)
        defer { network.close() }
        // With --incoming the images are opened without locks: a live migration's source holds
        // them until the switch-over, and every incoming path takes them before the guest runs.
        let devices = try MachineDevices(plan.devices, network: network, lockImages: plan.incoming == nil)
        defer { devices.close() }

        let machine: VirtualMachine
        let hartList = HartList()
        do {
            machine = try makeMachine(plan: plan, serial: serial, devices: devices, harts: hartList)
        } catch let e as LaunchError {
            throw e
        } catch {
            throw LaunchError("\(error)")
        }
        machineBox.set(machine)
        do {
            try network.attach(to: machine)
        } catch {
            throw LaunchError("netdevs: \(error)")
        }
        // A firmware or kernel ELF with a `tohost` symbol (riscv-tests and other Spike
        // programs) gets the HTIF at that word, as with Spike and QEMU's `spike` machine.
        if let board = machine.board as? VirtBoard, let tohost = board.bootLoader.tohost {
            let htif = board.htif
            for hart in hartList.harts { hart.watchToHost(at: tohost) { htif.write(offset: 0, size: 8, value: $0) } }
        }
        machine.setSnapshotDisks(devices.blocks.map { SnapshotDisk(id: $0.id, image: $0.image, readOnly: $0.readOnly) })

        // A live migration's listener is bound before QMP is up, so that a client that can
        // talk to this server can also migrate to it (the stream is taken once it has started).
        let liveIncoming = plan.incoming.map { $0.hasPrefix("tcp:") || $0.hasPrefix("unix:") } ?? false
        if liveIncoming, let incoming = plan.incoming {
            do {
                try machine.incomingMigration(uri: incoming)
            } catch {
                throw LaunchError("--incoming: \(error)")
            }
        }
        let hotPlug = MachineHotPlug(machine: machine, plan: plan, display: devices.display, network: network)
        defer { hotPlug?.close() }
        let servers = try ProtocolServers.start(machine: machine, chardevs: chardevs, devices: devices, network: network, hotPlug: hotPlug,
                                                plan: plan)
        defer { servers.shutdown() }
        if let g = plan.gdb, let problem = machine.startGDBServer(host: g.host, port: g.port) {
            throw LaunchError(problem)
        }

        do {
            try machine.start()
        } catch {
            throw LaunchError("cannot start the machine: \(error)")
        }
        if let tag = plan.loadvm {
            // QEMU's -loadvm: the snapshot is in place before any guest instruction runs.
            do {
                try machine.loadSnapshot(tag: tag)
            } catch {
                machine.requestHostShutdown(cause: .hostError, exitCode: 1)
                _ = machine.waitUntilExit()
                throw LaunchError("-loadvm \(tag): \(error)")
            }
            if plan.resumeAfterLoadvm { machine.cont() }
        }
        daemon?.ready(keepStandardError: plan.process.logFile != nil)
        if let incoming = plan.incoming {
            // Like QEMU's -incoming: the machine waits in `inmigrate`; with a URI the state is
            // loaded now (and the machine runs unless -S), with `defer` QMP migrate-incoming
            // brings it later.
            if incoming != "defer" && !liveIncoming {
                do {
                    try machine.incomingMigration(uri: incoming)
                } catch {
                    machine.requestHostShutdown(cause: .hostError, exitCode: 1)
                    _ = machine.waitUntilExit()
                    throw LaunchError("--incoming: \(error)")
                }
            }
        }
        return machine.waitUntilExit()
    }

    /// `machine: none`: QMP only, until quit or a terminating signal.
    private func runEmptyMachine(daemon: ProcessSetup.Daemon?) throws -> Int32 {
        let machine = EmptyMachine(name: plan.name, uuid: plan.uuid, startPaused: plan.startPaused)
        let signalSources = [Int32(SIGINT), Int32(SIGTERM), Int32(SIGHUP)].map { sig -> any DispatchSourceSignal in
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { machine.requestHostShutdown(cause: .hostSignal) }
            source.resume()
            return source
        }
        signal(SIGPIPE, SIG_IGN)
        defer { for s in signalSources { s.cancel() } }
        let server = QMPServer(control: machine, chardevs: MachineChardevs([]))
        do {
            try server.start(listeners: plan.qmp, humanMonitorListeners: plan.hmp)
        } catch {
            throw LaunchError("qmp: \(error)")
        }
        defer { server.shutdown() }
        daemon?.ready(keepStandardError: plan.process.logFile != nil)
        return machine.waitUntilExit()
    }

    /// Builds the `virt` board from the plan and one `Hart` per CPU.
    private func makeMachine(plan: LaunchPlan, serial: (any CharBackend)?, devices: MachineDevices,
                             harts hartList: HartList) throws -> VirtualMachine {
        var config = BoardConfig()
        config.memorySize = plan.memoryBytes
        let backingFD = try plan.memoryBackend.map { try ProcessSetup.openMemoryBackend(path: $0.path, size: plan.memoryBytes) }
        defer { if let backingFD { close(backingFD) } }
        if let backingFD, let b = plan.memoryBackend {
            config.ramBacking = GuestRAM.BackingFile(fileDescriptor: backingFD, shared: b.shared)
        }
        config.cpuCount = plan.cpuCount
        config.cpuExtensions = plan.extensions
        config.kernelCommandLine = plan.commandLine
        config.firmware = plan.firmware.map { .path($0) }
        config.kernel = plan.kernel.map { .path($0) }
        config.initrd = plan.initrd.map { .path($0) }
        config.serial = serial
        config.htifConsole = serial
        config.virtioTransports = devices.transports
        config.pciDevices = devices.pciDevices
        if let keyboard = devices.keyboards.first {
            // system_powerdown presses KEY_POWER; the POWERDOWN event is sent either way.
            config.powerButton = { keyboard.pressPowerKey() }
        }
        return try VirtualMachine(
            name: plan.name, uuid: plan.uuid, actions: plan.actions,
            startPaused: plan.startPaused, incoming: plan.incoming != nil,
            stateIdentity: StateIdentity.of(plan),
            describeIdentityMismatch: { StateIdentity.describeMismatch(saved: $0, current: $1) },
            makeBoard: { system in try VirtBoard(config: config, system: system) },
            makeCPU: { hartID, ram, bus, interrupts, clock in
                let hart = Hart(hartID: hartID, ram: ram, bus: bus, interrupts: interrupts, clock: clock, engine: plan.engine,
                     extensions: plan.extensions)
                hartList.harts.append(hart)
                return hart
            })
    }
}

/// The protocol servers that drive a machine: QMP and VNC.
///
/// Started on the main thread after the machine is built and before it starts, so a client
/// can connect to a machine started paused; shut down on the main thread after it ends.
struct ProtocolServers {
    let qmp: QMPServer?
    let vnc: VNCServer?

    /// Starts every server the plan asks for; throws `LaunchError` naming the listener.
    /// The VNC server binds first, QMP starts, then VNC starts serving with its connection
    /// events forwarded to QMP clients.
    static func start(machine: VirtualMachine, chardevs: MachineChardevs, devices: MachineDevices,
                      network: MachineNetwork? = nil, hotPlug: MachineHotPlug?, plan: LaunchPlan) throws -> ProtocolServers {
        var vnc: VNCServer? = nil
        let field = plan.vncFromCommandLine ? "--vnc" : "display.vnc"
        if let v = plan.vnc, let display = devices.display {
            let configuration = VNCConfiguration(listen: v.listen, websocket: v.websocket,
                                                 passwordRequired: v.password != nil,
                                                 desktopName: plan.name ?? "machine-server")
            do {
                let server = try VNCServer(display: display, configuration: configuration)
                if let password = v.password { try server.setPassword(password) }
                vnc = server
            } catch {
                throw LaunchError("\(field): \(error)")
            }
        }
        let registry = MachineDeviceRegistry(devices: devices, vnc: vnc, network: network, hotPlug: hotPlug)
        var qmp: QMPServer? = nil
        if !plan.qmp.isEmpty || !plan.hmp.isEmpty {
            let server = QMPServer(control: machine, chardevs: chardevs, devices: registry)
            do {
                try server.start(listeners: plan.qmp, humanMonitorListeners: plan.hmp)
            } catch {
                throw LaunchError("qmp: \(error)")
            }
            qmp = server
            hotPlug?.eventSink.withLock { $0 = { server.emit($0) } }
        }
        if let vnc {
            if let qmp {
                let serverInfo = vnc.info()
                vnc.setClientObserver { event in qmp.emit(QMPVNCEvents.event(event, server: serverInfo)) }
            }
            do {
                try vnc.start()
            } catch {
                qmp?.shutdown()
                throw LaunchError("\(field): \(error)")
            }
        }
        return ProtocolServers(qmp: qmp, vnc: vnc)
    }

    /// Stops every server (QMP writes pending replies first; VNC disconnects its viewers).
    func shutdown() {
        qmp?.shutdown()
        vnc?.stop()
    }
}

/// The machine's chardevs as QMP sees them (`query-chardev`, `ringbuf-read`, `ringbuf-write`).
/// Any thread.
final class MachineChardevs: ChardevRegistry, Sendable {
    private let backends: [any CharBackend]

    init(_ backends: [any CharBackend]) { self.backends = backends }

    func chardevs() -> [any CharBackend] { backends }

    func readRingbuf(id: String, maxBytes: Int) throws(ChardevRegistryError) -> [UInt8] {
        try ringbuf(id).read(maxBytes: maxBytes)
    }

    func writeRingbuf(id: String, bytes: [UInt8]) throws(ChardevRegistryError) {
        let ring = try ringbuf(id)
        do {
            try ring.inject(bytes)
        } catch {
            switch error {
            case .noReceiver: throw .noReader(id: id)
            case let .inputQueueFull(count, waiting): throw .inputQueueFull(id: id, bytes: count, waiting: waiting)
            }
        }
    }

    /// Closes every backend (restores the terminal for stdio).
    func closeAll() { for b in backends { b.close() } }

    private func ringbuf(_ id: String) throws(ChardevRegistryError) -> RingbufChardev {
        guard let b = backends.first(where: { $0.id == id }) else { throw .notFound(id: id) }
        guard let r = b as? RingbufChardev else { throw .notARingbuf(id: id) }
        return r
    }
}

/// Lets signal handlers and the stdio escape reach the machine, which is built after them.
/// Before the machine exists a request exits at once with status 0. Any thread.
final class MachineBox: Sendable {
    private let machine = Mutex<VirtualMachine?>(nil)

    func set(_ m: VirtualMachine) { machine.withLock { $0 = m } }

    func requestHostShutdown(cause: Machine.ShutdownCause) {
        if let m = machine.withLock({ $0 }) {
            m.requestHostShutdown(cause: cause, exitCode: 0)
        } else {
            exit(0)
        }
    }
}

/// The harts `makeMachine` built, in hart order (for the GDB stub). Filled on the launching
/// thread while the machine is constructed; read there afterwards.
final class HartList: @unchecked Sendable {  // unchecked: filled and read on the launching thread only
    var harts: [Hart] = []
}
