import Dispatch
import Foundation
import Machine
import Schema

/// The display, input and block commands: each checks what the schema cannot (the device is
/// there, key numbers are known), builds one typed action and hands it to the display, the
/// input devices or the VNC server. Runs on the connection's command queue.
extension QMPCommandExecutor {
    /// The registry, or `DeviceRegistryError.noDisplay` when the machine was built without one.
    private func display(_ id: String?) throws -> Display {
        guard let display = devices?.display else { throw DeviceRegistryError.noDisplay }
        if let id, id != display.id { throw DeviceRegistryError.notFound(id: id) }
        return display
    }

    private func vnc(display id: String?) throws -> any RemoteDisplayServer {
        guard let server = devices?.remoteDisplay else { throw DeviceRegistryError.noVNC }
        if let id, let display = devices?.display, id != display.id { throw DeviceRegistryError.notFound(id: id) }
        return server
    }

    /// The VNC server's state; `enabled: false` without one.
    public func queryVnc() throws -> VncInfo {
        guard let info = devices?.remoteDisplay?.info() else { return VncInfo(enabled: false) }
        return VncInfo(enabled: info.enabled, host: info.host, family: NetworkAddressFamily(family: info.family),
                       service: info.service, auth: info.auth,
                       clients: info.clients.map {
                           VncClientInfo(host: $0.host, service: $0.service, family: NetworkAddressFamily(family: $0.family),
                                         websocket: $0.websocket)
                       })
    }

    /// Sets the VNC password.
    public func setPassword(_ arguments: SetPasswordArguments) throws {
        if let c = arguments.connected, c != .keep {
            throw QMPError(.genericError, "Parameter 'connected': VNC only supports 'keep'")
        }
        try vnc(display: arguments.display).setPassword(arguments.password)
    }

    /// Sets when the VNC password expires.
    public func expirePassword(_ arguments: ExpirePasswordArguments) throws {
        guard let when = Self.parseExpiry(arguments.time) else {
            throw QMPError(.genericError, "Parameter 'time' expects 'now', 'never', '+SECONDS' or seconds since the epoch")
        }
        try vnc(display: arguments.display).expirePassword(at: when)
    }

    /// QEMU's expire_password times: "now", "never", "+SECONDS", or absolute seconds since the
    /// epoch. Returns `.some(nil)` for never and nil for anything else.
    static func parseExpiry(_ text: String, now: Date = Date()) -> Date?? {
        switch text {
        case "now": return .some(now)
        case "never": return .some(nil)
        default:
            if text.hasPrefix("+"), let s = UInt32(text.dropFirst()) { return .some(now + TimeInterval(s)) }
            if let s = UInt64(text), s <= UInt64(UInt32.max) { return .some(Date(timeIntervalSince1970: TimeInterval(s))) }
            return nil
        }
    }

    /// Writes the screen to a file.
    public func screendump(_ arguments: ScreendumpArguments) throws {
        let format: Machine.ScreendumpFormat = arguments.format == .png ? .png : .ppm
        try display(arguments.device).screendump(to: arguments.filename, format: format)
    }

