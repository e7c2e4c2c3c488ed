import Foundation
import Testing
@testable import Storage

/// A migration's disk hand-over: the source flushes and releases its locks, the destination
/// (which opened the image without locks, before the source's last writes) takes them and
/// rereads the metadata, so it sees every cluster the source allocated.
struct HandOverTests {
    @Test(arguments: [ImageFormat.qcow2, .raw])
    func theDestinationSeesTheSourcesWritesAfterActivate(format: ImageFormat) throws {
        let dir = tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/disk." + format.rawValue
        switch format {
        case .qcow2: try Qcow2Image.create(path: path, size: 8 << 20, clusterBits: 16)
        case .raw: try RawImage.create(path: path, size: 8 << 20)
        }
        let source = try openImage(path: path, format: format, readOnly: false, lock: true)
        try source.write(Array(repeating: 1, count: 4096), at: 0)
        // The destination opens while the source runs (no locks), then the source writes on:
        // new clusters, so new L2 tables and refcounts the destination has not read.
        let destination = try openImage(path: path, format: format, readOnly: false, lock: false)
        #expect(throws: StorageError.self) { try destination.activate() }  // the source holds the locks
        // It reads first (caching the L2 table and the file's end as they are now).
        #expect(try destination.read(count: 4096, at: 65536) == Array(repeating: 0, count: 4096))
        for i in 0..<40 {
            try source.write(Array(repeating: UInt8(i + 2), count: 4096), at: UInt64(i) * (192 << 10) + 65536)
        }
        try source.flush()
        source.releaseLocks()
        try destination.activate()
        for i in 0..<40 {
            #expect(try destination.read(count: 4096, at: UInt64(i) * (192 << 10) + 65536) == Array(repeating: UInt8(i + 2), count: 4096))
        }
        #expect(try destination.read(count: 4096, at: 0) == Array(repeating: 1, count: 4096))
        // Now the destination owns the image: the source cannot take it back.
        #expect(throws: StorageError.self) { try source.activate() }
        try destination.write(Array(repeating: 9, count: 4096), at: 7 << 20)
        try destination.flush()
        if format == .qcow2 {
            let report = try (destination as! Qcow2Image).check()
            #expect(report.corruptions == 0 && report.leaks == 0, "\(report)")
        }
    }
}
