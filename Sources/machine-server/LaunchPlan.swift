import Board
import Foundation
import QMP
import Schema
import Translator

/// Everything the server will build, checked before anything starts: the parsed description
/// (the generated `MachineDescription`, the one source of truth) with the command-line
/// overrides applied, paths resolved and files checked. A plain value, built on the main thread.
struct LaunchPlan {
    var name: String?
    var startPaused: Bool
    var cpuCount: Int
    /// The engine that executes guest code.
    var engine: ExecutionEngine
    var memoryBytes: UInt64
    /// nil: no firmware (the kernel runs in M-mode).
    var firmware: String?
    var kernel: String?
    var initrd: String?
    var commandLine: String?
    var serial: ChardevSpec
    var qmp: [QMPListenerSpec]
    /// The VNC listen address and options, when a display is wanted.
    var vnc: VNCDescription?
    /// True when `vnc` came from --vnc (for messages).
    var vncFromCommandLine: Bool
    /// The devices in slot order, checked (including what a VNC display adds automatically).
    var devices: [PlannedDevice]

    /// Where Debian's `opensbi` package (and QEMU's own packages) put OpenSBI's generic
    /// fw_dynamic firmware, tried in order when the description names no firmware.
    static let defaultFirmwareCandidates = [
        "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin",
        "/usr/share/qemu/opensbi-riscv64-generic-fw_dynamic.bin",
    ]

    /// Reads the description at `options.config`, applies the overrides and checks it all.
    /// Throws `LaunchError` naming the offending file, option or description field.
    init(options: MachineServerCommand) throws {
        let configPath = options.config
        guard FileManager.default.fileExists(atPath: configPath) else {
            throw LaunchError("--config: '\(configPath)' does not exist")
        }
        let text: String
        do {
            text = try String(contentsOfFile: configPath, encoding: .utf8)
        } catch {
            throw LaunchError("--config: cannot read '\(configPath)': \(Self.reason(error))")
        }
        let d: MachineDescription
        do {
            d = try MachineDescription.parse(jsonText: text)
        } catch {
            throw LaunchError("\(configPath): \(error)")
        }
        let baseDirectory = URL(fileURLWithPath: configPath).deletingLastPathComponent().path

        func resolve(_ path: String) -> String {
            path.hasPrefix("/") ? path : (baseDirectory as NSString).appendingPathComponent(path)
        }
        func readableFile(_ field: String, _ path: String) throws -> String {
            let full = resolve(path)
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: full, isDirectory: &isDirectory) else {
                throw LaunchError("\(field): '\(full)' does not exist")
            }
            guard !isDirectory.boolValue, FileManager.default.isReadableFile(atPath: full) else {
                throw LaunchError("\(field): '\(full)' is not a readable file")
            }
            return full
        }

        name = options.name ?? d.name
        startPaused = options.paused || d.start == .paused
        cpuCount = Int(d.cpus)
        var accel = d.accel?.engine
        if let text = options.accel {
            guard let e = AccelEngine(rawValue: text) else {
                throw LaunchError("--accel: '\(text)' is not one of \(AccelEngine.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            accel = e
        }
        switch accel {
        case .jit?: engine = .jit
        case .interpreter?: engine = .interpreter
        case nil: engine = .hostDefault
        }
        memoryBytes = d.memoryBytes

        switch d.firmware {
        case "none"?:
            firmware = nil
        case let path?:
            firmware = try readableFile("firmware", path)
        case nil:
            guard let found = Self.defaultFirmwareCandidates.first(where: { FileManager.default.isReadableFile(atPath: $0) }) else {
                throw LaunchError("firmware: not given and no default OpenSBI found (looked for \(Self.defaultFirmwareCandidates.joined(separator: ", "))); install Debian's 'opensbi' package, give a path, or say \"none\"")
            }
            firmware = found
        }
        kernel = try d.kernel.map { try readableFile("kernel", $0) }
        initrd = try d.initrd.map { try readableFile("initrd", $0) }
        if initrd != nil && kernel == nil {
            throw LaunchError("initrd: an initial RAM disk needs a \"kernel\" to go with it")
        }
        if firmware == nil && kernel == nil {
            throw LaunchError("kernel: with \"firmware\": \"none\" a kernel is required (there is nothing else to run)")
        }
        commandLine = d.append

        if let spec = options.serial {
            do { serial = try ChardevSpec(parsing: spec) } catch { throw LaunchError("--serial: \(error)") }
        } else {
            serial = Self.chardevSpec(d.serial, resolve: resolve)
        }

        if !options.qmp.isEmpty {
            qmp = try options.qmp.map { text in
                do { return try QMPListenerSpec(parsing: text) } catch { throw LaunchError("--qmp: \(error)") }
            }
        } else {
            qmp = (d.qmp ?? []).map { l in
                switch l.variant {
                case .unix(let o): return .unix(path: resolve(o.path))
                case .tcp(let o): return .tcp(host: o.host, port: Int(o.port))
                }
            }
        }
        for (i, l) in qmp.enumerated() {
            if case .unix(let p) = l, case .unix(let s) = serial, p == s {
                throw LaunchError("qmp[\(i)]: '\(p)' is also the serial socket")
            }
        }

        if var listen = options.vnc {
            // A bare port (or ":PORT") listens on localhost only, never on every interface.
            if UInt16(listen) != nil { listen = "127.0.0.1:" + listen }
            if listen.hasPrefix(":"), UInt16(listen.dropFirst()) != nil { listen = "127.0.0.1" + listen }
            guard SchemaCheck.parseHostPort(listen) != nil else {
                throw LaunchError("--vnc: '\(listen)' is not HOST:PORT (for example 127.0.0.1:5900)")
            }
            var v = d.display?.vnc ?? VNCDescription(listen: listen)
            v.listen = listen
            vnc = v
        } else {
            vnc = d.display?.vnc
        }
        if let ws = vnc?.websocket, ws == vnc?.listen {
            throw LaunchError("display.vnc.websocket: '\(ws)' is also the VNC listen address")
        }
        vncFromCommandLine = options.vnc != nil
        let vncOrigin = options.vnc != nil ? "--vnc" : (vnc != nil ? "display.vnc" : nil)
        devices = try PlannedDevice.plan(d.devices ?? [], vnc: vncOrigin, resolve: resolve)
    }

    /// The chardev SPEC for the description's `serial` member (default: stdio).
    static func chardevSpec(_ s: SerialDescription?, resolve: (String) -> String) -> ChardevSpec {
        guard let s else { return .stdio }
        switch s.variant {
        case .stdio: return .stdio
        case .none: return .none
        case .unix(let o): return .unix(path: resolve(o.path))
        case .tcp(let o): return .tcp(host: o.host, port: UInt16(o.port))
        case .file(let o): return .file(path: resolve(o.path), append: false)
        case .ringbuf(let o): return .ringbuf(size: Int(o.size))
        }
    }

    private static func reason(_ error: any Error) -> String {
        let ns = error as NSError
        if let underlying = ns.userInfo[NSUnderlyingErrorKey] as? NSError, underlying.domain == NSPOSIXErrorDomain {
            return String(cString: strerror(Int32(underlying.code)))
        }
        return ns.localizedDescription
    }
}
