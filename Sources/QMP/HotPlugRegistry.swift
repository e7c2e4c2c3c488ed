import Machine
import Schema

/// A device `device_add` can hot-plug behind a `pcie-root-port`.
public enum HotPlugDriver: String, Sendable, CaseIterable {
    case virtioBlkPci = "virtio-blk-pci"
    case virtioRngPci = "virtio-rng-pci"
    case virtioKeyboardPci = "virtio-keyboard-pci"
    case virtioTabletPci = "virtio-tablet-pci"
    case virtioNetPci = "virtio-net-pci"

    /// The driver properties `device_add` accepts for it besides driver, id and bus.
    public var properties: [String] {
        switch self {
        case .virtioBlkPci: return ["addr", "drive", "serial"]
        case .virtioNetPci: return ["addr", "netdev", "mac"]
        default: return ["addr"]
        }
    }
}

/// One checked `device_add`: what to build and where. Built by the QMP handler from the
/// command's arguments (driver properties included), executed by the `HotPlugRegistry`.
public struct DeviceAddRequest: Sendable, Equatable {
    public var driver: HotPlugDriver
    /// The device id; nil for an anonymous device (/machine/peripheral-anon/device[N]).
    public var id: String?
    /// The bus: a root port's id, or nil (the root bus pcie.0).
    public var bus: String?
    /// The block node (virtio-blk-pci).
    public var drive: String?
    /// The disk serial (virtio-blk-pci).
    public var serial: String?
    /// The netdev the NIC is connected to (virtio-net-pci); nil: a NIC with no cable.
    public var netdev: String?
    /// The NIC's address (virtio-net-pci); nil: QEMU's default, the first 52:54:00:12:34:XX
    /// from ...:56 up that no NIC has.
    public var mac: MACAddress?

    /// Creates a request.
    public init(driver: HotPlugDriver, id: String? = nil, bus: String? = nil, drive: String? = nil, serial: String? = nil,
                netdev: String? = nil, mac: MACAddress? = nil) {
        self.driver = driver
        self.id = id
        self.bus = bus
        self.drive = drive
        self.serial = serial
        self.netdev = netdev
        self.mac = mac
    }
}

/// One checked `blockdev-add`.
public struct BlockNodeRequest: Sendable, Equatable {
    /// Where a format node's file comes from.
    public enum FileSource: Sendable, Equatable {
        /// A file node given inline (it gets an automatic "#blockN" name).
        case inline(filename: String)
        /// An existing file node, by name.
        case node(String)
    }
    /// What the node is.
    public enum Kind: Sendable, Equatable {
        /// A protocol node over a host file.
        case file(filename: String)
        /// A raw or qcow2 format node.
        case format(driver: String, file: FileSource, noBacking: Bool)
    }
    public var nodeName: String
    public var kind: Kind
    public var readOnly: Bool

    /// Creates a request.
    public init(nodeName: String, kind: Kind, readOnly: Bool) {
        self.nodeName = nodeName
        self.kind = kind
        self.readOnly = readOnly
    }
}

/// A block node as `query-named-block-nodes` reports it.
public struct BlockNodeStatus: Sendable, Equatable {
    public var nodeName: String
    /// "file", "raw" or "qcow2".
    public var driver: String
    public var filename: String
    public var readOnly: Bool
    /// The disk size; for a file node, the file's size.
    public var virtualSize: UInt64
    public var backingFile: String?
    public var backingDepth: Int

    /// Creates a status value.
    public init(nodeName: String, driver: String, filename: String, readOnly: Bool, virtualSize: UInt64,
                backingFile: String? = nil, backingDepth: Int = 0) {
        self.nodeName = nodeName
        self.driver = driver
        self.filename = filename
        self.readOnly = readOnly
        self.virtualSize = virtualSize
        self.backingFile = backingFile
        self.backingDepth = backingDepth
    }
}

/// A device known under /machine/peripheral (a device with an id) or
/// /machine/peripheral-anon (a hot-plugged one without).
public struct PeripheralDevice: Sendable, Equatable {
    /// The id; nil for an anonymous device.
    public var id: String?
    /// Its QOM path.
    public var path: String
    public var driver: String
    public var hotPlugged: Bool
    /// Whether device_del can remove it.
    public var hotPluggable: Bool
    /// Its driver's properties (drive, bus, serial, …) as strings.
    public var properties: [(name: String, value: String)]

    /// Creates a value.
    public init(id: String?, path: String, driver: String, hotPlugged: Bool, hotPluggable: Bool,
                properties: [(name: String, value: String)] = []) {
        self.id = id
        self.path = path
        self.driver = driver
        self.hotPlugged = hotPlugged
        self.hotPluggable = hotPluggable
        self.properties = properties
    }

