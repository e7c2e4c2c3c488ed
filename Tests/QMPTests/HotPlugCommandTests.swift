import Foundation
import FuzzSupport
import Machine
import Schema
import Synchronization
import Testing
@testable import QMP

/// A hot-plug registry that records the requests that reach it and refuses what `refuse` says.
final class FakeHotPlug: HotPlugRegistry {
    let added = Mutex<[DeviceAddRequest]>([])
    let deleted = Mutex<[String]>([])
    let nodesAdded = Mutex<[BlockNodeRequest]>([])
    let refuse: HotPlugError?
    init(refuse: HotPlugError? = nil) { self.refuse = refuse }
    func addDevice(_ request: DeviceAddRequest) throws {
        if let refuse { throw refuse }
        added.withLock { $0.append(request) }
    }
    func deleteDevice(id: String) throws {
        guard id == "disk1" else { throw HotPlugError.deviceNotFound(id) }
        deleted.withLock { $0.append(id) }
    }
    func addNode(_ request: BlockNodeRequest) throws {
        if let refuse { throw refuse }
        nodesAdded.withLock { $0.append(request) }
    }
    func deleteNode(name: String) throws { throw HotPlugError.nodeBusy(node: name, user: "device 'disk1'") }
    func nodes() -> [BlockNodeStatus] { [BlockNodeStatus(nodeName: "node1", driver: "qcow2", filename: "/i/a.qcow2", readOnly: false,
                                                         virtualSize: 1 << 20)] }
    func hotPluggedDisks() -> [BlockDeviceStatus] { [] }
    func peripherals() -> [PeripheralDevice] {
        [PeripheralDevice(id: "disk1", path: "/machine/peripheral/disk1", driver: "virtio-blk-pci", hotPlugged: true,
                          hotPluggable: true, properties: [("bus", "rp0"), ("drive", "node1")])]
    }
    func pciBuses() -> [PciInfo] { [PciInfo(bus: 0, devices: [])] }
    func currentDescription() throws -> MachineDescription { MachineDescription(machine: .virt, memory: "256M") }
    func apply(_ description: MachineDescription) throws { throw HotPlugError.cannotApply("memory") }
}

final class HotPlugDevices: DeviceRegistry {
    let fake: FakeHotPlug
    init(_ fake: FakeHotPlug) { self.fake = fake }
    var display: Display? { nil }
    var remoteDisplay: (any RemoteDisplayServer)? { nil }
    func inputDevice(id: String) -> (any InputSink)? { nil }
    func blockDevices() -> [BlockDeviceStatus] { [] }
    var hotPlug: (any HotPlugRegistry)? { fake }
}

@Suite struct HotPlugCommandTests {
    func request(_ o: JSONValue) throws -> DeviceAddRequest {
        try QMPCommandExecutor.deviceAddRequest(DeviceAddArguments(json: o, at: .root))
    }

    func refusal(_ o: JSONValue) -> HotPlugError? {
        do {
            _ = try request(o)
            return nil
        } catch let e as HotPlugError {
            return e
        } catch {
            return .failed("\(error)")
        }
    }

    @Test func deviceAddTakesQEMUsArgumentsAndDriverProperties() throws {
        let r = try request(["driver": "virtio-blk-pci", "id": "disk1", "bus": "rp0", "drive": "node1", "addr": "0.0",
                             "serial": "SN1"])
        #expect(r == DeviceAddRequest(driver: .virtioBlkPci, id: "disk1", bus: "rp0", drive: "node1", serial: "SN1"))
        #expect(try request(["driver": "virtio-rng-pci", "bus": "rp1", "addr": 0]).driver == .virtioRngPci)
        #expect(try request(["driver": "virtio-tablet-pci", "bus": "rp1", "addr": "0x0"]).id == nil)
    }

