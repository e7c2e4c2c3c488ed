import Devices
import Machine
import QMP
import Schema
import Storage
import VNC

/// The machine's devices as QMP sees them (`DeviceRegistry`): the display, the VNC server,
/// the block devices, the network and hot-plug. Immutable after launch (hot-plug and the network
/// keep their own tables); any thread.
final class MachineDeviceRegistry: DeviceRegistry, Sendable {
    private let devices: MachineDevices
    private let vnc: VNCServer?
    private let machineNetwork: MachineNetwork?
    private let hotPlugRegistry: MachineHotPlug?

    init(devices: MachineDevices, vnc: VNCServer?, network: MachineNetwork? = nil, hotPlug: MachineHotPlug? = nil) {
        self.devices = devices
        self.vnc = vnc
        self.machineNetwork = network
        self.hotPlugRegistry = hotPlug
    }

    var network: (any NetworkRegistry)? { machineNetwork }
    var hotPlug: (any HotPlugRegistry)? { hotPlugRegistry }

    var display: Display? { devices.display }

    var remoteDisplay: (any RemoteDisplayServer)? { vnc }

    func inputDevice(id: String) -> (any InputSink)? {
        devices.inputs.first { $0.id == id }?.device
    }

    func peripherals() -> [(id: String, driver: String)] { devices.peripherals }

    func blockDevices() -> [BlockDeviceStatus] {
        devices.blocks.map { b in
            var backing: String? = nil
            var depth = 0
            if let q = b.image as? Qcow2Image {
                backing = q.header.backingFile
                var next = q.backing
                while let n = next {
                    depth += 1
                    next = (n as? Qcow2Image)?.backing
                }
            }
            let actual: UInt64?
            switch b.image {
            case let r as RawImage: actual = try? r.file.allocatedSize()
            case let q as Qcow2Image: actual = try? q.file.allocatedSize()
            default: actual = nil
            }
            return BlockDeviceStatus(id: b.id, file: b.image.path, format: b.image.format.rawValue, readOnly: b.readOnly,
                                     virtualSize: b.image.virtualSize, actualSize: actual, backingFile: backing,
                                     backingDepth: depth, nodeName: b.nodeName, fileNodeName: b.fileNodeName,
                                     statistics: b.device.statistics)
        } + (hotPlugRegistry?.hotPluggedDisks() ?? [])
    }
}

/// Turns the VNC server's viewer events into QMP's VNC_CONNECTED / VNC_INITIALIZED /
/// VNC_DISCONNECTED.
enum QMPVNCEvents {
    static func event(_ e: VNCClientEvent, server info: RemoteDisplayInfo) -> QMPEvent {
        let server = VncServerInfo(host: info.host, service: info.service,
                                   family: NetworkAddressFamily(rawValue: info.family) ?? .unknown,
                                   websocket: false, auth: info.auth)
        func basic(_ c: RemoteDisplayInfo.Client) -> VncBasicInfo {
            VncBasicInfo(host: c.host, service: c.service, family: NetworkAddressFamily(rawValue: c.family) ?? .unknown,
                         websocket: c.websocket)
        }
        func client(_ c: RemoteDisplayInfo.Client) -> VncClientInfo {
            VncClientInfo(host: c.host, service: c.service, family: NetworkAddressFamily(rawValue: c.family) ?? .unknown,
                          websocket: c.websocket)
        }
        switch e {
        case .connected(let c): return .vncConnected(VncConnectedEventData(server: server, client: basic(c)))
        case .initialized(let c): return .vncInitialized(VncInitializedEventData(server: server, client: client(c)))
        case .disconnected(let c): return .vncDisconnected(VncDisconnectedEventData(server: server, client: client(c)))
        }
    }
}
