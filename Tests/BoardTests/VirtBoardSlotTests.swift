import Devices
import Machine
import Synchronization
import Testing
@testable import Board

/// Every virtio-mmio slot answers like QEMU's `virt`: a slot without a device holds an empty
/// transport (magic "virt", version 2, DeviceID 0), and attaching or detaching a device swaps
/// the empty transport out and back in.
struct VirtBoardSlotTests {
    let magic = VirtioMMIOTransport.Register.magic
    let version = VirtioMMIOTransport.Register.version
    let deviceID = VirtioMMIOTransport.Register.deviceID

    func board(transports: Int = 0) throws -> VirtBoard {
        var c = BoardConfig()
        c.memorySize = 64 << 20
        c.rngSeedBytes = 0
        c.virtioTransports = Array(repeating: { FakeTransport($0) }, count: transports)
        return try VirtBoard(config: c, system: NullSystem())
    }

    func slotBase(_ i: Int) -> GuestPhysicalAddress { VirtMemoryMap.virtioBase + UInt64(i) * VirtMemoryMap.virtioStride }

    @Test func everyEmptySlotAnswersVirtVersion2DeviceID0() throws {
        let b = try board()
        for i in 0..<VirtMemoryMap.virtioSlotCount {
            let base = slotBase(i)
            #expect(b.bus.read(base + magic, size: 4) == 0x7472_6976, "slot \(i) magic")
            #expect(b.bus.read(base + version, size: 4) == 2, "slot \(i) version")
            #expect(b.bus.read(base + deviceID, size: 4) == 0, "slot \(i) device id")
        }
        #expect(b.emptyVirtioSlots.count == VirtMemoryMap.virtioSlotCount)
        #expect(b.virtioDevices.isEmpty)
        #expect(b.bus.unmappedAccesses.load(ordering: .relaxed) == 0)
    }

    @Test func writesToAnEmptySlotAreHarmless() throws {
        let b = try board()
        let base = slotBase(3)
        b.bus.write(base + VirtioMMIOTransport.Register.status, size: 4, value: 0xf)
        b.bus.write(base + VirtioMMIOTransport.Register.queueNotify, size: 4, value: 0)
        #expect(b.bus.read(base + VirtioMMIOTransport.Register.status, size: 4) == 0)
        #expect(b.bus.read(base + deviceID, size: 4) == 0)
        #expect(b.hartInterrupts[0].lines.load(ordering: .relaxed) == 0)
    }

    @Test func devicesTakeSlotsAndTheRestStayEmpty() throws {
        let b = try board(transports: 2)
        #expect(b.bus.lookup(slotBase(0))?.device is FakeTransport)
        #expect(b.bus.lookup(slotBase(1))?.device is FakeTransport)
        for i in 2..<VirtMemoryMap.virtioSlotCount {
            #expect(b.bus.lookup(slotBase(i))?.device is VirtioMMIOTransport, "slot \(i)")
        }
        #expect(Set(b.emptyVirtioSlots.keys) == Set(2..<VirtMemoryMap.virtioSlotCount))
    }

    @Test func attachAndDetachSwapTheEmptyTransport() throws {
        let b = try board()
        let slot = try b.attachVirtio { FakeTransport($0) }
        #expect(slot == 0)
        #expect(b.bus.lookup(slotBase(0))?.device is FakeTransport)
        #expect(b.emptyVirtioSlots[0] == nil)
        b.detachVirtio(slot: 0)
        #expect(b.bus.lookup(slotBase(0))?.device is VirtioMMIOTransport)
        #expect(b.bus.read(slotBase(0) + deviceID, size: 4) == 0)
        #expect(b.bus.read(slotBase(0) + magic, size: 4) == 0x7472_6976)
        // The slot can be used again.
        #expect(try b.attachVirtio { FakeTransport($0) } == 0)
    }

    @Test func aFailingFactoryLeavesTheSlotEmptyAndMapped() throws {
        struct Boom: Error {}
        let b = try board()
        #expect(throws: Boom.self) { _ = try b.attachVirtio { _ in throw Boom() } }
        #expect(b.bus.lookup(slotBase(0))?.device is VirtioMMIOTransport)
        #expect(b.bus.read(slotBase(0) + magic, size: 4) == 0x7472_6976)
        #expect(try b.attachVirtio { FakeTransport($0) } == 0)
    }

    @Test func allEightSlotsCanHoldDevices() throws {
        let b = try board(transports: VirtMemoryMap.virtioSlotCount)
        #expect(b.emptyVirtioSlots.isEmpty)
        #expect(throws: BoardError.self) { _ = try b.attachVirtio { FakeTransport($0) } }
    }
}

/// `system_powerdown` reaches the guest only through a configured power button.
struct VirtBoardPowerButtonTests {
    @Test func thePowerButtonCallsTheConfiguredAction() throws {
        let presses = Mutex(0)
        var c = BoardConfig()
        c.memorySize = 64 << 20
        c.rngSeedBytes = 0
        c.powerButton = { presses.withLock { $0 += 1 } }
        let b = try VirtBoard(config: c, system: NullSystem())
        #expect(b.pressPowerButton() == true)
        #expect(presses.withLock { $0 } == 1)
    }

    @Test func withoutAnActionThereIsNoPowerButton() throws {
        var c = BoardConfig()
        c.memorySize = 64 << 20
        c.rngSeedBytes = 0
        let b = try VirtBoard(config: c, system: NullSystem())
        #expect(b.pressPowerButton() == false)
    }
}
