import Devices
import Machine
import Translator

/// QEMU's riscv `virt` board: RAM at 0x8000_0000, the CLINT, PLIC, UART0, RTC, SiFive test
/// device, our HTIF, eight virtio-mmio slots (every one mapped; empty ones answer DeviceID 0)
/// and the mask ROM, with a device tree generated from
/// the devices actually built, and the boot images placed as QEMU places them.
///
/// Threading: built and mutated (`attachVirtio`, `reset`, `loadBootImages`) on the machine's
/// control thread while the vCPUs are stopped; the devices it owns are then accessed from vCPU
/// and I/O threads through the bus, each protecting its own state.
public final class VirtBoard: @unchecked Sendable {  // unchecked: its vars change only on the control thread while the vCPUs are stopped
    /// The configuration the board was built from.
    public let config: BoardConfig
    /// The machine's timebase (`mtime`, the `time` CSR), 10 MHz.
    public let clock: VirtualClock
    /// Guest DRAM at `VirtMemoryMap.dramBase`.
    public let ram: GuestRAM
    /// Every device window.
    public let bus: MemoryBus
    /// Interrupt lines and timer compare of each hart, indexed by hart ID.
    public let hartInterrupts: [HartInterrupts]
    /// The CLINT.
    public let clint: Aclint
    /// The PLIC; `plic.line(n)` gives source n's input.
    public let plic: Plic
    /// UART0 (console).
    public let uart: Uart16550
    /// The Goldfish RTC.
    public let rtc: GoldfishRTC
    /// The SiFive test device.
    public let testDevice: SiFiveTest
    /// The HTIF test device (not in the device tree).
    public let htif: Htif
    /// The mask ROM with `fw_dynamic_info`.
    public let maskROM: MaskROM
    /// The boot-image placement, kept so every reset reloads the same bytes.
    public let bootLoader: BootLoader
    /// The device tree as built (inspectable), and its flattened form loaded into RAM.
    public let deviceTree: DeviceTree
    /// The flattened device tree (DTB) that the guest receives in a1.
    public let deviceTreeBlob: [UInt8]
    /// Where the DTB is loaded.
    public let deviceTreeAddress: GuestPhysicalAddress

    /// The owner of every device's reset, quiesce/resume and saved state.
    public let deviceManager = DeviceManager()

    /// PLIC sources in use (fixed ones reserved at build, hot-plugged ones allocated).
    public private(set) var irqs: IRQAllocator
    /// The virtio-mmio slot bank.
    public private(set) var virtioSlots: MMIOSlotBank
    /// The virtio-mmio transports by slot (only slots holding a device).
    public private(set) var virtioDevices: [Int: any MMIODevice] = [:]
    /// The empty transports (DeviceID 0) mapped in every slot without a device, as QEMU's `virt`
    /// maps all eight: the guest's probe then finds magic "virt", version 2, DeviceID 0 and
    /// skips the slot quietly instead of complaining about a wrong magic value.
    public private(set) var emptyVirtioSlots: [Int: VirtioMMIOTransport] = [:]
    /// The PCIe host bridge (QEMU's `gpex` at `VirtMemoryMap.pcieECAM`), present when the
    /// configuration asks for PCI (`BoardConfig.hasPCIe`).
    public let pcieHost: PCIeHost?
    /// The 64-bit PCI MMIO window (placed after RAM, as QEMU does).
    public let pcieHighMMIO: GuestRegion
    /// The PCI functions plugged into the root bus, by slot and function (the host bridge at
    /// 00.0 not included; root ports included).
    public private(set) var pciFunctions: [PCIRootAddress: any PCIFunction] = [:]
    /// The root ports by id, with their place on the root bus.
    public private(set) var rootPorts: [String: (address: PCIRootAddress, port: PCIeRootPort)] = [:]

    /// The boot state after the last `loadBootImages()`.
    public var bootState: BootState {
        BootState(entry: bootLoader.entry, deviceTreeAddress: deviceTreeAddress,
                  firmwareInfoAddress: VirtMemoryMap.maskROM.base)
    }

