import Machine
import Synchronization

/// A fixed-capacity FIFO of bytes (a ring buffer); the storage is allocated once.
///
/// A plain value: the owner provides any locking.
struct ByteRing: Sendable {
    private var storage: [UInt8]
    private var head = 0
    /// Number of bytes queued.
    private(set) var count = 0

    init(capacity: Int) { storage = [UInt8](repeating: 0, count: max(1, capacity)) }

    var capacity: Int { storage.count }
    var isEmpty: Bool { count == 0 }
    var first: UInt8? { count == 0 ? nil : storage[head] }

    /// Appends a byte; returns false (and drops it) when full.
    mutating func append(_ b: UInt8) -> Bool {
        guard count < storage.count else { return false }
        storage[(head + count) % storage.count] = b
        count += 1
        return true
    }

    /// Removes and returns the oldest byte.
    mutating func removeFirst() -> UInt8? {
        guard count > 0 else { return nil }
        let b = storage[head]
        head = (head + 1) % storage.count
        count -= 1
        return b
    }

    /// Drops up to `n` of the oldest bytes.
    mutating func removeFirst(upTo n: Int) {
        let k = min(n, count)
        head = (head + k) % storage.count
        count -= k
    }
}

/// The register file of an NS16550A UART as a pure state machine (no I/O, no locking).
///
/// The receive FIFO is the first 16 bytes (1 byte in 16450 mode) of a large input queue, so
/// host input is held back rather than overrun; transmission is instantaneous, so the
/// transmitter is always empty after a write. `Uart16550` wraps this with a lock and the host
/// backend.
struct Uart16550Registers: Sendable {
    // Register offsets (reg-shift 0).
    static let rbrTHR: UInt64 = 0, ierDLM: UInt64 = 1, iirFCR: UInt64 = 2, lcr: UInt64 = 3
    static let mcr: UInt64 = 4, lsr: UInt64 = 5, msr: UInt64 = 6, scr: UInt64 = 7

    // IER bits.
    static let ierRDA: UInt8 = 0x01, ierTHRE: UInt8 = 0x02, ierRLS: UInt8 = 0x04, ierMSR: UInt8 = 0x08
    // IIR interrupt identifiers.
    static let iirNone: UInt8 = 0x01, iirMSR: UInt8 = 0x00, iirTHRE: UInt8 = 0x02
    static let iirRDA: UInt8 = 0x04, iirRLS: UInt8 = 0x06, iirCTI: UInt8 = 0x0C
    static let iirFIFOEnabled: UInt8 = 0xC0
    // LSR bits.
    static let lsrDR: UInt8 = 0x01, lsrOE: UInt8 = 0x02, lsrTHRE: UInt8 = 0x20, lsrTEMT: UInt8 = 0x40
    static let lsrErrorBits: UInt8 = 0x1E
    // LCR / MCR / FCR bits.
    static let lcrDLAB: UInt8 = 0x80, mcrLoopback: UInt8 = 0x10
    static let fcrEnable: UInt8 = 0x01, fcrClearRX: UInt8 = 0x02, fcrClearTX: UInt8 = 0x04
    /// Depth of the receive FIFO in 16550 mode.
    static let fifoDepth = 16

    var ier: UInt8 = 0
    var lcr: UInt8 = 0
    var mcr: UInt8 = 0
    var scr: UInt8 = 0
    var dll: UInt8 = 0x0C  // 9600 baud at 1.8432 MHz, QEMU's reset value
    var dlm: UInt8 = 0
    var fifoEnabled = false
    /// Receive trigger level in bytes (1, 4, 8 or 14).
    var triggerLevel = 1
    /// Sticky line-status error bits (OE, PE, FE, BI), cleared by reading LSR.
    var lineErrors: UInt8 = 0
    /// Modem-status delta bits (DCTS, DDSR, TERI, DDCD), cleared by reading MSR.
    var msrDelta: UInt8 = 0
    /// The THRE interrupt condition (the 8250 "thr_ipending" latch).
    var thrInterruptPending = false
    /// Host input not yet read by the guest; its head is the receive FIFO.
    var input: ByteRing
    /// Input bytes dropped because the queue was full.
    var droppedInputBytes: UInt64 = 0

    init(inputCapacity: Int) { input = ByteRing(capacity: inputCapacity) }

    /// Bytes currently visible in the receive FIFO (or holding register).
    var rxFIFOCount: Int { min(input.count, fifoEnabled ? Self.fifoDepth : 1) }

