import Foundation
import Synchronization

/// The file descriptors a client passed to one monitor connection (SCM_RIGHTS on a unix
/// socket) and the names `getfd` gave them, as QEMU's per-monitor fd table.
///
/// The socket relay (`UnixMonitorListener`) adds what arrives, before the bytes of the command
/// they came with reach the session, so the command sees its descriptor. `getfd` names the
/// oldest received and unclaimed descriptor; `migrate fd:NAME` takes a named one out (it then
/// belongs to the migration). Everything left is closed with the connection. Any thread.
public final class PassedDescriptors: Sendable {
    /// Received descriptors kept waiting for a `getfd`; older ones are closed past this.
    public static let pendingLimit = 16

    private struct State {
        var pending: [Int32] = []
        var named: [String: Int32] = [:]
        var closed = false
    }
    private let state = Mutex(State())

    public init() {}

    /// Keeps descriptors that arrived with a message (closing them at once after `closeAll`).
    public func receive(_ fds: [Int32]) {
        let extra = state.withLock { s -> [Int32] in
            if s.closed { return fds }
            s.pending.append(contentsOf: fds)
            let over = max(0, s.pending.count - Self.pendingLimit)
            defer { s.pending.removeFirst(over) }
            return Array(s.pending.prefix(over))
        }
        for fd in extra { Foundation.close(fd) }
    }

    /// `getfd`: names the oldest unclaimed descriptor; an earlier one of that name is closed.
    public func claim(name: String) throws {
        guard let first = name.first, !first.isNumber else {
            throw QMPError(.genericError, "Parameter 'fdname' must not be empty or start with a digit")
        }
        let replaced = try state.withLock { s -> Int32? in
            guard !s.pending.isEmpty else { throw QMPError(.genericError, "No file descriptor supplied via SCM_RIGHTS") }
            let fd = s.pending.removeFirst()
            defer { s.named[name] = fd }
            return s.named[name]
        }
        if let replaced { Foundation.close(replaced) }
    }

    /// `closefd`: closes a named descriptor.
    public func close(name: String) throws {
        let fd = state.withLock { $0.named.removeValue(forKey: name) }
        guard let fd else { throw QMPError(.genericError, "File descriptor named '\(name)' not found") }
        Foundation.close(fd)
    }

    /// Takes a named descriptor out of the table; the caller now owns it.
    public func take(name: String) -> Int32? {
        state.withLock { $0.named.removeValue(forKey: name) }
    }

    /// The names in use (for tests and `info` output).
    public var names: [String] { state.withLock { $0.named.keys.sorted() } }

    /// Closes everything; later arrivals are closed at once. Idempotent.
    public func closeAll() {
        let fds = state.withLock { s -> [Int32] in
            s.closed = true
            defer { s.pending = []; s.named = [:] }
            return s.pending + Array(s.named.values)
        }
        for fd in fds { Foundation.close(fd) }
    }

    deinit { closeAll() }
}
