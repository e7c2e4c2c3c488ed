import Schema
import Testing
@testable import QMP

/// Reproducers for issue 15 (hardening) in the QMP stream: recovery after lexical errors and
/// bounded input, compared with what QEMU 7.2 answers to the same bytes.
@Suite struct QMPHardeningTests {
    func desc(_ m: JSONValue) -> String? {
        if case .string(let s)? = m["error"]?["desc"] { return s }
        return nil
    }

    /// After `"` and a newline the old splitter stayed inside a string and the next three
    /// well-formed commands got 18 parse errors and no answer. QEMU answers one error
    /// ("stray" names the bad token) and then all three commands.
    @Test func anUnterminatedStringIsOneErrorAndTheNextCommandsAreAnswered() {
        var h = Harness()
        let q = #"{"execute":"query-status","id":1}"#
        let r = h.send("\"\n" + q + q + q)
        #expect(r.count == 4, "\(r)")
        #expect(desc(r[0]) == "JSON parse error, stray '\"\n'", "\(r)")
        #expect(r.dropFirst().allSatisfy { $0["return"] != nil && $0["id"] == 1 }, "\(r)")
    }

    /// The same sequences QEMU 7.2.22 was given (tests/integration notes how): the number of
    /// replies, which of them are errors, and the lexer's error texts agree.
    @Test func lexicalErrorsRecoverLikeQEMU() {
        let q = #"{"execute":"query-name","id":"ok"}"#
        let cases: [(input: [UInt8], errors: [String?])] = [
            // A byte that can never start a token, then a command.
            ([0xFF] + Array(q.utf8), ["JSON parse error, stray '\u{FFFD}'"]),
            // A leading zero inside an object: the error token, then the orphan "}" is a
            // message of its own (a parse error, text from our parser), then the command.
            (Array(#"{"execute":"query-status", "a": 01}"#.utf8) + Array(q.utf8), ["JSON parse error, stray '01'", nil]),
            // A stray closer is one parse error.
            (Array("}".utf8) + Array(q.utf8), [nil]),
            // A minus sign followed by a letter.
            (Array("-s".utf8) + Array(q.utf8), ["JSON parse error, stray '-s'"]),
        ]
        for c in cases {
            var h = Harness()
            let r = h.feed(c.input)
            #expect(r.count == c.errors.count + 1, "\(String(decoding: c.input, as: UTF8.self)): \(r)")
            for (i, e) in c.errors.enumerated() where i < r.count {
                #expect(r[i]["error"] != nil, "\(r)")
                if let e { #expect(desc(r[i]) == e, "\(r)") }
            }
            #expect(r.last?["id"] == "ok" && r.last?["return"] != nil, "\(r)")
        }
    }

    @Test func nestingBeyondTheLimitIsOneErrorWithQEMUsText() {
        var h = Harness()
        let deep = String(repeating: "[", count: 1100) + String(repeating: "]", count: 1100)
        let r = h.send(deep + #"{"execute":"query-name","id":"after"}"#)
        #expect(r.count == 2, "\(r.count) replies")
        #expect(desc(r[0]) == "JSON nesting depth limit exceeded")
        #expect(r.last?["id"] == "after")
        #expect(!h.closed)
    }

    @Test func tokenSizeLimitHasQEMUsTextAndDoesNotBufferTheToken() {
        var s = JSONStreamSplitter(maxMessageSize: 1024)
        var out = s.feed(Array("[\"".utf8))
        for _ in 0..<1000 { out += s.feed([UInt8](repeating: 0x61, count: 1024)) }  // 1 MB string
        out += s.feed(Array("\"]{}".utf8))
        #expect(out == [.error("JSON token size limit exceeded"), .message(Array("{}".utf8))], "\(out)")
    }
}
