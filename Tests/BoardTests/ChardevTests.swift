import Foundation
import Machine
import Devices
import Synchronization
import Testing
@testable import Board

// MARK: - Helpers

/// Collects bytes delivered to a backend's receiver, from any thread.
final class ByteSink: Sendable {
    private let bytes = Mutex<[UInt8]>([])
    var value: [UInt8] { bytes.withLock { $0 } }
    var receiver: @Sendable ([UInt8]) -> Void { { b in self.bytes.withLock { $0.append(contentsOf: b) } } }
}

/// Polls `condition` every 5 ms for up to `seconds`; true once it holds.
func eventually(_ seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let end = Date().addingTimeInterval(seconds)
    while Date() < end {
        if condition() { return true }
        usleep(5000)
    }
    return condition()
}

/// A fresh private directory for sockets and files; short, because sun_path is 108 bytes.
func temporaryDirectory() throws -> String {
    var template = Array("/tmp/vmtest.XXXXXX".utf8CString)
    guard let p = mkdtemp(&template) else { throw ChardevError.system(what: "mkdtemp", errno: errno) }
    return String(cString: p)
}

/// A blocking client socket connected to a unix path or a TCP port on 127.0.0.1.
final class TestClient {
    let fd: Int32

    init(unixPath: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in unixPath.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw ChardevError.system(what: "connect \(unixPath)", errno: errno) }
        setTimeout()
    }

    init(tcpPort: UInt16) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = tcpPort.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { throw ChardevError.system(what: "connect 127.0.0.1:\(tcpPort)", errno: errno) }
        setTimeout()
    }

    private func setTimeout() {
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    func send(_ s: String) { _ = Array(s.utf8).withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }

    /// Reads until `count` bytes arrived, EOF, or the 5 s timeout.
    func receive(count: Int) -> [UInt8] {
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < count {
            let n = Glibc.recv(fd, &buf, min(buf.count, count - out.count), 0)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return out
    }

    /// True when the server closed the connection (recv returns 0 within the timeout).
    func seesEOF() -> Bool {
        var b: UInt8 = 0
        return Glibc.recv(fd, &b, 1, 0) == 0
    }
}

extension CharBackend {
    func write(_ s: String) { Array(s.utf8).withUnsafeBytes { write($0) } }
}

// MARK: - SPEC parsing

@Suite struct ChardevSpecTests {
    @Test func parsesEveryForm() throws {
        #expect(try ChardevSpec(parsing: "stdio") == .stdio)
        #expect(try ChardevSpec(parsing: "none") == ChardevSpec.none)
        #expect(try ChardevSpec(parsing: "unix:/tmp/a.sock") == .unix(path: "/tmp/a.sock"))
        #expect(try ChardevSpec(parsing: "unix:/tmp/a.sock,server=on,wait=off") == .unix(path: "/tmp/a.sock"))
        #expect(try ChardevSpec(parsing: "tcp:127.0.0.1:4444") == .tcp(host: "127.0.0.1", port: 4444))
        #expect(try ChardevSpec(parsing: "tcp:[::1]:4444,server,nowait") == .tcp(host: "::1", port: 4444))
        #expect(try ChardevSpec(parsing: "file:/tmp/log") == .file(path: "/tmp/log", append: false))
        #expect(try ChardevSpec(parsing: "file:/tmp/log,append=on") == .file(path: "/tmp/log", append: true))
        #expect(try ChardevSpec(parsing: "ringbuf") == .ringbuf(size: 65536))
        #expect(try ChardevSpec(parsing: "ringbuf:4096") == .ringbuf(size: 4096))
        #expect(try ChardevSpec(parsing: "ringbuf:1M") == .ringbuf(size: 1 << 20))
    }

    @Test func canonicalFormRoundTrips() throws {
        for s in ["stdio", "none", "unix:/x/y", "tcp:localhost:1", "tcp:[::1]:80", "file:/a,append=on", "file:/b", "ringbuf:1024"] {
            let spec = try ChardevSpec(parsing: s)
            #expect(try ChardevSpec(parsing: spec.description) == spec)
        }
    }

    @Test(arguments: [
        ("", "empty chardev"),
        ("serial", "unknown kind 'serial'"),
        ("stdio:x", "'stdio' takes no argument"),
        ("unix:", "expected unix:PATH"),
        ("tcp:4444", "expected tcp:HOST:PORT"),
        ("tcp::4444", "missing HOST"),
        ("tcp:127.0.0.1:99999", "port '99999'"),
        ("tcp:127.0.0.1:http", "port 'http'"),
        ("tcp:[::1:4444", "missing ']'"),
        ("tcp:127.0.0.1:1,wait=on", "'wait=on' is not supported"),
        ("unix:/a,server=off", "'server=off' is not supported"),
        ("unix:/a,telnet=on", "unknown option 'telnet=on'"),
        ("file:", "expected file:PATH"),
        ("ringbuf:1000", "must be a power of two"),
        ("ringbuf:0", "must be a positive number"),
        ("ringbuf:lots", "must be a positive number"),
    ])
    func rejectsWithAReason(input: String, reason: String) {
        do {
            _ = try ChardevSpec(parsing: input)
            Issue.record("'\(input)' was accepted")
        } catch {
            #expect("\(error)".contains(reason), "message was: \(error)")
            #expect("\(error)".contains("'\(input)'"))
        }
    }
}

// MARK: - Pure parts

@Suite struct ByteQueueTests {
    @Test func boundedAppendDropsNewest() {
        var q = ByteQueue(capacity: 4)
        let dropped = [1, 2, 3, 4, 5, 6].map(UInt8.init).withUnsafeBytes { q.append($0) }
        #expect(dropped == 2)
        #expect(q.removeFirst(upTo: 10) == [1, 2, 3, 4])
        #expect(q.isEmpty)
    }

    @Test func overwritingKeepsNewest() {
        var q = ByteQueue(capacity: 4)
        _ = [1, 2, 3].map(UInt8.init).withUnsafeBytes { q.appendOverwriting($0) }
        let lost = [4, 5, 6].map(UInt8.init).withUnsafeBytes { q.appendOverwriting($0) }
        #expect(lost == 2)
        #expect(q.removeFirst(upTo: 10) == [3, 4, 5, 6])
        let lost2 = Array(0..<10).map(UInt8.init).withUnsafeBytes { q.appendOverwriting($0) }
        #expect(lost2 == 6)
        #expect(q.removeFirst(upTo: 10) == [6, 7, 8, 9])
    }

    @Test func contiguousRunsFollowWrapAround() {
        var q = ByteQueue(capacity: 4)
        _ = [1, 2, 3].map(UInt8.init).withUnsafeBytes { q.append($0) }
        q.drop(2)
        _ = [4, 5, 6].map(UInt8.init).withUnsafeBytes { q.append($0) }  // storage: 5 6 3 4
        var seen = [UInt8]()
        q.consumeContiguous { run in seen += run; return 1 }  // takes only "3"
        #expect(seen == [3, 4])
        #expect(q.removeFirst(upTo: 10) == [4, 5, 6])
    }
}

@Suite struct EscapeDecoderTests {
    func run(_ bytes: [UInt8]) -> [EscapeDecoder.Action] {
        var d = EscapeDecoder()
        return bytes.map { d.feed($0) }
    }

    @Test func plainBytesPassThrough() {
        #expect(run([0x61, 0x03, 0x0d]) == [.forward(0x61), .forward(0x03), .forward(0x0d)])
    }

    @Test func escapeCommands() {
        #expect(run([0x01, UInt8(ascii: "x")]) == [.nothing, .quit])
        #expect(run([0x01, UInt8(ascii: "h")]) == [.nothing, .help])
        #expect(run([0x01, 0x01, 0x01, 0x01]) == [.nothing, .forward(0x01), .nothing, .forward(0x01)])
        #expect(run([0x01, UInt8(ascii: "z"), UInt8(ascii: "x")]) == [.nothing, .nothing, .forward(UInt8(ascii: "x"))])
    }
}

// MARK: - Backends

@Suite struct ChardevBackendTests {
    @Test func ringbufKeepsNewestAndInjectsInput() {
        let rb = RingbufChardev(id: "rb", size: 8)
        rb.write("0123456789")
        #expect(rb.count == 8)
        #expect(rb.overwrittenBytes == 2)
        #expect(rb.read(maxBytes: 3) == Array("234".utf8))
        #expect(rb.read() == Array("56789".utf8))
        #expect(rb.read().isEmpty)
        #expect(throws: RingbufChardev.InjectError.noReceiver) { try rb.inject([1]) }
        let sink = ByteSink()
        rb.setReceiver(sink.receiver)
        #expect(throws: Never.self) { try rb.inject(Array("hi".utf8)) }
        #expect(sink.value == Array("hi".utf8))
    }

    /// ringbuf-write's input reaches the guest as fast as the UART takes it, none dropped, and
    /// a write that does not fit beside what waits is refused whole.
    @Test func ringbufInputWaitsForTheGuestAndIsNeverDropped() throws {
        let rb = RingbufChardev(id: "serial0")
        let uart = Uart16550(irq: IgnoredLine(), backend: rb, inputCapacity: 4096)
        let payload = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ $0 >> 9) }
        try rb.inject(payload)
        #expect(uart.pendingInputBytes == 4096)
        #expect(rb.pendingInputBytes == payload.count - 4096)
        let tooMuch = [UInt8](repeating: 0x41, count: RingbufChardev.inputLimit - rb.pendingInputBytes + 1)
        #expect(throws: RingbufChardev.InjectError.inputQueueFull(bytes: tooMuch.count, waiting: rb.pendingInputBytes)) {
            try rb.inject(tooMuch)
        }
        #expect(rb.pendingInputBytes == payload.count - 4096, "a refused write queued nothing")
        var received: [UInt8] = []
        while uart.read(offset: 5, size: 1) & 1 != 0 {  // LSR.DR
            received.append(UInt8(uart.read(offset: 0, size: 1)))  // RBR
        }
        #expect(uart.droppedInputBytes == 0)
        #expect(received.count == payload.count)
        let intact = received == payload  // (not inside #expect: it would print the arrays)
        #expect(intact, "input arrived out of order or corrupted")
    }

    @Test func fileTruncatesOrAppends() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/out.log"
        try Data("old".utf8).write(to: URL(fileURLWithPath: path))
        let f = try FileChardev(id: "f", path: path, append: false)
        f.write("new")
        f.close()
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "new")
        let g = try #require(try ChardevSpec(parsing: "file:\(path),append=on").makeBackend(id: "g"))
        g.write("+more")
        g.close()
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "new+more")
        #expect(throws: ChardevError.self) { try FileChardev(id: "h", path: dir + "/no/such/dir/x", append: false) }
    }

    @Test func unixSocketServesOneClientAtATime() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/serial.sock"
        let backend = try SocketChardev(id: "serial0", unixPath: path)
        let sink = ByteSink()
        backend.setReceiver(sink.receiver)
        #expect(!backend.isConnected)
        #expect(backend.filename == "disconnected:unix:\(path),server=on")
        backend.write("lost")  // nobody listening: dropped
        #expect(backend.droppedBytes == 4)

        let client = try TestClient(unixPath: path)
        #expect(eventually { backend.isConnected })
        backend.write("hello")
        #expect(client.receive(count: 5) == Array("hello".utf8))
        client.send("typed")
        #expect(eventually { sink.value == Array("typed".utf8) })

        let second = try TestClient(unixPath: path)
        #expect(second.seesEOF(), "a second client must be turned away")
        backend.write("!")
        #expect(client.receive(count: 1) == Array("!".utf8), "the first client keeps the line")

        Glibc.shutdown(client.fd, Int32(SHUT_RDWR))
        #expect(eventually { !backend.isConnected })
        let third = try TestClient(unixPath: path)
        #expect(eventually { backend.isConnected })
        backend.write("again")
        #expect(third.receive(count: 5) == Array("again".utf8))

        backend.close()
        #expect(third.seesEOF())
        #expect(!FileManager.default.fileExists(atPath: path), "close removes the socket file")
    }

    @Test func unixSocketReplacesStaleSocketButNotFiles() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/s"
        // A crashed server leaves its socket file behind; a new server must take over the path.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        Glibc.close(fd)
        #expect(rc == 0 && FileManager.default.fileExists(atPath: path))
        let b = try SocketChardev(id: "b", unixPath: path)
        let client = try TestClient(unixPath: path)
        #expect(eventually { b.isConnected })
        _ = client
        b.close()
        let plain = dir + "/plain"
        try Data("x".utf8).write(to: URL(fileURLWithPath: plain))
        #expect(throws: ChardevError.notASocket(path: plain)) { try SocketChardev(id: "c", unixPath: plain) }
        let long = dir + "/" + String(repeating: "n", count: 120)
        #expect(throws: ChardevError.self) { try SocketChardev(id: "d", unixPath: long) }
    }

    @Test func tcpOnLoopbackEphemeralPort() throws {
        let backend = try #require(try ChardevSpec(parsing: "tcp:127.0.0.1:0").makeBackend(id: "serial0") as? SocketChardev)
        defer { backend.close() }
        let port = try #require(backend.port)
        #expect(port != 0)
        #expect(backend.listenAddress == "127.0.0.1:\(port)")
        let sink = ByteSink()
        backend.setReceiver(sink.receiver)
        let client = try TestClient(tcpPort: port)
        #expect(eventually { backend.isConnected })
        #expect(backend.filename.hasPrefix("tcp:127.0.0.1:\(port),server=on <-> 127.0.0.1:"))
        backend.write("login: ")
        #expect(client.receive(count: 7) == Array("login: ".utf8))
        client.send("root\r")
        #expect(eventually { sink.value == Array("root\r".utf8) })
    }

    @Test func tcpListensOnlyOnTheGivenAddress() throws {
        let backend = try SocketChardev(id: "s", host: "127.0.0.2", port: 0)
        defer { backend.close() }
        let port = try #require(backend.port)
        #expect(throws: ChardevError.self) { try TestClient(tcpPort: port) }  // 127.0.0.1 is refused
    }

    @Test func slowClientNeverBlocksTheWriter() throws {
        let backend = try SocketChardev(id: "s", host: "127.0.0.1", port: 0)
        defer { backend.close() }
        let client = try TestClient(tcpPort: try #require(backend.port))
        #expect(eventually { backend.isConnected })
        let chunk = [UInt8](repeating: 0x41, count: 64 * 1024)
        let start = Date()
        for _ in 0..<256 { chunk.withUnsafeBytes { backend.write($0) } }  // 16 MiB, client reads nothing
        #expect(Date().timeIntervalSince(start) < 2, "writes must not wait for the peer")
        #expect(backend.droppedBytes > 0, "what the peer cannot take is dropped, not queued forever")
        // What was queued still arrives, in order, once the client reads.
        let got = client.receive(count: 1024)
        #expect(got.count == 1024 && got.allSatisfy { $0 == 0x41 })
        _ = client
    }

    @Test func stdioOnPipesPassesBytesThrough() throws {
        var inPipe: [Int32] = [-1, -1]
        var outPipe: [Int32] = [-1, -1]
        #expect(pipe(&inPipe) == 0 && pipe(&outPipe) == 0)
        defer { for fd in inPipe + outPipe { Glibc.close(fd) } }
        let backend = try StdioChardev(id: "serial0", inputFD: inPipe[0], outputFD: outPipe[1], onQuitRequest: {})
        #expect(!backend.isInteractive)
        let sink = ByteSink()
        backend.setReceiver(sink.receiver)
        _ = Glibc.write(inPipe[1], "a\u{01}x", 3)  // no escapes when not a terminal
        #expect(eventually { sink.value == [0x61, 0x01, 0x78] })
        backend.write("out")
        backend.close()  // flushes queued output
        var buf = [UInt8](repeating: 0, count: 16)
        let n = Glibc.read(outPipe[0], &buf, 16)
        #expect(n == 3 && Array(buf[0..<3]) == Array("out".utf8))
    }

    @Test func stdioOnATerminalIsRawHandlesEscapesAndRestores() throws {
        let master = open("/dev/ptmx", O_RDWR | O_NOCTTY)
        #expect(master >= 0)
        defer { Glibc.close(master) }
        var unlock: Int32 = 0
        var number: UInt32 = 0
        #expect(ioctl(master, UInt(0x4004_5431) /* TIOCSPTLCK */, &unlock) == 0)
        #expect(ioctl(master, UInt(0x8004_5430) /* TIOCGPTN */, &number) == 0)
        let slave = open("/dev/pts/\(number)", O_RDWR | O_NOCTTY)
        #expect(slave >= 0)
        defer { Glibc.close(slave) }
        var before = termios()
        tcgetattr(slave, &before)
        #expect(before.c_lflag & tcflag_t(ICANON) != 0)

        let quits = Atomic<Int>(0)
        let backend = try StdioChardev(id: "serial0", inputFD: slave, outputFD: slave, onQuitRequest: {
            quits.add(1, ordering: .sequentiallyConsistent)
        })
        #expect(backend.isInteractive)
        var raw = termios()
        tcgetattr(slave, &raw)
        #expect(raw.c_lflag & tcflag_t(ICANON | ECHO | ISIG) == 0, "raw mode: no line editing, echo or signals")

        let sink = ByteSink()
        backend.setReceiver(sink.receiver)
        let typed: [UInt8] = [0x03, 0x01, 0x01, 0x01, UInt8(ascii: "h"), 0x01, UInt8(ascii: "x")]
        _ = typed.withUnsafeBytes { Glibc.write(master, $0.baseAddress, $0.count) }
        #expect(eventually { quits.load(ordering: .sequentiallyConsistent) == 1 })
        #expect(sink.value == [0x03, 0x01], "Ctrl-C reaches the guest; Ctrl-A Ctrl-A sends one Ctrl-A")
        backend.close()
        var help = [UInt8](repeating: 0, count: 4096)
        var pfd = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
        var text = ""
        while poll(&pfd, 1, 200) > 0 {
            let n = Glibc.read(master, &help, help.count)
            if n <= 0 { break }
            text += String(decoding: help[0..<n], as: UTF8.self)
        }
        #expect(text.contains("C-a x"), "Ctrl-A h prints the escape help")
        var after = termios()
        tcgetattr(slave, &after)
        #expect(after.c_lflag == before.c_lflag && after.c_iflag == before.c_iflag, "close restores the terminal")
    }
}

