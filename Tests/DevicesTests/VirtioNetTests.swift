import Foundation
import Machine
import Synchronization
import Testing
@testable import Devices

/// A backend that runs everything inline on the caller's thread and records what the NIC sends.
final class FakeNetBackend: NetworkBackend, @unchecked Sendable {
    let id = "fake"
    let kind = "fake"
    var summary: String { "fake" }
    var sent: [[UInt8]] = []
    var held: [[UInt8]] = []
    var frontend: (any NetworkFrontend)?
    var linkUp = true
    func attach(_ frontend: any NetworkFrontend) { self.frontend = frontend }
    func detach() { frontend = nil }
    func perform(wait: Bool, _ body: @escaping @Sendable () -> Void) { body() }
    func send(_ frame: UnsafeRawBufferPointer) { sent.append(Array(frame)) }
    /// Offers a frame as a backend does: held when the NIC has no room.
    func deliver(_ frame: [UInt8]) {
        if !held.isEmpty || !(frame.withUnsafeBytes { frontend!.receive($0) }) { held.append(frame) }
    }
    func receiveRoomAvailable() {
        while let f = held.first, f.withUnsafeBytes({ frontend!.receive($0) }) { held.removeFirst() }
    }
    func close() {}
}

final class CountingInterrupt: VirtioInterrupt, @unchecked Sendable {
    let used = Atomic<Int>(0), config = Atomic<Int>(0)
    let resets = Mutex<[String]>([])
    func signalUsedBuffer(queue: Int) { used.add(1, ordering: .relaxed) }
    func signalConfigChange() { config.add(1, ordering: .relaxed) }
    func markNeedsReset(reason: String) { resets.withLock { $0.append(reason) } }
}

/// One split ring laid out by the test as a driver would: table, available and used rings.
struct TestRing {
    let ram: GuestRAM
    let desc: UInt64, avail: UInt64, used: UInt64
    let size: UInt16 = 16
    var nextDesc: UInt16 = 0
    var availIdx: UInt16 = 0
    var lastUsed: UInt16 = 0

    init(ram: GuestRAM, base: UInt64) {
        self.ram = ram
        desc = base
        avail = base + 0x1000
        used = base + 0x2000
    }

    func put<T: FixedWidthInteger>(_ v: T, at a: UInt64) {
        withUnsafeBytes(of: v.littleEndian) { try! ram.write($0, at: GuestPhysicalAddress(a)) }
    }
    func peek<T: FixedWidthInteger>(_: T.Type, at a: UInt64) -> T {
        T(littleEndian: ram.hostPointer(GuestPhysicalAddress(a), length: UInt64(MemoryLayout<T>.size))!.loadUnaligned(as: T.self))
    }

    func queue(index: Int) throws -> Virtqueue {
        try Virtqueue(index: index, size: size, descriptorTable: GuestPhysicalAddress(desc), driverArea: GuestPhysicalAddress(avail),
                      deviceArea: GuestPhysicalAddress(used), ram: ram, eventIndex: false)
    }

    /// Makes a one-descriptor chain over `len` bytes at `addr` available.
    mutating func add(addr: UInt64, len: UInt32, writable: Bool) {
        let i = nextDesc % size
        nextDesc &+= 1
        let d = desc + 16 * UInt64(i)
        put(addr, at: d); put(len, at: d + 8); put(UInt16(writable ? 2 : 0), at: d + 12); put(UInt16(0), at: d + 14)
        put(i, at: avail + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        put(availIdx, at: avail + 2)
    }

    /// The used entries added since the last call: (descriptor id, length written).
    mutating func takeUsed() -> [(UInt32, UInt32)] {
        var out: [(UInt32, UInt32)] = []
        let now = peek(UInt16.self, at: used + 2)
        while lastUsed != now {
            let e = used + 4 + 8 * UInt64(lastUsed % size)
            out.append((peek(UInt32.self, at: e), peek(UInt32.self, at: e + 4)))
            lastUsed &+= 1
        }
        return out
    }
}

@Suite struct VirtioNetTests {
    let ram = try! GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)
    static let mac: [UInt8] = [0x52, 0x54, 0, 0x12, 0x34, 0x56]

    func make(features: UInt64 = VirtioNet.Feature.mergeableRxBuffers | VirtioNet.Feature.csum | VirtioNet.Feature.guestCsum | Virtio.featureVersion1)
        throws -> (VirtioNet, FakeNetBackend, TestRing, TestRing, CountingInterrupt) {
        let backend = FakeNetBackend()
        let nic = VirtioNet(mac: Self.mac, backend: backend)
        let rx = TestRing(ram: ram, base: 0x8001_0000), tx = TestRing(ram: ram, base: 0x8002_0000)
        let irq = CountingInterrupt()
        try nic.activate(VirtioContext(queues: [try rx.queue(index: 0), try tx.queue(index: 1)], ram: ram,
                                       features: features, interrupt: irq))
        return (nic, backend, rx, tx, irq)
    }

