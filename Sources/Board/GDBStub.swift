import Foundation
import Machine
import Synchronization
import Translator

#if canImport(Glibc)
import Glibc
#endif

/// A GDB remote-serial-protocol server for the machine's harts (QEMU's `-gdb`): one debugger
/// at a time over TCP; each hart is a thread; registers (x, pc, f, CSRs and the privilege level,
/// described by a target XML), memory through the selected hart's current translation,
/// software and hardware breakpoints, watchpoints, single-step, Ctrl-C, detach and kill.
///
/// Threading: the accept loop and each session run on the server's own thread; the machine is
/// driven through `VirtualMachine.debugStop`/`debugResume` (its control queue) and harts are
/// touched only while stopped. Harts report debug stops through a pipe the session polls.
public final class GDBServer: @unchecked Sendable {  // unchecked: session state is touched on the server thread only; harts only while stopped
    let machine: VirtualMachine
    let harts: [Hart]
    private let listenFD: Int32
    /// The TCP port listened on (the one asked for, or the kernel's choice for 0).
    public let port: Int
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private let stopping = Mutex(false)
    /// The connected debugger's socket, if any (for the exit report).
    private let session = Mutex<Int32?>(nil)

    /// Binds `host:port` (numeric IPv4 or `localhost`). Throws `GDBError` naming the address.
    public init(machine: VirtualMachine, harts: [Hart], host: String, port: Int) throws(GDBError) {
        self.machine = machine
        self.harts = harts
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw GDBError("gdb: cannot create a socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(truncatingIfNeeded: port).bigEndian)
        let h = host == "localhost" || host.isEmpty ? "127.0.0.1" : host
        guard inet_pton(AF_INET, h, &addr.sin_addr) == 1 else {
            close(fd)
            throw GDBError("gdb: '\(host)' is not a numeric IPv4 address or localhost")
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 1) == 0 else {
            let e = String(cString: strerror(errno))
            close(fd)
            throw GDBError("gdb: cannot listen on \(host):\(port): \(e)")
        }
        var actual = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &actual) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        listenFD = fd
        self.port = Int(UInt16(bigEndian: actual.sin_port))
        var fds: [Int32] = [0, 0]
        pipe(&fds)
        wakeRead = fds[0]
        wakeWrite = fds[1]
        _ = fcntl(wakeRead, F_SETFL, O_NONBLOCK)
        _ = fcntl(wakeWrite, F_SETFL, O_NONBLOCK)
    }

    /// Starts accepting debuggers on a thread of its own.
    public func start() {
        let t = Thread { [self] in acceptLoop() }
        t.name = "gdb server"
        t.start()
    }

    /// Stops accepting (a session in progress ends when its debugger disconnects).
    public func stop() {
        stopping.withLock { $0 = true }
        shutdown(listenFD, Int32(SHUT_RDWR))
        wake()
    }

    private func wake() {
        var b: UInt8 = 1
        _ = write(wakeWrite, &b, 1)
    }

    private func acceptLoop() {
        while !stopping.withLock({ $0 }) {
            let c = accept(listenFD, nil, nil)
            if c < 0 {
                if errno == EINTR { continue }
                break
            }
            var one: Int32 = 1
            setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            session.withLock { $0 = c }
            var s = GDBSession(server: self, fd: c)
            s.run()
            session.withLock { $0 = nil }
            close(c)
        }
        close(listenFD)
    }

    /// Tells a connected debugger that the machine ended (`W` with the exit code, as for a
    /// process that exited) and stops accepting. Any thread, once the machine has shut down.
    public func machineExited(code: Int32) {
        session.withLock { fd in
            guard let fd else { return }
            let packet = GDBPacketParser.frame(Array("W\(GDBSession.hex2(UInt8(truncatingIfNeeded: code)))".utf8))
            _ = packet.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            shutdown(fd, Int32(SHUT_RDWR))
        }
        stop()
    }

    /// Called on a vCPU thread when a hart stops for the debugger.
    func hartStopped(_ hart: Int) { wake() }

    /// Drains the wake-up pipe; returns whether anything was in it.
    func drainWake() -> Bool {
        var buf = [UInt8](repeating: 0, count: 64)
        var any = false
        while read(wakeRead, &buf, buf.count) > 0 { any = true }
        return any
    }

    var wakeFD: Int32 { wakeRead }