    @Test func deviceAddRefusalsNameTheProblem() {
        #expect(refusal(["driver": "virtio-foo"]) == .unknownDriver("virtio-foo"))
        #expect(refusal(["driver": "virtio-gpu-pci"]) == .notHotPluggable("virtio-gpu-pci"))
        #expect(refusal(["driver": "pcie-root-port", "id": "rp9"]) == .notHotPluggable("pcie-root-port"))
        #expect(refusal(["driver": "virtio-rng-pci", "drive": "n"]) == .unknownProperty(driver: "virtio-rng-pci", property: "drive"))
        #expect(refusal(["driver": "virtio-blk-pci", "bus": "rp0"]) == .driveMissing(driver: "virtio-blk-pci"))
        #expect(refusal(["driver": "virtio-rng-pci", "id": "1abc"]) == .badID("1abc"))
        #expect(refusal(["driver": "virtio-rng-pci", "id": "a b"]) == .badID("a b"))
        if case .badProperty(_, "addr", _)? = refusal(["driver": "virtio-rng-pci", "addr": "3"]) {} else { Issue.record("addr 3") }
        if case .badProperty(_, "addr", _)? = refusal(["driver": "virtio-rng-pci", "addr": "0.1"]) {} else { Issue.record("addr 0.1") }
        if case .badProperty(_, "drive", _)? = refusal(["driver": "virtio-blk-pci", "drive": 3]) {} else { Issue.record("drive 3") }
        if case .badProperty(_, "serial", _)? = refusal(["driver": "virtio-blk-pci", "drive": "n", "serial": .string(String(repeating: "x", count: 21))]) {} else {
            Issue.record("serial")
        }
        #expect(HotPlugError.unknownDriver("x").description.contains("'x' is not a valid device model name"))
        #expect(HotPlugError.deviceNotFound("x").errorClass == .deviceNotFound)
        #expect(HotPlugError.busNotFound("x").errorClass == .genericError)
    }

