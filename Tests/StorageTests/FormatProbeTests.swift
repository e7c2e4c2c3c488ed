import Foundation
import FuzzSupport
import Testing
@testable import Storage

/// Probing refuses the formats qemu-img knows and this module does not read, instead of
/// calling them raw; naming the format explicitly still opens the bytes as they are.
@Suite struct FormatProbeTests {
    func file(_ name: String, head: [UInt8], at offset: Int = 0, size: Int = 4096, tail: [UInt8] = []) throws -> String {
        let path = tempDir() + "/" + name
        var bytes = [UInt8](repeating: 0, count: size)
        bytes.replaceSubrange(offset..<offset + head.count, with: head)
        if !tail.isEmpty { bytes.replaceSubrange(size - 512..<size - 512 + tail.count, with: tail) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    @Test(arguments: [
        ("vmdk", Array("KDMV".utf8), 0), ("vmdk", Array("# Disk DescriptorFile\n".utf8), 0),
        ("vdi", [0x7f, 0x10, 0xda, 0xbe], 0x40), ("vpc", Array("conectix".utf8), 0), ("vhdx", Array("vhdxfile".utf8), 0),
        ("luks", Array("LUKS".utf8) + [0xba, 0xbe], 0), ("qed", Array("QED".utf8) + [0], 0),
        ("parallels", Array("WithoutFreeSpace".utf8), 0),
    ])
    func foreignFormatsAreRefusedNotTakenForRaw(name: String, magic: [UInt8], offset: Int) throws {
        let path = try file("img.\(name)", head: magic, at: offset)
        do {
            _ = try openImage(path: path, readOnly: true, lock: false)
            Issue.record("\(name) opened as \(try ImageFormat.probe(path: path))")
        } catch let e as StorageError {
            guard case .unsupported(let p, let feature) = e else {
                Issue.record("\(e)")
                return
            }
            #expect(p == path && feature.contains("the \(name) format") && feature.contains("raw explicitly"))
        }
        // Named raw, the file is a raw disk of its own bytes.
        let raw = try openImage(path: path, format: .raw, readOnly: true, lock: false)
        #expect(try raw.read(count: magic.count, at: UInt64(offset)) == magic)
    }

    @Test func aFixedVHDIsFoundByItsFooter() throws {
        let path = try file("fixed.vpc", head: [], size: 8192, tail: Array("conectix".utf8))
        #expect(throws: StorageError.self) { try ImageFormat.probe(path: path) }
    }

    @Test func rawAndQcow2StillProbe() throws {
        #expect(try ImageFormat.probe(path: file("plain.raw", head: Array("hello".utf8))) == .raw)
        #expect(try ImageFormat.probe(path: file("empty.raw", head: [], size: 0)) == .raw)
        #expect(try ImageFormat.probe(path: file("q.qcow2", head: [0x51, 0x46, 0x49, 0xfb])) == .qcow2)
        #expect(ForeignImageFormat.detect(head: [], tail: []) == nil)
    }

    /// Magic detection on arbitrary heads and tails of any length never traps, and a head that
    /// starts with a known magic is always recognized.
    @Test func detectionOfArbitraryBytesNeverTraps() {
        let magics: [[UInt8]] = [Array("KDMV".utf8), Array("conectix".utf8), Array("vhdxfile".utf8), Array("LUKS".utf8) + [0xba, 0xbe],
                                 Array("QED".utf8) + [0], Array("WithoutFreeSpace".utf8), Array("# Disk DescriptorFile".utf8)]
        let report = Fuzz.run(target: "format-probe", seeds: magics, seconds: Fuzz.budget(ci: 1), maxLength: 1024,
                              dictionary: magics + [[0x7f, 0x10, 0xda, 0xbe]]) { input in
            let cut = input.isEmpty ? 0 : Int(input[0]) % (input.count + 1)
            _ = ForeignImageFormat.detect(head: Array(input[..<cut]), tail: Array(input[cut...]))
        }
        for m in magics { #expect(ForeignImageFormat.detect(head: m + [1, 2, 3], tail: []) != nil) }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(report.executions > magics.count)
    }
}