    /// Builds the board: allocates RAM, creates and maps every device, builds the virtio
    /// transports of `config.virtioTransports` into slots 0…, reads and places the boot images,
    /// and generates the device tree. Guest shutdown/reset requests (test device, HTIF) go to
    /// `system`. Nothing is written to RAM until `loadBootImages()`.
    /// Throws `BoardError`/`MachineError` naming the offending setting or file.
    public init(config: BoardConfig, system: any SystemControl, clock: VirtualClock = VirtualClock()) throws {
        guard config.cpuCount >= 1 && config.cpuCount <= VirtMemoryMap.maxHarts else {
            throw BoardError.invalidConfig("cpu count \(config.cpuCount) is outside 1...\(VirtMemoryMap.maxHarts)")
        }
        guard config.memorySize >= 16 << 20, config.memorySize % 4096 == 0 else {
            throw BoardError.invalidConfig("memory size \(config.memorySize) must be a multiple of 4 KiB and at least 16 MiB")
        }
        guard config.memorySize <= (1 << 40) else {
            throw BoardError.invalidConfig("memory size \(config.memorySize) exceeds 1 TiB")
        }
        guard config.virtioTransports.count <= VirtMemoryMap.virtioSlotCount else {
            throw BoardError.invalidConfig("\(config.virtioTransports.count) virtio-mmio transports given, "
                                           + "the board has \(VirtMemoryMap.virtioSlotCount) slots")
        }
        self.config = config
        self.clock = clock
        ram = try GuestRAM(base: VirtMemoryMap.dramBase, size: config.memorySize, backing: config.ramBacking)
        bus = MemoryBus()
        hartInterrupts = (0..<config.cpuCount).map { HartInterrupts(hartID: $0) }

        plic = Plic(harts: hartInterrupts)
        irqs = IRQAllocator(sourceCount: plic.sourceCount)
        virtioSlots = MMIOSlotBank(base: VirtMemoryMap.virtioBase, stride: VirtMemoryMap.virtioStride,
                                   count: VirtMemoryMap.virtioSlotCount, firstIRQ: VirtMemoryMap.virtioFirstIRQ)
        for slot in 0..<virtioSlots.count { try irqs.reserve(virtioSlots.irq(ofSlot: slot)) }
        try irqs.reserve(VirtMemoryMap.uart0IRQ)
        try irqs.reserve(VirtMemoryMap.rtcIRQ)
        pcieHighMMIO = VirtMemoryMap.pcieHighMMIO(ramEnd: ram.region.end)
        if config.hasPCIe {
            let wires = (0..<4).map { VirtMemoryMap.pcieFirstIRQ + $0 }
            for w in wires { try irqs.reserve(w) }
            let plic = self.plic
            pcieHost = PCIeHost(intxWires: wires.map { plic.line($0) },
                                stateSection: "pcie-host@\(String(VirtMemoryMap.pcieECAM.base.raw, radix: 16))",
                                layout: PCIeHost.Layout(ecam: VirtMemoryMap.pcieECAM, pio: VirtMemoryMap.pciePIO,
                                                        mmio: VirtMemoryMap.pcieMMIO, highMMIO: pcieHighMMIO,
                                                        firstIRQ: VirtMemoryMap.pcieFirstIRQ))
        } else {
            pcieHost = nil
        }

        clint = Aclint(harts: hartInterrupts, clock: clock)
        uart = Uart16550(irq: plic.line(VirtMemoryMap.uart0IRQ), backend: config.serial)
        rtc = GoldfishRTC(irq: plic.line(VirtMemoryMap.rtcIRQ))
        testDevice = SiFiveTest(system: system)
        htif = Htif(system: system, console: config.htifConsole)

        bootLoader = try BootLoader(ram: ram.region, firmware: config.firmware, kernel: config.kernel,
                                    initrd: config.initrd)
        maskROM = MaskROM(bytes: bootLoader.firmwareInfo)

        for (device, region) in [(maskROM, VirtMemoryMap.maskROM), (testDevice, VirtMemoryMap.test),
                                 (rtc, VirtMemoryMap.rtc), (htif, VirtMemoryMap.htif),
                                 (clint, VirtMemoryMap.clint), (plic, VirtMemoryMap.plic),
                                 (uart, VirtMemoryMap.uart0)] as [(any MMIODevice, GuestRegion)] {
            try bus.map(device, at: region)
        }
        if let pcieHost {
            try bus.map(pcieHost.ecam, at: VirtMemoryMap.pcieECAM)
            try bus.map(pcieHost.window(.io, pciBase: 0), at: VirtMemoryMap.pciePIO)
            try bus.map(pcieHost.window(.memory, pciBase: VirtMemoryMap.pcieMMIO.base.raw), at: VirtMemoryMap.pcieMMIO)
            try bus.map(pcieHost.window(.memory, pciBase: pcieHighMMIO.base.raw), at: pcieHighMMIO)
        }

        for (device, placement) in [
            (clint, .init(window: VirtMemoryMap.clint)), (plic, .init(window: VirtMemoryMap.plic)),
            (uart, .init(window: VirtMemoryMap.uart0, irq: VirtMemoryMap.uart0IRQ)),
            (rtc, .init(window: VirtMemoryMap.rtc, irq: VirtMemoryMap.rtcIRQ)),
            (testDevice, .init(window: VirtMemoryMap.test)), (htif, nil),
        ] as [(any ManagedDevice, DeviceManager.Placement?)] {
            try deviceManager.register(device, at: placement)
        }
        if let pcieHost { try deviceManager.register(pcieHost, at: .init(window: VirtMemoryMap.pcieECAM)) }

        let manager = deviceManager, plicDevice = plic, test = testDevice
        let tree = VirtDeviceTree.build(config: config, timebase: clock.frequency, ram: ram.region,
                                        virtioSlots: virtioSlots, initrd: bootLoader.initrdRegion) { plicPhandle, testPhandle, intcs in
            manager.deviceTreeNodes(interruptParent: plicPhandle, hartInterruptControllers: intcs) { device in
                device === plicDevice ? plicPhandle : device === test ? testPhandle : nil
            }
        }
        deviceTree = tree
        deviceTreeBlob = tree.flattened()
        deviceTreeAddress = try bootLoader.deviceTreeAddress(size: deviceTreeBlob.count)

        for slot in 0..<virtioSlots.count { try mapEmptyTransport(slot: slot) }
        for factory in config.virtioTransports { _ = try attachVirtio(factory) }
        for p in config.pciDevices {
            switch p.kind {
            case .rootPort(let id, let physicalSlot):
                try attachRootPort(id: id, slot: p.slot, function: p.function, multifunction: p.multifunction,
                                   physicalSlot: physicalSlot)
            case .function(let make):
                if let port = p.port {
                    try attachPCI(make, behind: port, hotPlug: false)
                } else {
                    try attachPCI(make, slot: p.slot, function: p.function, multifunction: p.multifunction)
                }
            }
        }
    }

