import Logging
import Machine
import Synchronization

/// virtio-input (virtio 1.2 section 5.8) as a keyboard or an absolute tablet, fed by a `Display`'s
/// input (VNC viewers, QMP `send-key` / `input-send-event`).
///
/// Events go into the driver's eventq buffers, one 8-byte `virtio_input_event` each, every report
/// ending in SYN_REPORT; when the driver has posted too few buffers, events wait in a bounded
/// FIFO (reports beyond it are dropped and counted). The statusq is drained: LED events update
/// `Display.keyboardLEDs`. `handle` runs on any thread and the transport calls on the vCPU
/// thread, so all state, including the eventq, sits behind one lock.
public final class VirtioInput: VirtioDevice, InputSink, Sendable {
    /// Which device this is.
    public enum Kind: Sendable {
        /// "virtio-keyboard-device": EV_KEY for key codes 1-255, EV_LED, EV_REP.
        case keyboard
        /// "virtio-tablet-device": absolute X/Y (0-0x7fff), five buttons, wheels.
        case tablet
    }

    /// Config-space selectors (`enum virtio_input_config_select`).
    public enum Select {
        public static let unset: UInt8 = 0x00
        public static let idName: UInt8 = 0x01
        public static let idSerial: UInt8 = 0x02
        public static let idDevids: UInt8 = 0x03
        public static let propBits: UInt8 = 0x10
        public static let evBits: UInt8 = 0x11
        public static let absInfo: UInt8 = 0x12
    }

    /// Linux event types and codes used here.
    public enum EventType {
        public static let syn: UInt16 = 0x00, key: UInt16 = 0x01, rel: UInt16 = 0x02, abs: UInt16 = 0x03
        public static let led: UInt16 = 0x11, rep: UInt16 = 0x14
    }
    static let relHWheel: UInt16 = 6, relWheel: UInt16 = 8
    static let absX: UInt16 = 0, absY: UInt16 = 1

    /// How many events may wait for eventq buffers before reports are dropped.
    public static let pendingLimit = 4096

    public let name: String
    public let deviceID: UInt32 = Virtio.DeviceID.input
    public let deviceFeatures: UInt64 = 0
    public let queueCount = 2
    public let maxQueueSize: UInt16 = 64
    /// Keyboard or tablet.
    public let kind: Kind
    /// The display whose input this device receives and whose LED state it reports.
    public let display: Display?
    private let logger: Logger

    private struct State {
        var select: UInt8 = 0
        var subsel: UInt8 = 0
        var context: VirtioContext?
        var pending: [(UInt16, UInt16, UInt32)] = []
        var dropped: UInt64 = 0
        var delivered: UInt64 = 0
        var leds: KeyboardLEDs = []
        /// While the machine is paused, reports wait in `pending` until `resume()`.
        var quiesced = false
    }
    private let state = Mutex(State())

    /// Creates the device and, when `display` is given, attaches it as one of its input sinks.
    public init(kind: Kind, display: Display?, name: String? = nil, logger: Logger = Logger(label: "machine.virtio-input")) {
        self.kind = kind
        self.display = display
        self.name = name ?? (kind == .keyboard ? "virtio-keyboard" : "virtio-tablet")
        self.logger = logger
        display?.addInputSink(self)
    }

    /// The Linux driver name QEMU gives this device on `-device`.
    public var qemuDriverName: String { kind == .keyboard ? "virtio-keyboard-device" : "virtio-tablet-device" }

    /// Reports dropped because the driver posted no buffers and the FIFO was full.
    public var droppedReports: UInt64 { state.withLock { $0.dropped } }
    /// Events written into eventq buffers so far.
    public var deliveredEvents: UInt64 { state.withLock { $0.delivered } }
    /// LED state the guest last sent (keyboard).
    public var leds: KeyboardLEDs { state.withLock { $0.leds } }

    /// Presses and releases KEY_POWER (for `system_powerdown`): the guest sees a power-button
    /// press like ACPI's. Only the keyboard has the key; the tablet ignores it.
    public func pressPowerKey() {
        handle([.key(code: LinuxKey.power, down: true)])
        handle([.key(code: LinuxKey.power, down: false)])
    }

    // MARK: Config space

