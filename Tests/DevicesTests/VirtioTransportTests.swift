import Machine
import Synchronization
import Testing
@testable import Devices

/// An interrupt line that remembers its level.
final class TestLine: InterruptLine, @unchecked Sendable {
    let level = Atomic<Bool>(false)
    func set(_ l: Bool) { level.store(l, ordering: .sequentiallyConsistent) }
    var isRaised: Bool { level.load(ordering: .sequentiallyConsistent) }
}

/// A virtio device that records what the transport does to it and, on notify, completes every
/// chain synchronously, writing the reversed readable bytes into the writable buffers.
final class EchoDevice: VirtioDevice, @unchecked Sendable {
    let name = "echo"
    let deviceID: UInt32 = 0x99
    let deviceFeatures: UInt64 = 1 << 3
    let queueCount = 2
    let maxQueueSize: UInt16 = 16
    var config: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8]
    var context: VirtioContext?
    var resets = 0
    var notified: [Int] = []
    var errors: [VirtqueueError] = []

    func readConfig(offset: Int, size: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<size where offset + i < config.count { v |= UInt64(config[offset + i]) << (8 * UInt64(i)) }
        return v
    }
    func writeConfig(offset: Int, size: Int, value: UInt64) {
        for i in 0..<size where offset + i < config.count { config[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }
    func activate(_ context: VirtioContext) throws { self.context = context }
    func queueNotify(_ index: Int) {
        notified.append(index)
        guard let ctx = context, let q = ctx.queues[index] else { return }
        do {
            while let chain = try q.nextChain() {
                let input = chain.readBytes(from: ctx.ram, count: chain.readableLength)
                let n = chain.write(Array(input.reversed()), to: ctx.ram, offset: 0)
                q.complete(chain, written: UInt32(n))
            }
        } catch {
            errors.append(error)
            ctx.interrupt.markNeedsReset(reason: "\(error)")
        }
        if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: index) }
    }
    func reset() {
        resets += 1
        context = nil
    }
}

/// The driver side of a split virtqueue, written straight into guest RAM, as Linux would.
struct FakeDriver {
    let ram: GuestRAM
    let transport: VirtioMMIOTransport
    let desc: UInt64, avail: UInt64, used: UInt64
    let size: UInt16
    var availIdx: UInt16 = 0

    init(ram: GuestRAM, transport: VirtioMMIOTransport, base: UInt64, size: UInt16 = 8) {
        self.ram = ram
        self.transport = transport
        self.size = size
        desc = base
        avail = base + 0x1000
        used = base + 0x2000
    }

    func w32(_ reg: UInt64, _ v: UInt32) { transport.write(offset: reg, size: 4, value: UInt64(v)) }
    func r32(_ reg: UInt64) -> UInt32 { UInt32(transport.read(offset: reg, size: 4)) }

    func put<T: FixedWidthInteger>(_ v: T, at a: UInt64) {
        withUnsafeBytes(of: v.littleEndian) { try! ram.write($0, at: GuestPhysicalAddress(a)) }
    }
    func peek<T: FixedWidthInteger>(_: T.Type, at a: UInt64) -> T {
        T(littleEndian: ram.hostPointer(GuestPhysicalAddress(a), length: UInt64(MemoryLayout<T>.size))!
            .loadUnaligned(as: T.self))
    }

    /// Negotiates `features` and sets up queue 0; returns the final status.
    @discardableResult
    func bringUp(features: UInt64 = Virtio.featureVersion1, driverOK: Bool = true) -> UInt32 {
        typealias R = VirtioMMIOTransport.Register
        w32(R.status, 0)
        w32(R.status, Virtio.Status.acknowledge)
        w32(R.status, Virtio.Status.acknowledge | Virtio.Status.driver)
        w32(R.driverFeaturesSel, 0); w32(R.driverFeatures, UInt32(truncatingIfNeeded: features))
        w32(R.driverFeaturesSel, 1); w32(R.driverFeatures, UInt32(features >> 32))
        w32(R.status, Virtio.Status.acknowledge | Virtio.Status.driver | Virtio.Status.featuresOK)
        guard r32(R.status) & Virtio.Status.featuresOK != 0 else { return r32(R.status) }
        w32(R.queueSel, 0)
        w32(R.queueNum, UInt32(size))
        w32(R.queueDescLow, UInt32(truncatingIfNeeded: desc)); w32(R.queueDescHigh, UInt32(desc >> 32))
        w32(R.queueDriverLow, UInt32(truncatingIfNeeded: avail)); w32(R.queueDriverHigh, UInt32(avail >> 32))
        w32(R.queueDeviceLow, UInt32(truncatingIfNeeded: used)); w32(R.queueDeviceHigh, UInt32(used >> 32))
        w32(R.queueReady, 1)
        if driverOK {
            w32(R.status, Virtio.Status.acknowledge | Virtio.Status.driver | Virtio.Status.featuresOK | Virtio.Status.driverOK)
        }
        return r32(R.status)
    }

