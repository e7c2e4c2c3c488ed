import Logging
import Machine
import Synchronization

/// The part of every virtio transport that is not register layout: feature negotiation
/// (VIRTIO_F_VERSION_1 always offered and required; FEATURES_OK refused when the driver accepts
/// a feature that was not offered), the status state machine, queue configuration and its
/// validation at DRIVER_OK, the device's activation and reset, the interrupt status shared with
/// the device's I/O thread, and saved state. virtio-mmio and virtio-pci decode their registers
/// into calls on one of these; the `VirtioDevice` behind it never sees which.
///
/// Threading: register accesses arrive on vCPU threads; interrupts may be raised from the
/// device's I/O thread. State sits behind `Mutex`es; device callbacks are made with no lock held.
final class VirtioTransportCore: Sendable {
    /// One queue's configuration as the driver wrote it.
    struct QueueRegisters {
        var num: UInt32 = 0
        var ready = false
        var desc: UInt64 = 0, driver: UInt64 = 0, device: UInt64 = 0
    }

    /// The driver-visible registers common to every transport.
    struct Registers {
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

    /// Interrupt state shared with the device's I/O thread. Bit 0: used buffer; bit 1:
    /// configuration change (the same bits in virtio-mmio's InterruptStatus and virtio-pci's ISR).
    final class Signal: VirtioInterrupt, Sendable {
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
        func signalUsedBuffer(queue: Int) { raise(VirtioTransportCore.interruptUsedBuffer) }
        func signalConfigChange() {
            state.withLock { $0.generation &+= 1 }
            raise(VirtioTransportCore.interruptConfigChange)
        }
        func markNeedsReset(reason: String) {
            logger.error("\(name): device needs reset: \(reason)")
            state.withLock { $0.needsReset = true }
            raise(VirtioTransportCore.interruptConfigChange)
        }
        /// Clears `bits` of the interrupt status; lowers the line when none is left.
        func acknowledge(_ bits: UInt32) {
            let left = state.withLock { s -> UInt32 in
                s.status &= ~bits
                return s.status
            }
            if left == 0 { line.set(false) }
        }
        /// Reads and clears the whole status at once (virtio-pci's ISR), lowering the line.
        func takeStatus() -> UInt32 {
            let old = state.withLock { s -> UInt32 in
                let old = s.status
                s.status = 0
                return old
            }
            line.set(false)
            return old
        }
        func clear() {
            state.withLock { $0 = State(generation: $0.generation &+ 1) }
            line.set(false)
        }
    }

    /// Interrupt status bit: a queue has used buffers.
    static let interruptUsedBuffer: UInt32 = 1
    /// Interrupt status bit: the configuration changed.
    static let interruptConfigChange: UInt32 = 2

    let name: String
    let device: (any VirtioDevice)?
    let ram: GuestRAM
    let signal: Signal
    let registers: Mutex<Registers>
    let logger: Logger
    /// The queue size a queue has after reset: 0 for virtio-mmio (QueueNum), the maximum for
    /// virtio-pci (queue_size starts at the largest size the device accepts).
    private let initialQueueSize: UInt32

    init(device: (any VirtioDevice)?, ram: GuestRAM, interrupt: any InterruptLine, name: String, logger: Logger,
         queueSizeStartsAtMaximum: Bool) {
        self.device = device
        self.ram = ram
        self.name = name
        self.logger = logger
        self.initialQueueSize = queueSizeStartsAtMaximum ? UInt32(device?.maxQueueSize ?? 0) : 0
        signal = Signal(line: interrupt, logger: logger, name: name)
        registers = Mutex(Self.powerOn(queueCount: device?.queueCount ?? 0, queueSize: initialQueueSize))
    }

    private static func powerOn(queueCount: Int, queueSize: UInt32) -> Registers {
        Registers(queues: Array(repeating: QueueRegisters(num: queueSize), count: queueCount))
    }

    /// Features the transport offers: the device's plus the ring features it implements.
    var offeredFeatures: UInt64 { (device?.deviceFeatures ?? 0) | Virtio.transportFeatures }

