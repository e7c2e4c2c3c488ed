import Machine
import Schema
import Testing
@testable import QMP

/// Drives a session in memory, running executes synchronously like the server does.
struct Harness {
    var session = QMPSession(maxMessageSize: 64 * 1024)
    let machine = FakeMachine()
    let chardevs = FakeChardevs()
    let executor: QMPCommandExecutor
    var closed = false

    init(negotiate: Bool = true, devices: (any DeviceRegistry)? = nil) {
        executor = QMPCommandExecutor(control: machine, chardevs: chardevs, devices: devices,
                                      version: QMPServerConfiguration().version)
        if negotiate { _ = send(#"{"execute":"qmp_capabilities"}"#) }
    }

    /// Feeds text and returns the messages the server would write.
    mutating func send(_ text: String) -> [JSONValue] { feed(Array(text.utf8)) }

    mutating func feed(_ bytes: [UInt8]) -> [JSONValue] {
        var out: [JSONValue] = []
        for a in session.receive(bytes) {
            switch a {
            case .send(let m): out.append(m)
            case .execute(let id, let c): out.append(QMPSession.reply(id: id, result: executor.run(c)))
            case .close: closed = true
            }
        }
        return out
    }

    /// Sends one request and returns its single reply.
    mutating func one(_ text: String) -> JSONValue {
        let r = send(text)
        #expect(r.count == 1, "expected one reply to \(text), got \(r)")
        return r.first ?? .null
    }
}

func errorOf(_ reply: JSONValue) -> (String, String)? {
    guard case .string(let c)? = reply["error"]?["class"], case .string(let d)? = reply["error"]?["desc"] else { return nil }
    return (c, d)
}

@Suite struct SessionTests {
    @Test func greetingHasVersionAndNoCapabilities() {
        let g = QMPSession.greeting(version: QMPServerConfiguration().version)
        #expect(g.serialized() == #"{"QMP":{"version":{"qemu":{"major":7,"minor":2,"micro":0},"package":"machine-server 0.1.0"},"capabilities":[]}}"#)
    }

    @Test func commandsBeforeNegotiationAreRefused() {
        var h = Harness(negotiate: false)
        for cmd in ["query-status", "no-such-command"] {
            let e = errorOf(h.one(#"{"execute":"\#(cmd)"}"#))
            #expect(e?.0 == "CommandNotFound")
            #expect(e?.1 == "Expecting capabilities negotiation with 'qmp_capabilities'")
        }
        #expect(h.machine.calls.isEmpty)
        #expect(h.one(#"{"execute":"qmp_capabilities","id":1}"#) == ["return": [:], "id": 1])
        #expect(h.session.negotiated)
        let again = errorOf(h.one(#"{"execute":"qmp_capabilities"}"#))
        #expect(again?.0 == "CommandNotFound")
        #expect(again?.1 == "Capabilities negotiation is already complete, command ignored")
    }

    @Test func enablingAnUnadvertisedCapabilityFails() {
        var h = Harness(negotiate: false)
        #expect(errorOf(h.one(#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#))?.1 == "Capability 'oob' not available")
        #expect(errorOf(h.one(#"{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}"#))?.1 == "Parameter 'null' does not accept value 'x'")  // QEMU 7.2's wording
        #expect(!h.session.negotiated)
    }

    @Test func idIsEchoedExactlyAndAbsentWhenAbsent() {
        var h = Harness()
        let ids: [JSONValue] = ["abc", 7, 1.5, nil, [1, ["x": true]], ["nested": ["a": []]]]
        for id in ids {
            let req: JSONValue = ["execute": "query-name", "id": id]
            let r = h.one(req.serialized())
            #expect(r["id"] == id)
            #expect(r["return"] == ["name": "fake"])
        }
        let r = h.one(#"{"execute":"query-name"}"#)
        #expect(r.objectValue?.keys == ["return"])
        // Errors echo the id too.
        #expect(h.one(#"{"execute":"nope","id":"e1"}"#)["id"] == "e1")
    }

    @Test func envelopeErrorsUseQEMUsWording() {
        var h = Harness()
        #expect(errorOf(h.one("[1,2]"))?.1 == "QMP input must be a JSON object")
        #expect(errorOf(h.one(#"{"id":1}"#))?.1 == "QMP input lacks member 'execute'")
        #expect(errorOf(h.one(#"{"execute":1}"#))?.1 == "QMP input member 'execute' must be a string")
        #expect(errorOf(h.one(#"{"execute":"stop","arguments":[]}"#))?.1 == "QMP input member 'arguments' must be an object")
        #expect(errorOf(h.one(#"{"execute":"stop","bogus":1}"#))?.1 == "QMP input member 'bogus' is unexpected")
        let nf = errorOf(h.one(#"{"execute":"frobnicate"}"#))
        #expect(nf?.0 == "CommandNotFound" && nf?.1 == "The command frobnicate has not been found")
        let parse = errorOf(h.one(#"{"execute":"stop",}"#))
        #expect(parse?.0 == "GenericError")
        #expect(parse?.1.hasPrefix("JSON parse error, ") == true)
        #expect(h.machine.calls.isEmpty)
    }

    @Test func oversizeMessageGetsOneErrorAndTheStreamRecovers() {
        var h = Harness()
        let big = #"{"execute":"stop","arguments":{"x":""# + String(repeating: "a", count: 70 * 1024) + #""}}"#
        let r = h.send(big + #"{"execute":"query-name","id":"next"}"#)
        #expect(r.count == 2, "\(r)")
        #expect(errorOf(r.first ?? .null)?.0 == "GenericError")
        #expect(errorOf(r.first ?? .null)?.1 == "JSON token size limit exceeded")
        #expect(r.last?["id"] == "next" && r.last?["return"] != nil)
        #expect(!h.closed)
        #expect(h.machine.calls.isEmpty)
    }

    @Test func runControlCommandsReachTheMachine() {
        var h = Harness()
        #expect(h.one(#"{"execute":"query-status"}"#)["return"] == ["running": true, "singlestep": false, "status": "running"])
        #expect(h.one(#"{"execute":"stop"}"#) == ["return": [:]])
        #expect(h.one(#"{"execute":"query-status"}"#)["return"]?["status"] == "paused")
        _ = h.one(#"{"execute":"cont"}"#)
        _ = h.one(#"{"execute":"system_reset"}"#)
        _ = h.one(#"{"execute":"system_powerdown"}"#)
        #expect(h.machine.calls == ["stop", "cont", "system_reset", "system_powerdown"])
        #expect(h.one(#"{"execute":"quit"}"#) == ["return": [:]])
        // quit is deferred until the reply is written.
        #expect(h.machine.calls.count == 4)
        #expect(h.executor.takeQuitRequest())
        #expect(!h.executor.takeQuitRequest())
    }

    @Test func queriesAnswerFromTheMachine() {
        var h = Harness()
        let cpus = h.one(#"{"execute":"query-cpus-fast"}"#)["return"]
        #expect(cpus == [["cpu-index": 0, "qom-path": "/machine/soc0/harts[0]", "thread-id": 100, "target": "riscv64"],
                         ["cpu-index": 1, "qom-path": "/machine/soc0/harts[1]", "thread-id": 101, "target": "riscv64"]])
        let cmds = h.one(#"{"execute":"query-commands"}"#)["return"]
        #expect(cmds == .array(QMPCommand.names.map { ["name": .string($0)] }))
        #expect(h.one(#"{"execute":"query-version"}"#)["return"]?["qemu"]?["major"] == 7)
        #expect(h.one(#"{"execute":"query-chardev"}"#)["return"]?.serialized()
            == #"[{"label":"serial0","filename":"ringbuf","frontend-open":true},{"label":"mon0","filename":"stdio","frontend-open":true}]"#)
    }

    @Test func ringbufReadWriteAndErrors() {
        var h = Harness()
        #expect(h.one(#"{"execute":"ringbuf-read","arguments":{"device":"serial0","size":3}}"#)["return"] == "hel")
        #expect(h.one(#"{"execute":"ringbuf-read","arguments":{"device":"serial0","size":10,"format":"base64"}}"#)["return"] == "bG//")
        #expect(h.one(#"{"execute":"ringbuf-write","arguments":{"device":"serial0","data":"aGk=","format":"base64"}}"#) == ["return": [:]])
        #expect(h.one(#"{"execute":"ringbuf-write","arguments":{"device":"serial0","data":"!"}}"#) == ["return": [:]])
        #expect(h.chardevs.input.withLock { $0 } == Array("hi!".utf8))
        #expect(errorOf(h.one(#"{"execute":"ringbuf-write","arguments":{"device":"nope","data":"x"}}"#))?.1 == "Device 'nope' not found")
        #expect(errorOf(h.one(#"{"execute":"ringbuf-read","arguments":{"device":"mon0","size":1}}"#))?.1 == "mon0 is not a ringbuf device")
        #expect(errorOf(h.one(#"{"execute":"ringbuf-read","arguments":{"device":"serial0","size":-1}}"#))?.0 == "GenericError")
    }

    @Test func probingCommandsDescribeWhatExists() {
        var h = Harness()
        func names(_ v: JSONValue?) -> [String] {
            guard case .array(let items)? = v else { return [] }
            return items.compactMap { $0["name"]?.stringValue }
        }
        #expect(h.one(#"{"execute":"query-target"}"#)["return"] == ["arch": "riscv64"])
        #expect(h.one(#"{"execute":"query-kvm"}"#)["return"] == ["enabled": false, "present": false])
        let machines = names(h.one(#"{"execute":"query-machines"}"#)["return"])
        #expect(machines == ["virt", "none"])
        let pci = names(h.one(#"{"execute":"qom-list-types","arguments":{"implements":"pci-device"}}"#)["return"])
        #expect(Set(pci) == ["virtio-blk-pci", "virtio-gpu-pci", "virtio-keyboard-pci", "virtio-tablet-pci", "virtio-rng-pci", "virtio-net-pci",
                             "pcie-root-port", "virtio-blk-pci-non-transitional"])
        // What makes libvirt put virtio devices behind root ports on riscv virt.
        let hosts = names(h.one(#"{"execute":"qom-list-types","arguments":{"implements":"pci-host-bridge"}}"#)["return"])
        #expect(hosts == ["gpex-pcihost"])
        let blkPCI = names(h.one(#"{"execute":"device-list-properties","arguments":{"typename":"virtio-blk-pci-non-transitional"}}"#)["return"])
        #expect(blkPCI == ["drive", "addr", "disable-legacy"])
        let blk = names(h.one(#"{"execute":"device-list-properties","arguments":{"typename":"virtio-blk-device"}}"#)["return"])
        #expect(blk == ["drive"])
        #expect(errorOf(h.one(#"{"execute":"device-list-properties","arguments":{"typename":"e1000"}}"#))?.0 == "DeviceNotFound")
        #expect(errorOf(h.one(#"{"execute":"qom-list-properties","arguments":{"typename":"memory-backend-epc"}}"#))?.0 == "DeviceNotFound")
        #expect(errorOf(h.one(#"{"execute":"query-command-line-options","arguments":{"option":"spice"}}"#))?.1 == "invalid option name: spice")
        let events = names(h.one(#"{"execute":"query-events"}"#)["return"])
        #expect(events.contains("SHUTDOWN") && events.contains("STOP"))
        #expect(h.one(#"{"execute":"query-migrate-capabilities"}"#)["return"] == [["capability": "events", "state": false], ["capability": "auto-converge", "state": false],
                                                                                      ["capability": "postcopy-ram", "state": false], ["capability": "return-path", "state": false]])
        #expect(errorOf(h.one(#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"nosuch"}]}}"#))?.1
                == "Parameter 'data' does not accept value 'nosuch'")  // QEMU 7.2's wording
    }

    @Test func humanMonitorWordsTakeQuotedStringsWhole() throws {
        #expect(try QMPCommandExecutor.hmpWords(#"savevm "snap1""#) == ["savevm", "snap1"])
        #expect(try QMPCommandExecutor.hmpWords(#"  delvm   "a b"  "#) == ["delvm", "a b"])
        #expect(try QMPCommandExecutor.hmpWords(#"x "q\"s\\t\n""#) == ["x", "q\"s\\t\n"])
        #expect(try QMPCommandExecutor.hmpWords("info\tstatus") == ["info", "status"])
        #expect(try QMPCommandExecutor.hmpWords("") == [])
        var h = Harness()
        func hmp(_ line: String) -> JSONValue? {
            h.one(#"{"execute":"human-monitor-command","arguments":{"command-line":"\#(line)"}}"#)["return"]
        }
        #expect(hmp(#"savevm \"unterminated"#) == "unterminated string literal\r\n")
        #expect(hmp(#"savevm \"a\\qb\""#) == "unsupported escape code: '\\q'\r\n")
        #expect(hmp(#"info \"status\""#) == "VM status: running\r\n")
    }

    @Test func humanMonitorCommandsMapOntoQMP() {
        var h = Harness()
        func hmp(_ line: String) -> JSONValue? {
            h.one(#"{"execute":"human-monitor-command","arguments":{"command-line":"\#(line)"}}"#)["return"]
        }
        #expect(hmp("info status") == "VM status: running\r\n")
        // Items whose handlers read the whole line get it ("info network", not "network").
        #expect(hmp("info network") == "The machine has no network support\r\n")
        #expect(hmp("info usernet") == "The machine has no network support\r\n")
        #expect(hmp("stop") == "")
        #expect(hmp("info status") == "VM status: paused\r\n")
        #expect(hmp("cont") == "")
        #expect(hmp("info name") == "fake\r\n")
        #expect(hmp("info version") == "7.2.0 (machine-server 0.1.0)\r\n")
        #expect(hmp("info cpus") == "* CPU #0: thread_id=100\r\n  CPU #1: thread_id=101\r\n")
        #expect(hmp("system_reset") == "" && hmp("system_powerdown") == "")
        #expect(hmp("drive_add x") == "unknown command: 'drive_add'\r\n")  // QEMU names the command only
        #expect(hmp("info registers") == "No CPU 0\r\n")  // the fake machine exposes no registers
        #expect(hmp("info uuid") == "00000000-0000-0000-0000-000000000000\r\n")
        #expect(hmp("info qtree") == "bus: main-system-bus\r\n  type System\r\n")  // the fake has no device windows or PCI
        #expect(hmp("info irq") == "")  // nor an interrupt controller
        #expect(hmp("xp /2xw 0x80000000") == "this machine does not expose its memory\r\n")
        #expect(hmp("info nosuch") == "unknown command: 'info nosuch'\r\n")
        #expect(hmp("sendkey") == "Usage: sendkey keys [hold_ms]\r\n")
        #expect(hmp("savevm x") == "Error: this machine has no snapshot support\r\n")
        #expect(h.machine.calls == ["stop", "cont", "system_reset", "system_powerdown"])
        #expect(hmp("quit") == "")
        #expect(h.executor.takeQuitRequest())
    }

    @Test func eventsCarryTimestampAndDataOnlyWhenDefined() {
        let stop = QMPSession.eventMessage(.stop, seconds: 10, microseconds: 5)
        #expect(stop.serialized() == #"{"event":"STOP","timestamp":{"seconds":10,"microseconds":5}}"#)
        let reset = QMPSession.eventMessage(.reset(ResetEventData(guest: false, reason: .hostQmpSystemReset)), seconds: 1, microseconds: 2)
        #expect(reset["data"] == ["guest": false, "reason": "host-qmp-system-reset"])
    }
}
