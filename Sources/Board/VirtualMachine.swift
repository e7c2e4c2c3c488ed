import Foundation
import Machine
import Synchronization
import Translator

/// Where one hart starts after a reset: its entry point and the a0…a2 arguments (QEMU passes
/// the hart id, the device-tree address and the `fw_dynamic_info` address).
public struct HartResetVector: Sendable, Equatable {
    public var entry: GuestPhysicalAddress
    public var a0: UInt64
    public var a1: UInt64
    public var a2: UInt64
    public init(entry: GuestPhysicalAddress, a0: UInt64, a1: UInt64, a2: UInt64) {
        self.entry = entry
        self.a0 = a0
        self.a1 = a1
        self.a2 = a2
    }
}

/// What `VirtualMachine` needs of an assembled board (`VirtBoard` provides it; tests use a fake).
///
/// Every method is called on the machine's control thread while no hart is in guest code.
public protocol MachineBoard: AnyObject, Sendable {
    /// Guest RAM, handed to each CPU.
    var ram: GuestRAM { get }
    /// The MMIO bus, handed to each CPU.
    var bus: MemoryBus { get }
    /// The machine's virtual clock (paused while the machine is).
    var clock: VirtualClock { get }
    /// One interrupt block per hart, in hart-id order; its count is the number of harts.
    var hartInterrupts: [HartInterrupts] { get }
    /// Puts every device in its reset state, (re)loads the boot images into RAM, and returns the
    /// reset vector of each hart (one per entry of `hartInterrupts`). Called before the first
    /// run and on every reset.
    func resetForBoot() throws -> [HartResetVector]
    /// Delivers a power-button press to the guest; false when the board has no device through
    /// which the guest could notice it.
    func pressPowerButton() -> Bool
    /// The owner of every device's lifecycle and saved state.
    var deviceManager: DeviceManager { get }
}

/// Builds the CPU for one hart: (hart id, RAM, bus, the hart's interrupts, clock).
/// Called on the thread that creates the `VirtualMachine`.
public typealias CPUFactory = (Int, GuestRAM, MemoryBus, HartInterrupts, VirtualClock) throws -> any VirtualCPU

/// A running machine: a board, one host thread per hart ("vcpu N"), and the run state.
///
/// Implements `MachineControl` for QMP and VNC and `SystemControl` for guest devices. Every
/// state change is one action executed on the control queue ("machine control"), in order;
/// the public methods may be called from any thread, including from an event observer.
/// Events go to observers on the control queue's thread.
public final class VirtualMachine: MachineControl, SystemControl, Sendable {
    /// The board the machine runs.
    public let board: any MachineBoard
    public let machineName: String?
    public let machineUUID: String?

    /// What the guest's own reboot and power-off requests do (QEMU's `-action`, `-no-reboot`,
    /// `-no-shutdown`). A plain value fixed when the machine is built.
    public struct GuestActions: Sendable, Equatable {
        /// A guest reboot ends the machine like a power-off (SHUTDOWN, cause guest-reset, exit 0).
        public var rebootShutsDown = false
        /// A guest power-off leaves the machine paused in the `shutdown` state instead of ending
        /// it; `system_reset` then brings it to `prelaunch`, and `cont` runs it again.
        public var shutdownPauses = false
        public init(rebootShutsDown: Bool = false, shutdownPauses: Bool = false) {
            self.rebootShutsDown = rebootShutsDown
            self.shutdownPauses = shutdownPauses
        }
    }
    let actions: GuestActions

    let vcpus: [VCPUThread]
    let startPaused: Bool
    /// Started for an incoming migration: waits in `inmigrate` instead of running.
    let incoming: Bool
    private let control = DispatchQueue(label: "machine control")
    private let onControlQueue = DispatchSpecificKey<Bool>()
    private let shared = Mutex(Shared())
    private let exited = DispatchSemaphore(value: 0)

    private struct Shared {
        var runState: RunState = .prelaunch
        var observers: [Int: @Sendable (MachineEvent) -> Void] = [:]
        var nextToken = 1
        var started = false
        /// Set once the machine has shut down; later actions are ignored.
        var exitCode: Int32? = nil
    }

