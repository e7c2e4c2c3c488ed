import Foundation
import Schema

/// One device of the description, checked: ids unique, files present, limits respected.
/// A plain value built on the main thread by `LaunchPlan`; `MachineDevices` turns it into
/// live devices.
struct PlannedDevice: Equatable {
    /// What the device is.
    enum Kind: Equatable {
        /// virtio-blk over an image file (absolute path) in `format`.
        case block(file: String, format: DriveFormat, readOnly: Bool)
        /// virtio-gpu (2D) publishing to the machine's display.
        case gpu
        /// virtio-input keyboard fed from the display.
        case keyboard
        /// virtio-input tablet (absolute pointer) fed from the display.
        case tablet
    }

    /// The device's id (`devices[i].id`), or a generated name ("virtio-gpu-device#0") when none was given.
    var id: String
    /// Whether `id` was given in the description (and so may be looked up over QMP).
    var hasExplicitID: Bool
    var kind: Kind
    /// Where it came from, for messages: "devices[2]", or "display.vnc" for devices the VNC
    /// display added.
    var origin: String

    /// The QEMU driver name ("virtio-blk-device", …).
    var driver: String {
        switch kind {
        case .block: return DeviceDriver.virtioBlkDevice.rawValue
        case .gpu: return DeviceDriver.virtioGpuDevice.rawValue
        case .keyboard: return DeviceDriver.virtioKeyboardDevice.rawValue
        case .tablet: return DeviceDriver.virtioTabletDevice.rawValue
        }
    }

    /// The number of virtio-mmio slots on the `virt` board.
    static let slotCount = 8

    /// Checks the description's devices and returns them in slot order, followed by the GPU,
    /// keyboard and tablet a VNC display adds when no GPU is listed.
    ///
    /// - `resolve` makes a description path absolute.
    /// - `vnc` is the VNC display's origin ("display.vnc" or "--vnc") when one is configured.
    /// Throws `LaunchError` naming `devices[i]` and the member at fault.
    static func plan(_ devices: [DeviceDescription], vnc: String?, resolve: (String) -> String) throws -> [PlannedDevice] {
        var planned: [PlannedDevice] = []
        var ids: [String: Int] = [:]
        var files: [String: Int] = [:]
        for (i, d) in devices.enumerated() {
            let field = "devices[\(i)]"
            let kind: Kind
            let explicitID: String?
            switch d.variant {
            case .virtioBlkDevice(let o):
                explicitID = o.id
                let file = resolve(o.drive.file)
                var isDirectory: ObjCBool = false
                guard FileManager.default.fileExists(atPath: file, isDirectory: &isDirectory) else {
                    throw LaunchError("\(field).drive.file: '\(file)' does not exist")
                }
                guard !isDirectory.boolValue else {
                    throw LaunchError("\(field).drive.file: '\(file)' is a directory, not a disk image")
                }
                let canonical = URL(fileURLWithPath: file).resolvingSymlinksInPath().path
                if let other = files[canonical] {
                    throw LaunchError("\(field).drive.file: '\(file)' is already the image of devices[\(other)]; one image cannot back two devices")
                }
                files[canonical] = i
                kind = .block(file: file, format: o.drive.format, readOnly: o.drive.readOnly)
            case .virtioGpuDevice(let o):
                explicitID = o.id
                if let first = planned.firstIndex(where: { $0.kind == .gpu }) {
                    throw LaunchError("\(field): only one virtio-gpu-device is supported (devices[\(first)] is one already)")
                }
                guard vnc != nil else {
                    throw LaunchError("\(field): a virtio-gpu-device needs a display to show it on: add \"display\": {\"vnc\": {\"listen\": \"127.0.0.1:5900\"}} or --vnc HOST:PORT")
                }
                kind = .gpu
            case .virtioKeyboardDevice(let o):
                explicitID = o.id
                kind = .keyboard
            case .virtioTabletDevice(let o):
                explicitID = o.id
                kind = .tablet
            }
            if let id = explicitID {
                guard !id.isEmpty else { throw LaunchError("\(field).id: an id must not be empty") }
                if let other = ids[id] {
                    throw LaunchError("\(field).id: '\(id)' is already the id of devices[\(other)]")
                }
                ids[id] = i
            }
            planned.append(PlannedDevice(id: explicitID ?? "\(d.driver.rawValue)#\(i)", hasExplicitID: explicitID != nil,
                                         kind: kind, origin: field))
        }
        if planned.count > slotCount {
            throw LaunchError("devices[\(slotCount)]: the virt board has \(slotCount) virtio-mmio slots; \(planned.count) devices are listed")
        }
        if let vnc, !planned.contains(where: { $0.kind == .gpu }) {
            // A user who asks for VNC expects a screen: add what a graphical console needs.
            var added: [PlannedDevice] = [PlannedDevice(id: "virtio-gpu-device#auto", hasExplicitID: false, kind: .gpu, origin: vnc)]
            if !planned.contains(where: { $0.kind == .keyboard }) {
                added.append(PlannedDevice(id: "virtio-keyboard-device#auto", hasExplicitID: false, kind: .keyboard, origin: vnc))
            }
            if !planned.contains(where: { $0.kind == .tablet }) {
                added.append(PlannedDevice(id: "virtio-tablet-device#auto", hasExplicitID: false, kind: .tablet, origin: vnc))
            }
            if planned.count + added.count > slotCount {
                throw LaunchError("\(vnc): the VNC display adds \(added.map(\.driver).joined(separator: ", ")), but with the \(planned.count) listed devices that exceeds the board's \(slotCount) virtio-mmio slots; list a virtio-gpu-device yourself or remove a device")
            }
            planned += added
        }
        return planned
    }
}
