/// The framing of GDB's remote serial protocol: `$payload#cs` packets (with `}` escapes),
/// acknowledgements (`+`, `-`) and the interrupt byte (0x03).
///
/// `GDBPacketParser` is a pure state machine fed with whatever bytes the socket delivered; it
/// never fails: a packet with a bad checksum or over `maxPayload` bytes becomes `.bad` (answered
/// with `-`), stray bytes between packets are skipped.
public enum GDBEvent: Equatable, Sendable {
    /// A packet whose checksum matched, unescaped.
    case packet([UInt8])
    /// A packet that must be sent again (bad checksum, too long).
    case bad
    /// `+` or `-` from the debugger.
    case ack, nack
    /// Ctrl-C: stop the target.
    case interrupt
}

public struct GDBPacketParser: Sendable {
    /// The largest payload accepted (and announced as `PacketSize`).
    public static let maxPayload = 0x4000

    private enum State: Sendable {
        case idle, payload, escape, checksum1, checksum2
    }
    private var state = State.idle
    private var payload: [UInt8] = []
    private var sum: UInt8 = 0
    private var received: UInt8 = 0
    private var overflow = false

    public init() {}

    /// Consumes `bytes`, returning the events they complete, in order.
    public mutating func feed<C: Collection>(_ bytes: C) -> [GDBEvent] where C.Element == UInt8 {
        var events: [GDBEvent] = []
        for b in bytes {
            switch state {
            case .idle:
                switch b {
                case UInt8(ascii: "$"):
                    state = .payload
                    payload.removeAll(keepingCapacity: true)
                    sum = 0
                    overflow = false
                case UInt8(ascii: "+"): events.append(.ack)
                case UInt8(ascii: "-"): events.append(.nack)
                case 0x03: events.append(.interrupt)
                default: break
                }
            case .payload, .escape:
                if b == UInt8(ascii: "#") && state == .payload {
                    state = .checksum1
                    continue
                }
                sum &+= b
                if state == .escape {
                    append(b ^ 0x20)
                    state = .payload
                } else if b == UInt8(ascii: "}") {
                    state = .escape
                } else if b == UInt8(ascii: "$") {
                    // A new packet starts before the old one ended: the old one is lost.
                    events.append(.bad)
                    payload.removeAll(keepingCapacity: true)
                    sum = 0
                    overflow = false
                } else {
                    append(b)
                }
            case .checksum1:
                guard let v = Self.hexValue(b) else {
                    events.append(.bad)
                    state = .idle
                    continue
                }
                received = v << 4
                state = .checksum2
            case .checksum2:
                state = .idle
                guard let v = Self.hexValue(b), received | v == sum, !overflow else {
                    events.append(.bad)
                    continue
                }
                events.append(.packet(payload))
            }
        }
        return events
    }

    private mutating func append(_ b: UInt8) {
        if payload.count < Self.maxPayload { payload.append(b) } else { overflow = true }
    }

    static func hexValue(_ b: UInt8) -> UInt8? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return b - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return b - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return b - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    /// Frames `payload` as `$…#cs`, escaping `$`, `#`, `}` and `*`.
    public static func frame(_ payload: [UInt8]) -> [UInt8] {
        var out: [UInt8] = [UInt8(ascii: "$")]
        var sum: UInt8 = 0
        for b in payload {
            if b == UInt8(ascii: "$") || b == UInt8(ascii: "#") || b == UInt8(ascii: "}") || b == UInt8(ascii: "*") {
                out.append(UInt8(ascii: "}"))
                out.append(b ^ 0x20)
                sum &+= UInt8(ascii: "}") &+ (b ^ 0x20)
            } else {
                out.append(b)
                sum &+= b
            }
        }
        let hex = Array("0123456789abcdef".utf8)
        out += [UInt8(ascii: "#"), hex[Int(sum >> 4)], hex[Int(sum & 15)]]
        return out
    }
}
