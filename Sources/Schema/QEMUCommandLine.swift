import Foundation

/// Why a QEMU-style command line was refused; `description` names the option and the problem.
public struct QEMUCommandLineError: Error, Equatable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// What a QEMU-style command line asks for: the machine description it became (the one source
/// of truth, exactly what `--config` would have read) plus the process-level options QEMU has
/// that are not part of a machine (pid file, daemonizing, logging). A plain value.
public struct QEMUInvocation: Sendable {
    /// What the process should do.
    public enum Action: Equatable, Sendable {
        /// Build and run the machine.
        case run
        /// Print QEMU's `-version` text and exit 0.
        case printVersion
        /// Print the `-help` text and exit 0.
        case printHelp
        /// Print the description the command line became (JSON) and exit 0.
        case printDescription
    }

    public var action: Action = .run
    /// The machine, as a description (JSON object decoded by the schema).
    public var description: MachineDescription
    /// `-pidfile PATH`: written once the machine runs, removed at exit.
    public var pidfile: String?
    /// `-daemonize`: the parent exits 0 once the machine has started (after the QMP sockets
    /// listen); the child detaches from the terminal.
    public var daemonize = false
    /// `-D FILE`: the log (warnings and errors after start-up) goes to FILE instead of stderr.
    public var logFile: String?
    /// `-incoming URI|defer`.
    public var incoming: String?
    /// `-loadvm TAG`: the internal snapshot loaded before the vCPUs first run (libvirt's
    /// snapshot-revert restarts the machine with it).
    public var loadvm: String?
    /// `-msg timestamp=on`: error lines start with the UTC time, as QEMU's do.
    public var messageTimestamps = false
    /// Notes for the user (e.g. a probed image format), printed before starting.
    public var warnings: [String] = []
}

/// QEMU's `qemu-system-riscv64` command line as a second front end: it translates into the
/// same `MachineDescription` that `--config` reads (so `--print-description` shows what a
/// command line became), and refuses every option or parameter it cannot honour by name.
///
/// Pure apart from `probeFormat` (which reads an image's first bytes when `-drive` gives no
/// format). Any thread.
public enum QEMUCommandLine {
    /// The QEMU release whose command line and `-version` text this follows.
    public static let qemuVersion = (major: 7, minor: 2, micro: 0)

    /// True when `arguments` are written QEMU's way: a single-dash long option (`-machine`,
    /// `-nographic`) or one of QEMU's single-letter options the native front end does not have
    /// (`-M`, `-m`, `-s`, `-D`). The native options all start with `--`.
    public static func looksLikeQEMU(_ arguments: [String]) -> Bool {
        for a in arguments {
            if a == "--" { return false }
            if a.hasPrefix("--") { continue }
            guard a.hasPrefix("-"), a.count >= 2 else { continue }
            if a.count > 2 { return true }
            if ["-M", "-m", "-s", "-D"].contains(a) { return true }
        }
        return false
    }

    /// The options that take an argument, as QEMU's option table says (`-foo ARG`); every other
    /// option is a flag. Used to skip and name options, including the ones refused.
    static let optionsWithArgument: Set<String> = [
        "M", "machine", "m", "smp", "cpu", "bios", "kernel", "initrd", "append", "dtb", "drive", "blockdev",
        "device", "netdev", "nic", "net", "chardev", "serial", "mon", "monitor", "qmp", "qmp-pretty", "display",
        "vnc", "gdb", "name", "uuid", "pidfile", "overcommit", "msg", "sandbox", "incoming", "D", "d", "accel",
        "object", "action", "global", "boot", "rtc", "vga", "k", "L", "hda", "hdb", "cdrom", "fsdev",
        "virtfs", "audiodev", "parallel", "usbdevice", "icount", "numa", "mem-path", "add-fd", "fw_cfg",
        "trace", "plugin", "run-with", "set", "readconfig", "writeconfig", "semihosting-config", "watchdog-action",
        "smbios", "spice", "iscsi", "loadvm", "option-rom", "tpmdev", "compat", "mem-prealloc-threads",
        "debugcon", "pflash", "mtdblock", "sd", "fda", "fdb", "hdc", "hdd", "acpitable",
    ]

    /// Why options QEMU has are refused, when there is more to say than "not supported".
    static let refusalReasons: [String: String] = [
        "net": "the legacy -net is not supported; use -netdev user,id=ID[,hostfwd=...] with -device virtio-net-pci,netdev=ID",
        "enable-kvm": "machine-server has no KVM; it is its own TCG-like engine (-accel tcg)",
        "snapshot": "temporary snapshot overlays are not implemented; use a qcow2 overlay (machine-img create -b)",
        "hda": "use -drive file=...,format=...,if=virtio",
        "cdrom": "there is no CD-ROM device on this board",
        "readconfig": "configuration files are QEMU's; machine-server's is --config (a machine description)",
    ]

    /// Parses `arguments` (without the program name). `probeFormat` returns an image's format
    /// when `-drive` gives none (QEMU probes too); nil means the file cannot be read.
    /// Throws `QEMUCommandLineError` naming the option that cannot be honoured.
    public static func parse(_ arguments: [String], workingDirectory: String = FileManager.default.currentDirectoryPath,
                             probeFormat: @escaping (String) -> DriveFormat? = probeImageFormat) throws(QEMUCommandLineError) -> QEMUInvocation {
        var p = Parser(workingDirectory: workingDirectory, probeFormat: probeFormat)
        var i = 0
        while i < arguments.count {
            let raw = arguments[i]
            i += 1
            guard raw.hasPrefix("-"), raw.count >= 2 else {
                throw QEMUCommandLineError("'\(raw)': a bare disk image (QEMU's -hda) is not supported; use -drive file=\(raw),format=...,if=virtio")
            }
            let name = raw.hasPrefix("--") ? String(raw.dropFirst(2)) : String(raw.dropFirst())
            var value: String? = nil
            if optionsWithArgument.contains(name) {
                guard i < arguments.count else { throw QEMUCommandLineError("-\(name): requires an argument") }
                value = arguments[i]
                i += 1
            }
            if p.done { continue }
            try p.option(name, value)
        }
        return try p.finish()
    }

