import Logging
import Machine
import Synchronization

/// The virtio-pci modern transport (virtio 1.2 section 4.1) in front of one `VirtioDevice`: a PCI
/// function 1af4:(1040 + device ID), revision 1, whose vendor capabilities point into one 64-bit
/// prefetchable BAR (BAR 4, 16 KiB, laid out as QEMU's: common configuration at 0x0000, ISR at
/// 0x1000, device configuration at 0x2000, notifications at 0x3000 with a multiplier of 4), plus
/// the VIRTIO_PCI_CAP_PCI_CFG window. Interrupts are INTx only (no MSI-X capability, so drivers
/// use the ISR); the Interrupt Disable command bit masks the pin.
///
/// Negotiation, queues, activation and saved state are `VirtioTransportCore`'s, shared with
/// virtio-mmio. Threading: config and BAR accesses arrive on vCPU threads, interrupts from the
/// device's I/O thread; the configuration space sits behind a `Mutex`.
public final class VirtioPCITransport: PCIFunction, Sendable {
    /// Capability `cfg_type` values (section 4.1.4).
    public enum CapabilityType {
        public static let common: UInt8 = 1, notify: UInt8 = 2, isr: UInt8 = 3, device: UInt8 = 4, pciConfig: UInt8 = 5
    }
    /// The BAR holding every virtio structure.
    public static let bar = 4
    /// The BAR's size and the offset of each structure in it.
    public static let barSize: UInt64 = 0x4000
    public static let commonOffset: UInt64 = 0x0000, isrOffset: UInt64 = 0x1000
    public static let deviceOffset: UInt64 = 0x2000, notifyOffset: UInt64 = 0x3000
    /// Bytes between two queues' notification addresses.
    public static let notifyMultiplier: UInt32 = 4
    /// Length of the common configuration structure (up to `queue_device`).
    public static let commonLength: UInt32 = 0x38
    /// "No MSI-X vector", what the vector fields read without MSI-X.
    public static let noVector: UInt16 = 0xffff
    /// Red Hat / Qumranet, the virtio vendor ID.
    public static let vendorID: UInt16 = 0x1af4

    /// Common configuration offsets (section 4.1.4.3).
    public enum Common {
        public static let deviceFeatureSelect = 0x00, deviceFeature = 0x04, driverFeatureSelect = 0x08
        public static let driverFeature = 0x0c, configMSIXVector = 0x10, numQueues = 0x12, deviceStatus = 0x14
        public static let configGeneration = 0x15, queueSelect = 0x16, queueSize = 0x18, queueMSIXVector = 0x1a
        public static let queueEnable = 0x1c, queueNotifyOff = 0x1e, queueDesc = 0x20, queueDriver = 0x28
        public static let queueDevice = 0x30
    }

    /// The PCI identity of a modern virtio device with `deviceID`: the class QEMU gives it.
    public static func identity(deviceID: UInt32) -> PCIIdentity {
        let classCode: UInt32
        switch deviceID {
        case Virtio.DeviceID.block: classCode = 0x01_0000      // mass storage, SCSI
        case Virtio.DeviceID.network: classCode = 0x02_0000    // network, Ethernet
        case Virtio.DeviceID.gpu: classCode = 0x03_8000        // display, other
        case Virtio.DeviceID.input: classCode = 0x09_8000      // input, other
        default: classCode = 0xff_0000                          // unclassified
        }
        return PCIIdentity(vendorID: vendorID, deviceID: UInt16(0x1040 + deviceID), revision: 1, classCode: classCode,
                           subsystemVendorID: vendorID, subsystemID: 0x1100, interruptPin: 1)
    }

    public let name: String
    /// The saved-state section name ("virtio-pci@00:01.0").
    public let stateSection: String
    /// The device behind the transport.
    public var device: any VirtioDevice { core.device! }
    private let core: VirtioTransportCore
    private let config: Mutex<PCIConfigSpace>
    /// The configuration space at power-on (identity, BAR types, capabilities).
    private let pristine: PCIConfigSpace
    private let pin: any InterruptLine
    private let pending = Mutex(false)
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability in configuration space.
    private let pciConfigCapability: Int
    private let logger: Logger

