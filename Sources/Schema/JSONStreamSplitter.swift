/// Cuts a byte stream into complete top-level JSON texts without needing separators.
///
/// QMP clients write one object after another with no newline in between, sometimes split
/// across reads. The splitter tracks string/escape state and bracket depth to find where each
/// top-level value ends, the way QEMU's JSON streamer does, and hands each complete text on for
/// parsing. Stray closing brackets and top-level scalars come out as their own texts (so the
/// parser reports them). A message longer than `maxMessageSize` bytes, or nested deeper than
/// `maxDepth`, yields `.overLimit`; the caller should answer with an error and close.
///
/// A value type owned by one connection; not shared between threads.
public struct JSONStreamSplitter: Sendable {
    /// One result of feeding bytes.
    public enum Output: Sendable, Equatable {
        /// The bytes of one complete top-level JSON text (not yet parsed).
        case message([UInt8])
        /// The message in progress exceeded a limit; the reason names which.
        case overLimit(String)
    }

    /// The largest accepted message in bytes.
    public let maxMessageSize: Int
    /// The deepest accepted nesting of arrays and objects.
    public let maxDepth: Int

    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var inScalar = false

    /// Creates a splitter with the given limits (defaults: 4 MiB, depth 1024 like QEMU).
    public init(maxMessageSize: Int = 4 << 20, maxDepth: Int = 1024) {
        self.maxMessageSize = maxMessageSize
        self.maxDepth = maxDepth
    }

    /// True when bytes of an unfinished message are buffered.
    public var hasPartialMessage: Bool { !buffer.isEmpty }

    /// Consumes bytes and returns every text completed by them, in order. After `.overLimit`
    /// the splitter has been reset and can keep going, though callers normally close.
    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [Output] {
        var out: [Output] = []
        for b in bytes {
            if inString {
                buffer.append(b)
                if escaped {
                    escaped = false
                } else if b == UInt8(ascii: "\\") {
                    escaped = true
                } else if b == UInt8(ascii: "\"") {
                    inString = false
                    if depth == 0 { emit(&out) }
                }
            } else {
                switch b {
                case 0x20, 0x09, 0x0A, 0x0D:
                    if inScalar && depth == 0 { emit(&out) } else if !buffer.isEmpty { buffer.append(b) }
                case UInt8(ascii: "\""):
                    if inScalar && depth == 0 { emit(&out) }
                    buffer.append(b)
                    inString = true
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    if inScalar && depth == 0 { emit(&out) }
                    buffer.append(b)
                    depth += 1
                    if depth > maxDepth {
                        reset()
                        out.append(.overLimit("JSON nesting deeper than \(maxDepth) levels"))
                        continue
                    }
                case UInt8(ascii: "}"), UInt8(ascii: "]"):
                    if inScalar && depth == 0 { emit(&out) }
                    buffer.append(b)
                    if depth > 0 { depth -= 1 }
                    if depth == 0 { emit(&out) }
                default:
                    if depth == 0 && !inScalar {
                        inScalar = true
                    }
                    buffer.append(b)
                }
            }
            if buffer.count > maxMessageSize {
                reset()
                out.append(.overLimit("message longer than \(maxMessageSize) bytes"))
            }
        }
        return out
    }

    private mutating func emit(_ out: inout [Output]) {
        if !buffer.isEmpty { out.append(.message(buffer)) }
        reset()
    }

    private mutating func reset() {
        buffer.removeAll(keepingCapacity: true)
        depth = 0
        inString = false
        escaped = false
        inScalar = false
    }
}