    /// A minimal UDP/IPv4 frame with `payload`, its UDP checksum left for the device.
    static func udpFrame(payload: [UInt8]) -> [UInt8] {
        var f: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] + mac + [0x08, 0x00]
        let ipLen = 20 + 8 + payload.count
        f += [0x45, 0, UInt8(ipLen >> 8), UInt8(ipLen & 0xff), 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2]
        let udpLen = 8 + payload.count
        // UDP checksum field holds the pseudo-header sum, as Linux leaves it for CHECKSUM_PARTIAL.
        var pseudo: UInt32 = 0x0a00 + 0x020f + 0x0a00 + 0x0202 + 17 + UInt32(udpLen)
        while pseudo >> 16 != 0 { pseudo = (pseudo & 0xffff) + (pseudo >> 16) }
        f += [0x30, 0x39, 0x00, 0x35, UInt8(udpLen >> 8), UInt8(udpLen & 0xff), UInt8(pseudo >> 8), UInt8(pseudo & 0xff)]
        return f + payload
    }

    static func onesComplementSum(_ b: ArraySlice<UInt8>) -> UInt16 {
        var s: UInt32 = 0
        var i = b.startIndex
        while i + 1 < b.endIndex { s += UInt32(b[i]) << 8 | UInt32(b[i + 1]); i += 2 }
        if i < b.endIndex { s += UInt32(b[i]) << 8 }
        while s >> 16 != 0 { s = (s & 0xffff) + (s >> 16) }
        return UInt16(s)
    }

    @Test func configSpaceHoldsMACAndLinkStatus() throws {
        let (nic, _, _, _, irq) = try make()
        #expect((0..<6).map { UInt8(nic.readConfig(offset: $0, size: 1)) } == Self.mac)
        #expect(nic.readConfig(offset: 6, size: 2) == 1)          // VIRTIO_NET_S_LINK_UP
        nic.setLink(up: false)
        #expect(nic.readConfig(offset: 6, size: 2) == 0)
        #expect(irq.config.load(ordering: .relaxed) == 1)
        nic.setLink(up: false)                                     // no change, no interrupt
        #expect(irq.config.load(ordering: .relaxed) == 1)
    }

    @Test func transmitInsertsTheChecksumTheGuestLeftToTheDevice() throws {
        var (nic, backend, _, tx, irq) = try make()
        let frame = Self.udpFrame(payload: Array("hello, slirp".utf8))
        var header = [UInt8](repeating: 0, count: 12)
        header[0] = VirtioNet.needsCsum
        header[6] = 34; header[8] = 6                               // csum_start = UDP header, csum_offset = 6
        try ram.write(Data(header + frame), at: GuestPhysicalAddress(0x8004_0000))
        tx.add(addr: 0x8004_0000, len: UInt32(12 + frame.count), writable: false)
        nic.queueNotify(1)
        try #require(backend.sent.count == 1)
        let sent = backend.sent[0]
        #expect(sent.count == frame.count)
        // A correct UDP checksum makes the one's complement sum over pseudo header + segment 0xffff.
        var pseudo = UInt32(Self.onesComplementSum(sent[34...]))
        pseudo += 0x0a00 + 0x020f + 0x0a00 + 0x0202 + 17 + UInt32(sent.count - 34)
        while pseudo >> 16 != 0 { pseudo = (pseudo & 0xffff) + (pseudo >> 16) }
        #expect(pseudo == 0xffff, "checksum \(String(sent[40], radix: 16)) \(String(sent[41], radix: 16))")
        #expect(tx.takeUsed().count == 1)
        #expect(irq.used.load(ordering: .relaxed) >= 1)

        // Offsets outside the frame: dropped, the buffer still returned, the device keeps working.
        header[6] = 0xff; header[7] = 0x7f
        try ram.write(Data(header + frame), at: GuestPhysicalAddress(0x8004_0000))
        tx.add(addr: 0x8004_0000, len: UInt32(12 + frame.count), writable: false)
        nic.queueNotify(1)
        #expect(backend.sent.count == 1)
        #expect(tx.takeUsed().count == 1)
        #expect(nic.statistics.txDropped == 1)
        #expect(irq.resets.withLock { $0 }.isEmpty)
    }

    @Test func aLargeFrameSpansMergeableBuffersWithItsCount() throws {
        var (_, backend, rx, _, _) = try make()
        for i in 0..<4 { rx.add(addr: 0x8005_0000 + UInt64(i) * 0x1000, len: 1500, writable: true) }
        let frame = (0..<3000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        backend.deliver(frame)
        let used = rx.takeUsed()
        #expect(used.map(\.1) == [1500, 1500, 12])
        var got: [UInt8] = []
        for (i, u) in used.enumerated() {
            got += try ram.read(GuestPhysicalAddress(0x8005_0000 + UInt64(i) * 0x1000), count: Int(u.1))
        }
        #expect(got[0] == VirtioNet.dataValid)                    // GUEST_CSUM: already checked
        #expect(UInt16(got[10]) | UInt16(got[11]) << 8 == 3)       // num_buffers
        #expect(Array(got[12...]) == frame)
        #expect(backend.held.isEmpty)
    }

    @Test func framesWaitForBuffersAndArriveInOrder() throws {
        var (nic, backend, rx, _, _) = try make()
        rx.add(addr: 0x8005_0000, len: 1000, writable: true)
        backend.deliver([UInt8](repeating: 1, count: 1400))      // needs 1412 bytes: one buffer is not enough
        #expect(backend.held.count == 1)
        #expect(rx.takeUsed().isEmpty)                            // the buffer it looked at was given back
        backend.deliver([UInt8](repeating: 2, count: 60))         // queued behind the first, never ahead
        #expect(backend.held.count == 2)
        rx.add(addr: 0x8005_1000, len: 1000, writable: true)
        rx.add(addr: 0x8005_2000, len: 1000, writable: true)
        nic.queueNotify(0)
        #expect(backend.held.isEmpty)
        let used = rx.takeUsed()
        #expect(used.map(\.1) == [1000, 412, 72])
        #expect(try ram.read(GuestPhysicalAddress(0x8005_2000 + 12), count: 1) == [2])
    }

    @Test func withoutMergeableBuffersATooSmallBufferDropsTheFrame() throws {
        var (nic, backend, rx, _, irq) = try make(features: Virtio.featureVersion1)
        rx.add(addr: 0x8005_0000, len: 100, writable: true)
        backend.deliver([UInt8](repeating: 3, count: 200))
        #expect(backend.held.isEmpty)
        #expect(rx.takeUsed().map(\.1) == [0])
        #expect(nic.statistics.rxDropped == 1)
        #expect(irq.resets.withLock { $0 }.isEmpty)
    }

    @Test func savedStateKeepsTheLinkAndRefusesAnotherMAC() throws {
        let (nic, _, _, _, _) = try make()
        nic.setLink(up: false)
        var w = StateWriter()
        nic.saveDeviceState(to: &w)
        let other = VirtioNet(mac: [0x52, 0x54, 0, 0, 0, 9], backend: FakeNetBackend())
        var r = StateReader(section: "virtio-mmio@10001000", bytes: w.bytes)
        #expect(throws: SavedStateError.self) { try other.loadDeviceState(from: &r, version: 1, ram: ram) }
        #expect(other.linkUp)
        nic.setLink(up: true)
        r = StateReader(section: "virtio-mmio@10001000", bytes: w.bytes)
        try nic.loadDeviceState(from: &r, version: 1, ram: ram)
        #expect(!nic.linkUp)
    }

    @Test func aQuiescedNICLeavesGuestRAMAlone() throws {
        var (nic, backend, rx, tx, _) = try make()
        rx.add(addr: 0x8005_0000, len: 1500, writable: true)
        nic.quiesce()
        backend.deliver([UInt8](repeating: 7, count: 100))           // held, not written
        let frame = Self.udpFrame(payload: [1, 2, 3])
        try ram.write(Data([UInt8](repeating: 0, count: 12) + frame), at: GuestPhysicalAddress(0x8004_0000))
        tx.add(addr: 0x8004_0000, len: UInt32(12 + frame.count), writable: false)
        let ringsBefore = try ram.read(GuestPhysicalAddress(0x8001_0000), count: 0x3_0000)
        nic.queueNotify(1)
        nic.queueNotify(0)
        #expect(try ram.read(GuestPhysicalAddress(0x8001_0000), count: 0x3_0000) == ringsBefore)
        #expect(backend.sent.isEmpty && backend.held.count == 1)
        nic.resume()
        #expect(backend.sent.count == 1 && backend.held.isEmpty)
        #expect(rx.takeUsed().map(\.1) == [112])
        #expect(tx.takeUsed().count == 1)
    }

    /// The unplug sequence (the transport quiesces it, then the NIC resets and its netdev lets
    /// go): work queued before it (a kick, a frame on its way, a link change) runs afterwards
    /// without touching guest RAM or raising an interrupt, and the backend holds nothing for it.
    @Test func anUnpluggedNICTouchesNothing() throws {
        var (nic, backend, rx, tx, irq) = try make()
        rx.add(addr: 0x8005_0000, len: 1500, writable: true)
        let frame = Self.udpFrame(payload: [9, 9, 9])
        try ram.write(Data([UInt8](repeating: 0, count: 12) + frame), at: GuestPhysicalAddress(0x8004_0000))
        tx.add(addr: 0x8004_0000, len: UInt32(12 + frame.count), writable: false)
        let before = try ram.read(GuestPhysicalAddress(0x8001_0000), count: 0x5_0000)
        let interrupts = irq.used.load(ordering: .relaxed)
        nic.quiesce()
        nic.reset()
        backend.detach()
        #expect(backend.frontend == nil)
        let taken = [UInt8](repeating: 5, count: 80).withUnsafeBytes { nic.receive($0) }
        #expect(taken)                                          // dropped, not held for a NIC that is gone
        nic.queueNotify(1)
        nic.queueNotify(0)
        nic.setLink(up: false)
        nic.resume()                                            // even a stray resume finds no queues
        #expect(try ram.read(GuestPhysicalAddress(0x8001_0000), count: 0x5_0000) == before)
        #expect(irq.used.load(ordering: .relaxed) == interrupts && irq.config.load(ordering: .relaxed) == 0)
        #expect(backend.sent.isEmpty && rx.takeUsed().isEmpty && tx.takeUsed().isEmpty)
    }

    /// Random headers and frames from a hostile driver: whatever csum_start/csum_offset say,
    /// the checksum is written inside the frame or the frame is refused.
    @Test func checksumRequestsStayInsideTheFrame() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            let n = Int.random(in: 0...200, using: &rng)
            var frame = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let start = Int.random(in: 0...260, using: &rng), offset = Int.random(in: 0...260, using: &rng)
            let copy = frame
            let ok = frame.withUnsafeMutableBytes { VirtioNet.insertChecksum($0, start: start, offset: offset) }
            #expect(frame.count == n)
            if ok {
                #expect(start + offset + 2 <= n)
                #expect(frame.indices.allSatisfy { $0 == start + offset || $0 == start + offset + 1 || frame[$0] == copy[$0] })
            } else {
                #expect(frame == copy)
            }
        }
    }

    @Test func nonsenseDescriptorsStopTheNICWithAReason() throws {
        var (nic, backend, rx, tx, irq) = try make()
        tx.add(addr: 0x7000_0000, len: 64, writable: false)          // below guest RAM
        nic.queueNotify(1)
        let reasons = irq.resets.withLock { $0 }
        #expect(reasons.count == 1 && reasons[0].contains("not inside guest RAM"), "\(reasons)")
        #expect(backend.sent.isEmpty)
        // The device stays stopped (until the driver resets it) and touches nothing more.
        rx.add(addr: 0x8005_0000, len: 1500, writable: true)
        backend.deliver([UInt8](repeating: 1, count: 60))
        nic.queueNotify(1)
        #expect(rx.takeUsed().isEmpty && irq.resets.withLock { $0 }.count == 1)
        nic.reset()
    }

    @Test func parseAndFormatMAC() {
        #expect(VirtioNet.parseMAC("52:54:00:12:34:56") == Self.mac)
        #expect(VirtioNet.format(Self.mac) == "52:54:00:12:34:56")
        for bad in ["", "52:54:00:12:34", "52:54:00:12:34:567", "zz:54:00:12:34:56", "52-54-00-12-34-56"] {
            #expect(VirtioNet.parseMAC(bad) == nil, "\(bad)")
        }
        for bad in ["+1:54:00:12:34:56", "52:54:00:12:34:+6", " 5:54:00:12:34:56"] {
            #expect(MACAddress(bad) == nil, "\(bad)")
        }
        #expect(MACAddress("52:54:00:AB:CD:EF")?.description == "52:54:00:ab:cd:ef")
        #expect(MACAddress("01:00:5e:00:00:01")?.isMulticast == true && MACAddress("52:54:00:12:34:56")?.isMulticast == false)
        #expect(MACAddress.qemuDefault(index: 1).description == "52:54:00:12:34:57")
        #expect(MACAddress(bytes: [1, 2, 3]) == nil)
    }
}
