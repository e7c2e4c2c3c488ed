import Foundation
import Machine
import Synchronization

/// A listening stream socket (unix or TCP) that serves one client at a time, like QEMU's
/// `server=on,wait=off` socket chardev.
///
/// Guest output goes to the connected client; while nobody is connected it is dropped (and
/// counted in `droppedBytes`). A second client that connects while one is attached is accepted
/// and closed at once. `write` is called on the vCPU thread and never blocks: it tries one
/// non-blocking send, queues what the peer did not take in a bounded buffer (`outputLimit`
/// bytes, overflow dropped and counted), and the backend's I/O thread ("chardev ID") flushes the
/// rest, accepts clients and delivers input to the receiver.
public final class SocketChardev: CharBackend, Sendable {
    /// Bytes of output kept for a slow client before newer output is dropped.
    public static let outputLimit = 256 * 1024

    public let id: String
    /// Where the socket listens: the unix path, or `HOST:PORT` with the port actually bound
    /// (useful when port 0 asked the host for an ephemeral one).
    public let listenAddress: String
    /// The TCP port actually bound; nil for a unix socket.
    public let port: UInt16?

    private let listenFD: Int32
    private let unixPath: String?
    private let wake: WakePipe
    private let input: ChardevInput
    private let ended = ThreadExit()
    private let state = Mutex(State())

    private struct State {
        var client: Int32 = -1
        var peer: String? = nil
        var output = PendingOutput(capacity: SocketChardev.outputLimit)
        var closed = false
        var ioThreadID: pthread_t? = nil
    }

