import Board
import Devices
import Foundation
import Schema

/// One device of the description, checked: ids unique, files present, limits respected.
/// A plain value built on the main thread by `LaunchPlan`; `MachineDevices` turns it into
/// live devices.
struct PlannedDevice: Equatable {
    /// What the device is.
    enum Kind: Equatable {
        /// virtio-blk over an image file (absolute path) in `format`.
        case block(file: String, format: DriveFormat, readOnly: Bool)
        /// virtio-gpu (2D) publishing to the machine's display.
        case gpu
        /// virtio-input keyboard fed from the display.
        case keyboard
        /// virtio-input tablet (absolute pointer) fed from the display.
        case tablet
        /// virtio-rng fed from the host's entropy.
        case rng
        /// A pcie-root-port with a hot-plug slot showing `physicalSlot`.
        case rootPort(physicalSlot: Int)
        /// virtio-net with this MAC, on the netdev with this id (nil: no cable).
        case net(netdev: String?, mac: [UInt8])
    }

    /// Which transport carries the device.
    enum Transport: Equatable {
        /// A virtio-mmio slot (the `-device` drivers).
        case mmio
        /// In `slot`.`function` of the PCIe root bus `pcie.0` (the `-pci` drivers and root ports).
        case pci(slot: Int, function: Int = 0)
        /// In the slot of the root port with this id.
        case pciPort(String)
    }

    /// The device's id (`devices[i].id`), or a generated name ("virtio-gpu-device#0") when none was given.
    var id: String
    /// Whether `id` was given in the description (and so may be looked up over QMP).
    var hasExplicitID: Bool
    var kind: Kind
    var transport: Transport = .mmio
    /// QEMU's `multifunction` property (function 0 of a slot with other functions).
    var multifunction = false
    /// The drive's block node names (format node, file node), when the description names them.
    var nodeName: String? = nil
    var fileNodeName: String? = nil
    /// Where it came from, for messages: "devices[2]", or "display.vnc" for devices the VNC
    /// display added.
    var origin: String

    /// The QEMU driver name ("virtio-blk-device", "virtio-blk-pci", …).
    var driver: String {
        let pci = transport != .mmio
        switch kind {
        case .block: return (pci ? DeviceDriver.virtioBlkPci : .virtioBlkDevice).rawValue
        case .gpu: return (pci ? DeviceDriver.virtioGpuPci : .virtioGpuDevice).rawValue
        case .keyboard: return (pci ? DeviceDriver.virtioKeyboardPci : .virtioKeyboardDevice).rawValue
        case .tablet: return (pci ? DeviceDriver.virtioTabletPci : .virtioTabletDevice).rawValue
        case .rng: return (pci ? DeviceDriver.virtioRngPci : .virtioRngDevice).rawValue
        case .rootPort: return DeviceDriver.pcieRootPort.rawValue
        case .net: return (pci ? DeviceDriver.virtioNetPci : .virtioNetDevice).rawValue
        }
    }

    /// The slot on the root bus, for devices there.
    var pciSlotNumber: Int? {
        if case .pci(let slot, _) = transport { return slot }
        return nil
    }

    /// The function in its slot on the root bus (0 elsewhere).
    var pciFunctionNumber: Int {
        if case .pci(_, let function) = transport { return function }
        return 0
    }

    /// Where the device is on the PCIe bus, for the state identity: "0x3" on the root bus, or
    /// the root port's id.
    var pciLocation: String? {
        switch transport {
        case .mmio: return nil
        case .pci(let slot, let function):
            return "0x\(String(slot, radix: 16))" + (function == 0 ? "" : ".\(function)")
        case .pciPort(let port): return port
        }
    }

    /// The number of virtio-mmio slots on the `virt` board.
    static let slotCount = 8
    /// The PCIe root bus's name, as QEMU's `virt` calls it.
    static let rootBus = "pcie.0"
    /// Device numbers on the root bus (0 holds the host bridge, as QEMU's gpex-root).
    static let pciSlots = 1...31

    /// Where a PCI device asked to go.
    enum PCIRequest: Equatable {
        /// The root bus, in this slot and function, or function 0 of the lowest free slot.
        case root(slot: Int?, function: Int)
        /// Behind the root port with this id.
        case port(String)
    }

    /// Checks `bus` (the root bus or a root port listed earlier, in `ports`) and parses `addr` as
    /// QEMU does ("SLOT[.FN]" in hex, an optional 0x). Root ports go on the root bus only.
    static func pciAddress(bus: String?, addr: String?, field: String, ports: [String: Int],
                           isPort: Bool = false) throws -> PCIRequest {
        if let bus, bus != rootBus {
            guard ports[bus] != nil, !isPort else { throw LaunchError("\(field).bus: Bus '\(bus)' not found") }
            if let addr, try parseSlot(addr, field: field, range: 0...0) != (0, 0) {
                throw LaunchError("\(field).addr: a root port has one slot, 0, with one function")
            }
            return .port(bus)
        }
        guard let addr else { return .root(slot: nil, function: 0) }
        let (slot, function) = try parseSlot(addr, field: field, range: pciSlots)
        return .root(slot: slot, function: function)
    }

