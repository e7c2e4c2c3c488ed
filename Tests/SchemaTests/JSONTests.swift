import Testing
@testable import Schema

@Suite struct JSONValueTests {
    @Test func parsesAndKeepsMemberOrder() throws {
        let v = try JSONValue.parse(#"{"z": 1, "a": [true, null, 2.5, "s"], "m": {}}"#)
        #expect(v.objectValue?.keys == ["z", "a", "m"])
        #expect(v["a"] == [true, nil, 2.5, "s"])
        #expect(v.serialized() == #"{"z":1,"a":[true,null,2.5,"s"],"m":{}}"#)
    }

    @Test func roundTripsStringsWithNULAndUnicode() throws {
        let v: JSONValue = ["k": .string("a\u{0}b\u{e9}\u{1F600}\"\\\n")]
        #expect(try JSONValue.parse(v.serialized()) == v)
    }

    @Test func rejectsDuplicateKeysTrailingGarbageAndEmptyInput() {
        #expect(throws: JSONParseError.self) { try JSONValue.parse(#"{"a":1,"a":2}"#) }
        #expect(throws: JSONParseError.self) { try JSONValue.parse("{} x") }
        #expect(throws: JSONParseError.self) { try JSONValue.parse("") }
        #expect(throws: JSONParseError.self) { try JSONValue.parse([0xFF, 0xFE]) }
    }

    @Test func integersStayIntegersAndDoublesStayDoubles() throws {
        #expect(try JSONValue.parse("9223372036854775807") == .int(Int64.max))
        #expect(try JSONValue.parse("1.0") == .double(1.0))
        #expect(JSONValue.double(.nan).serialized() == "null")
    }
}

@Suite struct StreamSplitterTests {
    func texts(_ outs: [JSONStreamSplitter.Output]) -> [String] {
        outs.compactMap { if case .message(let m) = $0 { return String(decoding: m, as: UTF8.self) } else { return nil } }
    }

    @Test func splitsBackToBackObjectsWithoutSeparators() {
        var s = JSONStreamSplitter()
        let out = texts(s.feed(Array(#"{"a":"}{"}{"b":[1,{"c":2}]}  {"d":"\"}"}"#.utf8)))
        #expect(out == [#"{"a":"}{"}"#, #"{"b":[1,{"c":2}]}"#, #"{"d":"\"}"}"#])
        #expect(!s.hasPartialMessage)
    }

    @Test func reassemblesAMessageSplitAcrossReads() {
        var s = JSONStreamSplitter()
        let whole = Array(#"{"execute":"query-status","id":"x\\"}"#.utf8)
        var out: [String] = []
        for b in whole { out += texts(s.feed([b])) }
        #expect(out == [String(decoding: whole, as: UTF8.self)])
    }

    @Test func emitsScalarsAndStrayClosersSeparately() {
        var s = JSONStreamSplitter()
        #expect(texts(s.feed(Array("42 ] \"x\"{}".utf8))) == ["42", "]", "\"x\"", "{}"])
    }

    @Test func enforcesSizeAndDepthLimits() {
        var s = JSONStreamSplitter(maxMessageSize: 16, maxDepth: 3)
        #expect(s.feed(Array(#"{"aaaaaaaaaaaaaaaaaaaa":1}"#.utf8)) == [.error("JSON token size limit exceeded")])
        var d = JSONStreamSplitter(maxMessageSize: 100, maxDepth: 3)
        #expect(d.feed(Array("[[[[1]]]]".utf8)) == [.error("JSON nesting depth limit exceeded")])
    }
}
