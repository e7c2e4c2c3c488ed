import Machine
import Synchronization

/// The SiFive PLIC as QEMU's `virt` maps it at 0x0C00_0000: per-source priorities at
/// 0x0 + 4·source, pending bits at 0x1000, per-context enable bits at 0x2000 + 0x80·context,
/// and per-context threshold at 0x20_0000 + 0x1000·context with claim/complete at +4.
///
/// Two contexts per hart: context 2·h is hart h's M-mode (drives `meip`), 2·h + 1 its S-mode
/// (drives `seip`). Sources 1…`sourceCount` are level-triggered through a gateway: a source is
/// pending while its line is high and it is not claimed; completing a claimed source whose line
/// is still high makes it pending again. Priorities and thresholds are 3 bits (0…7) as in QEMU.
/// All state sits behind one `Mutex`: lines may be driven from any thread, registers are
/// accessed from vCPU threads.
public final class Plic: MMIODevice, Sendable {
    /// Size of the register window on `virt`.
    public static let windowSize: UInt64 = 0x60_0000
    /// Highest source number on `virt` (the device tree's `riscv,ndev`).
    public static let defaultSourceCount = 96
    /// Priorities and thresholds hold this many levels (values 0…7).
    public static let priorityMask: UInt32 = 7

    static let pendingBase: UInt64 = 0x1000
    static let enableBase: UInt64 = 0x2000
    static let enableStride: UInt64 = 0x80
    static let contextBase: UInt64 = 0x20_0000
    static let contextStride: UInt64 = 0x1000

    public let name: String
    /// Highest valid source number; source 0 means "no interrupt".
    public let sourceCount: Int
    private let harts: [HartInterrupts]
    private let state: Mutex<Live>

    private struct Live {
        var priority: [UInt32]
        /// Bit words indexed by source (bit s % 32 of word s / 32).
        var level: [UInt32]
        var pending: [UInt32]
        var claimed: [UInt32]
        /// enable[context][word]
        var enable: [[UInt32]]
        var threshold: [UInt32]
        /// Last level driven on each context's output.
        var output: [Bool]
        /// How many times each source became pending (HMP `info irq`; not saved state).
        var raised: [UInt64] = []
    }

    /// Creates the PLIC for `harts` (index = hart ID) with sources 1…`sourceCount`.
    public init(name: String = "plic", harts: [HartInterrupts], sourceCount: Int = Plic.defaultSourceCount) {
        precondition(sourceCount >= 1 && sourceCount <= 1023, "PLIC source count out of range")
        precondition(harts.count * 2 <= 15872, "too many harts for one PLIC")
        self.name = name
        self.sourceCount = sourceCount
        self.harts = harts
        self.state = Mutex(Self.initialState(sourceCount: sourceCount, contexts: harts.count * 2))
    }

    private static func initialState(sourceCount: Int, contexts: Int) -> Live {
        let words = sourceCount / 32 + 1
        return Live(priority: [UInt32](repeating: 0, count: sourceCount + 1),
                     level: [UInt32](repeating: 0, count: words),
                     pending: [UInt32](repeating: 0, count: words),
                     claimed: [UInt32](repeating: 0, count: words),
                     enable: [[UInt32]](repeating: [UInt32](repeating: 0, count: words), count: contexts),
                     threshold: [UInt32](repeating: 0, count: contexts),
                     output: [Bool](repeating: false, count: contexts),
                     raised: [UInt64](repeating: 0, count: sourceCount + 1))
    }

    /// How many times each source has become pending since the PLIC was created (a source
    /// held high counts once until it is claimed or drops): the sources with a count. Any thread.
    public func interruptCounts() -> [(source: Int, count: UInt64)] {
        state.withLock { s in s.raised.enumerated().filter { $0.element > 0 }.map { (source: $0.offset, count: $0.element) } }
    }

    /// Number of contexts (two per hart).
    public var contextCount: Int { harts.count * 2 }

    /// The interrupt input for `source` (1…`sourceCount`), to hand to a device.
    public func line(_ source: Int) -> any InterruptLine {
        precondition(source >= 1 && source <= sourceCount, "PLIC source \(source) does not exist")
        return PlicLine(plic: self, source: source)
    }

    /// Drives source `source`'s input level; what the lines from `line(_:)` call.
    public func setLevel(source: Int, _ high: Bool) {
        guard source >= 1 && source <= sourceCount else { return }
        state.withLock { s in
            let w = source / 32, bit = UInt32(1) << UInt32(source % 32)
            if high {
                s.level[w] |= bit
                if s.claimed[w] & bit == 0 {
                    if s.pending[w] & bit == 0 { s.raised[source] &+= 1 }
                    s.pending[w] |= bit
                }
            } else {
                s.level[w] &= ~bit
                s.pending[w] &= ~bit  // a level source that drops its request is no longer pending
            }
            updateOutputs(&s)
        }
    }

