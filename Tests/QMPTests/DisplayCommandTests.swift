import Foundation
import Machine
import Schema
import Synchronization
import Testing
@testable import QMP

/// An input device that records every report.
final class RecordingSink: InputSink {
    let reports = Mutex<[[Machine.InputEvent]]>([])
    func handle(_ events: [Machine.InputEvent]) { reports.withLock { $0.append(events) } }
    var all: [[Machine.InputEvent]] { reports.withLock { $0 } }
}

/// A VNC server stand-in that records password calls.
final class FakeRemoteDisplay: RemoteDisplayServer {
    let passwords = Mutex<[String]>([])
    let expiries = Mutex<[Date?]>([])
    let passwordAuth: Bool
    init(passwordAuth: Bool) { self.passwordAuth = passwordAuth }
    struct Refused: Error, CustomStringConvertible { var description: String { "password authentication is off" } }
    func info() -> RemoteDisplayInfo {
        RemoteDisplayInfo(enabled: true, host: "127.0.0.1", service: "5900", family: "ipv4", auth: passwordAuth ? "vnc" : "none",
                          clients: [.init(host: "127.0.0.1", service: "40000", family: "ipv4", websocket: false)])
    }
    func setPassword(_ password: String) throws {
        guard passwordAuth else { throw Refused() }
        passwords.withLock { $0.append(password) }
    }
    func expirePassword(at date: Date?) throws {
        guard passwordAuth else { throw Refused() }
        expiries.withLock { $0.append(date) }
    }
}

final class FakeDevices: DeviceRegistry {
    let display: Display?
    let remoteDisplay: (any RemoteDisplayServer)?
    let keyboard = RecordingSink()
    let tablet = RecordingSink()
    init(display: Display? = Display(), vnc: FakeRemoteDisplay? = nil) {
        self.display = display
        self.remoteDisplay = vnc
        display?.addInputSink(keyboard)
        display?.addInputSink(tablet)
    }
    func inputDevice(id: String) -> (any InputSink)? { id == "kbd" ? keyboard : id == "tab" ? tablet : nil }
    func blockDevices() -> [BlockDeviceStatus] {
        [BlockDeviceStatus(id: "disk0", file: "/img/disk.qcow2", format: "qcow2", readOnly: false, virtualSize: 64 << 20,
                           actualSize: 4096, backingFile: "base.raw", backingDepth: 1)]
    }
}

/// The first element of a JSON array.
func first(_ v: JSONValue?) -> JSONValue? {
    if case .array(let a)? = v { return a.first }
    return nil
}

@Suite struct DisplayCommandTests {
    func error(_ h: inout Harness, _ text: String) -> (String, String)? { errorOf(h.one(text)) }

    @Test func withoutDevicesDisplayCommandsAreDeviceNotFound() {
        var h = Harness()
        for cmd in [#"{"execute":"screendump","arguments":{"filename":"/tmp/x.ppm"}}"#,
                    #"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"a"}]}}"#,
                    #"{"execute":"input-send-event","arguments":{"events":[{"type":"btn","data":{"button":"left","down":true}}]}}"#,
                    #"{"execute":"set_password","arguments":{"protocol":"vnc","password":"x"}}"#,
                    #"{"execute":"expire_password","arguments":{"protocol":"vnc","time":"now"}}"#] {
            #expect(error(&h, cmd)?.0 == "DeviceNotFound", "\(cmd)")
        }
        #expect(h.one(#"{"execute":"query-vnc"}"#)["return"] == ["enabled": false])
        #expect(h.one(#"{"execute":"query-block"}"#)["return"] == .array([]))
    }

