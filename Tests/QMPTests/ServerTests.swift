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
