import FuzzSupport
import Testing
@testable import Net

/// Fuzzes the parsers of outside input in the network backends: the hostfwd / guestfwd rules
/// and `net` option of a user netdev (from the description, QMP and HMP), and the reader of
/// length-prefixed frames from a stream peer. Seeds are in tests/fuzz/corpus/hostfwd and
/// tests/fuzz/corpus/stream-frames.
@Suite struct NetFuzzTests {
    @Test func forwardingRulesAndOptionsParseOrRefuseCleanly() throws {
        let seeds = Fuzz.corpus("hostfwd")
        try #require(seeds.count >= 4, "the hostfwd seed corpus is missing")
        var problems: [String] = []
        let report = Fuzz.run(target: "hostfwd", seeds: seeds, seconds: Fuzz.budget(ci: 2), maxLength: 256,
                              dictionary: [Array("tcp:".utf8), Array("udp:".utf8), Array(":".utf8), Array("-".utf8),
                                           Array("/".utf8), Array("cmd:".utf8), Array("10.0.2.".utf8), Array("255".utf8)]) { input in
            let text = String(decoding: input, as: UTF8.self)
            var rejected = 0
            do {
                let f = try HostForward.parse(text)
                // What was accepted prints as a rule that parses back to the same rule.
                if (try? HostForward.parse(f.description)) != f { problems.append("round trip of \(text.debugDescription)") }
            } catch { rejected += 1 }
            do {
                let g = try GuestForward.parse(text)
                if g.command.isEmpty { problems.append("empty command from \(text.debugDescription)") }
            } catch { rejected += 1 }
            do {
                let o = try UserNetworkOptions(net: text, host: nil, dns: nil, dhcpStart: nil, restrict: false, hostname: nil,
                                               domainName: nil, hostForwards: [], guestForwards: [])
                for a in [o.host, o.dns, o.dhcpStart]
                where a.value & o.mask.value != o.network.value || a == o.network || a.value | o.mask.value == UInt32.max {
                    problems.append("\(a) outside \(o.network)/\(o.prefixLength) or not a host address, from \(text.debugDescription)")
                }
            } catch { rejected += 1 }
            if rejected == 3 { throw NetError("rejected") }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(problems.isEmpty, "\(problems.prefix(5))")
    }

    @Test func streamFramesMatchAWholeBufferParseUnderAnySplit() throws {
        let seeds = Fuzz.corpus("stream-frames")
        try #require(seeds.count >= 3, "the stream-frames seed corpus is missing")
        var problems: [String] = []
        let report = Fuzz.run(target: "stream-frames", seeds: seeds, seconds: Fuzz.budget(ci: 2), maxLength: 8192,
                              dictionary: [[0, 0, 0, 0], [0, 0, 5, 0xea], [0, 1, 0x10, 0], [0xff, 0xff, 0xff, 0xff]]) { input in
            // Reference: walk the whole buffer at once.
            var expected: [[UInt8]] = []
            var tooLarge = false
            var i = 0
            while i + 4 <= input.count {
                let n = Int(input[i]) << 24 | Int(input[i + 1]) << 16 | Int(input[i + 2]) << 8 | Int(input[i + 3])
                if n > StreamFrameReader.maxFrame { tooLarge = true; break }
                guard i + 4 + n <= input.count else { break }
                if n > 0 { expected.append(Array(input[(i + 4)..<(i + 4 + n)])) }
                i += 4 + n
            }
            // The reader, fed in chunks whose sizes come from the input itself.
            var r = StreamFrameReader()
            var got: [[UInt8]] = []
            var failed = false
            var at = 0, step = 1
            while at < input.count && !failed {
                let n = min(input.count - at, step)
                do {
                    try input[at..<(at + n)].withUnsafeBytes { try r.consume($0) { got.append(Array($0)) } }
                } catch {
                    failed = true
                }
                at += n
                step = Int(input[at - 1] % 97) + 1
            }
            if got.contains(where: { $0.count > StreamFrameReader.maxFrame || $0.isEmpty }) { problems.append("bad frame size") }
            if failed != tooLarge { problems.append("failure \(failed), expected \(tooLarge)") }
            if got != expected { problems.append("\(got.count) frames, expected \(expected.count)") }
            if failed { throw StreamFrameReader.Failure.frameTooLarge(0) }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(problems.isEmpty, "\(problems.prefix(5))")
    }
}
