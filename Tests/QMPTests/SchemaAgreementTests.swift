import Schema
import Testing
@testable import QMP

/// Walks every command in query-qmp-schema and checks that the server's argument checking
/// agrees with the schema: unknown, missing and wrongly typed arguments are refused before any
/// side effect.
@Suite struct SchemaAgreementTests {
    /// A value of the right type for a member type name.
    func sample(_ type: String, _ infos: [String: SchemaInfo]) -> JSONValue {
        switch type {
        case "int": return 0
        case "str": return "serial0"
        case "bool": return true
        case "number": return 1.5
        case "any": return nil
        default: break
        }
        guard let info = infos[type] else { return nil }
        switch info.variant {
        case .enum(let e): return .string(e.values.first ?? "")
        case .array(let a): return [sample(a.elementType, infos)]
        case .object(let o):
            var obj = JSONObject()
            for m in o.members where m.default == nil { obj[m.name] = sample(m.type, infos) }
            // A union: take its first branch, with the tag naming it.
            if let tag = o.tag, let branch = o.variants?.first {
                obj[tag] = .string(branch.case)
                if case .object(let b) = sample(branch.type, infos) { for m in b { obj[m.key] = m.value } }
            }
            return .object(obj)
        default: return nil
        }
    }

    /// A value of the wrong JSON type for a member type name.
    func wrong(_ type: String, _ infos: [String: SchemaInfo]) -> JSONValue? {
        switch type {
        case "int", "number": return "x"
        case "str", "bool": return 3
        case "any": return nil
        default:
            guard let info = infos[type] else { return nil }
            switch info.variant {
            case .enum: return 3
            case .array, .object: return "x"
            default: return nil
            }
        }
    }

    @Test func everyCommandValidatesArgumentsAsTheSchemaSays() throws {
        let list = try QMPIntrospection.schemaInfo()
        let infos = Dictionary(list.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var h = Harness()
        var checked = 0
        for info in list {
            guard case .command(let cmd) = info.variant, info.name != "qmp_capabilities" else { continue }
            guard case .object(let args)? = infos[cmd.argType]?.variant else {
                Issue.record("\(info.name): arg-type \(cmd.argType) is not an object")
                continue
            }
            func request(_ a: JSONObject) -> String {
                (["execute": .string(info.name), "arguments": .object(a)] as JSONValue).serialized()
            }
            let valid = sample(cmd.argType, infos).objectValue ?? JSONObject()

            var unknown = valid
            unknown["no-such-argument"] = 1
            let e1 = errorOf(h.one(request(unknown)))
            if QMPCommand.acceptingExtraMembers.contains(info.name) {
                // The member reaches the handler, which names it (device_add's driver properties).
                #expect(e1?.1 != "Parameter 'no-such-argument' is unexpected", "\(info.name)")
            } else {
                #expect(e1?.1 == "Parameter 'no-such-argument' is unexpected", "\(info.name)")
            }

            for m in args.members {
                if m.default == nil {
                    var missing = valid
                    missing[m.name] = nil
                    #expect(errorOf(h.one(request(missing)))?.1 == "Parameter '\(m.name)' is missing", "\(info.name).\(m.name)")
                }
                if let bad = wrong(m.type, infos) {
                    var typed = valid
                    typed[m.name] = bad
                    let e = errorOf(h.one(request(typed)))
                    #expect(e?.0 == "GenericError", "\(info.name).\(m.name)")
                    #expect(e?.1.contains("'\(m.name)'") == true, "\(info.name).\(m.name): \(String(describing: e))")
                }
            }
            checked += 1
        }
        #expect(checked == QMPCommand.names.count - 1)
        // None of the refused requests reached the machine.
        #expect(h.machine.calls.isEmpty)
    }
}
