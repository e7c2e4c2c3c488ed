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

/// Fuzzes the human monitor's word splitter (QEMU's quoted strings) and every HMP command
/// behind `human-monitor-command` with mutations of command lines libvirt and people send.
/// For every input: nothing crashes; the splitter either refuses the line or returns words
/// that, quoted again, split back to the same words; and the command gives text, not an error.
@Suite struct HMPFuzzTests {
    static func quoted(_ w: String) -> String {
        var out = "\""
        for c in w.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            default: out.unicodeScalars.append(c)
            }
        }
        return out + "\""
    }

    @Test func mutatedCommandLinesAreSplitConsistentlyAndAnswered() {
        let seeds = [#"savevm "snap1""#, #"delvm "a b""#, #"loadvm "x\"y""#, "info status", "info block", "info pci",
                     "x /4xw 0x80000000", "sendkey ctrl-alt-delete 100", "device_del disk1", "info snapshots",
                     #"migrate "exec:cat > /dev/null""#, "help info"].map { Array($0.utf8) }
        let tokens = ["\"", "\\", "\\\"", " ", "\t", "\n", "info", "savevm", "\u{0}", "\u{FF}"].map { Array($0.utf8) }
        var failures: [String] = []
        let report = Fuzz.run(target: "hmp", seeds: seeds, seconds: Fuzz.budget(ci: 1), maxLength: 512, dictionary: tokens) { input in
            let line = String(decoding: input, as: UTF8.self)
            if let words = try? QMPCommandExecutor.hmpWords(line) {
                let again = try? QMPCommandExecutor.hmpWords(words.map(Self.quoted).joined(separator: " "))
                if again != words, failures.count < 5 { failures.append("\(words) re-split as \(String(describing: again))") }
            }
            guard !line.hasPrefix("quit") else { return }
            var h = Harness()
            let args: JSONValue = ["command-line": .string(line)]
            let r = h.one(JSONValue.object(["execute": "human-monitor-command", "arguments": args]).serialized())
            if r["return"]?.stringValue == nil && r["error"]?["class"] != "GenericError", failures.count < 5 {
                failures.append("\(line.debugDescription): \(r)")
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(failures.isEmpty, "\(failures)")
    }
}
