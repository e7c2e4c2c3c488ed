/// A reference to a type: a named type (built-in or defined) or an array of one.
enum TypeRef: Equatable {
    case named(String)
    case array(String)

    var element: String {
        switch self {
        case .named(let n), .array(let n): return n
        }
    }

    /// The name introspection uses ("int", "[CommandInfo]").
    var introspectionName: String {
        switch self {
        case .named(let n): return n
        case .array(let n): return "[\(n)]"
        }
    }
}

/// One member of a struct, union base, command argument list or event data.
struct Member {
    var name: String
    var optional: Bool
    var type: TypeRef
    var doc: String?
    var minimum: JNode?
    var maximum: JNode?
    var format: String?
    var defaultValue: JNode?
}

/// One definition from a schema file.
struct Definition {
    enum Kind {
        case enumeration(values: [String])
        case structure(base: String?, members: [Member])
        case union(baseMembers: [Member], baseName: String?, discriminator: String, branches: [(String, String)])
        case command(arguments: [Member]?, argumentType: String?, returns: TypeRef?)
        case event(data: [Member]?)
    }

    var name: String
    var kind: Kind
    var doc: String
    var example: [String]
    var file: String
    /// For a command: the type of members beyond the listed arguments, which are then kept
    /// instead of refused (QEMU's `'gen': false` commands such as `device_add`, whose driver
    /// properties are open-ended). Only `any` is supported: the handler checks them itself.
    var extraMembers: Member? = nil

    var keyword: String {
        switch kind {
        case .enumeration: return "enum"
        case .structure: return "struct"
        case .union: return "union"
        case .command: return "command"
        case .event: return "event"
        }
    }
}

/// One schema file (an area).
struct SchemaFile {
    var path: String
    var area: String
    var doc: String
    var jsonSchemaRoot: String?
    var definitions: [Definition]
}

/// A problem in the schema, reported as "FILE: WHERE: WHAT".
struct SchemaProblem: Error, CustomStringConvertible {
    var file: String
    var message: String
    var description: String { "\(file): \(message)" }
}

/// The built-in types: name → (Swift type, introspection json-type, JSON Schema type).
let builtins: [String: (swift: String, jsonType: String, jsonSchema: String?)] = [
    "str": ("String", "string", "string"),
    "int": ("Int64", "int", "integer"),
    "number": ("Double", "number", "number"),
    "bool": ("Bool", "boolean", "boolean"),
    "any": ("JSONValue", "value", nil),
]

let knownFormats: Set<String> = ["size", "host-port", "path"]

/// Reads and checks every schema file; throws all problems found at once.
struct SchemaLoader {
    var problems: [SchemaProblem] = []

    mutating func load(files: [(path: String, text: String)]) -> [SchemaFile] {
        var out: [SchemaFile] = []
        for f in files {
            do {
                let node = try JSONReader.parse(f.text)
                if let file = parseFile(node, path: f.path) { out.append(file) }
            } catch {
                problems.append(SchemaProblem(file: f.path, message: "not valid JSON: \(error)"))
            }
        }
        check(out)
        return out
    }

    private mutating func problem(_ file: String, _ message: String) {
        problems.append(SchemaProblem(file: file, message: message))
    }

    private mutating func parseFile(_ node: JNode, path: String) -> SchemaFile? {
        guard case .object(let top) = node else {
            problem(path, "the top level must be an object with 'area', 'doc' and 'definitions'")
            return nil
        }
        for (k, _) in top where !["area", "doc", "definitions", "json-schema-root"].contains(k) {
            problem(path, "unknown top-level key '\(k)'")
        }
        guard case .string(let area)? = node["area"] else { problem(path, "missing string 'area'"); return nil }
        guard case .string(let doc)? = node["doc"], !doc.isEmpty else { problem(path, "missing 'doc'"); return nil }
        guard case .array(let defs)? = node["definitions"] else { problem(path, "missing array 'definitions'"); return nil }
        var root: String?
        if let r = node["json-schema-root"] {
            guard case .string(let s) = r else { problem(path, "'json-schema-root' must be a type name"); return nil }
            root = s
        }
        var file = SchemaFile(path: path, area: area, doc: doc, jsonSchemaRoot: root, definitions: [])
        for (i, d) in defs.enumerated() {
            if let def = parseDefinition(d, file: path, index: i) { file.definitions.append(def) }
        }
        return file
    }

