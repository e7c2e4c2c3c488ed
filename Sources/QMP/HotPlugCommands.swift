import Machine
import Schema

/// The hot-plug commands (device_add, device_del, qom-list, qom-get, query-pci) and the block
/// node commands (blockdev-add, blockdev-del, query-named-block-nodes): each checks what the
/// schema leaves open (driver properties, node references), builds one typed request and hands
/// it to the `HotPlugRegistry`. Runs on the connection's command queue.
extension QMPCommandExecutor {
    private func hotPlug() throws -> any HotPlugRegistry {
        guard let h = devices?.hotPlug else { throw HotPlugError.noPCIe }
        return h
    }

    /// Checks the arguments as QEMU's qdev does and turns them into a request.
    static func deviceAddRequest(_ a: DeviceAddArguments) throws(HotPlugError) -> DeviceAddRequest {
        // QEMU's modern-only name for virtio-blk-pci (libvirt's model='virtio-non-transitional'):
        // machine-server's virtio-pci devices are all modern-only.
        let name = a.driver == QEMUCapabilities.nonTransitionalBlock ? HotPlugDriver.virtioBlkPci.rawValue : a.driver
        guard let driver = HotPlugDriver(rawValue: name) else {
            let known = ["virtio-blk-device", "virtio-gpu-device", "virtio-keyboard-device", "virtio-tablet-device",
                         "virtio-rng-device", "virtio-net-device", "virtio-gpu-pci", "pcie-root-port"]
            throw known.contains(a.driver) ? .notHotPluggable(a.driver) : .unknownDriver(a.driver)
        }
        if let id = a.id, !HotPlugError.isIdentifier(id) { throw .badID(id) }
        var request = DeviceAddRequest(driver: driver, id: a.id, bus: a.bus)
        for m in a.extraMembers {
            guard driver.properties.contains(m.key) else {
                throw .unknownProperty(driver: driver.rawValue, property: m.key)
            }
            func string() throws(HotPlugError) -> String {
                guard case .string(let s) = m.value else {
                    throw .badProperty(driver: driver.rawValue, property: m.key, reason: "expects a string")
                }
                return s
            }
            switch m.key {
            case "addr":
                // Behind a root port only device 0 exists: "0", "00", "0.0", "0x0" or 0.
                let ok: Bool
                switch m.value {
                case .int(let n): ok = n == 0
                case .string(let s):
                    var t = Substring(s.lowercased())
                    if t.hasPrefix("0x") { t = t.dropFirst(2) }
                    let parts = t.split(separator: ".", omittingEmptySubsequences: false)
                    ok = (1...2).contains(parts.count) && parts.allSatisfy { !$0.isEmpty && Int($0, radix: 16) == 0 }
                default: ok = false
                }
                guard ok else {
                    throw .badProperty(driver: driver.rawValue, property: "addr",
                                       reason: "a pcie-root-port has one slot, 0 (write \"0\" or \"0.0\"), not \(m.value)")
                }
            case "drive": request.drive = try string()
            case "netdev": request.netdev = try string()
            case "mac":
                let text = try string()
                guard let mac = MACAddress(text) else {
                    throw .badValue(driver: driver.rawValue, property: "mac", value: text,
                                    why: "expected six hex bytes separated by ':', e.g. 52:54:00:12:34:56")
                }
                guard !mac.isMulticast else {
                    throw .badValue(driver: driver.rawValue, property: "mac", value: text,
                                    why: "it is a multicast address; a NIC needs a unicast one, with an even first byte")
                }
                request.mac = mac
            case "serial":
                let s = try string()
                guard s.utf8.count <= 20 else {
                    throw .badProperty(driver: driver.rawValue, property: "serial", reason: "at most 20 bytes")
                }
                request.serial = s
            default: break
            }
        }
        if driver == .virtioBlkPci && request.drive == nil { throw .driveMissing(driver: driver.rawValue) }
        return request
    }

    /// Hot-plugs a device behind a pcie-root-port.
    public func deviceAdd(_ arguments: DeviceAddArguments) throws {
        let request = try Self.deviceAddRequest(arguments)
        try hotPlug().addDevice(request)
    }

    /// Asks the guest to release a hot-plugged device (DEVICE_DELETED follows).
    public func deviceDel(_ arguments: DeviceDelArguments) throws {
        try hotPlug().deleteDevice(id: arguments.id)
    }

