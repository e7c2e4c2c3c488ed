import Foundation
import Machine
import Schema
import Synchronization
import Testing
@testable import QMP
#if canImport(Glibc)
import Glibc
#endif

/// A blocking test client on a real socket; reads CRLF-terminated messages with a timeout.
final class SocketClient {
    let fd: Int32
    var pending: [UInt8] = []

    init(unixPath: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path(unixPath).enumerated() { raw[i] = b }
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 { throw POSIXError(.ECONNREFUSED) }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    private func path(_ p: String) -> [UInt8] { Array(p.utf8) + [0] }

    func write(_ text: String) {
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// The next message, or nil on timeout/EOF. Checks the CRLF terminator.
    func read() -> JSONValue? {
        while true {
            if let i = pending.firstIndex(of: 0x0A) {
                let line = Array(pending[..<i])
                pending.removeFirst(i + 1)
                #expect(line.last == 0x0D, "message not terminated by CRLF")
                return try? JSONValue.parse(line.dropLast())
            }
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return nil }
            pending += buf[..<n]
        }
    }

    /// Reads until a reply (not an event) arrives; returns the events seen before it and the reply.
    func reply() -> (events: [String], reply: JSONValue?) {
        var events: [String] = []
        while let m = read() {
            if case .string(let e)? = m["event"] { events.append(e); continue }
            return (events, m)
        }
        return (events, nil)
    }

    deinit { close(fd) }
}

/// Leaves a socket file behind the way a crashed server would.
func makeStaleSocket(_ path: String) {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        for (i, b) in (Array(path.utf8) + [0]).enumerated() { raw[i] = b }
    }
    _ = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    close(fd)
}

