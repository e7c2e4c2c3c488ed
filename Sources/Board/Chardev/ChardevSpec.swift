import Foundation
import Machine

/// What went wrong while parsing a chardev SPEC or opening its backend; the description is the
/// message shown to the user.
public enum ChardevError: Error, CustomStringConvertible, Equatable {
    /// The SPEC string is malformed; `reason` says how, `spec` is what the user wrote.
    case invalidSpec(spec: String, reason: String)
    /// A host call failed while opening the backend (`what` names the operation and the target).
    case system(what: String, errno: Int32)
    /// A unix socket path does not fit in `sun_path`.
    case pathTooLong(path: String, limit: Int)
    /// Something already exists at a unix socket path and it is not a socket.
    case notASocket(path: String)

    public var description: String {
        switch self {
        case .invalidSpec(let spec, let reason):
            return "invalid chardev '\(spec)': \(reason)"
        case .system(let what, let e):
            return "\(what): \(String(cString: strerror(e)))"
        case .pathTooLong(let path, let limit):
            return "unix socket path '\(path)' is longer than the \(limit) bytes the host allows"
        case .notASocket(let path):
            return "'\(path)' exists and is not a unix socket; refusing to replace it"
        }
    }
}

/// A parsed chardev SPEC, the value of `--serial` and `--qmp`.
///
/// Accepted forms: `stdio`, `unix:PATH`, `tcp:HOST:PORT` (HOST may be `[v6addr]`), `file:PATH`
/// (truncates; `file:PATH,append=on` appends), `ringbuf` or `ringbuf:SIZE` (SIZE a power of two,
/// optional `K`/`M` suffix), `pty` (a new pseudo-terminal) and `none`. Socket forms also accept QEMU's `,server=on` and
/// `,wait=off` suffixes, which describe the only mode supported. A plain value, usable anywhere.
public enum ChardevSpec: Equatable, Sendable, CustomStringConvertible {
    case stdio
    case unix(path: String)
    case tcp(host: String, port: UInt16)
    case file(path: String, append: Bool)
    case ringbuf(size: Int)
    case pty
    case none

    /// QEMU's default ring buffer size (64 KiB).
    public static let defaultRingbufSize = 65536

    /// Parses a SPEC; throws `ChardevError.invalidSpec` naming what is wrong.
    public init(parsing spec: String) throws {
        func bad(_ reason: String) -> ChardevError { .invalidSpec(spec: spec, reason: reason) }
        let kind: Substring
        let rest: Substring?
        if let colon = spec.firstIndex(of: ":") {
            kind = spec[..<colon]
            rest = spec[spec.index(after: colon)...]
        } else {
            kind = spec[...]
            rest = nil
        }
        switch kind {
        case "stdio", "none", "pty":
            guard rest == nil else { throw bad("'\(kind)' takes no argument") }
            self = kind == "stdio" ? .stdio : kind == "pty" ? .pty : .none
        case "unix":
            let body = try Self.stripServerOptions(rest ?? "", spec: spec)
            guard !body.isEmpty else { throw bad("expected unix:PATH, for example unix:/tmp/serial.sock") }
            self = .unix(path: String(body))
        case "tcp":
            let body = try Self.stripServerOptions(rest ?? "", spec: spec)
            let (host, port) = try Self.parseHostPort(body, spec: spec)
            self = .tcp(host: host, port: port)
        case "file":
            var body = rest ?? ""
            var append = false
            if body.hasSuffix(",append=on") {
                append = true
                body = body.dropLast(",append=on".count)
            } else if body.hasSuffix(",append=off") {
                body = body.dropLast(",append=off".count)
            }
            guard !body.isEmpty else { throw bad("expected file:PATH, for example file:/tmp/console.log") }
            self = .file(path: String(body), append: append)
        case "ringbuf":
            guard let rest else {
                self = .ringbuf(size: Self.defaultRingbufSize)
                return
            }
            let size = try Self.parseSize(rest, spec: spec)
            self = .ringbuf(size: size)
        case "":
            throw bad("empty chardev; expected one of stdio, unix:PATH, tcp:HOST:PORT, file:PATH, ringbuf[:SIZE], pty, none")
        default:
            throw bad("unknown kind '\(kind)'; expected one of stdio, unix:PATH, tcp:HOST:PORT, file:PATH, ringbuf[:SIZE], pty, none")
        }
    }