    /// The device status register, with DEVICE_NEEDS_RESET when the device asked for it.
    var status: UInt32 {
        let needs = signal.state.withLock { $0.needsReset }
        return registers.withLock { $0.status } | (needs ? Virtio.Status.deviceNeedsReset : 0)
    }

    /// The 32 feature bits the driver selected with the device-features selector.
    var selectedDeviceFeatures: UInt32 {
        let sel = registers.withLock { $0.deviceFeaturesSel }
        return sel < 2 ? UInt32(truncatingIfNeeded: offeredFeatures >> (32 * UInt64(sel))) : 0
    }

    /// The 32 driver feature bits at the driver-features selector.
    var selectedDriverFeatures: UInt32 {
        registers.withLock { r in
            r.driverFeaturesSel < 2 ? UInt32(truncatingIfNeeded: r.driverFeatures >> (32 * UInt64(r.driverFeaturesSel))) : 0
        }
    }

    /// Writes the 32 driver feature bits at the selector; ignored once FEATURES_OK is set.
    func writeDriverFeatures(_ v: UInt32) {
        registers.withLock { r in
            guard r.status & Virtio.Status.featuresOK == 0, r.driverFeaturesSel < 2 else { return }
            let shift = 32 * UInt64(r.driverFeaturesSel)
            r.driverFeatures = (r.driverFeatures & ~(0xffff_ffff << shift)) | (UInt64(v) << shift)
        }
    }

    /// The selected queue's registers, or nil when the selector is past the last queue.
    var selectedQueue: QueueRegisters? {
        registers.withLock { r in Int(r.queueSel) < r.queues.count ? r.queues[Int(r.queueSel)] : nil }
    }

    /// Whether the selected queue may be reconfigured (it exists and is not yet enabled).
    var selectedQueueIsConfigurable: Bool { selectedQueue.map { !$0.ready } ?? false }

    /// Changes the selected queue's configuration; ignored past the last queue and once the
    /// device is active (a queue's layout cannot change under a running device).
    func updateSelectedQueue(_ body: (inout QueueRegisters) -> Void) {
        registers.withLock { r in
            guard Int(r.queueSel) < r.queues.count, !r.active else { return }
            body(&r.queues[Int(r.queueSel)])
        }
    }

    /// The driver notified queue `index`: passed on when the device is active and the queue enabled.
    func notify(queue index: Int) {
        guard let device else { return }
        let ok = registers.withLock { r in r.active && index < r.queues.count && r.queues[index].ready }
        if ok { device.queueNotify(index) }
    }