    /// Listens on a unix socket at `path`, replacing a stale socket file left there earlier.
    /// Throws when the path is too long, is taken by something that is not a socket, or the
    /// host refuses to bind it.
    public init(id: String, unixPath path: String) throws {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let limit = MemoryLayout.size(ofValue: addr.sun_path) - 1
        let bytes = Array(path.utf8)
        guard bytes.count <= limit else { throw ChardevError.pathTooLong(path: path, limit: limit) }
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw ChardevError.notASocket(path: path) }
            unlink(path)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw ChardevError.system(what: "cannot create a unix socket", errno: errno) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(fd, 4) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw ChardevError.system(what: "cannot listen on unix socket '\(path)'", errno: e)
        }
        self.id = id
        self.listenFD = fd
        self.unixPath = path
        self.listenAddress = path
        self.port = nil
        do { self.wake = try WakePipe() } catch {
            Glibc.close(fd)
            unlink(path)
            throw error
        }
        input = ChardevInput(wake: wake)
        start()
    }

    /// Listens on TCP `host:port` (a numeric address or a name that resolves locally; port 0
    /// picks an ephemeral port). Listens on that address only (IPv6 sockets are v6-only).
    public init(id: String, host: String, port: UInt16) throws {
        var hints = addrinfo()
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>? = nil
        let gai = getaddrinfo(host, String(port), &hints, &list)
        guard gai == 0, let first = list else {
            throw ChardevError.invalidSpec(spec: "tcp:\(host):\(port)", reason: "cannot resolve host '\(host)': \(String(cString: gai_strerror(gai)))")
        }
        defer { freeaddrinfo(list) }
        var fd: Int32 = -1
        var lastErrno: Int32 = 0
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let ai = cursor {
            cursor = ai.pointee.ai_next
            let s = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), ai.pointee.ai_protocol)
            if s < 0 { lastErrno = errno; continue }
            var one: Int32 = 1
            setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if ai.pointee.ai_family == AF_INET6 {
                setsockopt(s, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            if bind(s, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, listen(s, 4) == 0 {
                fd = s
                break
            }
            lastErrno = errno
            Glibc.close(s)
        }
        guard fd >= 0 else {
            throw ChardevError.system(what: "cannot listen on tcp \(host):\(port)", errno: lastErrno)
        }
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let bound = withUnsafeMutablePointer(to: &ss) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p -> (String, UInt16)? in
                getsockname(fd, p, &len) == 0 ? numericAddress(p, len) : nil
            }
        }
        self.id = id
        self.listenFD = fd
        self.unixPath = nil
        let boundPort = bound?.1 ?? port
        self.port = boundPort
        let h = bound?.0 ?? host
        self.listenAddress = h.contains(":") ? "[\(h)]:\(boundPort)" : "\(h):\(boundPort)"
        do { self.wake = try WakePipe() } catch {
            Glibc.close(fd)
            throw error
        }
        input = ChardevInput(wake: wake)
        start()
    }

    /// QEMU's `query-chardev` filename: "disconnected:" while no client is attached, and the
    /// peer after "<->" for TCP.
    public var filename: String {
        let (connected, peer) = state.withLock { ($0.client >= 0, $0.peer) }
        let base = unixPath != nil ? "unix:\(listenAddress),server=on" : "tcp:\(listenAddress),server=on"
        if !connected { return "disconnected:" + base }
        if let peer, unixPath == nil { return base + " <-> " + peer }
        return base
    }

    /// True while a client is attached.
    public var isConnected: Bool { state.withLock { $0.client >= 0 } }

    /// Output bytes lost so far (no client, or a client too slow for the bounded buffer).
    public var droppedBytes: UInt64 { state.withLock { $0.output.dropped } }

    // Input is read only as fast as the gate allows: while it says 0 the client's bytes stay
    // in the socket, and the client's writes block (backpressure, as in QEMU).
    public func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) { input.setReceiver(receiver) }
    public func setInputGate(_ room: @escaping @Sendable () -> Int) { input.setGate(room) }
    public func inputRoomAvailable() { input.roomAvailable() }

    /// Sends guest output; never blocks (see the type's documentation). vCPU thread.
    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        let needWake = state.withLock { s in
            let client = s.client
            return s.output.write(bytes, peerPresent: client >= 0 && !s.closed) { Self.send($0, to: client) }
        }
        if needWake { wake.signal() }
    }

    /// Stops the I/O thread, disconnects the client, closes the socket and removes the unix
    /// socket file. Idempotent; any thread.
    public func close() {
        let onIOThread = state.withLock { s -> Bool in
            s.closed = true
            return s.ioThreadID.map { pthread_equal($0, pthread_self()) != 0 } ?? false
        }
        wake.signal()
        if !onIOThread { ended.wait(timeout: 5) }
    }

    private func start() {
        startThread(named: "chardev \(id)") { [self] in
            state.withLock { $0.ioThreadID = pthread_self() }
            ioLoop()
            state.withLock { s in
                if s.client >= 0 { Glibc.close(s.client) }
                s.client = -1
                s.output.removeAll()
            }
            Glibc.close(listenFD)
            if let unixPath { unlink(unixPath) }
            ended.finish()
        }
    }

    private func ioLoop() {
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let (closed, client, wantOut) = state.withLock { ($0.closed, $0.client, !$0.output.isEmpty) }
            if closed { return }
            // With no room for input, the client is not polled for it (nor for hang-up, which
            // poll always reports: its last bytes are read once there is room).
            let room = client >= 0 ? input.room(limit: buf.count) : 0
            var fds = [pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)]
            if client >= 0 && (room > 0 || wantOut) {
                fds.append(pollfd(fd: client, events: (room > 0 ? Int16(POLLIN) : 0) | (wantOut ? Int16(POLLOUT) : 0), revents: 0))
            }
            let rc = poll(&fds, nfds_t(fds.count), -1)
            if rc < 0 {
                if errno == EINTR { continue }
                return
            }
            if fds[0].revents != 0 { wake.drain() }
            if fds.count > 2, fds[2].revents != 0 {
                let ev = fds[2].revents
                if ev & Int16(POLLOUT) != 0 { flush(client) }
                if room > 0 && ev & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                    let n = buf.withUnsafeMutableBytes { Glibc.read(client, $0.baseAddress, min($0.count, room)) }
                    if n > 0 {
                        input.deliver(Array(buf[0..<n]))
                    } else if n == 0 || (errno != EAGAIN && errno != EINTR) {
                        disconnect(client)
                    }
                }
            }
            if fds[1].revents & Int16(POLLIN) != 0 { acceptClient() }
        }
    }

    private func acceptClient() {
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let fd = withUnsafeMutablePointer(to: &ss) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                accept(listenFD, $0, &len)
            }
        }
        guard fd >= 0 else { return }
        setNonBlockingCloseOnExec(fd)
        let peer: String? = unixPath != nil ? nil : withUnsafePointer(to: &ss) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p in
                numericAddress(p, len).map { $0.0.contains(":") ? "[\($0.0)]:\($0.1)" : "\($0.0):\($0.1)" }
            }
        }
        let taken = state.withLock { s -> Bool in
            if s.client >= 0 { return true }
            s.client = fd
            s.peer = peer
            s.output.removeAll()
            return false
        }
        if taken { Glibc.close(fd) }
    }

    private func flush(_ client: Int32) {
        let healthy = state.withLock { s in
            s.client != client || s.output.flush { Self.send($0, to: client) }
        }
        if !healthy { disconnect(client) }
    }

    /// One non-blocking send that cannot raise SIGPIPE.
    private static func send(_ bytes: UnsafeRawBufferPointer, to client: Int32) -> Int {
        Glibc.send(client, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
    }

    private func disconnect(_ client: Int32) {
        state.withLock { s in
            guard s.client == client else { return }
            Glibc.close(client)
            s.client = -1
            s.peer = nil
            s.output.removeAll()
        }
    }
}

/// The numeric host and port of a socket address (IPv4 or IPv6), or nil for other families.
func numericAddress(_ sa: UnsafePointer<sockaddr>, _ len: socklen_t) -> (String, UInt16)? {
    let family = Int32(sa.pointee.sa_family)
    guard family == AF_INET || family == AF_INET6 else { return nil }
    var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
    var serv = [CChar](repeating: 0, count: Int(NI_MAXSERV))
    guard getnameinfo(sa, len, &host, socklen_t(host.count), &serv, socklen_t(serv.count),
                      NI_NUMERICHOST | NI_NUMERICSERV) == 0 else { return nil }
    let h = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    let p = String(decoding: serv.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return (h, UInt16(p) ?? 0)
}