    /// What a saved state must match to be loaded here: a canonical JSON of the machine's
    /// shape (cpus, memory, devices), written into every state stream's header.
    public let stateIdentity: String
    /// Names the difference between a stream's identity and this machine's (saved, current).
    let describeIdentityMismatch: @Sendable (String, String) -> String
    /// The current or last migration.
    let migration = Mutex(MigrationProgress())
    /// QEMU's 'events' migration capability.
    /// The snapshot jobs.
    let jobTable = JobTable()
    /// The disks internal snapshots cover (set by whoever opened them).
    private let disks = Mutex<[SnapshotDisk]>([])
    /// Where migrations run (the control queue is used only for the paused part).
    let migrationQueue = DispatchQueue(label: "machine migration")
    /// GDB servers started for this machine (`startGDBServer`).
    let gdbServers = Mutex<[GDBServer]>([])
    /// Live migration's parameters, capabilities and cancel switch.
    let live = LiveMigrationControl()

    /// Builds the board (handing it this machine as its `SystemControl`) and one CPU per hart.
    /// Nothing runs until `start()`. `startPaused` keeps the machine in `prelaunch` until the
    /// first `cont()`, like QEMU's `-S`; `incoming` keeps it in `inmigrate` until a saved state
    /// is loaded (`incomingMigration`). `stateIdentity` is written into and checked against
    /// every saved state; `describeIdentityMismatch` names how a saved identity differs.
    public init(name: String? = nil, uuid: String? = nil, actions: GuestActions = GuestActions(),
                startPaused: Bool = false, incoming: Bool = false, stateIdentity: String = "{}",
                describeIdentityMismatch: @escaping @Sendable (String, String) -> String = { saved, current in
                    "saved \(saved), this machine \(current)"
                },
                makeBoard: (any SystemControl) throws -> any MachineBoard,
                makeCPU: CPUFactory) throws {
        self.stateIdentity = stateIdentity
        self.describeIdentityMismatch = describeIdentityMismatch
        self.incoming = incoming
        if incoming { shared.withLock { $0.runState = .inmigrate } }
        let relay = SystemControlRelay()
        let board = try makeBoard(relay)
        var vcpus = [VCPUThread]()
        for (i, irq) in board.hartInterrupts.enumerated() {
            let cpu = try makeCPU(i, board.ram, board.bus, irq, board.clock)
            vcpus.append(VCPUThread(index: i, cpu: cpu))
        }
        self.board = board
        self.machineName = name
        self.machineUUID = uuid
        self.actions = actions
        self.startPaused = startPaused
        self.vcpus = vcpus
        control.setSpecific(key: onControlQueue, value: true)
        relay.target.withLock { $0 = WeakMachine(machine: self) }
    }

    // MARK: Life cycle

    /// Loads the boot images, resets the harts and starts their threads; the guest runs unless
    /// the machine starts paused. Call once, after the protocol servers are wired to the machine.
    public func start() throws {
        try onControl {
            guard !self.shared.withLock({ s in defer { s.started = true }; return s.started }) else { return }
            try self.resetBoardAndHarts()
            for v in self.vcpus { v.launch() }
            if self.startPaused || self.incoming {
                self.board.deviceManager.quiesce()
                self.board.clock.pause()
                self.setRunState(self.incoming ? .inmigrate : .prelaunch)
            } else {
                self.board.clock.resume()
                self.setRunState(.running)
                for v in self.vcpus { v.resume() }
            }
        }
    }

    /// Adds a device with no window (a network backend, at launch or from `netdev_add`) to the
    /// device manager, so it takes part in reset and saved state. Runs on the control queue.
    public func addManagedDevice(_ device: any ManagedDevice) throws {
        try onControl { try board.deviceManager.register(device) }
    }

    /// Removes what `addManagedDevice` added (`netdev_del`). Runs on the control queue.
    public func removeManagedDevice(_ device: any ManagedDevice) {
        onControl { board.deviceManager.unregister(device) }
    }

    /// Tells the machine which disks it has, for internal snapshots. Any thread.
    public func setSnapshotDisks(_ list: [SnapshotDisk]) { disks.withLock { $0 = list } }

    /// The disks internal snapshots cover.
    func snapshotDisks() -> [SnapshotDisk] { disks.withLock { $0 } }

    /// Blocks until the machine has shut down and returns the process exit code: the guest's
    /// code for a guest power-off, 0 for `quit` and host-initiated shutdowns.
    public func waitUntilExit() -> Int32 {
        exited.wait()
        exited.signal()
        return shared.withLock { $0.exitCode ?? 0 }
    }

    /// Shuts the machine down on the host's behalf (a signal, Ctrl-A x): emits SHUTDOWN with
    /// `cause` and ends `waitUntilExit` with `exitCode`. Returns at once; any thread.
    public func requestHostShutdown(cause: ShutdownCause, exitCode: Int32 = 0) {
        control.async { self.shutdownNow(cause: cause, exitCode: exitCode) }
    }