    /// Builds a PCI function into `slot`.`function` of the root bus (the lowest free slot when
    /// nil; `multifunction` as QEMU's property of function 0) and registers it with the device
    /// manager; returns its place. The guest finds it when it enumerates the bus. Control
    /// thread, vCPUs stopped.
    @discardableResult
    public func attachPCI(_ factory: PCIDeviceFactory, slot wanted: Int? = nil, function number: Int = 0,
                          multifunction: Bool = false) throws -> PCIRootAddress {
        guard let pcieHost else { throw BoardError.invalidConfig("the board was built without a PCIe host") }
        guard let slot = wanted ?? pcieHost.freeSlot() else { throw BoardError.exhausted("PCI slot on the root bus") }
        guard slot > 0 && slot < PCIeHost.slotCount else { throw BoardError.invalidConfig(PCIError.badSlot(slot).description) }
        guard number >= 0 && number < PCIeHost.functionCount else {
            throw BoardError.invalidConfig(PCIError.badFunction(number).description)
        }
        guard pcieHost.function(slot: slot, function: number) == nil else {
            throw BoardError.invalidConfig(PCIError.slotInUse(slot, function: number).description)
        }
        let function = try factory(PCIDeviceContext(ram: ram, intx: pcieHost.intx.line(slot: slot, pin: 1), slot: slot,
                                                    function: number, port: nil, clock: clock))
        do {
            try pcieHost.plug(function, slot: slot, function: number, multifunction: multifunction)
        } catch {
            throw BoardError.invalidConfig(error.description)
        }
        if let managed = function as? any ManagedDevice {
            do {
                try deviceManager.register(managed)
            } catch {
                pcieHost.unplug(slot: slot, function: number)
                throw error
            }
        }
        let address = PCIRootAddress(slot: slot, function: number)
        pciFunctions[address] = function
        return address
    }

