import Machine
import Testing
@testable import Devices

/// Functions 1…7 of a root-bus slot, as QEMU's `multifunction=on` and libvirt's packed root
/// ports use them.
@Suite struct PCIMultifunctionTests {
    static func ecam(slot: Int, function: Int, _ reg: Int) -> UInt64 {
        UInt64(slot) << 15 | UInt64(function) << 12 | UInt64(reg)
    }
    /// A function whose device ID tells it apart.
    static func scratch(_ device: UInt16) -> ScratchFunction {
        let f = ScratchFunction()
        f.config = PCIConfigSpace(identity: PCIIdentity(vendorID: 0x1234, deviceID: device, revision: 0, classCode: 0xff_0000),
                                  bars: [0: PCIBarDescriptor(kind: .memory32(prefetchable: false), size: 0x100)])
        return f
    }

    @Test func ecamReachesEachFunctionAndAbsentOnesReadAllOnes() throws {
        let h = PCIHarness()
        try h.host.plug(Self.scratch(0x10), slot: 1, function: 0, multifunction: true)
        try h.host.plug(Self.scratch(0x11), slot: 1, function: 1)
        try h.host.plug(Self.scratch(0x17), slot: 1, function: 7)
        func id(_ fn: Int) -> UInt64 { h.host.ecam.read(offset: Self.ecam(slot: 1, function: fn, 0), size: 4) }
        #expect(id(0) == 0x0010_1234)
        #expect(id(1) == 0x0011_1234)
        #expect(id(7) == 0x0017_1234)
        for fn in 2...6 { #expect(id(fn) == 0xffff_ffff) }
        // Writes reach the function addressed and no other.
        h.host.ecam.write(offset: Self.ecam(slot: 1, function: 1, PCIConfig.command), size: 2, value: 2)
        #expect(h.host.ecam.read(offset: Self.ecam(slot: 1, function: 1, PCIConfig.command), size: 2) == 2)
        #expect(h.host.ecam.read(offset: Self.ecam(slot: 1, function: 0, PCIConfig.command), size: 2) == 0)
        // Functions above 0 of the host bridge's slot, and of an empty slot, are absent.
        #expect(h.host.ecam.read(offset: Self.ecam(slot: 0, function: 1, 0), size: 4) == 0xffff_ffff)
        #expect(h.host.ecam.read(offset: Self.ecam(slot: 2, function: 1, 0), size: 2) == 0xffff)
        #expect(h.host.rootFunctions().map { [$0.slot, $0.function] } == [[0, 0], [1, 0], [1, 1], [1, 7]])
    }

    @Test func headerTypeCarriesTheMultiFunctionBitOnlyForAMultifunctionFunctionZero() throws {
        let h = PCIHarness()
        try h.host.plug(Self.scratch(0x10), slot: 1, function: 0, multifunction: true)
        try h.host.plug(Self.scratch(0x11), slot: 1, function: 1)
        try h.host.plug(Self.scratch(0x20), slot: 2)
        func byte(_ slot: Int, _ fn: Int, _ reg: Int, _ size: Int) -> UInt64 {
            h.host.ecam.read(offset: Self.ecam(slot: slot, function: fn, reg), size: size)
        }
        #expect(byte(1, 0, PCIConfig.headerType, 1) == 0x80)
        #expect(byte(1, 0, 0x0c, 4) >> 16 & 0xff == 0x80)          // as a dword (Linux reads it so too)
        #expect(byte(1, 0, 0x0e, 2) & 0xff == 0x80)
        #expect(byte(1, 0, 0x0c, 2) == 0)                           // bytes 0x0c…0x0d are untouched
        #expect(byte(1, 1, PCIConfig.headerType, 1) == 0)
        #expect(byte(2, 0, PCIConfig.headerType, 1) == 0)
        #expect(h.host.isMultifunction(slot: 1) && !h.host.isMultifunction(slot: 2))
        // Unplugging function 0 clears the bit with it.
        h.host.unplug(slot: 1, function: 0)
        #expect(!h.host.isMultifunction(slot: 1))
    }

    @Test func qemusRulesAreKept() throws {
        let h = PCIHarness()
        try h.host.plug(Self.scratch(0x10), slot: 1)               // single-function function 0
        #expect(throws: PCIError.singleFunction(1, function: 2)) { try h.host.plug(Self.scratch(0x12), slot: 1, function: 2) }
        #expect("\(PCIError.singleFunction(0x1a, function: 2))" == "PCI: single function device can't be populated in function 1a.2")
        // A function above 0 first, then a single-function function 0: refused too.
        try h.host.plug(Self.scratch(0x31), slot: 3, function: 1)
        #expect(throws: PCIError.singleFunctionButPopulated(3, function: 1)) { try h.host.plug(Self.scratch(0x30), slot: 3) }
        #expect("\(PCIError.singleFunctionButPopulated(3, function: 1))" == "PCI: 3.0 indicates single function, but 3.1 is already populated.")
        try h.host.plug(Self.scratch(0x30), slot: 3, multifunction: true)
        #expect(throws: PCIError.slotInUse(3, function: 1)) { try h.host.plug(Self.scratch(0x31), slot: 3, function: 1) }
        #expect(throws: PCIError.badFunction(8)) { try h.host.plug(Self.scratch(0x38), slot: 3, function: 8) }
        // A slot with only a function above 0 is not free.
        try h.host.plug(Self.scratch(0x21), slot: 2, function: 4)
        #expect(h.host.freeSlot() == 4)
    }

    @Test func twoFunctionsOfOneSlotShareTheirIntxWire() {
        let h = PCIHarness()
        // Functions of slot 1 raise INTA: both land on wire 1 (the swizzle is by slot).
        let f0 = h.host.intx.line(slot: 1, pin: 1), f1 = h.host.intx.line(slot: 1, pin: 1)
        f0.set(true)
        f1.set(true)
        f0.set(false)
        #expect(h.wires[1].isRaised)                                // f1 still holds it
        #expect(h.host.intx.level(wire: 1))
        f1.set(false)
        #expect(!h.wires[1].isRaised)
        f1.set(true)
        f0.set(false)                                               // f0 was low: no effect
        #expect(h.wires[1].isRaised)
    }

    @Test func barsOfFunctionsAboveZeroDecode() throws {
        let h = PCIHarness()
        let f1 = Self.scratch(0x11)
        try h.host.plug(Self.scratch(0x10), slot: 1, multifunction: true)
        try h.host.plug(f1, slot: 1, function: 1)
        h.host.ecam.write(offset: Self.ecam(slot: 1, function: 1, PCIConfig.bar0), size: 4, value: 0x1000)
        h.host.ecam.write(offset: Self.ecam(slot: 1, function: 1, PCIConfig.command), size: 2, value: UInt64(PCIConfig.Command.memory))
        let window = h.host.window(.memory, pciBase: 0)
        window.write(offset: 0x1004, size: 4, value: 0xabcd)
        #expect(f1.storage[4] == 0xcd && f1.storage[5] == 0xab)
    }
}
