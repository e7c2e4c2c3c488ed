import Board
import Devices
import Foundation
import Logging
import Machine
import Net
import Storage

/// The live devices of one machine: opened images, the virtio devices, the display they share,
/// and the factories that put each into its virtio-mmio slot.
///
/// Built on the main thread before the board (so image errors stop the launch before anything
/// runs); `close()` runs on the main thread after the machine has stopped.
final class MachineDevices: Sendable {
    /// One virtio-blk device and its image.
    struct Block {
        let id: String
        let hasExplicitID: Bool
        let device: VirtioBlock
        let image: any BlockImage
        let readOnly: Bool
        /// The drive's block node names (query-named-block-nodes), when given.
        var nodeName: String? = nil
        var fileNodeName: String? = nil
    }

    /// The display hub the GPU publishes to and the input devices read from; nil when the
    /// description has no GPU, keyboard or tablet (then nothing display-related exists).
    let display: Display?
    let blocks: [Block]
    /// The devices with an id given by the user, with their drivers (QOM's /machine/peripheral).
    let peripherals: [(id: String, driver: String)]
    let gpu: VirtioGPU?
    let keyboards: [VirtioInput]
    let tablets: [VirtioInput]
    /// Every input device with its id (explicit or generated), for `input-send-event`'s `device`.
    let inputs: [(id: String, device: VirtioInput)]
    /// The transports in slot order, for `BoardConfig.virtioTransports`.
    let transports: [MMIODeviceFactory]
    /// The virtio-pci functions with their slots, for `BoardConfig.pciDevices`.
    let pciDevices: [PCIPlacement]
    /// The threads behind NICs without a netdev (closed with the devices).
    let unconnectedBackends: [DisconnectedNetwork]