    /// The canonical SPEC string for this value (parses back to an equal value).
    public var description: String {
        switch self {
        case .stdio: return "stdio"
        case .none: return "none"
        case .pty: return "pty"
        case .unix(let p): return "unix:\(p)"
        case .tcp(let h, let p): return h.contains(":") ? "tcp:[\(h)]:\(p)" : "tcp:\(h):\(p)"
        case .file(let p, let a): return a ? "file:\(p),append=on" : "file:\(p)"
        case .ringbuf(let s): return "ringbuf:\(s)"
        }
    }

    /// Opens the backend this SPEC describes; nil for `none`.
    ///
    /// `onQuitRequest` is called (on the stdio reader thread) when the user types Ctrl-A x on a
    /// stdio terminal. Call on the thread that assembles the machine.
    public func makeBackend(id: String, onQuitRequest: @escaping @Sendable () -> Void = {}) throws -> (any CharBackend)? {
        switch self {
        case .none: return nil
        case .stdio: return try StdioChardev(id: id, onQuitRequest: onQuitRequest)
        case .unix(let path): return try SocketChardev(id: id, unixPath: path)
        case .tcp(let host, let port): return try SocketChardev(id: id, host: host, port: port)
        case .file(let path, let append): return try FileChardev(id: id, path: path, append: append)
        case .ringbuf(let size): return RingbufChardev(id: id, size: size)
        case .pty: return try PtyChardev(id: id)
        }
    }

    /// Removes trailing `,server=on` / `,wait=off` options, rejecting the modes we do not offer.
    private static func stripServerOptions(_ s: Substring, spec: String) throws -> Substring {
        var parts = s.split(separator: ",", omittingEmptySubsequences: false)
        while parts.count > 1, let last = parts.last {
            switch last {
            case "server=on", "server", "wait=off", "nowait":
                parts.removeLast()
            case "server=off", "wait=on":
                throw ChardevError.invalidSpec(spec: spec, reason: "'\(last)' is not supported; sockets always listen (server=on) and never wait for a client (wait=off)")
            default:
                if last.contains("=") {
                    throw ChardevError.invalidSpec(spec: spec, reason: "unknown option '\(last)'")
                }
                return s
            }
        }
        return parts.joined(separator: ",")[...]
    }

    private static func parseHostPort(_ s: Substring, spec: String) throws -> (String, UInt16) {
        func bad(_ reason: String) -> ChardevError { .invalidSpec(spec: spec, reason: reason) }
        let host: Substring
        let portText: Substring
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]") else { throw bad("missing ']' after IPv6 address") }
            host = s[s.index(after: s.startIndex)..<close]
            let after = s[s.index(after: close)...]
            guard after.hasPrefix(":") else { throw bad("expected tcp:[ADDRESS]:PORT") }
            portText = after.dropFirst()
        } else {
            guard let colon = s.lastIndex(of: ":") else {
                throw bad("expected tcp:HOST:PORT, for example tcp:127.0.0.1:4444")
            }
            host = s[..<colon]
            portText = s[s.index(after: colon)...]
        }
        guard !host.isEmpty else {
            throw bad("missing HOST; say which address to listen on, for example tcp:127.0.0.1:4444 (or tcp:0.0.0.0:4444 for every interface)")
        }
        guard let port = UInt16(portText) else {
            throw bad("port '\(portText)' is not a number from 0 to 65535")
        }
        return (String(host), port)
    }

    private static func parseSize(_ s: Substring, spec: String) throws -> Int {
        var digits = s
        var scale = 1
        if let last = s.last, "kKmM".contains(last) {
            scale = (last == "k" || last == "K") ? 1024 : 1024 * 1024
            digits = s.dropLast()
        }
        guard let n = Int(digits), n > 0, n <= (1 << 30) / scale else {
            throw ChardevError.invalidSpec(spec: spec, reason: "ring buffer size '\(s)' must be a positive number of bytes up to 1G")
        }
        let size = n * scale
        guard size & (size - 1) == 0 else {
            throw ChardevError.invalidSpec(spec: spec, reason: "ring buffer size \(size) must be a power of two")
        }
        return size
    }
}
