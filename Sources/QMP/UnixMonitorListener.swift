import Foundation
import Synchronization

/// A unix-socket monitor listener that can receive file descriptors (SCM_RIGHTS), which
/// SwiftNIO's stream channels drop: libvirt passes the file of `virsh save` this way (`getfd`).
///
/// An accept thread takes each client; a relay pair of threads per client moves bytes
/// between the client's socket and one end of a socketpair whose other end is the NIO channel
/// the session runs on. The inbound relay reads with `recvmsg`, hands any descriptors to the
/// connection's `PassedDescriptors` first and then forwards the bytes, so the command a
/// descriptor came with finds it. Either side closing ends both relays and closes both sockets.
final class UnixMonitorListener: Sendable {
    /// The listening socket (bound here, or inherited from libvirt).
    let fd: Int32
    /// The socket file to remove at shutdown, when this listener created it.
    let path: String?
    /// Called on the accept thread with the NIO end of a new client's socketpair and the
    /// client's descriptor table.
    private let onClient: @Sendable (Int32, PassedDescriptors) -> Void
    private let stopped = Atomic<Bool>(false)

    /// True when `fd` is a unix-domain socket.
    static func isUnixSocket(_ fd: Int32) -> Bool {
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return ok == 0 && Int32(ss.ss_family) == AF_UNIX
    }

    /// Binds a new listening socket at `path` (a stale socket file is replaced; the caller
    /// sets the umask), or throws with the host's reason.
    static func bind(path: String) throws -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw QMPServerError.bindFailed("unix:\(path)", "the path is longer than the host allows")
        }
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw QMPServerError.bindFailed("unix:\(path)", "it exists and is not a socket")
            }
            unlink(path)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw QMPServerError.bindFailed("unix:\(path)", String(cString: strerror(errno))) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(fd, 16) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw QMPServerError.bindFailed("unix:\(path)", String(cString: strerror(e)))
        }
        return fd
    }

    /// Starts accepting on `fd` (a listening unix socket, now owned by this listener).
    init(fd: Int32, path: String?, onClient: @escaping @Sendable (Int32, PassedDescriptors) -> Void) {
        self.fd = fd
        self.path = path
        self.onClient = onClient
        // The accept loop blocks: clear O_NONBLOCK an inherited socket may carry.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        Thread { [self] in acceptLoop() }.start()
    }

    /// Stops accepting and removes the socket file. Connections already relayed go on until
    /// either side closes them. Idempotent.
    func shutdown() {
        guard !stopped.exchange(true, ordering: .sequentiallyConsistent) else { return }
        Glibc.shutdown(fd, Int32(SHUT_RDWR))  // wakes the blocked accept
        if let path { unlink(path) }
    }

    private func acceptLoop() {
        while !stopped.load(ordering: .sequentiallyConsistent) {
            let client = accept(fd, nil, nil)
            if client >= 0 { _ = fcntl(client, F_SETFD, FD_CLOEXEC) }
            if client < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM {
                    usleep(100_000)
                    continue
                }
                break
            }
            var pair: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
                Glibc.close(client)
                continue
            }
            let descriptors = PassedDescriptors()
            Self.relay(client: client, local: pair[1], descriptors: descriptors)
            onClient(pair[0], descriptors)
        }
        Glibc.close(fd)
    }

    /// Moves bytes both ways between `client` and `local` on two threads; closes both and
    /// the descriptor table when both directions have ended.
    private static func relay(client: Int32, local: Int32, descriptors: PassedDescriptors) {
        let finished = Atomic<Int>(0)
        @Sendable func done() {
            if finished.add(1, ordering: .sequentiallyConsistent).newValue == 2 {
                Glibc.close(client)
                Glibc.close(local)
                descriptors.closeAll()
            }
        }
        Thread {
            inbound(from: client, to: local, descriptors: descriptors)
            Glibc.shutdown(local, Int32(SHUT_WR))  // the session sees the end of input
            done()
        }.start()
        Thread {
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = buf.withUnsafeMutableBytes { Glibc.read(local, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                let ok = buf.withUnsafeBytes { raw in sendAll(client, UnsafeRawBufferPointer(rebasing: raw[0..<n])) }
                if !ok { break }
            }
            Glibc.shutdown(client, Int32(SHUT_RDWR))  // the inbound relay's recvmsg returns
            done()
        }.start()
    }

    /// The most descriptors taken from one message.
    static let maxDescriptorsPerMessage = 16

    /// Reads the client with recvmsg until it closes; descriptors go to `descriptors` before
    /// the bytes they came with go to `local`.
    private static func inbound(from client: Int32, to local: Int32, descriptors: PassedDescriptors) {
        var buf = [UInt8](repeating: 0, count: 65536)
        // A cmsghdr (16 bytes on LP64) and the descriptors, with room to spare.
        let controlSize = 16 + 4 * maxDescriptorsPerMessage + 16
        var control = [UInt8](repeating: 0, count: controlSize)
        while true {
            var fds: [Int32] = []
            let n = buf.withUnsafeMutableBytes { data -> Int in
                control.withUnsafeMutableBytes { ctl -> Int in
                    var iov = iovec(iov_base: data.baseAddress, iov_len: data.count)
                    return withUnsafeMutablePointer(to: &iov) { iovp -> Int in
                        var msg = msghdr()
                        msg.msg_iov = iovp
                        msg.msg_iovlen = 1
                        msg.msg_control = ctl.baseAddress
                        msg.msg_controllen = ctl.count
                        let r = recvmsg(client, &msg, Int32(MSG_CMSG_CLOEXEC))
                        if r > 0 || (r == 0 && msg.msg_controllen > 0) {
                            fds = parseRights(UnsafeRawBufferPointer(rebasing: ctl[0..<min(Int(msg.msg_controllen), ctl.count)]))
                        }
                        return r
                    }
                }
            }
            if !fds.isEmpty { descriptors.receive(fds) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            let ok = buf.withUnsafeBytes { raw in sendAll(local, UnsafeRawBufferPointer(rebasing: raw[0..<n])) }
            if !ok { return }
        }
    }

    /// The descriptors of the SCM_RIGHTS messages in a control buffer (Linux LP64 layout:
    /// `cmsg_len` as size_t, level and type as int, data aligned to 8 bytes).
    static func parseRights(_ control: UnsafeRawBufferPointer) -> [Int32] {
        var fds: [Int32] = []
        var off = 0
        let header = 16
        while off + header <= control.count {
            let len = Int(control.loadUnaligned(fromByteOffset: off, as: UInt64.self))
            let level = control.loadUnaligned(fromByteOffset: off + 8, as: Int32.self)
            let type = control.loadUnaligned(fromByteOffset: off + 12, as: Int32.self)
            guard len >= header, off + len <= control.count else { break }
            if level == SOL_SOCKET && type == Int32(SCM_RIGHTS) {
                var p = off + header
                while p + 4 <= off + len {
                    fds.append(control.loadUnaligned(fromByteOffset: p, as: Int32.self))
                    p += 4
                }
            }
            off += (len + 7) & ~7
        }
        return fds
    }

    /// Writes everything to a blocking socket; false when the peer is gone.
    private static func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = send(fd, bytes.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            off += n
        }
        return true
    }
}
