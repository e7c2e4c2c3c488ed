/// Builds the `query-qmp-schema` answer, the JSON Schema export and the docs page.
struct DataEmitter {
    let swift: SwiftEmitter
    var files: [SchemaFile] { swift.files }
    var byName: [String: Definition] { swift.byName }

    // MARK: introspection

    func objectMembers(_ ms: [Member]) -> JNode {
        .array(ms.map { m in
            var o: [(String, JNode)] = [("name", .string(m.name)), ("type", .string(m.type.introspectionName))]
            if m.optional { o.append(("default", .null)) }
            return .object(o)
        })
    }

    /// The SchemaInfo list: commands and events in schema order, then every type they reach.
    func introspection() -> JNode {
        var entries: [JNode] = []
        var emitted: Set<String> = []
        var queue: [String] = []
        func want(_ name: String) {
            if !emitted.contains(name) && !queue.contains(name) { queue.append(name) }
        }
        func want(_ t: TypeRef) {
            if case .array(let e) = t { want("[\(e)]") }
            want(t.element)
        }
        func argType(_ name: String, _ ms: [Member]?) -> String {
            guard let ms else { want("q_empty"); return "q_empty" }
            let n = "q_obj_\(name)-arg"
            entries.append(.object([("name", .string(n)), ("meta-type", .string("object")), ("members", objectMembers(ms))]))
            emitted.insert(n)
            ms.forEach { want($0.type) }
            return n
        }
        for d in files.flatMap(\.definitions) {
            switch d.kind {
            case .command(let args, let named, let returns):
                let a: String
                if let named { want(named); a = named } else { a = argType(d.name, args) }
                let r: String
                if let returns { want(returns); r = returns.introspectionName } else { want("q_empty"); r = "q_empty" }
                entries.append(.object([("name", .string(d.name)), ("meta-type", .string("command")),
                                        ("arg-type", .string(a)), ("ret-type", .string(r))]))
            case .event(let data):
                let a = argType(d.name, data)
                entries.append(.object([("name", .string(d.name)), ("meta-type", .string("event")), ("arg-type", .string(a))]))
            default: break
            }
        }
        while !queue.isEmpty {
            let n = queue.removeFirst()
            emitted.insert(n)
            if n == "q_empty" {
                entries.append(.object([("name", .string(n)), ("meta-type", .string("object")), ("members", .array([]))]))
            } else if n.hasPrefix("[") {
                let e = String(n.dropFirst().dropLast())
                entries.append(.object([("name", .string(n)), ("meta-type", .string("array")), ("element-type", .string(e))]))
            } else if let b = builtins[n] {
                entries.append(.object([("name", .string(n)), ("meta-type", .string("builtin")), ("json-type", .string(b.jsonType))]))
            } else if let d = byName[n] {
                switch d.kind {
                case .enumeration(let values):
                    entries.append(.object([("name", .string(n)), ("meta-type", .string("enum")),
                                            ("members", .array(values.map { .object([("name", .string($0))]) })),
                                            ("values", .array(values.map { .string($0) }))]))
                case .structure:
                    let ms = swift.structMembers(n)
                    ms.forEach { want($0.type) }
                    entries.append(.object([("name", .string(n)), ("meta-type", .string("object")), ("members", objectMembers(ms))]))
                case .union(_, _, let disc, let branches):
                    let ms = swift.unionBase(d)
                    ms.forEach { want($0.type) }
                    branches.forEach { want($0.1) }
                    entries.append(.object([("name", .string(n)), ("meta-type", .string("object")), ("members", objectMembers(ms)),
                                            ("tag", .string(disc)),
                                            ("variants", .array(branches.map { .object([("case", .string($0.0)), ("type", .string($0.1))]) }))]))
                default: break
                }
            }
        }
        return .array(entries)
    }

    // MARK: JSON Schema

