import Machine
import Synchronization

/// A function that forwards configuration cycles to a secondary bus holding one device (a
/// PCIe downstream port: only device 0 exists behind it).
public protocol PCIBridge: PCIFunction {
    /// The secondary bus number the driver programmed (0 until it does).
    var secondaryBus: Int { get }
    /// The function at device 0 of the secondary bus, if a device is plugged in.
    var child: (any PCIFunction)? { get }
}

/// A PCIe root port with a native hot-plug slot, as QEMU's `pcie-root-port` (Red Hat
/// 1b36:000c, class 0604): a type-1 header and a PCI Express capability (version 2, root port,
/// slot implemented) whose slot registers report presence, link state, the attention button and
/// power control; events interrupt through the port's INTA when the driver enabled them
/// (Hot-Plug Interrupt Enable and the event's enable bit). "No Command Completed Support" is
/// set, so drivers do not wait for command completion.
///
/// Threading: configuration accesses on vCPU threads; `plug`, `unplug` and
/// `pressAttentionButton` on the control thread. State behind a `Mutex`.
public final class PCIeRootPort: PCIBridge, Sendable {
    /// The identity QEMU gives `pcie-root-port` (its interrupt pin is chosen per port, see
    /// `init`).
    public static let identity = PCIIdentity(vendorID: 0x1b36, deviceID: 0x000c, revision: 0, classCode: 0x06_0400,
                                             interruptPin: 1)
    /// Where the PCI Express capability sits.
    public static let expressCapability = 0x40

    /// Offsets inside the PCI Express capability (PCIe 4.0 section 7.5.3).
    public enum Express {
        public static let linkStatus = 0x12, slotCapabilities = 0x14, slotControl = 0x18, slotStatus = 0x1a
    }

    /// Slot control bits.
    public enum SlotControl {
        public static let attentionButtonEnable: UInt16 = 1 << 0, presenceDetectEnable: UInt16 = 1 << 3
        public static let hotPlugInterruptEnable: UInt16 = 1 << 5, powerControllerOff: UInt16 = 1 << 10
        public static let linkStateChangedEnable: UInt16 = 1 << 12
        /// The power indicator field (bits 8–9) and its on and off values.
        public static let powerIndicatorMask: UInt16 = 3 << 8, powerIndicatorOn: UInt16 = 1 << 8
        public static let powerIndicatorOff: UInt16 = 3 << 8
    }

    /// Slot status bits.
    public enum SlotStatus {
        public static let attentionButtonPressed: UInt16 = 1 << 0, presenceDetectChanged: UInt16 = 1 << 3
        public static let presenceDetectState: UInt16 = 1 << 6, linkStateChanged: UInt16 = 1 << 8
    }

    /// Link status: Data Link Layer Link Active.
    public static let linkActive: UInt16 = 1 << 13

    public let name: String
    /// The saved-state section name ("pcie-root-port@00:01.0").
    public let stateSection: String
    /// The physical slot number (QEMU's `slot` property).
    public let physicalSlot: Int
    private let intx: any InterruptLine
    private let config: Mutex<PCIConfigSpace>
    private let pristine: PCIConfigSpace
    private let plugged = Mutex<(any PCIFunction)?>(nil)
    /// Called (control or vCPU thread) when the driver turns the slot's power off while a device
    /// is present: the device may now be removed (the end of a `device_del`).
    public let onPowerOff: Mutex<(@Sendable () -> Void)?> = Mutex(nil)