    /// Creates the transport for `device`, whose queues live in `ram` and whose INTA drives `intx`.
    public init(device: any VirtioDevice, ram: GuestRAM, intx: any InterruptLine, name: String, stateSection: String,
                logger: Logger = Logger(label: "machine.virtio-pci")) {
        self.name = name
        self.stateSection = stateSection
        self.logger = logger
        self.pin = intx
        var space = PCIConfigSpace(identity: Self.identity(deviceID: device.deviceID),
                                   bars: [Self.bar: PCIBarDescriptor(kind: .memory64(prefetchable: true), size: Self.barSize)])
        func cap(_ type: UInt8, offset: UInt64, length: UInt32, extra: [UInt8] = []) -> [UInt8] {
            // cap_len, cfg_type, bar, id, padding[2], offset, length, then type-specific fields.
            var b: [UInt8] = [UInt8(16 + extra.count), type, UInt8(Self.bar), 0, 0, 0]
            b += le32(UInt32(offset)) + le32(length) + extra
            return b
        }
        space.addCapability(id: 0x09, body: cap(CapabilityType.common, offset: Self.commonOffset, length: Self.commonLength))
        space.addCapability(id: 0x09, body: cap(CapabilityType.isr, offset: Self.isrOffset, length: 1))
        space.addCapability(id: 0x09, body: cap(CapabilityType.device, offset: Self.deviceOffset, length: 0x1000))
        space.addCapability(id: 0x09, body: cap(CapabilityType.notify, offset: Self.notifyOffset,
                                                length: UInt32(max(1, device.queueCount)) * Self.notifyMultiplier,
                                                extra: le32(Self.notifyMultiplier)))
        // The PCI configuration access window: bar, offset, length and data are the driver's.
        var window: [UInt8] = [20, CapabilityType.pciConfig, 0, 0, 0, 0]
        window += le32(0) + le32(0) + le32(0)
        pciConfigCapability = space.addCapability(id: 0x09, body: window, writable: [2..<3, 6..<18])
        pristine = space
        config = Mutex(space)
        let line = PendingLine()
        core = VirtioTransportCore(device: device, ram: ram, interrupt: line, name: name, logger: logger,
                                   queueSizeStartsAtMaximum: true)
        line.transport = self
    }

    /// The interrupt output the core drives: remembered as pending, passed to the pin unless
    /// the driver set Interrupt Disable, and mirrored in the status register's Interrupt bit.
    private final class PendingLine: InterruptLine, @unchecked Sendable {  // unchecked: `transport` is set once, right after the transport's init, before any access
        weak var transport: VirtioPCITransport?
        func set(_ level: Bool) { transport?.setPending(level) }
    }

    private func setPending(_ level: Bool) {
        pending.withLock { $0 = level }
        updatePin()
    }

    private func updatePin() {
        let out = config.withLock { c in
            let level = pending.withLock { $0 }
            c.setInterruptStatus(level)
            return level && c.command & PCIConfig.Command.interruptDisable == 0
        }
        pin.set(out)
    }

    /// Features offered: the device's plus the ring features the transport implements.
    public var offeredFeatures: UInt64 { core.offeredFeatures }

    /// The device status (for tests and queries).
    public var status: UInt32 { core.status }

    // MARK: Configuration space

    public var barDescriptors: [Int: PCIBarDescriptor] { config.withLock { $0.bars } }

    public func barAddress(_ index: Int) -> UInt64? { config.withLock { $0.barAddress(index) } }

    public func configRead(offset: Int, size: Int) -> UInt32 {
        let data = pciConfigCapability + 16
        if offset >= data && offset + size <= data + 4 {
            return UInt32(truncatingIfNeeded: windowAccess(write: nil))
        }
        return config.withLock { $0.read(offset: offset, size: size) }
    }