    @Test func deviceAddOfAVirtioNetPciTakesNetdevAndMac() throws {
        let r = try request(["driver": "virtio-net-pci", "id": "nic0", "bus": "rp0", "netdev": "n0", "mac": "52:54:00:AB:cd:01",
                             "addr": "0"])
        #expect(r == DeviceAddRequest(driver: .virtioNetPci, id: "nic0", bus: "rp0", netdev: "n0",
                                      mac: MACAddress(bytes: [0x52, 0x54, 0, 0xab, 0xcd, 1])))
        #expect(r.mac?.description == "52:54:00:ab:cd:01")
        // Neither is required: a NIC with no cable, QEMU's default address.
        let bare = try request(["driver": "virtio-net-pci", "bus": "rp1"])
        #expect(bare.netdev == nil && bare.mac == nil && bare.id == nil)
        // Refusals, in QEMU's qdev wording.
        #expect(refusal(["driver": "virtio-net-pci", "bus": "rp0", "mac": "52:54:00:12:34"])
                == .badValue(driver: "virtio-net-pci", property: "mac", value: "52:54:00:12:34",
                             why: "expected six hex bytes separated by ':', e.g. 52:54:00:12:34:56"))
        if case .badValue(_, "mac", "03:00:00:00:00:01", let why)? = refusal(["driver": "virtio-net-pci", "mac": "03:00:00:00:00:01"]) {
            #expect(why.contains("multicast"))
        } else {
            Issue.record("a multicast mac was taken")
        }
        if case .badProperty(_, "netdev", _)? = refusal(["driver": "virtio-net-pci", "netdev": 1]) {} else { Issue.record("netdev 1") }
        if case .badProperty(_, "mac", _)? = refusal(["driver": "virtio-net-pci", "mac": true]) {} else { Issue.record("mac true") }
        #expect(refusal(["driver": "virtio-net-pci", "drive": "n"]) == .unknownProperty(driver: "virtio-net-pci", property: "drive"))
        #expect(refusal(["driver": "virtio-rng-pci", "netdev": "n0"]) == .unknownProperty(driver: "virtio-rng-pci", property: "netdev"))
        #expect(refusal(["driver": "virtio-net-device", "netdev": "n0"]) == .notHotPluggable("virtio-net-device"))
        #expect(HotPlugError.netdevNotFound(driver: "virtio-net-pci", netdev: "x").description
                .hasPrefix("Property 'virtio-net-pci.netdev' can't find value 'x'"))
        #expect(HotPlugError.netdevInUse(driver: "virtio-net-pci", netdev: "n0", user: "nic0").description
                .hasPrefix("Property 'virtio-net-pci.netdev' can't take value 'n0', it's in use"))
        #expect(HotPlugError.netdevInUse(driver: "virtio-net-pci", netdev: "n0", user: "nic0").errorClass == .genericError)
    }

    /// device_add's `mac` is outside input: any string is either a unicast address that reads
    /// back the same (ignoring case), or refused with badValue naming it.
    @Test func fuzzedMacsAreParsedOrRefused() {
        let seeds = ["52:54:00:12:34:56", "ff:ff:ff:ff:ff:ff", "0:1:2:3:4:5", "52:54:00:12:34:5g", "+1:54:00:12:34:56"].map { Array($0.utf8) }
        let report = Fuzz.run(target: "device-add-mac", seeds: seeds, seconds: Fuzz.budget(ci: 1), maxLength: 64,
                              dictionary: [Array(":".utf8), Array("0x".utf8), Array("-".utf8)]) { bytes in
            let text = String(decoding: bytes, as: UTF8.self)
            do {
                let r = try QMPCommandExecutor.deviceAddRequest(DeviceAddArguments(json: ["driver": "virtio-net-pci", "mac": .string(text)], at: .root))
                guard let mac = r.mac else { Issue.record("no mac for \(text)"); return }
                #expect(mac.description == text.lowercased() && !mac.isMulticast, "\(text)")
            } catch let e as HotPlugError {
                guard case .badValue(_, "mac", text, _) = e else { Issue.record("\(text): \(e)"); return }
                throw e
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(report.executions > seeds.count)
    }

    @Test func refusedRequestsNeverReachTheMachine() {
        let fake = FakeHotPlug()
        var h = Harness(devices: HotPlugDevices(fake))
        for args in [#"{"driver":"virtio-foo","bus":"rp0"}"#, #"{"driver":"virtio-rng-pci","bus":"rp0","bogus":1}"#,
                     #"{"bus":"rp0"}"#, #"{"driver":"virtio-blk-pci","bus":"rp0"}"#] {
            let e = errorOf(h.one(#"{"execute":"device_add","arguments":\#(args)}"#))
            #expect(e?.0 == "GenericError", "\(args)")
        }
        #expect(fake.added.withLock { $0 }.isEmpty)
        let ok = h.one(#"{"execute":"device_add","arguments":{"driver":"virtio-rng-pci","id":"r","bus":"rp0"}}"#)
        #expect(ok["return"] == .object(JSONObject()))
        #expect(fake.added.withLock { $0 } == [DeviceAddRequest(driver: .virtioRngPci, id: "r", bus: "rp0")])
    }

    @Test func machineRefusalsMapToQEMUsClasses() {
        var h = Harness(devices: HotPlugDevices(FakeHotPlug(refuse: .slotBusy(bus: "rp0", driver: "virtio-rng-pci", occupant: "'d'"))))
        let busy = errorOf(h.one(#"{"execute":"device_add","arguments":{"driver":"virtio-rng-pci","bus":"rp0"}}"#))
        #expect(busy?.0 == "GenericError" && busy?.1.contains("in use by 'd' on bus 'rp0'") == true)
        let missing = errorOf(h.one(#"{"execute":"device_del","arguments":{"id":"nope"}}"#))
        #expect(missing?.0 == "DeviceNotFound" && missing?.1 == "Device 'nope' not found")
        let inUse = errorOf(h.one(#"{"execute":"blockdev-del","arguments":{"node-name":"node1"}}"#))
        #expect(inUse?.0 == "GenericError" && inUse?.1.contains("disk1") == true)
        // Without hot-plug (no PCIe) the commands say so.
        var bare = Harness()
        let none = errorOf(bare.one(#"{"execute":"device_add","arguments":{"driver":"virtio-rng-pci","bus":"rp0"}}"#))
        #expect(none?.1.contains("no PCIe bus") == true)
        #expect(bare.one(#"{"execute":"query-pci"}"#)["return"] == .array([]))
    }

    @Test func blockdevAddOptionsBecomeOneRequest() throws {
        func node(_ json: String) throws -> BlockNodeRequest {
            try QMPCommandExecutor.blockNodeRequest(BlockdevOptions(json: JSONValue.parse(json), at: .root))
        }
        #expect(try node(#"{"driver":"qcow2","node-name":"n1","file":{"driver":"file","filename":"/a.qcow2"},"read-only":true}"#)
                == BlockNodeRequest(nodeName: "n1", kind: .format(driver: "qcow2", file: .inline(filename: "/a.qcow2"), noBacking: false),
                                    readOnly: true))
        #expect(try node(#"{"driver":"raw","node-name":"n2","file":"f0"}"#)
                == BlockNodeRequest(nodeName: "n2", kind: .format(driver: "raw", file: .node("f0"), noBacking: false), readOnly: false))
        #expect(try node(#"{"driver":"qcow2","node-name":"n3","file":"f0","backing":null}"#).kind
                == .format(driver: "qcow2", file: .node("f0"), noBacking: true))
        #expect(try node(#"{"driver":"file","node-name":"f0","filename":"/a.raw"}"#).kind == .file(filename: "/a.raw"))
        func refusal(_ json: String) -> String? {
            do {
                _ = try node(json)
                return nil
            } catch {
                return "\(error)"
            }
        }
        #expect(refusal(#"{"driver":"qcow2","file":"f0"}"#)?.contains("'node-name' must be specified") == true)
        #expect(refusal(##"{"driver":"qcow2","node-name":"#x","file":"f0"}"##)?.contains("Invalid node-name") == true)
        #expect(refusal(#"{"driver":"qcow2","node-name":"n","file":{"driver":"raw","file":"f0"}}"#)?.contains("only a file node") == true)
        #expect(refusal(#"{"driver":"qcow2","node-name":"n","file":{"driver":"file"}}"#)?.contains("filename") == true)
        #expect(refusal(#"{"driver":"qcow2","node-name":"n","file":3}"#)?.contains("Parameter 'file'") == true)
        #expect(refusal(#"{"driver":"qcow2","node-name":"n","file":"f0","backing":"b"}"#)?.contains("backing") == true)
        #expect(refusal(#"{"driver":"vmdk","node-name":"n","file":"f0"}"#)?.contains("vmdk") == true)
        // libvirt's nodes for attach-device.
        #expect(try node(#"{"driver":"file","filename":"/a.qcow2","node-name":"libvirt-2-storage","auto-read-only":true,"discard":"unmap"}"#)
                == BlockNodeRequest(nodeName: "libvirt-2-storage", kind: .file(filename: "/a.qcow2"), readOnly: false))
        #expect(refusal(#"{"driver":"file","filename":"/a","node-name":"n","discard":"ignore"}"#)?.contains("'ignore' is not supported") == true)
    }

    @Test func hmpDeviceAddAndDeviceDelGoThroughTheSameChecks() {
        let fake = FakeHotPlug()
        var h = Harness(devices: HotPlugDevices(fake))
        func hmp(_ line: String) -> JSONValue? {
            h.one(#"{"execute":"human-monitor-command","arguments":{"command-line":"\#(line)"}}"#)["return"]
        }
        #expect(hmp("device_add virtio-blk-pci,id=disk2,bus=rp1,drive=node2") == "")
        #expect(fake.added.withLock { $0 } == [DeviceAddRequest(driver: .virtioBlkPci, id: "disk2", bus: "rp1", drive: "node2")])
        #expect(hmp("device_add virtio-rng-pci,bus=rp1,oops=1") == "Error: Property 'virtio-rng-pci.oops' not found\r\n")
        #expect(hmp("device_add virtio-rng-pci,bus") == "Error: device_add: 'bus' is not KEY=VALUE\r\n")
        #expect(hmp("device_del disk1") == "")
        #expect(hmp("device_del nope") == "Error: Device 'nope' not found\r\n")
        #expect(fake.deleted.withLock { $0 } == ["disk1"])
        #expect(fake.added.withLock { $0 }.count == 1)
    }

    @Test func qomShowsPeripheralDevices() {
        var h = Harness(devices: HotPlugDevices(FakeHotPlug()))
        let list = h.one(#"{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}"#)["return"]
        #expect(list == [["name": "type", "type": "string"], ["name": "disk1", "type": "child<virtio-blk-pci>"]])
        #expect(h.one(#"{"execute":"qom-get","arguments":{"path":"/machine/peripheral/disk1","property":"drive"}}"#)["return"] == "node1")
        #expect(h.one(#"{"execute":"qom-get","arguments":{"path":"/machine/peripheral/disk1","property":"type"}}"#)["return"]
                == "virtio-blk-pci")
        #expect(errorOf(h.one(#"{"execute":"qom-get","arguments":{"path":"/machine/peripheral/x","property":"type"}}"#))?.0
                == "DeviceNotFound")
        #expect(errorOf(h.one(#"{"execute":"qom-get","arguments":{"path":"/machine/peripheral/disk1","property":"nope"}}"#))?.0
                == "GenericError")
    }
}