// MARK: - pty

@Suite struct PtyChardevTests {
    /// Opens the slave as a terminal program would.
    func openSlave(_ pty: PtyChardev) throws -> Int32 {
        let fd = open(pty.slavePath, O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard fd >= 0 else { throw ChardevError.system(what: "open \(pty.slavePath)", errno: errno) }
        return fd
    }

    func readAvailable(_ fd: Int32, until want: Int, timeout: Int32 = 5000) -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while out.count < want, poll(&pfd, 1, timeout) > 0 {
            let n = Glibc.read(fd, &buf, buf.count)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return out
    }

    @Test func specAndFilename() throws {
        #expect(try ChardevSpec(parsing: "pty") == .pty)
        #expect(ChardevSpec.pty.description == "pty")
        let announced = Mutex<[String]>([])
        let pty = try PtyChardev(id: "charserial0") { line in announced.withLock { $0.append(line) } }
        defer { pty.close() }
        #expect(pty.slavePath.hasPrefix("/dev/pts/"))
        #expect(pty.filename == "pty:" + pty.slavePath)
        #expect(announced.withLock { $0 } == ["char device redirected to \(pty.slavePath) (label charserial0)"])
    }

    @Test func outputIsDroppedUntilATerminalOpensThenPassesRawBothWays() throws {
        let pty = try PtyChardev(id: "serial0", announce: { _ in })
        defer { pty.close() }
        let sink = ByteSink()
        pty.setReceiver(sink.receiver)
        #expect(!pty.isConnected)
        Array("lost\n".utf8).withUnsafeBytes { pty.write($0) }
        #expect(pty.droppedBytes == 5, "nobody has the slave open: output is dropped, not buffered in the terminal")

        let slave = try openSlave(pty)
        #expect(eventually { pty.isConnected })
        // Raw mode: "\n" stays "\n" (no CR added) and nothing is echoed back to the guest.
        let line = Array("guest says hi\n".utf8)
        line.withUnsafeBytes { pty.write($0) }
        #expect(readAvailable(slave, until: line.count) == line)
        let typed = Array("ls\r".utf8)
        _ = typed.withUnsafeBytes { Glibc.write(slave, $0.baseAddress, $0.count) }
        #expect(eventually { sink.value == typed }, "keystrokes reach the guest unchanged")
        usleep(100_000)
        #expect(sink.value == typed, "guest output is not echoed back as input")

        // The terminal program quits: the pty goes back to dropping output.
        Glibc.close(slave)
        #expect(eventually { !pty.isConnected })
        let before = pty.droppedBytes
        Array("gone".utf8).withUnsafeBytes { pty.write($0) }
        #expect(pty.droppedBytes == before + 4)
        // And reconnects.
        let again = try openSlave(pty)
        defer { Glibc.close(again) }
        #expect(eventually { pty.isConnected })
        Array("back".utf8).withUnsafeBytes { pty.write($0) }
        #expect(readAvailable(again, until: 4) == Array("back".utf8))
    }

    @Test func inputWaitsInTheTerminalWhileTheGuestHasNoRoom() throws {
        let pty = try PtyChardev(id: "serial0", announce: { _ in })
        defer { pty.close() }
        let uart = Uart16550(irq: IgnoredLine(), backend: pty, inputCapacity: 64)
        let slave = try openSlave(pty)
        defer { Glibc.close(slave) }
        #expect(eventually { pty.isConnected })
        let payload = (0..<1000).map { UInt8(ascii: "a") + UInt8($0 % 26) }
        _ = payload.withUnsafeBytes { Glibc.write(slave, $0.baseAddress, $0.count) }
        #expect(eventually { uart.pendingInputBytes == 64 })
        usleep(100_000)
        #expect(uart.pendingInputBytes == 64 && uart.droppedInputBytes == 0, "the rest waits in the terminal")
        var received: [UInt8] = []
        #expect(eventually(10) {
            while uart.read(offset: 5, size: 1) & 1 != 0 { received.append(UInt8(uart.read(offset: 0, size: 1))) }
            return received.count == payload.count
        })
        #expect(received == payload && uart.droppedInputBytes == 0)
    }
}
