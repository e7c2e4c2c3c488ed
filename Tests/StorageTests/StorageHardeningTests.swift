import Foundation
import Testing
import Synchronization
@testable import Storage

/// Reproducers for issue 15 (hardening) in the image layer: each test failed (hung, trapped
/// or passed a corrupt image) before the fix.
@Suite struct StorageHardeningTests {
    let dir = tempDir()

    /// Runs `body` on another thread and fails the test if it has not returned within
    /// `seconds` (the reproducers for blocking opens would otherwise hang the test run).
    func finishes(within seconds: Double, _ body: @escaping @Sendable () -> Void) -> Bool {
        let done = DispatchSemaphore(value: 0)
        Thread { body(); done.signal() }.start()
        return done.wait(timeout: .now() + seconds) == .success
    }

    func makeFIFO(_ name: String) -> String {
        let p = dir + "/" + name
        #expect(mkfifo(p, 0o600) == 0)
        return p
    }

    @Test func aFIFOAsAnImageIsRefusedWithoutBlocking() {
        let fifo = makeFIFO("disk.fifo")
        let result = Mutex<String?>(nil)
        let ok = finishes(within: 5) {
            do {
                _ = try openImage(path: fifo, readOnly: true)
                result.withLock { $0 = "opened" }
            } catch {
                result.withLock { $0 = "\(error)" }
            }
        }
        #expect(ok, "opening a FIFO as an image blocked")
        let message = result.withLock { $0 } ?? ""
        #expect(message.contains("FIFO") && message.contains(fifo), "\(message)")
        // Unblock a hung open so the leaked thread ends.
        if !ok { let fd = open(fifo, O_WRONLY | O_NONBLOCK); if fd >= 0 { close(fd) } }
    }

    @Test func aFIFOAsABackingFileIsRefusedWithoutBlocking() throws {
        let fifo = makeFIFO("base.fifo")
        let top = dir + "/top.qcow2"
        try Qcow2Image.create(path: top, size: 1 << 20, backingFile: "base.fifo", backingFormat: .raw)
        let result = Mutex<String?>(nil)
        let ok = finishes(within: 5) {
            do {
                _ = try Qcow2Image(path: top, readOnly: true)
                result.withLock { $0 = "opened" }
            } catch {
                result.withLock { $0 = "\(error)" }
            }
        }
        #expect(ok, "opening a qcow2 whose backing file is a FIFO blocked")
        #expect(result.withLock { $0 }?.contains("FIFO") == true, "\(result.withLock { $0 } ?? "")")
        if !ok { let fd = open(fifo, O_WRONLY | O_NONBLOCK); if fd >= 0 { close(fd) } }
    }

    @Test func aCharacterDeviceIsNotAnImage() {
        do {
            _ = try RawImage(path: "/dev/null", readOnly: true)
            Issue.record("/dev/null opened as a raw image")
        } catch {
            #expect("\(error)".contains("character device"), "\(error)")
        }
    }

    /// The backing-file offset 0xFFFF_FFFF_FFFF_FFFF overflowed `offset + size` (a trap that
    /// killed machine-img info/check/convert with SIGILL).
    @Test func aBackingFileOffsetThatOverflowsIsACorruptImage() throws {
        let p = dir + "/overflow.qcow2"
        try Qcow2Image.create(path: p, size: 1 << 20)
        try patch(p, at: 8, BE.bytes(UInt64.max))
        try patch(p, at: 16, BE.bytes(UInt32(16)))
        expectInvalid(p, containing: "backing file name")
    }

    /// An image with one data cluster, returned with the offsets of its L1 entry 0 and the
    /// L2 entry that maps virtual cluster 0.
    func imageWithOneCluster(_ name: String) throws -> (path: String, l1Entry: UInt64, l2Entry: UInt64) {
        let p = dir + "/" + name
        try Qcow2Image.create(path: p, size: 4 << 20)
        let img = try Qcow2Image(path: p, readOnly: false)
        try img.write([UInt8](repeating: 0xA5, count: 65536), at: 0)
        let l1Entry = img.header.l1TableOffset
        let l2Offset = img.l1[0] & Qcow2Image.offsetMask
        #expect(try img.check().exitCode == 0)
        return (p, l1Entry, l2Offset)
    }

    func setBits(_ path: String, at offset: UInt64, _ bits: UInt64) throws {
        let f = try HostFile(path: path, readOnly: false)
        let old = BE.u64(try f.read(count: 8, at: offset), 0)
        try f.write(BE.bytes(old | bits), at: offset)
    }

    /// qemu-img check calls each of these corrupt (exit 2); machine-img called them clean or
    /// leaking. The bit positions are QEMU's L1E_RESERVED_MASK and L2E_STD_RESERVED_MASK.
    @Test(arguments: [("L1", UInt64(1) << 0), ("L1", UInt64(1) << 5), ("L1", UInt64(1) << 60),
                      ("L2", UInt64(1) << 3), ("L2", UInt64(1) << 59)])
    func reservedBitsInL1AndL2EntriesAreCorruption(table: String, bit: UInt64) throws {
        let img = try imageWithOneCluster("reserved-\(table)-\(bit.trailingZeroBitCount).qcow2")
        try setBits(img.path, at: table == "L1" ? img.l1Entry : img.l2Entry, bit)
        let r = try Qcow2Image(path: img.path, readOnly: true).check()
        #expect(r.exitCode == 2, "\(r.messages)")
        #expect(r.messages.contains { $0.contains("reserved bits") }, "\(r.messages)")
    }
}