    func jsonSchema(root: String, area: SchemaFile) -> JNode {
        var defs: [(String, JNode)] = []
        var done: Set<String> = []
        func ref(_ t: TypeRef, _ m: Member?) -> JNode {
            var node: [(String, JNode)]
            if let b = builtins[t.element] {
                node = b.jsonSchema.map { [("type", .string($0))] } ?? []
                if let m {
                    if t == .named("int") {
                        if let lo = m.minimum { node.append(("minimum", lo)) }
                        if let hi = m.maximum { node.append(("maximum", hi)) }
                    }
                    switch m.format {
                    case "size": node.append(("pattern", .string("^[0-9]+[KMGTkmgt]?$")))
                    case "host-port": node.append(("pattern", .string("^(\\\\[[0-9A-Fa-f:.]+\\\\]|[^:\\\\[\\\\]]+):[0-9]{1,5}$")))
                    case "path": node.append(("minLength", .number("1")))
                    default: break
                    }
                }
            } else {
                define(t.element)
                node = [("$ref", .string("#/$defs/\(t.element)"))]
            }
            if case .array = t { node = [("type", .string("array")), ("items", .object(node))] }
            if let m {
                if let doc = m.doc { node.append(("description", .string(doc))) }
                if let d = m.defaultValue { node.append(("default", d)) }
            }
            return .object(node)
        }
        func objectSchema(_ ms: [Member], doc: String?, constTag: (String, String)? = nil) -> JNode {
            var props: [(String, JNode)] = []
            for m in ms {
                if let c = constTag, m.name == c.0 {
                    props.append((m.name, .object([("const", .string(c.1))])))
                } else {
                    props.append((m.name, ref(m.type, m)))
                }
            }
            var o: [(String, JNode)] = [("type", .string("object"))]
            if let doc { o.append(("description", .string(doc))) }
            o.append(("properties", .object(props)))
            let req = ms.filter { !$0.optional }.map { JNode.string($0.name) }
            if !req.isEmpty { o.append(("required", .array(req))) }
            o.append(("additionalProperties", .bool(false)))
            return .object(o)
        }
        func define(_ name: String) {
            guard !done.contains(name), let d = byName[name] else { return }
            done.insert(name)
            let node: JNode
            switch d.kind {
            case .enumeration(let values):
                node = .object([("description", .string(d.doc)), ("enum", .array(values.map { .string($0) }))])
            case .structure:
                node = objectSchema(swift.structMembers(name), doc: d.doc)
            case .union(_, _, let disc, let branches):
                let base = swift.unionBase(d)
                let tag = base.first { $0.name == disc }!
                guard case .enumeration(let values)? = byName[tag.type.element]?.kind else { return }
                let bt = Dictionary(branches, uniquingKeysWith: { a, _ in a })
                let alts: [JNode] = values.map { v in
                    let extra = bt[v].map { swift.structMembers($0) } ?? []
                    return objectSchema(base + extra, doc: nil, constTag: (disc, v))
                }
                node = .object([("description", .string(d.doc)), ("oneOf", .array(alts))])
            default: return
            }
            defs.append((name, node))
        }
        let rootNode = objectSchema(swift.structMembers(root), doc: byName[root]?.doc)
        guard case .object(var top) = rootNode else { return rootNode }
        top.insert(("$schema", .string("https://json-schema.org/draft/2020-12/schema")), at: 0)
        top.insert(("$id", .string("https://machine-server.invalid/schema/\(area.area).schema.json")), at: 1)
        top.insert(("title", .string(root)), at: 2)
        top.append(("$defs", .object(defs)))
        return .object(top)
    }

    // MARK: docs

    func docsPage() -> String {
        var out = "<!-- Generated by schema-gen from schema/*.json. Do not edit; run `swift run schema-gen`. -->\n\n"
        out += "# machine-server schema reference\n\n"
        out += "Every QMP command, event and type, and the machine description, as defined in `schema/`.\n"
        out += "Optional members are marked with `*` (as in QEMU's QAPI). Types in `[...]` are arrays.\n\n"
        for f in files {
            out += "## \(f.area) (`\(f.path.split(separator: "/").last ?? "")`)\n\n\(f.doc)\n\n"
            for d in f.definitions {
                out += "### \(d.keyword) `\(d.name)`\n\n\(d.doc)\n\n"
                func table(_ ms: [Member], title: String) {
                    guard !ms.isEmpty else { return }
                    out += "\(title):\n\n| member | type | description |\n|---|---|---|\n"
                    for m in ms {
                        var extra: [String] = []
                        if let lo = m.minimum { extra.append("minimum \(lo.render())") }
                        if let hi = m.maximum { extra.append("maximum \(hi.render())") }
                        if let f = m.format { extra.append("format \(f)") }
                        if let dv = m.defaultValue { extra.append("default \(dv.render())") }
                        let desc = (m.doc ?? "") + (extra.isEmpty ? "" : " (\(extra.joined(separator: ", ")))")
                        out += "| `\(m.optional ? "*" : "")\(m.name)` | `\(m.type.introspectionName)` | \(desc.replacingOccurrences(of: "|", with: "\\|")) |\n"
                    }
                    out += "\n"
                }
                switch d.kind {
                case .enumeration(let values):
                    out += "Values: " + values.map { "`\($0)`" }.joined(separator: ", ") + "\n\n"
                case .structure(let base, let ms):
                    if let base { out += "Base: `\(base)`\n\n" }
                    table(ms, title: "Members")
                case .union(let bm, let bn, let disc, let branches):
                    if let bn { out += "Base: `\(bn)`\n\n" } else { table(bm, title: "Base members") }
                    out += "Discriminator: `\(disc)`\n\n"
                    out += branches.map { "- `\($0.0)`: `\($0.1)`" }.joined(separator: "\n") + "\n\n"
                case .command(let args, let named, let returns):
                    if let named { out += "Arguments: `\(named)`\n\n" }
                    if let args { table(args, title: "Arguments") }
                    if let e = d.extraMembers {
                        out += "Other members: any member not listed above is accepted (`any`): \(e.doc ?? "")\n\n"
                    }
                    out += "Returns: " + (returns.map { "`\($0.introspectionName)`" } ?? "nothing (`{}`)") + "\n\n"
                case .event(let data):
                    if let data { table(data, title: "Data") }
                }
                if !d.example.isEmpty {
                    out += "Example:\n\n```\n" + d.example.joined(separator: "\n") + "\n```\n\n"
                }
            }
        }
        return out
    }
}