    /// Parses QEMU's `addr`: "SLOT" or "SLOT.FUNCTION", each in hex with an optional 0x
    /// ("0x1.0x1", "01.1"); the function is 0…7.
    static func parseSlot(_ addr: String, field: String, range: ClosedRange<Int>) throws -> (slot: Int, function: Int) {
        func hex(_ part: Substring) -> Int? {
            let digits = part.hasPrefix("0x") ? part.dropFirst(2) : part
            guard !digits.isEmpty, digits.count <= 2 else { return nil }
            return Int(digits, radix: 16)
        }
        let parts = Substring(addr.lowercased()).split(separator: ".", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let slot = hex(parts[0]) else {
            throw LaunchError("\(field).addr: '\(addr)' is not a PCI address; write SLOT or SLOT.FUNCTION in hex, e.g. '0x3' or '03.1'")
        }
        let function = parts.count == 2 ? hex(parts[1]) : 0
        guard let function else {
            throw LaunchError("\(field).addr: '\(addr)' is not a PCI address; write SLOT or SLOT.FUNCTION in hex, e.g. '0x3' or '03.1'")
        }
        guard slot < 32 && function < 8 else {
            throw LaunchError("\(field).addr: Property 'addr' doesn't take value '\(addr)' (slot 0...1f, function 0...7)")
        }
        guard range.contains(slot) else {
            throw LaunchError(slot == 0 ? "\(field).addr: PCI: slot 0 function \(function) not available, in use by gpex-root"
                                        : "\(field).addr: slot \(slot) is outside the bus (\(range.lowerBound)...\(range.upperBound))")
        }
        return (slot, function)
    }

    /// QEMU's rules for the functions of a root-bus slot, checked in description order as QEMU
    /// realizes devices: a function above 0 after a single-function function 0 is refused, and
    /// a single-function function 0 after functions above 0 of its slot.
    private static func checkMultifunction(_ planned: [PlannedDevice]) throws {
        var slots: [Int: [(index: Int, function: Int)]] = [:]
        for (i, p) in planned.enumerated() {
            if case .pci(let slot, let function) = p.transport { slots[slot, default: []].append((i, function)) }
        }
        for (slot, members) in slots {
            guard let zero = members.first(where: { $0.function == 0 }), !planned[zero.index].multifunction,
                  let other = members.filter({ $0.function != 0 }).min(by: { $0.index < $1.index }) else { continue }
            if other.index > zero.index {
                throw LaunchError("\(planned[other.index].origin).addr: \(PCIError.singleFunction(slot, function: other.function))")
            }
            throw LaunchError("\(planned[zero.index].origin).addr: \(PCIError.singleFunctionButPopulated(slot, function: other.function))")
        }
    }

    /// Checks a block device's drive and returns its kind; `files` remembers which device owns
    /// each image.
    private static func block(_ drive: DriveDescription, field: String, index: Int, files: inout [String: Int],
                              resolve: (String) -> String) throws -> Kind {
        let file = resolve(drive.file)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: file, isDirectory: &isDirectory) else {
            throw LaunchError("\(field).drive.file: '\(file)' does not exist")
        }
        guard !isDirectory.boolValue else {
            throw LaunchError("\(field).drive.file: '\(file)' is a directory, not a disk image")
        }
        let canonical = URL(fileURLWithPath: file).resolvingSymlinksInPath().path
        if let other = files[canonical] {
            throw LaunchError("\(field).drive.file: '\(file)' is already the image of devices[\(other)]; one image cannot back two devices")
        }
        files[canonical] = index
        return .block(file: file, format: drive.format, readOnly: drive.readOnly)
    }