    /// Creates a port whose interrupt (on pin `interruptPin`, 1 = INTA … 4 = INTD) drives
    /// `intx`; `port` is its PCIe port number and `physicalSlot` the slot number the guest shows.
    ///
    /// The board picks the pin: the device in the slot is device 0 of the secondary bus, whose
    /// INTA the bridge swizzle puts on the port's INTA wire. A port whose own interrupt shares a
    /// wire with a device behind any port can deadlock Linux: its pciehp thread, removing that
    /// device, waits in `synchronize_irq` (the virtio-pci reset does) for the other pciehp
    /// thread on the wire, which may wait for the PCI rescan lock the first holds. (QEMU's
    /// ports use MSI instead, which this board's PLIC does not have.)
    public init(name: String, stateSection: String, intx: any InterruptLine, port: Int, physicalSlot: Int,
                interruptPin: UInt8 = 1) {
        self.name = name
        self.stateSection = stateSection
        self.intx = intx
        self.physicalSlot = physicalSlot
        var identity = Self.identity
        identity.interruptPin = interruptPin
        var c = PCIConfigSpace(identity: identity, bridge: true)
        func le16(_ v: UInt16) -> [UInt8] { [UInt8(truncatingIfNeeded: v), UInt8(v >> 8)] }
        func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
        let slotCaps: UInt32 = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 4 | 1 << 6 | 1 << 18 | UInt32(physicalSlot & 0x1fff) << 19
        // Body from offset 2: capabilities, device caps/control/status, link caps/control/status,
        // slot caps/control/status, root control/caps/status, then the version-2 registers.
        var body = le16(0x0142) + le32(0) + le16(0) + le16(0)
        body += le32(0x11 | 1 << 20 | UInt32(port & 0xff) << 24) + le16(0) + le16(0x11)
        body += le32(slotCaps) + le16(0) + le16(0)
        body += le16(0) + le16(0) + le32(0)
        body += [UInt8](repeating: 0, count: 0x3c - 2 - body.count)
        let at = c.addCapability(id: 0x10, body: body,
                                 writeMasks: [6: 0x7fff, 14: 0x0fff, 22: 0x1fff, 26: 0x001f],
                                 clearMasks: [8: 0x000f, 24: 0x011f, 30: 0x0000])
        precondition(at == Self.expressCapability)
        pristine = c
        config = Mutex(c)
    }

    // MARK: PCIFunction

    public var barDescriptors: [Int: PCIBarDescriptor] { [:] }
    public func barAddress(_ index: Int) -> UInt64? { nil }
    public func barRead(index: Int, offset: UInt64, size: Int) -> UInt64 { ~0 }
    public func barWrite(index: Int, offset: UInt64, size: Int, value: UInt64) {}

    public func configRead(offset: Int, size: Int) -> UInt32 { config.withLock { $0.read(offset: offset, size: size) } }

    public func configWrite(offset: Int, size: Int, value: UInt32) {
        let slotControl = Self.expressCapability + Express.slotControl
        let (powerWentOff, present) = config.withLock { c -> (Bool, Bool) in
            let before = UInt16(c.read(offset: slotControl, size: 2))
            c.write(offset: offset, size: size, value: value)
            let after = UInt16(c.read(offset: slotControl, size: 2))
            let present = UInt16(c.read(offset: Self.expressCapability + Express.slotStatus, size: 2))
                & SlotStatus.presenceDetectState != 0
            return (before & SlotControl.powerControllerOff == 0 && after & SlotControl.powerControllerOff != 0, present)
        }
        updateInterrupt()
        if powerWentOff && present, let done = onPowerOff.withLock({ $0 }) { done() }
    }

    // MARK: PCIBridge

    public var secondaryBus: Int { Int(configRead(offset: PCIConfig.Bridge.secondaryBus, size: 1)) }
    public var child: (any PCIFunction)? { plugged.withLock { $0 } }

    // MARK: The slot

    /// Puts `device` in the slot: presence and link come up and, for a hot-plug, the driver is
    /// told (Presence Detect Changed, Data Link Layer State Changed, Attention Button Pressed).
    /// Throws when occupied.
    public func plug(_ device: any PCIFunction, hotPlug: Bool) throws(PCIError) {
        try plugged.withLock { (p: inout (any PCIFunction)?) throws(PCIError) in
            guard p == nil else { throw .slotInUse(0, function: 0) }
            p = device
        }
        // A hot-plug also presses the attention button, as QEMU does: Linux pciehp ignores
        // presence and link changes for a second after it powered a slot off, and the button
        // (which it then honours after its five-second wait) still brings the new device up.
        let hotPlugEvents = SlotStatus.presenceDetectChanged | SlotStatus.linkStateChanged | SlotStatus.attentionButtonPressed
        setSlot(present: true, events: hotPlug ? hotPlugEvents : 0, powerOn: !hotPlug)
    }

    /// Removes the device (after the driver powered the slot off, or a surprise removal):
    /// presence and link go down and the driver is told.
    public func unplug() {
        let had = plugged.withLock { p -> Bool in
            defer { p = nil }
            return p != nil
        }
        if had { setSlot(present: false, events: SlotStatus.presenceDetectChanged | SlotStatus.linkStateChanged) }
    }

    /// Presses the slot's attention button (how `device_del` asks the guest to let go).
    public func pressAttentionButton() { setSlot(present: nil, events: SlotStatus.attentionButtonPressed) }