    /// A driver write of the device status: 0 resets; otherwise bits may only be added, FEATURES_OK
    /// is kept only for an acceptable feature set, and DRIVER_OK activates the device.
    func writeStatus(_ v: UInt32) {
        guard let device else { return }
        if v == 0 {
            reset()
            return
        }
        enum Action { case none, activate(UInt64, [QueueRegisters]) }
        let offered = offeredFeatures
        let action: Action = registers.withLock { r in
            let old = r.status
            guard v & old == old else {
                logger.warning("\(name): driver tried to clear status bits (\(old) -> \(v)); ignored")
                return .none
            }
            var new = v
            if new & Virtio.Status.featuresOK != 0 && old & Virtio.Status.featuresOK == 0 {
                let unknown = r.driverFeatures & ~offered
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

    /// Device reset: the device drops its activation (it no longer touches guest RAM), the
    /// registers return to their power-on values and the interrupt is lowered.
    func reset() {
        device?.reset()
        registers.withLock { r in r = Self.powerOn(queueCount: r.queues.count, queueSize: initialQueueSize) }
        signal.clear()
    }

    /// The transport-independent state as a value. Quiesced.
    func captureState() -> VirtioTransportState {
        let sig = signal.state.withLock { $0 }
        var deviceState = StateWriter()
        device?.saveDeviceState(to: &deviceState)
        return registers.withLock { r in
            let queues = r.queues.enumerated().map { i, q in
                VirtioTransportState.Queue(num: q.num, ready: q.ready, desc: q.desc, driver: q.driver, device: q.device,
                                           indices: r.active && i < r.live.count ? r.live[i]?.indices : nil)
            }
            return VirtioTransportState(deviceID: device?.deviceID ?? 0, deviceFeaturesSel: r.deviceFeaturesSel,
                                        driverFeaturesSel: r.driverFeaturesSel, driverFeatures: r.driverFeatures,
                                        queueSel: r.queueSel, status: r.status, active: r.active, queues: queues,
                                        interruptStatus: sig.status, configGeneration: sig.generation,
                                        needsReset: sig.needsReset, deviceStateVersion: device?.deviceStateVersion ?? 1,
                                        deviceState: deviceState.bytes)
        }
    }

    /// Checks `s` against this device (identity, queue count and sizes, ring addresses inside
    /// RAM) and returns the queues to activate, changing nothing. Quiesced.
    func validate(_ s: VirtioTransportState, section: String) throws(SavedStateError) -> [Virtqueue?] {
        func bad(_ field: String, _ reason: String) -> SavedStateError {
            SavedStateError(section: section, field: field, reason: reason)
        }
        let ownID = device?.deviceID ?? 0
        guard s.deviceID == ownID else { throw bad("device-id", "saved device \(s.deviceID), this slot holds device \(ownID)") }
        let queueCount = device?.queueCount ?? 0
        guard s.queues.count == queueCount else { throw bad("queues", "\(s.queues.count) queues, the device has \(queueCount)") }
        guard s.driverFeatures & ~offeredFeatures == 0 else {
            throw bad("driver-features", "0x\(String(s.driverFeatures, radix: 16)) includes features the device does not offer")
        }
        guard s.interruptStatus & ~3 == 0 else { throw bad("interrupt-status", "\(s.interruptStatus) has unknown bits") }
        guard !s.active || s.status & Virtio.Status.driverOK != 0 else { throw bad("active", "active without DRIVER_OK") }
        var queues: [Virtqueue?] = []
        if s.active, let device {
            let eventIndex = s.driverFeatures & Virtio.featureEventIndex != 0
            for (i, q) in s.queues.enumerated() {
                guard q.ready else {
                    guard q.indices == nil else { throw bad("queues[\(i)].indices", "saved for a queue that is not ready") }
                    queues.append(nil)
                    continue
                }
                guard let indices = q.indices else { throw bad("queues[\(i)].indices", "missing for a ready queue") }
                guard q.num > 0, q.num <= UInt32(device.maxQueueSize) else {
                    throw bad("queues[\(i)].num", "\(q.num) is not a queue size the device accepts (1...\(device.maxQueueSize))")
                }
                do {
                    queues.append(try Virtqueue(index: i, size: UInt16(q.num), descriptorTable: GuestPhysicalAddress(q.desc),
                                                driverArea: GuestPhysicalAddress(q.driver),
                                                deviceArea: GuestPhysicalAddress(q.device), ram: ram,
                                                eventIndex: eventIndex, indices: indices))
                } catch {
                    throw bad("queues[\(i)]", error.description)
                }
            }
        }
        return queues
    }

    /// Applies a state `validate` accepted, with its queues: resets the device, rebuilds the
    /// registers, the live queues at their saved indices and the device's own state, and
    /// re-activates it. Quiesced.
    func apply(_ s: VirtioTransportState, queues: [Virtqueue?], section: String) throws(SavedStateError) {
        device?.reset()
        if let device {
            var r = StateReader(section: section, bytes: s.deviceState)
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
                throw SavedStateError(section: section, field: "active", reason: "the device refused its saved activation: \(error)")
            }
        }
    }
}

/// The transport-independent saved state of a virtio transport: the common registers, the ring
/// indices of each live queue, the interrupt status, and the device's own state. virtio-mmio
/// saves exactly this; virtio-pci saves it beside its configuration space.
public struct VirtioTransportState: DeviceState {
    public static let version: UInt32 = 1

    /// One queue's configuration and, when the device is active and the queue enabled, its ring indices.
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