    /// The payload (`u` union) and its size for the current selection.
    private func payload(select: UInt8, subsel: UInt8) -> [UInt8] {
        func bitmap(_ codes: [UInt16]) -> [UInt8] {
            guard let top = codes.max() else { return [] }
            var b = [UInt8](repeating: 0, count: Int(top) / 8 + 1)
            for c in codes { b[Int(c) / 8] |= 1 << (c % 8) }
            return b
        }
        func le(_ values: [UInt32], width: Int) -> [UInt8] {
            values.flatMap { v in (0..<width).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }
        }
        switch (select, kind) {
        case (Select.idName, .keyboard): return Array("QEMU Virtio Keyboard".utf8)
        case (Select.idName, .tablet): return Array("QEMU Virtio Tablet".utf8)
        case (Select.idSerial, _): return Array("machine-server".utf8)
        case (Select.idDevids, _):
            // BUS_VIRTUAL, QEMU's vendor id, product 1 (keyboard) / 3 (tablet), version 1.
            return le([0x06, 0x0627, kind == .keyboard ? 1 : 3, 1], width: 2)
        case (Select.propBits, _): return []
        case (Select.evBits, .keyboard):
            switch UInt16(subsel) {
            case EventType.syn: return bitmap([0])
            case EventType.key: return bitmap(Array(1...LinuxKey.maxKeyboardCode))
            case EventType.led: return bitmap([0, 1, 2])
            case EventType.rep: return [1]
            default: return []
            }
        case (Select.evBits, .tablet):
            switch UInt16(subsel) {
            case EventType.syn: return bitmap([0])
            case EventType.key:
                return bitmap([LinuxKey.btnLeft, LinuxKey.btnRight, LinuxKey.btnMiddle, LinuxKey.btnSide, LinuxKey.btnExtra])
            case EventType.rel: return bitmap([Self.relHWheel, Self.relWheel])
            case EventType.abs: return bitmap([Self.absX, Self.absY])
            default: return []
            }
        case (Select.absInfo, .tablet):
            guard UInt16(subsel) == Self.absX || UInt16(subsel) == Self.absY else { return [] }
            return le([UInt32(InputEvent.absoluteMin), UInt32(InputEvent.absoluteMax), 0, 0, 0], width: 4)
        default: return []
        }
    }

    public func readConfig(offset: Int, size: Int) -> UInt64 {
        let (sel, sub) = state.withLock { ($0.select, $0.subsel) }
        let data = payload(select: sel, subsel: sub)
        var v: UInt64 = 0
        for i in 0..<size {
            let o = offset + i
            let byte: UInt8
            switch o {
            case 0: byte = sel
            case 1: byte = sub
            case 2: byte = UInt8(min(data.count, 128))
            case 8..<136 where o - 8 < data.count: byte = data[o - 8]
            default: byte = 0
            }
            v |= UInt64(byte) << (8 * UInt64(i))
        }
        return v
    }

