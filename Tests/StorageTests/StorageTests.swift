import Foundation
import Testing
@testable import Storage

/// A fresh temporary directory per test.
func tempDir() -> String {
    let d = FileManager.default.temporaryDirectory.appendingPathComponent("storage-\(UUID().uuidString)").path
    try! FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
    return d
}

func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let f = try HostFile(path: path, readOnly: false)
    try f.write(bytes, at: offset)
}

func expectInvalid(_ path: String, containing text: String) {
    do {
        _ = try Qcow2Image(path: path, readOnly: true)
        Issue.record("opening \(path) should have failed with '\(text)'")
    } catch {
        #expect("\(error)".contains(text), "\(error)")
    }
}

@Suite struct Qcow2Tests {
    let dir = tempDir()

    @Test func createParsesBack() throws {
        try Qcow2Image.create(path: dir + "/a.qcow2", size: 10 << 20)
        let img = try Qcow2Image(path: dir + "/a.qcow2", readOnly: true)
        #expect(img.virtualSize == 10 << 20)
        #expect(img.header.version == 3)
        #expect(img.header.clusterSize == 65536)
        #expect(try img.read(count: 4096, at: 0) == [UInt8](repeating: 0, count: 4096))
        #expect(try img.check().exitCode == 0)
    }

    @Test(arguments: [UInt32(2), 3]) func writeReadAcrossClustersStaysConsistent(version: UInt32) throws {
        try Qcow2Image.create(path: dir + "/w.qcow2", size: 4 << 20, clusterBits: 12, version: version)
        let data = (0..<20000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        do {
            let img = try Qcow2Image(path: dir + "/w.qcow2", readOnly: false)
            try img.write(data, at: 5000)
            try img.write([1, 2, 3], at: 4095)  // rewrite in place
            try img.writeZeroes(offset: 8192, length: 4096)
            try img.flush()
        }
        let img = try Qcow2Image(path: dir + "/w.qcow2", readOnly: true)
        var expected = data
        expected.replaceSubrange(0..<0, with: [])
        let got = try img.read(count: 20000, at: 5000)
        #expect(Array(got[0..<(8192 - 5000)]) == Array(data[0..<(8192 - 5000)]))
        #expect(got[(8192 - 5000)..<(12288 - 5000)].allSatisfy { $0 == 0 })
        #expect(Array(got[(12288 - 5000)...]) == Array(data[(12288 - 5000)...]))
        #expect(try img.read(count: 3, at: 4095) == [1, 2, 3])
        let r = try img.check()
        #expect(r.exitCode == 0, "\(r.messages)")
    }

    @Test func refcountTableGrowsWhenManyClustersAreAllocated() throws {
        // 512-byte clusters: one refcount block covers 256 clusters, the table 64 blocks.
        try Qcow2Image.create(path: dir + "/g.qcow2", size: 16 << 20, clusterBits: 9)
        let img = try Qcow2Image(path: dir + "/g.qcow2", readOnly: false)
        let chunk = [UInt8](repeating: 0x5A, count: 512)
        for i in 0..<20000 where i % 1 == 0 { try img.write(chunk, at: UInt64(i) * 512) }
        #expect(img.header.refcountTableClusters > 1)
        #expect(try img.read(count: 512, at: 19999 * 512) == chunk)
        let r = try img.check()
        #expect(r.exitCode == 0, "\(r.messages.prefix(5))")
    }

    @Test func backingChainReadsThroughAndCopiesOnWrite() throws {
        try RawImage.create(path: dir + "/base.raw", size: 1 << 20)
        do {
            let base = try RawImage(path: dir + "/base.raw", readOnly: false)
            try base.write([UInt8](repeating: 7, count: 100_000), at: 0)
        }
        try Qcow2Image.create(path: dir + "/mid.qcow2", size: 1 << 20, backingFile: "base.raw", backingFormat: .raw)
        try Qcow2Image.create(path: dir + "/top.qcow2", size: 1 << 20, backingFile: "mid.qcow2", backingFormat: .qcow2)
        let top = try Qcow2Image(path: dir + "/top.qcow2", readOnly: false)
        #expect(try top.read(count: 10, at: 50) == [UInt8](repeating: 7, count: 10))
        try top.write([9, 9], at: 70_000)
        let c = try top.read(count: 4, at: 69_999)
        #expect(c == [7, 9, 9, 7])
        #expect(try RawImage(path: dir + "/base.raw", readOnly: true, lock: false).read(count: 2, at: 70_000) == [7, 7])
        #expect(try top.check().exitCode == 0)
    }

    @Test func backingLoopIsRefused() throws {
        try Qcow2Image.create(path: dir + "/x.qcow2", size: 1 << 20)
        try Qcow2Image.create(path: dir + "/y.qcow2", size: 1 << 20, backingFile: "x.qcow2", backingFormat: .qcow2)
        // Rewrite x to point at y.
        var h = try Qcow2Image(path: dir + "/x.qcow2", readOnly: true).header
        h.backingFile = "y.qcow2"
        h.backingFormat = "qcow2"
        try patch(dir + "/x.qcow2", at: 0, h.serialize())
        do {
            _ = try Qcow2Image(path: dir + "/y.qcow2", readOnly: true)
            Issue.record("a backing loop must be refused")
        } catch let e as StorageError {
            guard case .backingChain = e else { Issue.record("wrong error \(e)"); return }
        }
    }

    @Test func compressedRoundTrip() throws {
        try Qcow2Image.create(path: dir + "/c.qcow2", size: 1 << 20)
        let img = try Qcow2Image(path: dir + "/c.qcow2", readOnly: false)
        let text = Array(String(repeating: "hello qcow2 ", count: 6000).utf8.prefix(65536))
        try img.writeCompressed(virtualCluster: 0, data: text)
        try img.writeCompressed(virtualCluster: 1, data: Array(text.reversed()))
        #expect(try img.read(count: 65536, at: 0) == text)
        #expect(try img.read(count: 65536, at: 65536) == Array(text.reversed()))
        let r = try img.check()
        #expect(r.exitCode == 0 && r.compressedClusters == 2, "\(r.messages)")
        // Overwriting a compressed cluster copies it out.
        try img.write([1], at: 10)
        #expect(try img.read(count: 12, at: 0) == [104, 101, 108, 108, 111, 32, 113, 99, 111, 119, 1, 32])
        #expect(try img.check().exitCode == 0)
    }

    @Test func resizeGrowsL1() throws {
        try Qcow2Image.create(path: dir + "/r.qcow2", size: 1 << 20, clusterBits: 9)
        let img = try Qcow2Image(path: dir + "/r.qcow2", readOnly: false)
        try img.write([1, 2, 3], at: 1000)
        try img.resize(to: 64 << 20)
        #expect(img.virtualSize == 64 << 20)
        try img.write([4], at: (64 << 20) - 1)
        #expect(try img.read(count: 3, at: 1000) == [1, 2, 3])
        #expect(try img.read(count: 1, at: (64 << 20) - 1) == [4])
        #expect(try img.check().exitCode == 0)
        #expect(throws: StorageError.self) { try img.resize(to: 1 << 20) }
    }

    @Test func secondWriterIsRefused() throws {
        try Qcow2Image.create(path: dir + "/l.qcow2", size: 1 << 20)
        let first = try Qcow2Image(path: dir + "/l.qcow2", readOnly: false)
        #expect(first.virtualSize == 1 << 20)
        do {
            _ = try Qcow2Image(path: dir + "/l.qcow2", readOnly: false)
            Issue.record("second writer must be refused")
        } catch let e as StorageError {
            #expect("\(e)".contains("Failed to get"), "\(e)")
        }
    }

    @Test func leakIsReportedAsLeak() throws {
        try Qcow2Image.create(path: dir + "/k.qcow2", size: 1 << 20)
        let img = try Qcow2Image(path: dir + "/k.qcow2", readOnly: false)
        _ = try img.lock.withLock { try img.allocateClusters(1) }  // allocated, never referenced
        let r = try img.check()
        #expect(r.leaks == 1 && r.corruptions == 0 && r.exitCode == 3, "\(r.messages)")
    }

    // MARK: Hostile images

    @Test func badMagicAndVersion() throws {
        try Qcow2Image.create(path: dir + "/h.qcow2", size: 1 << 20)
        try patch(dir + "/h.qcow2", at: 4, [0, 0, 0, 9])
        expectInvalid(dir + "/h.qcow2", containing: "qcow2 version 9")
        try patch(dir + "/h.qcow2", at: 0, [0, 0, 0, 0])
        expectInvalid(dir + "/h.qcow2", containing: "magic")
    }

    @Test func absurdFieldsAreRefused() throws {
        let p = dir + "/h.qcow2"
        try Qcow2Image.create(path: p, size: 1 << 20)
        try patch(p, at: 20, [0, 0, 0, 40])  // cluster bits
        expectInvalid(p, containing: "cluster size")
        try Qcow2Image.create(path: p, size: 1 << 20)
        try patch(p, at: 24, BE.bytes(UInt64.max))  // size
        expectInvalid(p, containing: "too large")
        try Qcow2Image.create(path: p, size: 1 << 20)
        try patch(p, at: 40, BE.bytes(UInt64(1) << 40))  // L1 offset outside file
        expectInvalid(p, containing: "outside the file")
        try Qcow2Image.create(path: p, size: 1 << 20)
        try patch(p, at: 48, BE.bytes(UInt64(65536 * 3)))  // refcount table on top of the L1 table
        expectInvalid(p, containing: "overlaps")
        try Qcow2Image.create(path: p, size: 1 << 20)
        try patch(p, at: 36, [0, 0, 0, 0])  // L1 too small for the disk
        expectInvalid(p, containing: "too small")
        try Qcow2Image.create(path: p, size: 1 << 20)
        try patch(p, at: 32, [0, 0, 0, 1])
        expectInvalid(p, containing: "encryption")
    }

    @Test func l1AndL2PointersOutsideTheFileAreErrors() throws {
        let p = dir + "/p.qcow2"
        try Qcow2Image.create(path: p, size: 1 << 20)
        try patch(p, at: 3 * 65536, BE.bytes(UInt64(1) << 40 | 1 << 63))
        expectInvalid(p, containing: "outside the image file")
        // A valid L2 table whose entry points far outside the file: reads fail cleanly.
        try Qcow2Image.create(path: p, size: 1 << 20)
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            try img.write([1], at: 0)
        }
        let img0 = try Qcow2Image(path: p, readOnly: true)
        let l2 = img0.l1[0] & Qcow2Image.offsetMask
        try patch(p, at: l2, BE.bytes(UInt64(1) << 45 | 1 << 63))
        let img = try Qcow2Image(path: p, readOnly: true)
        #expect(throws: StorageError.self) { try img.read(count: 1, at: 0) }
        #expect(try img.check().corruptions > 0)
    }