    /// Turns blockdev-add's options into a request.
    static func blockNodeRequest(_ o: BlockdevOptions) throws(HotPlugError) -> BlockNodeRequest {
        guard let name = o.nodeName else { throw .nodeNameMissing }
        guard HotPlugError.isIdentifier(name) else { throw .badNodeName(name) }
        func fileSource(_ v: JSONValue) throws(HotPlugError) -> BlockNodeRequest.FileSource {
            switch v {
            case .string(let n): return .node(n)
            case .object:
                let inner: BlockdevOptions
                do {
                    inner = try BlockdevOptions(json: v, at: SchemaPath.root.member("file"))
                } catch {
                    throw .badNodeOption(error.qmpDescription)
                }
                guard case .file(let f) = inner.variant else {
                    throw .badNodeOption("Parameter 'file.driver': only a file node can be given inline here (\"driver\": \"file\")")
                }
                if let n = inner.nodeName {
                    throw .badNodeOption("Parameter 'file.node-name': name the file node with its own blockdev-add, or leave the name out here (given '\(n)')")
                }
                return .inline(filename: f.filename)
            default:
                throw .badNodeOption("Parameter 'file' expects a node name or a file node's options ({\"driver\": \"file\", \"filename\": ...})")
            }
        }
        if o.discard == .ignore {
            throw .badNodeOption("Parameter 'discard': 'ignore' is not supported; the disks pass the guest's discard requests to the image ('unmap')")
        }
        switch o.variant {
        case .file(let f):
            return BlockNodeRequest(nodeName: name, kind: .file(filename: f.filename), readOnly: o.readOnly)
        case .raw(let r):
            return BlockNodeRequest(nodeName: name, kind: .format(driver: "raw", file: try fileSource(r.file), noBacking: false),
                                    readOnly: o.readOnly)
        case .qcow2(let q):
            var noBacking = false
            switch q.backing {
            case nil: break
            case .null?: noBacking = true
            case .string(let n)?:
                throw .badNodeOption("Parameter 'backing': a backing node ('\(n)') cannot be chosen; the backing chain is the one the image's header names (leave 'backing' out)")
            default:
                throw .badNodeOption("Parameter 'backing' expects null or is left out; the backing chain is the one the image's header names")
            }
            return BlockNodeRequest(nodeName: name, kind: .format(driver: "qcow2", file: try fileSource(q.file), noBacking: noBacking),
                                    readOnly: o.readOnly)
        }
    }

    /// Opens an image as a named node.
    public func blockdevAdd(_ arguments: BlockdevOptions) throws {
        let request = try Self.blockNodeRequest(arguments)
        try hotPlug().addNode(request)
    }

    /// Closes a node.
    public func blockdevDel(_ arguments: BlockdevDelArguments) throws {
        try hotPlug().deleteNode(name: arguments.nodeName)
    }

    /// The named nodes in QEMU's BlockDeviceInfo shape: the description's, then blockdev-add's.
    public func queryNamedBlockNodes(_ arguments: QueryNamedBlockNodesArguments) throws -> [BlockDeviceInfo] {
        launchBlockNodes() + (devices?.hotPlug?.nodes() ?? []).map { n in
            let image = ImageInfo(filename: n.filename, format: n.driver, virtualSize: Int64(clamping: n.virtualSize),
                                  backingFilename: n.backingFile)
            return BlockDeviceInfo(file: n.filename, nodeName: n.nodeName, ro: n.readOnly, drv: n.driver,
                                   backingFile: n.backingFile, backingFileDepth: Int64(n.backingDepth), encrypted: false,
                                   image: image)
        }
    }

    /// The running machine as a description.
    public func queryDescription() throws -> MachineDescription { try hotPlug().currentDescription() }

    /// Hot-plugs and unplugs to reach the description, or refuses the whole change.
    public func applyDescription(_ arguments: ApplyDescriptionArguments) throws {
        try hotPlug().apply(arguments.description)
    }

    /// The PCI buses (an empty list for a machine without PCIe).
    public func queryPci() throws -> [PciInfo] { devices?.hotPlug?.pciBuses() ?? [] }

