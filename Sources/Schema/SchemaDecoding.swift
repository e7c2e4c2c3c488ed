/// Where in a JSON document a value sits, written the way a user reads it:
/// `devices[2].drive.format`. The root is the empty path.
public struct SchemaPath: Sendable, Equatable, CustomStringConvertible {
    /// The rendered path ("" for the root).
    public private(set) var text: String

    /// The root of a document.
    public static let root = SchemaPath(text: "")

    private init(text: String) { self.text = text }

    /// The path of member `name` inside the value at this path.
    public func member(_ name: String) -> SchemaPath {
        SchemaPath(text: text.isEmpty ? name : "\(text).\(name)")
    }

    /// The path of element `index` inside the array at this path.
    public func index(_ index: Int) -> SchemaPath {
        SchemaPath(text: "\(text)[\(index)]")
    }

    /// The rendered path, or "(top level)" for the root.
    public var description: String { text.isEmpty ? "(top level)" : text }
}

/// A value that does not match its schema type; names the member path and what is wrong.
///
/// `description` reads "devices[2].drive.format: expected one of raw, qcow2";
/// `qmpDescription` renders the same fact the way QEMU's QMP argument checking words it.
public struct SchemaDecodingError: Error, Equatable, CustomStringConvertible {
    /// What is wrong at `path`.
    public enum Problem: Sendable, Equatable {
        /// A required member is absent.
        case missing
        /// A member the type does not define is present.
        case unexpected
        /// The JSON type is wrong; `expected` is a JSON type name ("integer", "string", ...).
        case wrongType(expected: String, found: String)
        /// A string is not one of the enumeration's values.
        case notOneOf([String], found: String)
        /// A value is outside the allowed range or format; the text says which.
        case invalid(String)
    }

    /// Where the problem is.
    public var path: SchemaPath
    /// What the problem is.
    public var problem: Problem

    /// Creates an error.
    public init(path: SchemaPath, problem: Problem) {
        self.path = path
        self.problem = problem
    }

    /// "path: what is wrong".
    public var description: String {
        let what: String
        switch problem {
        case .missing: what = "required member is missing"
        case .unexpected: what = "unknown member (not in the schema)"
        case .wrongType(let expected, let found): what = "expected \(expected), got \(found)"
        case .notOneOf(let values, let found): what = "expected one of \(values.joined(separator: ", ")), got '\(found)'"
        case .invalid(let text): what = text
        }
        return "\(path): \(what)"
    }

    /// QEMU's wording for the same problem in QMP command arguments
    /// ("Parameter 'size' is missing", "Invalid parameter type for 'size', expected: integer").
    public var qmpDescription: String {
        let name = path.text.isEmpty ? "arguments" : path.text
        switch problem {
        case .missing: return "Parameter '\(name)' is missing"
        case .unexpected: return "Parameter '\(name)' is unexpected"
        case .wrongType(let expected, _): return "Invalid parameter type for '\(name)', expected: \(expected)"
        case .notOneOf(_, let found):
            // QEMU names only the member itself here ('data', not 'keys[0].data'), and 'null'
            // for a list element.
            let leaf = path.text.hasSuffix("]") ? "null" : String(path.text.split(separator: ".").last ?? "null")
            return "Parameter '\(leaf)' does not accept value '\(found)'"
        case .invalid(let text): return "Parameter '\(name)' is invalid: \(text)"
        }
    }
}

/// A type described by the schema: decodes strictly from JSON and encodes back to JSON.
///
/// Generated types and the QAPI built-ins (`Int64` for int, `Double` for number, `String`,
/// `Bool`, `JSONValue` for any, arrays) conform. Decoding rejects unknown members, missing
/// required members and wrong types, naming the member path.
public protocol SchemaCodable: Sendable {
    /// Decodes a value found at `path`.
    init(json: JSONValue, at path: SchemaPath) throws(SchemaDecodingError)
    /// The JSON form of this value (members in schema order, absent optionals left out).
    var json: JSONValue { get }
}

extension Int64: SchemaCodable {
    /// Accepts a JSON integer.
    public init(json: JSONValue, at path: SchemaPath) throws(SchemaDecodingError) {
        guard case .int(let v) = json else {
            throw SchemaDecodingError(path: path, problem: .wrongType(expected: "integer", found: json.typeName))
        }
        self = v
    }
    /// A JSON integer.
    public var json: JSONValue { .int(self) }
}

extension Double: SchemaCodable {
    /// Accepts a JSON number (integers included).
    public init(json: JSONValue, at path: SchemaPath) throws(SchemaDecodingError) {
        switch json {
        case .int(let v): self = Double(v)
        case .double(let v): self = v
        default: throw SchemaDecodingError(path: path, problem: .wrongType(expected: "number", found: json.typeName))
        }
    }
    /// A JSON number.
    public var json: JSONValue { .double(self) }
}

extension String: SchemaCodable {
    /// Accepts a JSON string.
    public init(json: JSONValue, at path: SchemaPath) throws(SchemaDecodingError) {
        guard case .string(let v) = json else {
            throw SchemaDecodingError(path: path, problem: .wrongType(expected: "string", found: json.typeName))
        }
        self = v
    }
    /// A JSON string.
    public var json: JSONValue { .string(self) }
}

extension Bool: SchemaCodable {
    /// Accepts a JSON boolean.
    public init(json: JSONValue, at path: SchemaPath) throws(SchemaDecodingError) {
        guard case .bool(let v) = json else {
            throw SchemaDecodingError(path: path, problem: .wrongType(expected: "boolean", found: json.typeName))
        }
        self = v
    }
    /// A JSON boolean.
    public var json: JSONValue { .bool(self) }
}

