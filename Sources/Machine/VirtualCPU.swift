/// One guest hart as the board sees it. The CPU implementation lives in `Translator`.
///
/// Owned by its vCPU thread: `run()` is called on that thread only, and `reset` and `pc` only
/// while `run()` is not executing (the control thread pauses the hart first).
public protocol VirtualCPU: AnyObject {
    /// The hart's `mhartid`.
    var hartID: Int { get }
    /// The interrupt lines, timer compare and wake-up signal of this hart.
    var interrupts: HartInterrupts { get }
    /// Puts the hart in its reset state in M-mode at `entry`, with a0, a1 and a2 as given
    /// (QEMU's reset vector passes hartid, the device-tree address and fw_dynamic info).
    func reset(entry: GuestPhysicalAddress, a0: UInt64, a1: UInt64, a2: UInt64)
    /// Executes guest code on the calling thread until `interrupts.exitRequest` is seen; clears
    /// the request and returns. Sleeps inside while the guest waits in `wfi`.
    func run()
    /// The guest program counter (virtual), for `query-cpus-fast` and error reports.
    var pc: UInt64 { get }
    /// Instructions retired since reset.
    var instructionsRetired: UInt64 { get }
    /// The layout version `saveState` writes.
    var stateVersion: UInt32 { get }
    /// Writes the hart's complete architectural state. Only while `run()` is not executing.
    func saveState(to w: inout StateWriter)
    /// Replaces the hart's state with a saved one after validating it (nothing changes when it
    /// is refused). Only while `run()` is not executing.
    func loadState(from r: inout StateReader, version: UInt32) throws(SavedStateError)
    /// The architectural registers for the monitor's `info registers` (pc, privilege, the
    /// main CSRs, x1…x31, f0…f31), in that order. Only while `run()` is not executing.
    func registerDump() -> [CPURegister]
}

extension VirtualCPU {
    /// Only the pc, for CPUs that show nothing else.
    public func registerDump() -> [CPURegister] { [CPURegister(name: "pc", value: pc)] }
}

/// One named register value (`info registers`).
public struct CPURegister: Sendable, Equatable {
    public var name: String
    public var value: UInt64
    public init(name: String, value: UInt64) {
        self.name = name
        self.value = value
    }
}
