import CJansson
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Why a piece of JSON text could not be parsed; `description` is jansson's message with its
/// position, e.g. "'[' or '{' expected near 'x' (line 1, column 1)".
public struct JSONParseError: Error, Equatable, CustomStringConvertible {
    /// jansson's message text.
    public var message: String
    /// 1-based line of the error.
    public var line: Int
    /// 1-based column of the error.
    public var column: Int
    /// Creates an error.
    public init(message: String, line: Int, column: Int) {
        self.message = message
        self.line = line
        self.column = column
    }
    /// "message (line L, column C)".
    public var description: String { "\(message) (line \(line), column \(column))" }
}

extension JSONValue {
    /// Parses one complete JSON text (any value at the top level) with libjansson.
    ///
    /// Duplicate object keys are rejected; `\u0000` inside strings is allowed; trailing
    /// non-whitespace after the value is an error. Integers outside Int64 are an error.
    public static func parse(_ bytes: some Collection<UInt8>) throws(JSONParseError) -> JSONValue {
        // A trailing NUL that is not counted keeps the buffer non-empty (a valid pointer) for jansson.
        let array = Array(bytes) + [0]
        let length = array.count - 1
        var error = json_error_t()
        let flags = Int(JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL)
        let root: UnsafeMutablePointer<json_t>? = array.withUnsafeBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) {
                json_loadb($0, length, flags, &error)
            }
        }
        guard let root else {
            let text = withUnsafeBytes(of: error.text) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            throw JSONParseError(message: text, line: Int(error.line), column: Int(error.column))
        }
        defer { json_decref(root) }
        return JSONValue(jansson: root)
    }

    /// Parses a JSON text given as a Swift string.
    public static func parse(_ text: String) throws(JSONParseError) -> JSONValue {
        try parse(Array(text.utf8))
    }

    /// Converts a jansson tree to a value (the tree stays owned by the caller).
    init(jansson node: UnsafeMutablePointer<json_t>) {
        switch node.pointee.type {
        case JSON_NULL: self = .null
        case JSON_TRUE: self = .bool(true)
        case JSON_FALSE: self = .bool(false)
        case JSON_INTEGER: self = .int(Int64(json_integer_value(node)))
        case JSON_REAL: self = .double(json_real_value(node))
        case JSON_STRING:
            let len = json_string_length(node)
            let bytes = UnsafeRawBufferPointer(start: json_string_value(node), count: len)
            self = .string(String(decoding: bytes, as: UTF8.self))
        case JSON_ARRAY:
            var items: [JSONValue] = []
            let n = json_array_size(node)
            items.reserveCapacity(n)
            for i in 0..<n { items.append(JSONValue(jansson: json_array_get(node, i))) }
            self = .array(items)
        default:
            var object = JSONObject()
            var iter = json_object_iter(node)
            while let it = iter {
                let keyLen = json_object_iter_key_len(it)
                let key = String(decoding: UnsafeRawBufferPointer(start: json_object_iter_key(it), count: keyLen),
                                 as: UTF8.self)
                object[key] = JSONValue(jansson: json_object_iter_value(it))
                iter = json_object_iter_next(node, it)
            }
            self = .object(object)
        }
    }

    /// Builds a new jansson tree (owned reference) for this value. Non-finite doubles become null,
    /// since JSON cannot express them.
    func makeJansson() -> UnsafeMutablePointer<json_t> {
        switch self {
        case .null: return json_null()
        case .bool(let b): return b ? json_true() : json_false()
        case .int(let i): return json_integer(json_int_t(i))
        case .double(let d): return d.isFinite ? json_real(d) : json_null()
        case .string(let s):
            return JSONValue.withCString(s) { json_stringn_nocheck($0, $1) }
        case .array(let items):
            let a = json_array()!
            for item in items { json_array_append_new(a, item.makeJansson()) }
            return a
        case .object(let members):
            let o = json_object()!
            for m in members {
                _ = JSONValue.withCString(m.key) { json_object_setn_new_nocheck(o, $0, $1, m.value.makeJansson()) }
            }
            return o
        }
    }

    /// Calls `body` with a NUL-terminated copy of `s` and its byte length (which may include
    /// embedded NULs, since jansson's `n` functions take an explicit length).
    private static func withCString<R>(_ s: String, _ body: (UnsafePointer<CChar>, Int) -> R) -> R {
        let bytes = Array(s.utf8) + [0]
        return bytes.withUnsafeBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) { body($0, buf.count - 1) }
        }
    }

    /// The compact JSON text of this value (jansson `json_dumps` with `JSON_COMPACT`), members in order.
    public func serialized() -> String {
        let node = makeJansson()
        defer { json_decref(node) }
        // JSON_REAL_PRECISION(17) is a function-like macro, so its value is spelled out here.
        let realPrecision17 = Int32((17 & 0x1F) << 11)
        let flags = JSON_COMPACT | JSON_ENCODE_ANY | realPrecision17
        guard let text = json_dumps(node, Int(flags)) else { return "null" }
        defer { free(text) }
        return String(cString: text)
    }
}