    /// Clears priorities, enables, thresholds, pending and claimed state (system reset); input
    /// levels are kept, since the devices driving them keep theirs. Control thread, vCPUs paused.
    public func reset() {
        state.withLock { s in
            let level = s.level
            let raised = s.raised
            s = Self.initialState(sourceCount: sourceCount, contexts: contextCount)
            s.raised = raised
            s.output = [Bool](repeating: true, count: contextCount)  // force every output low
            s.level = level
            s.pending = level
            s.pending[0] &= ~1
            updateOutputs(&s)
        }
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        guard size == 4 || size == 8, offset % 4 == 0 else { return 0 }
        if size == 8 {
            return read32(offset) | (read32(offset + 4) << 32)
        }
        return read32(offset)
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        guard size == 4 || size == 8, offset % 4 == 0 else { return }
        write32(offset, UInt32(truncatingIfNeeded: value))
        if size == 8 { write32(offset + 4, UInt32(truncatingIfNeeded: value >> 32)) }
    }

    private func read32(_ offset: UInt64) -> UInt64 {
        state.withLock { s in
            let words = UInt64(s.pending.count)
            if offset < Self.pendingBase {
                let src = Int(offset / 4)
                return src <= sourceCount ? UInt64(s.priority[src]) : 0
            }
            if offset < Self.enableBase {
                let w = (offset - Self.pendingBase) / 4
                return w < words ? UInt64(s.pending[Int(w)]) : 0
            }
            if offset < Self.contextBase {
                let rel = offset - Self.enableBase
                let ctx = Int(rel / Self.enableStride), w = (rel % Self.enableStride) / 4
                return ctx < contextCount && w < words ? UInt64(s.enable[ctx][Int(w)]) : 0
            }
            let rel = offset - Self.contextBase
            let ctx = Int(rel / Self.contextStride)
            guard ctx < contextCount else { return 0 }
            switch rel % Self.contextStride {
            case 0: return UInt64(s.threshold[ctx])
            case 4:
                let src = claim(&s, context: ctx)
                updateOutputs(&s)
                return UInt64(src)
            default: return 0
            }
        }
    }

    private func write32(_ offset: UInt64, _ value: UInt32) {
        state.withLock { s in
            let words = UInt64(s.pending.count)
            if offset < Self.pendingBase {
                let src = Int(offset / 4)
                if src >= 1 && src <= sourceCount { s.priority[src] = value & Self.priorityMask }
            } else if offset < Self.enableBase {
                return  // pending bits are read-only
            } else if offset < Self.contextBase {
                let rel = offset - Self.enableBase
                let ctx = Int(rel / Self.enableStride), w = Int((rel % Self.enableStride) / 4)
                guard ctx < contextCount && UInt64(w) < words else { return }
                var v = value
                if w == 0 { v &= ~1 }  // source 0 does not exist
                if w == s.pending.count - 1 {
                    let validBits = sourceCount % 32 + 1
                    if validBits < 32 { v &= (UInt32(1) << UInt32(validBits)) - 1 }
                }
                s.enable[ctx][w] = v
            } else {
                let rel = offset - Self.contextBase
                let ctx = Int(rel / Self.contextStride)
                guard ctx < contextCount else { return }
                switch rel % Self.contextStride {
                case 0: s.threshold[ctx] = value & Self.priorityMask
                case 4: complete(&s, context: ctx, source: Int(value))
                default: return
                }
            }
            updateOutputs(&s)
        }
    }

    /// The best pending, enabled, unclaimed source above the context's threshold (ties go to the
    /// lowest number), or 0.
    private func best(_ s: Live, context: Int) -> Int {
        var bestSource = 0
        var bestPriority = s.threshold[context]
        for w in 0..<s.pending.count {
            var bits = s.pending[w] & ~s.claimed[w] & s.enable[context][w]
            while bits != 0 {
                let b = bits.trailingZeroBitCount
                bits &= bits - 1
                let src = w * 32 + b
                if s.priority[src] > bestPriority {
                    bestPriority = s.priority[src]
                    bestSource = src
                }
            }
        }
        return bestSource
    }

    private func claim(_ s: inout Live, context: Int) -> Int {
        let src = best(s, context: context)
        if src != 0 {
            let w = src / 32, bit = UInt32(1) << UInt32(src % 32)
            s.pending[w] &= ~bit
            s.claimed[w] |= bit
        }
        return src
    }

    private func complete(_ s: inout Live, context: Int, source: Int) {
        guard source >= 1 && source <= sourceCount else { return }
        let w = source / 32, bit = UInt32(1) << UInt32(source % 32)
        // The spec ignores completions for sources not enabled for this context.
        guard s.enable[context][w] & bit != 0, s.claimed[w] & bit != 0 else { return }
        s.claimed[w] &= ~bit
        if s.level[w] & bit != 0 { s.pending[w] |= bit }
    }

