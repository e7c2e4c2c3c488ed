import Logging
import Machine
import Synchronization

/// The virtio-mmio register file, version 2 (modern only), in front of one `VirtioDevice` or of
/// nothing (an empty slot, DeviceID 0, as QEMU's `virt` board leaves unused slots).
///
/// Implements feature negotiation (VIRTIO_F_VERSION_1 always offered and required; FEATURES_OK
/// refused when the driver accepts a feature that was not offered), queue setup with address
/// validation, notifications, the interrupt status/ACK pair driving one `InterruptLine`, and the
/// configuration window at 0x100. Register accesses arrive on vCPU threads; interrupts may be
/// raised from the device's I/O thread. State sits behind `Mutex`es; device callbacks are made
/// with no transport lock held except `registers`, which serializes them.
public final class VirtioMMIOTransport: MMIODevice, @unchecked Sendable {
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
    public static let interruptUsedBuffer: UInt32 = 1
    /// InterruptStatus bit: the configuration changed.
    public static let interruptConfigChange: UInt32 = 2

    private struct QueueRegisters {
        var num: UInt32 = 0
        var ready = false
        var desc: UInt64 = 0, driver: UInt64 = 0, device: UInt64 = 0
    }

    private struct Registers {
        var deviceFeaturesSel: UInt32 = 0
        var driverFeaturesSel: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSel: UInt32 = 0
        var status: UInt32 = 0
        var queues: [QueueRegisters]
        var active = false
        /// The queues of the current activation (their ring indices are saved state).
        var live: [Virtqueue?] = []
    }

    /// Interrupt state shared with the device's I/O thread.
    private final class Signal: VirtioInterrupt, @unchecked Sendable {
        struct State { var status: UInt32 = 0; var generation: UInt32 = 0; var needsReset = false }
        let state = Mutex(State())
        let line: any InterruptLine
        let logger: Logger
        let name: String
        init(line: any InterruptLine, logger: Logger, name: String) {
            self.line = line
            self.logger = logger
            self.name = name
        }
        func raise(_ bit: UInt32) {
            state.withLock { $0.status |= bit }
            line.set(true)
        }
        func signalUsedBuffer(queue: Int) { raise(VirtioMMIOTransport.interruptUsedBuffer) }
        func signalConfigChange() {
            state.withLock { $0.generation &+= 1 }
            raise(VirtioMMIOTransport.interruptConfigChange)
        }
        func markNeedsReset(reason: String) {
            logger.error("\(name): device needs reset: \(reason)")
            state.withLock { $0.needsReset = true }
            raise(VirtioMMIOTransport.interruptConfigChange)
        }
        func acknowledge(_ bits: UInt32) {
            let left = state.withLock { s -> UInt32 in
                s.status &= ~bits
                return s.status
            }
            if left == 0 { line.set(false) }
        }
        func clear() {
            state.withLock { $0 = State(generation: $0.generation &+ 1) }
            line.set(false)
        }
    }

    /// Window name for logs ("virtio-mmio@10008000").
    public let name: String
    /// The saved-state section name (stable: the slot's address, e.g. "virtio-mmio@10008000").
    public let stateSection: String
    /// The device behind the transport, or nil for an empty slot.
    public let device: (any VirtioDevice)?
    private let ram: GuestRAM
    private let signal: Signal
    private let registers: Mutex<Registers>
    private let logger: Logger

    /// Creates a transport for `device` (nil for an empty slot) whose queues live in `ram` and
    /// whose interrupt output drives `interrupt`.
    public init(device: (any VirtioDevice)?, ram: GuestRAM, interrupt: any InterruptLine,
                name: String? = nil, stateSection: String? = nil, logger: Logger = Logger(label: "machine.virtio-mmio")) {
        self.device = device
        self.stateSection = stateSection ?? name ?? "virtio-mmio(\(device?.name ?? "empty"))"
        self.ram = ram
        self.name = name ?? "virtio-mmio(\(device?.name ?? "empty"))"
        self.logger = logger
        self.signal = Signal(line: interrupt, logger: logger, name: self.name)
        self.registers = Mutex(Registers(queues: Array(repeating: QueueRegisters(), count: device?.queueCount ?? 0)))
    }

