import Foundation
import Machine

/// Why a device request failed: the device the command needs is not there. Mapped to QMP's
/// `DeviceNotFound` class by `QMPError.from`.
public enum DeviceRegistryError: Error, Equatable, CustomStringConvertible {
    /// The machine has no display (no virtio-gpu-device, keyboard or tablet, no VNC).
    case noDisplay
    /// The machine serves no VNC display.
    case noVNC
    /// The machine has no virtio keyboard or tablet to deliver input to.
    case noInputDevice
    /// No display or device has this id.
    case notFound(id: String)

    /// A message saying what is missing and how to get it.
    public var description: String {
        switch self {
        case .noDisplay:
            return "The machine has no display: add a virtio-gpu-device with \"display\": {\"vnc\": ...} (or start with --vnc)"
        case .noVNC:
            return "The machine has no VNC display: start it with \"display\": {\"vnc\": ...} or --vnc"
        case .noInputDevice:
            return "The machine has no input device: add a virtio-keyboard-device or virtio-tablet-device"
        case .notFound(let id):
            return "Device '\(id)' not found"
        }
    }
}

/// One virtio block device and its image, as `query-block` reports it.
public struct BlockDeviceStatus: Sendable, Equatable {
    /// The device id (`devices[i].id`).
    public var id: String
    /// The image file (absolute path).
    public var file: String
    /// "raw" or "qcow2".
    public var format: String
    /// True when the guest cannot write.
    public var readOnly: Bool
    /// The virtual disk size in bytes.
    public var virtualSize: UInt64
    /// Bytes the file occupies on the host, when known.
    public var actualSize: UInt64?
    /// The backing file name as recorded in the image, for an overlay.
    public var backingFile: String?
    /// How many images are chained below this one.
    public var backingDepth: Int
    /// The format node's and file node's names, when the drive has them.
    public var nodeName: String?
    /// The device's I/O statistics, when it keeps them.
    public var statistics: BlockIOStatistics?
    /// True for a disk added with device_add (its nodes are blockdev-add's, listed apart).
    public var hotPlugged = false
    public var fileNodeName: String?

    /// Creates a status value.
    public init(id: String, file: String, format: String, readOnly: Bool, virtualSize: UInt64,
                actualSize: UInt64? = nil, backingFile: String? = nil, backingDepth: Int = 0,
                nodeName: String? = nil, fileNodeName: String? = nil, statistics: BlockIOStatistics? = nil) {
        self.statistics = statistics
        self.nodeName = nodeName
        self.fileNodeName = fileNodeName
        self.id = id
        self.file = file
        self.format = format
        self.readOnly = readOnly
        self.virtualSize = virtualSize
        self.actualSize = actualSize
        self.backingFile = backingFile
        self.backingDepth = backingDepth
    }
}

/// The machine's devices as QMP sees them: the display (screendump, input), the VNC server
/// (query-vnc, passwords) and the block devices (query-block). Implemented by whoever builds
/// the machine (machine-server); every member may be called from any thread.
public protocol DeviceRegistry: AnyObject, Sendable {
    /// The display, or nil when the machine has none.
    var display: Display? { get }
    /// The VNC server showing `display`, or nil when there is none.
    var remoteDisplay: (any RemoteDisplayServer)? { get }
    /// The input device with this id (`devices[i].id`), or nil.
    func inputDevice(id: String) -> (any InputSink)?
    /// Every virtio block device, in slot order.
    func blockDevices() -> [BlockDeviceStatus]
    /// The netdevs and NICs, or nil for a machine without network support.
    var network: (any NetworkRegistry)? { get }
    /// Hot-plug and block nodes (device_add, blockdev-add, query-pci, qom-*), or nil when the
    /// machine offers none.
    var hotPlug: (any HotPlugRegistry)? { get }
    /// The devices the user gave ids, with their QEMU driver names (/machine/peripheral).
    func peripherals() -> [(id: String, driver: String)]
}

extension DeviceRegistry {
    /// Registries that predate networking have none.
    public var network: (any NetworkRegistry)? { nil }
    /// None unless the registry lists them.
    public func peripherals() -> [(id: String, driver: String)] { [] }
}