    /// Builds a `pcie-root-port` known as `id` into `slot`.`function` of the root bus (the lowest
    /// free slot when nil) and registers it; returns its place. Control thread, vCPUs stopped.
    @discardableResult
    public func attachRootPort(id: String, slot: Int? = nil, function: Int = 0, multifunction: Bool = false,
                               physicalSlot: Int) throws -> PCIRootAddress {
        guard rootPorts[id] == nil else { throw BoardError.invalidConfig("a root port '\(id)' exists already") }
        guard let router = pcieHost?.intx else { throw BoardError.invalidConfig("the board was built without a PCIe host") }
        let childWires = rootPortChildWires
        let address = try attachPCI({ context in
            let s = context.slot ?? 0
            let pin = Self.rootPortPin(slot: s, avoiding: childWires.union([PCIIntxRouter.wire(slot: s, pin: 1)]))
            return PCIeRootPort(name: "pcie-root-port \(id) \(context.address)", stateSection: "pcie-root-port@\(context.address)",
                                // The Link Capabilities port number: unique among the functions of the slot.
                                intx: router.line(slot: s, pin: pin), port: s | context.function << 5,
                                physicalSlot: physicalSlot,
                                interruptPin: UInt8(pin))
        }, slot: slot, function: function, multifunction: multifunction)
        guard let port = pciFunctions[address] as? PCIeRootPort else { preconditionFailure("\(address) holds the port just built") }
        rootPorts[id] = (address, port)
        return address
    }

    /// The INTx wires that devices behind the root ports use (each port's INTA wire), from the
    /// configuration's root-port slots; no port's own interrupt goes on them (see `PCIeRootPort`).
    private var rootPortChildWires: Set<Int> {
        Set(config.pciDevices.compactMap { p -> Int? in
            guard case .rootPort = p.kind, let slot = p.slot else { return nil }
            return PCIIntxRouter.wire(slot: slot, pin: 1)
        })
    }

    /// The interrupt pin (1…4) of a root port in `slot` whose wire is not in `avoiding`: INTB
    /// and on when one is free, INTB when all four are taken (four or more root ports).
    static func rootPortPin(slot: Int, avoiding: Set<Int>) -> Int {
        [2, 3, 4, 1].first { !avoiding.contains(PCIIntxRouter.wire(slot: slot, pin: $0)) } ?? 2
    }

    /// Builds a PCI function into the slot of root port `portID` and registers it; with
    /// `hotPlug` the guest is told (presence and link change). Behind a port the function is
    /// device 0 of the secondary bus; its INTA reaches the root bus as the port's INTA (the
    /// bridge swizzle of device 0). `label` names a hot-plugged device in the errors that refuse
    /// saved states ("virtio-net-pci 'nic1'"). Control thread.
    public func attachPCI(_ factory: PCIDeviceFactory, behind portID: String, hotPlug: Bool, label: String? = nil) throws {
        guard let pcieHost, let (address, port) = rootPorts[portID] else {
            throw BoardError.invalidConfig("Bus '\(portID)' not found")
        }
        guard port.child == nil else {
            throw BoardError.invalidConfig("PCI: slot 0 function 0 not available, in use by another device on bus '\(portID)'")
        }
        let function = try factory(PCIDeviceContext(ram: ram, intx: pcieHost.intx.line(slot: address.slot, pin: 1), slot: nil,
                                                    port: portID, clock: clock))
        if let managed = function as? any ManagedDevice {
            try deviceManager.register(managed, hotPlugged: hotPlug ? "\(label ?? "the device") in root port '\(portID)'" : nil)
        }
        do {
            try port.plug(function, hotPlug: hotPlug)
        } catch {
            if let managed = function as? any ManagedDevice { deviceManager.unregister(managed) }
            throw BoardError.invalidConfig(error.description)
        }
    }

