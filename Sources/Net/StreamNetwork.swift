import Foundation
import Machine

/// Where a stream netdev listens or connects: QEMU's `SocketAddress` (inet or unix).
public enum StreamAddress: Sendable, Equatable, CustomStringConvertible {
    /// A TCP address; `host` may be a name or a numeric address.
    case inet(host: String, port: UInt16)
    /// A unix-domain socket path.
    case unix(path: String)

    public var description: String {
        switch self {
        case .inet(let h, let p): return "\(h):\(p)"
        case .unix(let p): return "unix:\(p)"
        }
    }
}

/// `-netdev stream` (QEMU 7.2+): Ethernet frames over one TCP or unix stream connection, each
/// preceded by its 4-byte big-endian length, so two machines (ours or QEMU) share a link. With
/// `server`, the backend listens and serves one peer at a time; otherwise it connects, retrying
/// every `reconnect` seconds when that is non-zero.
///
/// Threading: the socket is read and written on the loop thread only.
public final class StreamNetwork: NetworkLoop, @unchecked Sendable {  // unchecked: the socket and frame buffers are touched on the loop thread only
    /// Where it listens or connects.
    public let address: StreamAddress
    /// Listen (true) or connect (false).
    public let server: Bool
    /// For a client: seconds between connection attempts; 0 never retries.
    public let reconnect: Int

    /// How long one connection attempt may take.
    static let connectTimeoutMs = 5000
    /// Bytes queued for the peer beyond which frames from the guest are dropped.
    static let outputLimit = 4 << 20

    // Loop thread only.
    private nonisolated(unsafe) var listener: Int32 = -1
    private nonisolated(unsafe) var conn: Int32 = -1
    private nonisolated(unsafe) var reader = StreamFrameReader()
    private nonisolated(unsafe) var output: [UInt8] = []
    private nonisolated(unsafe) var outputHead = 0
    private nonisolated(unsafe) var nextAttempt: Int64 = 0
    private nonisolated(unsafe) var listenIndex = -1, connIndex = -1
    private nonisolated(unsafe) var readBuffer = [UInt8](repeating: 0, count: 256 * 1024)
    private let peerName = UnsafeSendableBox<String?>(value: nil)
    private let stateLock = NSLock()

    public override var kind: String { "stream" }

    public override var summary: String {
        stateLock.lock()
        defer { stateLock.unlock() }
        let peer = peerName.value
        if server { return "listening on \(address)" + (peer.map { ", connected from \($0)" } ?? "") }
        return peer.map { "connected to \($0)" } ?? "connecting to \(address)"
    }

    /// Opens the listener (server) or connects (client, unless `reconnect` lets it retry later).
    /// Throws naming the address and the system's reason.
    public init(id: String, address: StreamAddress, server: Bool, reconnect: Int = 0) throws(NetError) {
        self.address = address
        self.server = server
        self.reconnect = reconnect
        super.init(id: id)
        if server {
            do {
                listener = try Self.listen(address)
            } catch {
                super.close()
                throw error
            }
        } else {
            do {
                try connectNow()
            } catch {
                guard reconnect > 0 else {
                    super.close()
                    throw error
                }
                nextAttempt = Self.nowMs() + Int64(reconnect) * 1000
            }
        }
        start()
    }