@Suite(.serialized) struct ServerTests {
    func tempPath(_ name: String) -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("qmp-\(UUID().uuidString.prefix(8))-\(name)").path
    }

    @Test func aRegularFileAtTheSocketPathIsNotDeleted() throws {
        let path = tempPath("file")
        #expect(FileManager.default.createFile(atPath: path, contents: Data("keep".utf8)))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let server = QMPServer(control: FakeMachine(), chardevs: FakeChardevs())
        defer { server.shutdown() }
        #expect(throws: QMPServerError.self) { try server.start(listeners: [.unix(path: path)]) }
        #expect(FileManager.default.contents(atPath: path) == Data("keep".utf8))
    }

    /// Sends `text` with `fd` as SCM_RIGHTS ancillary data, as libvirt sends getfd.
    func send(_ text: String, passing fd: Int32, on socketFD: Int32) -> Int {
        var bytes = Array(text.utf8)
        var control = [UInt8](repeating: 0, count: 24)  // cmsghdr (16) + one int, aligned
        control.withUnsafeMutableBytes { c in
            c.storeBytes(of: UInt64(20), toByteOffset: 0, as: UInt64.self)  // CMSG_LEN(4)
            c.storeBytes(of: SOL_SOCKET, toByteOffset: 8, as: Int32.self)
            c.storeBytes(of: Int32(SCM_RIGHTS), toByteOffset: 12, as: Int32.self)
            c.storeBytes(of: fd, toByteOffset: 16, as: Int32.self)
        }
        return bytes.withUnsafeMutableBytes { b in
            control.withUnsafeMutableBytes { c in
                var iov = iovec(iov_base: b.baseAddress, iov_len: b.count)
                return withUnsafeMutablePointer(to: &iov) { iovp in
                    var msg = msghdr()
                    msg.msg_iov = iovp
                    msg.msg_iovlen = 1
                    msg.msg_control = c.baseAddress
                    msg.msg_controllen = c.count
                    return sendmsg(socketFD, &msg, 0)
                }
            }
        }
    }

    @Test func getfdTakesTheDescriptorSentWithItAndClosefdClosesIt() throws {
        let server = QMPServer(control: FakeMachine(), chardevs: FakeChardevs())
        let path = tempPath("fd.sock")
        try server.start(listeners: [.unix(path: path)])
        defer { server.shutdown() }
        let c = try SocketClient(unixPath: path)
        #expect(c.read()?["QMP"] != nil)
        c.write(#"{"execute":"qmp_capabilities"}"#)
        #expect(c.read() == ["return": [:]])
        c.write(#"{"execute":"getfd","arguments":{"fdname":"migrate"}}"#)
        #expect(c.reply().reply?["error"]?["desc"] == "No file descriptor supplied via SCM_RIGHTS")

        var p: [Int32] = [-1, -1]
        #expect(pipe(&p) == 0)
        defer { close(p[0]) }
        #expect(send(#"{"execute":"getfd","arguments":{"fdname":"migrate"}}"#, passing: p[1], on: c.fd) > 0)
        #expect(c.reply().reply == ["return": [:]])
        close(p[1])
        // The server holds the write end: the pipe has no EOF until closefd.
        var pfd = pollfd(fd: p[0], events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 200) == 0, "the server keeps the descriptor it was given")
        c.write(#"{"execute":"closefd","arguments":{"fdname":"migrate"}}"#)
        #expect(c.reply().reply == ["return": [:]])
        pfd.revents = 0
        #expect(poll(&pfd, 1, 5000) == 1 && pfd.revents & Int16(POLLHUP) != 0, "closefd closed the server's copy")
        c.write(#"{"execute":"closefd","arguments":{"fdname":"migrate"}}"#)
        #expect(c.reply().reply?["error"]?["desc"] == "File descriptor named 'migrate' not found")
        // A name that looks like a number is refused (fd:N means an inherited descriptor).
        var q: [Int32] = [-1, -1]
        #expect(pipe(&q) == 0)
        defer { close(q[0]); close(q[1]) }
        #expect(send(#"{"execute":"getfd","arguments":{"fdname":"3"}}"#, passing: q[1], on: c.fd) > 0)
        #expect(c.reply().reply?["error"]?["class"] == "GenericError")
        // The machine cannot migrate here, whatever the descriptor.
        c.write(#"{"execute":"migrate","arguments":{"uri":"fd:nothing"}}"#)
        #expect(c.reply().reply?["error"]?["class"] == "GenericError")
    }

    @Test func controlMessagesAreParsedForRightsOnly() {
        var control = [UInt8](repeating: 0, count: 48)
        control.withUnsafeMutableBytes { c in
            c.storeBytes(of: UInt64(24), toByteOffset: 0, as: UInt64.self)  // two descriptors
            c.storeBytes(of: SOL_SOCKET, toByteOffset: 8, as: Int32.self)
            c.storeBytes(of: Int32(SCM_RIGHTS), toByteOffset: 12, as: Int32.self)
            c.storeBytes(of: Int32(7), toByteOffset: 16, as: Int32.self)
            c.storeBytes(of: Int32(9), toByteOffset: 20, as: Int32.self)
            c.storeBytes(of: UInt64(20), toByteOffset: 24, as: UInt64.self)  // credentials: skipped
            c.storeBytes(of: SOL_SOCKET, toByteOffset: 32, as: Int32.self)
            c.storeBytes(of: Int32(2), toByteOffset: 36, as: Int32.self)
        }
        #expect(control.withUnsafeBytes { UnixMonitorListener.parseRights($0) } == [7, 9])
        #expect(control.withUnsafeBytes { UnixMonitorListener.parseRights(UnsafeRawBufferPointer(rebasing: $0[0..<10])) } == [])
        var bad = control
        bad.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(1000), toByteOffset: 0, as: UInt64.self) }
        #expect(bad.withUnsafeBytes { UnixMonitorListener.parseRights($0) } == [], "a length past the buffer ends the walk")
    }

    @Test func listenerSpecsParse() throws {
        #expect(try QMPListenerSpec(parsing: "unix:/tmp/x") == .unix(path: "/tmp/x"))
        #expect(try QMPListenerSpec(parsing: "tcp:127.0.0.1:4444") == .tcp(host: "127.0.0.1", port: 4444))
        #expect(try QMPListenerSpec(parsing: "tcp:[::1]:4444") == .tcp(host: "::1", port: 4444))
        #expect(throws: QMPServerError.self) { try QMPListenerSpec(parsing: "tcp:host") }
        #expect(throws: QMPServerError.self) { try QMPListenerSpec(parsing: "pipe:x") }
    }

    @Test func noEventOvertakesTheCapabilitiesReply() throws {
        let server = QMPServer(control: FakeMachine(), chardevs: FakeChardevs())
        let path = tempPath("race.sock")
        try server.start(listeners: [.unix(path: path)])
        defer { server.shutdown() }
        let stop = Atomic<Bool>(false)
        let emitter = Thread {
            while !stop.load(ordering: .relaxed) { server.emit(.powerdown) }
        }
        emitter.start()
        defer { stop.store(true, ordering: .relaxed) }
        for i in 0..<400 {
            let c = try SocketClient(unixPath: path)
            #expect(c.read()?["QMP"] != nil)
            c.write(#"{"execute":"qmp_capabilities","id":"cap"}"#)
            // The first message after the greeting is the reply; events only follow it.
            let first = c.read()
            #expect(first == ["return": [:], "id": "cap"], "client \(i): \(String(describing: first))")
            #expect(c.read()?["event"] == "POWERDOWN")
        }
    }

    @Test func twoClientsNegotiateSeparatelyAndBothGetEvents() throws {
        let machine = FakeMachine()
        let server = QMPServer(control: machine, chardevs: FakeChardevs())
        let path = tempPath("a.sock")
        // A stale socket file (bound, then abandoned) at the path is replaced.
        makeStaleSocket(path)
        #expect(FileManager.default.fileExists(atPath: path))
        try server.start(listeners: [.unix(path: path), .tcp(host: "127.0.0.1", port: 0)])
        defer { server.shutdown() }
        let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
        #expect(mode == 0o600)
        #expect(server.boundAddresses.count == 2)

        let a = try SocketClient(unixPath: path)
        let b = try SocketClient(unixPath: path)
        #expect(a.read()?["QMP"]?["capabilities"] == [])
        #expect(b.read()?["QMP"] != nil)
        a.write(#"{"execute":"qmp_capabilities","id":"n"}"#)
        #expect(a.reply().reply == ["return": [:], "id": "n"])
        // b has not negotiated: refused.
        b.write(#"{"execute":"stop"}"#)
        #expect(errorOf(b.reply().reply ?? .null)?.0 == "CommandNotFound")
        // Two requests in one write, no separator.
        a.write(#"{"execute":"stop","id":1}{"execute":"query-status","id":2}"#)
        let first = a.reply()
        #expect(first.events == ["STOP"])
        #expect(first.reply == ["return": [:], "id": 1])
        #expect(a.reply().reply?["return"]?["status"] == "paused")
        b.write(#"{"execute":"qmp_capabilities"}"#)
        _ = b.reply()
        a.write(#"{"execute":"cont"}"#)
        #expect(a.reply().events == ["RESUME"])
        let bEvent = b.read()
        #expect(bEvent?["event"] == "RESUME")
        #expect(bEvent?["timestamp"]?["seconds"] != nil)
    }

    @Test func quitRepliesBeforeTheMachineQuits() throws {
        let machine = FakeMachine()
        let server = QMPServer(control: machine, chardevs: FakeChardevs())
        let path = tempPath("q.sock")
        try server.start(listeners: [.unix(path: path)])
        defer { server.shutdown() }
        let c = try SocketClient(unixPath: path)
        _ = c.read()
        c.write(#"{"execute":"qmp_capabilities"}{"execute":"quit","id":"q"}"#)
        _ = c.reply()
        let r = c.reply()
        #expect(r.reply == ["return": [:], "id": "q"])
        // The SHUTDOWN event follows the reply once the machine has quit.
        #expect(c.read()?["event"] == "SHUTDOWN")
        #expect(machine.calls == ["quit"])
    }

    @Test func disconnectMidMessageIsHarmless() throws {
        let server = QMPServer(control: FakeMachine(), chardevs: FakeChardevs())
        let path = tempPath("d.sock")
        try server.start(listeners: [.unix(path: path)])
        defer { server.shutdown() }
        do {
            let c = try SocketClient(unixPath: path)
            _ = c.read()
            c.write(#"{"execute":"qmp_capabilities"}{"execute":"que"#)
        }
        let c2 = try SocketClient(unixPath: path)
        #expect(c2.read()?["QMP"] != nil)
    }
}