    /// Removes the function behind root port `portID` (hot-unplug, once the guest let go of it):
    /// its in-flight work finishes first. Control thread, vCPUs stopped.
    public func detachPCI(behind portID: String) {
        guard let (_, port) = rootPorts[portID], let function = port.child else { return }
        if let managed = function as? any ManagedDevice { managed.quiesce() }
        port.unplug()
        if let managed = function as? any ManagedDevice { deviceManager.unregister(managed) }
    }

    /// Removes the PCI function at `address` from the bus and the device manager (hot-unplug).
    /// Control thread.
    public func detachPCI(_ address: PCIRootAddress) {
        guard let function = pciFunctions.removeValue(forKey: address) else { return }
        if let id = rootPorts.first(where: { $0.value.address == address })?.key {
            detachPCI(behind: id)
            rootPorts[id] = nil
        }
        pcieHost?.unplug(slot: address.slot, function: address.function)
        if let managed = function as? any ManagedDevice { deviceManager.unregister(managed) }
    }

    /// Maps an empty virtio-mmio transport (no device) in `slot`. Control thread.
    private func mapEmptyTransport(slot: Int) throws {
        let irqNumber = virtioSlots.irq(ofSlot: slot)
        let region = virtioSlots.region(ofSlot: slot)
        let empty = VirtioMMIOTransport(device: nil, ram: ram, interrupt: plic.line(irqNumber),
                                        name: "virtio-mmio@\(String(region.base.raw, radix: 16)) (empty)")
        try bus.map(empty, at: region)
        emptyVirtioSlots[slot] = empty
    }

    /// Builds a virtio-mmio transport into the lowest free slot and maps it; returns the slot.
    /// The device tree already lists every slot, so the guest finds it when it probes (or on
    /// rescan for hot-plug). Control thread, vCPUs stopped.
    @discardableResult
    public func attachVirtio(_ factory: MMIODeviceFactory) throws -> Int {
        let slot = try virtioSlots.allocate()
        let region = virtioSlots.region(ofSlot: slot)
        let irqNumber = virtioSlots.irq(ofSlot: slot)
        let empty = emptyVirtioSlots.removeValue(forKey: slot)
        if let empty { bus.unmap(empty) }
        do {
            let device = try factory(DeviceContext(ram: ram, irq: plic.line(irqNumber), irqNumber: irqNumber,
                                                   region: region, clock: clock))
            try bus.map(device, at: region)
            if let managed = device as? any ManagedDevice {
                do {
                    try deviceManager.register(managed)
                } catch {
                    bus.unmap(device)
                    throw error
                }
            }
            virtioDevices[slot] = device
        } catch {
            virtioSlots.release(slot)
            if let empty {
                try? bus.map(empty, at: region)
                emptyVirtioSlots[slot] = empty
            }
            throw error
        }
        return slot
    }

    /// Unmaps the transport in `slot`, puts an empty transport back in its place and frees the
    /// slot (hot-unplug). Control thread.
    public func detachVirtio(slot: Int) {
        guard let device = virtioDevices.removeValue(forKey: slot) else { return }
        bus.unmap(device)
        if let managed = device as? any ManagedDevice { deviceManager.unregister(managed) }
        virtioSlots.release(slot)
        try? mapEmptyTransport(slot: slot)
    }

    /// Copies the boot images and the device tree into RAM and returns the state the harts start
    /// from. Call at power-on and on every system reset. Control thread, vCPUs stopped.
    @discardableResult
    public func loadBootImages() throws -> BootState {
        try bootLoader.load(into: ram, deviceTree: deviceTreeBlob, at: deviceTreeAddress)
        return bootState
    }

    /// Resets every managed device (CLINT, PLIC, UART, RTC, HTIF and every virtio transport,
    /// whose devices then drop their queues) to its power-on state. Control thread, vCPUs stopped.
    public func resetDevices() {
        deviceManager.reset()
    }

    /// System reset: `resetDevices()` then `loadBootImages()`; apply the result to each hart.
    @discardableResult
    public func reset() throws -> BootState {
        resetDevices()
        return try loadBootImages()
    }
}

