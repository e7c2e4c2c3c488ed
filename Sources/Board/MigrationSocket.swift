import Foundation

/// The sockets of a live migration: the source connects, the destination listens and accepts
/// one connection. Blocking calls; used on the migration queue only.
enum MigrationSocket {
    private static func errorText() -> String { String(cString: strerror(errno)) }

    /// Connects to a `tcp:` or `unix:` destination; returns the connected descriptor.
    static func connect(_ uri: MigrationURI) throws -> Int32 {
        switch uri {
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_family = AF_UNSPEC
            var list: UnsafeMutablePointer<addrinfo>? = nil
            let r = getaddrinfo(host, String(port), &hints, &list)
            guard r == 0, let first = list else {
                throw MachineStateError("tcp:\(host):\(port): cannot resolve '\(host)': \(String(cString: gai_strerror(r)))")
            }
            defer { freeaddrinfo(list) }
            var lastError = "no address"
            var a: UnsafeMutablePointer<addrinfo>? = first
            while let ai = a {
                let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
                if fd >= 0 {
                    if Foundation.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 {
                        var one: Int32 = 1
                        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                        return fd
                    }
                    lastError = errorText()
                    close(fd)
                } else {
                    lastError = errorText()
                }
                a = ai.pointee.ai_next
            }
            throw MachineStateError("tcp:\(host):\(port): cannot connect: \(lastError)")
        case .unix(let path):
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw MachineStateError("unix:\(path): cannot create a socket: \(errorText())") }
            let ok = withUnixAddress(path) { sa, len in Foundation.connect(fd, sa, len) == 0 }
            guard ok else {
                let e = errorText()
                close(fd)
                throw MachineStateError("unix:\(path): cannot connect: \(e)")
            }
            return fd
        case .socket(let fd):
            return fd
        case .file, .exec, .fd:
            preconditionFailure("not a socket URI")
        }
    }

    /// Binds and listens on a `tcp:` or `unix:` source; returns the listening descriptor.
    /// A Unix socket path that already exists is refused rather than removed.
    static func listen(_ uri: MigrationURI) throws -> Int32 {
        switch uri {
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_family = AF_UNSPEC
            hints.ai_flags = AI_PASSIVE
            var list: UnsafeMutablePointer<addrinfo>? = nil
            let r = getaddrinfo(host, String(port), &hints, &list)
            guard r == 0, let ai = list else {
                throw MachineStateError("tcp:\(host):\(port): cannot resolve '\(host)': \(String(cString: gai_strerror(r)))")
            }
            defer { freeaddrinfo(list) }
            let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
            guard fd >= 0 else { throw MachineStateError("tcp:\(host):\(port): cannot create a socket: \(errorText())") }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            guard bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, Foundation.listen(fd, 1) == 0 else {
                let e = errorText()
                close(fd)
                throw MachineStateError("tcp:\(host):\(port): cannot listen: \(e)")
            }
            return fd
        case .unix(let path):
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw MachineStateError("unix:\(path): cannot create a socket: \(errorText())") }
            let ok = withUnixAddress(path) { sa, len in bind(fd, sa, len) == 0 } && Foundation.listen(fd, 1) == 0
            guard ok else {
                let e = errorText()
                close(fd)
                throw MachineStateError("unix:\(path): cannot listen: \(e)")
            }
            return fd
        case .socket(let fd):
            throw MachineStateError("fd:\(fd): receiving a live migration on a passed socket is not supported (use tcp: or unix:)")
        case .file, .exec, .fd:
            preconditionFailure("not a socket URI")
        }
    }

    /// Accepts one connection and closes the listener (and unlinks a Unix socket's path).
    static func acceptOne(_ listener: Int32, uri: MigrationURI) throws -> Int32 {
        defer {
            close(listener)
            if case .unix(let path) = uri { unlink(path) }
        }
        while true {
            let fd = accept(listener, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                return fd
            }
            if errno == EINTR { continue }
            throw MachineStateError("cannot accept the migration connection: \(errorText())")
        }
    }

    private static func withUnixAddress<T>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() where i < p.count - 1 { p[i] = b }
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    /// Writes all of `bytes` (MSG_NOSIGNAL: a closed peer is an error, not a signal).
    static func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let n = send(fd, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                throw MachineStateError("the migration connection broke: \(errorText())")
            }
            done += n
        }
    }

    /// True when the peer has sent something (or closed) that can be read without waiting.
    static func hasInput(_ fd: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) > 0
    }
}