    /// Features the transport offers: the device's plus the ring features it implements.
    public var offeredFeatures: UInt64 { (device?.deviceFeatures ?? 0) | Virtio.transportFeatures }

    /// The current device status register (for tests and `info qtree`-style queries).
    public var status: UInt32 {
        let needs = signal.state.withLock { $0.needsReset }
        return registers.withLock { $0.status } | (needs ? Virtio.Status.deviceNeedsReset : 0)
    }

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
        case Register.deviceFeatures:
            let sel = registers.withLock { $0.deviceFeaturesSel }
            return sel < 2 ? (offeredFeatures >> (32 * UInt64(sel))) & 0xffff_ffff : 0
        case Register.queueNumMax:
            return registers.withLock { r in
                Int(r.queueSel) < r.queues.count && !r.queues[Int(r.queueSel)].ready ? UInt64(device.maxQueueSize) : 0
            }
        case Register.queueNum, Register.queueReady, Register.queueDescLow, Register.queueDescHigh,
             Register.queueDriverLow, Register.queueDriverHigh, Register.queueDeviceLow, Register.queueDeviceHigh:
            return registers.withLock { r in
                guard Int(r.queueSel) < r.queues.count else { return 0 }
                let q = r.queues[Int(r.queueSel)]
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
            }
        case Register.interruptStatus: return UInt64(signal.state.withLock { $0.status })
        case Register.status: return UInt64(status)
        case Register.configGeneration: return UInt64(signal.state.withLock { $0.generation })
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
        switch offset {
        case Register.deviceFeaturesSel: registers.withLock { $0.deviceFeaturesSel = v }
        case Register.driverFeaturesSel: registers.withLock { $0.driverFeaturesSel = v }
        case Register.driverFeatures:
            registers.withLock { r in
                guard r.status & Virtio.Status.featuresOK == 0, r.driverFeaturesSel < 2 else { return }
                let shift = 32 * UInt64(r.driverFeaturesSel)
                r.driverFeatures = (r.driverFeatures & ~(0xffff_ffff << shift)) | (UInt64(v) << shift)
            }
        case Register.queueSel: registers.withLock { $0.queueSel = v }
        case Register.queueNum, Register.queueDescLow, Register.queueDescHigh, Register.queueDriverLow,
             Register.queueDriverHigh, Register.queueDeviceLow, Register.queueDeviceHigh, Register.queueReady:
            writeQueueRegister(offset, v, device: device)
        case Register.queueNotify:
            let index = Int(v & 0xffff)
            let ok = registers.withLock { r in r.active && index < r.queues.count && r.queues[index].ready }
            if ok { device.queueNotify(index) }
        case Register.interruptACK: signal.acknowledge(v)
        case Register.status: writeStatus(v, device: device)
        default:
            logger.debug("\(name): write to read-only or unknown register \(offset) ignored")
        }
    }

    private func writeQueueRegister(_ offset: UInt64, _ v: UInt32, device: any VirtioDevice) {
        registers.withLock { r in
            guard Int(r.queueSel) < r.queues.count else { return }
            guard !r.active || offset == Register.queueReady else { return }
            let lo = { (old: UInt64) in (old & ~0xffff_ffff) | UInt64(v) }
            let hi = { (old: UInt64) in (old & 0xffff_ffff) | (UInt64(v) << 32) }
            let i = Int(r.queueSel)
            switch offset {
            case Register.queueNum: r.queues[i].num = v
            case Register.queueDescLow: r.queues[i].desc = lo(r.queues[i].desc)
            case Register.queueDescHigh: r.queues[i].desc = hi(r.queues[i].desc)
            case Register.queueDriverLow: r.queues[i].driver = lo(r.queues[i].driver)
            case Register.queueDriverHigh: r.queues[i].driver = hi(r.queues[i].driver)
            case Register.queueDeviceLow: r.queues[i].device = lo(r.queues[i].device)
            case Register.queueDeviceHigh: r.queues[i].device = hi(r.queues[i].device)
            default:
                // Enabling a queue after DRIVER_OK is not supported (no late queue enable).
                if !r.active { r.queues[i].ready = v & 1 != 0 }
            }
        }
    }

    private func writeStatus(_ v: UInt32, device: any VirtioDevice) {
        if v == 0 {
            resetDevice()
            return
        }
        enum Action { case none, activate(UInt64, [QueueRegisters]) }
        let action: Action = registers.withLock { r in
            let old = r.status
            guard v & old == old else {
                logger.warning("\(name): driver tried to clear status bits (\(old) -> \(v)); ignored")
                return .none
            }
            var new = v
            if new & Virtio.Status.featuresOK != 0 && old & Virtio.Status.featuresOK == 0 {
                let unknown = r.driverFeatures & ~offeredFeatures
                if unknown != 0 || r.driverFeatures & Virtio.featureVersion1 == 0 {
                    logger.warning("\(name): FEATURES_OK refused (features \(String(r.driverFeatures, radix: 16)))")
                    new &= ~Virtio.Status.featuresOK
                }
            }
            if new & Virtio.Status.driverOK != 0 && new & Virtio.Status.featuresOK == 0 {
                logger.warning("\(name): DRIVER_OK without FEATURES_OK; ignored")
                new &= ~Virtio.Status.driverOK
            }
            r.status = new
            if new & Virtio.Status.driverOK != 0 && !r.active {
                r.active = true
                return .activate(r.driverFeatures, r.queues)
            }
            return .none
        }
        guard case .activate(let features, let regs) = action else { return }
        do {
            let eventIndex = features & Virtio.featureEventIndex != 0
            var queues: [Virtqueue?] = []
            for (i, q) in regs.enumerated() {
                guard q.ready else { queues.append(nil); continue }
                guard q.num > 0, q.num <= UInt32(device.maxQueueSize) else {
                    throw VirtqueueError.badQueueSize(UInt16(truncatingIfNeeded: q.num))
                }
                queues.append(try Virtqueue(index: i, size: UInt16(q.num), descriptorTable: GuestPhysicalAddress(q.desc),
                                            driverArea: GuestPhysicalAddress(q.driver),
                                            deviceArea: GuestPhysicalAddress(q.device), ram: ram, eventIndex: eventIndex))
            }
            registers.withLock { $0.live = queues }
            try device.activate(VirtioContext(queues: queues, ram: ram, features: features, interrupt: signal))
        } catch {
            signal.markNeedsReset(reason: "activation failed: \(error)")
        }
    }

    private func resetDevice() {
        device?.reset()
        registers.withLock { r in
            r = Registers(queues: Array(repeating: QueueRegisters(), count: r.queues.count))
        }
        signal.clear()
    }
}

