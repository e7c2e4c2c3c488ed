import Machine
import Testing
@testable import Devices

/// A PCI host with four recording INTx wires, and the driver's view of it through ECAM, as
/// Linux's pci-host-generic sees QEMU's `virt`.
struct PCIHarness {
    let wires = (0..<4).map { _ in TestLine() }
    let host: PCIeHost
    let mmio: BARWindow

    init() {
        host = PCIeHost(intxWires: wires, stateSection: "pcie-host@30000000")
        mmio = host.window(.memory, pciBase: 0x4_0000_0000)
    }

    static func ecam(slot: Int, _ reg: Int) -> UInt64 { UInt64(slot) << 15 | UInt64(reg) }
    func cfg(_ slot: Int, _ reg: Int, _ size: Int = 4) -> UInt32 {
        UInt32(truncatingIfNeeded: host.ecam.read(offset: Self.ecam(slot: slot, reg), size: size))
    }
    func setCfg(_ slot: Int, _ reg: Int, _ value: UInt32, _ size: Int = 4) {
        host.ecam.write(offset: Self.ecam(slot: slot, reg), size: size, value: UInt64(value))
    }

    /// Sizes and assigns a 64-bit BAR as Linux does (write ones, read back, write the address),
    /// then enables memory decoding; returns the size found.
    func assign64(slot: Int, bar: Int, at address: UInt64) -> UInt64 {
        let reg = PCIConfig.bar0 + 4 * bar
        setCfg(slot, reg, ~0)
        setCfg(slot, reg + 4, ~0)
        let lo = cfg(slot, reg), hi = cfg(slot, reg + 4)
        let size = ~((UInt64(hi) << 32) | UInt64(lo & ~0xf)) &+ 1
        setCfg(slot, reg, UInt32(truncatingIfNeeded: address))
        setCfg(slot, reg + 4, UInt32(address >> 32))
        setCfg(slot, PCIConfig.command, UInt32(PCIConfig.Command.memory), 2)
        return size
    }

    /// The vendor capabilities of the function in `slot`: cfg_type → (config offset, BAR offset, length).
    func virtioCapabilities(slot: Int) -> [UInt8: (at: Int, offset: UInt32, length: UInt32)] {
        var out: [UInt8: (Int, UInt32, UInt32)] = [:]
        var at = Int(cfg(slot, PCIConfig.capabilitiesPointer, 1))
        var seen = 0
        while at != 0 && seen < 48 {
            if cfg(slot, at, 1) == 0x09 {
                out[UInt8(cfg(slot, at + 3, 1))] = (at, cfg(slot, at + 8), cfg(slot, at + 12))
            }
            at = Int(cfg(slot, at + 1, 1))
            seen += 1
        }
        return out
    }
}

@Suite struct PCIConfigSpaceTests {
    @Test func barSizingReadsBackTheSizeMaskAndType() {
        var c = PCIConfigSpace(identity: PCIIdentity(vendorID: 0x1af4, deviceID: 0x1042, revision: 1, classCode: 0x01_0000),
                               bars: [1: PCIBarDescriptor(kind: .memory32(prefetchable: false), size: 0x1000),
                                      4: PCIBarDescriptor(kind: .memory64(prefetchable: true), size: 0x4000)])
        #expect(c.read(offset: 0x14, size: 4) == 0)
        #expect(c.read(offset: 0x20, size: 4) == 0xc)
        c.write(offset: 0x14, size: 4, value: ~0)
        c.write(offset: 0x20, size: 4, value: ~0)
        c.write(offset: 0x24, size: 4, value: ~0)
        #expect(c.read(offset: 0x14, size: 4) == 0xffff_f000)
        #expect(c.read(offset: 0x20, size: 4) == 0xffff_c00c)
        #expect(c.read(offset: 0x24, size: 4) == 0xffff_ffff)
        // Undeclared BARs stay zero.
        c.write(offset: 0x10, size: 4, value: ~0)
        #expect(c.read(offset: 0x10, size: 4) == 0)
    }

