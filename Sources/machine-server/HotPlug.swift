import Board
import Devices
import Foundation
import Machine
import QMP
import Schema
import Storage
import Synchronization

/// The machine's hot-plug side (`HotPlugRegistry`): the block nodes opened with blockdev-add,
/// the devices added with device_add behind pcie-root-ports, and the PCI bus as query-pci and
/// the QOM paths show it.
///
/// Threading: any thread may call it. Board changes run on the machine's control queue
/// (`VirtualMachine.changeDevices`); the tables sit behind `state`, taken inside the control
/// queue's work and never held while waiting for it.
final class MachineHotPlug: HotPlugRegistry, @unchecked Sendable {  // unchecked: its tables sit behind the `state` Mutex
    /// A block node.
    private struct Node {
        var name: String
        /// "file", "raw" or "qcow2".
        var driver: String
        var filename: String
        var readOnly: Bool
        /// The opened image (format nodes).
        var image: (any BlockImage)?
        /// The file node under a format node.
        var fileNode: String?
        /// A file node given inline, removed with its format node.
        var inline: Bool
        /// Opened by apply-description for its device: closed when that device goes.
        var autoClose = false
    }

    /// A hot-plugged device.
    private struct Plugged {
        var id: String?
        var path: String
        var driver: HotPlugDriver
        var port: String
        var drive: String?
        var serial: String?
        var block: VirtioBlock?
        /// A NIC's id in the machine's network (its device id, or DRIVER.N), its netdev and MAC.
        var nic: (id: String, netdev: String?, mac: String)? = nil
        var unplugRequested: Bool
    }

    private struct State {
        var nodes: [Node] = []
        var plugged: [Plugged] = []
        var nextAnonymous = 0
        var nextInlineNode = 0
    }

    private let machine: VirtualMachine
    private let board: VirtBoard
    private let launched: [PlannedDevice]
    /// The description the machine was launched from, and where its relative paths start.
    private let launchDescription: MachineDescription
    private let baseDirectory: String
    private let display: Display?
    /// The netdevs a hot-plugged NIC is connected to.
    private let network: MachineNetwork?
    private let state = Mutex(State())
    /// Where DEVICE_DELETED goes (the QMP server), set once it exists.
    let eventSink = Mutex<(@Sendable (QMPEvent) -> Void)?>(nil)

    /// Creates the registry for a machine whose board is a `VirtBoard` built from `launched`.
    init?(machine: VirtualMachine, plan: LaunchPlan, display: Display?, network: MachineNetwork?) {
        guard let board = machine.board as? VirtBoard, board.pcieHost != nil else { return nil }
        self.machine = machine
        self.board = board
        self.launched = plan.devices
        self.launchDescription = plan.description
        self.baseDirectory = plan.baseDirectory
        self.display = display
        self.network = network
    }

    // MARK: Devices

