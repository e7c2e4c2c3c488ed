import Foundation
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

/// The QMP unix socket must never exist with a mode other than 0600, even under umask 000.
@Suite(.serialized) struct QMPSocketModeTests {
    @Test func theUnixSocketIsCreatedWithMode0600FromTheStart() throws {
        var template = Array("/tmp/qmpmode.XXXXXX".utf8CString)
        let dir = String(cString: try #require(mkdtemp(&template)))
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        // Every change to the directory's entries is queued here and read after start():
        // a chmod after creation shows as IN_ATTRIB, i.e. the socket first had another mode.
        let watch = inotify_init1(Int32(IN_NONBLOCK))
        try #require(watch >= 0)
        defer { close(watch) }
        #expect(inotify_add_watch(watch, dir, UInt32(IN_CREATE | IN_ATTRIB)) >= 0)

        let server = QMPServer(control: FakeMachine(), chardevs: FakeChardevs())
        defer { server.shutdown() }
        let oldMask = umask(0)
        defer { umask(oldMask) }
        try server.start(listeners: [.unix(path: path)])

        var st = stat()
        #expect(lstat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600, "mode \(String(st.st_mode & 0o777, radix: 8))")
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = buf.withUnsafeMutableBytes { read(watch, $0.baseAddress, $0.count) }
        var events: [(mask: UInt32, name: String)] = []
        var o = 0
        while n > 0 && o + 16 <= n {
            let mask = buf.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o + 4, as: UInt32.self) }
            let len = Int(buf.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o + 12, as: UInt32.self) })
            let name = String(decoding: buf[(o + 16)..<(o + 16 + len)].prefix { $0 != 0 }, as: UTF8.self)
            events.append((mask, name))
            o += 16 + len
        }
        #expect(events.contains { $0.name == "qmp.sock" && $0.mask & UInt32(IN_CREATE) != 0 }, "\(events)")
        #expect(!events.contains { $0.name == "qmp.sock" && $0.mask & UInt32(IN_ATTRIB) != 0 },
                "the socket's mode was changed after it was created: \(events)")
    }
}