    private mutating func parseDefinition(_ node: JNode, file: String, index: Int) -> Definition? {
        guard case .object(let members) = node else {
            problem(file, "definition #\(index + 1) is not an object")
            return nil
        }
        let kinds = ["enum", "struct", "union", "command", "event"].filter { node[$0] != nil }
        guard kinds.count == 1, case .string(let name)? = node[kinds[0]] else {
            problem(file, "definition #\(index + 1) must have exactly one of enum, struct, union, command, event with a name")
            return nil
        }
        let keyword = kinds[0]
        let whereText = "\(keyword) '\(name)'"
        let allowedKeys: [String: Set<String>] = [
            "enum": ["enum", "doc", "data"],
            "struct": ["struct", "doc", "data", "base"],
            "union": ["union", "doc", "base", "discriminator", "data"],
            "command": ["command", "doc", "data", "returns", "example", "extra-members"],
            "event": ["event", "doc", "data", "example"],
        ]
        for (k, _) in members where !allowedKeys[keyword]!.contains(k) {
            problem(file, "\(whereText): unknown key '\(k)'")
        }
        // Names: types are CamelCase, commands lower-case with - or _, events upper-case.
        let namePattern: (String) -> Bool
        switch keyword {
        case "command": namePattern = { isName($0, first: "abcdefghijklmnopqrstuvwxyz", rest: "abcdefghijklmnopqrstuvwxyz0123456789-_") }
        case "event": namePattern = { isName($0, first: "ABCDEFGHIJKLMNOPQRSTUVWXYZ", rest: "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") }
        default: namePattern = { isName($0, first: "ABCDEFGHIJKLMNOPQRSTUVWXYZ", rest: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") }
        }
        if !namePattern(name) { problem(file, "\(whereText): bad name syntax") }
        guard case .string(let doc)? = node["doc"], !doc.isEmpty else {
            problem(file, "\(whereText): missing 'doc' (every definition is documented beside it)")
            return nil
        }
        var example: [String] = []
        if let e = node["example"] {
            guard case .array(let lines) = e, !lines.isEmpty else {
                problem(file, "\(whereText): 'example' must be a non-empty array of strings")
                return nil
            }
            for l in lines {
                guard case .string(let s) = l else { problem(file, "\(whereText): 'example' lines must be strings"); return nil }
                example.append(s)
            }
        } else if keyword == "command" || keyword == "event" {
            problem(file, "\(whereText): missing 'example'")
        }
        let kind: Definition.Kind
        var extra: Member?
        switch keyword {
        case "enum":
            guard case .array(let vals)? = node["data"], !vals.isEmpty else {
                problem(file, "\(whereText): 'data' must be a non-empty array of values")
                return nil
            }
            var values: [String] = []
            for v in vals {
                guard case .string(let s) = v, isName(s, first: "abcdefghijklmnopqrstuvwxyz0123456789", rest: "abcdefghijklmnopqrstuvwxyz0123456789-_") else {
                    problem(file, "\(whereText): bad enum value \(v.render())")
                    continue
                }
                if values.contains(s) { problem(file, "\(whereText): duplicate value '\(s)'") }
                values.append(s)
            }
            kind = .enumeration(values: values)
        case "struct":
            guard let data = node["data"], let ms = parseMembers(data, file: file, where: whereText) else {
                problem(file, "\(whereText): 'data' must be an object of members")
                return nil
            }
            var base: String?
            if let b = node["base"] {
                guard case .string(let s) = b else { problem(file, "\(whereText): 'base' must be a struct name"); return nil }
                base = s
            }
            kind = .structure(base: base, members: ms)
        case "union":
            var baseMembers: [Member] = []
            var baseName: String?
            switch node["base"] {
            case .string(let s)?: baseName = s
            case let b? where b.kind == "object":
                guard let ms = parseMembers(b, file: file, where: whereText) else { return nil }
                baseMembers = ms
            default:
                problem(file, "\(whereText): 'base' must be a struct name or an object of members")
                return nil
            }
            guard case .string(let disc)? = node["discriminator"] else {
                problem(file, "\(whereText): missing 'discriminator'")
                return nil
            }
            guard case .object(let bs)? = node["data"], !bs.isEmpty else {
                problem(file, "\(whereText): 'data' must map discriminator values to struct names")
                return nil
            }
            var branches: [(String, String)] = []
            for (k, v) in bs {
                guard case .string(let t) = v else { problem(file, "\(whereText): branch '\(k)' must name a struct"); continue }
                branches.append((k, t))
            }
            kind = .union(baseMembers: baseMembers, baseName: baseName, discriminator: disc, branches: branches)
        case "command":
            var args: [Member]?
            var argType: String?
            switch node["data"] {
            case nil: break
            case .string(let s)?: argType = s
            case let d?:
                guard let ms = parseMembers(d, file: file, where: whereText) else { return nil }
                args = ms
            }
            var returns: TypeRef?
            if let r = node["returns"] {
                guard let t = parseTypeRef(r) else { problem(file, "\(whereText): bad 'returns' \(r.render())"); return nil }
                returns = t
            }
            kind = .command(arguments: args, argumentType: argType, returns: returns)
            if let e = node["extra-members"] {
                guard args != nil else {
                    problem(file, "\(whereText): 'extra-members' needs 'data' to be an object of members")
                    return nil
                }
                guard case .object(let attrs) = e, case .string("any")? = e["type"], case .string(let d)? = e["doc"], !d.isEmpty else {
                    problem(file, "\(whereText): 'extra-members' must be {\"type\": \"any\", \"doc\": \"...\"} (only 'any' is supported)")
                    return nil
                }
                for (k, _) in attrs where !["type", "doc"].contains(k) {
                    problem(file, "\(whereText): 'extra-members': unknown attribute '\(k)'")
                }
                extra = Member(name: "extra-members", optional: true, type: .named("any"), doc: d)
            }
        default:
            var data: [Member]?
            if let d = node["data"] {
                guard let ms = parseMembers(d, file: file, where: whereText) else { return nil }
                data = ms
            }
            kind = .event(data: data)
        }
        return Definition(name: name, kind: kind, doc: doc, example: example, file: file, extraMembers: extra)
    }

    private func parseTypeRef(_ node: JNode) -> TypeRef? {
        switch node {
        case .string(let s) where !s.isEmpty: return .named(s)
        case .array(let a):
            if a.count == 1, case .string(let s) = a[0], !s.isEmpty { return .array(s) }
            return nil
        default: return nil
        }
    }

    private mutating func parseMembers(_ node: JNode, file: String, where whereText: String) -> [Member]? {
        guard case .object(let entries) = node else {
            problem(file, "\(whereText): members must be an object")
            return nil
        }
        var out: [Member] = []
        for (rawName, spec) in entries {
            let optional = rawName.hasPrefix("*")
            let name = optional ? String(rawName.dropFirst()) : rawName
            guard memberNameExceptions.contains(name)
                    || isName(name, first: "abcdefghijklmnopqrstuvwxyz", rest: "abcdefghijklmnopqrstuvwxyz0123456789-_") else {
                problem(file, "\(whereText): bad member name '\(rawName)' (lower-case letters, digits, '-' and '_', optionally prefixed by one '*')")
                continue
            }
            if out.contains(where: { $0.name == name }) {
                problem(file, "\(whereText): duplicate member '\(name)'")
                continue
            }
            var m = Member(name: name, optional: optional, type: .named("str"))
            if let t = parseTypeRef(spec) {
                m.type = t
            } else if case .object(let attrs) = spec {
                for (k, _) in attrs where !["type", "doc", "minimum", "maximum", "format", "default"].contains(k) {
                    problem(file, "\(whereText): member '\(name)': unknown attribute '\(k)'")
                }
                guard let tn = spec["type"], let t = parseTypeRef(tn) else {
                    problem(file, "\(whereText): member '\(name)': missing or bad 'type'")
                    continue
                }
                m.type = t
                if case .string(let d)? = spec["doc"] { m.doc = d }
                m.minimum = spec["minimum"]
                m.maximum = spec["maximum"]
                if let f = spec["format"] {
                    guard case .string(let fs) = f, knownFormats.contains(fs) else {
                        problem(file, "\(whereText): member '\(name)': unknown format \(f.render()) (known: \(knownFormats.sorted().joined(separator: ", ")))")
                        continue
                    }
                    m.format = fs
                }
                m.defaultValue = spec["default"]
                if m.defaultValue != nil && !optional {
                    problem(file, "\(whereText): member '\(name)': only optional members may have a default")
                }
            } else {
                problem(file, "\(whereText): member '\(name)': the type must be a name, [name], or an object with 'type'")
                continue
            }
            out.append(m)
        }
        return out
    }

    /// Cross-definition checks: duplicate names, unknown references, union consistency.
    private mutating func check(_ files: [SchemaFile]) {
        var seen: [String: String] = [:]
        for f in files {
            for d in f.definitions {
                if builtins[d.name] != nil { problem(f.path, "\(d.keyword) '\(d.name)': redefines the built-in type") }
                if let other = seen[d.name] {
                    problem(f.path, "\(d.keyword) '\(d.name)': duplicate name (already defined in \(other))")
                }
                seen[d.name] = f.path
            }
        }
        let all = files.flatMap(\.definitions)
        let byName = Dictionary(all.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        func isType(_ n: String) -> Bool {
            if builtins[n] != nil { return true }
            guard let d = byName[n] else { return false }
            switch d.kind {
            case .enumeration, .structure, .union: return true
            default: return false
            }
        }
        func isStruct(_ n: String) -> Bool {
            if case .structure? = byName[n]?.kind { return true }
            return false
        }
        /// A union may be a command's whole argument object (QAPI's 'boxed': netdev_add takes a Netdev).
        func isUnion(_ n: String) -> Bool {
            if case .union? = byName[n]?.kind { return true }
            return false
        }
        for d in all {
            let w = "\(d.keyword) '\(d.name)'"
            func checkMembers(_ ms: [Member]) {
                for m in ms {
                    if !isType(m.type.element) {
                        problem(d.file, "\(w): member '\(m.name)' refers to unknown type '\(m.type.element)'")
                        continue
                    }
                    let isInt = m.type == .named("int"), isStr = m.type == .named("str")
                    if (m.minimum != nil || m.maximum != nil) && !isInt && !(isStr && m.format == "size") {
                        problem(d.file, "\(w): member '\(m.name)': minimum/maximum apply only to int or size-format str members")
                    }
                    if isInt {
                        for b in [m.minimum, m.maximum] {
                            if let b, case .number(let t) = b, Int64(t) != nil { continue }
                            if b != nil { problem(d.file, "\(w): member '\(m.name)': minimum/maximum must be integers") }
                        }
                    }
                    if m.format == "size" {
                        for b in [m.minimum, m.maximum] where b != nil {
                            guard case .string? = b else {
                                problem(d.file, "\(w): member '\(m.name)': size bounds must be size strings")
                                continue
                            }
                        }
                    }
                    if m.format != nil && !isStr { problem(d.file, "\(w): member '\(m.name)': format applies only to str members") }
                    if let dv = m.defaultValue { checkDefault(dv, m, w, d.file) }
                    if ["json", "json-members", "variant", "member-names", "extra-members"].contains(m.name) {
                        problem(d.file, "\(w): member name '\(m.name)' is reserved by the generated code")
                    }
                }
            }
            func checkDefault(_ dv: JNode, _ m: Member, _ w: String, _ file: String) {
                let ok: Bool
                switch (m.type, dv) {
                case (.named("int"), .number(let t)): ok = Int64(t) != nil
                case (.named("bool"), .bool): ok = true
                case (.named("str"), .string): ok = true
                case (.named(let n), .string(let s)):
                    if case .enumeration(let vals)? = byName[n]?.kind { ok = vals.contains(s) } else { ok = false }
                default: ok = false
                }
                if !ok { problem(file, "\(w): member '\(m.name)': default \(dv.render()) does not fit type \(m.type.introspectionName)") }
            }
            switch d.kind {
            case .enumeration: break
            case .structure(let base, let ms):
                if let base, !isStruct(base) { problem(d.file, "\(w): base '\(base)' is not a struct") }
                checkMembers(ms)
                if let base, case .structure(_, let bms)? = byName[base]?.kind {
                    for m in ms where bms.contains(where: { $0.name == m.name }) {
                        problem(d.file, "\(w): member '\(m.name)' clashes with base '\(base)'")
                    }
                }
            case .union(let baseMembers, let baseName, let disc, let branches):
                var base = baseMembers
                if let baseName {
                    if case .structure(_, let ms)? = byName[baseName]?.kind { base = ms } else {
                        problem(d.file, "\(w): base '\(baseName)' is not a struct")
                        continue
                    }
                }
                checkMembers(baseMembers)
                guard let tag = base.first(where: { $0.name == disc }) else {
                    problem(d.file, "\(w): discriminator '\(disc)' is not a member of the base")
                    continue
                }
                guard !tag.optional, case .named(let tagType) = tag.type, case .enumeration(let values)? = byName[tagType]?.kind else {
                    problem(d.file, "\(w): discriminator '\(disc)' must be a required member of enum type")
                    continue
                }
                for (value, type) in branches {
                    if !values.contains(value) { problem(d.file, "\(w): branch '\(value)' is not a value of enum '\(tagType)'") }
                    if !isStruct(type) {
                        problem(d.file, "\(w): branch '\(value)' refers to '\(type)', which is not a struct")
                        continue
                    }
                    if case .structure(_, let vms)? = byName[type]?.kind {
                        for m in vms where base.contains(where: { $0.name == m.name }) {
                            problem(d.file, "\(w): branch '\(value)' member '\(m.name)' clashes with the base")
                        }
                    }
                }
            case .command(let args, let argType, let returns):
                if let args { checkMembers(args) }
                // A named argument type is a struct or (QEMU's 'boxed': true) a union.
                if let argType, !isStruct(argType), !isUnion(argType) {
                    problem(d.file, "\(w): 'data' refers to '\(argType)', which is not a struct or union")
                }
                if let returns, !isType(returns.element) {
                    problem(d.file, "\(w): 'returns' refers to unknown type '\(returns.element)'")
                }
            case .event(let data):
                if let data { checkMembers(data) }
            }
        }
        for f in files {
            if let root = f.jsonSchemaRoot, !isStruct(root) {
                problem(f.path, "json-schema-root '\(root)' is not a struct")
            }
        }
    }
}

/// Member names QEMU's own schema spells against its naming rule, kept as QEMU has them on the
/// wire (QAPI's `member-name-exceptions` pragma): `UuidInfo`'s `UUID`.
let memberNameExceptions: Set<String> = ["UUID"]

func isName(_ s: String, first: String, rest: String) -> Bool {
    guard let f = s.first, first.contains(f) else { return false }
    return s.dropFirst().allSatisfy { rest.contains($0) }
}