    func addDevice(_ r: DeviceAddRequest) throws {
        try machine.changeDevices {
            try state.withLock { s in
                if let id = r.id {
                    if launched.contains(where: { $0.hasExplicitID && $0.id == id }) || s.plugged.contains(where: { $0.id == id }) {
                        throw HotPlugError.duplicateID(id)
                    }
                }
                guard let bus = r.bus, bus != PlannedDevice.rootBus else {
                    throw HotPlugError.busNoHotplug(PlannedDevice.rootBus)
                }
                guard let (_, port) = board.rootPorts[bus] else { throw HotPlugError.busNotFound(bus) }
                if port.child != nil {
                    let occupant = s.plugged.first { $0.port == bus }.map { $0.id.map { "'\($0)'" } ?? $0.path }
                        ?? launched.first { $0.transport == .pciPort(bus) }.map { "'\($0.id)'" } ?? "another device"
                    throw HotPlugError.slotBusy(bus: bus, driver: r.driver.rawValue, occupant: occupant)
                }
                let device: any VirtioDevice
                var block: VirtioBlock?
                var nic: MachineNetwork.NIC?
                let anonymous = r.id == nil
                let path = r.id.map { "/machine/peripheral/\($0)" } ?? "/machine/peripheral-anon/device[\(s.nextAnonymous)]"
                let label = r.id ?? "anon\(s.nextAnonymous)"
                switch r.driver {
                case .virtioBlkPci:
                    let name = r.drive ?? ""
                    guard let node = s.nodes.first(where: { $0.name == name }) else {
                        throw HotPlugError.driveNotFound(driver: r.driver.rawValue, node: name)
                    }
                    guard let image = node.image else { throw HotPlugError.driveIsProtocolNode(name) }
                    if let user = s.plugged.first(where: { $0.drive == name }) {
                        throw HotPlugError.driveInUse(driver: r.driver.rawValue, node: name, user: user.id ?? user.path)
                    }
                    let blk = VirtioBlock(drive: DriveConfig(image: image, readOnly: node.readOnly, serial: r.serial ?? r.id ?? ""),
                                          name: "virtio-blk-\(label)", logger: MachineDevices.logger("machine.virtio-blk"))
                    block = blk
                    device = blk
                case .virtioRngPci: device = VirtioEntropy(name: "virtio-rng-\(label)")
                case .virtioKeyboardPci: device = VirtioInput(kind: .keyboard, display: display, name: "virtio-keyboard-\(label)")
                case .virtioTabletPci: device = VirtioInput(kind: .tablet, display: display, name: "virtio-tablet-\(label)")
                case .virtioNetPci:
                    guard let network else { throw HotPlugError.failed("The machine has no network support") }
                    let n = try network.plugNIC(id: r.id, driver: r.driver.rawValue, netdev: r.netdev, mac: r.mac,
                                                name: "virtio-net-\(label)")
                    nic = n
                    device = n.device
                }
                let driver = r.driver.rawValue
                do {
                    try board.attachPCI({ context in
                        VirtioPCITransport(device: device, ram: context.ram, intx: context.intx,
                                           name: "\(driver) \(context.address) (\(device.name))",
                                           stateSection: "virtio-pci@\(context.address)",
                                           logger: MachineDevices.logger("machine.virtio-pci"))
                    }, behind: bus, hotPlug: true, label: "\(driver) '\(r.id ?? path)'")
                } catch {
                    block?.reset()
                    if let nic { network?.unplugNIC(id: nic.id) }
                    throw HotPlugError.failed("\(error)")
                }
                port.onPowerOff.withLock { $0 = { [weak self] in self?.guestPoweredOff(port: bus) } }
                if anonymous { s.nextAnonymous += 1 }
                s.plugged.append(Plugged(id: r.id, path: path, driver: r.driver, port: bus, drive: r.drive, serial: r.serial,
                                         block: block, nic: nic.map { ($0.id, $0.netdev, VirtioNet.format($0.device.mac)) },
                                         unplugRequested: false))
            }
        }
    }

    func deleteDevice(id: String) throws {
        try machine.changeDevices {
            try state.withLock { s in
                guard let i = s.plugged.firstIndex(where: { $0.id == id || $0.path == id }) else {
                    if launched.contains(where: { $0.hasExplicitID && ($0.id == id || "/machine/peripheral/\($0.id)" == id) }) {
                        throw HotPlugError.notHotPluggableDevice(id)
                    }
                    throw HotPlugError.deviceNotFound(id)
                }
                guard !s.plugged[i].unplugRequested else { throw HotPlugError.unplugPending(id) }
                guard let (_, port) = board.rootPorts[s.plugged[i].port] else { throw HotPlugError.failed("root port gone") }
                s.plugged[i].unplugRequested = true
                port.pressAttentionButton()
            }
        }
    }