    @Test func sendKeyPressesInOrderAndReleasesInReverse() throws {
        let devices = FakeDevices()
        var h = Harness(devices: devices)
        let r = h.one(#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ctrl"},{"type":"number","data":56},{"type":"qcode","data":"delete"}],"hold-time":0}}"#)
        #expect(r["return"] == .object(JSONObject()))
        let deadline = Date() + 5
        while devices.keyboard.all.count < 6 && Date() < deadline { usleep(1000) }
        #expect(devices.keyboard.all == [[.key(code: 29, down: true)], [.key(code: 56, down: true)], [.key(code: 111, down: true)],
                                         [.key(code: 111, down: false)], [.key(code: 56, down: false)], [.key(code: 29, down: false)]])
    }

    @Test func sendKeyRefusesUnknownNumbersAndEmptyLists() {
        var h = Harness(devices: FakeDevices())
        #expect(error(&h, #"{"execute":"send-key","arguments":{"keys":[{"type":"number","data":999}]}}"#)?.1.contains("keys[0]") == true)
        #expect(error(&h, #"{"execute":"send-key","arguments":{"keys":[]}}"#)?.1.contains("'keys'") == true)
        #expect(error(&h, #"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"nokey"}]}}"#)?.0 == "GenericError")
    }

    @Test func inputSendEventIsOneReportToEveryDeviceOrTheNamedOne() {
        let devices = FakeDevices()
        var h = Harness(devices: devices)
        _ = h.one(#"{"execute":"input-send-event","arguments":{"events":[{"type":"abs","data":{"axis":"x","value":16384}},{"type":"abs","data":{"axis":"y","value":99999}},{"type":"btn","data":{"button":"left","down":true}}]}}"#)
        let report: [Machine.InputEvent] = [.absolute(.x, value: 16384), .absolute(.y, value: 0x7fff), .button(.left, down: true)]
        #expect(devices.tablet.all == [report])
        #expect(devices.keyboard.all == [report])
        _ = h.one(#"{"execute":"input-send-event","arguments":{"device":"kbd","events":[{"type":"key","data":{"key":{"type":"qcode","data":"a"},"down":true}},{"type":"rel","data":{"axis":"y","value":-3}}]}}"#)
        #expect(devices.keyboard.all.last == [.key(code: 30, down: true), .relative(.y, delta: -3)])
        #expect(devices.tablet.all.count == 1)
        #expect(error(&h, #"{"execute":"input-send-event","arguments":{"device":"nope","events":[{"type":"btn","data":{"button":"left","down":true}}]}}"#)?.0 == "DeviceNotFound")
    }

    @Test func screendumpWritesWhatTheDisplayShows() throws {
        let display = Display()
        var h = Harness(devices: FakeDevices(display: display))
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("qmp-dump-\(getpid()).ppm").path
        defer { unlink(path) }
        #expect(error(&h, #"{"execute":"screendump","arguments":{"filename":"\#(path)"}}"#)?.0 == "GenericError")  // no mode yet
        let buffer = try #require(PixelBuffer(count: 4 * 2 * 4))
        for i in 0..<8 { buffer.bytes.storeBytes(of: UInt32(0x00ff_0000 | UInt32(i)), toByteOffset: i * 4, as: UInt32.self) }
        display.setSurface(DisplaySurface(buffer: buffer, width: 4, height: 2, stride: 16, format: .b8g8r8a8))
        #expect(h.one(#"{"execute":"screendump","arguments":{"filename":"\#(path)","format":"ppm"}}"#)["return"] == .object(JSONObject()))
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == (try display.screendump(format: .ppm)))
        _ = h.one(#"{"execute":"screendump","arguments":{"filename":"\#(path)","format":"png"}}"#)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)).prefix(4) == Data([0x89, 0x50, 0x4e, 0x47]))
        #expect(error(&h, #"{"execute":"screendump","arguments":{"filename":"\#(path)","device":"video9"}}"#)?.0 == "DeviceNotFound")
        #expect(error(&h, #"{"execute":"screendump","arguments":{"filename":"\#(path)","head":1}}"#)?.1.contains("'head'") == true)
    }

    @Test func vncQueriesAndPasswordsReachTheServer() {
        let vnc = FakeRemoteDisplay(passwordAuth: true)
        var h = Harness(devices: FakeDevices(vnc: vnc))
        let info = h.one(#"{"execute":"query-vnc"}"#)["return"]
        #expect(info?["enabled"] == true)
        #expect(info?["service"] == "5900")
        #expect(info?["family"] == "ipv4")
        #expect(info?["auth"] == "vnc")
        #expect(first(info?["clients"])?["service"] == "40000")
        _ = h.one(#"{"execute":"set_password","arguments":{"protocol":"vnc","password":"secret"}}"#)
        #expect(vnc.passwords.withLock { $0 } == ["secret"])
        #expect(error(&h, #"{"execute":"set_password","arguments":{"protocol":"vnc","password":"x","connected":"fail"}}"#)?.1.contains("'connected'") == true)
        #expect(error(&h, #"{"execute":"set_password","arguments":{"protocol":"spice","password":"x"}}"#)?.1.contains("'protocol'") == true)
        _ = h.one(#"{"execute":"expire_password","arguments":{"protocol":"vnc","time":"never"}}"#)
        _ = h.one(#"{"execute":"expire_password","arguments":{"protocol":"vnc","time":"1000"}}"#)
        #expect(vnc.expiries.withLock { $0 } == [nil, Date(timeIntervalSince1970: 1000)])
        #expect(error(&h, #"{"execute":"expire_password","arguments":{"protocol":"vnc","time":"soon"}}"#)?.1.contains("'time'") == true)
        #expect(vnc.passwords.withLock { $0 }.count == 1)
    }

    @Test func passwordsWithoutPasswordAuthAreRefused() {
        var h = Harness(devices: FakeDevices(vnc: FakeRemoteDisplay(passwordAuth: false)))
        let e = error(&h, #"{"execute":"set_password","arguments":{"protocol":"vnc","password":"x"}}"#)
        #expect(e?.0 == "GenericError")
        #expect(e?.1.contains("password") == true)
    }

    @Test func expiryTimesParseLikeQEMU() {
        let now = Date(timeIntervalSince1970: 5000)
        #expect(QMPCommandExecutor.parseExpiry("now", now: now) == .some(now))
        #expect(QMPCommandExecutor.parseExpiry("never", now: now) == .some(nil))
        #expect(QMPCommandExecutor.parseExpiry("+60", now: now) == .some(now + 60))
        #expect(QMPCommandExecutor.parseExpiry("-1", now: now) == nil)
        #expect(QMPCommandExecutor.parseExpiry("", now: now) == nil)
    }

    @Test func queryBlockHasQEMUsBlockInfoShape() {
        var h = Harness(devices: FakeDevices())
        let b = first(h.one(#"{"execute":"query-block"}"#)["return"])
        #expect(b?["device"] == "disk0")
        #expect(b?["qdev"] == "/machine/peripheral/disk0/virtio-backend")
        #expect(b?["locked"] == false)
        #expect(b?["removable"] == false)
        #expect(b?["inserted"]?["file"] == "/img/disk.qcow2")
        #expect(b?["inserted"]?["ro"] == false)
        #expect(b?["inserted"]?["drv"] == "qcow2")
        #expect(b?["inserted"]?["backing_file"] == "base.raw")
        #expect(b?["inserted"]?["image"]?["virtual-size"] == .int(64 << 20))
        #expect(b?["inserted"]?["image"]?["format"] == "qcow2")
        #expect(b?["inserted"]?["image"]?["filename"] == "/img/disk.qcow2")
    }

    @Test func vncEventsCarryServerAndClient() {
        let server = VncServerInfo(host: "127.0.0.1", service: "5900", family: .ipv4, websocket: false, auth: "none")
        let client = VncBasicInfo(host: "127.0.0.1", service: "41000", family: .ipv4, websocket: false)
        let m = QMPSession.eventMessage(.vncConnected(VncConnectedEventData(server: server, client: client)), seconds: 1, microseconds: 2)
        #expect(m["event"] == "VNC_CONNECTED")
        #expect(m["data"]?["server"]?["service"] == "5900")
        #expect(m["data"]?["client"]?["service"] == "41000")
    }
}