    /// Checks the description's devices and returns them in slot order, followed by the GPU,
    /// keyboard and tablet a VNC display adds when no GPU is listed.
    ///
    /// - `resolve` makes a description path absolute.
    /// - `vnc` is the VNC display's origin ("display.vnc" or "--vnc") when one is configured.
    /// Throws `LaunchError` naming `devices[i]` and the member at fault.
    static func plan(_ devices: [DeviceDescription], vnc: String?, netdevs: [String] = [],
                     resolve: (String) -> String) throws -> [PlannedDevice] {
        var planned: [PlannedDevice] = []
        var ids: [String: Int] = [:]
        var files: [String: Int] = [:]
        var pciSlotOwners: [PCIRootAddress: Int] = [:]  // slot.function -> devices[i]
        var pciRequests: [Int: PCIRootAddress?] = [:]    // index in `planned` -> slot.function asked for
        var multifunctions: Set<Int> = []                // indexes in `planned` with multifunction=on
        var ports: [String: Int] = [:]            // root port id -> devices[i]
        var portChildren: [String: Int] = [:]     // root port id -> devices[i] plugged into it
        var portRequests: [Int: String] = [:]     // index in `planned` -> root port id
        var netdevUsers: [String: Int] = [:]      // netdev id -> devices[i] of the NIC using it
        var nicCount = 0
        /// Checks a NIC's netdev and MAC (QEMU's default MAC counts up from 52:54:00:12:34:56).
        func nic(netdev: String?, mac: String?, field: String, driver: String) throws -> Kind {
            if let netdev {
                guard netdevs.contains(netdev) else {
                    throw LaunchError("\(field).netdev: Property '\(driver).netdev' can't find value '\(netdev)' (netdevs has no such id)")
                }
                if let other = netdevUsers[netdev] {
                    throw LaunchError("\(field).netdev: Property '\(driver).netdev' can't use value '\(netdev)', it's in use by devices[\(other)]")
                }
            }
            let address: [UInt8]
            if let mac {
                guard let m = VirtioNet.parseMAC(mac) else {
                    throw LaunchError("\(field).mac: '\(mac)' is not a MAC address (six hex bytes separated by ':', e.g. 52:54:00:12:34:56)")
                }
                guard m[0] & 1 == 0 else { throw LaunchError("\(field).mac: '\(mac)' is a multicast address; a NIC needs a unicast one") }
                address = m
            } else {
                address = [0x52, 0x54, 0x00, 0x12, 0x34, UInt8(truncatingIfNeeded: 0x56 + nicCount)]
            }
            nicCount += 1
            return .net(netdev: netdev, mac: address)
        }
        for (i, d) in devices.enumerated() {
            let field = "devices[\(i)]"
            let kind: Kind
            let explicitID: String?
            var pciRequest: PCIRequest?       // nil: a virtio-mmio device
            var multifunction = false
            switch d.variant {
            case .virtioBlkDevice(let o):
                explicitID = o.id
                kind = try block(o.drive, field: field, index: i, files: &files, resolve: resolve)
            case .virtioGpuDevice(let o):
                explicitID = o.id
                kind = .gpu
            case .virtioKeyboardDevice(let o):
                explicitID = o.id
                kind = .keyboard
            case .virtioTabletDevice(let o):
                explicitID = o.id
                kind = .tablet
            case .virtioRngDevice(let o):
                explicitID = o.id
                kind = .rng
            case .virtioNetDevice(let o):
                explicitID = o.id
                kind = try nic(netdev: o.netdev, mac: o.mac, field: field, driver: d.driver.rawValue)
            case .virtioNetPci(let o):
                explicitID = o.id
                kind = try nic(netdev: o.netdev, mac: o.mac, field: field, driver: d.driver.rawValue)
                pciRequest = try pciAddress(bus: o.bus, addr: o.addr, field: field, ports: ports)
                multifunction = o.multifunction ?? false
            case .virtioBlkPci(let o):
                explicitID = o.id
                kind = try block(o.drive, field: field, index: i, files: &files, resolve: resolve)
                pciRequest = try pciAddress(bus: o.bus, addr: o.addr, field: field, ports: ports)
                multifunction = o.multifunction ?? false
            case .virtioGpuPci(let o), .virtioKeyboardPci(let o), .virtioTabletPci(let o), .virtioRngPci(let o):
                explicitID = o.id
                switch d.driver {
                case .virtioGpuPci: kind = .gpu
                case .virtioKeyboardPci: kind = .keyboard
                case .virtioTabletPci: kind = .tablet
                default: kind = .rng
                }
                pciRequest = try pciAddress(bus: o.bus, addr: o.addr, field: field, ports: ports)
                multifunction = o.multifunction ?? false
            case .pcieRootPort(let o):
                explicitID = o.id
                if let slot = o.slot, !(0...8191).contains(slot) {
                    throw LaunchError("\(field).slot: \(slot) is outside 0...8191")
                }
                kind = .rootPort(physicalSlot: Int(o.slot ?? Int64(ports.count + 1)))
                pciRequest = try pciAddress(bus: o.bus, addr: o.addr, field: field, ports: ports, isPort: true)
                multifunction = o.multifunction ?? false
                if ports[o.id] != nil || ids[o.id] != nil {
                    throw LaunchError("\(field).id: '\(o.id)' is already the id of devices[\(ports[o.id] ?? ids[o.id]!)]")
                }
                ports[o.id] = i
            }
            if case .net(let netdev?, _) = kind { netdevUsers[netdev] = i }
            if kind == .gpu {
                if let first = planned.firstIndex(where: { $0.kind == .gpu }) {
                    throw LaunchError("\(field): only one GPU is supported (devices[\(first)] is one already)")
                }
                guard vnc != nil else {
                    throw LaunchError("\(field): a \(d.driver.rawValue) needs a display to show it on: add \"display\": {\"vnc\": {\"listen\": \"127.0.0.1:5900\"}} or --vnc HOST:PORT")
                }
            }
            switch pciRequest {
            case nil: break
            case .root(let slot, let function)?:
                var wanted: PCIRootAddress?
                if let slot {
                    let address = PCIRootAddress(slot: slot, function: function)
                    if let other = pciSlotOwners[address] {
                        throw LaunchError("\(field).addr: PCI: slot \(slot) function \(function) not available for \(d.driver.rawValue), in use by devices[\(other)]")
                    }
                    pciSlotOwners[address] = i
                    wanted = address
                }
                pciRequests[planned.count] = wanted
                if multifunction { multifunctions.insert(planned.count) }
            case .port(let port)?:
                if multifunction {
                    throw LaunchError("\(field).multifunction: a root port's slot has one function; multifunction is for the root bus")
                }
                if let other = portChildren[port] {
                    throw LaunchError("\(field).bus: PCI: slot 0 function 0 not available for \(d.driver.rawValue), in use by devices[\(other)]")
                }
                portChildren[port] = i
                portRequests[planned.count] = port
            }
            if let id = explicitID {
                guard !id.isEmpty else { throw LaunchError("\(field).id: an id must not be empty") }
                if let other = ids[id] {
                    throw LaunchError("\(field).id: '\(id)' is already the id of devices[\(other)]")
                }
                ids[id] = i
            }
            var p = PlannedDevice(id: explicitID ?? "\(d.driver.rawValue)#\(i)", hasExplicitID: explicitID != nil,
                                  kind: kind, origin: field)
            switch d.variant {
            case .virtioBlkDevice(let o): (p.nodeName, p.fileNodeName) = (o.drive.nodeName, o.drive.fileNodeName)
            case .virtioBlkPci(let o): (p.nodeName, p.fileNodeName) = (o.drive.nodeName, o.drive.fileNodeName)
            default: break
            }
            planned.append(p)
        }
        // PCI devices without an address take function 0 of the lowest slot with no function
        // taken, in order, after the explicit ones.
        for (index, wanted) in pciRequests.sorted(by: { $0.key < $1.key }) {
            let taken = Set(pciSlotOwners.keys.map(\.slot))
            guard let address = wanted ?? pciSlots.first(where: { !taken.contains($0) }).map({ PCIRootAddress(slot: $0) }) else {
                throw LaunchError("\(planned[index].origin): no free slot is left on the PCIe root bus")
            }
            pciSlotOwners[address] = index
            planned[index].transport = .pci(slot: address.slot, function: address.function)
            planned[index].multifunction = multifunctions.contains(index)
        }
        try checkMultifunction(planned)
        for (index, port) in portRequests { planned[index].transport = .pciPort(port) }
        let mmioCount = planned.filter { $0.transport == .mmio }.count
        if mmioCount > slotCount {
            let extra = planned.filter { $0.transport == .mmio }[slotCount]
            throw LaunchError("\(extra.origin): the virt board has \(slotCount) virtio-mmio slots; \(mmioCount) virtio-mmio devices are listed")
        }
        if let vnc, !planned.contains(where: { $0.kind == .gpu }) {
            // A user who asks for VNC expects a screen: add what a graphical console needs.
            var added: [PlannedDevice] = [PlannedDevice(id: "virtio-gpu-device#auto", hasExplicitID: false, kind: .gpu, origin: vnc)]
            if !planned.contains(where: { $0.kind == .keyboard }) {
                added.append(PlannedDevice(id: "virtio-keyboard-device#auto", hasExplicitID: false, kind: .keyboard, origin: vnc))
            }
            if !planned.contains(where: { $0.kind == .tablet }) {
                added.append(PlannedDevice(id: "virtio-tablet-device#auto", hasExplicitID: false, kind: .tablet, origin: vnc))
            }
            if mmioCount + added.count > slotCount {
                throw LaunchError("\(vnc): the VNC display adds \(added.map(\.driver).joined(separator: ", ")), but with the \(mmioCount) listed virtio-mmio devices that exceeds the board's \(slotCount) virtio-mmio slots; list a virtio-gpu-device yourself or remove a device")
            }
            planned += added
        }
        return planned
    }
}