    /// The guest turned the power of `port`'s slot off (vCPU thread): the device goes, on the
    /// control queue, and DEVICE_DELETED is sent.
    private func guestPoweredOff(port: String) {
        machine.changeDevicesLater { [weak self] in
            guard let self else { return }
            let removed: Plugged? = try? self.machine.changeDevices {
                self.state.withLock { s -> Plugged? in
                    guard let i = s.plugged.firstIndex(where: { $0.port == port }) else { return nil }
                    self.board.detachPCI(behind: port)
                    self.board.rootPorts[port]?.port.onPowerOff.withLock { $0 = nil }
                    let p = s.plugged.remove(at: i)
                    p.block?.reset()   // drains its I/O; the node stays open for blockdev-del
                    // A NIC stops on its backend's thread and lets go of its netdev (free for netdev_del).
                    if let nic = p.nic { self.network?.unplugNIC(id: nic.id) }
                    // ... unless apply-description opened it for this device.
                    if let d = p.drive, let j = s.nodes.firstIndex(where: { $0.name == d && $0.autoClose }) {
                        let node = s.nodes.remove(at: j)
                        if let f = node.fileNode, let k = s.nodes.firstIndex(where: { $0.name == f && $0.inline }) { s.nodes.remove(at: k) }
                        if let image = node.image, !image.isReadOnly { try? image.flush() }
                    }
                    return p
                }
            }
            guard let removed, let emit = self.eventSink.withLock({ $0 }) else { return }
            // As QEMU: first the virtio backend child, then the device itself.
            emit(.deviceDeleted(DeviceDeletedEventData(path: removed.path + "/virtio-backend")))
            emit(.deviceDeleted(DeviceDeletedEventData(device: removed.id, path: removed.path)))
        }
    }

    // MARK: Block nodes

    func addNode(_ r: BlockNodeRequest) throws {
        try state.withLock { s in
            if s.nodes.contains(where: { $0.name == r.nodeName }) { throw HotPlugError.duplicateNode(r.nodeName) }
            switch r.kind {
            case .file(let filename):
                let path = Self.absolute(filename)
                try Self.checkFile(path, node: r.nodeName)
                s.nodes.append(Node(name: r.nodeName, driver: "file", filename: path, readOnly: r.readOnly, image: nil,
                                    fileNode: nil, inline: false))
            case .format(let driver, let source, let noBacking):
                let path: String
                var fileNode: Node?
                switch source {
                case .inline(let filename):
                    path = Self.absolute(filename)
                    try Self.checkFile(path, node: r.nodeName)
                    fileNode = Node(name: "#block\(s.nextInlineNode)", driver: "file", filename: path, readOnly: r.readOnly,
                                    image: nil, fileNode: nil, inline: true)
                case .node(let name):
                    guard let f = s.nodes.first(where: { $0.name == name }) else { throw HotPlugError.nodeNotFound(name) }
                    guard f.driver == "file" else {
                        throw HotPlugError.badNodeOption("Parameter 'file': node '\(name)' is a \(f.driver) node; a format node goes over a file node")
                    }
                    if let user = s.nodes.first(where: { $0.fileNode == name }) {
                        throw HotPlugError.nodeBusy(node: name, user: "node '\(user.name)'")
                    }
                    path = f.filename
                }
                let image: any BlockImage
                do {
                    image = try openImage(path: path, format: driver == "qcow2" ? .qcow2 : .raw, readOnly: r.readOnly, lock: true)
                } catch {
                    throw HotPlugError.openFailed(node: r.nodeName, reason: "\(error)".replacingOccurrences(of: "\n", with: "; "))
                }
                if noBacking, let q = image as? Qcow2Image, let b = q.header.backingFile {
                    throw HotPlugError.badNodeOption("Parameter 'backing': null, but the image names the backing file '\(b)', which cannot be left out")
                }
                if let fileNode {
                    s.nextInlineNode += 1
                    s.nodes.append(fileNode)
                }
                s.nodes.append(Node(name: r.nodeName, driver: driver, filename: path, readOnly: r.readOnly, image: image,
                                    fileNode: fileNode?.name ?? { if case .node(let n) = source { return n } else { return nil } }(),
                                    inline: false))
            }
        }
    }