    /// MSR's status bits: all "connected" normally; in loopback, mirrors of MCR's outputs.
    var modemStatus: UInt8 {
        if mcr & Self.mcrLoopback != 0 {
            return ((mcr & 0x0C) << 4) | ((mcr & 0x02) << 3) | ((mcr & 0x01) << 5)
        }
        return 0xB0  // DCD | DSR | CTS
    }

    /// The highest-priority pending interrupt identifier (IIR bits 3:0).
    var interruptID: UInt8 {
        if ier & Self.ierRLS != 0 && lineErrors != 0 { return Self.iirRLS }
        if ier & Self.ierRDA != 0 && input.count > 0 {
            return fifoEnabled && rxFIFOCount < triggerLevel ? Self.iirCTI : Self.iirRDA
        }
        if ier & Self.ierTHRE != 0 && thrInterruptPending { return Self.iirTHRE }
        if ier & Self.ierMSR != 0 && msrDelta != 0 { return Self.iirMSR }
        return Self.iirNone
    }

    /// The level of the interrupt output.
    var interruptAsserted: Bool { interruptID != Self.iirNone }

    /// Queues host input; returns how many bytes were dropped because the queue was full.
    mutating func receive<S: Sequence>(_ bytes: S) -> Int where S.Element == UInt8 {
        var dropped = 0
        for b in bytes where !input.append(b) { dropped += 1 }
        droppedInputBytes &+= UInt64(dropped)
        return dropped
    }

    /// A guest read of one register byte (with its side effects).
    mutating func read(_ offset: UInt64) -> UInt8 {
        switch offset {
        case Self.rbrTHR:
            if lcr & Self.lcrDLAB != 0 { return dll }
            return input.removeFirst() ?? 0
        case Self.ierDLM:
            return lcr & Self.lcrDLAB != 0 ? dlm : ier
        case Self.iirFCR:
            let id = interruptID
            if id == Self.iirTHRE { thrInterruptPending = false }
            return id | (fifoEnabled ? Self.iirFIFOEnabled : 0)
        case Self.lcr: return lcr
        case Self.mcr: return mcr
        case Self.lsr:
            let v = (input.isEmpty ? 0 : Self.lsrDR) | Self.lsrTHRE | Self.lsrTEMT | lineErrors
            lineErrors = 0
            return v
        case Self.msr:
            let v = modemStatus | msrDelta
            msrDelta = 0
            return v
        case Self.scr: return scr
        default: return 0
        }
    }

    /// A guest write of one register byte. Returns the byte to transmit to the host, if any.
    mutating func write(_ offset: UInt64, _ value: UInt8) -> UInt8? {
        switch offset {
        case Self.rbrTHR:
            if lcr & Self.lcrDLAB != 0 {
                dll = value
                return nil
            }
            // The byte leaves at once, so THR is empty again right after the write.
            thrInterruptPending = true
            if mcr & Self.mcrLoopback != 0 {
                if !input.append(value) { lineErrors |= Self.lsrOE }
                return nil
            }
            return value
        case Self.ierDLM:
            if lcr & Self.lcrDLAB != 0 {
                dlm = value
                return nil
            }
            let changed = (ier ^ value) & 0x0F
            ier = value & 0x0F
            // A rising edge of ETBEI re-samples THRE (what the 8250 driver's THRE test expects).
            if changed & Self.ierTHRE != 0 && ier & Self.ierTHRE != 0 { thrInterruptPending = true }
        case Self.iirFCR:
            let enable = value & Self.fcrEnable != 0
            if enable != fifoEnabled {
                input.removeFirst(upTo: rxFIFOCount)  // toggling the FIFO mode empties the FIFOs
                fifoEnabled = enable
            } else if enable && value & Self.fcrClearRX != 0 {
                input.removeFirst(upTo: rxFIFOCount)
            }
            triggerLevel = [1, 4, 8, 14][Int(value >> 6)]
        case Self.lcr: lcr = value
        case Self.mcr:
            let before = modemStatus
            mcr = value & 0x1F
            let after = modemStatus
            let changed = before ^ after
            // CTS, DSR, DCD changes set their delta bits; RI sets TERI on its trailing edge.
            if changed & 0x10 != 0 { msrDelta |= 0x01 }
            if changed & 0x20 != 0 { msrDelta |= 0x02 }
            if before & 0x40 != 0 && after & 0x40 == 0 { msrDelta |= 0x04 }
            if changed & 0x80 != 0 { msrDelta |= 0x08 }
        case Self.scr: scr = value
        default: break  // LSR and MSR are read-only
        }
        return nil
    }
}

