import Foundation

/// One message of a live migration's return path (destination → source, on the same
/// connection as the stream). Each starts with an 8-byte tag:
///
/// | message | bytes |
/// |---|---|
/// | ok | `MSVMOK\0\0`: the whole stream is loaded (the switch-over, or the end of post-copy) |
/// | refused | `MSVMERR\0`, u32 length (≤ 4096), UTF-8 reason: the destination gives up |
/// | post-copy ready | `MSVMPCOK`: answer to a header that advises post-copy: this end can do it |
/// | post-copy unavailable | `MSVMPCNO`, u32 length (≤ 4096), UTF-8 reason |
/// | running | `MSVMRUN\0`: post-copy: the destination has loaded the devices and runs the guest |
/// | page request | `MSVMREQ\0`, u32 count n (1...1024), n × u64 page index (< RAM pages): post-copy: send these pages first |
/// | synced | `MSVMSYNC`, u32 sequence: the destination has read everything up to the sync record with that number |
///
/// Integers are little-endian.
enum ReturnPathMessage: Equatable, Sendable {
    case ok
    case refused(String)
    case postcopyReady
    case postcopyUnavailable(String)
    case running
    case pageRequest([UInt64])
    case synced(UInt32)

    static let tagOK: [UInt8] = Array("MSVMOK\0\0".utf8)
    static let tagRefused: [UInt8] = Array("MSVMERR\0".utf8)
    static let tagPostcopyReady: [UInt8] = Array("MSVMPCOK".utf8)
    static let tagPostcopyUnavailable: [UInt8] = Array("MSVMPCNO".utf8)
    static let tagRunning: [UInt8] = Array("MSVMRUN\0".utf8)
    static let tagRequest: [UInt8] = Array("MSVMREQ\0".utf8)
    static let tagSynced: [UInt8] = Array("MSVMSYNC".utf8)
    /// Longest reason accepted.
    static let maxReason = 4096
    /// Most pages in one request.
    static let maxRequestPages = 1024

    /// The message's bytes on the wire (a reason is cut to `maxReason` bytes; a request must
    /// hold 1...maxRequestPages pages).
    var encoded: [UInt8] {
        func withText(_ tag: [UInt8], _ s: String) -> [UInt8] {
            let text = Array(s.utf8.prefix(Self.maxReason))
            var out = tag
            withUnsafeBytes(of: UInt32(text.count).littleEndian) { out.append(contentsOf: $0) }
            return out + text
        }
        switch self {
        case .ok: return Self.tagOK
        case .refused(let s): return withText(Self.tagRefused, s)
        case .postcopyReady: return Self.tagPostcopyReady
        case .postcopyUnavailable(let s): return withText(Self.tagPostcopyUnavailable, s)
        case .running: return Self.tagRunning
        case .synced(let n):
            var out = Self.tagSynced
            withUnsafeBytes(of: n.littleEndian) { out.append(contentsOf: $0) }
            return out
        case .pageRequest(let pages):
            precondition(!pages.isEmpty && pages.count <= Self.maxRequestPages)
            var out = Self.tagRequest
            withUnsafeBytes(of: UInt32(pages.count).littleEndian) { out.append(contentsOf: $0) }
            for p in pages { withUnsafeBytes(of: p.littleEndian) { out.append(contentsOf: $0) } }
            return out
        }
    }
}

/// Splits the return path's bytes into messages, as they arrive in any pieces. Outside input:
/// an unknown tag, an over-long reason, a request of 0 or more than 1024 pages, or a page
/// outside RAM is refused with a message naming it (the connection is then unusable). A pure
/// value; not thread-safe.
struct ReturnPathParser {
    /// Pages of guest RAM (page indices must be below it).
    let ramPages: UInt64
    private var buffer: [UInt8] = []

    init(ramPages: UInt64) { self.ramPages = ramPages }

    /// Bytes received but not yet part of a whole message.
    var pendingBytes: Int { buffer.count }

    private func u32(at i: Int) -> Int {
        Int(UInt32(buffer[i]) | UInt32(buffer[i + 1]) << 8 | UInt32(buffer[i + 2]) << 16 | UInt32(buffer[i + 3]) << 24)
    }

    private func u64(at i: Int) -> UInt64 {
        var v: UInt64 = 0
        for k in 0..<8 { v |= UInt64(buffer[i + k]) << (8 * k) }
        return v
    }