// MARK: Lifecycle and saved state

extension VirtioMMIOTransport: ManagedDevice {
    /// The transport's registers, the ring indices of each live queue, the interrupt status,
    /// and the device's own state.
    public struct State: DeviceState {
        public static let version: UInt32 = 1

        public struct Queue: Equatable, Sendable {
            public var num: UInt32
            public var ready: Bool
            public var desc: UInt64, driver: UInt64, device: UInt64
            public var indices: Virtqueue.RingIndices?
        }

        public var deviceID: UInt32
        public var deviceFeaturesSel: UInt32
        public var driverFeaturesSel: UInt32
        public var driverFeatures: UInt64
        public var queueSel: UInt32
        public var status: UInt32
        public var active: Bool
        public var queues: [Queue]
        public var interruptStatus: UInt32
        public var configGeneration: UInt32
        public var needsReset: Bool
        public var deviceStateVersion: UInt32
        public var deviceState: [UInt8]

        public func encode(to w: inout StateWriter) {
            w.u32(deviceID)
            w.u32(deviceFeaturesSel)
            w.u32(driverFeaturesSel)
            w.u64(driverFeatures)
            w.u32(queueSel)
            w.u32(status)
            w.bool(active)
            w.count(queues.count)
            for q in queues {
                w.u32(q.num)
                w.bool(q.ready)
                w.u64(q.desc)
                w.u64(q.driver)
                w.u64(q.device)
                w.optional(q.indices) { w, i in
                    w.u16(i.lastAvail)
                    w.u16(i.usedIndex)
                    w.u16(i.signalledUsed)
                    w.bool(i.pendingSignal)
                }
            }
            w.u32(interruptStatus)
            w.u32(configGeneration)
            w.bool(needsReset)
            w.u32(deviceStateVersion)
            w.bytes(deviceState)
        }

        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            deviceID = try r.u32("device-id")
            deviceFeaturesSel = try r.u32("device-features-sel")
            driverFeaturesSel = try r.u32("driver-features-sel")
            driverFeatures = try r.u64("driver-features")
            queueSel = try r.u32("queue-sel")
            status = try r.u32("status")
            active = try r.bool("active")
            let n = try r.count("queues", limit: 1024, minimumElementSize: 30)
            var qs = [Queue]()
            for i in 0..<n {
                let f = "queues[\(i)]"
                let num = try r.u32(f + ".num")
                let ready = try r.bool(f + ".ready")
                let desc = try r.u64(f + ".desc"), driver = try r.u64(f + ".driver"), device = try r.u64(f + ".device")
                let indices = try r.optional(f + ".indices") { (r: inout StateReader) throws(SavedStateError) in
                    Virtqueue.RingIndices(lastAvail: try r.u16(f + ".last-avail"), usedIndex: try r.u16(f + ".used-index"),
                                          signalledUsed: try r.u16(f + ".signalled-used"),
                                          pendingSignal: try r.bool(f + ".pending-signal"))
                }
                qs.append(Queue(num: num, ready: ready, desc: desc, driver: driver, device: device, indices: indices))
            }
            queues = qs
            interruptStatus = try r.u32("interrupt-status")
            configGeneration = try r.u32("config-generation")
            needsReset = try r.bool("needs-reset")
            deviceStateVersion = try r.u32("device-state-version")
            deviceState = try r.bytes("device-state", limit: 1 << 30)
        }

