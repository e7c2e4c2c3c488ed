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

/// Something to put on the PCIe bus at boot: a function in a slot of the root bus or behind a
/// root port, or a root port itself.
public struct PCIPlacement: Sendable {
    /// What is placed.
    public enum Kind: Sendable {
        /// A function built by the factory.
        case function(PCIDeviceFactory)
        /// A `pcie-root-port` with a hot-plug slot, known by `id` (the bus name devices use).
        case rootPort(id: String, physicalSlot: Int)
    }
    /// Its slot (device number) on bus 0, 1…31; nil takes the lowest free one. Ignored behind a port.
    public var slot: Int?
    /// Its function number in the slot, 0…7 (above 0 only with an explicit slot).
    public var function = 0
    /// QEMU's `multifunction` property: on function 0, the slot has other functions.
    public var multifunction = false
    /// The id of the root port to plug the function behind; nil for the root bus.
    public var port: String?
    /// What is placed.
    public var kind: Kind

    /// A function on the root bus, at `slot`.`function`.
    public init(slot: Int? = nil, function: Int = 0, multifunction: Bool = false, make: @escaping PCIDeviceFactory) {
        self.slot = slot
        self.function = function
        self.multifunction = multifunction
        self.port = nil
        self.kind = .function(make)
    }

    /// A function in the slot of root port `port`.
    public init(port: String, make: @escaping PCIDeviceFactory) {
        self.slot = nil
        self.port = port
        self.kind = .function(make)
    }

    /// A root port on the root bus, at `slot`.`function`.
    public static func rootPort(id: String, slot: Int? = nil, function: Int = 0, multifunction: Bool = false,
                                physicalSlot: Int) -> PCIPlacement {
        var p = PCIPlacement(slot: slot, port: nil, kind: .rootPort(id: id, physicalSlot: physicalSlot))
        p.function = function
        p.multifunction = multifunction
        return p
    }

    private init(slot: Int?, port: String?, kind: Kind) {
        self.slot = slot
        self.port = port
        self.kind = kind
    }
}

/// What a PCI function receives: guest RAM (for DMA), its INTA line (already swizzled onto the
/// host's wires), its slot, and the machine clock.
public struct PCIDeviceContext: Sendable {
    /// Guest RAM, for devices that do DMA.
    public let ram: GuestRAM
    /// The function's INTA output.
    public let intx: any InterruptLine
    /// Its device number on bus 0, or nil behind a root port.
    public let slot: Int?
    /// Its function number in `slot` (0 behind a root port).
    public var function = 0
    /// The root port it sits behind, if any.
    public let port: String?
    /// The machine's virtual clock.
    public let clock: VirtualClock

    /// Where the function is, stable across runs (for names and saved-state sections): its
    /// root-bus address as Linux prints it ("00:01.0"), or the root port's id (the secondary
    /// bus number is the guest's choice).
    public var address: String {
        if let port { return port }
        let s = slot ?? 0
        return "00:\(s < 16 ? "0" : "")\(String(s, radix: 16)).\(function)"
    }
}

/// A place on the root bus: a slot (device number) and a function in it.
public struct PCIRootAddress: Hashable, Sendable, CustomStringConvertible {
    /// The device number, 0…31.
    public var slot: Int
    /// The function, 0…7.
    public var function: Int
    /// `slot`.`function`.
    public init(slot: Int, function: Int = 0) {
        self.slot = slot
        self.function = function
    }
    /// As QEMU's `addr` property prints it ("01.2").
    public var description: String { "\(slot < 16 ? "0" : "")\(String(slot, radix: 16)).\(function)" }
}
