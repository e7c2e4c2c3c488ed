import Machine

/// The one owner of every device's lifecycle: boot-time and hot-plugged devices alike are
/// registered here, and system reset, pause (quiesce), resume and saved state all go through it,
/// in registration order. It never looks at what kind of device it holds.
///
/// Threading: used on the machine's control thread only, while no hart is in guest code
/// (registration also happens there, during board assembly and hot-plug).
public final class DeviceManager: @unchecked Sendable {  // unchecked: used on the control thread only
    /// Where the board put a device: its window and interrupt source, for its device-tree node.
    public struct Placement: Sendable {
        public var window: GuestRegion
        public var irq: Int?
        public init(window: GuestRegion, irq: Int? = nil) {
            self.window = window
            self.irq = irq
        }
    }

    private var devices: [(device: any ManagedDevice, placement: Placement?, hotPlugged: String?)] = []

    public init() {}

    /// Every managed device, in registration order (the order of reset and of saved sections).
    public var all: [any ManagedDevice] { devices.map(\.device) }

    /// Adds a device, with where it sits when the guest finds it through the device tree; its
    /// section name must be unique. `hotPlugged` describes a device added while the machine
    /// runs ("the device in root port 'rp0'"), which saved states do not cover.
    public func register(_ device: any ManagedDevice, at placement: Placement? = nil, hotPlugged: String? = nil) throws {
        guard !devices.contains(where: { $0.device.stateSection == device.stateSection }) else {
            throw BoardError.invalidConfig("two devices share the state section name '\(device.stateSection)'")
        }
        devices.append((device, placement, hotPlugged))
    }

    /// The devices added while the machine ran, described as `register` was told, in order.
    public var hotPlugged: [String] { devices.compactMap(\.hotPlugged) }

    /// Removes a device (hot-unplug).
    public func unregister(_ device: any ManagedDevice) {
        devices.removeAll { $0.device === device }
    }

    /// Puts every device in its power-on state.
    public func reset() { for d in devices { d.device.reset() } }

    /// Stops every device touching guest RAM; returns when all in-flight work is done.
    public func quiesce() { for d in devices { d.device.quiesce() } }

    /// Lets every device go on.
    public func resume() { for d in devices { d.device.resume() } }

    /// The device registered under `section`, if any.
    public func device(section: String) -> (any ManagedDevice)? {
        devices.first { $0.device.stateSection == section }?.device
    }

    /// The device-tree nodes of every placed device, in registration order. `phandle` gives
    /// the phandle of a device other nodes refer to.
    public func deviceTreeNodes(interruptParent: UInt32, hartInterruptControllers: [UInt32],
                                phandle: (any ManagedDevice) -> UInt32?) -> [DeviceTreeNode] {
        devices.compactMap { d in
            guard let p = d.placement else { return nil }
            return d.device.deviceTreeNode(DeviceTreeContext(window: p.window, irq: p.irq, interruptParent: interruptParent,
                                                             hartInterruptControllers: hartInterruptControllers,
                                                             phandle: phandle(d.device)))
        }
    }
}
