/// QEMU's run states, as `query-status` reports them.
public enum RunState: String, Sendable, CaseIterable {
    case prelaunch
    case running
    case paused
    case shutdown
    case internalError = "internal-error"
    case guestPanicked = "guest-panicked"
    case debug
    case finishMigrate = "finish-migrate"
    case inmigrate
    case postmigrate
    case restoreVM = "restore-vm"
    case saveVM = "save-vm"
    case suspended
    case watchdog
    case colo
    case ioError = "io-error"
}

/// Why the machine shut down or reset, with QEMU's `ShutdownCause` names.
public enum ShutdownCause: String, Sendable {
    case none
    case hostError = "host-error"
    case hostQMPQuit = "host-qmp-quit"
    case hostQMPSystemReset = "host-qmp-system-reset"
    case hostSignal = "host-signal"
    case hostUI = "host-ui"
    case guestShutdown = "guest-shutdown"
    case guestReset = "guest-reset"
    case guestPanic = "guest-panic"
    case subsystemReset = "subsystem-reset"

    /// True when the guest itself asked for it (the `guest` member of SHUTDOWN and RESET).
    public var isGuest: Bool {
        self == .guestShutdown || self == .guestReset || self == .guestPanic
    }
}

/// Something that happened to the machine that clients are told about (QMP events).
public enum MachineEvent: Sendable, Equatable {
    case stop
    case resume
    case reset(cause: ShutdownCause)
    case shutdown(cause: ShutdownCause)
    case powerdown
    /// A background job changed state (QEMU's JOB_STATUS_CHANGE).
    case jobStatusChange(id: String, status: JobStatus)
    /// A migration changed status (QEMU's MIGRATION; sent only with the `events` capability).
    case migration(status: MigrationProgress.Status)
    /// An outgoing migration started pass `pass` over RAM (QEMU's MIGRATION_PASS).
    case migrationPass(Int)
}

/// What a device may ask of the whole system: the SiFive test device powers off or resets.
///
/// Called from the vCPU thread that performed the access; the request takes effect when that
/// thread next leaves its run loop.
public protocol SystemControl: AnyObject, Sendable {
    /// The guest asks to power off (exit code is carried for the HTIF/test-device "fail" case).
    func requestShutdown(cause: ShutdownCause, exitCode: Int32)
    /// The guest asks for a reset.
    func requestReset(cause: ShutdownCause)
}

/// Information about one vCPU, as `query-cpus-fast` reports it.
public struct CPUInfo: Sendable, Equatable {
    public var index: Int
    public var threadID: Int
    public var pc: UInt64
    public init(index: Int, threadID: Int, pc: UInt64) {
        self.index = index
        self.threadID = threadID
        self.pc = pc
    }
}

/// The machine façade that the protocol servers (QMP, VNC) drive.
///
/// Every method may be called from any thread; each turns into one typed action executed on the
/// machine's control thread, in order. Methods return once the action has taken effect
/// (for `stop`, the vCPUs have left guest code).
public protocol MachineControl: AnyObject, Sendable {
    /// The current run state.
    var runState: RunState { get }
    /// The `-name` of the machine, if any.
    var machineName: String? { get }
    /// The registers of vCPU `index` (nil for no such vCPU); a running machine's harts are
    /// held out of guest code while they are read.
    func cpuRegisters(index: Int) -> [CPURegister]?
    /// Reads `count` bytes of guest RAM at the physical `address` (the monitor's `xp`).
    func readPhysicalMemory(_ address: UInt64, count: Int) throws(MachineInspectionError) -> [UInt8]
    /// The guest physical address map: RAM and every device window, by base address.
    func memoryMap() -> [MemoryMapEntry]
    /// Each interrupt controller's name and how many times each of its sources was raised
    /// (the monitor's `info irq`).
    func interruptStatistics() -> [(controller: String, counts: [(source: Int, count: UInt64)])]
    /// The machine's UUID (`-uuid`, the description's `uuid`), if one was given.
    var machineUUID: String? { get }
    /// Pauses all vCPUs (emits STOP if it was running).
    func stop()
    /// Resumes all vCPUs (emits RESUME if it was paused).
    func cont()
    /// Resets the machine as if the reset line were pulsed (emits RESET).
    func systemReset()
    /// Presses the power button: the guest gets an ACPI-style power-key event (emits POWERDOWN).
    func systemPowerdown()
    /// Ends the server (emits SHUTDOWN with cause host-qmp-quit).
    func quit()
    /// Per-vCPU information.
    func cpus() -> [CPUInfo]
    /// Registers an observer that is called, on an arbitrary thread, for every machine event.
    /// Returns a token for `removeEventObserver`.
    func addEventObserver(_ observer: @escaping @Sendable (MachineEvent) -> Void) -> Int
    /// Removes an observer registered with `addEventObserver`.
    func removeEventObserver(_ token: Int)
    /// Starts a GDB remote-protocol server on `host:port` (HMP `gdbserver`, QEMU's `-gdb`).
    /// Returns nil when it listens, else a message naming what is wrong. Any thread.
    func startGDBServer(host: String, port: Int) -> String?
}

