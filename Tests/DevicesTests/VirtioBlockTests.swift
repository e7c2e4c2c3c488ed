import Foundation
import Machine
import Storage
import Testing
@testable import Devices

@Suite struct VirtioBlockTests {
    let ram = try! GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vblk-\(UUID().uuidString)").path

    func makeDevice(readOnly: Bool = false, format: ImageFormat = .raw) throws -> (VirtioBlock, VirtioMMIOTransport, FakeDriver, TestLine) {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let path = dir + "/disk.img"
        switch format {
        case .raw: try RawImage.create(path: path, size: 1 << 20)
        case .qcow2: try Qcow2Image.create(path: path, size: 1 << 20)
        }
        let img = try openImage(path: path, readOnly: readOnly)
        let blk = VirtioBlock(drive: DriveConfig(image: img, serial: "SERIAL-123"))
        let line = TestLine()
        let t = VirtioMMIOTransport(device: blk, ram: ram, interrupt: line)
        let d = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d.bringUp()
        return (blk, t, d, line)
    }

    /// Submits a request (header, optional out data, in buffer of `inLength` + status) and waits.
    func request(_ d: inout FakeDriver, type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: UInt32 = 0) -> (UInt8, [UInt8], UInt32) {
        let hdr: UInt64 = 0x8004_0000, data: UInt64 = 0x8004_1000, inbuf: UInt64 = 0x8006_0000, status: UInt64 = 0x8007_0000
        d.put(type, at: hdr); d.put(UInt32(0), at: hdr + 4); d.put(sector, at: hdr + 8)
        try! ram.write(Data(out), at: GuestPhysicalAddress(data))
        d.put(UInt8(0xff), at: status)
        var i: UInt16 = 0
        d.descriptor(i, addr: hdr, len: 16, flags: 1, next: i + 1); i += 1
        if !out.isEmpty { d.descriptor(i, addr: data, len: UInt32(out.count), flags: 1, next: i + 1); i += 1 }
        if inLength > 0 { d.descriptor(i, addr: inbuf, len: inLength, flags: 3, next: i + 1); i += 1 }
        d.descriptor(i, addr: status, len: 1, flags: 2)
        let before = d.usedIdx
        d.submit(0)
        let deadline = Date().addingTimeInterval(5)
        while d.usedIdx == before && Date() < deadline { usleep(1000) }
        let got = try! ram.read(GuestPhysicalAddress(inbuf), count: Int(inLength))
        return (d.peek(UInt8.self, at: status), got, d.usedElement(before).len)
    }

    @Test func configSpace() throws {
        let (blk, t, _, _) = try makeDevice()
        #expect(t.read(offset: 0x100, size: 4) == 2048)  // 1 MiB in sectors
        #expect(t.read(offset: 0x100 + 20, size: 4) == 512)
        #expect(blk.deviceFeatures & VirtioBlock.Feature.readOnly == 0)
        #expect(t.read(offset: 8, size: 4) == 2)
    }

    @Test(arguments: [ImageFormat.raw, .qcow2]) func writeThenReadBack(format: ImageFormat) throws {
        var (blk, _, d, line) = try makeDevice(format: format)
        let payload = (0..<1024).map { UInt8(truncatingIfNeeded: $0 * 7) }
        #expect(request(&d, type: VirtioBlock.RequestType.out, sector: 3, out: payload).0 == 0)
        #expect(line.isRaised)
        let (st, got, written) = request(&d, type: VirtioBlock.RequestType.in, sector: 3, inLength: 1024)
        #expect(st == 0)
        #expect(got == payload)
        #expect(written == 1025)
        #expect(try blk.drive.image.read(count: 1024, at: 3 * 512) == payload)
        #expect(request(&d, type: VirtioBlock.RequestType.flush, sector: 0).0 == 0)
        // query-blockstats' counts: one write of 1024 bytes ending at 4096, one read, one flush.
        let s = blk.statistics
        #expect(s.writeOperations == 1 && s.writtenBytes == 1024 && s.highestWriteOffset == 3 * 512 + 1024)
        #expect(s.readOperations == 1 && s.readBytes == 1024 && s.flushOperations == 1)
        #expect(s.failedReadOperations == 0 && s.failedWriteOperations == 0 && s.lastCompletion != nil)
    }

    @Test func outOfRangeAndUnsupported() throws {
        var (blk, _, d, _) = try makeDevice()
        #expect(request(&d, type: VirtioBlock.RequestType.in, sector: 2048, inLength: 512).0 == 1)
        #expect(request(&d, type: VirtioBlock.RequestType.in, sector: 0, inLength: 100).0 == 1)
        #expect(request(&d, type: 99, sector: 0).0 == 2)
        #expect(blk.statistics.failedReadOperations == 2 && blk.statistics.readOperations == 0, "refused reads are counted as failed")
    }

    @Test func getID() throws {
        var (_, _, d, _) = try makeDevice()
        let (st, got, _) = request(&d, type: VirtioBlock.RequestType.getID, sector: 0, inLength: 20)
        #expect(st == 0)
        #expect(Array(got.prefix(10)) == Array("SERIAL-123".utf8))
    }

    @Test func readOnlyRefusesWrites() throws {
        var (blk, _, d, _) = try makeDevice(readOnly: true)
        #expect(blk.deviceFeatures & VirtioBlock.Feature.readOnly != 0)
        #expect(request(&d, type: VirtioBlock.RequestType.out, sector: 0, out: [UInt8](repeating: 1, count: 512)).0 == 1)
        #expect(try blk.drive.image.read(count: 512, at: 0) == [UInt8](repeating: 0, count: 512))
    }

    @Test(arguments: [ImageFormat.raw, .qcow2]) func writeZeroesAndDiscard(format: ImageFormat) throws {
        var (blk, _, d, _) = try makeDevice(format: format)
        let ones = [UInt8](repeating: 0xAA, count: 128 * 1024)
        #expect(request(&d, type: VirtioBlock.RequestType.out, sector: 0, out: Array(ones.prefix(64 * 1024))).0 == 0)
        var seg = [UInt8](repeating: 0, count: 16)
        seg[0] = 8; seg[8] = 16  // sectors 8..24
        #expect(request(&d, type: VirtioBlock.RequestType.writeZeroes, sector: 0, out: seg).0 == 0)
        let back = try blk.drive.image.read(count: 64 * 1024, at: 0)
        #expect(back[0..<4096].allSatisfy { $0 == 0xAA })
        #expect(back[4096..<(24 * 512)].allSatisfy { $0 == 0 })
        #expect(back[(24 * 512)...].allSatisfy { $0 == 0xAA })
        seg[12] = 1  // unmap flag on discard is unsupported
        #expect(request(&d, type: VirtioBlock.RequestType.discard, sector: 0, out: seg).0 == 2)
    }
}
