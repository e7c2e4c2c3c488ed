import Logging
import Machine

/// The virtio-mmio register file, version 2 (modern only), in front of one `VirtioDevice` or of
/// nothing (an empty slot, DeviceID 0, as QEMU's `virt` board leaves unused slots).
///
/// Implements feature negotiation (VIRTIO_F_VERSION_1 always offered and required; FEATURES_OK
/// refused when the driver accepts a feature that was not offered), queue setup with address
/// validation, notifications, the interrupt status/ACK pair driving one `InterruptLine`, and the
/// configuration window at 0x100. Register accesses arrive on vCPU threads; interrupts may be
/// raised from the device's I/O thread. State sits behind `Mutex`es; device callbacks are made
/// with no transport lock held except `registers`, which serializes them.
public final class VirtioMMIOTransport: MMIODevice, Sendable {
    /// Register offsets (virtio 1.2 section 4.2.2).
    public enum Register {
        public static let magic: UInt64 = 0x000, version: UInt64 = 0x004, deviceID: UInt64 = 0x008
        public static let vendorID: UInt64 = 0x00c, deviceFeatures: UInt64 = 0x010, deviceFeaturesSel: UInt64 = 0x014
        public static let driverFeatures: UInt64 = 0x020, driverFeaturesSel: UInt64 = 0x024
        public static let queueSel: UInt64 = 0x030, queueNumMax: UInt64 = 0x034, queueNum: UInt64 = 0x038
        public static let queueReady: UInt64 = 0x044, queueNotify: UInt64 = 0x050
        public static let interruptStatus: UInt64 = 0x060, interruptACK: UInt64 = 0x064, status: UInt64 = 0x070
        public static let queueDescLow: UInt64 = 0x080, queueDescHigh: UInt64 = 0x084
        public static let queueDriverLow: UInt64 = 0x090, queueDriverHigh: UInt64 = 0x094
        public static let queueDeviceLow: UInt64 = 0x0a0, queueDeviceHigh: UInt64 = 0x0a4
        public static let shmSel: UInt64 = 0x0ac, shmLenLow: UInt64 = 0x0b0, shmLenHigh: UInt64 = 0x0b4
        public static let shmBaseLow: UInt64 = 0x0b8, shmBaseHigh: UInt64 = 0x0bc
        public static let configGeneration: UInt64 = 0x0fc, config: UInt64 = 0x100
    }
    /// "virt" in little-endian.
    public static let magicValue: UInt32 = 0x7472_6976
    /// QEMU's vendor ID ("QEMU"), which Linux does not check.
    public static let vendor: UInt32 = 0x554D_4551
    /// Size of the MMIO window QEMU's `virt` gives each transport.
    public static let windowSize: UInt64 = 0x200
    /// InterruptStatus bit: a queue has used buffers.
    public static let interruptUsedBuffer: UInt32 = VirtioTransportCore.interruptUsedBuffer
    /// InterruptStatus bit: the configuration changed.
    public static let interruptConfigChange: UInt32 = VirtioTransportCore.interruptConfigChange

    /// Window name for logs ("virtio-mmio@10008000").
    public let name: String
    /// The saved-state section name (stable: the slot's address, e.g. "virtio-mmio@10008000").
    public let stateSection: String
    /// The device behind the transport, or nil for an empty slot.
    public var device: (any VirtioDevice)? { core.device }
    private let core: VirtioTransportCore
    private let logger: Logger

    /// Creates a transport for `device` (nil for an empty slot) whose queues live in `ram` and
    /// whose interrupt output drives `interrupt`.
    public init(device: (any VirtioDevice)?, ram: GuestRAM, interrupt: any InterruptLine,
                name: String? = nil, stateSection: String? = nil, logger: Logger = Logger(label: "machine.virtio-mmio")) {
        self.stateSection = stateSection ?? name ?? "virtio-mmio(\(device?.name ?? "empty"))"
        self.name = name ?? "virtio-mmio(\(device?.name ?? "empty"))"
        self.logger = logger
        core = VirtioTransportCore(device: device, ram: ram, interrupt: interrupt, name: self.name, logger: logger,
                                   queueSizeStartsAtMaximum: false)
    }

    /// Features the transport offers: the device's plus the ring features it implements.
    public var offeredFeatures: UInt64 { core.offeredFeatures }

    /// The current device status register (for tests and `info qtree`-style queries).
    public var status: UInt32 { core.status }