extension MachineControl {
    /// No UUID unless the machine says otherwise.
    public var machineUUID: String? { nil }
    /// No register access unless the machine provides it.
    public func cpuRegisters(index: Int) -> [CPURegister]? { nil }
    /// No memory access unless the machine provides it.
    public func readPhysicalMemory(_ address: UInt64, count: Int) throws(MachineInspectionError) -> [UInt8] {
        throw .unavailable("this machine does not expose its memory")
    }
    /// No memory map unless the machine provides it.
    public func memoryMap() -> [MemoryMapEntry] { [] }
    /// No interrupt controller unless the machine has one.
    public func interruptStatistics() -> [(controller: String, counts: [(source: Int, count: UInt64)])] { [] }
}

/// Why the monitor could not look into the machine; `description` is the message.
public enum MachineInspectionError: Error, Equatable, CustomStringConvertible {
    /// The address range is not guest RAM.
    case notRAM(address: UInt64, count: Int)
    /// The machine cannot answer this at all.
    case unavailable(String)

    public var description: String {
        switch self {
        case .notRAM(let a, let n):
            return "Cannot access memory at 0x\(String(a, radix: 16)) (\(n) bytes): it is not guest RAM"
        case .unavailable(let why): return why
        }
    }
}

/// One region of the guest physical address space (`info mtree`).
public struct MemoryMapEntry: Sendable, Equatable {
    public var base: UInt64
    public var size: UInt64
    /// "ram" or the device's name.
    public var name: String
    public var isRAM: Bool
    public init(base: UInt64, size: UInt64, name: String, isRAM: Bool) {
        self.base = base
        self.size = size
        self.name = name
        self.isRAM = isRAM
    }
}

/// The progress of the current or last migration (a machine-state save to a destination), as
/// `query-migrate` reports it.
public struct MigrationProgress: Sendable, Equatable {
    /// QEMU's `MigrationStatus` names that machine-server uses.
    public enum Status: String, Sendable {
        case none, setup, active, cancelling, cancelled, completed, failed
        /// Post-copy: the guest runs on the destination, which pulls the pages it still lacks.
        case postcopyActive = "postcopy-active"
        /// Post-copy broke off (the connection, or the other end, failed): the guest cannot
        /// continue on the destination and the source holds its copy, paused.
        case postcopyPaused = "postcopy-paused"
    }

    public var status: Status = .none
    /// Milliseconds from start to end (or until now while active).
    public var totalTime: UInt64 = 0
    /// Milliseconds the guest was paused for it.
    public var downtime: UInt64 = 0
    /// Milliseconds spent opening the destination.
    public var setupTime: UInt64 = 0
    /// Bytes of the stream written.
    public var transferred: UInt64 = 0
    /// Guest RAM size in bytes.
    public var ramTotal: UInt64 = 0
    /// Zero pages skipped and pages sent.
    public var zeroPages: UInt64 = 0
    public var normalPages: UInt64 = 0
    /// Why it failed.
    public var error: String? = nil
    /// Bytes of RAM known to be still to send (the pages dirtied during the last pass).
    public var remaining: UInt64 = 0
    /// Milliseconds the switch-over is expected to take at the measured bandwidth.
    public var expectedDowntime: UInt64 = 0
    /// Pages dirtied per second during the last pass.
    public var dirtyPagesRate: UInt64 = 0
    /// Pages sent per second during the last pass.
    public var pagesPerSecond: UInt64 = 0
    /// Throughput of the last pass (of the whole migration once complete), megabits/s.
    public var mbps: Double = 0
    /// Times the dirty log was collected.
    public var dirtySyncCount: UInt64 = 0
    /// Post-copy: pages the destination asked for because the guest touched them.
    public var postcopyRequests: UInt64 = 0
    /// Auto-converge's current throttle in percent (0: not throttling).
    public var throttlePercentage: Int = 0
    /// When it started (DispatchTime-style uptime nanoseconds), for total-time while active.
    public var startedAt: UInt64 = 0

    public init() {}
}

/// The tunable parameters of outgoing migrations, with QEMU's defaults.
public struct MigrationParameters: Sendable, Equatable {
    /// Longest acceptable switch-over pause, milliseconds.
    public var downtimeLimit: UInt64 = 300
    /// Most bytes per second sent.
    public var maxBandwidth: UInt64 = 128 << 20
    /// Auto-converge's first throttle, its step and its ceiling, in percent.
    public var throttleInitial = 20
    public var throttleIncrement = 10
    public var maxThrottle = 99
    /// Most bytes per second of post-copy's background stream (0: unlimited, QEMU's default).
    public var maxPostcopyBandwidth: UInt64 = 0
    public init() {}
}

