import Schema
import Testing
@testable import QMP

/// Feeds random bytes and damaged JSON to the state machine: it must never crash, every
/// message it produces must be a reply object, and it must keep answering afterwards.
@Suite struct FuzzTests {
    struct SplitMix: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    func isReply(_ m: JSONValue) -> Bool {
        m["return"] != nil || (m["error"]?["class"] != nil && m["error"]?["desc"] != nil)
    }

    @Test func randomBytesNeverCrashAndOnlyProduceReplies() {
        var rng = SplitMix(state: 42)
        for round in 0..<200 {
            var h = Harness()
            let n = Int.random(in: 1...300, using: &rng)
            let alphabet = Array(#"{}[]":,\ abc01-e.tfn"#.utf8) + [0x00, 0xFF, 0xC3, 0x0A]
            let bytes = (0..<n).map { _ in
                Bool.random(using: &rng) ? alphabet.randomElement(using: &rng)! : UInt8.random(in: 0...255, using: &rng)
            }
            let out = h.feed(bytes)
            for m in out { #expect(isReply(m), "round \(round): \(m)") }
        }
    }

    @Test func truncatedAndDamagedRequestsKeepTheServerAnswering() {
        let good = #"{"execute":"query-status","arguments":{},"id":{"k":["v",1]}}"#
        let bytes = Array(good.utf8)
        var h = Harness()
        for cut in 1..<bytes.count {
            // A prefix, then enough closers to finish any open value, then a valid request.
            var damaged = Array(bytes[..<cut])
            let quotes = damaged.filter { $0 == UInt8(ascii: "\"") }.count
            if quotes % 2 == 1 { damaged.append(UInt8(ascii: "\"")) }
            damaged += Array("]]]}}}".utf8)
            let out = h.feed(damaged)
            for m in out { #expect(isReply(m)) }
            let r = h.send(#"{"execute":"query-name","id":"after"}"#)
            #expect(r.last?["id"] == "after", "cut \(cut): \(r)")
        }
        #expect(h.machine.calls.isEmpty)
    }
}