    // MARK: MachineControl

    public var runState: RunState { shared.withLock { $0.runState } }

    public func stop() {
        onControl {
            // After a broken post-copy, harts may be blocked on pages that never come.
            guard self.isLive, self.runState == .running, !self.live.postcopyBroken.load(ordering: .sequentiallyConsistent) else { return }
            self.pauseHarts()
            self.board.deviceManager.quiesce()
            self.board.clock.pause()
            self.setRunState(.paused)
            self.emit(.stop)
        }
    }

    public func cont() {
        onControl {
            guard self.isLive, self.shared.withLock({ $0.started }) else { return }
            let state = self.runState
            guard state == .paused || state == .prelaunch || state == .postmigrate else { return }
            // After a live migration the disks belong to the destination.
            guard !self.live.disksHandedOver.load(ordering: .sequentiallyConsistent) else { return }
            self.resumeAll()
            self.emit(.resume)
        }
    }

    public func systemReset() {
        onControl { self.resetNow(cause: .hostQMPSystemReset) }
    }

    /// Emits POWERDOWN and presses the board's power button, if it has one the guest can see.
    public func systemPowerdown() {
        onControl {
            guard self.isLive else { return }
            self.emit(.powerdown)
            _ = self.board.pressPowerButton()
        }
    }

    /// Emits SHUTDOWN (host-qmp-quit) and ends `waitUntilExit` with 0. Returns at once, so the
    /// caller can still answer its client; the shutdown happens next on the control queue.
    public func quit() {
        requestHostShutdown(cause: .hostQMPQuit, exitCode: 0)
    }

    public func cpus() -> [CPUInfo] {
        onControl { self.vcpus.map { CPUInfo(index: $0.index, threadID: $0.threadID, pc: $0.programCounter) } }
    }

    public func cpuRegisters(index: Int) -> [CPURegister]? {
        onControl {
            guard self.vcpus.indices.contains(index) else { return nil }
            // Harts in guest code are held out of it for the read, then let go.
            let running = self.isLive && self.runState == .running
            if running { self.pauseHarts() }
            defer { if running { for v in self.vcpus { v.resume() } } }
            return self.vcpus[index].registerDump()
        }
    }

    public func readPhysicalMemory(_ address: UInt64, count: Int) throws(MachineInspectionError) -> [UInt8] {
        let ram = board.ram
        guard count >= 0, ram.contains(GuestPhysicalAddress(address), length: UInt64(count)) else {
            throw .notRAM(address: address, count: count)
        }
        do {
            return try ram.read(GuestPhysicalAddress(address), count: count)
        } catch {
            throw .notRAM(address: address, count: count)
        }
    }

    /// The PLIC's per-source counts.
    public func interruptStatistics() -> [(controller: String, counts: [(source: Int, count: UInt64)])] {
        guard let plic = (board as? VirtBoard)?.plic else { return [] }
        return [(controller: plic.name, counts: plic.interruptCounts())]
    }

    public func memoryMap() -> [MemoryMapEntry] {
        let ram = board.ram.region
        var out = [MemoryMapEntry(base: ram.base.raw, size: ram.size, name: "ram", isRAM: true)]
        out += onControl { board.bus.mappings.map {
            MemoryMapEntry(base: $0.region.base.raw, size: $0.region.size, name: $0.device.name, isRAM: false)
        } }
        return out.sorted { $0.base < $1.base }
    }

    public func addEventObserver(_ observer: @escaping @Sendable (MachineEvent) -> Void) -> Int {
        shared.withLock { s in
            let token = s.nextToken
            s.nextToken += 1
            s.observers[token] = observer
            return token
        }
    }

    public func removeEventObserver(_ token: Int) {
        _ = shared.withLock { $0.observers.removeValue(forKey: token) }
    }

    // MARK: SystemControl (called on a vCPU thread; must not wait for the harts)

    public func requestShutdown(cause: ShutdownCause, exitCode: Int32) {
        control.async { self.shutdownNow(cause: cause, exitCode: exitCode) }
    }

    public func requestReset(cause: ShutdownCause) {
        control.async { self.resetNow(cause: cause) }
    }

    // MARK: Actions (control queue only)

    var isLive: Bool { shared.withLock { $0.exitCode == nil } }

    /// Whether `start()` has run.
    var hasStarted: Bool { shared.withLock { $0.started } }

