import Testing
@testable import Schema

@Suite struct MachineDescriptionTests {
    let full = """
    {"version": 2, "machine": "virt", "name": "g", "cpus": 2, "memory": "256M", "kernel": "/k",
     "serial": {"backend": "ringbuf", "size": 4096},
     "qmp": [{"backend": "unix", "path": "/tmp/q.sock"}, {"backend": "tcp", "host": "127.0.0.1", "port": 4444}],
     "display": {"vnc": {"listen": "127.0.0.1:5900"}},
     "devices": [{"driver": "virtio-blk-device", "id": "d0", "drive": {"file": "/d.img", "format": "qcow2"}},
                 {"driver": "virtio-keyboard-device"}]}
    """

    @Test func parsesAFullDescription() throws {
        let d = try MachineDescription.parse(jsonText: full)
        #expect(d.cpus == 2)
        #expect(d.memoryBytes == 256 << 20)
        #expect(d.start == .running)
        #expect(d.serial?.variant == .ringbuf(SerialRingbufOptions(size: 4096)))
        #expect(d.qmp?.count == 2)
        guard case .virtioBlkDevice(let blk)? = d.devices?.first?.variant else {
            Issue.record("first device is not a block device")
            return
        }
        #expect(blk.drive.format == .qcow2)
        #expect(blk.drive.readOnly == false)
        // Encoding and decoding again gives the same description.
        #expect(try MachineDescription(json: d.json, at: .root) == d)
    }

    @Test func defaultsApplyWhenAbsent() throws {
        let d = try MachineDescription.parse(jsonText: #"{"machine":"virt","memory":"16M"}"#)
        #expect(d.cpus == 1 && d.version == nil && d.serial == nil)
    }

    func error(_ text: String) -> String {
        do {
            _ = try MachineDescription.parse(jsonText: text)
            return "no error"
        } catch {
            return error.description
        }
    }

    @Test func errorsNameTheFieldAndTheProblem() {
        let devs = #"{"machine":"virt","memory":"64M","devices":[{"driver":"virtio-gpu-device"},{"driver":"virtio-gpu-device"},{"driver":"virtio-blk-device","id":"x","drive":{"file":"/a","format":"vmdk"}}]}"#
        #expect(error(devs) == "machine description: devices[2].drive.format: expected one of raw, qcow2, got 'vmdk'")
        #expect(error(#"{"machine":"virt","memory":"64M","cpus":9}"#).contains("cpus: 9 is above the maximum 8"))
        #expect(error(#"{"machine":"virt","memory":"8M"}"#).contains("memory: 8M is smaller than the minimum 16M"))
        #expect(error(#"{"machine":"virt","memory":"lots"}"#).contains("memory: 'lots' is not a size"))
        #expect(error(#"{"memory":"64M"}"#) == "machine description: machine: required member is missing")
        #expect(error(#"{"machine":"virt"}"#) == "no error")  // memory defaults to QEMU's 128M
        #expect(error(#"{"machine":"virt","memory":"64M","colour":1}"#).contains("colour: unknown member"))
        #expect(error(#"{"machine":"virt","memory":"64M","cpus":"2"}"#).contains("cpus: expected integer, got string"))
        #expect(error(#"{"machine":"virt","memory":"64M","serial":{"backend":"stdio","path":"/x"}}"#).contains("serial.path: unknown member"))
        #expect(error(#"{"machine":"virt","memory":"64M","display":{"vnc":{"listen":"5900"}}}"#).contains("display.vnc.listen: '5900' is not HOST:PORT"))
        #expect(error("{") .hasPrefix("machine description is not valid JSON"))
    }

    @Test func newerVersionIsRefusedBeforeMembersAreChecked() {
        #expect(error(#"{"version":3,"machine":"virt","memory":"64M","newthing":true}"#)
            == "description version 3 is newer than this server understands (2)")
    }
}
