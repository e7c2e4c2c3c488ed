import Machine

/// The machine-level ACLINT in SiFive CLINT layout, as QEMU's `virt` maps it at 0x0200_0000:
/// MSWI `msip` words at 0x0 + 4·hart, MTIMER `mtimecmp` at 0x4000 + 8·hart, `mtime` at 0xBFF8.
///
/// `msip` drives `HartInterrupts.msip`; `mtimecmp` lives in `HartInterrupts.mtimecmp`, and the
/// hart itself derives MTIP from `mtime >= mtimecmp`, so this device never polls. `mtime` reads
/// the shared `VirtualClock`; writes to `mtime` are ignored (the timebase is the machine's
/// virtual clock, which the guest cannot move; OpenSBI and Linux never write it on `virt`).
/// The device holds no state of its own, so any vCPU thread may access it concurrently.
public final class Aclint: MMIODevice, Sendable {
    /// Size of the CLINT window on `virt`.
    public static let windowSize: UInt64 = 0x10000
    /// Offset of hart 0's `msip` word.
    public static let msipBase: UInt64 = 0x0
    /// Offset of hart 0's `mtimecmp`.
    public static let mtimecmpBase: UInt64 = 0x4000
    /// Offset of `mtime`.
    public static let mtimeOffset: UInt64 = 0xBFF8
    /// Most harts one CLINT window can serve (the `mtimecmp` array must end before `mtime`).
    public static let maxHarts = 4095

    public let name: String
    private let harts: [HartInterrupts]
    private let clock: VirtualClock

    /// Creates the CLINT for `harts` (index = hart ID), reading time from `clock`.
    public init(name: String = "clint", harts: [HartInterrupts], clock: VirtualClock) {
        precondition(harts.count <= Self.maxHarts, "too many harts for one CLINT")
        self.name = name
        self.harts = harts
        self.clock = clock
    }

    /// Clears every `msip` and sets every `mtimecmp` to its reset value (all ones).
    /// Called on the control thread while the vCPUs are paused.
    public func reset() {
        for h in harts {
            h.set(HartInterrupts.msip, false)
            h.setTimerCompare(.max)
        }
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        if offset < UInt64(harts.count) * 4 {
            guard offset % 4 == 0 else { return 0 }
            let h = harts[Int(offset / 4)]
            return h.lines.load(ordering: .relaxed) & HartInterrupts.msip != 0 ? 1 : 0
        }
        if offset >= Self.mtimecmpBase && offset < Self.mtimecmpBase + UInt64(harts.count) * 8 {
            let rel = offset - Self.mtimecmpBase
            let value = harts[Int(rel / 8)].mtimecmp.load(ordering: .relaxed)
            return Self.slice(value, byteOffset: rel % 8, size: size)
        }
        if offset >= Self.mtimeOffset && offset < Self.mtimeOffset + 8 {
            return Self.slice(clock.ticks, byteOffset: offset - Self.mtimeOffset, size: size)
        }
        return 0
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        if offset < UInt64(harts.count) * 4 {
            guard offset % 4 == 0 else { return }
            let h = harts[Int(offset / 4)]
            h.set(HartInterrupts.msip, value & 1 != 0)
            return
        }
        if offset >= Self.mtimecmpBase && offset < Self.mtimecmpBase + UInt64(harts.count) * 8 {
            let rel = offset - Self.mtimecmpBase
            let h = harts[Int(rel / 8)]
            let old = h.mtimecmp.load(ordering: .relaxed)
            h.setTimerCompare(Self.deposit(old, value, byteOffset: rel % 8, size: size))
        }
        // mtime writes and anything else: ignored (see the type's documentation).
    }

    /// The `size`-byte piece of a 64-bit register starting at `byteOffset`.
    static func slice(_ reg: UInt64, byteOffset: UInt64, size: Int) -> UInt64 {
        let shifted = reg >> (8 * byteOffset)
        return size >= 8 ? shifted : shifted & ((1 << (8 * UInt64(size))) - 1)
    }

    /// `reg` with its `size` bytes at `byteOffset` replaced by the low bytes of `value`.
    static func deposit(_ reg: UInt64, _ value: UInt64, byteOffset: UInt64, size: Int) -> UInt64 {
        guard byteOffset < 8 else { return reg }
        let bits = min(8 * UInt64(size), 64 - 8 * byteOffset)
        let mask: UInt64 = (bits >= 64 ? ~0 : (1 << bits) - 1) << (8 * byteOffset)
        return (reg & ~mask) | ((value << (8 * byteOffset)) & mask)
    }
}

// MARK: Saved state

extension Aclint: StatefulDevice {
    /// Each hart's MSIP bit and `mtimecmp` (`mtime` is the machine's virtual clock, saved with it).
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        public var msip: [Bool]
        public var mtimecmp: [UInt64]

        public func encode(to w: inout StateWriter) {
            w.count(msip.count)
            for b in msip { w.bool(b) }
            w.u64s(mtimecmp)
        }

        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            let n = try r.count("msip", limit: Aclint.maxHarts)
            var bits = [Bool]()
            for _ in 0..<n { bits.append(try r.bool("msip")) }
            msip = bits
            mtimecmp = try r.u64s("mtimecmp", limit: Aclint.maxHarts)
        }

        init(msip: [Bool], mtimecmp: [UInt64]) {
            self.msip = msip
            self.mtimecmp = mtimecmp
        }
    }

    public var stateSection: String { name }

    public func captureState() -> State {
        State(msip: harts.map { $0.lines.load(ordering: .relaxed) & HartInterrupts.msip != 0 },
              mtimecmp: harts.map { $0.mtimecmp.load(ordering: .relaxed) })
    }

    public func applyState(_ s: State) throws(SavedStateError) {
        guard s.msip.count == harts.count else {
            throw refusal("msip", "\(s.msip.count) harts, this machine has \(harts.count)")
        }
        guard s.mtimecmp.count == harts.count else {
            throw refusal("mtimecmp", "\(s.mtimecmp.count) harts, this machine has \(harts.count)")
        }
        for (i, h) in harts.enumerated() {
            h.set(HartInterrupts.msip, s.msip[i])
            h.setTimerCompare(s.mtimecmp[i])
        }
    }
}

extension Aclint {
    public func deviceTreeNode(_ c: DeviceTreeContext) -> DeviceTreeNode? {
        var n = c.node("clint")
        // Per hart: the software (3) and timer (7) interrupts.
        n.set("interrupts-extended", .u32(c.hartInterruptControllers.flatMap { [$0, 3, $0, 7] }))
        n.set("reg", c.reg)
        n.set("compatible", .strings(["sifive,clint0", "riscv,clint0"]))
        return n
    }
}