    public func writeConfig(offset: Int, size: Int, value: UInt64) {
        state.withLock { s in
            for i in 0..<size {
                let b = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))
                switch offset + i {
                case 0: s.select = b
                case 1: s.subsel = b
                default: break  // everything else is read-only
                }
            }
        }
    }

    // MARK: Lifecycle

    public func activate(_ context: VirtioContext) throws {
        state.withLock { $0.context = context }
    }

    public func reset() {
        state.withLock { s in
            s.context = nil
            s.pending.removeAll()
            s.select = 0
            s.subsel = 0
            s.leds = []
        }
    }

    public func queueNotify(_ index: Int) {
        var leds: KeyboardLEDs?
        state.withLock { s in
            guard let ctx = s.context else { return }
            if index == 0 {
                flush(&s, ctx)
            } else if index == 1, let q = ctx.queues[1] {
                do {
                    while let chain = try q.nextChain() {
                        let bytes = chain.readBytes(from: ctx.ram, count: min(chain.readableLength, 8 * 64))
                        var i = 0
                        while i + 8 <= bytes.count {
                            let type = UInt16(bytes[i]) | UInt16(bytes[i + 1]) << 8
                            let code = UInt16(bytes[i + 2]) | UInt16(bytes[i + 3]) << 8
                            let value = UInt32(bytes[i + 4]) | UInt32(bytes[i + 5]) << 8
                            if type == EventType.led && code < 8 {
                                let bit = KeyboardLEDs(rawValue: 1 << code)
                                if value != 0 { s.leds.insert(bit) } else { s.leds.remove(bit) }
                                leds = s.leds
                            }
                            i += 8
                        }
                        q.complete(chain, written: 0)
                    }
                } catch {
                    ctx.interrupt.markNeedsReset(reason: "\(name) statusq: \(error)")
                }
                if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: 1) }
            }
        }
        if let leds, kind == .keyboard { display?.keyboardLEDs = leds }
    }

    // MARK: Input

    /// Converts one report to virtio-input events (with the closing SYN_REPORT), or none when
    /// nothing in it concerns this device.
    func translate(_ events: [InputEvent]) -> [(UInt16, UInt16, UInt32)] {
        var out: [(UInt16, UInt16, UInt32)] = []
        for e in events {
            switch (e, kind) {
            case (.key(let code, let down), .keyboard) where code >= 1 && code <= LinuxKey.maxKeyboardCode:
                out.append((EventType.key, code, down ? 1 : 0))
            case (.button(let b, let down), .tablet):
                let wheel: (UInt16, Int32)?
                switch b {
                case .left: out.append((EventType.key, LinuxKey.btnLeft, down ? 1 : 0)); wheel = nil
                case .right: out.append((EventType.key, LinuxKey.btnRight, down ? 1 : 0)); wheel = nil
                case .middle: out.append((EventType.key, LinuxKey.btnMiddle, down ? 1 : 0)); wheel = nil
                case .side: out.append((EventType.key, LinuxKey.btnSide, down ? 1 : 0)); wheel = nil
                case .extra: out.append((EventType.key, LinuxKey.btnExtra, down ? 1 : 0)); wheel = nil
                case .wheelUp: wheel = (Self.relWheel, 1)
                case .wheelDown: wheel = (Self.relWheel, -1)
                case .wheelLeft: wheel = (Self.relHWheel, -1)
                case .wheelRight: wheel = (Self.relHWheel, 1)
                }
                if let (axis, notch) = wheel, down { out.append((EventType.rel, axis, UInt32(bitPattern: notch))) }
            case (.absolute(let axis, let value), .tablet):
                let v = min(max(value, InputEvent.absoluteMin), InputEvent.absoluteMax)
                out.append((EventType.abs, axis == .x ? Self.absX : Self.absY, UInt32(v)))
            default:
                break
            }
        }
        if !out.isEmpty { out.append((EventType.syn, 0, 0)) }
        return out
    }

    /// Queues one report for the guest and delivers what the posted buffers allow.
    public func handle(_ events: [InputEvent]) {
        let evs = translate(events)
        if evs.isEmpty { return }
        state.withLock { s in
            guard let ctx = s.context else { return }  // driver not ready: like unplugged
            if s.pending.count + evs.count > Self.pendingLimit {
                s.dropped &+= 1
                return
            }
            s.pending += evs
            flush(&s, ctx)
        }
    }

    /// Moves pending events into eventq buffers (under the lock).
    private func flush(_ s: inout State, _ ctx: VirtioContext) {
        guard !s.quiesced, let q = ctx.queues[0], !s.pending.isEmpty else { return }
        var n = 0
        do {
            while n < s.pending.count, let chain = try q.nextChain() {
                let (type, code, value) = s.pending[n]
                let bytes: [UInt8] = [
                    UInt8(type & 0xff), UInt8(type >> 8), UInt8(code & 0xff), UInt8(code >> 8),
                    UInt8(value & 0xff), UInt8((value >> 8) & 0xff), UInt8((value >> 16) & 0xff), UInt8(value >> 24),
                ]
                let written = chain.write(bytes, to: ctx.ram, offset: 0)
                q.complete(chain, written: UInt32(written))
                n += 1
            }
        } catch {
            ctx.interrupt.markNeedsReset(reason: "\(name) eventq: \(error)")
        }
        s.pending.removeFirst(n)
        s.delivered &+= UInt64(n)
        if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: 0) }
    }
}

// MARK: Lifecycle and saved state

extension VirtioInput {
    /// Keeps VNC input out of guest RAM while the machine is paused: reports queue up (within
    /// `pendingLimit`) and are delivered on `resume()`.
    public func quiesce() { state.withLock { $0.quiesced = true } }

    public func resume() {
        state.withLock { s in
            s.quiesced = false
            if let ctx = s.context { flush(&s, ctx) }
        }
    }

    public var deviceStateVersion: UInt32 { 1 }

    /// Config selectors, undelivered events and the LED state.
    public func saveDeviceState(to w: inout StateWriter) {
        state.withLock { s in
            w.u8(s.select)
            w.u8(s.subsel)
            w.u8(s.leds.rawValue)
            w.count(s.pending.count)
            for (type, code, value) in s.pending {
                w.u16(type)
                w.u16(code)
                w.u32(value)
            }
        }
    }

    public func loadDeviceState(from r: inout StateReader, version: UInt32, ram: GuestRAM) throws(SavedStateError) {
        guard version == 1 else { throw r.invalid("(device version)", "layout version \(version) is not supported") }
        let select = try r.u8("select"), subsel = try r.u8("subsel"), leds = try r.u8("leds")
        let n = try r.count("pending", limit: Self.pendingLimit, minimumElementSize: 8)
        var pending: [(UInt16, UInt16, UInt32)] = []
        for _ in 0..<n { pending.append((try r.u16("pending.type"), try r.u16("pending.code"), try r.u32("pending.value"))) }
        state.withLock { s in
            s.select = select
            s.subsel = subsel
            s.leds = KeyboardLEDs(rawValue: leds)
            s.pending = pending
        }
    }
}