    public func configWrite(offset: Int, size: Int, value: UInt32) {
        let data = pciConfigCapability + 16
        if offset >= data && offset + size <= data + 4 {
            _ = windowAccess(write: UInt64(value))
            return
        }
        config.withLock { $0.write(offset: offset, size: size, value: value) }
        if offset <= PCIConfig.command + 1 && offset + size > PCIConfig.command { updatePin() }
    }

    /// An access through VIRTIO_PCI_CAP_PCI_CFG: `length` (1, 2 or 4) bytes at `offset` in the
    /// BAR the capability names. Other BARs, lengths or misaligned offsets do nothing (read 0).
    private func windowAccess(write value: UInt64?) -> UInt64 {
        let (bar, offset, length) = config.withLock { c in
            (Int(c.read(offset: pciConfigCapability + 4, size: 1)), UInt64(c.read(offset: pciConfigCapability + 8, size: 4)),
             Int(c.read(offset: pciConfigCapability + 12, size: 4)))
        }
        guard bar == Self.bar, [1, 2, 4].contains(length), offset % UInt64(length) == 0,
              offset + UInt64(length) <= Self.barSize else { return 0 }
        if let value {
            barWrite(index: bar, offset: offset, size: length, value: value)
            return 0
        }
        return barRead(index: bar, offset: offset, size: length)
    }

    // MARK: The BAR

    public func barRead(index: Int, offset: UInt64, size: Int) -> UInt64 {
        guard index == Self.bar else { return ~0 }
        switch offset {
        case Self.commonOffset..<Self.isrOffset: return readCommon(Int(offset), size: size)
        case Self.isrOffset: return UInt64(core.signal.takeStatus())
        case Self.deviceOffset..<Self.notifyOffset: return device.readConfig(offset: Int(offset - Self.deviceOffset), size: size)
        default: return 0
        }
    }

    public func barWrite(index: Int, offset: UInt64, size: Int, value: UInt64) {
        guard index == Self.bar else { return }
        switch offset {
        case Self.commonOffset..<Self.isrOffset: writeCommon(Int(offset), size: size, value: value)
        case Self.deviceOffset..<Self.notifyOffset:
            device.writeConfig(offset: Int(offset - Self.deviceOffset), size: size, value: value)
        case Self.notifyOffset..<Self.barSize:
            let off = offset - Self.notifyOffset
            if off % UInt64(Self.notifyMultiplier) == 0 { core.notify(queue: Int(off / UInt64(Self.notifyMultiplier))) }
        default:
            logger.debug("\(name): write to read-only BAR offset 0x\(String(offset, radix: 16)) ignored")
        }
    }