    func deleteNode(name: String) throws {
        let closing: (any BlockImage)? = try state.withLock { s in
            guard let i = s.nodes.firstIndex(where: { $0.name == name }) else { throw HotPlugError.nodeNotFound(name) }
            if let user = s.plugged.first(where: { $0.drive == name }) {
                throw HotPlugError.nodeBusy(node: name, user: "device '\(user.id ?? user.path)'")
            }
            if let parent = s.nodes.first(where: { $0.fileNode == name }) {
                throw HotPlugError.nodeBusy(node: name, user: "node '\(parent.name)'")
            }
            let node = s.nodes.remove(at: i)
            if let f = node.fileNode, let j = s.nodes.firstIndex(where: { $0.name == f && $0.inline }) { s.nodes.remove(at: j) }
            return node.image
        }
        if let closing, !closing.isReadOnly {
            do {
                try closing.flush()
            } catch {
                throw HotPlugError.failed("Node '\(name)' was closed, but flushing it failed: \(error)")
            }
        }
        // The image closes (and drops its locks) when the last reference goes, here.
    }

    func nodes() -> [BlockNodeStatus] {
        state.withLock { s in
            s.nodes.map { n in
                var backing: String?
                var depth = 0
                if let q = n.image as? Qcow2Image {
                    backing = q.header.backingFile
                    var next = q.backing
                    while let b = next {
                        depth += 1
                        next = (b as? Qcow2Image)?.backing
                    }
                }
                let size = n.image?.virtualSize ?? (try? FileManager.default.attributesOfItem(atPath: n.filename)[.size] as? UInt64) ?? 0
                return BlockNodeStatus(nodeName: n.name, driver: n.driver, filename: n.filename, readOnly: n.readOnly,
                                       virtualSize: size, backingFile: backing, backingDepth: depth)
            }
        }
    }

    func hotPluggedDisks() -> [BlockDeviceStatus] {
        state.withLock { s in
            s.plugged.compactMap { p in
                guard let drive = p.drive, let node = s.nodes.first(where: { $0.name == drive }), let image = node.image else { return nil }
                var status = BlockDeviceStatus(id: p.id ?? p.path, file: image.path, format: image.format.rawValue, readOnly: node.readOnly,
                                               virtualSize: image.virtualSize, backingFile: (image as? Qcow2Image)?.header.backingFile,
                                               nodeName: drive, statistics: p.block?.statistics)
                status.hotPlugged = true
                return status
            }
        }
    }

    /// Flushes every writable node (at exit, after the machine stopped).
    func close() {
        let images = state.withLock { $0.nodes.compactMap(\.image) }
        for image in images where !image.isReadOnly { try? image.flush() }
    }

    // MARK: QOM and PCI

    func peripherals() -> [PeripheralDevice] {
        let boot = launched.filter(\.hasExplicitID).map { d -> PeripheralDevice in
            var props: [(name: String, value: String)] = []
            switch d.transport {
            case .mmio: break
            case .pci(let slot, let function):
                props = [("bus", PlannedDevice.rootBus), ("addr", PCIRootAddress(slot: slot, function: function).description)]
                if d.multifunction { props.append(("multifunction", "on")) }
            case .pciPort(let port): props = [("bus", port), ("addr", "00.0")]
            }
            return PeripheralDevice(id: d.id, path: "/machine/peripheral/\(d.id)", driver: d.driver, hotPlugged: false,
                                    hotPluggable: false, properties: props)
        }
        let hot = state.withLock { s in
            s.plugged.map { p -> PeripheralDevice in
                var props: [(name: String, value: String)] = [("bus", p.port), ("addr", "00.0")]
                if let d = p.drive { props.append(("drive", d)) }
                if let serial = p.serial { props.append(("serial", serial)) }
                if let nic = p.nic {
                    if let netdev = nic.netdev { props.append(("netdev", netdev)) }
                    props.append(("mac", nic.mac))
                }
                return PeripheralDevice(id: p.id, path: p.path, driver: p.driver.rawValue, hotPlugged: true, hotPluggable: true,
                                        properties: props)
            }
        }
        return boot + hot
    }

