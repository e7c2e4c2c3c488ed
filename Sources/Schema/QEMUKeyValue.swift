/// QEMU's `key=value,key=value` option syntax (QemuOpts / keyval), and the JSON form that
/// `-device`, `-object` and `-blockdev` also take, reduced to one ordered list of dotted keys
/// and string values.
///
/// `,,` is a literal comma; a first element without `=` is the option's implied key
/// (`-machine virt` is `type=virt`); a later bare `flag` means `flag=on` and the old `noflag`
/// forms `nowait`/`nodelay` mean `wait=off`/`delay=off`. JSON objects are flattened: nested
/// members become dotted keys (`file.filename`), booleans `on`/`off`, numbers their decimal
/// text. A plain value; any thread.
public struct QEMUKeyValue: Equatable, Sendable {
    /// The members in the order given.
    public private(set) var pairs: [(key: String, value: String)]

    public static func == (a: QEMUKeyValue, b: QEMUKeyValue) -> Bool {
        a.pairs.elementsEqual(b.pairs) { $0.key == $1.key && $0.value == $1.value }
    }

    /// Parses `text`; `impliedKey` names the first element when it has no `=`. Keys in
    /// `repeatable` may be given more than once (QEMU's list-valued parameters, such as
    /// `-netdev user`'s `hostfwd`); every other key only once.
    /// Throws a message naming the problem (a repeated key, an empty key, bad JSON).
    public init(parsing text: String, impliedKey: String? = nil, acceptsJSON: Bool = false,
                repeatable: Set<String> = []) throws(QEMUCommandLineError) {
        pairs = []
        self.repeatable = repeatable
        if acceptsJSON, text.first == "{" {
            let value: JSONValue
            do { value = try JSONValue.parse(text) } catch {
                throw QEMUCommandLineError("'\(text)' is not valid JSON: \(error)")
            }
            guard case .object(let o) = value else { throw QEMUCommandLineError("'\(text)' is not a JSON object") }
            try flatten(o, prefix: "")
            return
        }
        var elements: [String] = []
        var current = ""
        var chars = text.makeIterator()
        var pendingComma = false
        while let c = chars.next() {
            if pendingComma {
                pendingComma = false
                if c == "," { current.append(","); continue }
                elements.append(current)
                current = ""
            }
            if c == "," { pendingComma = true; continue }
            current.append(c)
        }
        if pendingComma {
            elements.append(current)
            current = ""
            // A trailing single comma leaves an empty last element, which QEMU refuses too.
            elements.append("")
        } else {
            elements.append(current)
        }
        for (i, element) in elements.enumerated() {
            if let eq = element.firstIndex(of: "=") {
                let key = String(element[..<eq])
                guard !key.isEmpty else { throw QEMUCommandLineError("'\(text)': an empty parameter name before '='") }
                try add(key, String(element[element.index(after: eq)...]))
            } else if i == 0, let impliedKey {
                try add(impliedKey, element)
            } else if element.isEmpty {
                throw QEMUCommandLineError("'\(text)': an empty parameter (two commas in a row are written ',,' only inside a value)")
            } else if element == "nowait" {
                try add("wait", "off")
            } else if element == "nodelay" {
                try add("delay", "off")
            } else {
                try add(element, "on")
            }
        }
    }

    /// Creates a list from pairs already split (tests, and generated options).
    public init(_ pairs: [(String, String)]) { self.pairs = pairs.map { (key: $0.0, value: $0.1) } }

    /// The keys that may repeat (set while parsing).
    private var repeatable: Set<String> = []

    private mutating func add(_ key: String, _ value: String) throws(QEMUCommandLineError) {
        guard repeatable.contains(key) || !pairs.contains(where: { $0.key == key }) else {
            throw QEMUCommandLineError("parameter '\(key)' is given more than once")
        }
        pairs.append((key, value))
    }

    private mutating func flatten(_ o: JSONObject, prefix: String) throws(QEMUCommandLineError) {
        for m in o {
            let key = prefix + m.key
            switch m.value {
            case .object(let inner): try flatten(inner, prefix: key + ".")
            case .string(let s): try add(key, s)
            case .bool(let b): try add(key, b ? "on" : "off")
            case .int(let n): try add(key, String(n))
            case .double(let d): try add(key, String(d))
            case .null:
                // libvirt writes "backing": null; kept as the text null for the option to judge.
                try add(key, "null")
            case .array:
                throw QEMUCommandLineError("parameter '\(key)': a \(m.value.typeName) is not supported here")
            }
        }
    }

    /// The value of `key`, if given.
    public subscript(key: String) -> String? { pairs.first(where: { $0.key == key })?.value }

    /// Every value of `key`, in order (a repeatable key may have several).
    public func values(_ key: String) -> [String] { pairs.filter { $0.key == key }.map(\.value) }

    /// The keys in order.
    public var keys: [String] { pairs.map(\.key) }

    /// The members whose keys start with `prefix + "."`, with the prefix removed.
    public func nested(_ prefix: String) -> QEMUKeyValue {
        let p = prefix + "."
        return QEMUKeyValue(pairs.filter { $0.key.hasPrefix(p) }.map { (String($0.key.dropFirst(p.count)), $0.value) })
    }

    /// Fails naming the first key not in `allowed` (nested keys are checked by their first part
    /// when `allowed` lists that part followed by ".").
    public func rejectUnknown(_ allowed: Set<String>, in what: String) throws(QEMUCommandLineError) {
        for k in keys where !allowed.contains(k) {
            if let dot = k.firstIndex(of: "."), allowed.contains(String(k[...dot])) { continue }
            throw QEMUCommandLineError("\(what): parameter '\(k)' is not supported (supported: \(allowed.sorted().joined(separator: ", ")))")
        }
    }

    /// QEMU's boolean spellings: on/off, yes/no, true/false.
    public func bool(_ key: String, in what: String) throws(QEMUCommandLineError) -> Bool? {
        guard let v = self[key] else { return nil }
        switch v {
        case "on", "yes", "true": return true
        case "off", "no", "false": return false
        default: throw QEMUCommandLineError("\(what): parameter '\(key)' expects 'on' or 'off', got '\(v)'")
        }
    }

    /// A non-negative integer (decimal or 0x hexadecimal).
    public func integer(_ key: String, in what: String) throws(QEMUCommandLineError) -> Int64? {
        guard let v = self[key] else { return nil }
        let n: Int64? = v.hasPrefix("0x") || v.hasPrefix("0X") ? Int64(v.dropFirst(2), radix: 16) : Int64(v)
        guard let n, n >= 0 else {
            throw QEMUCommandLineError("\(what): parameter '\(key)' expects a non-negative number, got '\(v)'")
        }
        return n
    }
}

extension JSONObject: ExpressibleByDictionaryLiteral {
    /// An object with these members in order (later duplicates replace earlier ones).
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self.init()
        for (k, v) in elements { self[k] = v }
    }
}
