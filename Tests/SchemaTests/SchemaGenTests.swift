import Foundation
import Testing
@testable import Schema

/// Runs the built schema-gen executable (it sits next to the test bundle) on schema directories.
@Suite struct SchemaGenTests {
    static var generator: URL? {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<3 {
            let candidate = dir.appendingPathComponent("schema-gen")
            if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return nil
    }

    static var packageRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    /// Writes `files` into a fresh root's schema/ and runs the generator; returns (status, stderr).
    func run(_ files: [String: String], extra: [String] = []) throws -> (Int32, String) {
        guard let gen = Self.generator else {
            Issue.record("schema-gen executable not found next to the test bundle (build it first)")
            return (-1, "")
        }
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("schema-gen-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root.appendingPathComponent("schema"), withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: root) }
        for (name, text) in files {
            try text.write(to: root.appendingPathComponent("schema/\(name)"), atomically: true, encoding: .utf8)
        }
        return try exec(gen, ["--root", root.path] + extra)
    }

    func exec(_ gen: URL, _ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = gen
        p.arguments = args
        let err = Pipe()
        p.standardError = err
        p.standardOutput = Pipe()
        try p.run()
        let data = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    func file(_ defs: String) -> String { #"{"area": "t", "doc": "Test.", "definitions": [\#(defs)]}"# }

    @Test func acceptsAValidSchema() throws {
        let (status, err) = try run(["a.json": file(#"{"struct": "Foo", "doc": "A foo.", "data": {"*x": "int"}}"#)])
        #expect(status == 0, "stderr: \(err)")
    }

    @Test func rejectsUnknownTypeReference() throws {
        let (status, err) = try run(["a.json": file(#"{"struct": "Foo", "doc": "A foo.", "data": {"x": "Nope"}}"#)])
        #expect(status == 1)
        #expect(err.contains("schema/a.json: struct 'Foo': member 'x' refers to unknown type 'Nope'"))
    }

    @Test func rejectsDuplicateNamesAcrossFiles() throws {
        let def = #"{"enum": "Dup", "doc": "D.", "data": ["a"]}"#
        let (status, err) = try run(["a.json": file(def), "b.json": file(def)])
        #expect(status == 1)
        #expect(err.contains("enum 'Dup': duplicate name (already defined in schema/a.json)"))
    }

    @Test func rejectsBadMemberSyntax() throws {
        let (status, err) = try run(["a.json": file(#"{"struct": "Foo", "doc": "F.", "data": {"**x": "int", "Bad Name": "str"}}"#)])
        #expect(status == 1)
        #expect(err.contains("bad member name '**x'"))
        #expect(err.contains("bad member name 'Bad Name'"))
    }

    @Test func rejectsUndocumentedDefinitionsAndBadUnions() throws {
        let defs = #"""
        {"struct": "NoDoc", "data": {}},
        {"enum": "E", "doc": "E.", "data": ["a", "b"]},
        {"union": "U", "doc": "U.", "base": {"kind": "E"}, "discriminator": "kind", "data": {"c": "E"}}
        """#
        let (status, err) = try run(["a.json": file(defs)])
        #expect(status == 1)
        #expect(err.contains("struct 'NoDoc': missing 'doc'"))
        #expect(err.contains("union 'U': branch 'c' is not a value of enum 'E'"))
        #expect(err.contains("union 'U': branch 'c' refers to 'E', which is not a struct"))
    }

    @Test func extraMembersAreCheckedAndKeptByTheGeneratedDecoder() throws {
        let good = #"{"command": "c", "doc": "C.", "data": {"a": "str"}, "extra-members": {"type": "any", "doc": "More."}, "example": ["x"]}"#
        #expect(try run(["a.json": file(good)]).0 == 0)
        let defs = #"""
        {"command": "c1", "doc": "C.", "extra-members": {"type": "any", "doc": "More."}, "example": ["x"]},
        {"command": "c2", "doc": "C.", "data": {"a": "str"}, "extra-members": {"type": "int", "doc": "More."}, "example": ["x"]},
        {"command": "c3", "doc": "C.", "data": {"a": "str"}, "extra-members": {"type": "any", "doc": "M.", "x": 1}, "example": ["x"]},
        {"struct": "S", "doc": "S.", "data": {"a": "str"}, "extra-members": {"type": "any", "doc": "M."}}
        """#
        let (status, err) = try run(["a.json": file(defs)])
        #expect(status == 1)
        #expect(err.contains("command 'c1': 'extra-members' needs 'data' to be an object of members"))
        #expect(err.contains("command 'c2': 'extra-members' must be"))
        #expect(err.contains("command 'c3': 'extra-members': unknown attribute 'x'"))
        #expect(err.contains("struct 'S': unknown key 'extra-members'"))
        // The generated decoder keeps unknown members of such a command, in order, and still
        // checks the listed ones.
        let a = try DeviceAddArguments(json: ["driver": "virtio-blk-pci", "drive": "n1", "addr": 0], at: .root)
        #expect(a.driver == "virtio-blk-pci" && a.extraMembers.keys == ["drive", "addr"])
        #expect(a.json == ["driver": "virtio-blk-pci", "drive": "n1", "addr": 0])
        #expect(throws: SchemaDecodingError.self) { try DeviceAddArguments(json: ["drive": "n1"], at: .root) }
        #expect(throws: SchemaDecodingError.self) { try DeviceDelArguments(json: ["id": "x", "extra": 1], at: .root) }
        #expect(QMPCommand.acceptingExtraMembers == ["device_add"])
    }

    @Test func aUnionMayBeACommandsArguments() throws {
        let defs = #"""
        {"enum": "K", "doc": "K.", "data": ["a"]},
        {"struct": "A", "doc": "A.", "data": {"x": "int"}},
        {"union": "U", "doc": "U.", "base": {"kind": "K"}, "discriminator": "kind", "data": {"a": "A"}},
        {"command": "c", "doc": "C.", "data": "U", "example": ["x"]},
        {"command": "d", "doc": "D.", "data": "K", "example": ["x"]}
        """#
        let (status, err) = try run(["a.json": file(defs)])
        #expect(status == 1)
        #expect(!err.contains("command 'c'"))
        #expect(err.contains("command 'd': 'data' refers to 'K', which is not a struct or union"))
    }

    @Test func rejectsInvalidJSON() throws {
        let (status, err) = try run(["a.json": #"{"area": "t", "doc": "x", "definitions": [],}"#])
        #expect(status == 1)
        #expect(err.contains("schema/a.json: not valid JSON: line 1"))
    }

    @Test func committedGeneratedFilesAreCurrent() throws {
        guard let gen = Self.generator else {
            Issue.record("schema-gen executable not found")
            return
        }
        let (status, err) = try exec(gen, ["--check", "--root", Self.packageRoot.path])
        #expect(status == 0, "stderr: \(err)")
    }

    @Test func checkFailsWhenGeneratedFilesAreStale() throws {
        let (status, err) = try run(["a.json": file(#"{"enum": "E", "doc": "E.", "data": ["a"]}"#)], extra: ["--check"])
        #expect(status == 1)
        #expect(err.contains("generated files are stale"))
    }

    @Test func introspectionDecodesWithTheGeneratedTypes() throws {
        let infos = try QMPIntrospection.schemaInfo()
        let commands = infos.filter { $0.metaType == .command }.map(\.name)
        #expect(commands == QMPCommand.names)
        #expect(infos.contains { $0.name == "q_empty" })
        // Every type name an entity refers to is itself listed.
        let names = Set(infos.map(\.name))
        for info in infos {
            switch info.variant {
            case .command(let c): #expect(names.contains(c.argType) && names.contains(c.retType), "\(info.name)")
            case .object(let o): for m in o.members { #expect(names.contains(m.type), "\(info.name).\(m.name)") }
            case .array(let a): #expect(names.contains(a.elementType))
            default: break
            }
        }
    }
}
