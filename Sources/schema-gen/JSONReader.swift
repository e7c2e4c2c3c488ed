/// A JSON value as the schema compiler sees it: objects keep their member order (member order
/// in the schema is the order of generated fields and of introspection members), numbers keep
/// their text.
enum JNode: Equatable {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JNode])
    case object([(String, JNode)])

    static func == (a: JNode, b: JNode) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case (.bool(let x), .bool(let y)): return x == y
        case (.number(let x), .number(let y)): return x == y
        case (.string(let x), .string(let y)): return x == y
        case (.array(let x), .array(let y)): return x == y
        case (.object(let x), .object(let y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    var kind: String {
        switch self {
        case .null: return "null"
        case .bool: return "boolean"
        case .number: return "number"
        case .string: return "string"
        case .array: return "array"
        case .object: return "object"
        }
    }

    subscript(key: String) -> JNode? {
        if case .object(let m) = self { return m.first { $0.0 == key }?.1 }
        return nil
    }

    /// Compact or indented JSON text, members in order.
    func render(indent: Int? = nil, level: Int = 0) -> String {
        func pad(_ n: Int) -> String { String(repeating: " ", count: n) }
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .number(let n): return n
        case .string(let s): return JNode.quote(s)
        case .array(let items):
            if items.isEmpty { return "[]" }
            guard let indent else { return "[" + items.map { $0.render() }.joined(separator: ",") + "]" }
            let inner = items.map { pad((level + 1) * indent) + $0.render(indent: indent, level: level + 1) }
            return "[\n" + inner.joined(separator: ",\n") + "\n" + pad(level * indent) + "]"
        case .object(let members):
            if members.isEmpty { return "{}" }
            guard let indent else {
                return "{" + members.map { JNode.quote($0.0) + ":" + $0.1.render() }.joined(separator: ",") + "}"
            }
            let inner = members.map {
                pad((level + 1) * indent) + JNode.quote($0.0) + ": " + $0.1.render(indent: indent, level: level + 1)
            }
            return "{\n" + inner.joined(separator: ",\n") + "\n" + pad(level * indent) + "}"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let hex = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }
}

/// A strict JSON parser (RFC 8259: no comments, no trailing commas, no duplicate keys) that
/// reports errors with line and column.
struct JSONReader {
    private let bytes: [UInt8]
    private var pos = 0

    struct Failure: Error, CustomStringConvertible {
        var message: String
        var line: Int
        var column: Int
        var description: String { "line \(line), column \(column): \(message)" }
    }

    static func parse(_ text: String) throws -> JNode {
        var r = JSONReader(bytes: Array(text.utf8))
        r.skipSpace()
        let v = try r.value(depth: 0)
        r.skipSpace()
        if r.pos != r.bytes.count { throw r.fail("unexpected text after the JSON value") }
        return v
    }

    private init(bytes: [UInt8]) { self.bytes = bytes }

    private func fail(_ message: String) -> Failure {
        var line = 1, col = 1
        for b in bytes[..<min(pos, bytes.count)] {
            if b == 0x0A { line += 1; col = 1 } else { col += 1 }
        }
        return Failure(message: message, line: line, column: col)
    }

    private mutating func skipSpace() {
        while pos < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[pos]) { pos += 1 }
    }

    private mutating func expect(_ literal: String) throws {
        let l = Array(literal.utf8)
        guard pos + l.count <= bytes.count, Array(bytes[pos..<pos + l.count]) == l else {
            throw fail("expected '\(literal)'")
        }
        pos += l.count
    }

    private mutating func value(depth: Int) throws -> JNode {
        guard depth < 64 else { throw fail("nesting too deep") }
        guard pos < bytes.count else { throw fail("unexpected end of input") }
        switch bytes[pos] {
        case UInt8(ascii: "{"):
            pos += 1
            var members: [(String, JNode)] = []
            skipSpace()
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(members) }
            while true {
                skipSpace()
                guard pos < bytes.count, bytes[pos] == UInt8(ascii: "\"") else { throw fail("expected a member name") }
                let key = try string()
                if members.contains(where: { $0.0 == key }) { throw fail("duplicate member '\(key)'") }
                skipSpace()
                try expect(":")
                skipSpace()
                members.append((key, try value(depth: depth + 1)))
                skipSpace()
                guard pos < bytes.count else { throw fail("unexpected end of input in object") }
                if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                if bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(members) }
                throw fail("expected ',' or '}'")
            }
        case UInt8(ascii: "["):
            pos += 1
            var items: [JNode] = []
            skipSpace()
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(items) }
            while true {
                skipSpace()
                items.append(try value(depth: depth + 1))
                skipSpace()
                guard pos < bytes.count else { throw fail("unexpected end of input in array") }
                if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                if bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(items) }
                throw fail("expected ',' or ']'")
            }
        case UInt8(ascii: "\""):
            return .string(try string())
        case UInt8(ascii: "t"): try expect("true"); return .bool(true)
        case UInt8(ascii: "f"): try expect("false"); return .bool(false)
        case UInt8(ascii: "n"): try expect("null"); return .null
        default:
            let start = pos
            while pos < bytes.count, "+-0123456789.eE".utf8.contains(bytes[pos]) { pos += 1 }
            let text = String(decoding: bytes[start..<pos], as: UTF8.self)
            guard !text.isEmpty, Double(text) != nil, text.first != "+" else {
                pos = start
                throw fail("unexpected character")
            }
            return .number(text)
        }
    }

    private mutating func string() throws -> String {
        pos += 1
        var scalars = String.UnicodeScalarView()
        var raw: [UInt8] = []
        func flush() { scalars.append(contentsOf: String(decoding: raw, as: UTF8.self).unicodeScalars); raw = [] }
        while true {
            guard pos < bytes.count else { throw fail("unterminated string") }
            let b = bytes[pos]
            pos += 1
            if b == UInt8(ascii: "\"") { flush(); return String(scalars) }
            if b < 0x20 { throw fail("control character in string") }
            if b != UInt8(ascii: "\\") { raw.append(b); continue }
            flush()
            guard pos < bytes.count else { throw fail("unterminated escape") }
            let e = bytes[pos]
            pos += 1
            switch e {
            case UInt8(ascii: "\""): scalars.append("\"")
            case UInt8(ascii: "\\"): scalars.append("\\")
            case UInt8(ascii: "/"): scalars.append("/")
            case UInt8(ascii: "b"): scalars.append("\u{8}")
            case UInt8(ascii: "f"): scalars.append("\u{c}")
            case UInt8(ascii: "n"): scalars.append("\n")
            case UInt8(ascii: "r"): scalars.append("\r")
            case UInt8(ascii: "t"): scalars.append("\t")
            case UInt8(ascii: "u"):
                guard pos + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[pos..<pos + 4], as: UTF8.self), radix: 16),
                      let s = Unicode.Scalar(v) else { throw fail("bad \\u escape") }
                pos += 4
                scalars.append(s)
            default: throw fail("bad escape")
            }
        }
    }
}
