import Logging
import Machine
import Synchronization

/// A generic PCIe host bridge as QEMU's `gpex`: an ECAM configuration window, memory and I/O
/// windows in which the functions' BARs decode, INTx routed through `PCIIntxRouter`, and the
/// host bridge's own function at 00:00.0 (Red Hat 1b36:0008, class 0600).
///
/// Devices plug into bus 0 (up to eight functions per slot, as QEMU's `multifunction=on`) or
/// behind a `PCIBridge` (a root port) on it, one level deep.
/// BAR addresses are chosen by the guest (Linux assigns them on `virt`, as no firmware does);
/// the memory windows are identity-mapped (PCI address = CPU address) and the I/O window maps
/// PCI I/O address 0 at its base, as the device tree's `ranges` say.
///
/// Threading: windows are accessed from vCPU threads; `plug`/`unplug` run on the control thread
/// with the vCPUs stopped; the slot table sits behind a `Mutex`.
public final class PCIeHost: Sendable {
    /// Devices per bus.
    public static let slotCount = 32
    /// Functions per device.
    public static let functionCount = 8

    /// The ECAM window (map it at the board's ECAM base; 1 MiB per bus).
    public let ecam: ECAMWindow
    /// INTx wiring.
    public let intx: PCIIntxRouter
    /// The host bridge's own function at 00:00.0.
    public let rootFunction: PCIHostBridgeFunction
    /// The saved-state section name ("pcie-host@30000000").
    public let stateSection: String

    /// Where the board put the host's windows and wires, for its device-tree node.
    public struct Layout: Sendable {
        public var ecam: GuestRegion, pio: GuestRegion, mmio: GuestRegion, highMMIO: GuestRegion
        /// The interrupt source of wire 0 (INTA of slot 0); the others follow.
        public var firstIRQ: Int
        public init(ecam: GuestRegion, pio: GuestRegion, mmio: GuestRegion, highMMIO: GuestRegion, firstIRQ: Int) {
            self.ecam = ecam
            self.pio = pio
            self.mmio = mmio
            self.highMMIO = highMMIO
            self.firstIRQ = firstIRQ
        }
    }
    /// The layout, when the host has a device-tree node.
    public let layout: Layout?

    /// One device number of bus 0: its functions and whether function 0 is multi-function.
    private struct PCISlot {
        var functions = [(any PCIFunction)?](repeating: nil, count: PCIeHost.functionCount)
        var multifunction = false
        var isEmpty: Bool { functions.allSatisfy { $0 == nil } }
    }
    private let slots: Mutex<[PCISlot]>
    /// Every function of bus 0 in bus order, rebuilt on plug and unplug so that BAR decoding
    /// (each access to a BAR window) walks only what is there.
    private let present = Mutex<[(slot: Int, function: Int, device: any PCIFunction)]>([])
    let logger: Logger

    /// Creates a host whose INTx wires drive `intxWires` (INTA…INTD), laid out as `layout`.
    public init(intxWires: [any InterruptLine], stateSection: String, layout: Layout? = nil,
                logger: Logger = Logger(label: "machine.pcie-host")) {
        self.logger = logger
        self.stateSection = stateSection
        self.layout = layout
        intx = PCIIntxRouter(wires: intxWires)
        rootFunction = PCIHostBridgeFunction()
        var table = [PCISlot](repeating: PCISlot(), count: Self.slotCount)
        table[0].functions[0] = rootFunction
        slots = Mutex(table)
        ecam = ECAMWindow()
        ecam.host = self
        present.withLock { $0 = [(0, 0, rootFunction)] }
    }

    /// A window to map at a memory range of the bus whose PCI addresses equal its CPU addresses
    /// (`base`), or at the I/O range (`space: .io`, PCI I/O address 0 at the mapping).
    public func window(_ space: BARWindow.Space, pciBase: UInt64) -> BARWindow {
        BARWindow(host: self, space: space, pciBase: pciBase)
    }

    /// Puts `function` at `slot`.`function` of bus 0; `multifunction` is QEMU's property of the
    /// same name and matters on function 0, whose header-type byte then carries the
    /// multi-function bit (0x80) so that the guest scans functions 1…7. Refuses, in QEMU's
    /// words, a taken place, a function above 0 in a slot whose function 0 is single-function,
    /// and a single-function function 0 in a slot that already has other functions. Control
    /// thread.
    public func plug(_ function: any PCIFunction, slot: Int, function number: Int = 0,
                     multifunction: Bool = false) throws(PCIError) {
        guard slot > 0 && slot < Self.slotCount else { throw .badSlot(slot) }
        guard number >= 0 && number < Self.functionCount else { throw .badFunction(number) }
        try slots.withLock { (s: inout [PCISlot]) throws(PCIError) in
            guard s[slot].functions[number] == nil else { throw .slotInUse(slot, function: number) }
            if number > 0 {
                if s[slot].functions[0] != nil && !s[slot].multifunction { throw .singleFunction(slot, function: number) }
            } else if !multifunction, let other = (1..<Self.functionCount).first(where: { s[slot].functions[$0] != nil }) {
                throw .singleFunctionButPopulated(slot, function: other)
            }
            s[slot].functions[number] = function
            if number == 0 { s[slot].multifunction = multifunction }
            refreshPresent(s)
        }
    }