    /// Presses the keys in order, and releases them in reverse order after the hold time.
    public func sendKey(_ arguments: SendKeyArguments) throws {
        guard !arguments.keys.isEmpty, arguments.keys.count <= 16 else {
            throw QMPError(.genericError, "Parameter 'keys' must list 1 to 16 keys")
        }
        let codes = try arguments.keys.enumerated().map { i, k in try Self.linuxCode(k, at: "keys[\(i)]") }
        let display = try display(nil)
        guard display.hasInput else { throw DeviceRegistryError.noInputDevice }
        for c in codes { display.sendInput([.key(code: c, down: true)]) }
        let hold = Int(arguments.holdTime ?? 100)
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(hold)) {
            for c in codes.reversed() { display.sendInput([.key(code: c, down: false)]) }
        }
    }

    /// Sends the events as one report to every input device (or to the one named).
    public func inputSendEvent(_ arguments: InputSendEventArguments) throws {
        guard !arguments.events.isEmpty else { throw QMPError(.genericError, "Parameter 'events' must not be empty") }
        let events = try arguments.events.enumerated().map { i, e -> Machine.InputEvent in
            switch e.variant {
            case .key(let w): return .key(code: try Self.linuxCode(w.data.key, at: "events[\(i)].data.key"), down: w.data.down)
            case .btn(let w):
                guard let b = Machine.InputButton(rawValue: w.data.button.rawValue) else {
                    throw QMPError(.genericError, "Parameter 'events[\(i)].data.button' is not supported")
                }
                return .button(b, down: w.data.down)
            case .abs(let w):
                let v = Int(clamping: min(max(w.data.value, Int64(Machine.InputEvent.absoluteMin)), Int64(Machine.InputEvent.absoluteMax)))
                return .absolute(w.data.axis == .x ? .x : .y, value: v)
            case .rel(let w):
                return .relative(w.data.axis == .x ? .x : .y, delta: Int(clamping: w.data.value))
            }
        }
        if let id = arguments.device {
            guard let sink = devices?.inputDevice(id: id) else { throw DeviceRegistryError.notFound(id: id) }
            sink.handle(events)
            return
        }
        let display = try display(nil)
        guard display.hasInput else { throw DeviceRegistryError.noInputDevice }
        display.sendInput(events)
    }

    /// The block devices in QEMU's BlockInfo shape.
    public func queryBlock() throws -> [BlockInfo] {
        (devices?.blockDevices() ?? []).map { b in
            let image = ImageInfo(filename: b.file, format: b.format, virtualSize: Int64(clamping: b.virtualSize),
                                  actualSize: b.actualSize.map { Int64(clamping: $0) }, backingFilename: b.backingFile)
            let inserted = BlockDeviceInfo(file: b.file, nodeName: b.nodeName, ro: b.readOnly, drv: b.format,
                                           backingFile: b.backingFile, backingFileDepth: Int64(b.backingDepth),
                                           encrypted: false, image: image)
            return BlockInfo(device: b.id, qdev: "/machine/peripheral/\(b.id)/virtio-backend", type: "unknown",
                             removable: false, locked: false, inserted: inserted)
        }
    }

    /// Each disk's I/O statistics.
    public func queryBlockstats(_ arguments: QueryBlockstatsArguments) throws -> [BlockStats] {
        // With query-nodes (libvirt asks so), the disks are listed by their format node:
        // statistics are kept per device, and each disk has one format node.
        let byNode = arguments.queryNodes == true
        let now = DispatchTime.now().uptimeNanoseconds
        return (devices?.blockDevices() ?? []).filter { !byNode || $0.nodeName != nil }.map { b in
            let s = b.statistics ?? BlockIOStatistics()
            func i(_ v: UInt64) -> Int64 { Int64(clamping: v) }
            let stats = BlockDeviceStats(
                rdBytes: i(s.readBytes), wrBytes: i(s.writtenBytes), unmapBytes: i(s.discardedBytes),
                rdOperations: i(s.readOperations), wrOperations: i(s.writeOperations), flushOperations: i(s.flushOperations),
                unmapOperations: i(s.discardOperations), rdTotalTimeNs: i(s.readTimeNanoseconds), wrTotalTimeNs: i(s.writeTimeNanoseconds),
                flushTotalTimeNs: i(s.flushTimeNanoseconds), unmapTotalTimeNs: i(s.discardTimeNanoseconds),
                wrHighestOffset: i(s.highestWriteOffset), rdMerged: 0, wrMerged: 0, unmapMerged: 0,
                idleTimeNs: s.lastCompletion.map { i(now &- $0) },
                failedRdOperations: i(s.failedReadOperations), failedWrOperations: i(s.failedWriteOperations),
                failedFlushOperations: i(s.failedFlushOperations), failedUnmapOperations: i(s.failedDiscardOperations),
                invalidRdOperations: 0, invalidWrOperations: 0, invalidFlushOperations: 0, invalidUnmapOperations: 0,
                accountInvalid: false, accountFailed: true, timedStats: [])
            return BlockStats(device: b.id, qdev: "/machine/peripheral/\(b.id)/virtio-backend", nodeName: b.nodeName, stats: stats)
        }
    }

    /// HMP `info blockstats`, QEMU's layout: one line per disk.
    func hmpBlockstats() throws -> String {
        try queryBlockstats(QueryBlockstatsArguments()).map { b in
            let s = b.stats
            return "\(b.device): rd_bytes=\(s.rdBytes) wr_bytes=\(s.wrBytes) rd_operations=\(s.rdOperations) wr_operations=\(s.wrOperations)"
                + " flush_operations=\(s.flushOperations) wr_total_time_ns=\(s.wrTotalTimeNs) rd_total_time_ns=\(s.rdTotalTimeNs)"
                + " flush_total_time_ns=\(s.flushTotalTimeNs) rd_merged=\(s.rdMerged) wr_merged=\(s.wrMerged) idle_time_ns=\(s.idleTimeNs ?? 0)\r\n"
        }.joined()
    }

    /// The named block nodes of the description's disks: each disk's format node and file
    /// node, when its drive names them (query-named-block-nodes adds blockdev-add's nodes).
    func launchBlockNodes() -> [BlockDeviceInfo] {
        (devices?.blockDevices() ?? []).filter { !$0.hotPlugged }.flatMap { b -> [BlockDeviceInfo] in
            var out: [BlockDeviceInfo] = []
            if let n = b.nodeName {
                let image = ImageInfo(filename: b.file, format: b.format, virtualSize: Int64(clamping: b.virtualSize),
                                      actualSize: b.actualSize.map { Int64(clamping: $0) }, backingFilename: b.backingFile)
                out.append(BlockDeviceInfo(file: b.file, nodeName: n, ro: b.readOnly, drv: b.format, backingFile: b.backingFile,
                                           backingFileDepth: Int64(b.backingDepth), encrypted: false, image: image))
            }
            if let f = b.fileNodeName {
                let size = (try? FileManager.default.attributesOfItem(atPath: b.file)[.size] as? NSNumber)?.int64Value ?? 0
                let image = ImageInfo(filename: b.file, format: "file", virtualSize: size,
                                      actualSize: b.actualSize.map { Int64(clamping: $0) })
                out.append(BlockDeviceInfo(file: b.file, nodeName: f, ro: b.readOnly, drv: "file",
                                           backingFileDepth: 0, encrypted: false, image: image))
            }
            return out
        }
    }

    /// The Linux key code of a QMP key; the error names the argument.
    static func linuxCode(_ key: KeyValue, at path: String) throws -> UInt16 {
        switch key.variant {
        case .qcode(let q):
            guard let c = LinuxKey.code(forQCode: q.data.rawValue) else {
                throw QMPError(.genericError, "Parameter '\(path)' names a key this keyboard does not have")
            }
            return c
        case .number(let n):
            guard let c = LinuxKey.code(forQNumber: Int(clamping: n.data)) else {
                throw QMPError(.genericError, "Parameter '\(path)': unknown key number \(n.data)")
            }
            return c
        }
    }
}

extension NetworkAddressFamily {
    /// The schema's value for a family name from the display layer ("ipv4", "ipv6").
    init(family: String) { self = NetworkAddressFamily(rawValue: family) ?? .unknown }
}