    public static func == (a: PeripheralDevice, b: PeripheralDevice) -> Bool {
        a.id == b.id && a.path == b.path && a.driver == b.driver && a.hotPlugged == b.hotPlugged
            && a.hotPluggable == b.hotPluggable && a.properties.map(\.name) == b.properties.map(\.name)
            && a.properties.map(\.value) == b.properties.map(\.value)
    }
}

/// Why a hot-plug or block-node request was refused; the machine is unchanged. Mapped to QMP
/// by `QMPError.from`: `deviceNotFound` to DeviceNotFound (as QEMU's device_del), the rest to
/// GenericError. Messages follow QEMU's where there is one.
public enum HotPlugError: Error, Equatable, CustomStringConvertible {
    /// The machine was built without a PCIe host (no PCI device in its description).
    case noPCIe
    /// `driver` names no device model.
    case unknownDriver(String)
    /// The model exists but cannot be hot-plugged.
    case notHotPluggable(String)
    /// A driver property that does not exist.
    case unknownProperty(driver: String, property: String)
    /// A property with a value of the wrong kind or out of range.
    case badProperty(driver: String, property: String, reason: String)
    /// An id that is not an identifier.
    case badID(String)
    /// Another device has this id.
    case duplicateID(String)
    /// No bus has this name.
    case busNotFound(String)
    /// The bus does not support hot-plugging (the root bus).
    case busNoHotplug(String)
    /// The root port's slot holds a device already.
    case slotBusy(bus: String, driver: String, occupant: String)
    /// No device has this id or path.
    case deviceNotFound(String)
    /// The device was built at launch (not behind a root port) and cannot be unplugged.
    case notHotPluggableDevice(String)
    /// A device_del is already waiting for the guest.
    case unplugPending(String)
    /// virtio-blk-pci without `drive`.
    case driveMissing(driver: String)
    /// `drive` names no node.
    case driveNotFound(driver: String, node: String)
    /// `drive` names a node a device uses already.
    case driveInUse(driver: String, node: String, user: String)
    /// `drive` names a file node (we attach format nodes only).
    case driveIsProtocolNode(String)
    /// `netdev` names no netdev (QEMU's qdev wording).
    case netdevNotFound(driver: String, netdev: String)
    /// `netdev` names a netdev another NIC is connected to.
    case netdevInUse(driver: String, netdev: String, user: String)
    /// A property value QEMU's qdev would refuse ("doesn't take value"), with what it expects.
    case badValue(driver: String, property: String, value: String, why: String)
    /// blockdev-add without node-name.
    case nodeNameMissing
    /// A node name that is not an identifier.
    case badNodeName(String)
    /// Another node has this name.
    case duplicateNode(String)
    /// blockdev-del or a `file` reference to a node that does not exist.
    case nodeNotFound(String)
    /// blockdev-del of a node a device or another node uses.
    case nodeBusy(node: String, user: String)
    /// A blockdev-add option that is not supported or is malformed.
    case badNodeOption(String)
    /// Opening the image failed (missing, locked, corrupt, another format).
    case openFailed(node: String, reason: String)
    /// An apply-description that cannot be done live, with the reason.
    case cannotApply(String)
    /// The board refused (should not happen after the checks above).
    case failed(String)