    /// Rebuilds `present` from the table (under the table's lock).
    private func refreshPresent(_ s: [PCISlot]) {
        var out: [(slot: Int, function: Int, device: any PCIFunction)] = []
        for slot in 0..<Self.slotCount {
            for fn in 0..<Self.functionCount { if let f = s[slot].functions[fn] { out.append((slot, fn, f)) } }
        }
        present.withLock { $0 = out }
    }

    /// Removes function `number` of `slot` (hot-unplug, or undoing a failed plug). Control thread.
    public func unplug(slot: Int, function number: Int = 0) {
        guard slot > 0 && slot < Self.slotCount, number >= 0 && number < Self.functionCount else { return }
        slots.withLock {
            $0[slot].functions[number] = nil
            if number == 0 { $0[slot].multifunction = false }
            refreshPresent($0)
        }
    }

    /// The lowest slot above the host bridge with no function at all, or nil when the bus is full.
    public func freeSlot() -> Int? {
        slots.withLock { s in (1..<Self.slotCount).first { s[$0].isEmpty } }
    }

    /// Function `number` (0 by default) of `slot` on bus 0, if any.
    public func function(slot: Int, function number: Int = 0) -> (any PCIFunction)? {
        guard slot >= 0 && slot < Self.slotCount, number >= 0 && number < Self.functionCount else { return nil }
        return slots.withLock { $0[slot].functions[number] }
    }

    /// Whether function 0 of `slot` was plugged as a multi-function device.
    public func isMultifunction(slot: Int) -> Bool {
        guard slot >= 0 && slot < Self.slotCount else { return false }
        return slots.withLock { $0[slot].multifunction }
    }

    /// Every function on bus 0 with its slot and function number, in bus order.
    public func rootFunctions() -> [(slot: Int, function: Int, device: any PCIFunction)] {
        present.withLock { $0 }
    }

    /// Every function: those on bus 0 and the devices behind root ports.
    fileprivate func allFunctions() -> [any PCIFunction] {
        let root = rootFunctions().map(\.device)
        return root + root.compactMap { ($0 as? any PCIBridge)?.child }
    }

    /// The function at `bus`/`device`/`function`: bus 0 is the root bus (eight functions per
    /// slot); any other bus is the secondary bus of a root port, which holds only 00.0.
    public func function(bus: Int, device: Int, function number: Int = 0) -> (any PCIFunction)? {
        if bus == 0 { return function(slot: device, function: number) }
        guard device == 0, number == 0 else { return nil }
        let bridges = rootFunctions().compactMap { $0.device as? any PCIBridge }
        return bridges.first { $0.secondaryBus == bus }?.child
    }

    /// An access inside a BAR window: finds the BAR of `space` containing `address`.
    fileprivate func decode(_ space: BARWindow.Space, _ address: UInt64, size: Int)
        -> (function: any PCIFunction, index: Int, offset: UInt64)? {
        for f in allFunctions() {
            for (index, bar) in f.barDescriptors where (bar.kind == .io) == (space == .io) {
                guard let base = f.barAddress(index) else { continue }
                let off = address &- base
                if off < bar.size && off + UInt64(size) <= bar.size { return (f, index, off) }
            }
        }
        return nil
    }
}

/// Errors of PCI slot management.
public enum PCIError: Error, Equatable, CustomStringConvertible {
    /// The slot number is outside the bus (1…31; 0 holds the host bridge).
    case badSlot(Int)
    /// The function number is outside 0…7.
    case badFunction(Int)
    /// The slot's function already holds a device.
    case slotInUse(Int, function: Int)
    /// A function above 0 in a slot whose function 0 is not multi-function (QEMU's wording).
    case singleFunction(Int, function: Int)
    /// A single-function function 0 in a slot whose other functions are populated (QEMU's wording).
    case singleFunctionButPopulated(Int, function: Int)
    /// Every slot of the bus is taken.
    case busFull

