import Foundation
import Testing
@testable import Board
import Machine

/// A minimal FDT reader for tests: parses a blob back into nodes with `.bytes` values.
enum FDTReader {
    struct Malformed: Error { let why: String }

    static func be32(_ b: [UInt8], _ o: Int) -> UInt32 {
        UInt32(b[o]) << 24 | UInt32(b[o + 1]) << 16 | UInt32(b[o + 2]) << 8 | UInt32(b[o + 3])
    }

    static func parse(_ blob: [UInt8]) throws -> DeviceTreeNode {
        guard blob.count >= 40, be32(blob, 0) == DeviceTree.magic else { throw Malformed(why: "bad header") }
        let offStruct = Int(be32(blob, 8)), offStrings = Int(be32(blob, 12))
        func cString(_ o: Int) -> String {
            var e = o
            while blob[e] != 0 { e += 1 }
            return String(decoding: blob[o..<e], as: UTF8.self)
        }
        var pos = offStruct
        var stack: [DeviceTreeNode] = []
        var root: DeviceTreeNode? = nil
        while true {
            let token = be32(blob, pos)
            pos += 4
            switch token {
            case 1:
                let name = cString(pos)
                pos += (name.utf8.count + 1 + 3) & ~3
                stack.append(DeviceTreeNode(name))
            case 3:
                let len = Int(be32(blob, pos)), nameoff = Int(be32(blob, pos + 4))
                let value = Array(blob[(pos + 8)..<(pos + 8 + len)])
                pos += 8 + ((len + 3) & ~3)
                stack[stack.count - 1].set(cString(offStrings + nameoff), .bytes(value))
            case 2:
                let done = stack.removeLast()
                if stack.isEmpty { root = done } else { stack[stack.count - 1].add(done) }
            case 4: continue
            case 9:
                guard let root else { throw Malformed(why: "no root") }
                return root
            default: throw Malformed(why: "token \(token) at \(pos - 4)")
            }
        }
    }
}

/// Runs a tool and returns (status, stdout).
func runTool(_ path: String, _ args: [String]) throws -> (Int32, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = FileHandle.nullDevice
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

let dtcPath: String? = ["/usr/bin/dtc", "/usr/local/bin/dtc"].first { FileManager.default.isExecutableFile(atPath: $0) }

/// Decompiles a blob with dtc; nil status when it fails.
func decompile(_ blob: [UInt8]) throws -> (Int32, String) {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("board-\(UUID().uuidString).dtb")
    try Data(blob).write(to: url)
    defer { try? FileManager.default.removeItem(at: url) }
    return try runTool(dtcPath!, ["-I", "dtb", "-O", "dts", url.path])
}

struct DeviceTreeTests {
    func sample() -> DeviceTree {
        var t = DeviceTree()
        t.root.set("#address-cells", .u32([2]))
        t.root.set("model", .string("test,board"))
        var a = DeviceTreeNode("dev@1000")
        a.set("reg", .u64([0x1000, 0x100]))
        a.set("compatible", .strings(["vendor,dev1", "vendor,dev0"]))
        a.set("interrupt-controller", .empty)
        a.set("blob", .bytes([1, 2, 3]))
        var b = DeviceTreeNode("dev@2000")
        b.set("reg", .u32([0, 0x2000, 0, 0x10]))
        t.root.add(a)
        t.root.add(b)
        t.reservations = [MemoryReservation(address: 0x8000_0000, size: 0x20_0000)]
        return t
    }

    @Test func headerFollowsVersion17Layout() {
        let blob = sample().flattened()
        #expect(FDTReader.be32(blob, 0) == 0xD00D_FEED)
        #expect(Int(FDTReader.be32(blob, 4)) == blob.count)
        let offStruct = FDTReader.be32(blob, 8), offStrings = FDTReader.be32(blob, 12), offRsv = FDTReader.be32(blob, 16)
        #expect(FDTReader.be32(blob, 20) == 17)
        #expect(FDTReader.be32(blob, 24) == 16)
        #expect(offRsv % 8 == 0 && offStruct % 4 == 0)
        #expect(offStruct == offRsv + 32)  // one entry + terminator
        #expect(offStrings == offStruct + FDTReader.be32(blob, 36))
        #expect(Int(offStrings + FDTReader.be32(blob, 32)) == blob.count)
        // Reservation entry, big-endian.
        #expect(Array(blob[40..<56]) == [0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0])
    }

    @Test func propertyNamesAreStoredOnce() {
        let blob = sample().flattened()
        let offStrings = Int(FDTReader.be32(blob, 12)), size = Int(FDTReader.be32(blob, 32))
        let strings = String(decoding: blob[offStrings..<(offStrings + size)], as: UTF8.self)
        #expect(strings.components(separatedBy: "reg\0").count == 2)
    }

    @Test func blobParsesBackToTheSameTree() throws {
        let t = sample()
        let parsed = try FDTReader.parse(t.flattened())
        #expect(parsed.children.map(\.name) == ["dev@1000", "dev@2000"])
        #expect(parsed.node(at: "dev@1000")?.property("compatible") == .bytes(Array("vendor,dev1\0vendor,dev0\0".utf8)))
        #expect(parsed.node(at: "dev@1000")?.property("reg") == .bytes([0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 1, 0]))
        #expect(parsed.node(at: "dev@1000")?.property("interrupt-controller") == .bytes([]))
        #expect(parsed.node(at: "dev@2000")?.property("reg")?.encoded == DeviceTreeValue.u64([0x2000, 0x10]).encoded)
    }

    @Test(.enabled(if: dtcPath != nil, "dtc is not installed"))
    func dtcDecompilesTheBlob() throws {
        let (status, dts) = try decompile(sample().flattened())
        #expect(status == 0)
        #expect(dts.contains("/memreserve/\t0x0000000080000000 0x0000000000200000;"))
        #expect(dts.contains("model = \"test,board\";"))
        #expect(dts.contains("compatible = \"vendor,dev1\\0vendor,dev0\";"))
        #expect(dts.contains("reg = <0x00 0x1000 0x00 0x100>;"))
        #expect(dts.contains("interrupt-controller;"))
        #expect(dts.contains("blob = [01 02 03];"))
        #expect(dts.contains("dev@2000 {"))
    }

    @Test func setReplacesAndWithNodeCreatesPaths() {
        var t = DeviceTree()
        t.root.withNode(at: "a/b") { $0.set("x", .u32([1])) }
        t.root.withNode(at: "a/b") { $0.set("x", .u32([2])) }
        #expect(t.root.children.count == 1)
        #expect(t.root.node(at: "a/b")?.property("x") == .u32([2]))
        #expect(t.root.node(at: "a/b")?.properties.count == 1)
    }
}