    /// Reads a register; 32-bit accesses are required below 0x100 (others read 0, as QEMU does).
    public func read(offset: UInt64, size: Int) -> UInt64 {
        if offset >= Register.config {
            guard let device else { return 0 }
            return device.readConfig(offset: Int(offset - Register.config), size: size)
        }
        guard size == 4 else {
            logger.warning("\(name): \(size)-byte read at \(offset) ignored")
            return 0
        }
        switch offset {
        case Register.magic: return UInt64(Self.magicValue)
        case Register.version: return 2
        case Register.deviceID: return UInt64(device?.deviceID ?? 0)
        case Register.vendorID: return UInt64(Self.vendor)
        default: break
        }
        guard let device else { return 0 }
        switch offset {
        case Register.deviceFeatures: return UInt64(core.selectedDeviceFeatures)
        case Register.queueNumMax: return core.selectedQueueIsConfigurable ? UInt64(device.maxQueueSize) : 0
        case Register.queueNum, Register.queueReady, Register.queueDescLow, Register.queueDescHigh,
             Register.queueDriverLow, Register.queueDriverHigh, Register.queueDeviceLow, Register.queueDeviceHigh:
            guard let q = core.selectedQueue else { return 0 }
            switch offset {
            case Register.queueNum: return UInt64(q.num)
            case Register.queueReady: return q.ready ? 1 : 0
            case Register.queueDescLow: return q.desc & 0xffff_ffff
            case Register.queueDescHigh: return q.desc >> 32
            case Register.queueDriverLow: return q.driver & 0xffff_ffff
            case Register.queueDriverHigh: return q.driver >> 32
            case Register.queueDeviceLow: return q.device & 0xffff_ffff
            default: return q.device >> 32
            }
        case Register.interruptStatus: return UInt64(core.signal.state.withLock { $0.status })
        case Register.status: return UInt64(status)
        case Register.configGeneration: return UInt64(core.signal.state.withLock { $0.generation })
        case Register.shmLenLow, Register.shmLenHigh, Register.shmBaseLow, Register.shmBaseHigh:
            return 0xffff_ffff  // no shared memory regions
        default:
            return 0
        }
    }

    /// Writes a register; 32-bit accesses are required below 0x100.
    public func write(offset: UInt64, size: Int, value: UInt64) {
        guard let device else { return }
        if offset >= Register.config {
            device.writeConfig(offset: Int(offset - Register.config), size: size, value: value)
            return
        }
        guard size == 4 else {
            logger.warning("\(name): \(size)-byte write at \(offset) ignored")
            return
        }
        let v = UInt32(truncatingIfNeeded: value)
        let lo = { (old: UInt64) in (old & ~0xffff_ffff) | UInt64(v) }
        let hi = { (old: UInt64) in (old & 0xffff_ffff) | (UInt64(v) << 32) }
        switch offset {
        case Register.deviceFeaturesSel: core.registers.withLock { $0.deviceFeaturesSel = v }
        case Register.driverFeaturesSel: core.registers.withLock { $0.driverFeaturesSel = v }
        case Register.driverFeatures: core.writeDriverFeatures(v)
        case Register.queueSel: core.registers.withLock { $0.queueSel = v }
        case Register.queueNum: core.updateSelectedQueue { $0.num = v }
        case Register.queueDescLow: core.updateSelectedQueue { $0.desc = lo($0.desc) }
        case Register.queueDescHigh: core.updateSelectedQueue { $0.desc = hi($0.desc) }
        case Register.queueDriverLow: core.updateSelectedQueue { $0.driver = lo($0.driver) }
        case Register.queueDriverHigh: core.updateSelectedQueue { $0.driver = hi($0.driver) }
        case Register.queueDeviceLow: core.updateSelectedQueue { $0.device = lo($0.device) }
        case Register.queueDeviceHigh: core.updateSelectedQueue { $0.device = hi($0.device) }
        // Enabling a queue after DRIVER_OK is not supported (no late queue enable).
        case Register.queueReady: core.updateSelectedQueue { $0.ready = v & 1 != 0 }
        case Register.queueNotify: core.notify(queue: Int(v & 0xffff))
        case Register.interruptACK: core.signal.acknowledge(v)
        case Register.status: core.writeStatus(v)
        default:
            logger.debug("\(name): write to read-only or unknown register \(offset) ignored")
        }
    }
}

// MARK: Lifecycle and saved state

extension VirtioMMIOTransport: ManagedDevice {
    /// The transport's registers, the ring indices of each live queue, the interrupt status,
    /// and the device's own state: the transport-independent virtio state, saved as it is.
    public typealias State = VirtioTransportState

    public var stateVersion: UInt32 { State.version }

    /// System reset: the device drops its activation (it no longer touches guest RAM) and the
    /// registers return to their power-on values, as a driver's status write of 0 does.
    public func reset() { core.reset() }

    public func quiesce() { device?.quiesce() }

    public func resume() { device?.resume() }

    /// The transport's state as a value. Quiesced.
    public func captureState() -> State { core.captureState() }

    public func saveState(to w: inout StateWriter) { captureState().encode(to: &w) }

    public func loadState(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
        try State.check(version: version, in: r)
        let s = try State(from: &r, version: version)
        try r.finish()
        try applyState(s)
    }

    /// Validates `s` (device identity, queue sizes, ring addresses inside RAM), then resets the
    /// device and rebuilds the registers, the live queues at their saved indices and the
    /// device's own state. Nothing changes when it is refused. Quiesced.
    public func applyState(_ s: State) throws(SavedStateError) {
        let queues = try core.validate(s, section: stateSection)
        try core.apply(s, queues: queues, section: stateSection)
    }
}