    func pciBuses() -> [PciInfo] {
        guard let host = board.pcieHost else { return [] }
        let hotIDs = state.withLock { s in Dictionary(s.plugged.map { ($0.port, $0.id ?? "") }, uniquingKeysWith: { a, _ in a }) }
        func qdevID(_ address: PCIRootAddress?, port: String?) -> String {
            if let port {
                if let id = hotIDs[port] { return id }
                return launched.first { $0.transport == .pciPort(port) && $0.hasExplicitID }?.id ?? ""
            }
            guard let address else { return "" }
            if let id = board.rootPorts.first(where: { $0.value.address == address })?.key { return id }
            return launched.first {
                $0.transport == .pci(slot: address.slot, function: address.function) && $0.hasExplicitID
            }?.id ?? ""
        }
        var devices: [PciDeviceInfo] = []
        for (slot, function, f) in host.rootFunctions() {
            let address = PCIRootAddress(slot: slot, function: function)
            var info = Self.info(f, bus: 0, slot: slot, function: function, qdevID: qdevID(address, port: nil))
            if let bridge = f as? any PCIBridge, var b = info.pciBridge {
                let port = board.rootPorts.first { $0.value.address == address }?.key
                if let child = bridge.child {
                    b.devices = [Self.info(child, bus: bridge.secondaryBus, slot: 0, qdevID: qdevID(nil, port: port))]
                } else {
                    b.devices = []
                }
                info.pciBridge = b
            }
            devices.append(info)
        }
        return [PciInfo(bus: 0, devices: devices)]
    }

    /// One function's identity, BARs and (for a bridge) windows, read from its configuration space.
    static func info(_ f: any PCIFunction, bus: Int, slot: Int, function: Int = 0, qdevID: String) -> PciDeviceInfo {
        func r(_ o: Int, _ n: Int) -> Int64 { Int64(f.configRead(offset: o, size: n)) }
        let headerType = r(PCIConfig.headerType, 1) & 0x7f
        let cls = r(PCIConfig.classCode + 1, 2)
        let pin = r(PCIConfig.interruptPin, 1)
        var regions: [PciMemoryRegion] = []
        for (index, bar) in f.barDescriptors.sorted(by: { $0.key < $1.key }) {
            let reg = PCIConfig.bar0 + 4 * index
            switch bar.kind {
            case .io:
                regions.append(PciMemoryRegion(bar: Int64(index), type: "io", address: r(reg, 4) & ~0x3, size: Int64(bar.size)))
            case .memory32(let p):
                regions.append(PciMemoryRegion(bar: Int64(index), type: "memory", address: r(reg, 4) & ~0xf, size: Int64(bar.size),
                                               prefetch: p, memType64: false))
            case .memory64(let p):
                let address = (r(reg, 4) & ~0xf) | (r(reg + 4, 4) << 32)
                regions.append(PciMemoryRegion(bar: Int64(index), type: "memory", address: address, size: Int64(bar.size),
                                               prefetch: p, memType64: true))
            }
        }
        var bridge: PciBridgeInfo?
        var ids = PciDeviceId(device: r(PCIConfig.deviceID, 2), vendor: r(PCIConfig.vendorID, 2))
        if headerType == 1 {
            let io = PciMemoryRange(base: (r(0x1c, 1) & 0xf0) << 8 | r(0x30, 2) << 16,
                                    limit: (r(0x1d, 1) & 0xf0) << 8 | 0xfff | r(0x32, 2) << 16)
            let mem = PciMemoryRange(base: (r(0x20, 2) & 0xfff0) << 16, limit: (r(0x22, 2) & 0xfff0) << 16 | 0xfffff)
            let pref = PciMemoryRange(base: (r(0x24, 2) & 0xfff0) << 16 | r(0x28, 4) << 32,
                                      limit: (r(0x26, 2) & 0xfff0) << 16 | 0xfffff | r(0x2c, 4) << 32)
            bridge = PciBridgeInfo(bus: PciBusInfo(number: r(0x18, 1), secondary: r(0x19, 1), subordinate: r(0x1a, 1),
                                                   ioRange: io, memoryRange: mem, prefetchableRange: pref))
        } else {
            ids.subsystemVendor = r(PCIConfig.subsystemVendorID, 2)
            ids.subsystem = r(PCIConfig.subsystemID, 2)
        }
        let names: [Int64: String] = [0x0100: "SCSI controller", 0x0180: "Storage controller", 0x0200: "Ethernet controller",
                                      0x0300: "VGA controller", 0x0380: "Display controller", 0x0600: "Host bridge",
                                      0x0604: "PCI bridge", 0x0900: "Keyboard", 0x0902: "Mouse"]
        return PciDeviceInfo(bus: Int64(bus), slot: Int64(slot), function: Int64(function),
                             classInfo: PciDeviceClass(desc: names[cls], class: cls), id: ids,
                             irq: pin != 0 ? r(PCIConfig.interruptLine, 1) : nil, irqPin: pin != 0 ? pin : nil,
                             qdevId: qdevID, pciBridge: bridge, regions: regions)
    }