    /// HMP `info qtree`, in QEMU's layout, from what exists: the system bus's devices are the
    /// memory map's device windows (`mmio BASE/SIZE`), the PCIe host's buses are query-pci's
    /// (each function with its driver from the QOM peripherals when it has an id, its class
    /// otherwise, and `addr`), root ports with the bus behind them.
    func hmpQtree() throws -> String {
        let peripherals = devices?.hotPlug?.peripherals() ?? []
        var out = "bus: main-system-bus\r\n  type System\r\n"
        for r in control.memoryMap() where !r.isRAM {
            out += "  dev: \(r.name), id \"\"\r\n    mmio \(Self.hex16(r.base))/\(Self.hex16(r.size))\r\n"
        }
        func hex(_ v: Int64, _ width: Int) -> String {
            let t = String(v, radix: 16)
            return String(repeating: "0", count: max(0, width - t.count)) + t
        }
        func functions(_ list: [PciDeviceInfo], busName: String, indent: String) {
            out += "\(indent)bus: \(busName)\r\n\(indent)  type PCIE\r\n"
            for f in list where !(f.bus == 0 && f.slot == 0) {
                let driver = peripherals.first { !f.qdevId.isEmpty && $0.id == f.qdevId }?.driver ?? (f.classInfo.desc ?? "pci-device")
                out += "\(indent)  dev: \(driver), id \"\(f.qdevId)\"\r\n"
                out += "\(indent)    addr = \(hex(f.slot, 2)).\(hex(f.function, 1))\r\n"
                out += "\(indent)    class \(f.classInfo.desc ?? hex(f.classInfo.class, 4)), addr \(hex(f.bus, 2)):\(hex(f.slot, 2)).\(hex(f.function, 1)), pci id \(hex(f.id.vendor, 4)):\(hex(f.id.device, 4))\r\n"
                if let b = f.pciBridge {
                    functions(b.devices ?? [], busName: f.qdevId.isEmpty ? "pci.\(b.bus.secondary)" : f.qdevId, indent: indent + "    ")
                }
            }
        }
        if let root = try queryPci().first {
            out += "  dev: gpex-pcihost, id \"\"\r\n"
            functions(root.devices, busName: "pcie.0", indent: "    ")
        }
        return out
    }

    /// The object at a QOM path this server knows.
    private enum QOMObject {
        case machine, peripheral(anonymous: Bool), device(PeripheralDevice)
    }

    private func qomObject(_ path: String) throws -> QOMObject {
        let trimmed = path.hasSuffix("/") && path.count > 1 ? String(path.dropLast()) : path
        switch trimmed {
        case "/machine": return .machine
        case "/machine/peripheral": return .peripheral(anonymous: false)
        case "/machine/peripheral-anon": return .peripheral(anonymous: true)
        default:
            if let d = (devices?.hotPlug?.peripherals() ?? []).first(where: { $0.path == trimmed }) { return .device(d) }
            throw QMPError(.deviceNotFound, "Device '\(path)' not found")
        }
    }

    /// The properties of /machine, /machine/peripheral[-anon] or a device.
    public func qomList(_ arguments: QomListArguments) throws -> [ObjectPropertyInfo] {
        let all = devices?.hotPlug?.peripherals() ?? []
        switch try qomObject(arguments.path) {
        case .machine:
            return [ObjectPropertyInfo(name: "type", type: "string"),
                    ObjectPropertyInfo(name: "peripheral", type: "child<container>"),
                    ObjectPropertyInfo(name: "peripheral-anon", type: "child<container>")]
        case .peripheral(let anonymous):
            return [ObjectPropertyInfo(name: "type", type: "string")]
                + all.filter { ($0.id == nil) == anonymous }.map {
                    ObjectPropertyInfo(name: String($0.path.split(separator: "/").last ?? ""), type: "child<\($0.driver)>")
                }
        case .device(let d):
            return [ObjectPropertyInfo(name: "type", type: "string"),
                    ObjectPropertyInfo(name: "realized", type: "bool"),
                    ObjectPropertyInfo(name: "hotplugged", type: "bool"),
                    ObjectPropertyInfo(name: "hotpluggable", type: "bool")]
                + d.properties.map { ObjectPropertyInfo(name: $0.name, type: "str") }
        }
    }

    /// One property of /machine, /machine/peripheral[-anon] or a device.
    public func qomGet(_ arguments: QomGetArguments) throws -> JSONValue {
        let object = try qomObject(arguments.path)
        func notFound() -> QMPError { QMPError(.genericError, "Property '\(arguments.property)' not found at '\(arguments.path)'") }
        switch object {
        case .machine:
            guard arguments.property == "type" else { throw notFound() }
            return .string("virt-machine")
        case .peripheral:
            guard arguments.property == "type" else { throw notFound() }
            return .string("container")
        case .device(let d):
            switch arguments.property {
            case "type": return .string(d.driver)
            case "realized": return .bool(true)
            case "hotplugged": return .bool(d.hotPlugged)
            case "hotpluggable": return .bool(d.hotPluggable)
            default:
                guard let p = d.properties.first(where: { $0.name == arguments.property }) else { throw notFound() }
                return .string(p.value)
            }
        }
    }

    // MARK: HMP