    private func resetNow(cause: ShutdownCause) {
        guard isLive, shared.withLock({ $0.started }) else { return }
        if cause == .guestReset && actions.rebootShutsDown {
            shutdownNow(cause: cause, exitCode: 0)
            return
        }
        // A source paused for a switch-over or serving post-copy pages keeps its RAM as it was.
        guard runState != .finishMigrate else { return }
        let wasRunning = runState == .running
        if wasRunning { pauseHarts() }
        do {
            try resetBoardAndHarts()
        } catch {
            FileHandle.standardError.write(Data("machine-server: error: reset failed: \(error)\n".utf8))
            board.clock.pause()
            setRunState(.internalError)
            return
        }
        emit(.reset(cause: cause))
        if wasRunning {
            for v in vcpus { v.resume() }
        } else if runState == .shutdown {
            // A machine paused by a guest power-off (shutdownPauses) starts over, like QEMU.
            setRunState(.prelaunch)
        }
    }

    private func shutdownNow(cause: ShutdownCause, exitCode: Int32) {
        guard isLive else { return }
        // After a broken post-copy, harts and devices may be blocked on pages that never
        // come: nothing waits for them (the process ends, and them with it).
        if runState == .running && !live.postcopyBroken.load(ordering: .sequentiallyConsistent) {
            pauseHarts()
            board.deviceManager.quiesce()
        }
        board.clock.pause()
        setRunState(.shutdown)
        emit(.shutdown(cause: cause))
        if cause == .guestShutdown && actions.shutdownPauses {
            emit(.stop)
            return
        }
        for v in vcpus { v.terminate() }
        shared.withLock { $0.exitCode = exitCode }
        stopGDBServers(exitCode: exitCode)
        exited.signal()
    }

    private func resetBoardAndHarts() throws {
        let vectors = try board.resetForBoot()
        guard vectors.count == vcpus.count else {
            throw MachineError.invalidImage(what: "board reset", reason: "\(vectors.count) reset vectors for \(vcpus.count) harts")
        }
        for (v, r) in zip(vcpus, vectors) { v.reset(r) }
    }

    /// Lets the clock, the devices and the harts run (from any paused state).
    func resumeAll() {
        board.deviceManager.resume()
        board.clock.resume()
        setRunState(.running)
        for v in vcpus { v.resume() }
    }

    /// Makes every hart leave guest code and waits until all have.
    func pauseHarts() {
        for v in vcpus { v.requestPause() }
        for v in vcpus { v.waitUntilPaused() }
    }

    func setRunState(_ s: RunState) { shared.withLock { $0.runState = s } }

    func emit(_ event: MachineEvent) {
        let observers = shared.withLock { Array($0.observers.sorted { $0.key < $1.key }.map(\.value)) }
        for o in observers { o(event) }
    }

    /// Runs `body` on the control queue later, after the actions already queued.
    func onControlLater(_ body: @escaping @Sendable () -> Void) { control.async(execute: body) }

    /// Runs `body` on the control queue and returns its result; inline when already there.
    func onControl<T>(_ body: () throws -> T) rethrows -> T {
        if DispatchQueue.getSpecific(key: onControlQueue) == true { return try body() }
        return try control.sync(execute: body)
    }
}

/// Forwards guest requests to the machine, which does not exist yet while the board that needs
/// a `SystemControl` is being built. Any thread.
private final class SystemControlRelay: SystemControl {
    let target = Mutex(WeakMachine(machine: nil))

    func requestShutdown(cause: ShutdownCause, exitCode: Int32) {
        target.withLock { $0.machine }?.requestShutdown(cause: cause, exitCode: exitCode)
    }

    func requestReset(cause: ShutdownCause) {
        target.withLock { $0.machine }?.requestReset(cause: cause)
    }
}

private struct WeakMachine {
    weak var machine: VirtualMachine?
}

/// One hart and the host thread ("vcpu N") that runs it.
///
/// The thread loops: wait until told to run, call `cpu.run()` until it returns, repeat. The
/// control queue tells it to run or pause and waits for the pause; `reset` and `pc` touch the
/// CPU only while it is out of `run()`. `cond` guards every `var`.
final class VCPUThread: @unchecked Sendable {  // unchecked: `cond` guards every var
    let index: Int
    private let cpu: any VirtualCPU
    /// The CPU as this emulator's hart (for the GDB stub), if it is one.
    var hart: Hart? { cpu as? Hart }
    private let cond = NSCondition()
    private var shouldRun = false
    private var inRun = false
    private var terminating = false
    private var tid: Int32 = 0
    private var lastPC: UInt64
    /// Nanoseconds the thread is to sleep out of guest code at its next exit (auto-converge).
    private var throttleSleep: UInt64 = 0

