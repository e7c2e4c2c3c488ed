/// The framing of QEMU's `-netdev stream` (and `-netdev socket`): each Ethernet frame is a
/// 4-byte big-endian length followed by the frame. A pure state machine over received bytes,
/// apart from the socket, so it can be tested and fuzzed in memory.
public struct StreamFrameReader: Sendable {
    /// The largest frame accepted (QEMU's NET_BUFSIZE is 4096 + 65536); a larger length means
    /// the peer does not speak this framing and the connection is dropped.
    public static let maxFrame = 69_632

    /// What the peer sent wrong.
    public enum Failure: Error, Equatable, CustomStringConvertible {
        /// A length prefix above `maxFrame`.
        case frameTooLarge(UInt32)
        public var description: String {
            switch self {
            case .frameTooLarge(let n): return "the peer announced a frame of \(n) bytes (at most \(StreamFrameReader.maxFrame))"
            }
        }
    }

    private var header: UInt32 = 0
    private var headerBytes = 0
    private var frame: [UInt8] = []
    private var need = 0

    public init() {}

    /// Consumes `bytes`, calling `body` with each complete frame in order (zero-length frames
    /// are skipped, as QEMU does). Throws on a length above `maxFrame`; the reader is then unusable.
    public mutating func consume(_ bytes: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> Void) throws(Failure) {
        var i = 0
        let n = bytes.count
        while i < n {
            if headerBytes < 4 {
                header = header << 8 | UInt32(bytes[i])
                headerBytes += 1
                i += 1
                if headerBytes == 4 {
                    guard header <= UInt32(Self.maxFrame) else { throw .frameTooLarge(header) }
                    need = Int(header)
                    frame.removeAll(keepingCapacity: true)
                    if need == 0 { headerBytes = 0; header = 0 }
                }
                continue
            }
            let take = min(need - frame.count, n - i)
            frame.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[i..<(i + take)]))
            i += take
            if frame.count == need {
                frame.withUnsafeBytes { body($0) }
                headerBytes = 0
                header = 0
            }
        }
    }

    /// Whether the reader is in the middle of a frame (a peer that hangs up now truncated one).
    public var isMidFrame: Bool { headerBytes != 0 }

    /// Encodes one frame with its length prefix.
    public static func encode(_ frame: UnsafeRawBufferPointer) -> [UInt8] {
        let n = UInt32(frame.count)
        var out: [UInt8] = [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
        out.append(contentsOf: frame)
        return out
    }
}
