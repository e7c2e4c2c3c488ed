import Machine
import Synchronization

/// A Spike-HTIF-like host interface for bare-metal test programs, mapped as MMIO (by default at
/// 0x0010_2000, size 0x1000: a hole in QEMU `virt`'s map). `tohost` is a 64-bit register at
/// offset 0, `fromhost` one at offset 8.
///
/// A `tohost` write with device 0, command 0 and bit 0 set ends the run: exit code = value >> 1
/// (0 = pass), reported as `requestShutdown(cause: .guestShutdown, exitCode:)`. Device 1
/// command 1 prints the low byte to the console backend and acknowledges through `fromhost`
/// (device 1, command 1, payload 0) as Spike does. Other requests (Spike's syscall proxy,
/// console input) are not supported: they are acknowledged by clearing `tohost` and otherwise
/// ignored. A 32-bit write to the low half is held until the high half is written (RV32 style);
/// a 64-bit write acts at once. The device is not listed in the device tree (OpenSBI would bind
/// its own HTIF drivers to it). State sits behind a `Mutex`.
public final class Htif: MMIODevice, Sendable {
    /// Default guest physical base on `virt`.
    public static let defaultBase: UInt64 = 0x0010_2000
    /// Size of the register window.
    public static let windowSize: UInt64 = 0x1000

    public let name: String
    private let system: any SystemControl
    private let console: (any CharBackend)?
    private let state = Mutex(Registers())

    private struct Registers {
        var tohost: UInt64 = 0
        var fromhost: UInt64 = 0
    }

    /// Creates the device; exits go to `system`, console output to `console` (or is discarded).
    public init(name: String = "htif", system: any SystemControl, console: (any CharBackend)?) {
        self.name = name
        self.system = system
        self.console = console
    }

    /// Clears `tohost` and `fromhost` (system reset).
    public func reset() { state.withLock { $0 = Registers() } }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        let (tohost, fromhost) = state.withLock { ($0.tohost, $0.fromhost) }
        switch offset {
        case 0: return size >= 8 ? tohost : tohost & 0xFFFF_FFFF
        case 4: return tohost >> 32
        case 8: return size >= 8 ? fromhost : fromhost & 0xFFFF_FFFF
        case 12: return fromhost >> 32
        default: return 0
        }
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        var command: UInt64? = nil
        state.withLock { r in
            switch (offset, size) {
            case (0, 8...):
                command = value
            case (0, _):
                r.tohost = (r.tohost & 0xFFFF_FFFF_0000_0000) | (value & 0xFFFF_FFFF)
            case (4, _):
                command = (r.tohost & 0xFFFF_FFFF) | (value << 32)
            case (8, 8...):
                r.fromhost = value
            case (8, _):
                r.fromhost = (r.fromhost & 0xFFFF_FFFF_0000_0000) | (value & 0xFFFF_FFFF)
            case (12, _):
                r.fromhost = (r.fromhost & 0xFFFF_FFFF) | (value << 32)
            default:
                break
            }
            if let c = command {
                r.tohost = 0  // the host has taken the request
                if c >> 56 == 1 && (c >> 48) & 0xFF == 1 { r.fromhost = 1 << 56 | 1 << 48 }
            }
        }
        guard let c = command else { return }
        let device = c >> 56, cmd = (c >> 48) & 0xFF, payload = c & 0xFFFF_FFFF_FFFF
        if device == 0 && cmd == 0 && payload & 1 == 1 {
            system.requestShutdown(cause: .guestShutdown, exitCode: Int32(truncatingIfNeeded: payload >> 1))
        } else if device == 1 && cmd == 1, let console {
            var byte = UInt8(truncatingIfNeeded: payload)
            withUnsafeBytes(of: &byte) { console.write($0) }
        }
    }
}

// MARK: Saved state

extension Htif: StatefulDevice {
    /// The two HTIF registers.
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        public var tohost: UInt64
        public var fromhost: UInt64

        public func encode(to w: inout StateWriter) {
            w.u64(tohost)
            w.u64(fromhost)
        }

        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            tohost = try r.u64("tohost")
            fromhost = try r.u64("fromhost")
        }

        init(tohost: UInt64, fromhost: UInt64) {
            self.tohost = tohost
            self.fromhost = fromhost
        }
    }

    public var stateSection: String { name }

    public func captureState() -> State { state.withLock { State(tohost: $0.tohost, fromhost: $0.fromhost) } }

    public func applyState(_ s: State) throws(SavedStateError) {
        state.withLock { $0 = Registers(tohost: s.tohost, fromhost: s.fromhost) }
    }
}