extension JSONValue: SchemaCodable {
    /// QAPI's `any`: accepts every value.
    public init(json: JSONValue, at path: SchemaPath) { self = json }
    /// The value itself.
    public var json: JSONValue { self }
}

extension Array: SchemaCodable where Element: SchemaCodable {
    /// Accepts a JSON array whose elements all decode.
    public init(json: JSONValue, at path: SchemaPath) throws(SchemaDecodingError) {
        guard case .array(let items) = json else {
            throw SchemaDecodingError(path: path, problem: .wrongType(expected: "array", found: json.typeName))
        }
        var out: [Element] = []
        out.reserveCapacity(items.count)
        for (i, item) in items.enumerated() { out.append(try Element(json: item, at: path.index(i))) }
        self = out
    }
    /// A JSON array.
    public var json: JSONValue { .array(map(\.json)) }
}

/// Reads the members of one JSON object for a generated decoder.
///
/// Used only by generated code; a value type, confined to the decoding call.
public struct SchemaObjectReader {
    /// The object's members.
    public let object: JSONObject
    /// Where the object sits.
    public let path: SchemaPath

    /// Checks that `json` is an object.
    public init(_ json: JSONValue, at path: SchemaPath) throws(SchemaDecodingError) {
        guard case .object(let o) = json else {
            throw SchemaDecodingError(path: path, problem: .wrongType(expected: "object", found: json.typeName))
        }
        self.object = o
        self.path = path
    }

    /// Fails on the first member whose name is not in `allowed`.
    public func rejectUnknown(allowed: Set<String>) throws(SchemaDecodingError) {
        for m in object where !allowed.contains(m.key) {
            throw SchemaDecodingError(path: path.member(m.key), problem: .unexpected)
        }
    }

    /// Decodes a required member.
    public func required<T: SchemaCodable>(_ key: String, as: T.Type = T.self) throws(SchemaDecodingError) -> T {
        guard let v = object[key] else { throw SchemaDecodingError(path: path.member(key), problem: .missing) }
        return try T(json: v, at: path.member(key))
    }

    /// Decodes an optional member (nil when absent).
    public func optional<T: SchemaCodable>(_ key: String, as: T.Type = T.self) throws(SchemaDecodingError) -> T? {
        guard let v = object[key] else { return nil }
        return try T(json: v, at: path.member(key))
    }
}

/// Value checks that the schema attaches to members (`minimum`, `maximum`, `format`).
/// Called by generated decoders.
public enum SchemaCheck {
    /// Fails unless `min <= value <= max`.
    public static func range(_ value: Int64, min: Int64?, max: Int64?, at path: SchemaPath) throws(SchemaDecodingError) {
        if let min, value < min {
            throw SchemaDecodingError(path: path, problem: .invalid("\(value) is below the minimum \(min)"))
        }
        if let max, value > max {
            throw SchemaDecodingError(path: path, problem: .invalid("\(value) is above the maximum \(max)"))
        }
    }

    /// Parses a size with an optional K, M, G or T suffix (powers of 1024): "256M" is 268435456.
    /// Returns nil when the text is not such a size or overflows.
    public static func parseSize(_ text: String) -> UInt64? {
        var digits = Substring(text)
        var shift: UInt64 = 0
        if let last = digits.last, !last.isNumber {
            switch last {
            case "K", "k": shift = 10
            case "M", "m": shift = 20
            case "G", "g": shift = 30
            case "T", "t": shift = 40
            default: return nil
            }
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let n = UInt64(digits) else {
            return nil
        }
        let (v, overflow) = n.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : v
    }

    /// Fails unless `text` is a size string within `[min, max]` (both size strings too).
    public static func size(_ text: String, min: String?, max: String?, at path: SchemaPath) throws(SchemaDecodingError) {
        guard let v = parseSize(text) else {
            throw SchemaDecodingError(path: path, problem: .invalid("'\(text)' is not a size (a number with an optional K, M or G suffix)"))
        }
        if let min, let lo = parseSize(min), v < lo {
            throw SchemaDecodingError(path: path, problem: .invalid("\(text) is smaller than the minimum \(min)"))
        }
        if let max, let hi = parseSize(max), v > hi {
            throw SchemaDecodingError(path: path, problem: .invalid("\(text) is larger than the maximum \(max)"))
        }
    }

    /// Splits "HOST:PORT" (IPv6 hosts in brackets: "[::1]:5900") into its parts, or nil.
    public static func parseHostPort(_ text: String) -> (host: String, port: UInt16)? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        var host = String(text[..<colon])
        guard let port = UInt16(text[text.index(after: colon)...]) else { return nil }
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { return nil }
        return (host, port)
    }

    /// Fails unless `text` is "HOST:PORT" with a port in 0...65535.
    public static func hostPort(_ text: String, at path: SchemaPath) throws(SchemaDecodingError) {
        guard parseHostPort(text) != nil else {
            throw SchemaDecodingError(path: path, problem: .invalid("'\(text)' is not HOST:PORT"))
        }
    }

    /// Fails when a path string is empty or contains a NUL byte.
    public static func path(_ text: String, at path: SchemaPath) throws(SchemaDecodingError) {
        if text.isEmpty || text.utf8.contains(0) {
            throw SchemaDecodingError(path: path, problem: .invalid("not a usable file path"))
        }
    }
}
