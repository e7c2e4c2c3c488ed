import Devices
import Foundation
import Machine
import Testing
@testable import Board

/// A one-BAR PCI function that raises INTA on a write to its BAR.
final class PinFunction: PCIFunction, @unchecked Sendable {
    let name = "pin"
    let intx: any InterruptLine
    var config = PCIConfigSpace(identity: PCIIdentity(vendorID: 0x1234, deviceID: 0x5678, revision: 0, classCode: 0xff_0000,
                                                      interruptPin: 1),
                                bars: [0: PCIBarDescriptor(kind: .memory32(prefetchable: false), size: 0x1000)])
    init(_ context: PCIDeviceContext) { intx = context.intx }
    var barDescriptors: [Int: PCIBarDescriptor] { config.bars }
    func configRead(offset: Int, size: Int) -> UInt32 { config.read(offset: offset, size: size) }
    func configWrite(offset: Int, size: Int, value: UInt32) { config.write(offset: offset, size: size, value: value) }
    func barAddress(_ index: Int) -> UInt64? { config.barAddress(index) }
    func barRead(index: Int, offset: UInt64, size: Int) -> UInt64 { 0x42 }
    func barWrite(index: Int, offset: UInt64, size: Int, value: UInt64) { intx.set(value != 0) }
}

struct VirtPCIeTests {
    func config(pcie: Bool) -> BoardConfig {
        var c = BoardConfig()
        c.memorySize = 256 * mib
        c.rngSeedBytes = 0
        c.pcie = pcie
        return c
    }

    @Test func withoutPCIThereIsNoHostNodeOrWindow() throws {
        let board = try VirtBoard(config: config(pcie: false), system: NullSystem())
        #expect(board.pcieHost == nil)
        #expect(board.deviceTree.root.node(at: "soc/pci@30000000") == nil)
        #expect(board.bus.lookup(VirtMemoryMap.pcieECAM.base) == nil)
        #expect(!board.irqs.isUsed(VirtMemoryMap.pcieFirstIRQ))
    }

    @Test func functionsAreFoundThroughECAMAndTheirBARsThroughTheWindows() throws {
        var c = config(pcie: true)
        c.pciDevices = [PCIPlacement { PinFunction($0) }]
        let board = try VirtBoard(config: c, system: NullSystem())
        let ecam = VirtMemoryMap.pcieECAM.base
        #expect(board.bus.read(ecam, size: 4) == 0x0008_1b36)                    // 00:00.0, the host bridge
        #expect(board.bus.read(ecam + (1 << 15), size: 4) == 0x5678_1234)        // 00:01.0
        #expect(board.bus.read(ecam + (2 << 15), size: 4) == 0xffff_ffff)        // nothing in slot 2
        board.bus.write(ecam + (1 << 15) + 0x10, size: 4, value: 0x4000_1000)
        board.bus.write(ecam + (1 << 15) + 4, size: 2, value: UInt64(PCIConfig.Command.memory))
        #expect(board.bus.read(GuestPhysicalAddress(0x4000_1008), size: 4) == 0x42)
        // 64-bit window after RAM: 256 MiB of RAM puts it at 16 GiB, as QEMU does.
        #expect(board.pcieHighMMIO == GuestRegion(base: GuestPhysicalAddress(0x4_0000_0000), size: 0x4_0000_0000))
        #expect(board.bus.lookup(board.pcieHighMMIO.base) != nil)
        #expect(board.bus.lookup(VirtMemoryMap.pciePIO.base) != nil)
        // Slot 1, INTA lands on PLIC source 33.
        board.bus.write(GuestPhysicalAddress(0x4000_1000), size: 4, value: 1)
        #expect(board.plic.read(offset: 0x1000 + 4 * UInt64(33 / 32), size: 4) & (1 << (33 % 32)) != 0)
        #expect(board.pciFunctions[PCIRootAddress(slot: 1)] != nil)
        board.detachPCI(PCIRootAddress(slot: 1))
        #expect(board.bus.read(ecam + (1 << 15), size: 4) == 0xffff_ffff)
    }

    @Test func devicesBehindARootPortAreOnItsSecondaryBusAndUseItsINTx() throws {
        var c = config(pcie: true)
        c.pciDevices = [.rootPort(id: "rp0", slot: 3, physicalSlot: 9), PCIPlacement(port: "rp0") { PinFunction($0) }]
        let board = try VirtBoard(config: c, system: NullSystem())
        let ecam = VirtMemoryMap.pcieECAM.base
        #expect(board.bus.read(ecam + (3 << 15), size: 4) == 0x000c_1b36)
        board.bus.write(ecam + (3 << 15) + 0x18, size: 4, value: 0x0002_0200)      // secondary bus 2
        #expect(board.bus.read(ecam + (2 << 20), size: 4) == 0x5678_1234)
        #expect(board.deviceManager.device(section: "pcie-root-port@00:03.0") != nil)
        #expect(throws: BoardError.self) { try board.attachPCI({ PinFunction($0) }, behind: "rp0", hotPlug: true) }
        #expect(throws: BoardError.self) { try board.attachPCI({ PinFunction($0) }, behind: "rp9", hotPlug: true) }
        // Device 0 behind the port in slot 3: INTA reaches the root bus as the port's INTA, PLIC 32 + 3.
        board.bus.write(ecam + (2 << 20) + 0x10, size: 4, value: 0x4000_0000)
        board.bus.write(ecam + (2 << 20) + 4, size: 2, value: UInt64(PCIConfig.Command.memory))
        board.bus.write(GuestPhysicalAddress(0x4000_0000), size: 4, value: 1)
        #expect(board.plic.read(offset: 0x1000 + 4, size: 4) & (1 << (35 - 32)) != 0)
        board.detachPCI(behind: "rp0")
        #expect(board.bus.read(ecam + (2 << 20), size: 4) == 0xffff_ffff)
        try board.attachPCI({ PinFunction($0) }, behind: "rp0", hotPlug: true)
        #expect(board.bus.read(ecam + (2 << 20), size: 4) == 0x5678_1234)
    }

