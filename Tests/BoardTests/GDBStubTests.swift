import Foundation
import FuzzSupport
import Machine
import Testing
@testable import Board
import Translator

/// The GDB remote protocol: the packet framing in memory, and the stub fuzzed over a socket
/// against a real machine (one hart spinning in M-mode).
@Suite(.serialized) struct GDBStubTests {
    @Test func framingRoundTripsAndEscapes() {
        var p = GDBPacketParser()
        let payload = Array("m8000,4$#}*".utf8)
        let framed = GDBPacketParser.frame(payload)
        #expect(!framed.dropFirst().dropLast(3).contains(UInt8(ascii: "#")))
        #expect(p.feed(framed) == [.packet(payload)])
        #expect(p.feed(Array("+-".utf8) + [0x03]) == [.ack, .nack, .interrupt])
        // checksum of "g" is 0x67
        #expect(p.feed(Array("$g#67".utf8)) == [.packet(Array("g".utf8))])
        #expect(p.feed(Array("$g#68".utf8)) == [.bad])
        #expect(p.feed(Array("$g#zz".utf8)) == [.bad])
        // split across reads
        #expect(p.feed(Array("$?#".utf8)) == [])
        #expect(p.feed(Array("3f".utf8)) == [.packet(Array("?".utf8))])
        // an oversized packet is refused, not truncated
        let big = GDBPacketParser.frame([UInt8](repeating: UInt8(ascii: "a"), count: GDBPacketParser.maxPayload + 1))
        #expect(p.feed(big) == [.bad])
    }

    @Test func fuzzedBytesNeverCrashTheParser() {
        let seeds = Fuzz.corpus("gdb")
        #expect(seeds.count >= 3, "the GDB seed corpus is missing")
        let report = Fuzz.run(target: "gdb-parser", seeds: seeds + seeds.map { GDBPacketParser.frame($0) },
                              seconds: Fuzz.budget(ci: 2), maxLength: 1 << 15,
                              dictionary: ["$", "#", "}", "+", "-", "\u{3}"].map { Array($0.utf8) }) { input in
            var p = GDBPacketParser()
            for e in p.feed(input) {
                if case .packet(let payload) = e {
                    // Whatever was accepted survives framing again.
                    var q = GDBPacketParser()
                    #expect(q.feed(GDBPacketParser.frame(payload)) == [.packet(payload)])
                }
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
    }

    /// A machine of one hart looping at 0x8000_0000 (`j .`), with a GDB server on a free port.
    static func machine() throws -> (VirtualMachine, GDBServer) {
        var c = BoardConfig()
        c.memorySize = 16 << 20
        c.kernel = .bytes(name: "loop", [0x6f, 0x00, 0x00, 0x00])
        var harts: [Hart] = []
        let vm = try VirtualMachine(makeBoard: { sys in try VirtBoard(config: c, system: sys) },
                                    makeCPU: { id, ram, bus, irq, clock in
                                        let h = Hart(hartID: id, ram: ram, bus: bus, interrupts: irq, clock: clock)
                                        harts.append(h)
                                        return h
                                    })
        let server = try GDBServer(machine: vm, harts: harts, host: "127.0.0.1", port: 0)
        server.start()
        try vm.start()
        return (vm, server)
    }

    /// Sends `bytes`, then reads replies until the server has been quiet for `quiet` seconds.
    static func exchange(_ port: Int, _ bytes: [UInt8], quiet: Double = 0.05) throws -> [UInt8] {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard r == 0 else { throw GDBError("connect failed") }
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pfd, 1, Int32(quiet * 1000)) > 0 else { break }
            let n = recv(fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return out
    }

    /// Found by the gdb-stub fuzzer's hour-long run: the stub wrote replies with write(2), so a
    /// debugger that closed before reading them raised SIGPIPE, which ended the whole process
    /// (machine-server ignores SIGPIPE, but the stub must not depend on its host for that).
    @Test func aDebuggerLeavingBeforeItsRepliesDoesNotKillTheProcess() throws {
        let (vm, server) = try Self.machine()
        defer {
            server.stop()
            vm.quit()
            _ = vm.waitUntilExit()
        }
        // 64 reads of 4 KiB each (8 KiB of reply per packet), sent and abandoned at once: the
        // stub is still answering when the connection goes.
        let request = (0..<64).flatMap { _ in GDBPacketParser.frame(Array("m80000000,1000".utf8)) }
        for _ in 0..<50 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = in_port_t(UInt16(server.port).bigEndian)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            let r = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            try #require(r == 0)
            _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            close(fd)
        }
        // Still serving: a new debugger gets a stop reply (once the stub is done with the ones
        // that left; a slow sanitizer build may take a few seconds).
        var after = ""
        for _ in 0..<30 where !after.contains("$T05") {
            after = String(decoding: try Self.exchange(server.port, GDBPacketParser.frame(Array("?".utf8)), quiet: 1), as: UTF8.self)
        }
        #expect(after.contains("$T05"), "\(after)")
    }

    @Test func stubAnswersTheBasicsAndSurvivesFuzzedPackets() throws {
        let (vm, server) = try Self.machine()
        defer {
            server.stop()
            vm.quit()
            _ = vm.waitUntilExit()
        }
        // The basics: a stop reply, the loop's pc, and the target description.
        let hello = String(decoding: try Self.exchange(server.port, GDBPacketParser.frame(Array("?".utf8))
                                                        + GDBPacketParser.frame(Array("p20".utf8))
                                                        + GDBPacketParser.frame(Array("qXfer:features:read:target.xml:0,40".utf8)),
                                                       quiet: 1), as: UTF8.self)
        #expect(hello.contains("$T05thread:1;"), "\(hello)")
        #expect(hello.contains("$0000008000000000#"), "\(hello)")
        #expect(hello.contains("<?xml"), "\(hello)")

        let seeds = Fuzz.corpus("gdb")
        let report = Fuzz.run(target: "gdb-stub", seeds: seeds, seconds: Fuzz.budget(ci: 3), maxLength: 4096,
                              dictionary: ["Z0,", "z2,", "m", "M", "p", "P", "qXfer:features:read:target.xml:", "vCont;", "H", "\n"]
                                .map { Array($0.utf8) }) { input in
            // Each line becomes one correctly framed packet (so mutations reach the commands),
            // except kill, which would end the machine.
            var bytes: [UInt8] = [UInt8(ascii: "+")]
            for line in input.split(separator: UInt8(ascii: "\n")) where line.first != UInt8(ascii: "k") && !line.starts(with: Array("vKill".utf8)) {
                bytes += GDBPacketParser.frame(Array(line))
            }
            _ = try Self.exchange(server.port, bytes, quiet: 0.02)
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        // Still serving: a new debugger attaches and gets a stop reply.
        let after = String(decoding: try Self.exchange(server.port, GDBPacketParser.frame(Array("?".utf8)), quiet: 1), as: UTF8.self)
        #expect(after.contains("$T05"), "\(after)")
        #expect(vm.runState != .shutdown)
    }
}
