import Dispatch
import Foundation
import Machine
import Synchronization

/// The Goldfish real-time clock ("google,goldfish-rtc") at 0x10_1000 on `virt`, IRQ 11.
///
/// Time is nanoseconds since the Unix epoch: the host wall clock plus an offset that guest
/// writes to TIME_LOW/TIME_HIGH adjust. Reading TIME_LOW latches the high half for the next
/// TIME_HIGH read (the rtc-goldfish driver reads low, then high). Writing ALARM_LOW arms the
/// alarm at ALARM_HIGH:ALARM_LOW; when guest time reaches it, the interrupt becomes pending and
/// the line is raised while IRQ_ENABLED is set, until CLEAR_INTERRUPT. Alarms fire from a
/// private dispatch queue; all state sits behind a `Mutex`.
public final class GoldfishRTC: MMIODevice, Sendable {
    /// Size of the register window on `virt`.
    public static let windowSize: UInt64 = 0x1000

    static let timeLow: UInt64 = 0x00, timeHigh: UInt64 = 0x04
    static let alarmLow: UInt64 = 0x08, alarmHigh: UInt64 = 0x0C
    static let irqEnabled: UInt64 = 0x10, clearAlarm: UInt64 = 0x14
    static let alarmStatus: UInt64 = 0x18, clearInterrupt: UInt64 = 0x1C

    /// Reads the host wall clock in nanoseconds since the Unix epoch.
    public static let hostWallClock: @Sendable () -> UInt64 = {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    public let name: String
    private let irq: any InterruptLine
    private let wallClock: @Sendable () -> UInt64
    private let queue = DispatchQueue(label: "goldfish-rtc-alarm")
    private let state = Mutex(Registers())

    private struct Registers {
        /// Guest time minus host time, in nanoseconds (two's complement).
        var offset: UInt64 = 0
        var latchedHigh: UInt32 = 0
        var alarm: UInt64 = 0
        var alarmArmed = false
        var irqEnabled = false
        var irqPending = false
        var irqLevel = false
        /// Bumped whenever the alarm changes, so stale timers do nothing.
        var alarmGeneration: UInt64 = 0
        /// While the machine is paused, a due alarm waits for `resume()`.
        var quiesced = false
    }

    /// Creates the RTC driving `irq`; `wallClock` supplies host time (injectable for tests).
    public init(name: String = "rtc", irq: any InterruptLine,
                wallClock: @escaping @Sendable () -> UInt64 = GoldfishRTC.hostWallClock) {
        self.name = name
        self.irq = irq
        self.wallClock = wallClock
    }

    /// The current guest time in nanoseconds since the epoch.
    public var guestTime: UInt64 { state.withLock { wallClock() &+ $0.offset } }

    /// Disarms the alarm and clears the interrupt; the guest's time offset survives, as an RTC's
    /// time survives a reset. Control thread, vCPUs paused.
    public func reset() {
        state.withLock { s in
            s.alarmArmed = false
            s.alarmGeneration &+= 1
            s.irqEnabled = false
            s.irqPending = false
            s.latchedHigh = 0
            updateIRQ(&s)
        }
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        state.withLock { s in
            switch offset {
            case Self.timeLow:
                let now = wallClock() &+ s.offset
                s.latchedHigh = UInt32(truncatingIfNeeded: now >> 32)
                return size >= 8 ? now : now & 0xFFFF_FFFF
            case Self.timeHigh: return UInt64(s.latchedHigh)
            case Self.alarmLow: return s.alarm & 0xFFFF_FFFF
            case Self.alarmHigh: return s.alarm >> 32
            case Self.irqEnabled: return s.irqEnabled ? 1 : 0
            case Self.alarmStatus: return s.alarmArmed ? 1 : 0
            default: return 0
            }
        }
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        let v32 = value & 0xFFFF_FFFF
        var schedule: (deadline: UInt64, generation: UInt64)? = nil
        state.withLock { s in
            switch offset {
            case Self.timeLow, Self.timeHigh:
                let host = wallClock()
                let now = host &+ s.offset
                let new: UInt64
                if offset == Self.timeLow {
                    new = size >= 8 ? value : (now & 0xFFFF_FFFF_0000_0000) | v32
                } else {
                    new = (now & 0xFFFF_FFFF) | (v32 << 32)
                }
                s.offset = new &- host
                // Moving time may make an armed alarm due.
                if s.alarmArmed { schedule = arm(&s) }
            case Self.alarmLow:
                s.alarm = size >= 8 ? value : (s.alarm & 0xFFFF_FFFF_0000_0000) | v32
                s.alarmArmed = true
                schedule = arm(&s)
            case Self.alarmHigh:
                s.alarm = (s.alarm & 0xFFFF_FFFF) | (v32 << 32)
            case Self.irqEnabled:
                s.irqEnabled = value & 1 != 0
            case Self.clearAlarm:
                s.alarmArmed = false
                s.alarmGeneration &+= 1
            case Self.clearInterrupt:
                s.irqPending = false
            default:
                break
            }
            updateIRQ(&s)
        }
        if let schedule { scheduleCheck(afterNanoseconds: schedule.deadline, generation: schedule.generation) }
    }

    /// Fires the alarm now if it is due; otherwise returns how long to wait and the generation.
    private func arm(_ s: inout Registers) -> (deadline: UInt64, generation: UInt64)? {
        s.alarmGeneration &+= 1
        if s.quiesced { return nil }
        let now = wallClock() &+ s.offset
        if Int64(bitPattern: s.alarm &- now) <= 0 {
            fire(&s)
            return nil
        }
        return (s.alarm &- now, s.alarmGeneration)
    }

    private func fire(_ s: inout Registers) {
        s.alarmArmed = false
        s.irqPending = true
        updateIRQ(&s)
    }

    private func scheduleCheck(afterNanoseconds delay: UInt64, generation: UInt64) {
        // Cap the wait so that a far-away alarm is re-evaluated against the wall clock now and then.
        let wait = min(delay, 60_000_000_000)
        queue.asyncAfter(deadline: .now() + .nanoseconds(Int(wait))) { [weak self] in
            self?.checkAlarm(generation: generation)
        }
    }

    private func checkAlarm(generation: UInt64) {
        let again: (deadline: UInt64, generation: UInt64)? = state.withLock { s in
            guard s.alarmArmed, s.alarmGeneration == generation else { return nil }
            return arm(&s)
        }
        if let again { scheduleCheck(afterNanoseconds: again.deadline, generation: again.generation) }
    }

    private func updateIRQ(_ s: inout Registers) {
        let level = s.irqPending && s.irqEnabled
        if level != s.irqLevel {
            s.irqLevel = level
            irq.set(level)
        }
    }
}

// MARK: Saved state and lifecycle

extension GoldfishRTC: StatefulDevice {
    /// The RTC's registers. Guest time is kept as its offset from the host's wall clock, as
    /// QEMU's goldfish RTC does, so a restored guest's clock follows real time.
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        public var offset: UInt64
        public var latchedHigh: UInt32
        public var alarm: UInt64
        public var alarmArmed: Bool
        public var irqEnabled: Bool
        public var irqPending: Bool