/// An NS16550A UART as on QEMU's `virt` board: byte registers at stride 1 (reg-shift 0) in a
/// 0x100-byte window, 16-byte FIFOs, and a level interrupt output.
///
/// Guest output goes to a `CharBackend` on the vCPU thread that writes THR. Host input arrives
/// on the backend's thread and waits in a large queue (64 KiB by default) whose head is the
/// receive FIFO, so typed or pasted input is not lost. All register state sits behind a `Mutex`;
/// the interrupt line is driven while that lock is held so levels are never reordered.
public final class Uart16550: MMIODevice, Sendable {
    /// Size of the register window on `virt`.
    public static let windowSize: UInt64 = 0x100
    /// Default capacity of the host input queue, in bytes.
    public static let defaultInputCapacity = 64 * 1024

    public let name: String
    private let irq: any InterruptLine
    private let backend: (any CharBackend)?
    private let state: Mutex<Locked>

    private struct Locked {
        var regs: Uart16550Registers
        var irqLevel = false
        /// The backend was told there is little room: tell it once the guest has read half.
        var inputThrottled = false
    }

    /// Creates the UART. `backend` receives guest output and supplies host input (its receiver is
    /// replaced by this UART's); with no backend, output is discarded. `irq` is driven as a level.
    public init(name: String = "uart0", irq: any InterruptLine, backend: (any CharBackend)?,
                inputCapacity: Int = Uart16550.defaultInputCapacity) {
        self.name = name
        self.irq = irq
        self.backend = backend
        self.state = Mutex(Locked(regs: Uart16550Registers(inputCapacity: inputCapacity)))
        backend?.setReceiver { [weak self] bytes in self?.receive(bytes) }
        backend?.setInputGate { [weak self] in self?.inputRoom() ?? 0 }
    }

    /// Free space in the input queue, for the backend's input gate (backend thread).
    private func inputRoom() -> Int {
        state.withLock { s in
            let room = s.regs.input.capacity - s.regs.input.count
            if room < s.regs.input.capacity / 2 { s.inputThrottled = true }
            return room
        }
    }

    /// Delivers host input to the UART (what the backend's receiver does); callable from any
    /// thread. Bytes beyond the queue capacity are dropped and counted.
    public func receive(_ bytes: [UInt8]) {
        state.withLock { s in
            _ = s.regs.receive(bytes)
            updateIRQ(&s)
        }
    }

    /// Host input bytes dropped so far because the guest did not read fast enough.
    public var droppedInputBytes: UInt64 { state.withLock { $0.regs.droppedInputBytes } }

    /// Host input bytes waiting (including those in the receive FIFO).
    public var pendingInputBytes: Int { state.withLock { $0.regs.input.count } }

    /// Returns the registers to their power-on state and discards pending input (system reset).
    /// Called on the control thread while the vCPUs are paused.
    public func reset() {
        let resume = state.withLock { s -> Bool in
            let capacity = s.regs.input.capacity
            s.regs = Uart16550Registers(inputCapacity: capacity)
            updateIRQ(&s)
            defer { s.inputThrottled = false }
            return s.inputThrottled
        }
        if resume { backend?.inputRoomAvailable() }
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        // Byte-wide registers: wider accesses are split into byte accesses, as QEMU does.
        let (v, resume) = state.withLock { s -> (UInt64, Bool) in
            var v: UInt64 = 0
            for i in 0..<size {
                v |= UInt64(s.regs.read(offset &+ UInt64(i))) << (8 * UInt64(i))
            }
            updateIRQ(&s)
            // Hysteresis: the backend resumes reading once half the queue is free again.
            let resume = s.inputThrottled && s.regs.input.count <= s.regs.input.capacity / 2
            if resume { s.inputThrottled = false }
            return (v, resume)
        }
        if resume { backend?.inputRoomAvailable() }
        return v
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        var out: [UInt8] = []
        state.withLock { s in
            for i in 0..<size {
                if let b = s.regs.write(offset &+ UInt64(i), UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) {
                    out.append(b)
                }
            }
            updateIRQ(&s)
        }
        // Outside the lock: a backend may feed input back synchronously.
        if !out.isEmpty, let backend {
            out.withUnsafeBytes { backend.write($0) }
        }
    }

    private func updateIRQ(_ s: inout Locked) {
        let level = s.regs.interruptAsserted
        if level != s.irqLevel {
            s.irqLevel = level
            irq.set(level)
        }
    }
}

// MARK: Saved state