    /// Reads the first bytes of `path`: qcow2 by its magic, raw otherwise; nil when unreadable.
    @Sendable public static func probeImageFormat(_ path: String) -> DriveFormat? {
        guard let h = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? h.close() }
        let magic = (try? h.read(upToCount: 4)) ?? Data()
        return Array(magic) == [0x51, 0x46, 0x49, 0xfb] ? .qcow2 : .raw
    }

    /// The text `-version` prints (libvirt reads the first line's version).
    public static var versionText: String {
        """
        QEMU emulator version \(qemuVersion.major).\(qemuVersion.minor).\(qemuVersion.micro) (machine-server)
        Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers (command line and QMP); machine-server is its own emulator

        """
    }

    /// The text `-help` prints.
    public static var helpText: String {
        """
        QEMU emulator version \(qemuVersion.major).\(qemuVersion.minor).\(qemuVersion.micro) (machine-server)
        usage: machine-server [options]   (QEMU's qemu-system-riscv64 options, translated into a machine description)
               machine-server --config FILE [...]   (the native front end; see machine-server --help)

        Machine:
        -machine|-M virt[,accel=tcg][,memory-backend=ID][,usb=off][,dump-guest-core=on|off]
                                  the RISC-V 'virt' board (-machine none is not available)
        -m [size=]SIZE            guest RAM (MiB without a suffix; K, M, G suffixes), 16M..16G
        -smp [cpus=]N[,sockets=,cores=,threads=,maxcpus=N]   1..8 harts
        -cpu rv64                 the only CPU model (RV64GC)
        -accel tcg[,thread=multi] the built-in engine
        -bios FILE|none|default   M-mode firmware (default: Debian's OpenSBI fw_dynamic)
        -kernel FILE  -initrd FILE  -append CMDLINE
        -name [guest=]NAME[,debug-threads=on|off]   -uuid UUID
        -S                        start paused (QMP cont)
        -no-reboot                a guest reboot ends the machine; -no-shutdown: a guest power-off pauses it
        -action reboot=reset|shutdown,shutdown=poweroff|pause
        -incoming tcp:[HOST]:PORT|unix:PATH|file:PATH|exec:CMD|defer
        -gdb tcp:[HOST]:PORT|none  -s (= -gdb tcp::1234; an empty HOST listens on all interfaces, as QEMU's)
        -object memory-backend-ram,id=ID,size=SIZE | memory-backend-file,id=ID,size=SIZE,mem-path=PATH[,share=on]
                (the machine's RAM, with -machine memory-backend=ID) | rng-random,id=ID,filename=/dev/urandom | rng-builtin,id=ID

        Block devices:
        -drive file=F[,format=raw|qcow2][,if=virtio|none][,id=ID][,readonly=on][,index=N][,media=disk][,cache=writeback]
        -blockdev driver=file,node-name=N,filename=F | driver=raw|qcow2,node-name=N,file=NODE (or JSON)
        -device virtio-blk-device|virtio-blk-pci,drive=ID[,id=ID][,bus=][,addr=]
        -device virtio-gpu-*|virtio-keyboard-*|virtio-tablet-*|virtio-rng-*|pcie-root-port (-device or -pci forms; JSON accepted)

        Network:
        -netdev user,id=ID[,net=ADDR/MASK][,host=][,dns=][,dhcpstart=][,hostname=][,domainname=][,restrict=on|off]
                [,hostfwd=[tcp|udp]:[HADDR]:HPORT-[GADDR]:GPORT]...[,guestfwd=tcp:SERVER:PORT-cmd:COMMAND]...
        -netdev stream,id=ID,server=on|off,addr.type=inet,addr.host=H,addr.port=P | addr.type=unix,addr.path=P[,reconnect=N]
                (JSON accepted: -netdev {"type":"user","id":"n0","hostfwd":[{"str":"tcp::2222-:22"}]})
        -device virtio-net-pci|virtio-net-device,netdev=ID[,mac=52:54:00:XX:XX:XX][,id=ID][,bus=][,addr=]
        -nic user|stream,model=virtio-net-pci|virtio-net-device[,mac=][,id=][,the -netdev parameters] | none

        Character devices and monitors:
        -chardev socket,id=ID,path=P|host=H,port=N|fd=N,server=on,wait=off | file,id=ID,path=P | ringbuf,id=ID[,size=N] | stdio,id=ID | pty,id=ID | null,id=ID
        -serial stdio|mon:stdio|null|none|file:P|unix:P,server=on,wait=off|tcp:H:N,server=on,wait=off|chardev:ID
        -qmp unix:P,server=on,wait=off|tcp:H:N,server=on,wait=off   -mon chardev=ID[,mode=control|readline]
        -monitor unix:P,server=on,wait=off|tcp:H:N,server=on,wait=off|none   (HMP with the (qemu) prompt)
        -nographic                serial on stdio, no display   -display none   -vnc [HOST]:N | none
        -nodefaults -no-user-config -overcommit mem-lock=off -msg timestamp=on|off -sandbox off -rtc base=utc
        -boot strict=on -audiodev none,id=ID -object secret,id=ID,file=F|data=D

        Process:
        -pidfile FILE  -daemonize  -D LOGFILE  -version  -help  --print-description (print the description and exit)

        Refused by name: -net (use -netdev with -device, or -nic), -snapshot, -enable-kvm,
        and every other QEMU option. See docs/qemu-cli.md.

        """
    }
}

/// The parser's collected state; `finish` turns it into the description.
private struct Parser {
    let workingDirectory: String
    let probeFormat: (String) -> DriveFormat?
    var done = false
    var action: QEMUInvocation.Action = .run
    var machine: QEMUKeyValue?
    var memory: QEMUKeyValue?
    var smp: QEMUKeyValue?
    var cpu: String?
    var accel: [QEMUKeyValue] = []
    var bios: String?
    var kernel: String?
    var initrd: String?
    var append: String?
    var drives: [QEMUKeyValue] = []
    var blockdevs: [QEMUKeyValue] = []
    var devices: [QEMUKeyValue] = []
    var chardevs: [QEMUKeyValue] = []
    var serials: [String] = []
    var mons: [QEMUKeyValue] = []
    var qmps: [String] = []
    var monitors: [String] = []
    var audiodevs: Set<String> = []
    /// -add-fd sets: set number -> descriptors.
    var fdsets: [Int64: [Int64]] = [:]
    var secrets: Set<String> = []
    var objects: [QEMUKeyValue] = []
    /// -netdev, decoded by the schema's Netdev, in order.
    var netdevs: [Netdev] = []
    /// -gdb / -s: the description's tcp:HOST:PORT (nil: none).
    var gdb: String?
    /// -nic options so far (their backends' default ids count up).
    var nicCount = 0
    var nographic = false
    var displayNone = false
    var vnc: String?
    var startPaused = false
    var name: QEMUKeyValue?
    var uuid: String?
    var reboot: String?
    var shutdown: String?
    var nodefaults = false
    var monitorNone = false
    var parallelNone = false
    var invocation: QEMUInvocation

    init(workingDirectory: String, probeFormat: @escaping (String) -> DriveFormat?) {
        self.workingDirectory = workingDirectory
        self.probeFormat = probeFormat
        invocation = QEMUInvocation(description: MachineDescription(machine: .virt, memory: "128M"))
    }