    @Test func identityIsReadOnlyAndCommandKeepsOnlyItsWritableBits() {
        var c = PCIConfigSpace(identity: PCIIdentity(vendorID: 0x1af4, deviceID: 0x1042, revision: 1, classCode: 0x01_0000,
                                                     subsystemVendorID: 0x1af4, subsystemID: 0x1100, interruptPin: 1))
        c.write(offset: 0, size: 4, value: 0x1234_5678)
        #expect(c.read(offset: 0, size: 4) == 0x1042_1af4)
        #expect(c.read(offset: 8, size: 4) == 0x0100_0001)
        c.write(offset: PCIConfig.command, size: 2, value: 0xffff)
        #expect(c.read(offset: PCIConfig.command, size: 2) == UInt32(PCIConfig.Command.writable))
        c.write(offset: PCIConfig.interruptLine, size: 2, value: 0x0705)
        #expect(c.read(offset: PCIConfig.interruptLine, size: 1) == 5)
        #expect(c.read(offset: PCIConfig.interruptPin, size: 1) == 1)
    }

    @Test func barDecodesOnlyWhenAssignedAndEnabled() {
        var c = PCIConfigSpace(identity: PCIIdentity(vendorID: 1, deviceID: 2, revision: 0, classCode: 0),
                               bars: [0: PCIBarDescriptor(kind: .memory32(prefetchable: false), size: 0x100)])
        #expect(c.barAddress(0) == nil)
        c.write(offset: 0x10, size: 4, value: 0x4000_0100)
        #expect(c.barAddress(0) == nil)
        c.write(offset: PCIConfig.command, size: 2, value: UInt32(PCIConfig.Command.memory))
        #expect(c.barAddress(0) == 0x4000_0100)
        c.write(offset: PCIConfig.command, size: 2, value: 0)
        #expect(c.barAddress(0) == nil)
    }

    @Test func capabilitiesAreChainedAndReadOnly() {
        var c = PCIConfigSpace(identity: PCIIdentity(vendorID: 1, deviceID: 2, revision: 0, classCode: 0))
        #expect(c.read(offset: PCIConfig.status, size: 2) & UInt32(PCIConfig.Status.capabilityList) == 0)
        let a = c.addCapability(id: 9, body: [3, 1, 2])
        let b = c.addCapability(id: 9, body: [6, 4, 5, 6, 7], writable: [1..<2])
        #expect(a == 0x40 && b == 0x48)
        #expect(c.read(offset: PCIConfig.capabilitiesPointer, size: 1) == 0x40)
        #expect(c.read(offset: 0x41, size: 1) == 0x48 && c.read(offset: 0x49, size: 1) == 0)
        #expect(c.read(offset: PCIConfig.status, size: 2) & UInt32(PCIConfig.Status.capabilityList) != 0)
        c.write(offset: 0x42, size: 2, value: 0xffff)
        #expect(c.read(offset: 0x42, size: 2) == 0x0103)
        c.write(offset: 0x4a, size: 2, value: 0xffff)
        #expect(c.read(offset: 0x4a, size: 2) == 0xff06)
    }

    @Test func restoreRefusesAnotherFunctionsIdentity() throws {
        let id = PCIIdentity(vendorID: 0x1af4, deviceID: 0x1042, revision: 1, classCode: 0x01_0000)
        var a = PCIConfigSpace(identity: id)
        a.write(offset: PCIConfig.command, size: 2, value: 6)
        var b = PCIConfigSpace(identity: id)
        try b.restore(a.bytes, section: "t")
        #expect(b.command == 6)
        var other = PCIConfigSpace(identity: PCIIdentity(vendorID: 0x1af4, deviceID: 0x1041, revision: 1, classCode: 0x02_0000))
        #expect(throws: SavedStateError.self) { try other.restore(a.bytes, section: "t") }
        #expect(other.command == 0)
    }
}