    /// HMP `device_add DRIVER,key=value,...`, `device_del ID`, `info pci`, `info block`; nil
    /// for any other command line.
    func hotPlugHMP(_ words: [String]) throws -> String? {
        switch (words.first, words.count) {
        case ("device_add", 2):
            var arguments = JSONObject()
            let items = words[1].split(separator: ",", omittingEmptySubsequences: false)
            arguments["driver"] = .string(String(items[0]))
            for item in items.dropFirst() {
                guard let eq = item.firstIndex(of: "=") else {
                    return "Error: device_add: '\(item)' is not KEY=VALUE\r\n"
                }
                arguments[String(item[..<eq])] = .string(String(item[item.index(after: eq)...]))
            }
            return try hmp { try deviceAdd(DeviceAddArguments(json: .object(arguments), at: .root)) }
        case ("device_add", _):
            return "Error: usage: device_add DRIVER[,PROP=VALUE[,...]]\r\n"
        case ("device_del", 2):
            return try hmp { try deviceDel(DeviceDelArguments(id: words[1])) }
        case ("device_del", _):
            return "Error: usage: device_del ID\r\n"
        case ("info", 2) where words[1] == "pci":
            return Self.renderPCI(try queryPci())
        case ("info", 2) where words[1] == "block":
            var out = ""
            for b in try queryBlock() {
                guard let i = b.inserted else { continue }
                out += "\(b.device): \(i.file) (\(i.drv)\(i.ro ? ", read-only" : ""))\r\n"
                out += "    Attached to:      \(b.qdev ?? b.device)\r\n"
                if let bf = i.backingFile { out += "    Backing file:     \(bf) (chain depth: \(i.backingFileDepth))\r\n" }
                out += "\r\n"
            }
            for n in try queryNamedBlockNodes(QueryNamedBlockNodesArguments()) where !(n.nodeName ?? "").hasPrefix("#") {
                out += "\(n.nodeName ?? ""): \(n.file) (\(n.drv)\(n.ro ? ", read-only" : ""))\r\n"
            }
            return out
        default:
            return nil
        }
    }

    /// Runs `body` and gives HMP's answer: nothing on success, "Error: MESSAGE" on failure.
    private func hmp(_ body: () throws -> Void) throws -> String {
        do {
            try body()
            return ""
        } catch {
            return "Error: \(QMPError.from(error).desc)\r\n"
        }
    }

    /// QEMU's `info pci` layout.
    static func renderPCI(_ buses: [PciInfo]) -> String {
        var out = ""
        func hex(_ v: Int64, _ width: Int) -> String {
            let s = String(UInt64(bitPattern: v), radix: 16)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        func device(_ d: PciDeviceInfo) {
            out += "  Bus \(String(repeating: " ", count: max(0, 2 - String(d.bus).count)))\(d.bus), device \(String(repeating: " ", count: max(0, 3 - String(d.slot).count)))\(d.slot), function \(d.function):\r\n"
            out += "    \(d.classInfo.desc ?? "Class \(hex(d.classInfo.class, 4))"): PCI device \(hex(d.id.vendor, 4)):\(hex(d.id.device, 4))\r\n"
            if let sv = d.id.subsystemVendor, let s = d.id.subsystem {
                out += "      PCI subsystem \(hex(sv, 4)):\(hex(s, 4))\r\n"
            }
            if let pin = d.irqPin, pin > 0, let irq = d.irq {
                out += "      IRQ \(irq), pin \(Character(UnicodeScalar(UInt8(64 + min(pin, 4)))))\r\n"
            }
            if let b = d.pciBridge {
                out += "      BUS \(b.bus.number).\r\n      secondary bus \(b.bus.secondary).\r\n      subordinate bus \(b.bus.subordinate).\r\n"
                out += "      IO range [0x\(hex(b.bus.ioRange.base, 4)), 0x\(hex(b.bus.ioRange.limit, 4))]\r\n"
                out += "      memory range [0x\(hex(b.bus.memoryRange.base, 8)), 0x\(hex(b.bus.memoryRange.limit, 8))]\r\n"
                out += "      prefetchable memory range [0x\(hex(b.bus.prefetchableRange.base, 8)), 0x\(hex(b.bus.prefetchableRange.limit, 8))]\r\n"
            }
            for r in d.regions {
                if r.type == "io" {
                    out += "      BAR\(r.bar): I/O at 0x\(hex(r.address, 4)) [0x\(hex(r.address + r.size - 1, 4))].\r\n"
                } else {
                    out += "      BAR\(r.bar): \(r.memType64 == true ? 64 : 32) bit\(r.prefetch == true ? " prefetchable" : "") memory at 0x\(hex(r.address, 8)) [0x\(hex(r.address &+ r.size &- 1, 8))].\r\n"
                }
            }
            out += "      id \"\(d.qdevId)\"\r\n"
            for child in d.pciBridge?.devices ?? [] { device(child) }
        }
        for bus in buses { for d in bus.devices { device(d) } }
        return out
    }
}
