import Machine
import Testing
@testable import Devices

/// Linux's virtio_pci_modern driver in miniature: finds the capabilities, assigns BAR 4, and
/// drives the common configuration, notifications and ISR through the host's memory window.
struct PCIVirtioDriver {
    let h: PCIHarness
    let slot: Int
    let ram: GuestRAM
    let barBase: UInt64 = 0x4_0000_0000
    var common: UInt64 = 0, isr: UInt64 = 0, deviceConfig: UInt64 = 0, notify: UInt64 = 0
    var multiplier: UInt32 = 0
    let desc: UInt64 = 0x8001_0000, avail: UInt64 = 0x8001_1000, used: UInt64 = 0x8001_2000
    var availIdx: UInt16 = 0
    let size: UInt16 = 8

    init(h: PCIHarness, slot: Int, ram: GuestRAM) {
        self.h = h
        self.slot = slot
        self.ram = ram
        _ = h.assign64(slot: slot, bar: VirtioPCITransport.bar, at: barBase)
        let caps = h.virtioCapabilities(slot: slot)
        common = barBase + UInt64(caps[VirtioPCITransport.CapabilityType.common]!.offset)
        isr = barBase + UInt64(caps[VirtioPCITransport.CapabilityType.isr]!.offset)
        deviceConfig = barBase + UInt64(caps[VirtioPCITransport.CapabilityType.device]!.offset)
        let n = caps[VirtioPCITransport.CapabilityType.notify]!
        notify = barBase + UInt64(n.offset)
        multiplier = h.cfg(slot, n.at + 16)
    }

    func rd(_ a: UInt64, _ size: Int) -> UInt64 { h.mmio.read(offset: a - barBase, size: size) }
    func wr(_ a: UInt64, _ size: Int, _ v: UInt64) { h.mmio.write(offset: a - barBase, size: size, value: v) }
    typealias C = VirtioPCITransport.Common

    var status: UInt8 { UInt8(rd(common + UInt64(C.deviceStatus), 1)) }
    func setStatus(_ s: UInt32) { wr(common + UInt64(C.deviceStatus), 1, UInt64(s)) }

    /// Negotiates `features` and sets up queue 0; returns the final status.
    @discardableResult
    func bringUp(features: UInt64 = Virtio.featureVersion1) -> UInt8 {
        setStatus(0)
        setStatus(Virtio.Status.acknowledge | Virtio.Status.driver)
        wr(common + UInt64(C.driverFeatureSelect), 4, 0)
        wr(common + UInt64(C.driverFeature), 4, features & 0xffff_ffff)
        wr(common + UInt64(C.driverFeatureSelect), 4, 1)
        wr(common + UInt64(C.driverFeature), 4, features >> 32)
        setStatus(Virtio.Status.acknowledge | Virtio.Status.driver | Virtio.Status.featuresOK)
        guard status & UInt8(Virtio.Status.featuresOK) != 0 else { return status }
        wr(common + UInt64(C.queueSelect), 2, 0)
        wr(common + UInt64(C.queueSize), 2, UInt64(size))
        for (field, a) in [(C.queueDesc, desc), (C.queueDriver, avail), (C.queueDevice, used)] {
            wr(common + UInt64(field), 4, a & 0xffff_ffff)        // as vp_iowrite64_twopart
            wr(common + UInt64(field) + 4, 4, a >> 32)
        }
        wr(common + UInt64(C.queueEnable), 2, 1)
        setStatus(Virtio.Status.acknowledge | Virtio.Status.driver | Virtio.Status.featuresOK | Virtio.Status.driverOK)
        return status
    }

    func put<T: FixedWidthInteger>(_ v: T, at a: UInt64) {
        withUnsafeBytes(of: v.littleEndian) { try! ram.write($0, at: GuestPhysicalAddress(a)) }
    }
    func peek<T: FixedWidthInteger>(_: T.Type, at a: UInt64) -> T {
        T(littleEndian: ram.hostPointer(GuestPhysicalAddress(a), length: UInt64(MemoryLayout<T>.size))!
            .loadUnaligned(as: T.self))
    }