    /// Opens every image (taking QEMU-compatible locks unless `lockImages` is false) and builds every device.
    /// Throws `LaunchError` naming the device (`devices[i]`) and the file.
    /// `lockImages` false leaves the images unlocked (a migration destination takes the locks
    /// when the state arrives, with `BlockImage.activate`).
    init(_ planned: [PlannedDevice], network: MachineNetwork? = nil, lockImages: Bool = true) throws {
        let needsDisplay = planned.contains { $0.kind == .gpu || $0.kind == .keyboard || $0.kind == .tablet }
        let display = needsDisplay ? Display(id: "video0") : nil
        var blocks: [Block] = []
        var gpu: VirtioGPU?
        var keyboards: [VirtioInput] = []
        var tablets: [VirtioInput] = []
        var inputs: [(id: String, device: VirtioInput)] = []
        var transports: [MMIODeviceFactory] = []
        var pciDevices: [PCIPlacement] = []
        var blockIndex = 0
        var rngCount = 0
        var nicCount = 0
        var unconnectedBackends: [DisconnectedNetwork] = []
        do {
            for p in planned {
                if case .rootPort(let physicalSlot) = p.kind {
                    pciDevices.append(.rootPort(id: p.id, slot: p.transport == .mmio ? nil : p.pciSlotNumber,
                                                function: p.pciFunctionNumber, multifunction: p.multifunction,
                                                physicalSlot: physicalSlot))
                    continue
                }
                let device: any VirtioDevice
                switch p.kind {
                case .block(let file, let format, let readOnly):
                    let image: any BlockImage
                    do {
                        image = try openImage(path: file, format: Storage.ImageFormat(rawValue: format.rawValue),
                                              readOnly: readOnly, lock: lockImages)
                    } catch let e as StorageError {
                        throw LaunchError("\(p.origin).drive.file: \(Self.oneLine(e.description))")
                    }
                    let name = "virtio-blk\(blockIndex)"
                    blockIndex += 1
                    let blk = VirtioBlock(drive: DriveConfig(image: image, readOnly: readOnly,
                                                             serial: p.hasExplicitID ? p.id : ""),
                                          name: name, logger: Logger(label: "machine.\(name)"))
                    blocks.append(Block(id: p.id, hasExplicitID: p.hasExplicitID, device: blk, image: image, readOnly: readOnly,
                                        nodeName: p.nodeName, fileNodeName: p.fileNodeName))
                    device = blk
                case .gpu:
                    let g = VirtioGPU(display: display!, logger: Self.logger("machine.virtio-gpu"))
                    gpu = g
                    device = g
                case .keyboard:
                    let k = VirtioInput(kind: .keyboard, display: display, name: "virtio-keyboard\(keyboards.count)")
                    keyboards.append(k)
                    inputs.append((p.id, k))
                    device = k
                case .tablet:
                    let t = VirtioInput(kind: .tablet, display: display, name: "virtio-tablet\(tablets.count)")
                    tablets.append(t)
                    inputs.append((p.id, t))
                    device = t
                case .rootPort:
                    preconditionFailure("root ports are placed above")
                case .rng:
                    device = VirtioEntropy(name: "virtio-rng\(rngCount)")
                    rngCount += 1
                case .net(let netdev, let mac):
                    let name = "virtio-net\(nicCount)"
                    nicCount += 1
                    let backend: any NetworkBackend
                    if let n = netdev.flatMap({ network?.netdev($0) }) {
                        backend = n
                    } else {
                        let unconnected = DisconnectedNetwork(id: "\(p.id)-unconnected")
                        unconnectedBackends.append(unconnected)
                        backend = unconnected
                    }
                    let nic = VirtioNet(mac: mac, backend: backend, name: name, logger: Self.logger("machine.virtio-net"))
                    network?.addNIC(MachineNetwork.NIC(id: p.id, driver: p.driver, device: nic, netdev: netdev))
                    device = nic
                }
                switch p.transport {
                case .mmio:
                    transports.append { context in
                        VirtioMMIOTransport(device: device, ram: context.ram, interrupt: context.irq,
                                            name: "virtio-mmio@\(String(context.region.base.raw, radix: 16)) (\(device.name))",
                                            stateSection: "virtio-mmio@\(String(context.region.base.raw, radix: 16))")
                    }
                case .pci, .pciPort:
                    let driver = p.driver
                    let make: PCIDeviceFactory = { context in
                        VirtioPCITransport(device: device, ram: context.ram, intx: context.intx,
                                           name: "\(driver) \(context.address) (\(device.name))",
                                           stateSection: "virtio-pci@\(context.address)",
                                           logger: Self.logger("machine.virtio-pci"))
                    }
                    if case .pciPort(let port) = p.transport {
                        pciDevices.append(PCIPlacement(port: port, make: make))
                    } else {
                        pciDevices.append(PCIPlacement(slot: p.pciSlotNumber, function: p.pciFunctionNumber,
                                                       multifunction: p.multifunction, make: make))
                    }
                }
            }
        } catch {
            for b in blocks { b.device.reset() }
            for u in unconnectedBackends { u.close() }
            throw error
        }
        self.unconnectedBackends = unconnectedBackends
        self.display = display
        self.blocks = blocks
        self.peripherals = planned.filter(\.hasExplicitID).map { ($0.id, $0.driver) }
        self.gpu = gpu
        self.keyboards = keyboards
        self.tablets = tablets
        self.inputs = inputs
        self.transports = transports
        self.pciDevices = pciDevices
    }

    /// Finishes in-flight block requests and flushes every writable image to disk. Call once the
    /// vCPUs have stopped; the images' locks go when the process exits.
    func close() {
        for u in unconnectedBackends { u.close() }
        for b in blocks {
            b.device.reset()   // drains the device's I/O queue
            if !b.readOnly {
                do {
                    try b.image.flush()
                } catch {
                    FileHandle.standardError.write(Data("machine-server: warning: flushing '\(b.image.path)' failed: \(error)\n".utf8))
                }
            }
        }
    }

    /// A logger whose level comes from MACHINE_SERVER_TRACE (a comma-separated list of labels
    /// to log at trace level, e.g. "machine.virtio-gpu"); otherwise the default level.
    static func logger(_ label: String) -> Logger {
        var l = Logger(label: label)
        let wanted = ProcessInfo.processInfo.environment["MACHINE_SERVER_TRACE"]?.split(separator: ",").map(String.init) ?? []
        if wanted.contains(label) || wanted.contains("all") { l.logLevel = .trace }
        return l
    }

    private static func oneLine(_ s: String) -> String { s.replacingOccurrences(of: "\n", with: "; ") }
}