    @Test func truncatedFileIsRefused() throws {
        let p = dir + "/t.qcow2"
        try Qcow2Image.create(path: p, size: 1 << 20)
        try HostFile(path: p, readOnly: false).truncate(to: 50)
        expectInvalid(p, containing: "too short")
    }
}

@Suite struct RawTests {
    let dir = tempDir()

    @Test func rawReadWriteDiscard() throws {
        try RawImage.create(path: dir + "/r.raw", size: 1 << 20)
        let img = try RawImage(path: dir + "/r.raw", readOnly: false)
        try img.write([1, 2, 3], at: 100)
        #expect(try img.read(count: 3, at: 100) == [1, 2, 3])
        try img.discard(offset: 0, length: 4096)
        #expect(try img.read(count: 3, at: 100) == [0, 0, 0])
        #expect(throws: StorageError.self) { try img.write([1], at: 1 << 20) }
        let ro = try RawImage(path: dir + "/r.raw", readOnly: true, lock: false)
        #expect(throws: StorageError.readOnly(path: dir + "/r.raw")) { try ro.write([1], at: 0) }
    }
}

/// Interop with Debian's qemu-img; skipped only when qemu-img is not installed.
@Suite(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img")))
struct QemuInteropTests {
    let dir = tempDir()

    @discardableResult
    func sh(_ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-img")
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: out, as: UTF8.self))
    }

    @Test func qemuImagesReadIdentically() throws {
        try RawImage.create(path: dir + "/base.raw", size: 8 << 20)
        var pattern = [UInt8](repeating: 0, count: 3 << 20)
        for i in pattern.indices { pattern[i] = UInt8(truncatingIfNeeded: (i * 2654435761) >> 13) }
        try RawImage(path: dir + "/base.raw", readOnly: false).write(pattern, at: 1 << 20)
        try sh(["convert", "-O", "qcow2", dir + "/base.raw", dir + "/base.qcow2"])
        try sh(["convert", "-c", "-O", "qcow2", dir + "/base.raw", dir + "/comp.qcow2"])
        try sh(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir + "/ov.qcow2"])
        let expectedBase = try RawImage(path: dir + "/base.raw", readOnly: true, lock: false).read(count: 8 << 20, at: 0)
        for name in ["base.qcow2", "comp.qcow2"] {
            let img = try Qcow2Image(path: dir + "/" + name, readOnly: true)
            #expect(try img.read(count: 8 << 20, at: 0) == expectedBase, "\(name)")
        }
        // Our writes on top of a qemu-made overlay pass qemu-img check and compare.
        do {
            let ov = try Qcow2Image(path: dir + "/ov.qcow2", readOnly: false)
            try ov.write([UInt8](repeating: 0xEE, count: 70_000), at: 1_500_000)
            try ov.writeZeroes(offset: 2 << 20, length: 65536)
            try ov.flush()
        }
        let (rc, out) = try sh(["check", dir + "/ov.qcow2"])
        #expect(rc == 0, "\(out)")
        var expected = expectedBase
        expected.replaceSubrange(1_500_000..<1_570_000, with: [UInt8](repeating: 0xEE, count: 70_000))
        expected.replaceSubrange((2 << 20)..<((2 << 20) + 65536), with: [UInt8](repeating: 0, count: 65536))
        try RawImage.create(path: dir + "/expected.raw", size: 8 << 20)
        try RawImage(path: dir + "/expected.raw", readOnly: false).write(expected, at: 0)
        let (crc, cout) = try sh(["compare", dir + "/expected.raw", dir + "/ov.qcow2"])
        #expect(crc == 0, "\(cout)")
    }

    @Test func qemuSnapshotsAreListedAndReadable() throws {
        let p = dir + "/s.qcow2"
        try sh(["create", "-q", "-f", "qcow2", p, "1M"])
        do { let img = try Qcow2Image(path: p, readOnly: false); try img.write([1, 2, 3], at: 0) }
        try sh(["snapshot", "-c", "first", p])
        do { let img = try Qcow2Image(path: p, readOnly: false); try img.write([9, 9, 9], at: 0) }
        let (rc, out) = try sh(["check", p])
        #expect(rc == 0, "\(out)")
        let img = try Qcow2Image(path: p, readOnly: true)
        #expect(img.snapshots.map(\.name) == ["first"])
        #expect(try img.read(count: 3, at: 0) == [9, 9, 9])
        #expect(try img.openSnapshot("first").read(count: 3, at: 0) == [1, 2, 3])
        #expect(try img.check().exitCode == 0)
    }
}