    /// Writes descriptor `i`.
    func descriptor(_ i: UInt16, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16 = 0, table: UInt64? = nil) {
        let d = (table ?? desc) + 16 * UInt64(i)
        put(addr, at: d); put(len, at: d + 8); put(flags, at: d + 12); put(next, at: d + 14)
    }

    /// Makes chain `head` available and notifies queue 0.
    mutating func submit(_ head: UInt16) {
        put(head, at: avail + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        put(availIdx, at: avail + 2)
        w32(VirtioMMIOTransport.Register.queueNotify, 0)
    }

    var usedIdx: UInt16 { peek(UInt16.self, at: used + 2) }
    func usedElement(_ i: UInt16) -> (id: UInt32, len: UInt32) {
        let e = used + 4 + 8 * UInt64(i % size)
        return (peek(UInt32.self, at: e), peek(UInt32.self, at: e + 4))
    }
}

@Suite struct VirtioTransportTests {
    let ram = try! GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)

    @Test func identityRegisters() {
        let t = VirtioMMIOTransport(device: EchoDevice(), ram: ram, interrupt: TestLine())
        #expect(t.read(offset: 0, size: 4) == 0x7472_6976)
        #expect(t.read(offset: 4, size: 4) == 2)
        #expect(t.read(offset: 8, size: 4) == 0x99)
        let empty = VirtioMMIOTransport(device: nil, ram: ram, interrupt: TestLine())
        #expect(empty.read(offset: 0, size: 4) == 0x7472_6976)
        #expect(empty.read(offset: 8, size: 4) == 0)
    }

    @Test func featuresOfferVersion1AndDeviceBits() {
        let t = VirtioMMIOTransport(device: EchoDevice(), ram: ram, interrupt: TestLine())
        t.write(offset: 0x14, size: 4, value: 0)
        #expect(t.read(offset: 0x10, size: 4) & (1 << 3) != 0)
        t.write(offset: 0x14, size: 4, value: 1)
        #expect(t.read(offset: 0x10, size: 4) & 1 == 1)  // VERSION_1 is bit 32
    }

    @Test func featuresOKRefusedWithoutVersion1OrWithUnofferedBits() {
        let t = VirtioMMIOTransport(device: EchoDevice(), ram: ram, interrupt: TestLine())
        let d = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        #expect(d.bringUp(features: 1 << 3) & Virtio.Status.featuresOK == 0)
        #expect(d.bringUp(features: Virtio.featureVersion1 | 1 << 5) & Virtio.Status.featuresOK == 0)
        #expect(d.bringUp(features: Virtio.featureVersion1 | 1 << 3) & Virtio.Status.driverOK != 0)
    }

    @Test func configSpaceAndGeneration() {
        let dev = EchoDevice()
        let t = VirtioMMIOTransport(device: dev, ram: ram, interrupt: TestLine())
        #expect(t.read(offset: 0x100, size: 4) == 0x0403_0201)
        #expect(t.read(offset: 0x104, size: 1) == 5)
        t.write(offset: 0x100, size: 2, value: 0xBBAA)
        #expect(dev.config[0] == 0xAA && dev.config[1] == 0xBB)
    }

    @Test func chainRoundTripRaisesAndAcksInterrupt() {
        let dev = EchoDevice(), line = TestLine()
        let t = VirtioMMIOTransport(device: dev, ram: ram, interrupt: line)
        var d = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d.bringUp()
        #expect(dev.context != nil)
        for (i, b) in [UInt8](arrayLiteral: 1, 2, 3, 4, 5).enumerated() { d.put(b, at: 0x8004_0000 + UInt64(i)) }
        d.descriptor(0, addr: 0x8004_0000, len: 3, flags: 1, next: 1)
        d.descriptor(1, addr: 0x8004_0003, len: 2, flags: 1, next: 2)
        d.descriptor(2, addr: 0x8005_0000, len: 8, flags: 2)
        d.submit(0)
        #expect(d.usedIdx == 1)
        #expect(d.usedElement(0).id == 0 && d.usedElement(0).len == 5)
        #expect((0..<5).map { d.peek(UInt8.self, at: 0x8005_0000 + UInt64($0)) } == [5, 4, 3, 2, 1])
        #expect(line.isRaised)
        #expect(t.read(offset: 0x60, size: 4) == 1)
        t.write(offset: 0x64, size: 4, value: 1)
        #expect(!line.isRaised)
        #expect(t.read(offset: 0x60, size: 4) == 0)
    }