/// A function with one 32-bit memory BAR whose bytes are plain storage.
final class ScratchFunction: PCIFunction, @unchecked Sendable {
    let name = "scratch"
    var config = PCIConfigSpace(identity: PCIIdentity(vendorID: 0x1234, deviceID: 0x11, revision: 0, classCode: 0xff_0000),
                                bars: [0: PCIBarDescriptor(kind: .memory32(prefetchable: false), size: 0x100)])
    var storage = [UInt8](repeating: 0, count: 0x100)
    var barDescriptors: [Int: PCIBarDescriptor] { config.bars }
    func configRead(offset: Int, size: Int) -> UInt32 { config.read(offset: offset, size: size) }
    func configWrite(offset: Int, size: Int, value: UInt32) { config.write(offset: offset, size: size, value: value) }
    func barAddress(_ index: Int) -> UInt64? { config.barAddress(index) }
    func barRead(index: Int, offset: UInt64, size: Int) -> UInt64 {
        (0..<size).reduce(0) { $0 | UInt64(storage[Int(offset) + $1]) << (8 * $1) }
    }
    func barWrite(index: Int, offset: UInt64, size: Int, value: UInt64) {
        for i in 0..<size { storage[Int(offset) + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }
}

@Suite struct PCIeHostTests {
    @Test func ecamShowsTheHostBridgeAndAllOnesForAbsentFunctions() {
        let h = PCIHarness()
        #expect(h.cfg(0, 0) == 0x0008_1b36)
        #expect(h.cfg(0, 8) >> 8 == 0x06_0000)
        #expect(h.cfg(1, 0) == 0xffff_ffff)
        #expect(h.cfg(1, 0, 2) == 0xffff)
        #expect(h.host.ecam.read(offset: 1 << 20, size: 4) == 0xffff_ffff)        // bus 1 does not exist
        #expect(h.host.ecam.read(offset: 1 << 12, size: 4) == 0xffff_ffff)       // nor function 1
    }

    @Test func barAccessesReachTheFunctionOnlyWhileDecoding() throws {
        let h = PCIHarness(), f = ScratchFunction()
        try h.host.plug(f, slot: 3)
        #expect(h.cfg(3, 0) == 0x0011_1234)
        let window = h.host.window(.memory, pciBase: 0x4000_0000)
        h.setCfg(3, 0x10, ~0)
        #expect(h.cfg(3, 0x10) == 0xffff_ff00)
        h.setCfg(3, 0x10, 0x4000_0200)
        window.write(offset: 0x204, size: 4, value: 0xdead_beef)
        #expect(f.storage[4] == 0)                                       // memory decoding still off
        #expect(window.read(offset: 0x204, size: 4) == 0xffff_ffff)
        h.setCfg(3, PCIConfig.command, UInt32(PCIConfig.Command.memory), 2)
        window.write(offset: 0x204, size: 4, value: 0xdead_beef)
        #expect(window.read(offset: 0x204, size: 4) == 0xdead_beef)
        #expect(f.storage[4] == 0xef)
        #expect(window.read(offset: 0x300, size: 4) == 0xffff_ffff)     // past the BAR
        h.host.unplug(slot: 3)
        #expect(h.cfg(3, 0) == 0xffff_ffff)
        #expect(window.read(offset: 0x204, size: 4) == 0xffff_ffff)
    }

    @Test func slotsAreCheckedAndHandedOutLowestFirst() throws {
        let h = PCIHarness()
        #expect(h.host.freeSlot() == 1)
        try h.host.plug(ScratchFunction(), slot: 1)
        #expect(h.host.freeSlot() == 2)
        #expect(throws: PCIError.slotInUse(1, function: 0)) { try h.host.plug(ScratchFunction(), slot: 1) }
        #expect(throws: PCIError.badSlot(0)) { try h.host.plug(ScratchFunction(), slot: 0) }
        #expect(throws: PCIError.badSlot(32)) { try h.host.plug(ScratchFunction(), slot: 32) }
    }

    @Test func intxIsSwizzledAndSharedWiresStayHighUntilAllLower() {
        let h = PCIHarness()
        // QEMU's virt interrupt-map: slot s, pin p (1-based) -> PLIC 32 + (s + p - 1) % 4.
        #expect(PCIIntxRouter.wire(slot: 0, pin: 1) == 0)
        #expect(PCIIntxRouter.wire(slot: 1, pin: 1) == 1)
        #expect(PCIIntxRouter.wire(slot: 3, pin: 2) == 0)
        let a = h.host.intx.line(slot: 1, pin: 1), b = h.host.intx.line(slot: 5, pin: 1)
        a.set(true)
        #expect(h.wires[1].isRaised && !h.wires[0].isRaised)
        b.set(true)
        a.set(false)
        #expect(h.wires[1].isRaised)
        a.set(false)                      // lowering twice does not count twice
        #expect(h.wires[1].isRaised)
        b.set(false)
        #expect(!h.wires[1].isRaised)
    }

    @Test func hostStateRoundTripsAndResetClearsTheCommandRegister() throws {
        let h = PCIHarness()
        h.setCfg(0, PCIConfig.command, 6, 2)
        var w = StateWriter()
        h.host.saveState(to: &w)
        h.host.reset()
        #expect(h.cfg(0, PCIConfig.command, 2) == 0)
        var r = StateReader(section: h.host.stateSection, bytes: w.bytes)
        try h.host.loadState(from: &r, version: PCIeHost.State.version)
        #expect(h.cfg(0, PCIConfig.command, 2) == 6)
    }
}
