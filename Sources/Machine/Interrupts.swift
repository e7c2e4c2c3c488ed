import Synchronization
import Foundation

/// Interrupt-pending bits of one hart that devices drive, and the hart's wake-up signal.
///
/// Bits use `mip` positions: MSIP (3), MTIP (7), SEIP (9), MEIP (11). Devices on any thread
/// raise or lower them; the hart's vCPU thread reads them between translation blocks and sleeps
/// on `waitForInterrupt` during `wfi`. The machine timer compare value lives here too, so the
/// hart can compute MTIP from the clock without a device round trip.
public final class HartInterrupts: @unchecked Sendable {  // unchecked: `lines` and `exitRequest` are atomics; `wakeups` is guarded by `wakeLock`
    public static let msip: UInt64 = 1 << 3
    public static let mtip: UInt64 = 1 << 7
    public static let seip: UInt64 = 1 << 9
    public static let meip: UInt64 = 1 << 11

    /// The hart these lines belong to.
    public let hartID: Int
    /// Level-triggered lines from devices, as `mip` bits.
    public let lines = Atomic<UInt64>(0)
    /// ACLINT `mtimecmp` for this hart, in timebase ticks. Starts at the maximum (no interrupt).
    public let mtimecmp = Atomic<UInt64>(.max)
    /// Set by anyone who wants the hart to re-examine its interrupt state at the next
    /// translation-block boundary (a line changed, the timer compare moved).
    public let kick = Atomic<Bool>(false)
    /// Set by the machine's control thread when the hart must return from `VirtualCPU.run()`
    /// (pause, reset, shutdown). The hart clears it when it returns.
    public let exitRequest = Atomic<Bool>(false)

    private let wakeLock = NSCondition()
    private var wakeups = 0

    public init(hartID: Int) { self.hartID = hartID }

    /// Raises or lowers the given `mip` bit(s) and wakes the hart.
    public func set(_ bits: UInt64, _ level: Bool) {
        if level {
            lines.bitwiseOr(bits, ordering: .sequentiallyConsistent)
        } else {
            lines.bitwiseAnd(~bits, ordering: .sequentiallyConsistent)
        }
        wake()
    }

    /// Changes the timer compare value and wakes the hart so it re-evaluates MTIP.
    public func setTimerCompare(_ value: UInt64) {
        mtimecmp.store(value, ordering: .sequentiallyConsistent)
        wake()
    }

    /// Makes the hart leave its run loop at the next translation-block boundary, and wakes it if
    /// it sleeps in `wfi`.
    public func wake() {
        kick.store(true, ordering: .sequentiallyConsistent)
        wakeLock.lock()
        wakeups &+= 1
        wakeLock.signal()
        wakeLock.unlock()
    }

    /// Asks the hart to return from `VirtualCPU.run()` soon, waking it from `wfi` if needed.
    public func requestExit() {
        exitRequest.store(true, ordering: .sequentiallyConsistent)
        wake()
    }

    /// Sleeps the calling vCPU thread until `wake()` or until `deadline` (host uptime in
    /// nanoseconds) passes. Returns at once if a wake-up arrived since the last call.
    public func waitForInterrupt(untilUptimeNanoseconds deadline: UInt64?) {
        wakeLock.lock()
        defer { wakeLock.unlock() }
        if wakeups == 0 {
            if let deadline {
                let now = DispatchTime.now().uptimeNanoseconds
                if deadline > now {
                    let secs = Double(deadline - now) / 1e9
                    _ = wakeLock.wait(until: Date(timeIntervalSinceNow: secs))
                }
            } else {
                wakeLock.wait()
            }
        }
        wakeups = 0
    }
}

/// One interrupt input of an interrupt controller (a PLIC source), as a device sees it.
///
/// Devices hold an `InterruptLine` handed to them at construction and drive its level; they
/// never know which controller or hart is behind it. Safe to call from any thread.
public protocol InterruptLine: AnyObject, Sendable {
    /// Sets the line's level (true = asserted).
    func set(_ level: Bool)
}

extension InterruptLine {
    /// Asserts the line.
    public func raise() { set(true) }
    /// Deasserts the line.
    public func lower() { set(false) }
}