    /// Adds `bytes` and returns every message now complete, in order.
    mutating func feed(_ bytes: UnsafeRawBufferPointer) throws -> [ReturnPathMessage] {
        buffer.append(contentsOf: bytes)
        var out: [ReturnPathMessage] = []
        var at = 0
        defer { buffer.removeFirst(at) }
        while buffer.count - at >= 8 {
            let tag = Array(buffer[at..<at + 8])
            let left = buffer.count - at - 8
            switch tag {
            case ReturnPathMessage.tagOK:
                out.append(.ok)
                at += 8
            case ReturnPathMessage.tagPostcopyReady:
                out.append(.postcopyReady)
                at += 8
            case ReturnPathMessage.tagRunning:
                out.append(.running)
                at += 8
            case ReturnPathMessage.tagSynced:
                guard left >= 4 else { return out }
                out.append(.synced(UInt32(u32(at: at + 8))))
                at += 12
            case ReturnPathMessage.tagRefused, ReturnPathMessage.tagPostcopyUnavailable:
                guard left >= 4 else { return out }
                let length = u32(at: at + 8)
                guard length <= ReturnPathMessage.maxReason else {
                    throw MachineStateError("return path: a reason of \(length) bytes is over the limit of \(ReturnPathMessage.maxReason)")
                }
                guard left >= 4 + length else { return out }
                let text = String(decoding: buffer[at + 12..<at + 12 + length], as: UTF8.self)
                out.append(tag == ReturnPathMessage.tagRefused ? .refused(text) : .postcopyUnavailable(text))
                at += 12 + length
            case ReturnPathMessage.tagRequest:
                guard left >= 4 else { return out }
                let count = u32(at: at + 8)
                guard count >= 1, count <= ReturnPathMessage.maxRequestPages else {
                    throw MachineStateError("return path: a page request for \(count) pages (1...\(ReturnPathMessage.maxRequestPages) allowed)")
                }
                guard left >= 4 + count * 8 else { return out }
                var pages: [UInt64] = []
                pages.reserveCapacity(count)
                for k in 0..<count {
                    let p = u64(at: at + 12 + 8 * k)
                    guard p < ramPages else {
                        throw MachineStateError("return path: a request for page \(p), outside the \(ramPages) pages of RAM")
                    }
                    pages.append(p)
                }
                out.append(.pageRequest(pages))
                at += 12 + count * 8
            default:
                let shown = tag.map { ($0 >= 0x20 && $0 < 0x7f) ? String(UnicodeScalar($0)) : "." }.joined()
                throw MachineStateError("return path: unknown message '\(shown)'")
            }
        }
        return out
    }

    mutating func feed(_ bytes: [UInt8]) throws -> [ReturnPathMessage] {
        try bytes.withUnsafeBytes { try feed($0) }
    }
}

/// The source's end of the return path: reads the connection through a `ReturnPathParser`.
/// Migration queue only.
final class ReturnPathReader {
    /// The connection.
    let fd: Int32
    private var parser: ReturnPathParser
    private var queued: [ReturnPathMessage] = []

    init(fd: Int32, ramPages: UInt64) {
        self.fd = fd
        parser = ReturnPathParser(ramPages: ramPages)
    }

    /// Reads what is there without waiting (or waits up to `timeout` seconds for the first
    /// byte); throws when the connection broke or sent something malformed.
    private func fill(timeout: Double) throws {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let r = poll(&p, 1, Int32(max(0, min(timeout, 1e6)) * 1000))
        if r < 0 {
            if errno == EINTR { return }
            throw MachineStateError("the migration connection broke: \(String(cString: strerror(errno)))")
        }
        if r == 0 { return }
        var bytes = [UInt8](repeating: 0, count: 64 << 10)
        let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, Int32(MSG_DONTWAIT)) }
        if n < 0 {
            if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { return }
            throw MachineStateError("the migration connection broke: \(String(cString: strerror(errno)))")
        }
        if n == 0 { throw MachineStateError("the destination closed the connection") }
        queued += try bytes.withUnsafeBytes { try parser.feed(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
    }

    /// The messages that have arrived, without waiting.
    func available() throws -> [ReturnPathMessage] {
        var reads = 0
        while reads < 64 && MigrationSocket.hasInput(fd) {
            try fill(timeout: 0)
            reads += 1
        }
        defer { queued.removeAll() }
        return queued
    }

    /// The next message, waiting at most `timeout` seconds; nil on a timeout.
    func next(timeout: Double) throws -> ReturnPathMessage? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while queued.isEmpty {
            let left = deadline.timeIntervalSinceNow
            if left <= 0 { return nil }
            try fill(timeout: min(left, 1))
        }
        return queued.removeFirst()
    }

    /// Waits for `ok` (nil) or a refusal (its reason); other messages in between are handed
    /// to `other`. Throws on a timeout or a broken connection.
    func awaitReply(timeout: Double, other: (ReturnPathMessage) throws -> Void = { _ in }) throws -> String? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while true {
            guard let m = try next(timeout: deadline.timeIntervalSinceNow) else {
                throw MachineStateError("the destination did not answer within \(Int(timeout)) s")
            }
            switch m {
            case .ok: return nil
            case .refused(let why): return why
            default: try other(m)
            }
        }
    }
}