/// Generates `virt`'s device tree from the board's layout, node for node as QEMU does for the
/// devices we build (no flash, fw-cfg or PMU nodes; no HTIF node; the PCIe host's node only
/// when the board has one).
enum VirtDeviceTree {
    /// The ISA we announce is RV64GC with Zicsr, Zifencei and the board's `cpuExtensions`
    /// (`ISAExtensions.isaString`), as `riscv,isa` and as the `riscv,isa-extensions` list.
    static let mmuType = "riscv,sv48"

    static func regCells(_ r: GuestRegion) -> DeviceTreeValue { .u64([r.base.raw, r.size]) }

    /// Builds the tree: the board's own nodes (cpus, memory, the virtio-mmio slots, chosen,
    /// poweroff, reboot) and, under /soc, the nodes the device manager's devices give for
    /// themselves (`devices(plicPhandle, testPhandle, hartIntcPhandles)`), in QEMU's order.
    static func build(config: BoardConfig, timebase: UInt64, ram: GuestRegion, virtioSlots: MMIOSlotBank,
                      initrd: GuestRegion?, devices: (UInt32, UInt32, [UInt32]) -> [DeviceTreeNode]) -> DeviceTree {
        var phandle: UInt32 = 0
        func nextPhandle() -> UInt32 {
            phandle += 1
            return phandle
        }

        var tree = DeviceTree()
        tree.root.set("#address-cells", .u32([2]))
        tree.root.set("#size-cells", .u32([2]))
        tree.root.set("compatible", .string("riscv-virtio"))
        tree.root.set("model", .string("riscv-virtio,qemu"))

        // /cpus
        var cpus = DeviceTreeNode("cpus")
        cpus.set("#address-cells", .u32([1]))
        cpus.set("#size-cells", .u32([0]))
        cpus.set("timebase-frequency", .u32([UInt32(timebase)]))
        var cpuPhandles: [UInt32] = []
        var intcPhandles: [UInt32] = []
        for hart in 0..<config.cpuCount {
            var cpu = DeviceTreeNode("cpu@\(String(hart, radix: 16))")
            let cpuPhandle = nextPhandle()
            cpu.set("phandle", .u32([cpuPhandle]))
            cpu.set("device_type", .string("cpu"))
            cpu.set("reg", .u32([UInt32(hart)]))
            cpu.set("status", .string("okay"))
            cpu.set("compatible", .string("riscv"))
            let ext = config.cpuExtensions
            cpu.set("riscv,isa", .string(ext.isaString))
            cpu.set("riscv,isa-base", .string("rv64i"))
            cpu.set("riscv,isa-extensions", .strings(ext.extensionList))
            if ext.contains(.zicbom) { cpu.set("riscv,cbom-block-size", .u32([UInt32(ISAExtensions.cacheBlockSize)])) }
            if ext.contains(.zicboz) { cpu.set("riscv,cboz-block-size", .u32([UInt32(ISAExtensions.cacheBlockSize)])) }
            if ext.contains(.zicbop) { cpu.set("riscv,cbop-block-size", .u32([UInt32(ISAExtensions.cacheBlockSize)])) }
            cpu.set("mmu-type", .string(mmuType))
            var intc = DeviceTreeNode("interrupt-controller")
            intc.set("#interrupt-cells", .u32([1]))
            intc.set("interrupt-controller", .empty)
            intc.set("compatible", .string("riscv,cpu-intc"))
            let intcPhandle = nextPhandle()
            intc.set("phandle", .u32([intcPhandle]))
            cpu.add(intc)
            cpus.add(cpu)
            cpuPhandles.append(cpuPhandle)
            intcPhandles.append(intcPhandle)
        }
        var cluster = DeviceTreeNode("cluster0")
        for (hart, p) in cpuPhandles.enumerated() {
            var core = DeviceTreeNode("core\(hart)")
            core.set("cpu", .u32([p]))
            cluster.add(core)
        }
        var cpuMap = DeviceTreeNode("cpu-map")
        cpuMap.add(cluster)
        cpus.add(cpuMap)

        // /memory
        var memory = DeviceTreeNode("memory@\(String(ram.base.raw, radix: 16))")
        memory.set("device_type", .string("memory"))
        memory.set("reg", regCells(ram))

        // /soc
        let plicPhandle = nextPhandle()
        let testPhandle = nextPhandle()
        var soc = DeviceTreeNode("soc")
        soc.set("#address-cells", .u32([2]))
        soc.set("#size-cells", .u32([2]))
        soc.set("compatible", .string("simple-bus"))
        soc.set("ranges", .empty)

        func node(_ base: String, _ r: GuestRegion) -> DeviceTreeNode {
            DeviceTreeNode("\(base)@\(String(r.base.raw, radix: 16))")
        }

        // QEMU lists the virtio-mmio slots from the highest address down. The slots are the
        // board's: each has a node whether a device sits in it or not.
        var slots: [DeviceTreeNode] = []
        for slot in (0..<virtioSlots.count).reversed() {
            let r = virtioSlots.region(ofSlot: slot)
            var v = node("virtio_mmio", r)
            v.set("interrupts", .u32([UInt32(virtioSlots.irq(ofSlot: slot))]))
            v.set("interrupt-parent", .u32([plicPhandle]))
            v.set("reg", regCells(r))
            v.set("compatible", .string("virtio,mmio"))
            slots.append(v)
        }
        // QEMU's order under /soc: rtc, serial, test, pci, the slots, plic, clint (then anything else).
        let rank = ["rtc": 0, "serial": 1, "test": 2, "pci": 3, "virtio_mmio": 4, "plic": 5, "clint": 6]
        let children = (devices(plicPhandle, testPhandle, intcPhandles) + slots).enumerated().sorted { a, b in
            let ra = rank[String(a.element.name.prefix { $0 != "@" })] ?? 7
            let rb = rank[String(b.element.name.prefix { $0 != "@" })] ?? 7
            return ra != rb ? ra < rb : a.offset < b.offset
        }
        for (_, child) in children { soc.add(child) }
        let serialName = children.first { $0.element.name.hasPrefix("serial@") }?.element.name ?? "serial"

        // /chosen, /poweroff, /reboot
        var chosen = DeviceTreeNode("chosen")
        if let initrd {
            chosen.set("linux,initrd-end", .u64([initrd.end.raw]))
            chosen.set("linux,initrd-start", .u64([initrd.base.raw]))
        }
        if config.rngSeedBytes > 0 {
            var rng = SystemRandomNumberGenerator()
            chosen.set("rng-seed", .bytes((0..<config.rngSeedBytes).map { _ in UInt8.random(in: 0...255, using: &rng) }))
        }
        if let args = config.kernelCommandLine { chosen.set("bootargs", .string(args)) }
        chosen.set("stdout-path", .string("/soc/\(serialName)"))

        func syscon(_ name: String, _ value: UInt64) -> DeviceTreeNode {
            var n = DeviceTreeNode(name)
            n.set("value", .u32([UInt32(value)]))
            n.set("offset", .u32([0]))
            n.set("regmap", .u32([testPhandle]))
            n.set("compatible", .string("syscon-\(name)"))
            return n
        }

        tree.root.add(chosen)
        tree.root.add(syscon("poweroff", SiFiveTest.pass))
        tree.root.add(syscon("reboot", SiFiveTest.reset))
        tree.root.add(memory)
        tree.root.add(cpus)
        tree.root.add(soc)
        return tree
    }
}

extension VirtBoard: MachineBoard {
    /// Resets the board's devices, reloads the boot images, and gives every hart the same entry
    /// with a0 = its hart ID, a1 = the device tree and a2 = `fw_dynamic_info`, as QEMU's reset
    /// vector does. Control thread, vCPUs stopped.
    public func resetForBoot() throws -> [HartResetVector] {
        let state = try reset()
        return hartInterrupts.map {
            HartResetVector(entry: state.entry, a0: UInt64($0.hartID), a1: state.deviceTreeAddress.raw,
                            a2: state.firmwareInfoAddress.raw)
        }
    }

    /// QEMU's `virt` has no power-button device (no ACPI, no GPIO keys); a press reaches the
    /// guest only through `config.powerButton` (KEY_POWER on a virtio keyboard). Returns whether
    /// there was one.
    public func pressPowerButton() -> Bool {
        guard let press = config.powerButton else { return false }
        press()
        return true
    }
}