    /// The target description for GDB (registers and their numbers).
    func targetXML() -> String {
        let ext = harts.first?.extensions ?? .all
        var s = """
        <?xml version="1.0"?>
        <!DOCTYPE target SYSTEM "gdb-target.dtd">
        <target version="1.0">
        <architecture>riscv:rv64</architecture>
        <feature name="org.gnu.gdb.riscv.cpu">

        """
        let xNames = ["zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "fp", "s1", "a0", "a1", "a2", "a3", "a4", "a5",
                      "a6", "a7", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11", "t3", "t4", "t5", "t6"]
        for (i, n) in xNames.enumerated() {
            let type = n == "sp" || n == "gp" || n == "tp" || n == "fp" ? "data_ptr" : "int"
            s += "  <reg name=\"\(n)\" bitsize=\"64\" type=\"\(type)\" regnum=\"\(i)\"/>\n"
        }
        s += "  <reg name=\"pc\" bitsize=\"64\" type=\"code_ptr\" regnum=\"32\"/>\n</feature>\n"
        s += "<feature name=\"org.gnu.gdb.riscv.fpu\">\n"
        s += "  <union id=\"riscv_double\"><field name=\"float\" type=\"ieee_single\"/><field name=\"double\" type=\"ieee_double\"/></union>\n"
        let fNames = ["ft0", "ft1", "ft2", "ft3", "ft4", "ft5", "ft6", "ft7", "fs0", "fs1", "fa0", "fa1", "fa2", "fa3", "fa4", "fa5",
                      "fa6", "fa7", "fs2", "fs3", "fs4", "fs5", "fs6", "fs7", "fs8", "fs9", "fs10", "fs11", "ft8", "ft9", "ft10", "ft11"]
        for (i, n) in fNames.enumerated() {
            s += "  <reg name=\"\(n)\" bitsize=\"64\" type=\"riscv_double\" regnum=\"\(33 + i)\"/>\n"
        }
        s += "  <reg name=\"fflags\" bitsize=\"32\" type=\"int\" regnum=\"66\" group=\"float\"/>\n"
        s += "  <reg name=\"frm\" bitsize=\"32\" type=\"int\" regnum=\"67\" group=\"float\"/>\n"
        s += "  <reg name=\"fcsr\" bitsize=\"32\" type=\"int\" regnum=\"68\" group=\"float\"/>\n</feature>\n"
        s += "<feature name=\"org.gnu.gdb.riscv.csr\">\n"
        for (n, csr) in Self.csrs where n != "stimecmp" || ext.contains(.sstc) {
            s += "  <reg name=\"\(n)\" bitsize=\"64\" type=\"int\" regnum=\"\(Self.csrBase + csr)\" group=\"system\"/>\n"
        }
        s += "</feature>\n<feature name=\"org.gnu.gdb.riscv.virtual\">\n"
        s += "  <reg name=\"priv\" bitsize=\"64\" type=\"int\" regnum=\"\(Self.privRegister)\" group=\"system\"/>\n"
        s += "</feature>\n</target>\n"
        return s
    }

    /// GDB's RISC-V register numbers: CSR n is 65 + n, the privilege level 65 + 4096.
    static let csrBase = 65
    static let privRegister = 65 + 4096
    static let csrs: [(String, Int)] = [
        ("sstatus", 0x100), ("sie", 0x104), ("stvec", 0x105), ("scounteren", 0x106), ("senvcfg", 0x10a),
        ("sscratch", 0x140), ("sepc", 0x141), ("scause", 0x142), ("stval", 0x143), ("sip", 0x144),
        ("stimecmp", 0x14d), ("satp", 0x180),
        ("mstatus", 0x300), ("misa", 0x301), ("medeleg", 0x302), ("mideleg", 0x303), ("mie", 0x304),
        ("mtvec", 0x305), ("mcounteren", 0x306), ("menvcfg", 0x30a), ("mscratch", 0x340), ("mepc", 0x341),
        ("mcause", 0x342), ("mtval", 0x343), ("mip", 0x344), ("mcycle", 0xb00), ("minstret", 0xb02),
        ("cycle", 0xc00), ("time", 0xc01), ("instret", 0xc02), ("mhartid", 0xf14),
    ]
}

/// Why the GDB server could not start.
public struct GDBError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One debugger connection: packets in, replies out, the machine stopped except while the
/// debugger has it running.
struct GDBSession {
    let server: GDBServer
    let fd: Int32
    var parser = GDBPacketParser()
    var noAck = false
    /// Harts selected by Hg (registers, memory) and Hc (step/continue), 0-based.
    var current = 0
    /// Whether the machine runs for the debugger (a stop must be reported).
    var running = false
    var breakpoints: Set<UInt64> = []
    var watchpoints: [Watchpoint] = []
    var open = true
    /// Set by `k`/`vKill`: the machine is ending, nothing is resumed.
    var killed = false