    // MARK: Descriptions

    func currentDescription() throws -> MachineDescription {
        var d = launchDescription
        d.devices = (launchDescription.devices ?? []) + hotDeviceDescriptions()
        // The netdevs as they are now (netdev_add and netdev_del included), so that a hot-plugged
        // NIC's netdev is in the description that launches the same machine.
        if let network, launchDescription.netdevs != nil || !network.specs.isEmpty { d.netdevs = network.specs }
        return d
    }

    /// The hot-plugged devices as description entries, in plug order.
    private func hotDeviceDescriptions() -> [DeviceDescription] {
        state.withLock { s in
            s.plugged.map { p in
                let id = p.id ?? "device[\(p.path.split(separator: "[").last?.dropLast() ?? "")]"
                switch p.driver {
                case .virtioBlkPci:
                    let node = s.nodes.first { $0.name == p.drive }
                    let format: DriveFormat = node?.driver == "raw" ? .raw : .qcow2
                    return DeviceDescription(variant: .virtioBlkPci(PCIBlockDeviceOptions(
                        id: id, drive: DriveDescription(file: node?.filename ?? "", format: format, readOnly: node?.readOnly ?? false),
                        bus: p.port)))
                case .virtioRngPci: return DeviceDescription(variant: .virtioRngPci(PCIDeviceOptions(id: p.id, bus: p.port)))
                case .virtioKeyboardPci: return DeviceDescription(variant: .virtioKeyboardPci(PCIDeviceOptions(id: p.id, bus: p.port)))
                case .virtioTabletPci: return DeviceDescription(variant: .virtioTabletPci(PCIDeviceOptions(id: p.id, bus: p.port)))
                case .virtioNetPci:
                    return DeviceDescription(variant: .virtioNetPci(PCINetDeviceOptions(id: p.id, netdev: p.nic?.netdev, mac: p.nic?.mac,
                                                                                          bus: p.port)))
                }
            }
        }
    }

    func apply(_ wanted: MachineDescription) throws {
        func refuse(_ why: String) -> HotPlugError { .cannotApply(why) }
        let current = try currentDescription()
        // Everything but the devices must be as it is.
        var a = current.jsonMembers, b = wanted.jsonMembers
        a["devices"] = nil
        b["devices"] = nil
        // A description without a version is read as the current one.
        if a["version"] == nil || b["version"] == nil { (a["version"], b["version"]) = (nil, nil) }
        if let am = a["memory"], let bm = b["memory"], case .string(let x) = am, case .string(let y) = bm,
           SchemaCheck.parseSize(x) == SchemaCheck.parseSize(y) {
            b["memory"] = am
        }
        for key in Set(a.keys + b.keys).sorted() where a[key] != b[key] {
            let was = a[key].map { $0.serialized() } ?? "absent", want = b[key].map { $0.serialized() } ?? "absent"
            throw refuse("'\(key)' cannot change while the machine runs (it is \(was), the description says \(want))")
        }
        let launchDevices = launchDescription.devices ?? []
        let hot = hotDeviceDescriptions()
        let wantedDevices = wanted.devices ?? []
        for (i, d) in launchDevices.enumerated() where !wantedDevices.contains(d) {
            throw refuse("devices: \(Self.name(d)), built at launch (devices[\(i)]), is missing or changed; devices of the launch cannot be removed or changed live")
        }
        let removals = hot.filter { !wantedDevices.contains($0) }
        let additions = wantedDevices.filter { !launchDevices.contains($0) && !hot.contains($0) }
        let removedIDs = Set(removals.compactMap(Self.id))
        let keptIDs = Set((launchDevices + hot).filter { !removals.contains($0) }.compactMap(Self.id))
            .union(launched.filter(\.hasExplicitID).map(\.id))
        var ports: Set<String> = []
        var plans: [(request: DeviceAddRequest, file: String?, format: String, readOnly: Bool)] = []
        for d in additions {
            let name = Self.name(d)
            guard let id = Self.id(d) else { throw refuse("devices: \(name): a device added live needs an id") }
            guard HotPlugError.isIdentifier(id) else { throw refuse("devices: \(name): \(HotPlugError.badID(id))") }
            if removedIDs.contains(id) { throw refuse("devices: '\(id)' changes; a device cannot be changed live (remove it, then add it again)") }
            if keptIDs.contains(id) || plans.contains(where: { $0.request.id == id }) { throw refuse("devices: \(HotPlugError.duplicateID(id))") }
            let driver: HotPlugDriver, bus: String?, addr: String?
            var file: String?, format = "raw", readOnly = false
            var netdev: String?, mac: MACAddress?, multifunction: Bool?
            switch d.variant {
            case .virtioBlkPci(let o):
                driver = .virtioBlkPci
                (bus, addr, multifunction) = (o.bus, o.addr, o.multifunction)
                file = o.drive.file.hasPrefix("/") ? o.drive.file : (baseDirectory as NSString).appendingPathComponent(o.drive.file)
                format = o.drive.format.rawValue
                readOnly = o.drive.readOnly
            case .virtioRngPci(let o): (driver, bus, addr, multifunction) = (.virtioRngPci, o.bus, o.addr, o.multifunction)
            case .virtioKeyboardPci(let o): (driver, bus, addr, multifunction) = (.virtioKeyboardPci, o.bus, o.addr, o.multifunction)
            case .virtioTabletPci(let o): (driver, bus, addr, multifunction) = (.virtioTabletPci, o.bus, o.addr, o.multifunction)
            case .virtioNetPci(let o):
                (driver, bus, addr, multifunction) = (.virtioNetPci, o.bus, o.addr, o.multifunction)
                if let text = o.mac {
                    guard let m = MACAddress(text), !m.isMulticast else {
                        throw refuse("devices: \(name): mac '\(text)' is not a unicast MAC address (six hex bytes separated by ':', e.g. 52:54:00:12:34:56)")
                    }
                    mac = m
                }
                netdev = o.netdev
                if let n = o.netdev {
                    if network?.netdev(n) == nil { throw refuse("devices: \(name): \(HotPlugError.netdevNotFound(driver: driver.rawValue, netdev: n))") }
                    if let user = network?.nics.first(where: { $0.netdev == n }) {
                        throw refuse("devices: \(name): \(HotPlugError.netdevInUse(driver: driver.rawValue, netdev: n, user: user.id))")
                    }
                    if plans.contains(where: { $0.request.netdev == n }) {
                        throw refuse("devices: \(name): netdev '\(n)' is named by two NICs of this change")
                    }
                }
            default: throw refuse("devices: \(name): \(HotPlugError.notHotPluggable(d.driver.rawValue))")
            }
            guard let bus, bus != PlannedDevice.rootBus else { throw refuse("devices: \(name): \(HotPlugError.busNoHotplug(PlannedDevice.rootBus))") }
            guard let (_, port) = board.rootPorts[bus] else { throw refuse("devices: \(name): \(HotPlugError.busNotFound(bus))") }
            if let addr, !["0", "00", "0.0", "00.0", "0x0"].contains(addr.lowercased()) {
                throw refuse("devices: \(name): addr '\(addr)': a pcie-root-port has one slot, 0")
            }
            if multifunction == true {
                throw refuse("devices: \(name): multifunction: a pcie-root-port's slot has one function")
            }
            if removals.contains(where: { Self.bus($0) == bus }) {
                throw refuse("devices: \(name): bus '\(bus)' is freed by this change only once the guest lets go of its device; add to it after DEVICE_DELETED")
            }
            guard port.child == nil, !ports.contains(bus) else {
                throw refuse("devices: \(name): bus '\(bus)' holds a device already")
            }
            ports.insert(bus)
            plans.append((DeviceAddRequest(driver: driver, id: id, bus: bus, drive: file.map { _ in "desc-\(id)" }, netdev: netdev, mac: mac),
                          file, format, readOnly))
        }
        let pending = state.withLock { s in s.plugged.filter(\.unplugRequested).compactMap(\.id) }
        for r in removals {
            guard let id = Self.id(r) else { continue }
            if pending.contains(id) { throw refuse("devices: '\(id)' is already in the process of unplug") }
        }
        // Open every image first: a missing or locked one refuses the change before any device moves.
        var opened: [String] = []
        do {
            for p in plans {
                guard let file = p.file, let node = p.request.drive else { continue }
                if state.withLock({ s in s.nodes.contains { $0.name == node } }) {
                    throw refuse("node name '\(node)' is taken; delete it with blockdev-del first")
                }
                do {
                    try addNode(BlockNodeRequest(nodeName: node, kind: .format(driver: p.format, file: .inline(filename: file), noBacking: false),
                                                 readOnly: p.readOnly))
                } catch {
                    throw refuse("devices: '\(p.request.id ?? "")': \(error)")
                }
                state.withLock { s in
                    if let i = s.nodes.firstIndex(where: { $0.name == node }) { s.nodes[i].autoClose = true }
                }
                opened.append(node)
            }
        } catch {
            for node in opened { try? deleteNode(name: node) }
            throw error
        }
        for p in plans { try addDevice(p.request) }
        for r in removals { if let id = Self.id(r) { try deleteDevice(id: id) } }
    }

    private static func id(_ d: DeviceDescription) -> String? {
        switch d.variant {
        case .virtioBlkDevice(let o): return o.id
        case .virtioBlkPci(let o): return o.id
        case .pcieRootPort(let o): return o.id
        case .virtioGpuDevice(let o), .virtioKeyboardDevice(let o), .virtioTabletDevice(let o), .virtioRngDevice(let o): return o.id
        case .virtioGpuPci(let o), .virtioKeyboardPci(let o), .virtioTabletPci(let o), .virtioRngPci(let o): return o.id
        case .virtioNetDevice(let o): return o.id
        case .virtioNetPci(let o): return o.id
        }
    }

    private static func bus(_ d: DeviceDescription) -> String? {
        switch d.variant {
        case .virtioBlkPci(let o): return o.bus
        case .virtioGpuPci(let o), .virtioKeyboardPci(let o), .virtioTabletPci(let o), .virtioRngPci(let o): return o.bus
        case .virtioNetPci(let o): return o.bus
        default: return nil
        }
    }

    private static func name(_ d: DeviceDescription) -> String {
        d.driver.rawValue + (id(d).map { " '\($0)'" } ?? "")
    }

    // MARK: Helpers

    private static func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    }

    private static func checkFile(_ path: String, node: String) throws {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw HotPlugError.openFailed(node: node, reason: "Could not open '\(path)': No such file or directory")
        }
        if isDirectory.boolValue { throw HotPlugError.openFailed(node: node, reason: "'\(path)' is a directory, not a disk image") }
    }
}