        public func encode(to w: inout StateWriter) {
            w.u64(offset)
            w.u32(latchedHigh)
            w.u64(alarm)
            w.bool(alarmArmed)
            w.bool(irqEnabled)
            w.bool(irqPending)
        }

        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            offset = try r.u64("offset")
            latchedHigh = try r.u32("time-high")
            alarm = try r.u64("alarm")
            alarmArmed = try r.bool("alarm-armed")
            irqEnabled = try r.bool("irq-enabled")
            irqPending = try r.bool("irq-pending")
        }

        init(offset: UInt64, latchedHigh: UInt32, alarm: UInt64, alarmArmed: Bool, irqEnabled: Bool, irqPending: Bool) {
            self.offset = offset
            self.latchedHigh = latchedHigh
            self.alarm = alarm
            self.alarmArmed = alarmArmed
            self.irqEnabled = irqEnabled
            self.irqPending = irqPending
        }
    }

    public var stateSection: String { name }

    public func captureState() -> State {
        state.withLock { s in
            State(offset: s.offset, latchedHigh: s.latchedHigh, alarm: s.alarm, alarmArmed: s.alarmArmed,
                  irqEnabled: s.irqEnabled, irqPending: s.irqPending)
        }
    }

    public func applyState(_ n: State) throws(SavedStateError) {
        let schedule: (deadline: UInt64, generation: UInt64)? = state.withLock { s in
            s.offset = n.offset
            s.latchedHigh = n.latchedHigh
            s.alarm = n.alarm
            s.alarmArmed = n.alarmArmed
            s.irqEnabled = n.irqEnabled
            s.irqPending = n.irqPending
            s.irqLevel = s.irqPending && s.irqEnabled
            irq.set(s.irqLevel)
            s.alarmGeneration &+= 1
            return s.alarmArmed ? arm(&s) : nil
        }
        if let schedule { scheduleCheck(afterNanoseconds: schedule.deadline, generation: schedule.generation) }
    }

    /// Holds a due alarm back until `resume()` (the alarm raises an interrupt; a paused
    /// machine's devices stay still).
    public func quiesce() {
        state.withLock { s in
            s.quiesced = true
            s.alarmGeneration &+= 1
        }
    }

    public func resume() {
        let schedule: (deadline: UInt64, generation: UInt64)? = state.withLock { s in
            s.quiesced = false
            return s.alarmArmed ? arm(&s) : nil
        }
        if let schedule { scheduleCheck(afterNanoseconds: schedule.deadline, generation: schedule.generation) }
    }
}

extension GoldfishRTC {
    public func deviceTreeNode(_ c: DeviceTreeContext) -> DeviceTreeNode? {
        var n = c.node("rtc")
        c.setInterrupt(on: &n)
        n.set("reg", c.reg)
        n.set("compatible", .string("google,goldfish-rtc"))
        return n
    }
}
