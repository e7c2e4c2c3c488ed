import Synchronization
import Foundation

/// The machine's virtual timebase: a 10 MHz counter (QEMU `virt`'s `timebase-frequency`) that
/// follows host monotonic time while the machine runs and stands still while it is paused.
///
/// Read from any thread; paused and resumed by the control thread. Reading the time uses
/// integer arithmetic only, so vCPU threads may call it without guarding the host FPU flags
/// that hold the guest's `fflags`.
public final class VirtualClock: Sendable {
    /// Ticks per second of `mtime` and the `time` CSR.
    public let frequency: UInt64
    private let lock = Mutex<State>(State())

    private struct State {
        /// Host nanoseconds at which virtual time was zero, while running.
        var originNanos: UInt64 = DispatchTime.now().uptimeNanoseconds
        /// Virtual nanoseconds frozen while paused; nil while running.
        var frozenNanos: UInt64? = nil
    }

    public init(frequency: UInt64 = 10_000_000) {
        self.frequency = frequency
    }

    /// Current virtual time in nanoseconds since the machine started.
    public var nanoseconds: UInt64 {
        lock.withLock { s in
            if let f = s.frozenNanos { return f }
            return DispatchTime.now().uptimeNanoseconds &- s.originNanos
        }
    }

    /// Current `mtime` value in timebase ticks.
    public var ticks: UInt64 { Self.ticks(fromNanoseconds: nanoseconds, frequency: frequency) }

    /// Converts virtual nanoseconds to timebase ticks without overflow for centuries of uptime.
    @inlinable public static func ticks(fromNanoseconds ns: UInt64, frequency: UInt64) -> UInt64 {
        (ns / 1_000_000_000) &* frequency &+ (ns % 1_000_000_000) &* frequency / 1_000_000_000
    }

    /// Host uptime (ns) at which virtual time reaches `ticks`, or nil while paused or when it is
    /// too far away to matter.
    public func hostDeadline(forTicks target: UInt64) -> UInt64? {
        lock.withLock { s in
            if s.frozenNanos != nil { return nil }
            guard target < UInt64.max / 2 else { return nil }
            let ns = (target / frequency) &* 1_000_000_000 &+ (target % frequency) &* 1_000_000_000 / frequency
            return s.originNanos &+ ns
        }
    }

    /// Stops virtual time (machine paused).
    public func pause() {
        lock.withLock { s in
            if s.frozenNanos == nil { s.frozenNanos = DispatchTime.now().uptimeNanoseconds &- s.originNanos }
        }
    }

    /// Lets virtual time run again from where it stopped.
    public func resume() {
        lock.withLock { s in
            if let f = s.frozenNanos {
                s.originNanos = DispatchTime.now().uptimeNanoseconds &- f
                s.frozenNanos = nil
            }
        }
    }

    /// Sets the paused clock to `nanoseconds` of virtual time (a state load); it runs on from
    /// there at the next `resume()`. Control thread, machine paused.
    public func restore(nanoseconds: UInt64) {
        lock.withLock { s in
            s.frozenNanos = nanoseconds
        }
    }

    /// Sets virtual time back to zero (machine reset keeps the clock monotonic in QEMU; we do
    /// the same, so this exists only for tests).
    public func resetForTesting() {
        lock.withLock { s in
            s.originNanos = DispatchTime.now().uptimeNanoseconds
            if s.frozenNanos != nil { s.frozenNanos = 0 }
        }
    }
}