    public var description: String {
        func hex(_ v: Int) -> String { String(v, radix: 16) }
        switch self {
        case .badSlot(let s): return "PCI slot \(s) is outside 1...\(PCIeHost.slotCount - 1)"
        case .badFunction(let f): return "PCI function \(f) is outside 0...\(PCIeHost.functionCount - 1)"
        case .slotInUse(let s, let f): return "PCI: slot \(s) function \(f) is already in use"
        case .singleFunction(let s, let f):
            return "PCI: single function device can't be populated in function \(hex(s)).\(hex(f))"
        case .singleFunctionButPopulated(let s, let f):
            return "PCI: \(hex(s)).0 indicates single function, but \(hex(s)).\(hex(f)) is already populated."
        case .busFull: return "no free PCI slot on the root bus"
        }
    }
}

/// The ECAM configuration window: offset = bus << 20 | device << 15 | function << 12 | register;
/// bus 0 has eight functions per slot; a bus other than 0 reaches the device behind the root
/// port whose secondary bus it is.
/// Absent functions and buses read all ones and ignore writes, as on hardware.
public final class ECAMWindow: MMIODevice, @unchecked Sendable {  // unchecked: `host` is set once by PCIeHost.init before the window is mapped
    public let name = "pcie-ecam"
    fileprivate weak var host: PCIeHost?

    fileprivate init() {}

    private func target(_ offset: UInt64, _ size: Int) -> (any PCIFunction, Int)? {
        guard size == 1 || size == 2 || size == 4 else { return nil }
        let bus = Int(offset >> 20), device = Int((offset >> 15) & 31), fn = Int((offset >> 12) & 7), reg = Int(offset & 0xfff)
        guard reg % size == 0, let f = host?.function(bus: bus, device: device, function: fn) else { return nil }
        return (f, reg)
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        guard let (f, reg) = target(offset, size) else { return size >= 8 ? ~0 : (1 << (8 * UInt64(size))) - 1 }
        var value = UInt64(f.configRead(offset: reg, size: size))
        // Function 0 of a multi-function slot of bus 0: the header type's bit 7 says so.
        let header = PCIConfig.headerType
        if (offset >> 12) & 0xff07 == 0, reg <= header, header < reg + size,
           let host, host.isMultifunction(slot: Int((offset >> 15) & 31)) {
            value |= 0x80 << (8 * UInt64(header - reg))
        }
        return value
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        guard let (f, reg) = target(offset, size) else { return }
        f.configWrite(offset: reg, size: size, value: UInt32(truncatingIfNeeded: value))
    }
}

/// One range of the bus in which the functions' BARs decode: a memory range (the board maps
/// PCI address = CPU address, so `pciBase` is the mapping's own base) or the I/O range (PCI I/O
/// address 0 at the mapping's base). Accesses hitting no BAR read all ones and are dropped,
/// logged at debug level.
public final class BARWindow: MMIODevice, @unchecked Sendable {  // unchecked: `host` is set once in init
    /// The address space of a window.
    public enum Space: Sendable, CustomStringConvertible {
        case memory, io
        public var description: String { self == .memory ? "memory" : "I/O" }
    }
    private weak var host: PCIeHost?
    public var name: String { space == .io ? "pcie-pio" : "pcie-mmio@\(String(pciBase, radix: 16))" }
    /// The space decoded.
    public let space: Space
    /// The PCI address of the window's offset 0.
    public let pciBase: UInt64

    fileprivate init(host: PCIeHost, space: Space, pciBase: UInt64) {
        self.host = host
        self.space = space
        self.pciBase = pciBase
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        let address = pciBase &+ offset
        guard let host, let (f, index, off) = host.decode(space, address, size: size) else {
            host?.logger.debug("PCI \(space) read at 0x\(String(address, radix: 16)) hits no BAR")
            return size >= 8 ? ~0 : (1 << (8 * UInt64(size))) - 1
        }
        return f.barRead(index: index, offset: off, size: size)
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        let address = pciBase &+ offset
        guard let host, let (f, index, off) = host.decode(space, address, size: size) else {
            host?.logger.debug("PCI \(space) write at 0x\(String(address, radix: 16)) hits no BAR")
            return
        }
        f.barWrite(index: index, offset: off, size: size, value: value)
    }
}

/// The host bridge's own function at 00:00.0, as QEMU's `gpex-root`: Red Hat's PCIe host
/// (1b36:0008), class 0600 (host bridge), no BARs, no interrupt. Its configuration space is
/// the host's saved state.
public final class PCIHostBridgeFunction: PCIFunction, Sendable {
    /// The identity QEMU gives its generic PCIe host bridge.
    public static let identity = PCIIdentity(vendorID: 0x1b36, deviceID: 0x0008, revision: 0, classCode: 0x06_0000)
    public let name = "gpex-root 00:00.0"
    private let config = Mutex(PCIConfigSpace(identity: PCIHostBridgeFunction.identity))

