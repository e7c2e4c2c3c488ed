import Machine

/// Feature bits, status bits and device IDs shared by every virtio device and transport
/// (virtio 1.2, sections 2.1, 5 and 6).
public enum Virtio {
    /// `VIRTIO_F_VERSION_1` (bit 32): the device is modern. Always offered and required here.
    public static let featureVersion1: UInt64 = 1 << 32
    /// `VIRTIO_F_RING_INDIRECT_DESC` (bit 28): indirect descriptor tables.
    public static let featureIndirectDescriptors: UInt64 = 1 << 28
    /// `VIRTIO_F_RING_EVENT_IDX` (bit 29): `used_event` / `avail_event` notification suppression.
    public static let featureEventIndex: UInt64 = 1 << 29
    /// Transport-level features every virtqueue implementation here supports.
    public static let transportFeatures: UInt64 = featureVersion1 | featureIndirectDescriptors | featureEventIndex

    /// Device status bits (section 2.1).
    public enum Status {
        public static let acknowledge: UInt32 = 1
        public static let driver: UInt32 = 2
        public static let driverOK: UInt32 = 4
        public static let featuresOK: UInt32 = 8
        public static let deviceNeedsReset: UInt32 = 64
        public static let failed: UInt32 = 128
    }

    /// Device IDs (section 5).
    public enum DeviceID {
        public static let network: UInt32 = 1
        public static let block: UInt32 = 2
        public static let console: UInt32 = 3
        public static let entropy: UInt32 = 4
        public static let gpu: UInt32 = 16
        public static let input: UInt32 = 18
    }
}

/// How a virtio device signals its driver, independent of the transport (MMIO now, PCI later).
///
/// Handed to the device in its `VirtioContext` at activation. Safe to call from any thread
/// (typically the device's I/O thread).
public protocol VirtioInterrupt: AnyObject, Sendable {
    /// Tells the driver that queue `queue` has new used buffers (subject to the device having
    /// checked `Virtqueue.complete`'s answer for notification suppression).
    func signalUsedBuffer(queue: Int)
    /// Tells the driver that the device configuration space changed (bumps ConfigGeneration).
    func signalConfigChange()
    /// The device hit an unrecoverable driver error (bad ring, bad descriptor): sets
    /// DEVICE_NEEDS_RESET, logs `reason`, and raises a configuration-change interrupt.
    func markNeedsReset(reason: String)
}

/// Everything a device may use after the driver set DRIVER_OK: its queues, guest memory, the
/// negotiated features and the interrupt path.
///
/// Immutable; valid until the transport calls the device's `reset()`. The queues themselves are
/// not thread-safe: each one must be driven by a single thread at a time (the device's I/O thread).
public struct VirtioContext: Sendable {
    /// One entry per queue the device declared; `nil` where the driver left the queue disabled.
    public let queues: [Virtqueue?]
    /// Guest memory, which every queue address has been validated against.
    public let ram: GuestRAM
    /// Feature bits the driver accepted (a subset of what the device and transport offered).
    public let features: UInt64
    /// How to notify the driver.
    public let interrupt: any VirtioInterrupt

    /// Creates a context; transports build these, and so do tests.
    public init(queues: [Virtqueue?], ram: GuestRAM, features: UInt64, interrupt: any VirtioInterrupt) {
        self.queues = queues
        self.ram = ram
        self.features = features
        self.interrupt = interrupt
    }
}

/// A virtio device as its transport sees it: identity, features, queues, config space, and the
/// lifecycle `activate` → `queueNotify`* → `reset`.
///
/// The device never sees the transport's registers, so the same device works behind
/// virtio-mmio and (later) virtio-pci. Every requirement is called by the transport on the vCPU
/// thread that performed the register access, serialized by the transport (never two at once).
/// A device that does its work on an I/O thread protects its own state.
public protocol VirtioDevice: AnyObject, Sendable {
    /// Name for logs, e.g. "virtio-blk0".
    var name: String { get }
    /// The virtio device ID (`Virtio.DeviceID`); never 0.
    var deviceID: UInt32 { get }
    /// Device-specific feature bits the device offers. The transport adds `Virtio.transportFeatures`.
    var deviceFeatures: UInt64 { get }
    /// Number of virtqueues (at least 1).
    var queueCount: Int { get }
    /// Largest queue size the device accepts for every queue (a power of 2, at most 32768).
    var maxQueueSize: UInt16 { get }
    /// Reads `size` (1, 2, 4 or 8) bytes of the device configuration space at `offset`,
    /// little-endian; offsets past the end read as 0.
    func readConfig(offset: Int, size: Int) -> UInt64
    /// Writes `size` bytes of the configuration space; read-only fields ignore writes.
    func writeConfig(offset: Int, size: Int, value: UInt64)
    /// Starts the device after DRIVER_OK with the negotiated features and the enabled queues.
    /// Throwing marks the device DEVICE_NEEDS_RESET.
    func activate(_ context: VirtioContext) throws
    /// The driver notified queue `index` (it is below `queueCount`; the queue may be disabled).
    /// Must not block on I/O: hand work to the device's I/O thread.
    func queueNotify(_ index: Int)
    /// Returns the device to its initial state. When this returns, the device no longer touches
    /// guest memory or the queues of the previous activation (in-flight work is finished or dropped).
    func reset()

    /// Stops the device touching guest RAM and its queues (machine paused, state being saved);
    /// returns once in-flight requests are complete. Control thread.
    func quiesce()
    /// Lets the device go on after `quiesce`, picking up what the driver queued meanwhile.
    func resume()
    /// The layout version of `saveDeviceState`.
    var deviceStateVersion: UInt32 { get }
    /// Writes the device's own state beyond its queues (which the transport saves). Quiesced.
    func saveDeviceState(to w: inout StateWriter)
    /// Loads what `saveDeviceState` wrote, validating it (guest addresses against `ram`), after
    /// the transport reset the device and before it re-activates it. Quiesced.
    func loadDeviceState(from r: inout StateReader, version: UInt32, ram: GuestRAM) throws(SavedStateError)
}

extension VirtioDevice {
    /// Devices whose work all happens on the vCPU thread that notifies them need no quiescing.
    public func quiesce() {}
    public func resume() {}
    /// Devices whose whole state is their queues save nothing of their own.
    public var deviceStateVersion: UInt32 { 1 }
    public func saveDeviceState(to w: inout StateWriter) {}
    public func loadDeviceState(from r: inout StateReader, version: UInt32, ram: GuestRAM) throws(SavedStateError) {}
}
