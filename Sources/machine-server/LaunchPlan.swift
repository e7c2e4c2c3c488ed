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
    /// `-loadvm TAG`: the snapshot loaded before the vCPUs first run.
    var loadvm: String?
    /// True when the machine starts paused only so that `loadvm` can be applied first.
    var resumeAfterLoadvm = false
    var cpuCount: Int
    /// The engine that executes guest code.
    var engine: ExecutionEngine
    /// The ISA extensions of every hart (the description's `cpu.isa`).
    var extensions: ISAExtensions
    /// Where the GDB stub listens (`--gdb`/`gdb`: tcp:HOST:PORT).
    var gdb: (host: String, port: Int)?
    var memoryBytes: UInt64
    /// nil: no firmware (the kernel runs in M-mode).
    var firmware: String?
    var kernel: String?
    var initrd: String?
    var commandLine: String?
    var serial: ChardevSpec
    /// The serial chardev's label (query-chardev, ringbuf-read): the description's `serial.id`.
    var serialID: String = "serial0"
    var qmp: [QMPListenerSpec]
    /// The human monitor (HMP) listeners (`hmp`, QEMU's -mon mode=readline).
    var hmp: [QMPListenerSpec]
    /// The VNC listen address and options, when a display is wanted.
    var vnc: VNCDescription?
    /// True when `vnc` came from --vnc (for messages).
    var vncFromCommandLine: Bool
    /// The devices in slot order, checked (including what a VNC display adds automatically).
    var devices: [PlannedDevice]
    /// The network backends, in description order (their options are checked when they are built).
    var netdevs: [Netdev]
    /// The description as parsed (paths as written), for query-description.
    var description: MachineDescription
    /// Where the description's relative paths are resolved from.
    var baseDirectory: String
    /// `--incoming URI|defer`: load a saved state (or wait for migrate-incoming) instead of booting.
    var incoming: String?
    /// Guest RAM from a file (`memory-backend`): the absolute path and whether it is shared.
    var memoryBackend: (path: String, shared: Bool)?
    /// The machine's UUID (`uuid`, QEMU's -uuid).
    var uuid: String?
    /// What guest reboots and power-offs do (`actions`, QEMU's -no-reboot / -no-shutdown).
    var actions: VirtualMachine.GuestActions
    /// The process-level options (pid file, daemonizing, log file).
    var process: ProcessOptions
    /// `machine: none`: no CPUs, RAM or devices, only the QMP monitor (QEMU's -machine none).
    var isEmptyMachine: Bool

    /// Where Debian's `opensbi` package (and QEMU's own packages) put OpenSBI's generic
    /// fw_dynamic firmware, tried in order when the description names no firmware.
    static let defaultFirmwareCandidates = [
        "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin",
        "/usr/share/qemu/opensbi-riscv64-generic-fw_dynamic.bin",
    ]

    /// Reads and parses the description at `configPath`; returns it with the directory its
    /// relative paths are relative to. Throws `LaunchError` naming the file and field.
    static func loadDescription(configPath: String) throws -> (MachineDescription, baseDirectory: String) {
        let configBytes = try Self.readRegularFile("--config", configPath, limit: Self.maxDescriptionBytes)
        guard let text = String(validating: configBytes, as: UTF8.self) else {
            throw LaunchError("--config: '\(configPath)' is not UTF-8 text")
        }
        do {
            return (try MachineDescription.parse(jsonText: text), URL(fileURLWithPath: configPath).deletingLastPathComponent().path)
        } catch {
            throw LaunchError("\(configPath): \(error)")
        }
    }

    /// Applies the overrides to the description `d` and checks it all (files exist, sockets
    /// do not collide, devices fit). Throws `LaunchError` naming the offending option or field.
    init(description d: MachineDescription, baseDirectory: String, options: LaunchOverrides) throws {
        self.description = d
        self.baseDirectory = baseDirectory

        func resolve(_ path: String) -> String {
            path.hasPrefix("/") ? path : (baseDirectory as NSString).appendingPathComponent(path)
        }
        /// A boot image: a readable regular file no larger than guest RAM (checked by fstat,
        /// without reading it).
        func readableFile(_ field: String, _ path: String) throws -> String {
            let full = resolve(path)
            try Self.checkRegularFile(field, full, limit: d.memoryBytes, limitName: "the guest RAM")
            return full
        }

        name = options.name ?? d.name
        isEmptyMachine = d.machine == .none
        memoryBackend = d.memoryBackend.map { (resolve($0.file), $0.share) }
        uuid = d.uuid
        actions = VirtualMachine.GuestActions(rebootShutsDown: d.actions?.reboot == .shutdown,
                                              shutdownPauses: d.actions?.shutdown == .pause)
        process = options.process
        startPaused = options.paused || d.start == .paused
        if let tag = options.loadvm {
            guard options.incoming == nil else { throw LaunchError("-loadvm \(tag): cannot be combined with -incoming") }
            loadvm = tag
            resumeAfterLoadvm = !startPaused
            startPaused = true
        }
        if let incoming = options.incoming {
            guard incoming == "defer" || ["file:", "exec:", "tcp:", "unix:", "fd:"].contains(where: { incoming.hasPrefix($0) }) else {
                throw LaunchError("--incoming: '\(incoming)' is not tcp:HOST:PORT, unix:PATH, fd:N, file:PATH, exec:CMD or defer")
            }
        }
        self.incoming = options.incoming
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
        if let isa = d.cpu?.isa {
            switch ISAExtensions.parse(isa) {
            case .success(let e): extensions = e
            case .failure(let error): throw LaunchError("cpu.isa: \(error)")
            }
        } else {
            extensions = .all
        }
        memoryBytes = d.memoryBytes
        if let spec = options.gdb ?? d.gdb {
            let field = options.gdb != nil ? "--gdb" : "gdb"
            let parts = spec.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard parts.count == 3, parts[0] == "tcp", let port = Int(parts[2]), (0...65535).contains(port) else {
                throw LaunchError("\(field): '\(spec)' is not tcp:HOST:PORT")
            }
            gdb = (parts[1], port)
        } else {
            gdb = nil
        }

        if isEmptyMachine {
            for (field, given) in [("firmware", d.firmware != nil), ("kernel", d.kernel != nil), ("initrd", d.initrd != nil),
                                   ("append", d.append != nil), ("devices", !(d.devices ?? []).isEmpty),
                                   ("display", d.display != nil || options.vnc != nil)] where given {
                throw LaunchError("\(field): machine 'none' has no CPUs, RAM or devices")
            }
            if let s = d.serial, s.variant != .none {
                throw LaunchError("serial: machine 'none' has no serial port (give {\"backend\": \"none\"})")
            }
        }
        switch d.firmware {
        case _ where isEmptyMachine:
            firmware = nil
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
        if firmware == nil && kernel == nil && !isEmptyMachine {
            throw LaunchError("kernel: with \"firmware\": \"none\" a kernel is required (there is nothing else to run)")
        }
        commandLine = d.append

        if isEmptyMachine {
            serial = .none
        } else if let spec = options.serial {
            do { serial = try ChardevSpec(parsing: spec) } catch { throw LaunchError("--serial: \(error)") }
        } else {
            serial = Self.chardevSpec(d.serial, resolve: resolve)
            if let id = d.serial?.id {
                guard !id.isEmpty, id.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
                    throw LaunchError("serial.id: '\(id)' is not an identifier (letters, digits, '-', '_', '.')")
                }
                serialID = id
            }
        }

        if !options.qmp.isEmpty {
            qmp = try options.qmp.map { text in
                do { return try QMPListenerSpec(parsing: text) } catch { throw LaunchError("--qmp: \(error)") }
            }
        } else {
            qmp = (d.qmp ?? []).map(Self.listener(resolve: resolve))
        }
        hmp = (d.hmp ?? []).map(Self.listener(resolve: resolve))
        for (i, l) in hmp.enumerated() {
            if case .unix(let p) = l, qmp.contains(.unix(path: p)) {
                throw LaunchError("hmp[\(i)]: '\(p)' is also a QMP socket")
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
        netdevs = d.netdevs ?? []
        var netdevIDs: [String: Int] = [:]
        for (i, n) in netdevs.enumerated() {
            guard !n.id.isEmpty else { throw LaunchError("netdevs[\(i)].id: an id must not be empty") }
            if let other = netdevIDs[n.id] { throw LaunchError("netdevs[\(i)].id: Duplicate ID '\(n.id)' for netdev (also netdevs[\(other)])") }
            netdevIDs[n.id] = i
        }
        devices = try PlannedDevice.plan(d.devices ?? [], vnc: vncOrigin, netdevs: netdevs.map(\.id), resolve: resolve)
    }

    /// The listener spec for a description's QMP/HMP listener.
    static func listener(resolve: @escaping (String) -> String) -> (QMPListenerDescription) -> QMPListenerSpec {
        { l in
            switch l.variant {
            case .unix(let o): return .unix(path: resolve(o.path))
            case .tcp(let o): return .tcp(host: o.host, port: Int(o.port))
            case .fd(let o): return .fd(Int32(o.fd))
            }
        }
    }

    /// The chardev SPEC for the description's `serial` member (default: stdio).
    static func chardevSpec(_ s: SerialDescription?, resolve: (String) -> String) -> ChardevSpec {
        guard let s else { return .stdio }
        switch s.variant {
        case .stdio: return .stdio
        case .none: return .none
        case .pty: return .pty
        case .unix(let o): return .unix(path: resolve(o.path))
        case .tcp(let o): return .tcp(host: o.host, port: UInt16(o.port))
        case .file(let o): return .file(path: resolve(o.path), append: o.append)
        case .ringbuf(let o): return .ringbuf(size: Int(o.size))
        }
    }

    /// The largest machine description read (a description is a few kilobytes).
    static let maxDescriptionBytes: UInt64 = 16 << 20

    /// Opens `path` non-blocking, checks with fstat that it is a regular file of at most
    /// `limit` bytes, and returns the open descriptor. Never blocks (a FIFO is refused, not
    /// opened for reading) and never reads. Throws `LaunchError` starting with `field`.
    private static func openRegularFile(_ field: String, _ path: String, limit: UInt64, limitName: String) throws -> (fd: Int32, size: UInt64) {
        let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY)
        guard fd >= 0 else {
            let e = errno
            switch e {
            case ENOENT: throw LaunchError("\(field): '\(path)' does not exist")
            case EACCES: throw LaunchError("\(field): '\(path)' is not readable (permission denied)")
            default: throw LaunchError("\(field): cannot open '\(path)': \(String(cString: strerror(e)))")
            }
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw LaunchError("\(field): cannot stat '\(path)': \(String(cString: strerror(e)))")
        }
        let kind = st.st_mode & S_IFMT
        guard kind == S_IFREG else {
            close(fd)
            let what = kind == S_IFDIR ? "a directory" : kind == S_IFIFO ? "a FIFO" : kind == S_IFCHR ? "a character device"
                : kind == S_IFBLK ? "a block device" : kind == S_IFSOCK ? "a socket" : "a special file"
            throw LaunchError("\(field): '\(path)' is \(what), not a regular file")
        }
        let size = UInt64(max(0, st.st_size))
        guard size <= limit else {
            close(fd)
            throw LaunchError("\(field): '\(path)' is \(size) bytes, larger than \(limitName) (\(limit) bytes)")
        }
        return (fd, size)
    }

    /// Checks that `path` is a readable regular file of at most `limit` bytes (see
    /// `openRegularFile`), without reading it.
    static func checkRegularFile(_ field: String, _ path: String, limit: UInt64, limitName: String) throws {
        close(try openRegularFile(field, path, limit: limit, limitName: limitName).fd)
    }

    /// Reads a regular file of at most `limit` bytes; errors name `field`.
    static func readRegularFile(_ field: String, _ path: String, limit: UInt64) throws -> [UInt8] {
        let (fd, size) = try openRegularFile(field, path, limit: limit, limitName: "the limit for this file")
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw LaunchError("\(field): cannot read '\(path)': \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            done += n
        }
        return Array(bytes[0..<done])
    }
}