    /// The common configuration structure as bytes (the driver may read any field at its width).
    private func commonImage() -> [UInt8] {
        let r = core.registers.withLock { $0 }
        let generation = core.signal.state.withLock { $0.generation }
        let q = Int(r.queueSel) < r.queues.count ? r.queues[Int(r.queueSel)] : nil
        var b = [UInt8](repeating: 0, count: Int(Self.commonLength))
        func put(_ at: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
        put(Common.deviceFeatureSelect, UInt64(r.deviceFeaturesSel), 4)
        put(Common.deviceFeature, UInt64(core.selectedDeviceFeatures), 4)
        put(Common.driverFeatureSelect, UInt64(r.driverFeaturesSel), 4)
        put(Common.driverFeature, UInt64(core.selectedDriverFeatures), 4)
        put(Common.configMSIXVector, UInt64(Self.noVector), 2)
        put(Common.numQueues, UInt64(r.queues.count), 2)
        put(Common.deviceStatus, UInt64(core.status), 1)
        put(Common.configGeneration, UInt64(generation), 1)
        put(Common.queueSelect, UInt64(r.queueSel), 2)
        if let q {
            put(Common.queueSize, UInt64(q.num), 2)
            put(Common.queueMSIXVector, UInt64(Self.noVector), 2)
            put(Common.queueEnable, q.ready ? 1 : 0, 2)
            put(Common.queueNotifyOff, UInt64(r.queueSel), 2)
            put(Common.queueDesc, q.desc, 8)
            put(Common.queueDriver, q.driver, 8)
            put(Common.queueDevice, q.device, 8)
        }
        return b
    }

    private func readCommon(_ offset: Int, size: Int) -> UInt64 {
        guard offset + size <= Int(Self.commonLength) else { return 0 }
        let b = commonImage()
        var v: UInt64 = 0
        for i in 0..<size { v |= UInt64(b[offset + i]) << (8 * i) }
        return v
    }

    /// Writes the bytes over the current image, then applies each field the write touched.
    private func writeCommon(_ offset: Int, size: Int, value: UInt64) {
        guard offset + size <= Int(Self.commonLength) else { return }
        var b = commonImage()
        for i in 0..<size { b[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
        func field(_ at: Int, _ n: Int) -> UInt64? {
            guard offset < at + n && at < offset + size else { return nil }
            var v: UInt64 = 0
            for i in 0..<n { v |= UInt64(b[at + i]) << (8 * i) }
            return v
        }
        if let v = field(Common.deviceFeatureSelect, 4) { core.registers.withLock { $0.deviceFeaturesSel = UInt32(v) } }
        if let v = field(Common.driverFeatureSelect, 4) { core.registers.withLock { $0.driverFeaturesSel = UInt32(v) } }
        if let v = field(Common.driverFeature, 4) { core.writeDriverFeatures(UInt32(v)) }
        if let v = field(Common.queueSelect, 2) { core.registers.withLock { $0.queueSel = UInt32(v) } }
        if let v = field(Common.queueSize, 2) {
            core.updateSelectedQueue { q in if !q.ready { q.num = UInt32(v) } }
        }
        if let v = field(Common.queueEnable, 2), v == 1 { core.updateSelectedQueue { $0.ready = true } }
        if let v = field(Common.queueDesc, 8) { core.updateSelectedQueue { q in if !q.ready { q.desc = v } } }
        if let v = field(Common.queueDriver, 8) { core.updateSelectedQueue { q in if !q.ready { q.driver = v } } }
        if let v = field(Common.queueDevice, 8) { core.updateSelectedQueue { q in if !q.ready { q.device = v } } }
        if let v = field(Common.deviceStatus, 1) { core.writeStatus(UInt32(v)) }
    }
}

private func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }

// MARK: Lifecycle and saved state

extension VirtioPCITransport: StatefulDevice {
    /// The function's configuration space (BAR assignment, command register, the PCI_CFG
    /// window) and the transport-independent virtio state.
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        /// The 4 KiB configuration space.
        public var config: [UInt8]
        /// Registers, queues, interrupt status and the device's own state.
        public var virtio: VirtioTransportState

        public init(config: [UInt8], virtio: VirtioTransportState) {
            self.config = config
            self.virtio = virtio
        }

        public func encode(to w: inout StateWriter) {
            w.bytes(config)
            virtio.encode(to: &w)
        }

        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            config = try r.bytes("config", limit: PCIConfig.size)
            virtio = try VirtioTransportState(from: &r, version: VirtioTransportState.version)
        }
    }

    /// System reset: the device drops its activation, the registers and the configuration
    /// space (BARs, command) return to their power-on values, and INTx is lowered.
    public func reset() {
        core.reset()
        config.withLock { $0 = pristine }
        updatePin()
    }

    public func quiesce() { device.quiesce() }

    public func resume() { device.resume() }

    public func captureState() -> State {
        State(config: config.withLock { $0.bytes }, virtio: core.captureState())
    }

    /// Validates the configuration space (the read-only identity must be this function's) and
    /// the virtio state before changing anything, then applies both.
    public func applyState(_ s: State) throws(SavedStateError) {
        var space = config.withLock { $0 }
        try space.restore(s.config, section: stateSection)
        let queues = try core.validate(s.virtio, section: stateSection)
        config.withLock { $0 = space }
        try core.apply(s.virtio, queues: queues, section: stateSection)
        updatePin()
    }
}