extension ByteRing {
    /// The queued bytes, oldest first.
    var contents: [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(count)
        var copy = self
        while let b = copy.removeFirst() { out.append(b) }
        return out
    }
}

extension Uart16550: StatefulDevice {
    /// The UART's registers and the host input not yet read by the guest (receive FIFO first).
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        public var ier: UInt8, lcr: UInt8, mcr: UInt8, scr: UInt8, dll: UInt8, dlm: UInt8
        public var fifoEnabled: Bool
        public var triggerLevel: UInt8
        public var lineErrors: UInt8
        public var msrDelta: UInt8
        public var thrInterruptPending: Bool
        public var input: [UInt8]

        public func encode(to w: inout StateWriter) {
            for v in [ier, lcr, mcr, scr, dll, dlm] { w.u8(v) }
            w.bool(fifoEnabled)
            w.u8(triggerLevel)
            w.u8(lineErrors)
            w.u8(msrDelta)
            w.bool(thrInterruptPending)
            w.bytes(input)
        }

        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            ier = try r.u8("ier"); lcr = try r.u8("lcr"); mcr = try r.u8("mcr"); scr = try r.u8("scr")
            dll = try r.u8("dll"); dlm = try r.u8("dlm")
            fifoEnabled = try r.bool("fifo-enabled")
            triggerLevel = try r.u8("trigger-level")
            lineErrors = try r.u8("lsr-errors")
            msrDelta = try r.u8("msr-delta")
            thrInterruptPending = try r.bool("thr-interrupt-pending")
            input = try r.bytes("input", limit: 1 << 24)
        }

        init(_ g: Uart16550Registers) {
            ier = g.ier; lcr = g.lcr; mcr = g.mcr; scr = g.scr; dll = g.dll; dlm = g.dlm
            fifoEnabled = g.fifoEnabled
            triggerLevel = UInt8(g.triggerLevel)
            lineErrors = g.lineErrors
            msrDelta = g.msrDelta
            thrInterruptPending = g.thrInterruptPending
            input = g.input.contents
        }
    }

    public var stateSection: String { name }

    public func captureState() -> State { state.withLock { State($0.regs) } }

    public func applyState(_ s: State) throws(SavedStateError) {
        guard [1, 4, 8, 14].contains(s.triggerLevel) else { throw refusal("trigger-level", "\(s.triggerLevel) is not 1, 4, 8 or 14") }
        guard s.mcr <= 0x1F else { throw refusal("mcr", "0x\(String(s.mcr, radix: 16)) sets reserved bits") }
        guard s.ier <= 0x0F else { throw refusal("ier", "0x\(String(s.ier, radix: 16)) sets reserved bits") }
        guard s.lineErrors & ~Uart16550Registers.lsrErrorBits == 0 else {
            throw refusal("lsr-errors", "0x\(String(s.lineErrors, radix: 16)) is not a set of error bits")
        }
        guard s.msrDelta <= 0x0F else { throw refusal("msr-delta", "0x\(String(s.msrDelta, radix: 16)) sets reserved bits") }
        try state.withLock { (l: inout Locked) throws(SavedStateError) in
            let capacity = l.regs.input.capacity
            guard s.input.count <= capacity else {
                throw refusal("input", "\(s.input.count) bytes exceed the input queue of \(capacity)")
            }
            var g = Uart16550Registers(inputCapacity: capacity)
            g.ier = s.ier; g.lcr = s.lcr; g.mcr = s.mcr; g.scr = s.scr; g.dll = s.dll; g.dlm = s.dlm
            g.fifoEnabled = s.fifoEnabled
            g.triggerLevel = Int(s.triggerLevel)
            g.lineErrors = s.lineErrors
            g.msrDelta = s.msrDelta
            g.thrInterruptPending = s.thrInterruptPending
            _ = g.receive(s.input)
            l.regs = g
            // Drive the line whatever its live level was: the PLIC's saved state is loaded
            // first and every device then re-asserts its own line.
            l.irqLevel = g.interruptAsserted
            irq.set(l.irqLevel)
        }
    }
}

extension Uart16550 {
    /// The input clock QEMU's `virt` announces for its NS16550A (3.6864 MHz).
    public static let clockFrequency: UInt32 = 0x38_4000

    public func deviceTreeNode(_ c: DeviceTreeContext) -> DeviceTreeNode? {
        var n = c.node("serial")
        c.setInterrupt(on: &n)
        n.set("clock-frequency", .u32([Self.clockFrequency]))
        n.set("reg", c.reg)
        n.set("compatible", .string("ns16550a"))
        return n
    }
}