    /// The message.
    public var description: String {
        switch self {
        case .noPCIe: return "The machine has no PCIe bus to hot-plug into: launch it with a pcie-root-port in its devices"
        case .unknownDriver(let d):
            return "'\(d)' is not a valid device model name (hot-pluggable: \(HotPlugDriver.allCases.map(\.rawValue).joined(separator: ", ")))"
        case .notHotPluggable(let d):
            return "Device '\(d)' can not be hotplugged on this machine (hot-pluggable: \(HotPlugDriver.allCases.map(\.rawValue).joined(separator: ", ")))"
        case .unknownProperty(let d, let p): return "Property '\(d).\(p)' not found"
        case .badProperty(let d, let p, let r): return "Property '\(d).\(p)': \(r)"
        case .badID(let id): return "Parameter 'id' expects an identifier (a letter, then letters, digits, '-', '.', '_'), not '\(id)'"
        case .duplicateID(let id): return "Duplicate device ID '\(id)'"
        case .busNotFound(let b): return "Bus '\(b)' not found"
        case .busNoHotplug(let b): return "Bus '\(b)' does not support hotplugging; plug the device into a pcie-root-port with bus=PORT-ID"
        case .slotBusy(let b, let d, let o):
            return "PCI: slot 0 function 0 not available for \(d), in use by \(o) on bus '\(b)'"
        case .deviceNotFound(let id): return "Device '\(id)' not found"
        case .notHotPluggableDevice(let id):
            return "Device '\(id)' was built at launch outside a pcie-root-port and cannot be unplugged"
        case .unplugPending(let id): return "Device '\(id)' is already in the process of unplug"
        case .driveMissing(let d): return "\(d): drive property not set"
        case .driveNotFound(let d, let n): return "Property '\(d).drive' can't find value '\(n)'"
        case .driveInUse(let d, let n, let u): return "Property '\(d).drive' can't take value '\(n)': it is in use by device '\(u)'"
        case .driveIsProtocolNode(let n):
            return "Node '\(n)' is a file node; add a raw or qcow2 node over it with blockdev-add and use that as the drive"
        case .netdevNotFound(let d, let n):
            return "Property '\(d).netdev' can't find value '\(n)' (no netdev has this id; add one with netdev_add)"
        case .netdevInUse(let d, let n, let u):
            return "Property '\(d).netdev' can't take value '\(n)', it's in use (by NIC '\(u)'; a netdev takes one NIC)"
        case .badValue(let d, let p, let v, let w): return "Property '\(d).\(p)' doesn't take value '\(v)' (\(w))"
        case .nodeNameMissing: return "'node-name' must be specified for the root node"
        case .badNodeName(let n): return "Invalid node-name: '\(n)' (a letter, then letters, digits, '-', '.', '_')"
        case .duplicateNode(let n): return "Duplicate nodes with node-name='\(n)'"
        case .nodeNotFound(let n): return "Failed to find node with node-name='\(n)'"
        case .nodeBusy(let n, let u): return "Node '\(n)' is busy: it is in use by \(u)"
        case .badNodeOption(let m): return m
        case .openFailed(let n, let r): return "Could not open node '\(n)': \(r)"
        case .cannotApply(let m): return "The description cannot be applied to the running machine, nothing was changed: \(m)"
        case .failed(let m): return m
        }
    }

    /// QEMU's error class for this refusal.
    public var errorClass: QMPError.ErrorClass {
        if case .deviceNotFound = self { return .deviceNotFound }
        return .genericError
    }

    /// True for QEMU's identifier syntax (ids and node names): a letter, then letters, digits,
    /// '-', '.', '_'; at most 127 characters.
    public static func isIdentifier(_ s: String) -> Bool {
        guard let f = s.unicodeScalars.first, f.isASCIILetter, s.utf8.count <= 127 else { return false }
        return s.unicodeScalars.allSatisfy { $0.isASCIILetter || ("0"..."9").contains($0) || "-._".unicodeScalars.contains($0) }
    }
}

extension Unicode.Scalar {
    fileprivate var isASCIILetter: Bool { ("a"..."z").contains(self) || ("A"..."Z").contains(self) }
}

/// Hot-plug and block nodes, as the QMP commands need them: implemented by whoever built the
/// machine (machine-server). Every member may be called from any thread; the changes happen on
/// the machine's control thread. Requests that fail throw `HotPlugError` and change nothing.
public protocol HotPlugRegistry: AnyObject, Sendable {
    /// Builds the device and plugs it into its root port (the guest is told). Returns once it
    /// is in the slot.
    func addDevice(_ request: DeviceAddRequest) throws
    /// Presses the attention button of the device's slot; DEVICE_DELETED follows when the
    /// guest powered the slot off. `id` is an id or a QOM path.
    func deleteDevice(id: String) throws
    /// Opens an image as a node.
    func addNode(_ request: BlockNodeRequest) throws
    /// Closes a node (and its inline file node).
    func deleteNode(name: String) throws
    /// Every node, format nodes before their file nodes, in the order they were added.
    func nodes() -> [BlockNodeStatus]
    /// The hot-plugged disks, for query-block.
    func hotPluggedDisks() -> [BlockDeviceStatus]
    /// Every device with a QOM path: those of the launch with an id, and the hot-plugged ones.
    func peripherals() -> [PeripheralDevice]
    /// The PCI buses as the guest configured them.
    func pciBuses() -> [PciInfo]
    /// The running machine as a description (the launch one plus the hot-plugged devices).
    func currentDescription() throws -> MachineDescription
    /// Hot-plugs and unplugs to reach `description`, or throws (changing nothing) when any part
    /// of the change cannot be done live.
    func apply(_ description: MachineDescription) throws
}

extension DeviceRegistry {
    /// No hot-plug (the default for registries that do not offer it).
    public var hotPlug: (any HotPlugRegistry)? { nil }
}