    private func updateOutputs(_ s: inout Live) {
        for ctx in 0..<contextCount {
            let level = best(s, context: ctx) != 0
            if level != s.output[ctx] {
                s.output[ctx] = level
                harts[ctx / 2].set(ctx % 2 == 0 ? HartInterrupts.meip : HartInterrupts.seip, level)
            }
        }
    }
}

/// One PLIC input handed to a device; setting it drives the PLIC's gateway for that source.
final class PlicLine: InterruptLine {
    let plic: Plic
    let source: Int

    init(plic: Plic, source: Int) {
        self.plic = plic
        self.source = source
    }

    func set(_ level: Bool) { plic.setLevel(source: source, level) }
}

// MARK: Saved state

extension Plic: StatefulDevice {
    /// Priorities, input levels, pending and claimed bits, and each context's enables and
    /// threshold. The outputs to the harts are derived from these.
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        public var priority: [UInt32]
        public var level: [UInt32]
        public var pending: [UInt32]
        public var claimed: [UInt32]
        public var enable: [[UInt32]]
        public var threshold: [UInt32]

        public func encode(to w: inout StateWriter) {
            w.u32s(priority)
            w.u32s(level)
            w.u32s(pending)
            w.u32s(claimed)
            w.count(enable.count)
            for e in enable { w.u32s(e) }
            w.u32s(threshold)
        }

        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            priority = try r.u32s("priority", limit: 1024)
            level = try r.u32s("level", limit: 33)
            pending = try r.u32s("pending", limit: 33)
            claimed = try r.u32s("claimed", limit: 33)
            let contexts = try r.count("enable", limit: 15872, minimumElementSize: 4)
            var e = [[UInt32]]()
            for i in 0..<contexts { e.append(try r.u32s("enable[\(i)]", limit: 33)) }
            enable = e
            threshold = try r.u32s("threshold", limit: 15872)
        }

        init(priority: [UInt32], level: [UInt32], pending: [UInt32], claimed: [UInt32], enable: [[UInt32]],
             threshold: [UInt32]) {
            self.priority = priority
            self.level = level
            self.pending = pending
            self.claimed = claimed
            self.enable = enable
            self.threshold = threshold
        }
    }

    public var stateSection: String { name }

    public func captureState() -> State {
        state.withLock { s in
            State(priority: s.priority, level: s.level, pending: s.pending, claimed: s.claimed, enable: s.enable,
                  threshold: s.threshold)
        }
    }

    public func applyState(_ n: State) throws(SavedStateError) {
        let words = sourceCount / 32 + 1
        guard n.priority.count == sourceCount + 1 else { throw refusal("priority", "\(n.priority.count) entries, expected \(sourceCount + 1)") }
        guard n.priority.allSatisfy({ $0 <= Self.priorityMask }) else { throw refusal("priority", "a priority is above \(Self.priorityMask)") }
        for (field, a) in [("level", n.level), ("pending", n.pending), ("claimed", n.claimed)] where a.count != words {
            throw refusal(field, "\(a.count) words, expected \(words)")
        }
        guard n.enable.count == contextCount, n.enable.allSatisfy({ $0.count == words }) else {
            throw refusal("enable", "\(n.enable.count) contexts, expected \(contextCount) of \(words) words")
        }
        guard n.threshold.count == contextCount, n.threshold.allSatisfy({ $0 <= Self.priorityMask }) else {
            throw refusal("threshold", "expected \(contextCount) thresholds of at most \(Self.priorityMask)")
        }
        state.withLock { s in
            s.priority = n.priority
            s.level = n.level
            s.pending = n.pending
            s.claimed = n.claimed
            s.enable = n.enable
            s.threshold = n.threshold
            // Drive every output to its derived level, whatever it was before.
            for ctx in 0..<contextCount {
                let level = best(s, context: ctx) != 0
                s.output[ctx] = level
                harts[ctx / 2].set(ctx % 2 == 0 ? HartInterrupts.meip : HartInterrupts.seip, level)
            }
        }
    }
}

extension Plic {
    public func deviceTreeNode(_ c: DeviceTreeContext) -> DeviceTreeNode? {
        var n = c.node("plic")
        if let p = c.phandle { n.set("phandle", .u32([p])) }
        n.set("riscv,ndev", .u32([UInt32(sourceCount)]))
        n.set("reg", c.reg)
        // Per hart: the M-mode (11) and S-mode (9) external interrupt contexts.
        n.set("interrupts-extended", .u32(c.hartInterruptControllers.flatMap { [$0, 11, $0, 9] }))
        n.set("interrupt-controller", .empty)
        n.set("compatible", .strings(["sifive,plic-1.0.0", "riscv,plic0"]))
        n.set("#address-cells", .u32([0]))
        n.set("#interrupt-cells", .u32([1]))
        return n
    }
}