    @Test func indirectDescriptors() {
        let dev = EchoDevice()
        let t = VirtioMMIOTransport(device: dev, ram: ram, interrupt: TestLine())
        var d = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d.bringUp(features: Virtio.featureVersion1 | Virtio.featureIndirectDescriptors)
        let table: UInt64 = 0x8006_0000
        d.put(UInt16(0x0102), at: 0x8004_0000)
        d.descriptor(0, addr: 0x8004_0000, len: 2, flags: 1, next: 1, table: table)
        d.descriptor(1, addr: 0x8005_0000, len: 2, flags: 2, table: table)
        d.descriptor(3, addr: table, len: 32, flags: 4)
        d.submit(3)
        #expect(d.usedIdx == 1)
        #expect(d.usedElement(0).id == 3)
        #expect(d.peek(UInt16.self, at: 0x8005_0000) == 0x0201)
    }

    @Test func noInterruptFlagSuppressesInterrupt() {
        let dev = EchoDevice(), line = TestLine()
        let t = VirtioMMIOTransport(device: dev, ram: ram, interrupt: line)
        var d = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d.bringUp()
        d.put(UInt16(1), at: d.avail)  // VIRTQ_AVAIL_F_NO_INTERRUPT
        d.descriptor(0, addr: 0x8004_0000, len: 1, flags: 0)
        d.submit(0)
        #expect(d.usedIdx == 1)
        #expect(!line.isRaised)
    }

    @Test func eventIndexSuppressesUntilUsedEvent() {
        let dev = EchoDevice(), line = TestLine()
        let t = VirtioMMIOTransport(device: dev, ram: ram, interrupt: line)
        var d = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d.bringUp(features: Virtio.featureVersion1 | Virtio.featureEventIndex)
        d.put(UInt16(1), at: d.avail + 4 + 2 * UInt64(d.size))  // used_event = 1: interrupt after 2nd
        d.descriptor(0, addr: 0x8004_0000, len: 1, flags: 0)
        d.submit(0)
        #expect(!line.isRaised)
        #expect(d.peek(UInt16.self, at: d.used + 4 + 8 * UInt64(d.size)) == 1)  // avail_event
        d.submit(0)
        #expect(line.isRaised)
    }

    @Test func hostileDescriptorsMarkNeedsReset() {
        let dev = EchoDevice(), line = TestLine()
        let t = VirtioMMIOTransport(device: dev, ram: ram, interrupt: line)
        var d = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d.bringUp()
        // Buffer outside RAM.
        d.descriptor(0, addr: 0x1000, len: 16, flags: 0)
        d.submit(0)
        #expect(dev.errors.last == .bufferOutsideRAM(address: GuestPhysicalAddress(0x1000), length: 16))
        #expect(t.status & Virtio.Status.deviceNeedsReset != 0)
        #expect(t.read(offset: 0x60, size: 4) & 2 != 0)
        // A loop.
        d.bringUp()
        #expect(t.status & Virtio.Status.deviceNeedsReset == 0)
        var d2 = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d2.descriptor(0, addr: 0x8004_0000, len: 1, flags: 1, next: 1)
        d2.descriptor(1, addr: 0x8004_0000, len: 1, flags: 1, next: 0)
        d2.submit(0)
        #expect(dev.errors.last == .chainTooLong(head: 0))
        // Next index out of range.
        d2.bringUp()
        var d3 = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d3.descriptor(0, addr: 0x8004_0000, len: 1, flags: 1, next: 200)
        d3.submit(0)
        #expect(dev.errors.last == .descriptorIndexOutOfRange(index: 200, tableSize: 8))
        #expect(dev.resets == 3)
    }

    @Test func ringOutsideRAMFailsActivation() {
        let dev = EchoDevice()
        let t = VirtioMMIOTransport(device: dev, ram: ram, interrupt: TestLine())
        let d = FakeDriver(ram: ram, transport: t, base: 0x10)
        let s = d.bringUp()
        #expect(dev.context == nil)
        #expect(s & Virtio.Status.deviceNeedsReset != 0)
    }

    @Test func resetClearsState() {
        let dev = EchoDevice(), line = TestLine()
        let t = VirtioMMIOTransport(device: dev, ram: ram, interrupt: line)
        let d = FakeDriver(ram: ram, transport: t, base: 0x8001_0000)
        d.bringUp()
        t.write(offset: 0x70, size: 4, value: 0)
        #expect(t.read(offset: 0x70, size: 4) == 0)
        #expect(t.read(offset: 0x44, size: 4) == 0)
        #expect(dev.context == nil)
        #expect(t.read(offset: 0x34, size: 4) == 16)
    }
}