    init(index: Int, cpu: any VirtualCPU) {
        self.index = index
        self.cpu = cpu
        self.lastPC = cpu.pc
    }

    /// The host thread id (what `query-cpus-fast` calls `thread-id`); 0 before the thread runs.
    var threadID: Int {
        cond.lock()
        defer { cond.unlock() }
        return Int(tid)
    }

    /// The registers; only while the hart is out of guest code (the caller paused it).
    func registerDump() -> [CPURegister] {
        cond.lock()
        defer { cond.unlock() }
        precondition(!inRun, "vcpu \(index) registers read while running")
        return cpu.registerDump()
    }

    /// The pc as of the last time the hart left guest code (or its current pc while paused).
    var programCounter: UInt64 {
        cond.lock()
        defer { cond.unlock() }
        return inRun || shouldRun ? lastPC : cpu.pc
    }

    func launch() {
        startThread(named: "vcpu \(index)") { [self] in loop() }
        cond.lock()
        while tid == 0 { cond.wait() }
        cond.unlock()
    }

    private func loop() {
        cond.lock()
        tid = currentThreadID()
        cond.broadcast()
        while true {
            while !shouldRun && !terminating { cond.wait() }
            if terminating { break }
            inRun = true
            cond.unlock()
            cpu.run()
            let pc = cpu.pc
            cond.lock()
            lastPC = pc
            inRun = false
            cond.broadcast()
            if throttleSleep > 0 {
                // Auto-converge: sleep out of guest code, waking early for a pause or the end.
                let until = Date(timeIntervalSinceNow: Double(throttleSleep) / 1e9)
                throttleSleep = 0
                while shouldRun && !terminating && cond.wait(until: until) {}
            }
        }
        cond.unlock()
    }

    /// Makes the thread leave guest code and sleep `nanoseconds` before going on (QEMU's
    /// cpu_throttle). Any thread.
    func throttle(nanoseconds: UInt64) {
        cond.lock()
        throttleSleep = nanoseconds
        let running = inRun
        cond.unlock()
        if running { cpu.interrupts.requestExit() }
    }

    /// Puts the CPU at its reset vector. Only while paused.
    func reset(_ v: HartResetVector) {
        cond.lock()
        defer { cond.unlock() }
        precondition(!inRun, "vcpu \(index) reset while running")
        cpu.reset(entry: v.entry, a0: v.a0, a1: v.a1, a2: v.a2)
        lastPC = cpu.pc
    }

    /// Writes the CPU's state. Only while paused.
    func saveState(to w: inout StateWriter) {
        cond.lock()
        defer { cond.unlock() }
        precondition(!inRun, "vcpu \(index) saved while running")
        cpu.saveState(to: &w)
    }

    var stateVersion: UInt32 { cpu.stateVersion }

    /// Loads the CPU's state. Only while paused.
    func loadState(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
        cond.lock()
        defer { cond.unlock() }
        precondition(!inRun, "vcpu \(index) loaded while running")
        try cpu.loadState(from: &r, version: version)
        lastPC = cpu.pc
    }

    /// Lets the thread enter guest code.
    func resume() {
        cond.lock()
        cpu.interrupts.exitRequest.store(false, ordering: .sequentiallyConsistent)
        shouldRun = true
        cond.broadcast()
        cond.unlock()
    }

    /// Asks the thread to leave guest code (does not wait).
    func requestPause() {
        cond.lock()
        shouldRun = false
        cond.unlock()
        cpu.interrupts.requestExit()
    }

    /// Waits until the thread is out of `run()`.
    func waitUntilPaused() {
        cond.lock()
        while inRun { cond.wait() }
        cond.unlock()
    }

    /// Ends the thread (after a pause).
    func terminate() {
        cond.lock()
        terminating = true
        shouldRun = false
        cond.broadcast()
        cond.unlock()
    }
}

/// The calling thread's kernel thread id (Linux `gettid`, which the Swift Glibc overlay
/// lacks), read from the `/proc/thread-self` link ("PID/task/TID"); 1 if /proc is missing.
private func currentThreadID() -> Int32 {
    var buf = [CChar](repeating: 0, count: 64)
    let n = readlink("/proc/thread-self", &buf, buf.count - 1)
    guard n > 0 else { return 1 }
    let text = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return text.split(separator: "/").last.flatMap { Int32($0) } ?? 1
}