    /// Posts a two-descriptor chain (3 readable bytes at `input`, 8 writable at `output`) and notifies queue 0.
    mutating func echo(_ bytes: [UInt8], input: UInt64 = 0x8004_0000, output: UInt64 = 0x8005_0000) {
        for (i, b) in bytes.enumerated() { put(b, at: input + UInt64(i)) }
        let head = UInt16(availIdx % size) * 2 % size
        let d0 = desc + 16 * UInt64(head), d1 = desc + 16 * UInt64(head + 1)
        put(input, at: d0); put(UInt32(bytes.count), at: d0 + 8); put(UInt16(1), at: d0 + 12); put(head + 1, at: d0 + 14)
        put(output, at: d1); put(UInt32(8), at: d1 + 8); put(UInt16(2), at: d1 + 12); put(UInt16(0), at: d1 + 14)
        put(head, at: avail + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        put(availIdx, at: avail + 2)
        let off = rd(common + UInt64(C.queueNotifyOff), 2)
        wr(notify + off * UInt64(multiplier), 2, 0)
    }

    var usedIdx: UInt16 { peek(UInt16.self, at: used + 2) }
}

@Suite struct VirtioPCITransportTests {
    let ram = try! GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)

    func plugged(_ dev: EchoDevice = EchoDevice(), slot: Int = 1) throws -> (PCIHarness, VirtioPCITransport) {
        let h = PCIHarness()
        let t = VirtioPCITransport(device: dev, ram: ram, intx: h.host.intx.line(slot: slot, pin: 1),
                                   name: "echo-pci", stateSection: "virtio-pci@00:0\(slot).0")
        try h.host.plug(t, slot: slot)
        return (h, t)
    }

    @Test func identityIsModernVirtioWithQEMUsClassAndPinA() throws {
        let (h, _) = try plugged()
        #expect(h.cfg(1, 0) == 0x10d9_1af4)                  // 1af4:(1040 + 0x99)
        #expect(h.cfg(1, 8) & 0xff == 1)                     // revision 1: modern only
        #expect(h.cfg(1, PCIConfig.subsystemVendorID) == 0x1100_1af4)
        #expect(h.cfg(1, PCIConfig.interruptPin, 1) == 1)
        #expect(VirtioPCITransport.identity(deviceID: Virtio.DeviceID.block).classCode == 0x01_0000)
        #expect(VirtioPCITransport.identity(deviceID: Virtio.DeviceID.block).deviceID == 0x1042)
        #expect(VirtioPCITransport.identity(deviceID: Virtio.DeviceID.input).classCode == 0x09_8000)
    }

    @Test func capabilitiesPointIntoOneSixtyFourBitBAR() throws {
        let (h, _) = try plugged()
        let caps = h.virtioCapabilities(slot: 1)
        #expect(Set(caps.keys) == [1, 2, 3, 4, 5])
        for (type, cap) in caps where type != 5 {
            #expect(h.cfg(1, cap.at + 4, 1) == 4, "cap \(type) names BAR 4")
        }
        #expect(caps[1]!.length >= 0x38)
        #expect(h.cfg(1, caps[2]!.at + 16) == 4)             // notify_off_multiplier
        #expect(h.assign64(slot: 1, bar: 4, at: 0x4_0000_0000) == VirtioPCITransport.barSize)
    }

    @Test func negotiationRefusesWithoutVersion1AndRoundTripsAChainWithINTx() throws {
        let dev = EchoDevice()
        let (h, _) = try plugged(dev)
        var d = PCIVirtioDriver(h: h, slot: 1, ram: ram)
        #expect(d.bringUp(features: 1 << 3) & UInt8(Virtio.Status.featuresOK) == 0)
        #expect(d.rd(d.common + UInt64(VirtioPCITransport.Common.queueSize), 2) == 16)   // the maximum after reset
        #expect(d.bringUp() & UInt8(Virtio.Status.driverOK) != 0)
        #expect(dev.context?.queues[0]?.size == 8)
        #expect(d.rd(d.common + UInt64(VirtioPCITransport.Common.numQueues), 2) == 2)
        #expect(d.rd(d.common + UInt64(VirtioPCITransport.Common.configMSIXVector), 2) == 0xffff)
        d.echo([1, 2, 3])
        #expect(dev.notified == [0])
        #expect(d.usedIdx == 1)
        #expect((0..<3).map { d.peek(UInt8.self, at: 0x8005_0000 + UInt64($0)) } == [3, 2, 1])
        // Slot 1, INTA -> wire 1 (PLIC 33 on virt); the status register shows it too.
        #expect(h.wires[1].isRaised)
        #expect(h.cfg(1, PCIConfig.status, 2) & UInt32(PCIConfig.Status.interrupt) != 0)
        #expect(d.rd(d.isr, 1) == 1)                          // reading the ISR clears it
        #expect(!h.wires[1].isRaised)
        #expect(d.rd(d.isr, 1) == 0)
        #expect(h.cfg(1, PCIConfig.status, 2) & UInt32(PCIConfig.Status.interrupt) == 0)
    }