        init(deviceID: UInt32, deviceFeaturesSel: UInt32, driverFeaturesSel: UInt32, driverFeatures: UInt64,
             queueSel: UInt32, status: UInt32, active: Bool, queues: [Queue], interruptStatus: UInt32,
             configGeneration: UInt32, needsReset: Bool, deviceStateVersion: UInt32, deviceState: [UInt8]) {
            self.deviceID = deviceID
            self.deviceFeaturesSel = deviceFeaturesSel
            self.driverFeaturesSel = driverFeaturesSel
            self.driverFeatures = driverFeatures
            self.queueSel = queueSel
            self.status = status
            self.active = active
            self.queues = queues
            self.interruptStatus = interruptStatus
            self.configGeneration = configGeneration
            self.needsReset = needsReset
            self.deviceStateVersion = deviceStateVersion
            self.deviceState = deviceState
        }
    }

    public var stateVersion: UInt32 { State.version }

    /// System reset: the device drops its activation (it no longer touches guest RAM) and the
    /// registers return to their power-on values, as a driver's status write of 0 does.
    public func reset() { resetDevice() }

    public func quiesce() { device?.quiesce() }

    public func resume() { device?.resume() }

    /// The transport's state as a value. Quiesced.
    public func captureState() -> State {
        let sig = signal.state.withLock { $0 }
        var deviceState = StateWriter()
        device?.saveDeviceState(to: &deviceState)
        return registers.withLock { r in
            let queues = r.queues.enumerated().map { i, q in
                State.Queue(num: q.num, ready: q.ready, desc: q.desc, driver: q.driver, device: q.device,
                            indices: r.active && i < r.live.count ? r.live[i]?.indices : nil)
            }
            return State(deviceID: device?.deviceID ?? 0, deviceFeaturesSel: r.deviceFeaturesSel,
                         driverFeaturesSel: r.driverFeaturesSel, driverFeatures: r.driverFeatures, queueSel: r.queueSel,
                         status: r.status, active: r.active, queues: queues, interruptStatus: sig.status,
                         configGeneration: sig.generation, needsReset: sig.needsReset,
                         deviceStateVersion: device?.deviceStateVersion ?? 1, deviceState: deviceState.bytes)
        }
    }

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
        let ownID = device?.deviceID ?? 0
        guard s.deviceID == ownID else { throw refusal("device-id", "saved device \(s.deviceID), this slot holds device \(ownID)") }
        let queueCount = device?.queueCount ?? 0
        guard s.queues.count == queueCount else { throw refusal("queues", "\(s.queues.count) queues, the device has \(queueCount)") }
        guard s.driverFeatures & ~offeredFeatures == 0 else {
            throw refusal("driver-features", "0x\(String(s.driverFeatures, radix: 16)) includes features the device does not offer")
        }
        guard s.interruptStatus & ~3 == 0 else { throw refusal("interrupt-status", "\(s.interruptStatus) has unknown bits") }
        guard !s.active || s.status & Virtio.Status.driverOK != 0 else { throw refusal("active", "active without DRIVER_OK") }
        var queues: [Virtqueue?] = []
        if s.active, let device {
            let eventIndex = s.driverFeatures & Virtio.featureEventIndex != 0
            for (i, q) in s.queues.enumerated() {
                guard q.ready else {
                    guard q.indices == nil else { throw refusal("queues[\(i)].indices", "saved for a queue that is not ready") }
                    queues.append(nil)
                    continue
                }
                guard let indices = q.indices else { throw refusal("queues[\(i)].indices", "missing for a ready queue") }
                guard q.num > 0, q.num <= UInt32(device.maxQueueSize) else {
                    throw refusal("queues[\(i)].num", "\(q.num) is not a queue size the device accepts (1...\(device.maxQueueSize))")
                }
                do {
                    queues.append(try Virtqueue(index: i, size: UInt16(q.num), descriptorTable: GuestPhysicalAddress(q.desc),
                                                driverArea: GuestPhysicalAddress(q.driver),
                                                deviceArea: GuestPhysicalAddress(q.device), ram: ram,
                                                eventIndex: eventIndex, indices: indices))
                } catch {
                    throw refusal("queues[\(i)]", error.description)
                }
            }
        }
        // Checked; now replace the live state.
        device?.reset()
        if let device {
            var r = StateReader(section: stateSection, bytes: s.deviceState)
            try device.loadDeviceState(from: &r, version: s.deviceStateVersion, ram: ram)
            try r.finish()
        }
        registers.withLock { r in
            r.deviceFeaturesSel = s.deviceFeaturesSel
            r.driverFeaturesSel = s.driverFeaturesSel
            r.driverFeatures = s.driverFeatures
            r.queueSel = s.queueSel
            r.status = s.status
            r.active = s.active
            r.queues = s.queues.map { QueueRegisters(num: $0.num, ready: $0.ready, desc: $0.desc, driver: $0.driver, device: $0.device) }
            r.live = queues
        }
        signal.state.withLock { $0 = Signal.State(status: s.interruptStatus, generation: s.configGeneration, needsReset: s.needsReset) }
        signal.line.set(s.interruptStatus != 0)
        if s.active, let device {
            do {
                try device.activate(VirtioContext(queues: queues, ram: ram, features: s.driverFeatures, interrupt: signal))
            } catch {
                throw refusal("active", "the device refused its saved activation: \(error)")
            }
        }
    }
}