    public var barDescriptors: [Int: PCIBarDescriptor] { [:] }
    public func configRead(offset: Int, size: Int) -> UInt32 { config.withLock { $0.read(offset: offset, size: size) } }
    public func configWrite(offset: Int, size: Int, value: UInt32) {
        config.withLock { $0.write(offset: offset, size: size, value: value) }
    }
    public func barAddress(_ index: Int) -> UInt64? { nil }
    public func barRead(index: Int, offset: UInt64, size: Int) -> UInt64 { ~0 }
    public func barWrite(index: Int, offset: UInt64, size: Int, value: UInt64) {}

    fileprivate func reset() { config.withLock { $0 = PCIConfigSpace(identity: Self.identity) } }
    fileprivate var bytes: [UInt8] { config.withLock { $0.bytes } }
    fileprivate func restore(_ b: [UInt8], section: String) throws(SavedStateError) {
        var fresh = PCIConfigSpace(identity: Self.identity)
        try fresh.restore(b, section: section)
        config.withLock { $0 = fresh }
    }
}

extension PCIeHost: StatefulDevice {
    /// The host bridge function's configuration space. (Plugged functions save their own
    /// sections; INTx levels follow from theirs.)
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        /// The 4 KiB configuration space of 00:00.0.
        public var rootConfig: [UInt8]

        public init(rootConfig: [UInt8]) { self.rootConfig = rootConfig }

        public func encode(to w: inout StateWriter) { w.bytes(rootConfig) }

        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            rootConfig = try r.bytes("root-config", limit: PCIConfig.size)
        }
    }

    public var stateVersion: UInt32 { State.version }

    /// Power-on: the host bridge's command register and the like return to 0. Plugged
    /// functions are reset by the device manager in their own right.
    public func reset() { rootFunction.reset() }

    public func captureState() -> State { State(rootConfig: rootFunction.bytes) }

    /// `pci@ECAM` exactly as QEMU 7.2's riscv `virt` generates it without an AIA (INTx only):
    /// the ranges of the I/O, 32-bit and 64-bit windows, and the interrupt map swizzling INTA…D
    /// of slots 0…3 onto the four wires at `context.interruptParent`.
    public func deviceTreeNode(_ context: DeviceTreeContext) -> DeviceTreeNode? {
        guard let l = layout else { return nil }
        func hi(_ v: UInt64) -> UInt32 { UInt32(v >> 32) }
        func lo(_ v: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: v) }
        var n = DeviceTreeNode("pci@\(String(l.ecam.base.raw, radix: 16))")
        n.set("interrupt-map-mask", .u32([0x1800, 0, 0, 7]))
        var map: [UInt32] = []
        for slot in 0..<4 {
            for pin in 1...4 {
                map += [UInt32(slot) << 11, 0, 0, UInt32(pin), context.interruptParent,
                        UInt32(l.firstIRQ + PCIIntxRouter.wire(slot: slot, pin: pin))]
            }
        }
        n.set("interrupt-map", .u32(map))
        n.set("ranges", .u32([0x0100_0000, 0, 0, hi(l.pio.base.raw), lo(l.pio.base.raw), hi(l.pio.size), lo(l.pio.size),
                              0x0200_0000, hi(l.mmio.base.raw), lo(l.mmio.base.raw), hi(l.mmio.base.raw), lo(l.mmio.base.raw),
                              hi(l.mmio.size), lo(l.mmio.size),
                              0x0300_0000, hi(l.highMMIO.base.raw), lo(l.highMMIO.base.raw), hi(l.highMMIO.base.raw),
                              lo(l.highMMIO.base.raw), hi(l.highMMIO.size), lo(l.highMMIO.size)]))
        n.set("reg", .u64([l.ecam.base.raw, l.ecam.size]))
        n.set("dma-coherent", .empty)
        n.set("bus-range", .u32([0, UInt32(l.ecam.size >> 20) - 1]))
        n.set("linux,pci-domain", .u32([0]))
        n.set("device_type", .string("pci"))
        n.set("compatible", .string("pci-host-ecam-generic"))
        n.set("#size-cells", .u32([2]))
        n.set("#interrupt-cells", .u32([1]))
        n.set("#address-cells", .u32([3]))
        return n
    }

    /// Validates that the identity bytes match before replacing anything.
    public func applyState(_ s: State) throws(SavedStateError) { try rootFunction.restore(s.rootConfig, section: stateSection) }
}