    func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : (workingDirectory as NSString).appendingPathComponent(path)
    }

    mutating func option(_ option: String, _ value: String?) throws(QEMUCommandLineError) {
        let name = option
        // As in QEMU, a later option of the same kind replaces an earlier one unless it adds to a list.
        let v = value ?? ""
        switch name {
        case "version":
            action = .printVersion; done = true
        case "h", "help":
            action = .printHelp; done = true
        case "print-description":
            action = .printDescription
        case "M", "machine":
            let kv = try QEMUKeyValue(parsing: v, impliedKey: "type")
            if var m = machine {
                // Later -machine options add to (and override) earlier ones, as in QEMU.
                for (k, val) in kv.pairs { m = QEMUKeyValue(m.pairs.filter { $0.key != k } + [(k, val)]) }
                machine = m
            } else {
                machine = kv
            }
        case "m": memory = try QEMUKeyValue(parsing: v, impliedKey: "size")
        case "smp": smp = try QEMUKeyValue(parsing: v, impliedKey: "cpus")
        case "cpu": cpu = v
        case "accel": accel.append(try QEMUKeyValue(parsing: v, impliedKey: "accel"))
        case "bios": bios = v
        case "kernel": kernel = v
        case "initrd": initrd = v
        case "append": append = v
        case "dtb":
            throw QEMUCommandLineError("-dtb: not supported: machine-server generates the device tree from the devices it builds")
        case "drive": drives.append(try QEMUKeyValue(parsing: v))
        case "blockdev": blockdevs.append(try QEMUKeyValue(parsing: v, acceptsJSON: true))
        case "device":
            if v == "help" || v.hasPrefix("help") {
                throw QEMUCommandLineError("-device help: the devices are \(DeviceDriver.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            devices.append(try QEMUKeyValue(parsing: v, impliedKey: "driver", acceptsJSON: true))
        case "chardev": chardevs.append(try QEMUKeyValue(parsing: v, impliedKey: "backend"))
        case "netdev":
            let netdev = try netdevOption(v)
            guard !netdevs.contains(where: { $0.id == netdev.id }) else {
                throw QEMUCommandLineError("-netdev \(v): Duplicate ID '\(netdev.id)' for netdev")
            }
            netdevs.append(netdev)
        case "nic":
            // QEMU's shorthand for a -netdev plus its NIC: the backend's id is the given id or
            // __org.qemu.nicN, the NIC is model= (machine-server needs it named) with mac=.
            let kv = try QEMUKeyValue(parsing: v, impliedKey: "type", repeatable: ["hostfwd", "guestfwd"])
            if kv["type"] == "none" {
                guard kv.keys == ["type"] else { throw QEMUCommandLineError("-nic none: takes no parameters") }
                break
            }
            guard let model = kv["model"] else {
                throw QEMUCommandLineError("-nic \(v): needs model=virtio-net-pci or model=virtio-net-device")
            }
            let id = kv["id"] ?? "__org.qemu.nic\(nicCount)"
            nicCount += 1
            // QEMU's -nic without a type is user networking.
            let backend = [("type", kv["type"] ?? "user"), ("id", id)]
                + kv.pairs.filter { !["type", "model", "mac", "id"].contains($0.key) }.map { ($0.key, $0.value) }
            let netdev = try netdevOption(v, keyValue: QEMUKeyValue(backend), option: "-nic")
            guard !netdevs.contains(where: { $0.id == netdev.id }) else {
                throw QEMUCommandLineError("-nic \(v): Duplicate ID '\(netdev.id)' for netdev")
            }
            netdevs.append(netdev)
            var nic: [(String, String)] = [("driver", model), ("netdev", id)]
            if let mac = kv["mac"] { nic.append(("mac", mac)) }
            devices.append(QEMUKeyValue(nic))
        case "gdb": gdb = try gdbAddress(v, what: "-gdb \(v)")
        case "s": gdb = try gdbAddress("tcp::1234", what: "-s")
        case "serial": serials.append(v)
        case "mon": mons.append(try QEMUKeyValue(parsing: v, impliedKey: "chardev"))
        case "qmp": qmps.append(v)
        case "monitor":
            if v == "none" { monitorNone = true } else { monitors.append(v) }
        case "nographic": nographic = true
        case "parallel":
            guard v == "none" else { throw QEMUCommandLineError("-parallel \(v): there is no parallel port on this board (only -parallel none)") }
            parallelNone = true
        case "display":
            let kv = try QEMUKeyValue(parsing: v, impliedKey: "type")
            guard kv["type"] == "none", kv.keys == ["type"] else {
                throw QEMUCommandLineError("-display \(v): only 'none' is supported (the display is served over VNC: -vnc)")
            }
            displayNone = true
        case "vga":
            guard v == "none" else { throw QEMUCommandLineError("-vga \(v): only 'none' is supported (use -device virtio-gpu-pci or -vnc)") }
        case "vnc": vnc = v
        case "S": startPaused = true
        case "name": self.name = try QEMUKeyValue(parsing: v, impliedKey: "guest")
        case "uuid": uuid = v
        case "pidfile": invocation.pidfile = absolute(v)
        case "daemonize": invocation.daemonize = true
        case "no-reboot": reboot = "shutdown"
        case "no-shutdown": shutdown = "pause"
        case "action":
            let kv = try QEMUKeyValue(parsing: v)
            try kv.rejectUnknown(["reboot", "shutdown"], in: "-action")
            if let r = kv["reboot"] {
                guard RebootAction(rawValue: r) != nil else { throw QEMUCommandLineError("-action: reboot='\(r)' is not reset or shutdown") }
                reboot = r
            }
            if let s = kv["shutdown"] {
                guard ShutdownAction(rawValue: s) != nil else { throw QEMUCommandLineError("-action: shutdown='\(s)' is not poweroff or pause") }
                shutdown = s
            }
        case "nodefaults": nodefaults = true
        case "add-fd":
            let kv = try QEMUKeyValue(parsing: v)
            try kv.rejectUnknown(["fd", "set", "opaque"], in: "-add-fd")
            guard let fd = try kv.integer("fd", in: "-add-fd"), fd >= 3, let set = try kv.integer("set", in: "-add-fd") else {
                throw QEMUCommandLineError("-add-fd \(v): needs fd=N (3 or more) and set=S")
            }
            fdsets[set, default: []].append(fd)
        case "rtc":
            let kv = try QEMUKeyValue(parsing: v)
            try kv.rejectUnknown(["base", "clock", "driftfix"], in: "-rtc")
            guard (kv["base"] ?? "utc") == "utc", (kv["clock"] ?? "host") == "host", (kv["driftfix"] ?? "none") == "none" else {
                throw QEMUCommandLineError("-rtc \(v): the RTC follows the host's UTC clock (only base=utc,clock=host)")
            }
        case "boot":
            let kv = try QEMUKeyValue(parsing: v, impliedKey: "order")
            try kv.rejectUnknown(["strict", "menu"], in: "-boot")
            // With -kernel (or the firmware's own choice) there is no boot order to keep:
            // strict boot and a disabled menu are what already happens.
            if try kv.bool("menu", in: "-boot") == true {
                throw QEMUCommandLineError("-boot menu=on: there is no boot menu")
            }
            _ = try kv.bool("strict", in: "-boot")
        case "audiodev":
            let kv = try QEMUKeyValue(parsing: v, impliedKey: "driver", acceptsJSON: true)
            try kv.rejectUnknown(["driver", "id"], in: "-audiodev")
            guard kv["driver"] == "none", let id = kv["id"] else {
                throw QEMUCommandLineError("-audiodev \(v): there is no sound device; only driver=none with an id")
            }
            audiodevs.insert(id)
        case "no-user-config":
            break  // machine-server reads no QEMU configuration files, so there are none to skip.
        case "overcommit":
            let kv = try QEMUKeyValue(parsing: v)
            try kv.rejectUnknown(["mem-lock", "cpu-pm"], in: "-overcommit")
            if try kv.bool("mem-lock", in: "-overcommit") == true {
                throw QEMUCommandLineError("-overcommit mem-lock=on: locking guest RAM is not supported")
            }
            if try kv.bool("cpu-pm", in: "-overcommit") == true {
                throw QEMUCommandLineError("-overcommit cpu-pm=on: host CPU power management is a KVM feature")
            }
        case "msg":
            let kv = try QEMUKeyValue(parsing: v)
            try kv.rejectUnknown(["timestamp", "guest-name"], in: "-msg")
            invocation.messageTimestamps = try kv.bool("timestamp", in: "-msg") ?? false
            if try kv.bool("guest-name", in: "-msg") == true {
                throw QEMUCommandLineError("-msg \(v): guest names in messages are not supported")
            }
        case "sandbox":
            let kv = try QEMUKeyValue(parsing: v, impliedKey: "enable")
            guard try kv.bool("enable", in: "-sandbox") == false else {
                throw QEMUCommandLineError("-sandbox \(v): there is no seccomp sandbox in machine-server (only -sandbox off)")
            }
        case "incoming":
            invocation.incoming = try incomingURI(v)
        case "loadvm":
            guard !v.isEmpty else { throw QEMUCommandLineError("-loadvm: needs a snapshot name") }
            invocation.loadvm = v
        case "D": invocation.logFile = absolute(v)
        case "object":
            objects.append(try QEMUKeyValue(parsing: v, impliedKey: "qom-type", acceptsJSON: true))
        default:
            let known = QEMUCommandLine.optionsWithArgument.contains(name) || QEMUCommandLine.refusalReasons[name] != nil
            if let reason = QEMUCommandLine.refusalReasons[name] {
                throw QEMUCommandLineError("-\(name): not supported: \(reason)")
            }
            throw QEMUCommandLineError(known ? "-\(name): not supported by machine-server" : "-\(name): invalid option")
        }
    }

    // MARK: Building the description

    mutating func finish() throws(QEMUCommandLineError) -> QEMUInvocation {
        if action == .printVersion || action == .printHelp {
            invocation.action = action
            return invocation
        }
        var d = JSONObject()
        d["version"] = .int(MachineDescription.currentVersion)

        // -machine
        guard let machine, let type = machine["type"] else {
            throw QEMUCommandLineError("No machine specified, and there is no default; use -machine virt")
        }
        guard type == "virt" || type == "none" else {
            throw QEMUCommandLineError("-machine \(type): unsupported machine type; the machines are 'virt' and 'none'")
        }
        let empty = type == "none"
        if empty {
            // QEMU's empty machine: the monitor only (what libvirt starts to probe a binary).
            for (option, given) in [("-kernel", kernel != nil), ("-initrd", initrd != nil), ("-append", append != nil),
                                    ("-bios", bios != nil), ("-drive", !drives.isEmpty), ("-blockdev", !blockdevs.isEmpty),
                                    ("-device", !devices.isEmpty), ("-vnc", vnc != nil && vnc != "none"),
                                    ("-object", !objects.isEmpty), ("-m", memory != nil), ("-smp", smp != nil),
                                    ("-netdev", !netdevs.isEmpty), ("-gdb", gdb != nil)] where given {
                throw QEMUCommandLineError("\(option): -machine none has no CPUs, RAM or devices")
            }
            if let s = serials.first, s != "null", s != "none" {
                throw QEMUCommandLineError("-serial \(s): -machine none has no serial port")
            }
            serials = []
            nographic = false
        }
        try machine.rejectUnknown(["type", "accel", "usb", "dump-guest-core", "memory-backend"], in: "-machine")
        if try machine.bool("usb", in: "-machine") == true {
            throw QEMUCommandLineError("-machine usb=on: there is no USB on this board")
        }
        _ = try machine.bool("dump-guest-core", in: "-machine")
        d["machine"] = .string(type)

        // -accel / -machine accel=
        var accels = accel
        if let a = machine["accel"] { accels.append(QEMUKeyValue([("accel", a)])) }
        for a in accels {
            try a.rejectUnknown(["accel", "thread"], in: "-accel")
            let names = (a["accel"] ?? "").split(separator: ":").map(String.init)
            guard names.contains("tcg") else {
                throw QEMUCommandLineError("-accel \(a["accel"] ?? ""): not available; machine-server's engine answers to 'tcg' only")
            }
            if let t = a["thread"], t != "multi", t != "single" {
                throw QEMUCommandLineError("-accel: thread='\(t)' is not multi or single")
            }
        }

        // -m, and a memory backend object standing for the RAM
        var ramBytes: UInt64 = 128 << 20
        if let memory {
            try memory.rejectUnknown(["size"], in: "-m")
            guard let s = memory["size"], let bytes = Self.qemuSize(s, defaultUnit: 20) else {
                throw QEMUCommandLineError("-m \(memory["size"] ?? ""): not a size (a number of MiB, or with a K, M, G or T suffix)")
            }
            ramBytes = bytes
        }
        var rngObjects: Set<String> = []
        for o in objects {
            guard let type = o["qom-type"], let id = o["id"] else {
                throw QEMUCommandLineError("-object: needs a type and an id=")
            }
            switch type {
            case "memory-backend-ram", "memory-backend-file":
                let file = type == "memory-backend-file"
                try o.rejectUnknown(Set(["qom-type", "id", "size", "x-use-canonical-path-for-ramblock-id", "share", "prealloc"])
                                    .union(file ? ["mem-path", "discard-data"] : []), in: "-object \(type)")
                let what = "-object \(type),id=\(id)"
                guard machine["memory-backend"] == id else {
                    throw QEMUCommandLineError("\(what): only the machine's RAM (-machine memory-backend=\(id)) is supported")
                }
                guard let s = o["size"], let bytes = Self.qemuSize(s, defaultUnit: 0) else {
                    throw QEMUCommandLineError("\(what): size= is missing or not a size")
                }
                if memory != nil, bytes != ramBytes {
                    throw QEMUCommandLineError("\(what): size \(bytes) differs from -m (\(ramBytes) bytes)")
                }
                let share = try o.bool("share", in: what)
                let prealloc = try o.bool("prealloc", in: what)
                _ = try o.bool("x-use-canonical-path-for-ramblock-id", in: what)
                _ = try o.bool("discard-data", in: what)
                if prealloc == true { throw QEMUCommandLineError("\(what): prealloc=on is not supported") }
                if file {
                    guard let path = o["mem-path"] else { throw QEMUCommandLineError("\(what): mem-path= is required") }
                    d["memory-backend"] = ["file": .string(absolute(path)), "share": .bool(share ?? false)]
                } else if share == true {
                    throw QEMUCommandLineError("\(what): share=on needs a file (memory-backend-file)")
                }
                ramBytes = bytes
            case "secret":
                // Data a management tool hands over (libvirt's masterKey0); held, used by nothing
                // machine-server has (no encrypted images or passwords read from secrets yet).
                try o.rejectUnknown(["qom-type", "id", "format", "file", "data", "keyid", "iv"], in: "-object secret")
                guard (o["file"] != nil) != (o["data"] != nil) else {
                    throw QEMUCommandLineError("-object secret,id=\(id): give exactly one of file= and data=")
                }
                if let f = o["format"], f != "raw", f != "base64" {
                    throw QEMUCommandLineError("-object secret,id=\(id): format=\(f) is not raw or base64")
                }
                if o["keyid"] != nil || o["iv"] != nil {
                    throw QEMUCommandLineError("-object secret,id=\(id): encrypted secrets (keyid, iv) are not supported")
                }
                secrets.insert(id)
            case "rng-builtin":
                try o.rejectUnknown(["qom-type", "id"], in: "-object rng-builtin")
                rngObjects.insert(id)
            case "rng-random":
                try o.rejectUnknown(["qom-type", "id", "filename"], in: "-object rng-random")
                guard ["/dev/urandom", "/dev/random", nil].contains(o["filename"]) else {
                    throw QEMUCommandLineError("-object rng-random: filename must be /dev/urandom or /dev/random (the host's entropy)")
                }
                rngObjects.insert(id)
            default:
                throw QEMUCommandLineError("-object \(type): not supported (supported: memory-backend-ram, memory-backend-file, rng-builtin, rng-random)")
            }
        }
        if let backend = machine["memory-backend"], !objects.contains(where: { $0["id"] == backend }) {
            throw QEMUCommandLineError("-machine memory-backend=\(backend): no -object with that id")
        }
        if !empty { d["memory"] = .string(Self.sizeText(ramBytes)) }

        // -smp
        if let smp {
            try smp.rejectUnknown(["cpus", "sockets", "cores", "threads", "maxcpus", "dies", "clusters"], in: "-smp")
            var product: Int64 = 1
            for k in ["sockets", "dies", "clusters", "cores", "threads"] {
                let (p, overflow) = product.multipliedReportingOverflow(by: try smp.integer(k, in: "-smp") ?? 1)
                guard !overflow else { throw QEMUCommandLineError("-smp: the topology is too large") }
                product = p
            }
            let cpus = try smp.integer("cpus", in: "-smp") ?? product
            let explicitTopology = ["sockets", "dies", "clusters", "cores", "threads"].contains { smp[$0] != nil }
            if explicitTopology && product != cpus {
                throw QEMUCommandLineError("-smp: cpus=\(cpus) does not match the topology (\(product) = sockets x dies x clusters x cores x threads)")
            }
            if let max = try smp.integer("maxcpus", in: "-smp"), max != cpus {
                throw QEMUCommandLineError("-smp: maxcpus=\(max) differs from cpus=\(cpus); CPU hot-plug is not supported")
            }
            d["cpus"] = .int(cpus)
        }
        if let cpu {
            let kv = try QEMUKeyValue(parsing: cpu, impliedKey: "model")
            guard kv["model"] == "rv64" else {
                throw QEMUCommandLineError("-cpu \(cpu): the only CPU model is 'rv64' (RV64GC)")
            }
            try kv.rejectUnknown(["model"], in: "-cpu rv64")
        }

        // Boot images
        switch bios {
        case nil, "default"?: break
        case "none"?: d["firmware"] = .string("none")
        case let path?: d["firmware"] = .string(absolute(path))
        }
        if let kernel { d["kernel"] = .string(absolute(kernel)) }
        if let initrd { d["initrd"] = .string(absolute(initrd)) }
        if let append { d["append"] = .string(append) }
        if bios == "none" && kernel == nil {
            throw QEMUCommandLineError("-bios none: needs -kernel (there is nothing else to run)")
        }

        // -name, -uuid, -S, actions
        if let name {
            try name.rejectUnknown(["guest", "debug-threads"], in: "-name")
            _ = try name.bool("debug-threads", in: "-name")
            if let g = name["guest"] { d["name"] = .string(g) }
        }
        if let uuid {
            guard Self.isUUID(uuid) else { throw QEMUCommandLineError("-uuid \(uuid): not a UUID (8-4-4-4-12 hexadecimal digits)") }
            d["uuid"] = .string(uuid.lowercased())
        }
        if startPaused { d["start"] = .string("paused") }
        if reboot != nil || shutdown != nil {
            var a = JSONObject()
            if let reboot { a["reboot"] = .string(reboot) }
            if let shutdown { a["shutdown"] = .string(shutdown) }
            d["actions"] = .object(a)
        }

        // Character devices, the serial line and the monitors
        var chardevTable: [String: JSONValue] = [:]
        var usedChardevs: Set<String> = []
        for c in chardevs {
            guard let id = c["id"] else { throw QEMUCommandLineError("-chardev \(c["backend"] ?? ""): needs id=") }
            guard chardevTable[id] == nil else { throw QEMUCommandLineError("-chardev: duplicate id '\(id)'") }
            chardevTable[id] = try chardevJSON(c, what: "-chardev \(id)")
        }
        // QEMU's rule: -nographic puts the default serial, parallel and monitor on stdio, which
        // a daemon cannot have; each must be given (or -nodefaults).
        if nographic && invocation.daemonize && !nodefaults
            && (serials.isEmpty || !parallelNone || (!monitorNone && mons.isEmpty && qmps.isEmpty && monitors.isEmpty)) {
            throw QEMUCommandLineError("-nographic cannot be used with -daemonize (give -nodefaults, or -serial, -parallel none and -monitor/-qmp)")
        }
        if serials.count > 1 {
            throw QEMUCommandLineError("-serial: the virt board has one serial port; \(serials.count) were given")
        }
        if let spec = serials.first {
            if spec.hasPrefix("chardev:") {
                let id = String(spec.dropFirst(8))
                guard let c = chardevTable[id] else { throw QEMUCommandLineError("-serial chardev:\(id): no -chardev with that id") }
                if c["backend"]?.stringValue == "fd" {
                    throw QEMUCommandLineError("-serial chardev:\(id): a serial line on a passed descriptor (fd=) is not supported; only monitors take one")
                }
                usedChardevs.insert(id)
                guard case .object(var o) = c else { throw QEMUCommandLineError("-serial chardev:\(id): not a chardev") }
                o["id"] = .string(id)
                d["serial"] = .object(o)
            } else {
                d["serial"] = try legacyChardev(spec, what: "-serial", forSerial: true)
            }
        } else if nographic && !nodefaults {
            d["serial"] = ["backend": "stdio"]
        } else {
            // QEMU's default serial is a graphical console, which machine-server does not have
            // (and -machine none has no serial port at all).
            d["serial"] = ["backend": "none"]
        }
        var qmp: [JSONValue] = []
        var hmp: [JSONValue] = []
        for spec in qmps {
            qmp.append(try qmpListener(legacyChardev(spec, what: "-qmp", forSerial: false), what: "-qmp \(spec)"))
        }
        for spec in monitors {
            hmp.append(try qmpListener(legacyChardev(spec, what: "-monitor", forSerial: false), what: "-monitor \(spec)"))
        }
        for m in mons {
            try m.rejectUnknown(["chardev", "mode", "pretty", "id"], in: "-mon")
            guard let id = m["chardev"], let c = chardevTable[id] else {
                throw QEMUCommandLineError("-mon: chardev='\(m["chardev"] ?? "")' names no -chardev")
            }
            usedChardevs.insert(id)
            switch m["mode"] ?? "readline" {
            case "control": qmp.append(try qmpListener(c, what: "-mon chardev=\(id)"))
            case "readline": hmp.append(try qmpListener(c, what: "-mon chardev=\(id)"))
            case let mode: throw QEMUCommandLineError("-mon chardev=\(id): mode=\(mode) is not control or readline")
            }
        }
        if !qmp.isEmpty { d["qmp"] = .array(qmp) }
        if !hmp.isEmpty { d["hmp"] = .array(hmp) }
        for id in chardevTable.keys.sorted() where !usedChardevs.contains(id) {
            throw QEMUCommandLineError("-chardev \(id): not used by -serial or -mon (machine-server has no other character device front ends)")
        }

        // Display
        if let vnc, vnc != "none" {
            let kv = try QEMUKeyValue(parsing: vnc, impliedKey: "vnc")
            try kv.rejectUnknown(["vnc", "audiodev"], in: "-vnc")
            if let a = kv["audiodev"], !audiodevs.contains(a) {
                throw QEMUCommandLineError("-vnc: audiodev=\(a) names no -audiodev")
            }
            let addr = kv["vnc"] ?? ""
            guard let colon = addr.lastIndex(of: ":"), let n = UInt16(addr[addr.index(after: colon)...]), n <= 65535 - 5900 else {
                throw QEMUCommandLineError("-vnc \(vnc): expected [HOST]:DISPLAY (e.g. 127.0.0.1:0 for port 5900)")
            }
            var host = String(addr[..<colon])
            if host.isEmpty { host = "0.0.0.0" }
            if host.hasPrefix("unix") { throw QEMUCommandLineError("-vnc \(vnc): unix sockets are not supported; use HOST:DISPLAY") }
            let bracketed = host.contains(":") && !host.hasPrefix("[") ? "[\(host)]" : host
            d["display"] = ["vnc": ["listen": .string("\(bracketed):\(5900 + Int(n))")]]
        }

        // Block devices
        var devs: [JSONValue] = []
        var driveTable: [String: JSONValue] = [:]
        var usedDrives: Set<String> = []
        var virtioDrives: [(String, JSONValue)] = []
        var usedNetdevs: Set<String> = []
        for (n, drv) in drives.enumerated() {
            try drv.rejectUnknown(["file", "format", "if", "id", "index", "readonly", "media", "cache", "discard", "aio", "werror", "rerror"], in: "-drive")
            guard let file = drv["file"] else { throw QEMUCommandLineError("-drive: file= is required (empty drives are not supported)") }
            if let m = drv["media"], m != "disk" { throw QEMUCommandLineError("-drive \(file): media=\(m) is not supported (disks only)") }
            if let c = drv["cache"], c != "writeback" { throw QEMUCommandLineError("-drive \(file): cache=\(c) is not supported (only writeback, the default)") }
            if let a = drv["aio"], a != "threads" { throw QEMUCommandLineError("-drive \(file): aio=\(a) is not supported") }
            for k in ["werror", "rerror"] where drv[k] != nil && drv[k] != "report" {
                throw QEMUCommandLineError("-drive \(file): \(k)=\(drv[k]!) is not supported (errors are reported to the guest)")
            }
            if let di = drv["discard"], di != "ignore" { throw QEMUCommandLineError("-drive \(file): discard=\(di) is not supported (discard requests are not offered)") }
            let path = absolute(file)
            let format: String
            if let f = drv["format"] {
                guard DriveFormat(rawValue: f) != nil else { throw QEMUCommandLineError("-drive \(file): format=\(f) is not supported (raw, qcow2)") }
                format = f
            } else {
                guard let probed = probeFormat(path) else { throw QEMUCommandLineError("-drive \(file): cannot open '\(path)' to probe its format") }
                format = probed.rawValue
                invocation.warnings.append("Image format was not specified for '\(file)' and probing guessed \(format). Specify format=\(format) to silence this.")
            }
            var drive: JSONObject = ["file": .string(path), "format": .string(format)]
            if try drv.bool("readonly", in: "-drive") == true { drive["read-only"] = true }
            let iface = drv["if"] ?? "ide"
            switch iface {
            case "none":
                guard let id = drv["id"] else { throw QEMUCommandLineError("-drive \(file),if=none: needs id= for -device ...,drive=ID") }
                guard driveTable[id] == nil else { throw QEMUCommandLineError("-drive: duplicate id '\(id)'") }
                driveTable[id] = .object(drive)
            case "virtio":
                let index = try drv.integer("index", in: "-drive") ?? Int64(n)
                virtioDrives.append((drv["id"] ?? "virtio\(index)", .object(drive)))
            default:
                throw QEMUCommandLineError("-drive \(file): machine type does not support if=\(iface); use if=virtio, or if=none with -device virtio-blk-pci,drive=ID")
            }
        }
        for b in blockdevs {
            guard let node = b["node-name"] else { throw QEMUCommandLineError("-blockdev: node-name= is required") }
            guard driveTable[node] == nil else { throw QEMUCommandLineError("-blockdev: duplicate node-name '\(node)'") }
            let resolved = try blockdevDrive(b, all: blockdevs)
            driveTable[node] = resolved
        }

        for dev in devices {
            guard var driver = dev["driver"] else { throw QEMUCommandLineError("-device: needs a driver") }
            // QEMU's aliases on a machine with PCI.
            if ["virtio-blk", "virtio-gpu", "virtio-keyboard", "virtio-tablet", "virtio-rng", "virtio-net"].contains(driver) { driver += "-pci" }
            if driver == QEMUCapabilities.nonTransitionalBlock { driver = DeviceDriver.virtioBlkPci.rawValue }
            guard let kind = DeviceDriver(rawValue: driver) else {
                throw QEMUCommandLineError("-device \(driver): not supported (supported: \(DeviceDriver.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            let what = "-device \(driver)"
            var o: JSONObject = ["driver": .string(driver)]
            let pci = driver.hasSuffix("-pci") || kind == .pcieRootPort
            var allowed: Set<String> = ["driver", "id"]
            if pci {
                allowed.formUnion(["bus", "addr", "romfile", "multifunction"])
                // QEMU's multifunction=on (libvirt packs its root ports as functions of one slot).
                if let m = try dev.bool("multifunction", in: what) { o["multifunction"] = .bool(m) }
                // QEMU's way to say "no option ROM" (needed where the ROM files are not
                // installed); machine-server's PCI devices have none.
                if let rom = dev["romfile"], !rom.isEmpty {
                    throw QEMUCommandLineError("\(what): romfile=\(rom): option ROMs are not supported (only romfile= with no file)")
                }
                if kind != .pcieRootPort {
                    allowed.insert("disable-legacy")
                    if let v = dev["disable-legacy"], v != "on", v != "auto" {
                        throw QEMUCommandLineError("\(what): disable-legacy=\(v): only modern virtio devices exist here (disable-legacy=on or auto)")
                    }
                }
            }
            switch kind {
            case .virtioBlkDevice, .virtioBlkPci:
                allowed.insert("drive")
                guard let ref = dev["drive"] else { throw QEMUCommandLineError("\(what): drive= is required") }
                guard let drive = driveTable[ref] else { throw QEMUCommandLineError("\(what): drive=\(ref) names no -drive if=none or -blockdev") }
                guard !usedDrives.contains(ref) else { throw QEMUCommandLineError("\(what): drive \(ref) is already in use by another device") }
                usedDrives.insert(ref)
                o["id"] = .string(dev["id"] ?? ref)
                o["drive"] = drive
            case .virtioRngDevice, .virtioRngPci:
                allowed.insert("rng")
                if let r = dev["rng"], !rngObjects.contains(r) {
                    throw QEMUCommandLineError("\(what): rng=\(r) names no -object rng-random or rng-builtin")
                }
            case .virtioNetDevice, .virtioNetPci:
                allowed.formUnion(["netdev", "mac"])
                if let ref = dev["netdev"] {
                    guard netdevs.contains(where: { $0.id == ref }) else {
                        throw QEMUCommandLineError("\(what): netdev=\(ref) names no -netdev")
                    }
                    guard !usedNetdevs.contains(ref) else {
                        throw QEMUCommandLineError("\(what): netdev \(ref) is already in use by another device")
                    }
                    usedNetdevs.insert(ref)
                    o["netdev"] = .string(ref)
                }
                if let mac = dev["mac"] { o["mac"] = .string(mac) }
            case .pcieRootPort:
                allowed.formUnion(["chassis", "slot", "port"])
                if let c = try dev.integer("chassis", in: what) { o["chassis"] = .int(c) }
                if let s = try dev.integer("slot", in: what) { o["slot"] = .int(s) }
                _ = try dev.integer("port", in: what)
            case .virtioGpuDevice, .virtioGpuPci:
                allowed.insert("max_outputs")
                if let n = try dev.integer("max_outputs", in: what), n != 1 {
                    throw QEMUCommandLineError("\(what): max_outputs=\(n): the GPU has one output")
                }
            default: break
            }
            if kind == .virtioBlkDevice || kind == .virtioBlkPci {
                // Firmware boot order: machine-server boots the -kernel (or what the firmware
                // finds), so the index is checked and has nothing to order.
                allowed.insert("bootindex")
                _ = try dev.integer("bootindex", in: what)
            }
            try dev.rejectUnknown(allowed, in: what)
            if o["id"] == nil, let id = dev["id"] { o["id"] = .string(id) }
            if let bus = dev["bus"] { o["bus"] = .string(bus) }
            if let addr = dev["addr"] { o["addr"] = .string(addr) }
            devs.append(.object(o))
        }
        for (id, drive) in virtioDrives {
            devs.append(["driver": "virtio-blk-pci", "id": .string(id), "drive": drive])
        }
        for id in driveTable.keys.sorted() where !usedDrives.contains(id) {
            // An unused format node's file node is fine (it is reached through the format node).
            if blockdevs.contains(where: { $0["node-name"] != id && ($0["file"] == id) }) { continue }
            if drives.contains(where: { $0["id"] == id }) {
                throw QEMUCommandLineError("-drive id=\(id): not used by any -device (drive=\(id))")
            }
        }
        if !devs.isEmpty { d["devices"] = .array(devs) }
        if !netdevs.isEmpty { d["netdevs"] = .array(netdevs.map(\.json)) }
        for n in netdevs where !usedNetdevs.contains(n.id) {
            invocation.warnings.append("warning: netdev \(n.id) has no peer")
        }
        if let gdb { d["gdb"] = .string(gdb) }

        do {
            invocation.description = try MachineDescription(json: .object(d), at: .root)
        } catch {
            throw QEMUCommandLineError("the command line makes an invalid machine description: \(error)")
        }
        invocation.action = action
        return invocation
    }

    /// A `-netdev` option as the schema's `Netdev`: the JSON form is QEMU's Netdev object as
    /// it stands; the key=value form is converted member by member (on/off to booleans,
    /// numbers to integers, each `hostfwd=`/`guestfwd=` to a list item) and decoded by the same
    /// generated decoder, so the schema stays the one grammar.
    /// `-nic` passes its backend's members already split (`keyValue`) and its own name.
    func netdevOption(_ text: String, keyValue: QEMUKeyValue? = nil, option: String = "-netdev") throws(QEMUCommandLineError) -> Netdev {
        var what = "\(option) \(text)"
        let json: JSONValue
        if keyValue == nil, text.first == "{" {
            do { json = try JSONValue.parse(text) } catch {
                throw QEMUCommandLineError("\(what): not valid JSON: \(error)")
            }
        } else {
            let kv: QEMUKeyValue
            if let keyValue { kv = keyValue } else {
                kv = try QEMUKeyValue(parsing: text, impliedKey: "type", repeatable: ["hostfwd", "guestfwd"])
            }
            let type = kv["type"] ?? ""
            if let id = kv["id"] { what = "\(option) \(type),id=\(id)" }
            var o: JSONObject = ["type": .string(type)]
            if let id = kv["id"] { o["id"] = .string(id) }
            switch type {
            case "user":
                let strings = ["net", "host", "dns", "dhcpstart", "hostname", "domainname"]
                try kv.rejectUnknown(Set(["type", "id", "restrict", "hostfwd", "guestfwd"] + strings), in: what)
                for k in strings { if let v = kv[k] { o[k] = .string(v) } }
                if let r = try kv.bool("restrict", in: what) { o["restrict"] = .bool(r) }
                for k in ["hostfwd", "guestfwd"] where !kv.values(k).isEmpty {
                    o[k] = .array(kv.values(k).map { .object(["str": .string($0)]) })
                }
            case "stream":
                try kv.rejectUnknown(["type", "id", "server", "reconnect", "addr."], in: what)
                if let server = try kv.bool("server", in: what) { o["server"] = .bool(server) }
                if let r = try kv.integer("reconnect", in: what) { o["reconnect"] = .int(r) }
                let addr = kv.nested("addr")
                var a = JSONObject()
                switch addr["type"] {
                case "inet"?:
                    try addr.rejectUnknown(["type", "host", "port"], in: "\(what) addr")
                    a = ["type": "inet"]
                    if let h = addr["host"] { a["host"] = .string(h) }
                    if let p = addr["port"] {
                        guard let n = UInt16(p), n > 0 else { throw QEMUCommandLineError("\(what): addr.port=\(p) is not a port number (1-65535)") }
                        a["port"] = .string(String(n))
                    }
                case "unix"?:
                    try addr.rejectUnknown(["type", "path"], in: "\(what) addr")
                    a = ["type": "unix"]
                    if let p = addr["path"] { a["path"] = .string(absolute(p)) }
                case let t?:
                    throw QEMUCommandLineError("\(what): addr.type=\(t) is not supported (inet, unix)")
                case nil:
                    throw QEMUCommandLineError("\(what): needs addr.type=inet,addr.host=H,addr.port=P or addr.type=unix,addr.path=P")
                }
                o["addr"] = .object(a)
            case "":
                throw QEMUCommandLineError("\(what): needs a type (user or stream)")
            default:
                throw QEMUCommandLineError("\(option) \(type): not supported (supported: user, stream)")
            }
            json = .object(o)
        }
        let netdev: Netdev
        do { netdev = try Netdev(json: json, at: .root) } catch {
            throw QEMUCommandLineError("\(what): \(error)")
        }
        guard !netdev.id.isEmpty else { throw QEMUCommandLineError("\(what): id= must not be empty") }
        if case .stream(var s) = netdev.variant, case .unix(let u) = s.addr.variant, !u.path.hasPrefix("/") {
            // The JSON form's relative socket path, made absolute as the key=value form's is.
            s.addr = SocketAddress(variant: .unix(UnixSocketAddress(path: absolute(u.path))))
            return Netdev(id: netdev.id, variant: .stream(s))
        }
        return netdev
    }

    /// `-gdb DEV`: QEMU's `tcp:[HOST]:PORT` (an empty HOST listens on all interfaces, as QEMU's
    /// socket chardev does) becomes the description's `tcp:HOST:PORT`; `none` turns it off.
    func gdbAddress(_ spec: String, what: String) throws(QEMUCommandLineError) -> String? {
        if spec == "none" { return nil }
        guard spec.hasPrefix("tcp:"), !spec.contains(",") else {
            throw QEMUCommandLineError("\(what): only tcp:[HOST]:PORT (or none) is supported")
        }
        let (host, port) = try hostPort(String(spec.dropFirst(4)), what: what)
        return "tcp:\(host):\(port)"
    }

    /// `-incoming`: tcp:[HOST]:PORT and unix:PATH listen for a live migration, file:PATH and
    /// exec:CMD load a saved state, defer waits for migrate-incoming.
    func incomingURI(_ v: String) throws(QEMUCommandLineError) -> String {
        let what = "-incoming \(v)"
        if v == "defer" || v.hasPrefix("exec:") { return v }
        if v.hasPrefix("file:") { return "file:" + absolute(String(v.dropFirst(5))) }
        if v.hasPrefix("unix:") {
            let path = String(v.dropFirst(5))
            guard !path.isEmpty, !path.contains(",") else { throw QEMUCommandLineError("\(what): expected unix:PATH") }
            return "unix:" + absolute(path)
        }
        if v.hasPrefix("tcp:") {
            guard !v.contains(",") else { throw QEMUCommandLineError("\(what): options after tcp:HOST:PORT are not supported") }
            let (host, port) = try hostPort(String(v.dropFirst(4)), what: what)
            let bracketed = host.contains(":") ? "[\(host)]" : host
            return "tcp:\(bracketed):\(port)"
        }
        if v.hasPrefix("fd:") {
            // An inherited descriptor (libvirt's restore passes the save file this way).
            guard let fd = Int32(v.dropFirst(3)), fd >= 0 else { throw QEMUCommandLineError("\(what): expected fd:N (a descriptor number)") }
            return "fd:\(fd)"
        }
        throw QEMUCommandLineError("\(what): not tcp:[HOST]:PORT, unix:PATH, fd:N, file:PATH, exec:CMD or defer")
    }

    /// `[HOST]:PORT` with QEMU's meaning of an empty HOST: every interface (0.0.0.0).
    func hostPort(_ text: String, what: String) throws(QEMUCommandLineError) -> (host: String, port: UInt16) {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]), port > 0 else {
            throw QEMUCommandLineError("\(what): expected [HOST]:PORT with a port number 1-65535")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host.isEmpty ? "0.0.0.0" : host, port)
    }

    /// The description's serial member (or a QMP listener's socket) for a `-chardev` option.
    func chardevJSON(_ c: QEMUKeyValue, what: String) throws(QEMUCommandLineError) -> JSONValue {
        let backend = c["backend"] ?? ""
        switch backend {
        case "socket":
            try c.rejectUnknown(["backend", "id", "path", "host", "port", "server", "wait", "telnet", "ipv4", "ipv6", "delay", "fd"], in: what)
            try requireServer(c, what: what)
            if let fd = try c.integer("fd", in: what) {
                guard c["path"] == nil, c["host"] == nil, c["port"] == nil else {
                    throw QEMUCommandLineError("\(what): give fd= or an address, not both")
                }
                // An inherited listening socket: only monitors take it (checked where used).
                return ["backend": "fd", "fd": .int(fd)]
            }
            if try c.bool("telnet", in: what) == true { throw QEMUCommandLineError("\(what): telnet=on is not supported") }
            if let path = c["path"] {
                guard c["host"] == nil, c["port"] == nil else { throw QEMUCommandLineError("\(what): give path= or host=/port=, not both") }
                return ["backend": "unix", "path": .string(absolute(path))]
            }
            guard let port = try c.integer("port", in: what), port <= 65535 else {
                throw QEMUCommandLineError("\(what): needs path= (unix) or host= and port= (tcp)")
            }
            let host = c["host"].map { $0.isEmpty ? "0.0.0.0" : $0 } ?? "0.0.0.0"
            return ["backend": "tcp", "host": .string(host), "port": .int(port)]
        case "file":
            try c.rejectUnknown(["backend", "id", "path", "append"], in: what)
            guard let path = c["path"] else { throw QEMUCommandLineError("\(what): needs path=") }
            var o: JSONObject = ["backend": "file", "path": .string(try fdsetPath(path, what: what))]
            if try c.bool("append", in: what) == true { o["append"] = true }
            return .object(o)
        case "ringbuf":
            try c.rejectUnknown(["backend", "id", "size"], in: what)
            if let s = c["size"] {
                guard let n = Self.qemuSize(s, defaultUnit: 0), n > 0, n & (n - 1) == 0 else {
                    throw QEMUCommandLineError("\(what): size=\(s) is not a power of two")
                }
                return ["backend": "ringbuf", "size": .int(Int64(n))]
            }
            return ["backend": "ringbuf"]
        case "stdio":
            try c.rejectUnknown(["backend", "id", "signal", "mux"], in: what)
            if try c.bool("mux", in: what) == true { throw QEMUCommandLineError("\(what): mux=on is not supported (no monitor multiplexing)") }
            return ["backend": "stdio"]
        case "null":
            try c.rejectUnknown(["backend", "id"], in: what)
            return ["backend": "none"]
        case "pty":
            try c.rejectUnknown(["backend", "id", "path"], in: what)
            if c["path"] != nil { throw QEMUCommandLineError("\(what): path= (a symlink to the pty) is not supported") }
            return ["backend": "pty"]
        default:
            throw QEMUCommandLineError("\(what): backend '\(backend)' is not supported (socket, file, ringbuf, stdio, pty, null)")
        }
    }

    /// A file path, or `/dev/fdset/S` (a descriptor passed with -add-fd, as libvirt passes a
    /// serial log file): the inherited descriptor, reopened through /proc/self/fd.
    func fdsetPath(_ path: String, what: String) throws(QEMUCommandLineError) -> String {
        guard path.hasPrefix("/dev/fdset/") else { return absolute(path) }
        guard let set = Int64(path.dropFirst("/dev/fdset/".count)), let fds = fdsets[set], let fd = fds.first else {
            throw QEMUCommandLineError("\(what): \(path) names no -add-fd set")
        }
        return "/proc/self/fd/\(fd)"
    }

    /// Sockets are listening servers that do not wait for a client (QEMU's server=on,wait=off).
    func requireServer(_ c: QEMUKeyValue, what: String) throws(QEMUCommandLineError) {
        guard try c.bool("server", in: what) == true else {
            throw QEMUCommandLineError("\(what): only listening sockets are supported (server=on,wait=off)")
        }
        guard try c.bool("wait", in: what) == false else {
            throw QEMUCommandLineError("\(what): waiting for a client before starting is not supported; add wait=off")
        }
    }

    /// QEMU's legacy chardev syntax of `-serial` and `-qmp`: stdio, mon:stdio, null, none,
    /// file:PATH, unix:PATH,server=on,wait=off, tcp:HOST:PORT,server=on,wait=off.
    func legacyChardev(_ spec: String, what: String, forSerial: Bool) throws(QEMUCommandLineError) -> JSONValue {
        let w = "\(what) \(spec)"
        switch spec {
        case "stdio", "mon:stdio":
            guard forSerial else { throw QEMUCommandLineError("\(w): a monitor on stdio is not supported (no monitor multiplexing); use a unix or tcp socket") }
            if invocation.daemonize { throw QEMUCommandLineError("\(w): stdio cannot be used with -daemonize") }
            return ["backend": "stdio"]
        case "null", "none":
            guard forSerial else { throw QEMUCommandLineError("\(w): QMP needs a socket") }
            return ["backend": "none"]
        case "pty":
            guard forSerial else { throw QEMUCommandLineError("\(w): QMP needs a socket") }
            return ["backend": "pty"]
        default: break
        }
        if spec.hasPrefix("file:") {
            guard forSerial else { throw QEMUCommandLineError("\(w): QMP needs a socket") }
            return ["backend": "file", "path": .string(absolute(String(spec.dropFirst(5))))]
        }
        if spec.hasPrefix("unix:") {
            let kv = try QEMUKeyValue(parsing: String(spec.dropFirst(5)), impliedKey: "path")
            try kv.rejectUnknown(["path", "server", "wait"], in: w)
            try requireServer(kv, what: w)
            return ["backend": "unix", "path": .string(absolute(kv["path"] ?? ""))]
        }
        if spec.hasPrefix("tcp:") {
            let kv = try QEMUKeyValue(parsing: String(spec.dropFirst(4)), impliedKey: "address")
            try kv.rejectUnknown(["address", "server", "wait", "ipv4", "ipv6", "delay"], in: w)
            try requireServer(kv, what: w)
            let addr = kv["address"] ?? ""
            guard let colon = addr.lastIndex(of: ":"), let port = UInt16(addr[addr.index(after: colon)...]) else {
                throw QEMUCommandLineError("\(w): expected tcp:HOST:PORT")
            }
            var host = String(addr[..<colon])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            return ["backend": "tcp", "host": .string(host.isEmpty ? "0.0.0.0" : host), "port": .int(Int64(port))]
        }
        throw QEMUCommandLineError("\(w): not supported (stdio, mon:stdio, null, pty, file:PATH, unix:PATH,server=on,wait=off, tcp:HOST:PORT,server=on,wait=off\(forSerial ? ", chardev:ID" : ""))")
    }

    /// A QMP listener from a chardev's description form (unix or tcp only).
    func qmpListener(_ c: JSONValue, what: String) throws(QEMUCommandLineError) -> JSONValue {
        guard case .object(let o) = c, let backend = o["backend"]?.stringValue, ["unix", "tcp", "fd"].contains(backend) else {
            throw QEMUCommandLineError("\(what): a monitor needs a unix or tcp socket")
        }
        return c
    }

    /// The drive a `-blockdev` format (or bare file) node stands for.
    func blockdevDrive(_ b: QEMUKeyValue, all: [QEMUKeyValue]) throws(QEMUCommandLineError) -> JSONValue {
        let node = b["node-name"] ?? ""
        let what = "-blockdev \(node)"
        let common: Set<String> = ["driver", "node-name", "read-only", "auto-read-only", "discard", "cache.", "detect-zeroes", "force-share"]
        func check(_ kv: QEMUKeyValue, _ what: String) throws(QEMUCommandLineError) {
            for (k, v) in kv.pairs where k.hasPrefix("cache.") {
                if k == "cache.direct" && (v == "off" || v == "false") { continue }
                if k == "cache.no-flush" && (v == "off" || v == "false") { continue }
                throw QEMUCommandLineError("\(what): \(k)=\(v) is not supported")
            }
            if let z = kv["detect-zeroes"], z != "off" { throw QEMUCommandLineError("\(what): detect-zeroes=\(z) is not supported") }
            if let di = kv["discard"], di != "ignore" && di != "unmap" { throw QEMUCommandLineError("\(what): discard=\(di) is not supported") }
            if try kv.bool("force-share", in: what) == true { throw QEMUCommandLineError("\(what): force-share=on is not supported (images are locked)") }
            _ = try kv.bool("auto-read-only", in: what)
        }
        func fileNode(_ kv: QEMUKeyValue, _ what: String) throws(QEMUCommandLineError) -> (path: String, readOnly: Bool) {
            guard kv["driver"] == "file" else {
                throw QEMUCommandLineError("\(what): driver=\(kv["driver"] ?? "") is not supported as a protocol node (only 'file')")
            }
            try kv.rejectUnknown(common.union(["filename", "locking", "aio"]), in: what)
            try check(kv, what)
            if let a = kv["aio"], a != "threads" { throw QEMUCommandLineError("\(what): aio=\(a) is not supported") }
            if let l = kv["locking"], l != "auto" && l != "on" { throw QEMUCommandLineError("\(what): locking=\(l) is not supported (images are always locked)") }
            guard let f = kv["filename"] else { throw QEMUCommandLineError("\(what): filename= is required") }
            return (absolute(f), try kv.bool("read-only", in: what) ?? false)
        }
        let driver = b["driver"] ?? ""
        switch driver {
        case "file":
            let (path, ro) = try fileNode(b, what)
            var o: JSONObject = ["file": .string(path), "format": "raw", "file-node-name": .string(node)]
            if ro { o["read-only"] = true }
            return .object(o)
        case "raw", "qcow2":
            try b.rejectUnknown(common.union(["file", "file.", "backing"]), in: what)
            if let backing = b["backing"], backing != "null" {
                throw QEMUCommandLineError("\(what): backing=\(backing): only backing=null (the image's own backing file is opened)")
            }
            try check(b, what)
            let file: (path: String, readOnly: Bool)
            var fileNodeName: String? = nil
            if let ref = b["file"] {
                guard let target = all.first(where: { $0["node-name"] == ref }) else {
                    throw QEMUCommandLineError("\(what): file=\(ref) names no -blockdev node")
                }
                file = try fileNode(target, "-blockdev \(ref)")
                fileNodeName = ref
            } else {
                let nested = b.nested("file")
                guard !nested.pairs.isEmpty else { throw QEMUCommandLineError("\(what): file= is required") }
                file = try fileNode(nested, "\(what) file")
            }
            var o: JSONObject = ["file": .string(file.path), "format": .string(driver), "node-name": .string(node)]
            if let fileNodeName { o["file-node-name"] = .string(fileNodeName) }
            if try b.bool("read-only", in: what) == true || file.readOnly { o["read-only"] = true }
            return .object(o)
        default:
            throw QEMUCommandLineError("\(what): driver=\(driver) is not supported (file, raw, qcow2)")
        }
    }

    /// QEMU's size syntax: a number with an optional k/K, M, G, T suffix (powers of 1024), or a
    /// bare number in units of `1 << defaultUnit` bytes (MiB for -m).
    static func qemuSize(_ text: String, defaultUnit: UInt64) -> UInt64? {
        guard let last = text.last else { return nil }
        if last.isNumber {
            guard text.allSatisfy({ $0.isASCII && $0.isNumber }), let n = UInt64(text) else { return nil }
            let (v, o) = n.multipliedReportingOverflow(by: 1 << defaultUnit)
            return o ? nil : v
        }
        if last == "B" || last == "b" { return qemuSize(String(text.dropLast()), defaultUnit: 0) }
        return SchemaCheck.parseSize(text)
    }

    /// The description's spelling of a size: the largest of G, M, K that divides it.
    static func sizeText(_ bytes: UInt64) -> String {
        for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] where bytes != 0 && bytes % (1 << UInt64(shift)) == 0 {
            return "\(bytes >> UInt64(shift))\(suffix)"
        }
        return "\(bytes)"
    }

    /// 8-4-4-4-12 hexadecimal digits.
    static func isUUID(_ s: String) -> Bool {
        let groups = s.split(separator: "-", omittingEmptySubsequences: false)
        return groups.map(\.count) == [8, 4, 4, 4, 12] && groups.allSatisfy { $0.allSatisfy(\.isHexDigit) }
    }
}
