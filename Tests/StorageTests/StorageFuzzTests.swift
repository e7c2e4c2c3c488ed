import Foundation
import FuzzSupport
import Testing
@testable import Storage

/// Fuzzes the qcow2 reader with mutations of the committed seed images
/// (tests/fuzz/corpus/qcow2: v2 and v3, compressed and zero clusters, an internal snapshot,
/// 1- and 64-bit refcounts, a raw backing file and a backing file naming the image itself).
/// Every input is written as `fuzz.qcow2` beside a raw `base.raw`, then opened, read through
/// (header, L1/L2, refcounts, snapshot table, compressed clusters, backing chain), checked
/// and, for snapshots, opened as a view. Any error is a fine answer; a trap or a hang is a bug.
/// `FUZZ_SECONDS` / `FUZZ_LONG=1` lengthen the run (see `Fuzz`).
@Suite struct StorageFuzzTests {
    @Test func qcow2ImagesNeverCrashTheReader() throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try RawImage.create(path: dir + "/base.raw", size: 64 << 10)
        let path = dir + "/fuzz.qcow2"
        let seeds = Fuzz.corpus("qcow2")
        try #require(seeds.count >= 5, "the qcow2 seed corpus is missing")
        let report = Fuzz.run(target: "qcow2", seeds: seeds, seconds: Fuzz.budget(ci: 3), maxLength: 1 << 20,
                              dictionary: [[0x51, 0x46, 0x49, 0xfb], Array("base.raw".utf8), Array("fuzz.qcow2".utf8)]) { input in
            try Data(input).write(to: URL(fileURLWithPath: path))
            let img = try Qcow2Image(path: path, readOnly: true, lock: false)
            var buf = [UInt8](repeating: 0, count: 4096)
            let size = img.virtualSize
            for offset in stride(from: UInt64(0), to: min(size, 1 << 20), by: 4096) {
                let n = Int(min(4096, size - offset))
                try buf.withUnsafeMutableBytes { try img.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset) }
            }
            _ = try img.check()
            for s in img.snapshots.prefix(4) {
                let view = try img.openSnapshot(s.id)
                _ = try view.read(count: Int(min(4096, view.virtualSize)), at: 0)
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(report.executions > seeds.count)
    }
}