    static func nowMs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }

    private static func sockaddrs(_ a: StreamAddress) throws(NetError) -> [(family: Int32, addr: [UInt8])] {
        switch a {
        case .unix(let path):
            var sun = sockaddr_un()
            sun.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: sun.sun_path) else {
                throw NetError("unix socket path '\(path)' is too long")
            }
            withUnsafeMutableBytes(of: &sun.sun_path) { p in for (i, b) in bytes.enumerated() { p[i] = b } }
            return [(AF_UNIX, withUnsafeBytes(of: sun) { Array($0) })]
        case .inet(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = AI_NUMERICSERV
            var res: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &res)
            guard rc == 0, let first = res else {
                throw NetError("address resolution failed for \(host):\(port): \(String(cString: gai_strerror(rc)))")
            }
            defer { freeaddrinfo(res) }
            var out: [(Int32, [UInt8])] = []
            var p: UnsafeMutablePointer<addrinfo>? = first
            while let ai = p {
                out.append((ai.pointee.ai_family, Array(UnsafeRawBufferPointer(start: ai.pointee.ai_addr, count: Int(ai.pointee.ai_addrlen)))))
                p = ai.pointee.ai_next
            }
            return out
        }
    }

    private static func listen(_ a: StreamAddress) throws(NetError) -> Int32 {
        var last = "no address"
        for (family, addr) in try sockaddrs(a) {
            let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { last = String(cString: strerror(errno)); continue }
            var one: Int32 = 1
            if family != AF_UNIX {
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            } else if case .unix(let path) = a {
                var st = stat()
                if lstat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK { unlink(path) }
            }
            let ok = addr.withUnsafeBytes { bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) } == 0
                && Glibc.listen(fd, 1) == 0
            if ok {
                _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
                return fd
            }
            last = String(cString: strerror(errno))
            Glibc.close(fd)
        }
        throw NetError("Failed to listen on \(a): \(last)")
    }

    /// Connects, waiting at most `timeoutMs` (the loop thread waits only briefly: the NIC's queues wait with it).
    private func connectNow(timeoutMs: Int = StreamNetwork.connectTimeoutMs) throws(NetError) {
        var last = "no address"
        for (family, addr) in try Self.sockaddrs(address) {
            let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { last = String(cString: strerror(errno)); continue }
            // Non-blocking, with a time limit: an unreachable host must not hold the launch or a
            // QMP netdev_add for the kernel's whole SYN timeout.
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            var rc = addr.withUnsafeBytes { Glibc.connect(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
            var err = rc == 0 ? 0 : errno
            if rc != 0 && err == EINPROGRESS {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                rc = poll(&p, 1, Int32(timeoutMs))
                if rc == 1 {
                    var soError: Int32 = 0
                    var len = socklen_t(MemoryLayout<Int32>.size)
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len)
                    err = soError
                } else {
                    err = ETIMEDOUT
                }
            }
            if err == 0 {
                adopt(fd)
                return
            }
            last = String(cString: strerror(err))
            Glibc.close(fd)
        }
        throw NetError("Failed to connect to \(address): \(last)")
    }

    private func adopt(_ fd: Int32) {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        conn = fd
        reader = StreamFrameReader()
        output.removeAll()
        outputHead = 0
        stateLock.lock()
        peerName.value = server ? Self.peer(fd) : address.description
        stateLock.unlock()
    }

    private static func peer(_ fd: Int32) -> String {
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } } == 0
        guard ok else { return "?" }
        if Int32(ss.ss_family) == AF_UNIX { return "unix" }
        var host = [CChar](repeating: 0, count: 64), serv = [CChar](repeating: 0, count: 16)
        _ = withUnsafePointer(to: &ss) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, len, &host, socklen_t(host.count), &serv, socklen_t(serv.count), NI_NUMERICHOST | NI_NUMERICSERV)
            }
        }
        func text(_ c: [CChar]) -> String { String(decoding: c.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        return "\(text(host)):\(text(serv))"
    }

    private func disconnect(_ why: String) {
        guard conn >= 0 else { return }
        Glibc.close(conn)
        conn = -1
        stateLock.lock()
        peerName.value = nil
        stateLock.unlock()
        FileHandle.standardError.write(Data("machine-server: netdev \(id): peer disconnected (\(why))\n".utf8))
        if !server && reconnect > 0 { nextAttempt = Self.nowMs() + Int64(reconnect) * 1000 }
    }

    public override func send(_ frame: UnsafeRawBufferPointer) {
        guard linkUp, conn >= 0 else {
            droppedFrames += 1
            return
        }
        guard output.count - outputHead + frame.count <= Self.outputLimit else {
            droppedFrames += 1
            return
        }
        output.append(contentsOf: StreamFrameReader.encode(frame))
        flushOutput()
    }

    private func flushOutput() {
        while conn >= 0 && outputHead < output.count {
            let n = output.withUnsafeBytes { Glibc.send(conn, $0.baseAddress! + outputHead, $0.count - outputHead, Int32(MSG_NOSIGNAL)) }
            if n > 0 {
                outputHead += n
            } else if n < 0 && (errno == EAGAIN || errno == EINTR) {
                if errno == EAGAIN { break }
            } else {
                disconnect(n < 0 ? String(cString: strerror(errno)) : "closed")
                return
            }
        }
        if outputHead == output.count {
            output.removeAll(keepingCapacity: true)
            outputHead = 0
        } else if outputHead > 1 << 20 {
            output.removeFirst(outputHead)
            outputHead = 0
        }
    }

    public override func fillPoll(_ fds: inout [pollfd]) -> Int32 {
        listenIndex = -1
        connIndex = -1
        if conn >= 0 {
            var ev: Int16 = 0
            if !hasBacklog { ev |= Int16(POLLIN) }
            if outputHead < output.count { ev |= Int16(POLLOUT) }
            connIndex = fds.count
            fds.append(pollfd(fd: conn, events: ev, revents: 0))
        } else if listener >= 0 {
            listenIndex = fds.count
            fds.append(pollfd(fd: listener, events: Int16(POLLIN), revents: 0))
        } else if !server && reconnect > 0 {
            return Int32(max(0, min(Int64(reconnect) * 1000, nextAttempt - Self.nowMs())))
        }
        return -1
    }

    public override func handlePoll(_ fds: [pollfd], error: Bool) {
        if listenIndex >= 0, fds[listenIndex].revents != 0 {
            let fd = accept(listener, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                adopt(fd)
            }
        }
        if connIndex >= 0, conn >= 0 {
            let r = fds[connIndex].revents
            if r & Int16(POLLOUT) != 0 { flushOutput() }
            if conn >= 0, r & Int16(POLLIN | POLLHUP | POLLERR) != 0 { readAvailable() }
        }
        if conn < 0, listener < 0, !server, reconnect > 0, Self.nowMs() >= nextAttempt {
            do { try connectNow(timeoutMs: 100) } catch { nextAttempt = Self.nowMs() + Int64(reconnect) * 1000 }
        }
    }

    private func readAvailable() {
        // A bounded amount per wake-up, so the guest's transmit work is not starved.
        for _ in 0..<8 where conn >= 0 && !hasBacklog {
            let n = readBuffer.withUnsafeMutableBytes { recv(conn, $0.baseAddress!, $0.count, 0) }
            if n > 0 {
                var failure: StreamFrameReader.Failure?
                readBuffer.withUnsafeBytes { b in
                    do {
                        try reader.consume(UnsafeRawBufferPointer(rebasing: b[0..<n])) { deliver($0) }
                    } catch let e as StreamFrameReader.Failure {
                        failure = e
                    } catch {}
                }
                if let failure { disconnect(failure.description) }
            } else if n == 0 {
                disconnect("closed by the peer")
            } else {
                if errno != EAGAIN && errno != EINTR { disconnect(String(cString: strerror(errno))) }
                return
            }
        }
    }

    public override func closeResources() {
        if conn >= 0 { Glibc.close(conn) }
        if listener >= 0 { Glibc.close(listener) }
        conn = -1
        listener = -1
        if server, case .unix(let path) = address { unlink(path) }
    }
}
