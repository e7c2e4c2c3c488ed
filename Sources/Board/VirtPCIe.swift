import Devices
import Machine

/// QEMU riscv `virt`'s PCIe layout (hw/riscv/virt.c): the generic ECAM host and its windows.
extension VirtMemoryMap {
    /// ECAM configuration space: 256 buses of 1 MiB.
    public static let pcieECAM = GuestRegion(base: GuestPhysicalAddress(0x3000_0000), size: 0x1000_0000)
    /// The 32-bit MMIO window (PCI address = CPU address).
    public static let pcieMMIO = GuestRegion(base: GuestPhysicalAddress(0x4000_0000), size: 0x4000_0000)
    /// The I/O port window (PCI I/O address 0 at its base).
    public static let pciePIO = GuestRegion(base: GuestPhysicalAddress(0x0300_0000), size: 0x1_0000)
    /// Size of the 64-bit MMIO window.
    public static let pcieHighMMIOSize: UInt64 = 0x4_0000_0000
    /// PLIC source of INTA on the host's wire 0; INTB…INTD follow (32…35).
    public static let pcieFirstIRQ = 32

    /// The 64-bit MMIO window: 16 GiB at the end of RAM rounded up to its size, as QEMU places
    /// it (0x4_0000_0000 for any RAM below 14 GiB).
    public static func pcieHighMMIO(ramEnd: GuestPhysicalAddress) -> GuestRegion {
        let size = pcieHighMMIOSize
        return GuestRegion(base: GuestPhysicalAddress((ramEnd.raw + size - 1) / size * size), size: size)
    }
}

/// Builds one PCI function for a slot of the root bus. Called on the control thread while the
/// board is assembled (or on hot-plug).
public typealias PCIDeviceFactory = @Sendable (PCIDeviceContext) throws -> any PCIFunction

/// A PCI function to build at boot: where it goes on the root bus and how to build it.
public struct PCIPlacement: Sendable {
    /// Its slot (device number) on bus 0, 1…31; nil takes the lowest free one.
    public var slot: Int?
    /// Builds the function.
    public var make: PCIDeviceFactory

    /// Creates a placement.
    public init(slot: Int? = nil, make: @escaping PCIDeviceFactory) {
        self.slot = slot
        self.make = make
    }
}

/// What a PCI function receives: guest RAM (for DMA), its INTA line (already swizzled onto the
/// host's wires), its slot, and the machine clock.
public struct PCIDeviceContext: Sendable {
    /// Guest RAM, for devices that do DMA.
    public let ram: GuestRAM
    /// The function's INTA output.
    public let intx: any InterruptLine
    /// Its device number on bus 0.
    public let slot: Int
    /// The machine's virtual clock.
    public let clock: VirtualClock

    /// The function's address as Linux prints it ("00:01.0").
    public var address: String { "00:\(slot < 16 ? "0" : "")\(String(slot, radix: 16)).0" }
}

extension VirtDeviceTree {
    /// `/soc/pci@30000000` exactly as QEMU 7.2 generates it without an AIA (INTx only).
    static func pcieNode(plicPhandle: UInt32, highMMIO: GuestRegion) -> DeviceTreeNode {
        let ecam = VirtMemoryMap.pcieECAM, mmio = VirtMemoryMap.pcieMMIO, pio = VirtMemoryMap.pciePIO
        func hi(_ v: UInt64) -> UInt32 { UInt32(v >> 32) }
        func lo(_ v: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: v) }
        var n = DeviceTreeNode("pci@\(String(ecam.base.raw, radix: 16))")
        n.set("interrupt-map-mask", .u32([0x1800, 0, 0, 7]))
        var map: [UInt32] = []
        for slot in 0..<4 {
            for pin in 1...4 {
                map += [UInt32(slot) << 11, 0, 0, UInt32(pin), plicPhandle,
                        UInt32(VirtMemoryMap.pcieFirstIRQ + PCIIntxRouter.wire(slot: slot, pin: pin))]
            }
        }
        n.set("interrupt-map", .u32(map))
        n.set("ranges", .u32([0x0100_0000, 0, 0, hi(pio.base.raw), lo(pio.base.raw), hi(pio.size), lo(pio.size),
                              0x0200_0000, hi(mmio.base.raw), lo(mmio.base.raw), hi(mmio.base.raw), lo(mmio.base.raw),
                              hi(mmio.size), lo(mmio.size),
                              0x0300_0000, hi(highMMIO.base.raw), lo(highMMIO.base.raw), hi(highMMIO.base.raw),
                              lo(highMMIO.base.raw), hi(highMMIO.size), lo(highMMIO.size)]))
        n.set("reg", regCells(ecam))
        n.set("dma-coherent", .empty)
        n.set("bus-range", .u32([0, UInt32(ecam.size >> 20) - 1]))
        n.set("linux,pci-domain", .u32([0]))
        n.set("device_type", .string("pci"))
        n.set("compatible", .string("pci-host-ecam-generic"))
        n.set("#size-cells", .u32([2]))
        n.set("#interrupt-cells", .u32([1]))
        n.set("#address-cells", .u32([3]))
        return n
    }
}
