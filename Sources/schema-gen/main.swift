// schema-gen: compiles schema/*.json into Swift sources (Sources/Schema/Generated), the JSON
// Schema export of the machine description, and docs/schema.md.
//
// Usage: schema-gen [--check] [--root DIR]
//   --check   write nothing; exit 1 listing the files that are stale.
//   --root    the package root (default: the current directory).
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("schema-gen: error: \(message)\n".utf8))
    exit(1)
}

var check = false
var root = FileManager.default.currentDirectoryPath
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--check": check = true
    case "--root":
        guard let r = args.popFirst() else { fail("--root needs a directory") }
        root = r
    case "-h", "--help":
        print("usage: schema-gen [--check] [--root DIR]")
        exit(0)
    default: fail("unknown argument '\(a)'")
    }
}

let schemaDir = root + "/schema"
let names: [String]
do {
    names = try FileManager.default.contentsOfDirectory(atPath: schemaDir)
        .filter { $0.hasSuffix(".json") && !$0.hasSuffix(".schema.json") }.sorted()
} catch {
    fail("cannot list \(schemaDir): \(error.localizedDescription)")
}
if names.isEmpty { fail("no schema files in \(schemaDir)") }
var inputs: [(path: String, text: String)] = []
for n in names {
    let path = "schema/\(n)"
    guard let data = FileManager.default.contents(atPath: schemaDir + "/" + n) else { fail("cannot read \(path)") }
    guard let text = String(data: data, encoding: .utf8) else { fail("\(path) is not UTF-8") }
    inputs.append((path, text))
}

var loader = SchemaLoader()
let files = loader.load(files: inputs)
if !loader.problems.isEmpty {
    for p in loader.problems { FileHandle.standardError.write(Data("schema-gen: error: \(p)\n".utf8)) }
    exit(1)
}

let swift = SwiftEmitter(files: files)
let data = DataEmitter(swift: swift)
var outputs: [(String, String)] = [
    ("Sources/Schema/Generated/Types.swift", swift.typesFile()),
    ("Sources/Schema/Generated/Commands.swift", swift.commandsFile()),
    ("Sources/Schema/Generated/Events.swift", swift.eventsFile()),
    ("Sources/Schema/Generated/Introspection.swift", swift.introspectionFile(data.introspection().render())),
    ("docs/schema.md", data.docsPage()),
]
for f in files {
    if let r = f.jsonSchemaRoot {
        let base = String(f.path.dropLast(".json".count))
        outputs.append((base + ".schema.json", data.jsonSchema(root: r, area: f).render(indent: 2) + "\n"))
    }
}

var stale: [String] = []
for (rel, text) in outputs {
    let path = root + "/" + rel
    let current = FileManager.default.contents(atPath: path).flatMap { String(data: $0, encoding: .utf8) }
    if current == text { continue }
    if check {
        stale.append(rel)
        continue
    }
    let dir = (path as NSString).deletingLastPathComponent
    do {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        print("schema-gen: wrote \(rel)")
    } catch {
        fail("cannot write \(rel): \(error.localizedDescription)")
    }
}
if check {
    if !stale.isEmpty {
        fail("generated files are stale (run `swift run schema-gen`): " + stale.joined(separator: ", "))
    }
    print("schema-gen: generated files are up to date")
}