    init(server: GDBServer, fd: Int32) {
        self.server = server
        self.fd = fd
    }

    var harts: [Hart] { server.harts }
    var machine: VirtualMachine { server.machine }

    mutating func run() {
        // Attach once the machine has started (its harts are reset then): it stops (a machine
        // started paused stays so).
        while !machine.hasStarted && machine.isLiveForDebugger { usleep(10_000) }
        for h in harts { h.debugStopHandler = { [server] id in server.hartStopped(id) } }
        machine.debugStop()
        _ = server.drainWake()
        var buf = [UInt8](repeating: 0, count: 8192)
        while open {
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: server.wakeFD, events: Int16(POLLIN), revents: 0)]
            let n = poll(&fds, 2, 1000)
            if n < 0 { if errno == EINTR { continue } else { break } }
            if fds[1].revents != 0 {
                _ = server.drainWake()
                if running, let stop = collectStop() { send(stop) }
            }
            if fds[0].revents != 0 {
                let got = read(fd, &buf, buf.count)
                if got <= 0 { break }
                for e in parser.feed(buf[0..<got]) where open { handle(e) }
            }
            if !machine.isLiveForDebugger { break }
        }
        // The debugger went away: clear what it asked for; a machine it stopped resumes (one
        // that was paused or not yet started stays so, as with QEMU).
        for h in harts { h.debugStopHandler = nil }
        if !killed && machine.isLiveForDebugger {
            machine.debugStop()
            if machine.isStoppedForDebugger {
                for h in harts { h.setDebugRequest(DebugRequest()) }
            }
            if machine.runState == .debug { machine.debugResume() }
        }
    }

    /// After a hart reported a stop: stops the machine and builds the stop reply.
    mutating func collectStop() -> String? {
        machine.debugStop()
        guard let (i, stop) = harts.enumerated().compactMap({ h in h.element.lastDebugStop.map { (h.offset, $0) } }).first else {
            return nil
        }
        running = false
        current = i
        return stopReply(hart: i, stop)
    }

    func stopReply(hart: Int, _ stop: DebugStop?) -> String {
        let thread = "thread:\(String(hart + 1, radix: 16));"
        switch stop {
        case .watchpoint(let kind, let address)?:
            let name = kind == .write ? "watch" : kind == .read ? "rwatch" : "awatch"
            return "T05\(name):\(String(address, radix: 16));\(thread)"
        case .breakpoint?: return "T05swbreak:;\(thread)"
        default: return "T05\(thread)"
        }
    }

    mutating func handle(_ e: GDBEvent) {
        switch e {
        case .ack, .nack: break
        case .bad:
            if !noAck { writeAll([UInt8(ascii: "-")]) }
        case .interrupt:
            if running {
                machine.debugStop()
                running = false
                _ = server.drainWake()
                send("T02thread:\(String(current + 1, radix: 16));")
            }
        case .packet(let p):
            if !noAck { writeAll([UInt8(ascii: "+")]) }
            if let reply = respond(String(decoding: p, as: UTF8.self)) { send(reply) }
        }
    }

    mutating func send(_ s: String) { writeAll(GDBPacketParser.frame(Array(s.utf8))) }

    /// Writes `bytes` (MSG_NOSIGNAL: a debugger that left is an error here, not a SIGPIPE for
    /// the whole process). A failed write ends the session: the packets still buffered from a
    /// debugger that is gone are not answered.
    mutating func writeAll(_ bytes: [UInt8]) {
        var off = 0
        while open && off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 {
                if n < 0 && errno == EINTR { continue }
                open = false
                return
            }
            off += n
        }
    }

    /// The reply to one packet, or nil when the reply comes later (resume) or never.
    mutating func respond(_ p: String) -> String? {
        guard let c = p.first else { return "" }
        if running && c != "?" { return "E01" }  // only a stop may follow a resume
        let rest = String(p.dropFirst())
        switch c {
        case "?":
            return stopReply(hart: current, harts[current].lastDebugStop)
        case "q", "Q": return query(p)
        case "H":
            guard rest.count >= 1, let t = threadID(String(rest.dropFirst())) else { return "E01" }
            if let t { current = t }
            return "OK"
        case "T":
            guard let t = threadID(rest), t != nil else { return "E01" }
            return "OK"
        case "g":
            return (0...32).map { hex64(harts[current].debugRegister($0) ?? 0) }.joined()
        case "G":
            let bytes = Self.unhex(rest)
            guard let bytes, bytes.count >= 33 * 8 else { return "E01" }
            for r in 0...32 {
                let v = bytes[(r * 8)..<(r * 8 + 8)].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << UInt64(8 * $1.offset) }
                _ = harts[current].setDebugRegister(r, v)
            }
            return "OK"
        case "p":
            guard let n = Int(rest, radix: 16), let v = readRegister(n) else { return "E01" }
            return v
        case "P":
            let parts = rest.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, let n = Int(parts[0], radix: 16), let bytes = Self.unhex(String(parts[1])),
                  bytes.count <= 8 else { return "E01" }
            let v = bytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << UInt64(8 * $1.offset) }
            return writeRegister(n, v) ? "OK" : "E01"
        case "m":
            guard let (addr, len) = Self.addressLength(rest), len <= 0x2000 else { return "E01" }
            guard let bytes = harts[current].debugRead(addr, length: len) else { return "E14" }
            return bytes.map { Self.hex2($0) }.joined()
        case "M":
            let parts = rest.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, let (addr, len) = Self.addressLength(String(parts[0])),
                  let bytes = Self.unhex(String(parts[1])), bytes.count == len else { return "E01" }
            return harts[current].debugWrite(addr, bytes: bytes) ? "OK" : "E14"
        case "Z", "z":
            return breakpoint(insert: c == "Z", rest)
        case "c", "C":
            resume(step: nil)
            return nil
        case "s", "S":
            resume(step: current)
            return nil
        case "v":
            return vPacket(p)
        case "D":
            breakpoints = []
            watchpoints = []
            send("OK")
            open = false
            return nil
        case "k":
            open = false
            killed = true
            machine.quit()
            return nil
        default:
            return ""
        }
    }

    mutating func query(_ p: String) -> String? {
        if p.hasPrefix("qSupported") {
            return "PacketSize=\(String(GDBPacketParser.maxPayload, radix: 16));qXfer:features:read+;swbreak+;hwbreak+;vContSupported+;QStartNoAckMode+"
        }
        if p == "QStartNoAckMode" {
            send("OK")
            noAck = true
            return nil
        }
        if p.hasPrefix("qXfer:features:read:target.xml:") {
            let range = p.dropFirst("qXfer:features:read:target.xml:".count)
            guard let (off, len) = Self.addressLength(String(range)) else { return "E01" }
            let xml = Array(server.targetXML().utf8)
            let start = Int(min(off, UInt64(xml.count)))
            let end = start + min(len, xml.count - start)
            return (end == xml.count ? "l" : "m") + String(decoding: xml[start..<end], as: UTF8.self)
        }
        if p.hasPrefix("qXfer:") { return "E00" }
        if p == "qfThreadInfo" { return "m" + harts.indices.map { String($0 + 1, radix: 16) }.joined(separator: ",") }
        if p == "qsThreadInfo" { return "l" }
        if p == "qC" { return "QC" + String(current + 1, radix: 16) }
        if p.hasPrefix("qAttached") { return "1" }
        if p.hasPrefix("qThreadExtraInfo,") {
            guard let t = threadID(String(p.dropFirst("qThreadExtraInfo,".count))), let t else { return "E01" }
            return Array("hart \(t)".utf8).map { Self.hex2($0) }.joined()
        }
        return ""
    }

    mutating func vPacket(_ p: String) -> String? {
        if p == "vCont?" { return "vCont;c;C;s;S" }
        if p.hasPrefix("vKill") {
            send("OK")
            open = false
            killed = true
            machine.quit()
            return nil
        }
        if p.hasPrefix("vCont;") {
            // The first action naming a step decides; anything else continues every hart.
            var step: Int? = nil
            for action in p.dropFirst("vCont;".count).split(separator: ";") {
                let parts = action.split(separator: ":", maxSplits: 1)
                guard let kind = parts.first?.first else { continue }
                if kind == "s" || kind == "S" {
                    if parts.count == 2, let t = threadID(String(parts[1])) { step = t ?? current } else { step = current }
                    break
                }
            }
            resume(step: step)
            return nil
        }
        return ""
    }

    /// `Z`/`z` type,addr,kind: 0 software and 1 hardware breakpoints, 2 write, 3 read and
    /// 4 access watchpoints.
    mutating func breakpoint(insert: Bool, _ rest: String) -> String {
        let f = rest.split(separator: ",").map(String.init)
        guard f.count >= 3, let type = Int(f[0]), let addr = UInt64(f[1], radix: 16),
              let kind = UInt64(f[2].split(separator: ";").first ?? "", radix: 16) else { return "E01" }
        switch type {
        case 0, 1:
            if insert { breakpoints.insert(addr) } else { breakpoints.remove(addr) }
        case 2, 3, 4:
            guard kind > 0 && kind <= 4096 else { return "E01" }
            let w = Watchpoint(address: addr, length: kind, kind: type == 2 ? .write : type == 3 ? .read : .access)
            if insert { watchpoints.append(w) } else if let i = watchpoints.firstIndex(of: w) { watchpoints.remove(at: i) }
        default:
            return ""
        }
        return "OK"
    }

    /// Gives every hart the breakpoints and watchpoints, `step` a single step, and resumes
    /// (only the stepping hart when stepping).
    mutating func resume(step: Int?) {
        var request = DebugRequest()
        request.breakpoints = breakpoints
        request.watchpoints = watchpoints
        for (i, h) in harts.enumerated() {
            var r = request
            r.singleStep = i == step
            h.setDebugRequest(r)
        }
        _ = server.drainWake()
        running = machine.debugResume(onlyHart: step)
        if !running { send("X09") ; open = false }
    }

    func readRegister(_ n: Int) -> String? {
        let h = harts[current]
        switch n {
        case 0...64: return h.debugRegister(n).map(hex64)
        case 66...68: return h.debugReadCSR(n - GDBServer.csrBase).map { hex32(UInt32(truncatingIfNeeded: $0)) }
        case GDBServer.privRegister: return hex64(h.debugPrivilege)
        case GDBServer.csrBase..<(GDBServer.csrBase + 4096): return h.debugReadCSR(n - GDBServer.csrBase).map(hex64)
        default: return nil
        }
    }

    func writeRegister(_ n: Int, _ v: UInt64) -> Bool {
        let h = harts[current]
        switch n {
        case 0...64: return h.setDebugRegister(n, v)
        case GDBServer.privRegister: return h.setDebugPrivilege(v)
        case GDBServer.csrBase..<(GDBServer.csrBase + 4096): return h.debugWriteCSR(n - GDBServer.csrBase, v)
        default: return false
        }
    }

    /// A thread id: nil inside for "any"/"all" (0, -1), else the 0-based hart; nil outside
    /// when malformed or no such hart.
    func threadID(_ s: String) -> Int?? {
        if s == "0" || s == "-1" { return .some(nil) }
        guard let t = Int(s, radix: 16), t >= 1, t <= harts.count else { return nil }
        return .some(t - 1)
    }

    static func addressLength(_ s: String) -> (UInt64, Int)? {
        let f = s.split(separator: ",")
        guard f.count == 2, let a = UInt64(f[0], radix: 16), let l = Int(f[1], radix: 16), l >= 0 else { return nil }
        return (a, l)
    }

    static func hex2(_ b: UInt8) -> String {
        let h = Array("0123456789abcdef")
        return String([h[Int(b >> 4)], h[Int(b & 15)]])
    }

    static func unhex(_ s: String) -> [UInt8]? {
        let b = Array(s.utf8)
        guard b.count % 2 == 0 else { return nil }
        var out = [UInt8]()
        out.reserveCapacity(b.count / 2)
        var i = 0
        while i < b.count {
            guard let hi = GDBPacketParser.hexValue(b[i]), let lo = GDBPacketParser.hexValue(b[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}

private func hex64(_ v: UInt64) -> String {
    (0..<8).map { GDBSession.hex2(UInt8(truncatingIfNeeded: v >> UInt64(8 * $0))) }.joined()
}

private func hex32(_ v: UInt32) -> String {
    (0..<4).map { GDBSession.hex2(UInt8(truncatingIfNeeded: v >> UInt32(8 * $0))) }.joined()
}

extension VirtualMachine {
    /// Whether the machine has not shut down (for the GDB session).
    var isLiveForDebugger: Bool { isLive }
}