    @Test func interruptDisableMasksThePin() throws {
        let (h, _) = try plugged()
        var d = PCIVirtioDriver(h: h, slot: 1, ram: ram)
        d.bringUp()
        h.setCfg(1, PCIConfig.command, UInt32(PCIConfig.Command.memory | PCIConfig.Command.interruptDisable), 2)
        d.echo([9])
        #expect(!h.wires[1].isRaised)
        #expect(h.cfg(1, PCIConfig.status, 2) & UInt32(PCIConfig.Status.interrupt) != 0)
        h.setCfg(1, PCIConfig.command, UInt32(PCIConfig.Command.memory), 2)
        #expect(h.wires[1].isRaised)
    }

    @Test func deviceConfigAndThePCIConfigWindow() throws {
        let dev = EchoDevice()
        let (h, _) = try plugged(dev)
        let d = PCIVirtioDriver(h: h, slot: 1, ram: ram)
        #expect(d.rd(d.deviceConfig, 4) == 0x0403_0201)
        d.wr(d.deviceConfig, 1, 0xaa)
        #expect(dev.config[0] == 0xaa)
        // VIRTIO_PCI_CAP_PCI_CFG: bar 4, offset of num_queues, length 2, then read the data.
        let w = h.virtioCapabilities(slot: 1)[5]!.at
        h.setCfg(1, w + 4, 4, 1)
        h.setCfg(1, w + 8, UInt32(VirtioPCITransport.Common.numQueues))
        h.setCfg(1, w + 12, 2)
        #expect(h.cfg(1, w + 16) == 2)
    }

    @Test func statusZeroAndSystemResetReturnToPowerOn() throws {
        let dev = EchoDevice()
        let (h, t) = try plugged(dev)
        var d = PCIVirtioDriver(h: h, slot: 1, ram: ram)
        d.bringUp()
        d.echo([1])
        d.setStatus(0)
        #expect(d.status == 0 && dev.context == nil && !h.wires[1].isRaised)
        d.bringUp()
        t.reset()
        #expect(h.cfg(1, PCIConfig.command, 2) == 0)
        #expect(h.cfg(1, 0x20) == 0xc)                          // BAR 4 unassigned again
        #expect(t.status == 0)
    }

    @Test func savedStateRestoresBARsQueuesAndInterruptIntoAFreshTransport() throws {
        let (h, t) = try plugged()
        var d = PCIVirtioDriver(h: h, slot: 1, ram: ram)
        d.bringUp()
        d.echo([1, 2])
        var w = StateWriter()
        t.saveState(to: &w)

        let dev2 = EchoDevice()
        let (h2, t2) = try plugged(dev2)
        var r = StateReader(section: t2.stateSection, bytes: w.bytes)
        try t2.loadState(from: &r, version: VirtioPCITransport.State.version)
        #expect(h2.wires[1].isRaised)                          // the pending interrupt comes back
        #expect(dev2.context != nil)
        var d2 = PCIVirtioDriver(h: h2, slot: 1, ram: ram)    // reassigns the same BAR address
        d2.availIdx = d.availIdx
        #expect(d2.rd(d2.isr, 1) == 1)
        d2.echo([7, 8, 9], output: 0x8006_0000)
        #expect(d2.usedIdx == 2)
        #expect(d2.peek(UInt8.self, at: 0x8006_0000) == 9)
    }

    @Test func savedStateOfAnotherDeviceIsRefusedWithoutChanges() throws {
        let (_, t) = try plugged()
        var w = StateWriter()
        t.saveState(to: &w)
        let h = PCIHarness()
        let other = VirtioPCITransport(device: QuietDevice(), ram: ram, intx: h.host.intx.line(slot: 1, pin: 1),
                                       name: "blk", stateSection: "virtio-pci@00:01.0")
        var r = StateReader(section: other.stateSection, bytes: w.bytes)
        #expect(throws: SavedStateError.self) { try other.loadState(from: &r, version: VirtioPCITransport.State.version) }
    }
}

/// A device of another kind (entropy) that does nothing.
final class QuietDevice: VirtioDevice, @unchecked Sendable {
    let name = "quiet"
    let deviceID = Virtio.DeviceID.entropy
    let deviceFeatures: UInt64 = 0
    let queueCount = 1
    let maxQueueSize: UInt16 = 16
    func readConfig(offset: Int, size: Int) -> UInt64 { 0 }
    func writeConfig(offset: Int, size: Int, value: UInt64) {}
    func activate(_ context: VirtioContext) throws {}
    func queueNotify(_ index: Int) {}
    func reset() {}
}