    /// Sets presence and link (`present`), raises `events`, and with `powerOn` turns the slot's
    /// power on (a device present at power-on); a hot-added device waits for the driver to
    /// power the slot, as Linux pciehp expects (it leaves a powered slot alone: "Already enabled").
    private func setSlot(present: Bool?, events: UInt16, powerOn: Bool = false) {
        let status = Self.expressCapability + Express.slotStatus, link = Self.expressCapability + Express.linkStatus
        config.withLock { c in
            var s = UInt16(c.read(offset: status, size: 2)) | events
            var l = UInt16(c.read(offset: link, size: 2))
            if let present {
                s = present ? s | SlotStatus.presenceDetectState : s & ~SlotStatus.presenceDetectState
                l = present ? l | Self.linkActive : l & ~Self.linkActive
                if present && powerOn {
                    let control = Self.expressCapability + Express.slotControl
                    let sc = UInt16(c.read(offset: control, size: 2)) & ~SlotControl.powerControllerOff
                        & ~SlotControl.powerIndicatorMask | SlotControl.powerIndicatorOn
                    c.setReadOnly(offset: control, bytes: [UInt8(truncatingIfNeeded: sc), UInt8(sc >> 8)])
                }
            }
            c.setReadOnly(offset: status, bytes: [UInt8(truncatingIfNeeded: s), UInt8(s >> 8)])
            c.setReadOnly(offset: link, bytes: [UInt8(truncatingIfNeeded: l), UInt8(l >> 8)])
        }
        updateInterrupt()
    }

    /// INTA is high while an enabled event is pending and hot-plug interrupts are enabled.
    private func updateInterrupt() {
        let level = config.withLock { c -> Bool in
            let control = UInt16(c.read(offset: Self.expressCapability + Express.slotControl, size: 2))
            let status = UInt16(c.read(offset: Self.expressCapability + Express.slotStatus, size: 2))
            var enabled: UInt16 = 0
            if control & SlotControl.attentionButtonEnable != 0 { enabled |= SlotStatus.attentionButtonPressed }
            if control & SlotControl.presenceDetectEnable != 0 { enabled |= SlotStatus.presenceDetectChanged }
            if control & SlotControl.linkStateChangedEnable != 0 { enabled |= SlotStatus.linkStateChanged }
            let on = control & SlotControl.hotPlugInterruptEnable != 0 && status & enabled != 0
            c.setInterruptStatus(on)
            return on && c.command & PCIConfig.Command.interruptDisable == 0
        }
        intx.set(level)
    }
}

extension PCIeRootPort: StatefulDevice {
    /// The port's configuration space (bus numbers, windows, slot registers). The device in the
    /// slot saves its own section.
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        public var config: [UInt8]

        public init(config: [UInt8]) { self.config = config }
        public func encode(to w: inout StateWriter) { w.bytes(config) }
        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
            config = try r.bytes("config", limit: PCIConfig.size)
        }
    }

    /// Power-on: bus numbers and windows cleared, slot control at its defaults; presence and
    /// link follow whether a device is plugged.
    /// An empty slot starts powered off with its power indicator off (as QEMU's
    /// `pcie_cap_slot_reset`), so the driver powers it when a device arrives.
    public func reset() {
        config.withLock { c in
            c = pristine
            let control = Self.expressCapability + Express.slotControl
            let sc = UInt16(c.read(offset: control, size: 2)) & ~SlotControl.powerIndicatorMask
                | SlotControl.powerControllerOff | SlotControl.powerIndicatorOff
            c.setReadOnly(offset: control, bytes: [UInt8(truncatingIfNeeded: sc), UInt8(sc >> 8)])
        }
        if child != nil { setSlot(present: true, events: 0, powerOn: true) } else { updateInterrupt() }
    }

    public func captureState() -> State { State(config: config.withLock { $0.bytes }) }

    /// Refuses a configuration space of another kind of function, or one whose presence bit
    /// disagrees with whether this slot holds a device.
    public func applyState(_ s: State) throws(SavedStateError) {
        var c = pristine
        let cap = Self.expressCapability
        try c.restore(s.config, section: stateSection,
                      deviceOwned: [cap + Express.linkStatus, cap + Express.linkStatus + 1,
                                    cap + Express.slotStatus, cap + Express.slotStatus + 1])
        let present = UInt16(c.read(offset: Self.expressCapability + Express.slotStatus, size: 2))
            & SlotStatus.presenceDetectState != 0
        guard present == (child != nil) else {
            throw SavedStateError(section: stateSection, field: "config.slot-status",
                                  reason: present ? "saved with a device in the slot, this slot is empty"
                                                  : "saved with an empty slot, this slot holds a device")
        }
        config.withLock { $0 = c }
        updateInterrupt()
    }
}