    @Test func rootPortsAsFunctionsOfOneSlotEachHaveABusASectionAndAPortNumber() throws {
        var c = config(pcie: true)
        c.pciDevices = [.rootPort(id: "pci.1", slot: 1, function: 0, multifunction: true, physicalSlot: 1),
                        .rootPort(id: "pci.2", slot: 1, function: 1, physicalSlot: 2),
                        .rootPort(id: "pci.3", slot: 1, function: 2, physicalSlot: 3),
                        PCIPlacement(port: "pci.3") { PinFunction($0) }]
        let board = try VirtBoard(config: c, system: NullSystem())
        let ecam = VirtMemoryMap.pcieECAM.base
        func fn(_ f: UInt64) -> GuestPhysicalAddress { ecam + (1 << 15) + (f << 12) }
        for f: UInt64 in 0...2 { #expect(board.bus.read(fn(f), size: 4) == 0x000c_1b36) }
        #expect(board.bus.read(fn(3), size: 4) == 0xffff_ffff)
        #expect(board.bus.read(fn(0) + 0x0e, size: 1) == 0x81)                         // bridge, multi-function
        #expect(board.bus.read(fn(1) + 0x0e, size: 1) == 0x01)
        #expect(board.rootPorts["pci.3"]?.address == PCIRootAddress(slot: 1, function: 2))
        for section in ["pcie-root-port@00:01.0", "pcie-root-port@00:01.1", "pcie-root-port@00:01.2"] {
            #expect(board.deviceManager.device(section: section) != nil, "\(section)")
        }
        // Link Capabilities port numbers (bits 31:24 at the PCIe capability + 0x0c) differ.
        func portNumber(_ f: UInt64) -> UInt64 {
            var at = board.bus.read(fn(f) + 0x34, size: 1)
            while at != 0 && board.bus.read(fn(f) + at, size: 1) != 0x10 { at = board.bus.read(fn(f) + at + 1, size: 1) }
            return board.bus.read(fn(f) + at + 0x0c, size: 4) >> 24
        }
        #expect(Set([portNumber(0), portNumber(1), portNumber(2)]).count == 3)
        // The guest numbers the secondary bus of 01.2; the device behind it answers there.
        board.bus.write(fn(2) + 0x18, size: 4, value: 0x0003_0300)
        #expect(board.bus.read(ecam + (3 << 20), size: 4) == 0x5678_1234)
        // A function above 0 in a single-function slot is refused in QEMU's words.
        try board.attachPCI({ PinFunction($0) }, slot: 5)
        #expect(throws: BoardError.invalidConfig("PCI: single function device can't be populated in function 5.3")) {
            try board.attachPCI({ PinFunction($0) }, slot: 5, function: 3)
        }
        board.detachPCI(PCIRootAddress(slot: 1, function: 2))
        #expect(board.bus.read(fn(2), size: 4) == 0xffff_ffff && board.rootPorts["pci.3"] == nil)
    }

    @Test func hostIsAManagedDeviceWithItsOwnSection() throws {
        let board = try VirtBoard(config: config(pcie: true), system: NullSystem())
        #expect(board.deviceManager.device(section: "pcie-host@30000000") != nil)
    }

    @Test(.enabled(if: qemuPath != nil && dtcPath != nil, "qemu-system-riscv64 or dtc is not installed"))
    func pciNodeMatchesQEMUs() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("virt-pci-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let dtb = dir.appendingPathComponent("qemu.dtb").path
        let (status, _) = try runTool(qemuPath!, ["-M", "virt,dumpdtb=\(dtb)", "-m", "256M", "-smp", "1", "-nographic"])
        #expect(status == 0)
        let qemu = try FDTReader.parse([UInt8](try Data(contentsOf: URL(fileURLWithPath: dtb))))
        let board = try VirtBoard(config: config(pcie: true), system: NullSystem())
        let ours = try FDTReader.parse(board.deviceTreeBlob)
        let q = try #require(qemu.node(at: "soc/pci@30000000"))
        let o = try #require(ours.node(at: "soc/pci@30000000"))
        #expect(o.properties.map(\.name) == q.properties.map(\.name))
        for (name, value) in q.properties { #expect(o.property(name) == value, "\(name)") }
        // The PLIC's phandle in the interrupt map is the PLIC's in both trees.
        #expect(ours.node(at: "soc/plic@c000000")?.property("phandle") == qemu.node(at: "soc/plic@c000000")?.property("phandle"))
    }
}