/// The migration capabilities machine-server implements.
public struct MigrationCapabilities: Sendable, Equatable {
    /// Send MIGRATION and MIGRATION_PASS events.
    public var events = false
    /// Throttle the vCPUs when the guest dirties RAM faster than it is sent.
    public var autoConverge = false
    /// QEMU's `postcopy-ram`: the migration may switch to post-copy (`migrate-start-postcopy`);
    /// both ends must set it.
    public var postcopyRam = false
    public init() {}
}

/// Saving and loading the whole machine's state through a URI (`file:PATH`, `exec:CMD`), as
/// QEMU's `migrate` and `migrate-incoming` do. Any thread.
public protocol MachineMigration: AnyObject, Sendable {
    /// Starts saving the machine's state to `uri` and returns; the machine ends paused in
    /// `postmigrate`. Throws at once for a URI it cannot use or while another one runs.
    func startMigration(uri: String) throws
    /// The current or last migration's progress.
    func migrationProgress() -> MigrationProgress
    /// Loads the machine's state from `uri` (a machine waiting with `--incoming defer`), and
    /// runs it unless it was started with -S. Returns when the state is loaded.
    func incomingMigration(uri: String) throws
    /// Cancels the outgoing migration in progress (nothing when none runs).
    func cancelMigration()
    /// The parameters outgoing migrations use.
    func migrationParameters() -> MigrationParameters
    /// Replaces the parameters (bandwidth applies at once to a migration in progress).
    func setMigrationParameters(_ p: MigrationParameters)
    /// The capabilities.
    func migrationCapabilities() -> MigrationCapabilities
    /// Replaces the capabilities; throws while a migration runs, or when `postcopyRam` is
    /// asked for on a host without userfaultfd.
    func setMigrationCapabilities(_ c: MigrationCapabilities) throws
    /// Switches the outgoing migration in progress to post-copy (QEMU's
    /// `migrate-start-postcopy`); throws, saying why, when it cannot.
    func startPostcopy() throws
}

/// A background job's state, with QEMU's `JobStatus` names.
public enum JobStatus: String, Sendable {
    case created, running, waiting, pending, aborting, concluded, null
}

/// What a snapshot job does (QEMU's `JobType` names).
public enum SnapshotJobKind: String, Sendable {
    case save = "snapshot-save"
    case load = "snapshot-load"
    case delete = "snapshot-delete"
}

/// One background job, as `query-jobs` reports it.
public struct JobInfo: Sendable, Equatable {
    public var id: String
    public var kind: SnapshotJobKind
    public var status: JobStatus
    public var currentProgress: Int
    public var totalProgress: Int
    public var error: String?

    public init(id: String, kind: SnapshotJobKind, status: JobStatus, currentProgress: Int = 0, totalProgress: Int = 1,
                error: String? = nil) {
        self.id = id
        self.kind = kind
        self.status = status
        self.currentProgress = currentProgress
        self.totalProgress = totalProgress
        self.error = error
    }
}

/// One internal snapshot as `info snapshots` lists it.
public struct SnapshotListing: Sendable, Equatable {
    public var id: String
    public var name: String
    public var vmStateSize: UInt64
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var icount: UInt64?

    public init(id: String, name: String, vmStateSize: UInt64, dateSeconds: UInt32, dateNanoseconds: UInt32,
                vmClockNanoseconds: UInt64, icount: UInt64?) {
        self.id = id
        self.name = name
        self.vmStateSize = vmStateSize
        self.dateSeconds = dateSeconds
        self.dateNanoseconds = dateNanoseconds
        self.vmClockNanoseconds = vmClockNanoseconds
        self.icount = icount
    }
}

/// Internal snapshots: the machine's state and its disks saved inside its qcow2 images, as
/// QEMU's savevm/loadvm and snapshot jobs do. Any thread.
public protocol MachineSnapshots: AnyObject, Sendable {
    /// Starts a snapshot job (QMP `snapshot-save`/`-load`/`-delete`); throws at once for a
    /// duplicate job id. Disks are named by device id; `vmstate` is nil for delete.
    func startSnapshotJob(_ kind: SnapshotJobKind, jobID: String, tag: String, vmstate: String?, devices: [String]) throws
    /// The jobs not yet dismissed.
    func jobs() -> [JobInfo]
    /// Dismisses a concluded job.
    func dismissJob(id: String) throws
    /// HMP `savevm`: a snapshot of every writable disk, the machine state in the first one.
    /// Replaces snapshots of the same name. Returns when done.
    func saveSnapshot(tag: String) throws
    /// HMP `loadvm`. Returns when done.
    func loadSnapshot(tag: String) throws
    /// HMP `delvm`. Returns when done.
    func deleteSnapshot(tag: String) throws
    /// HMP `info snapshots`: the snapshots with machine state on the first writable disk that
    /// every other writable disk also has.
    func listSnapshots() throws -> [SnapshotListing]
}

extension MachineControl {
    /// Machines without a debugger interface refuse.
    public func startGDBServer(host: String, port: Int) -> String? { "this machine has no GDB stub" }
}
