import Machine

/// The one owner of every device's lifecycle: boot-time and hot-plugged devices alike are
/// registered here, and system reset, pause (quiesce), resume and saved state all go through it,
/// in registration order. It never looks at what kind of device it holds.
///
/// Threading: used on the machine's control thread only, while no hart is in guest code
/// (registration also happens there, during board assembly and hot-plug).
public final class DeviceManager: @unchecked Sendable {  // control thread only, see above
    private var devices: [any ManagedDevice] = []

    public init() {}

    /// Every managed device, in registration order (the order of reset and of saved sections).
    public var all: [any ManagedDevice] { devices }

    /// Adds a device; its section name must be unique.
    public func register(_ device: any ManagedDevice) throws {
        guard !devices.contains(where: { $0.stateSection == device.stateSection }) else {
            throw BoardError.invalidConfig("two devices share the state section name '\(device.stateSection)'")
        }
        devices.append(device)
    }

    /// Removes a device (hot-unplug).
    public func unregister(_ device: any ManagedDevice) {
        devices.removeAll { $0 === device }
    }

    /// Puts every device in its power-on state.
    public func reset() { for d in devices { d.reset() } }

    /// Stops every device touching guest RAM; returns when all in-flight work is done.
    public func quiesce() { for d in devices { d.quiesce() } }

    /// Lets every device go on.
    public func resume() { for d in devices { d.resume() } }

    /// The device registered under `section`, if any.
    public func device(section: String) -> (any ManagedDevice)? {
        devices.first { $0.stateSection == section }
    }
}
