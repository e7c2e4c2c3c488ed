import FuzzSupport
import Schema
import Testing
@testable import QMP

/// Fuzzes the QMP stream (QEMU's lexer and streamer), the request envelope and every
/// command's argument decoding with mutations of committed request streams
/// (tests/fuzz/corpus/qmp). For every input: nothing crashes, every message the server would
/// write is a reply (`return`, or `error` with class and desc) or an event, and afterwards a
/// control character (which QEMU's lexer treats as a resynchronisation point) followed by a
/// request gets that request answered.
@Suite struct QMPFuzzTests {
    @Test func mutatedStreamsGetRepliesAndTheSessionRecovers() throws {
        let seeds = Fuzz.corpus("qmp")
        try #require(seeds.count >= 5, "the QMP seed corpus is missing")
        let tokens = ["{", "}", "[", "]", ",", ":", "\"", "'", "\\", "\n", "\u{1}", "null", "true", "-0", "1e400",
                      "\"execute\"", "\"arguments\"", "\"id\"", "\"qmp_capabilities\"", "%", "\u{FF}"]
        var failures: [String] = []
        let report = Fuzz.run(target: "qmp", seeds: seeds, seconds: Fuzz.budget(ci: 2), maxLength: 1 << 14,
                              dictionary: tokens.map { Array($0.utf8) }) { input in
            var h = Harness(negotiate: false)
            for m in h.feed(input) where m["return"] == nil && m["event"] == nil
                && (m["error"]?["class"] == nil || m["error"]?["desc"] == nil) {
                if failures.count < 5 { failures.append("not a reply: \(m) for \(String(decoding: input.prefix(300), as: UTF8.self))") }
            }
            let after = h.feed([0x01] + Array(#"{"execute":"qmp_capabilities","id":"probe"}"#.utf8))
            if after.last?["id"] != "probe", failures.count < 5 {
                failures.append("no answer after resync: \(after) for \(String(decoding: input.prefix(300), as: UTF8.self))")
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(failures.isEmpty, "\(failures)")
    }
}
