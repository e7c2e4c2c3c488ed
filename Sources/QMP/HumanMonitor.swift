import Foundation
import Machine
import Schema

/// The human monitor (HMP) behind `human-monitor-command`: each command parses its words and
/// calls the QMP handler that does the work (written once), then formats the answer the way
/// QEMU's monitor prints it (lines end in CRLF). Runs on the connection's command queue.
extension QMPCommandExecutor {
    /// One HMP command: its name, aliases, argument synopsis, help line, and handler.
    struct HMPCommand: Sendable {
        var names: [String]
        var arguments: String
        var help: String
        var run: @Sendable (QMPCommandExecutor, [String], Int?) throws -> String
    }

    /// One `info` item.
    struct HMPInfo: Sendable {
        var name: String
        var help: String
        var run: @Sendable (QMPCommandExecutor, [String], Int?) throws -> String
    }

    /// The commands, in the order `help` lists them.
    static let hmpCommands: [HMPCommand] = [
        HMPCommand(names: ["help", "?"], arguments: "[cmd]", help: "show the help") { e, w, _ in e.hmpHelp(w) },
        HMPCommand(names: ["info"], arguments: "[subcommand]", help: "show various information about the system state") { e, w, cpu in
            try e.hmpInfo(w, cpu: cpu)
        },
        HMPCommand(names: ["stop"], arguments: "", help: "stop emulation") { e, _, _ in try e.stop(); return "" },
        HMPCommand(names: ["cont", "c"], arguments: "", help: "resume emulation") { e, _, _ in try e.cont(); return "" },
        HMPCommand(names: ["system_reset"], arguments: "", help: "reset the system") { e, _, _ in try e.systemReset(); return "" },
        HMPCommand(names: ["system_powerdown"], arguments: "", help: "send system power down event") { e, _, _ in
            try e.systemPowerdown(); return ""
        },
        HMPCommand(names: ["quit", "q"], arguments: "", help: "quit the emulator") { e, _, _ in try e.quit(); return "" },
        HMPCommand(names: ["sendkey"], arguments: "keys [hold_ms]", help: "send keys to the VM (e.g. 'sendkey ctrl-alt-f1', default hold time=100 ms)") { e, w, _ in
            try e.hmpSendkey(w)
        },
        HMPCommand(names: ["screendump"], arguments: "[-f format] filename", help: "save screen to a file (ppm, or png with -f png)") { e, w, _ in
            try e.hmpScreendump(w)
        },
        HMPCommand(names: ["xp"], arguments: "/fmt addr", help: "physical memory dump starting at 'addr'") { e, w, _ in
            try e.hmpMemoryDump(w, virtual: false, cpu: 0)
        },
        HMPCommand(names: ["x"], arguments: "/fmt addr", help: "virtual memory dump starting at 'addr' (translated by the current CPU's satp)") { e, w, cpu in
            try e.hmpMemoryDump(w, virtual: true, cpu: cpu ?? 0)
        },
        HMPCommand(names: ["savevm"], arguments: "tag", help: "save a VM snapshot into the qcow2 disks") { e, w, _ in try e.hmpSnapshot(w) },
        HMPCommand(names: ["loadvm"], arguments: "tag", help: "restore a VM snapshot from its tag") { e, w, _ in try e.hmpSnapshot(w) },
        HMPCommand(names: ["delvm"], arguments: "tag", help: "delete a VM snapshot from its tag") { e, w, _ in try e.hmpSnapshot(w) },
        HMPCommand(names: ["migrate"], arguments: "uri", help: "migrate to URI (tcp:HOST:PORT, unix:PATH, file:PATH or exec:CMD)") { e, w, _ in
            guard w.count == 2 else { throw HMPError.usage("migrate uri") }
            try e.migrate(MigrateArguments(uri: w[1]))
            return ""
        },
        HMPCommand(names: ["migrate_cancel"], arguments: "", help: "cancel the current VM migration") { e, _, _ in
            try e.migrateCancel(); return ""
        },
        HMPCommand(names: ["migrate_start_postcopy"], arguments: "", help: "Followup to a migration command to switch the migration to postcopy mode. The postcopy-ram capability must be set on both source and destination before the original migration command.") { e, _, _ in
            try e.migrateStartPostcopy(); return ""
        },
        HMPCommand(names: ["device_add"], arguments: "driver[,prop=value][,...]", help: "add device, like -device on the command line") { e, w, _ in
            try e.hotPlugHMP(w) ?? ""
        },
        HMPCommand(names: ["device_del"], arguments: "device", help: "remove device") { e, w, _ in try e.hotPlugHMP(w) ?? "" },
        HMPCommand(names: ["hostfwd_add"], arguments: "[netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport", help: "redirect TCP or UDP connections from host to guest (requires -net user)") { e, w, _ in
            e.networkHMP(w) ?? ""
        },
        HMPCommand(names: ["hostfwd_remove"], arguments: "[netdev_id] [tcp|udp]:[hostaddr]:hostport", help: "remove host-to-guest TCP or UDP redirection") { e, w, _ in
            e.networkHMP(w) ?? ""
        },
        HMPCommand(names: ["gdbserver"], arguments: "[device]", help: "start gdbserver on given device (default 'tcp::1234')") { e, w, _ in
            try e.hmpGDBServer(w)
        },
    ]

    /// The `info` items, in the order `info` lists them.
    static let hmpInfos: [HMPInfo] = [
        HMPInfo(name: "status", help: "show the current VM status (running|paused)") { e, _, _ in
            let s = try e.queryStatus()
            var line = "VM status: " + (s.running ? "running" : "paused")
            if !s.running && s.status != .paused { line += " (\(s.status.rawValue))" }
            return line + "\r\n"
        },
        HMPInfo(name: "version", help: "show the version of QEMU") { e, _, _ in
            let v = try e.queryVersion()
            return "\(v.qemu.major).\(v.qemu.minor).\(v.qemu.micro) (\(v.package))\r\n"
        },
        HMPInfo(name: "name", help: "show the current VM name") { e, _, _ in
            (try e.queryName()).name.map { "\($0)\r\n" } ?? ""
        },
        HMPInfo(name: "uuid", help: "show the current VM UUID") { e, _, _ in "\(try e.queryUuid().uuid)\r\n" },
        HMPInfo(name: "cpus", help: "show infos for each CPU") { e, _, cpu in
            try e.queryCpusFast().map { c in
                "\(c.cpuIndex == Int64(cpu ?? 0) ? "*" : " ") CPU #\(c.cpuIndex): thread_id=\(c.threadId)\r\n"
            }.joined()
        },
        HMPInfo(name: "registers", help: "show the cpu registers (-a: all CPUs)") { e, w, cpu in
            let all = w.contains("-a")
            let indices = all ? try e.queryCpusFast().map { Int($0.cpuIndex) } : [cpu ?? 0]
            return try indices.map { i in
                guard let regs = e.controlForMigration.cpuRegisters(index: i) else { throw HMPError.message("No CPU \(i)") }
                return (all ? "\r\nCPU#\(i)\r\n" : "") + QMPCommandExecutor.formatRegisters(regs)
            }.joined()
        },
        HMPInfo(name: "block", help: "show the block devices") { e, _, _ in
            try e.queryBlock().map { b in
                guard let d = b.inserted else { return "\(b.device): [not inserted]\r\n" }
                return "\(b.device): \(d.file) (\(d.drv)\(d.ro ? ", read-only" : ""))\r\n"
                    + (d.backingFile.map { "    Backing file:     \($0) (chain depth: \(d.backingFileDepth))\r\n" } ?? "")
                    + "    Cache mode:       writeback\r\n\r\n"
            }.joined()
        },
        HMPInfo(name: "blockstats", help: "show block device statistics") { e, _, _ in try e.hmpBlockstats() },
        HMPInfo(name: "chardev", help: "show the character devices") { e, _, _ in
            try e.queryChardev().map { "\($0.label): filename=\($0.filename)\r\n" }.joined()
        },
        HMPInfo(name: "vnc", help: "show the vnc server status") { e, _, _ in
            let v = try e.queryVnc()
            guard v.enabled else { return "Server: disabled\r\n" }
            var out = "Server:\r\n     address: \(v.host ?? "?"):\(v.service ?? "?")\r\n        auth: \(v.auth ?? "none")\r\n"
            let clients = v.clients ?? []
            if clients.isEmpty { out += "Client: none\r\n" }
            for c in clients { out += "Client:\r\n     address: \(c.host):\(c.service)\r\n" }
            return out
        },
        HMPInfo(name: "mtree", help: "show the memory tree") { e, _, _ in
            var out = "address-space: memory\r\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\r\n"
            for r in e.controlForMigration.memoryMap() {
                let last = r.base &+ r.size &- 1
                out += "    \(QMPCommandExecutor.hex16(r.base))-\(QMPCommandExecutor.hex16(last)) (prio 0, \(r.isRAM ? "ram" : "i/o")): \(r.name)\r\n"
            }
            return out
        },
        HMPInfo(name: "qtree", help: "show device tree") { e, _, _ in try e.hmpQtree() },
        HMPInfo(name: "irq", help: "show the interrupts statistics (if available)") { e, _, _ in
            // QEMU's layout: a heading per controller, then " SOURCE: COUNT" for sources raised.
            e.controlForMigration.interruptStatistics().map { c in
                "IRQ statistics for \(c.controller):\r\n" + c.counts.map { " \(String(repeating: " ", count: max(0, 2 - String($0.source).count)))\($0.source): \($0.count)\r\n" }.joined()
            }.joined()
        },
        HMPInfo(name: "migrate", help: "show migration status") { e, _, _ in
            let m = try e.queryMigrate()
            guard let status = m.status else { return "" }
            var out = "Migration status: \(status.rawValue)\r\n"
            if let t = m.totalTime { out += "total time: \(t) ms\r\n" }
            if let d = m.downtime { out += "downtime: \(d) ms\r\n" }
            if let d = m.expectedDowntime { out += "expected downtime: \(d) ms\r\n" }
            if let d = m.setupTime { out += "setup: \(d) ms\r\n" }
            if let ram = m.ram {
                out += "transferred ram: \(ram.transferred / 1024) kbytes\r\n"
                out += "throughput: \(String(format: "%.2f", ram.mbps)) mbps\r\n"
                out += "remaining ram: \(ram.remaining / 1024) kbytes\r\n"
                out += "total ram: \(ram.total / 1024) kbytes\r\n"
                out += "duplicate: \(ram.duplicate) pages\r\n"
                out += "normal: \(ram.normal) pages\r\n"
                out += "normal bytes: \(ram.normalBytes / 1024) kbytes\r\n"
                out += "dirty sync count: \(ram.dirtySyncCount)\r\n"
                out += "dirty pages rate: \(ram.dirtyPagesRate) pages\r\n"
                if ram.postcopyRequests > 0 { out += "postcopy request count: \(ram.postcopyRequests)\r\n" }
            }
            if let t = m.cpuThrottlePercentage { out += "cpu throttle percentage: \(t)\r\n" }
            if let err = m.errorDesc { out += "error description: \(err)\r\n" }
            return out
        },
        HMPInfo(name: "snapshots", help: "show the currently saved VM snapshots") { e, w, _ in try e.hmpSnapshot(w) },
        // These items' handlers take the whole command line ("info network").
        HMPInfo(name: "network", help: "show the network state") { e, w, _ in e.networkHMP(["info"] + w) ?? "" },
        HMPInfo(name: "usernet", help: "show user network stack connection states") { e, w, _ in e.networkHMP(["info"] + w) ?? "" },
        HMPInfo(name: "pci", help: "show PCI info") { e, w, _ in try e.hotPlugHMP(["info"] + w) ?? "" },
    ]

    /// The words of an HMP command line: split at blanks, with QEMU's double-quoted strings
    /// (`savevm "snap 1"`, as libvirt sends names) taken whole, backslash escapes `\\`,
    /// `\"`, `\'`, `\n`, `\r` inside them.
    static func hmpWords(_ line: String) throws -> [String] {
        // Unicode scalars, not Characters: a combining mark after a quote must not hide it.
        var words: [String] = []
        var it = line.unicodeScalars.makeIterator()
        var current: String.UnicodeScalarView? = nil
        while let c = it.next() {
            switch c {
            case " ", "\t", "\n", "\r":
                if let w = current { words.append(String(w)); current = nil }
            case "\"" where current == nil:
                var w = String.UnicodeScalarView()
                var closed = false
                while let q = it.next() {
                    if q == "\"" { closed = true; break }
                    if q == "\\" {
                        guard let e = it.next() else { break }
                        switch e {
                        case "n": w.append("\n")
                        case "r": w.append("\r")
                        case "\\", "\"", "'": w.append(e)
                        default: throw HMPError.message("unsupported escape code: '\\\(e)'")
                        }
                        continue
                    }
                    w.append(q)
                }
                guard closed else { throw HMPError.message("unterminated string literal") }
                words.append(String(w))
            default:
                if current == nil { current = String.UnicodeScalarView() }
                current!.append(c)
            }
        }
        if let w = current { words.append(String(w)) }
        return words
    }

    /// Runs one HMP command line; unknown commands and bad arguments give QEMU's messages as output.
    func runHumanMonitorCommand(_ line: String, cpuIndex: Int?) throws -> String {
        let words: [String]
        do {
            words = try Self.hmpWords(line)
        } catch let e as HMPError {
            return e.text + "\r\n"
        }
        guard let verb = words.first else { return "" }
        guard let command = Self.hmpCommands.first(where: { $0.names.contains(verb) }) else {
            return "unknown command: '\(verb)'\r\n"
        }
        do {
            return try command.run(self, words, cpuIndex)
        } catch let e as HMPError {
            return e.text + "\r\n"
        } catch let e as QMPError {
            // As QEMU's monitor: a failing command prints "Error: ..." and the call succeeds.
            return "Error: \(e.desc)\r\n"
        } catch {
            return "Error: \(error)\r\n"
        }
    }

    /// Problems HMP reports as output text, as QEMU's monitor does.
    enum HMPError: Error {
        case usage(String)
        case message(String)
        var text: String {
            switch self {
            case .usage(let synopsis): return "Usage: \(synopsis)"
            case .message(let m): return m
            }
        }
    }

    /// `gdbserver [tcp:[HOST]:PORT | PORT]`, QEMU's forms; no host means 127.0.0.1.
    func hmpGDBServer(_ w: [String]) throws -> String {
        guard w.count <= 2 else { throw HMPError.usage("gdbserver [device]") }
        let spec = w.count == 2 ? w[1] : "tcp::1234"
        var parts = spec.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        if parts.count == 1 { parts = ["tcp", "", parts[0]] }
        guard parts.count == 3, parts[0] == "tcp", let port = Int(parts[2]), (1...65535).contains(port) else {
            return "gdbserver: '\(spec)' is not tcp:[HOST]:PORT or PORT\r\n"
        }
        let host = parts[1].isEmpty ? "127.0.0.1" : parts[1]
        if let problem = control.startGDBServer(host: host, port: port) { return "gdbserver: \(problem)\r\n" }
        return "Waiting for gdb connection on device '\(spec)'\r\n"
    }

    func hmpHelp(_ w: [String]) -> String {
        if w.count >= 2 {
            if w[1] == "info" { return Self.hmpInfos.map { "info \($0.name)  -- \($0.help)\r\n" }.joined() }
            guard let c = Self.hmpCommands.first(where: { $0.names.contains(w[1]) }) else {
                return "unknown command: '\(w[1])'\r\n"
            }
            return "\(c.names.joined(separator: "|")) \(c.arguments) -- \(c.help)\r\n"
        }
        return Self.hmpCommands.map { "\($0.names.joined(separator: "|")) \($0.arguments) -- \($0.help)\r\n" }.joined()
    }

    func hmpInfo(_ w: [String], cpu: Int?) throws -> String {
        guard w.count >= 2 else { return Self.hmpInfos.map { "info \($0.name)  -- \($0.help)\r\n" }.joined() }
        guard let item = Self.hmpInfos.first(where: { $0.name == w[1] }) else {
            // QEMU's wording; `help info` lists the items.
            return "unknown command: 'info \(w[1])'\r\n"
        }
        return try item.run(self, Array(w.dropFirst()), cpu)
    }

    func hmpSnapshot(_ w: [String]) throws -> String {
        // `snapshotHMP` takes the whole command line ("info snapshots" included).
        let line = w.first == "snapshots" ? ["info", "snapshots"] : w
        guard let out = snapshotHMP(line) else { throw HMPError.usage("\(w[0]) tag") }
        return out
    }

    func hmpSendkey(_ w: [String]) throws -> String {
        guard w.count == 2 || w.count == 3 else { throw HMPError.usage("sendkey keys [hold_ms]") }
        var keys: [KeyValue] = []
        for name in w[1].split(separator: "-", omittingEmptySubsequences: false).map(String.init) {
            if let code = QKeyCode(rawValue: name) {
                keys.append(KeyValue(variant: .qcode(QKeyCodeWrapper(data: code))))
            } else if name.hasPrefix("0x"), let n = Int64(name.dropFirst(2), radix: 16) {
                keys.append(KeyValue(variant: .number(IntWrapper(data: n))))
            } else {
                throw HMPError.message("invalid parameter: \(name)")
            }
        }
        var hold: Int64? = nil
        if w.count == 3 {
            guard let h = Int64(w[2]), h >= 0 else { throw HMPError.message("invalid hold time: \(w[2])") }
            hold = h
        }
        try sendKey(SendKeyArguments(keys: keys, holdTime: hold))
        return ""
    }

    func hmpScreendump(_ w: [String]) throws -> String {
        var args = Array(w.dropFirst())
        var format: ScreenshotFormat? = nil
        if args.first == "-f" {
            guard args.count >= 2, let f = ScreenshotFormat(rawValue: args[1]) else {
                throw HMPError.message("screendump: -f takes ppm or png")
            }
            format = f
            args.removeFirst(2)
        }
        guard args.count == 1 else { throw HMPError.usage("screendump [-f format] filename") }
        try screendump(ScreendumpArguments(filename: args[0], format: format))
        return ""
    }

    /// `x /NFU addr` and `xp /NFU addr`: N units of size U (b, h, w, g) printed as F (x, d, u,
    /// o, c); the default is /1xw. `x` translates through the CPU's satp (Sv39/Sv48) first.
    func hmpMemoryDump(_ w: [String], virtual: Bool, cpu: Int) throws -> String {
        let name = virtual ? "x" : "xp"
        var args = Array(w.dropFirst())
        var count = 1, format: Character = "x", size = 4
        if let f = args.first, f.hasPrefix("/") {
            args.removeFirst()
            var digits = ""
            for ch in f.dropFirst() {
                switch ch {
                case "0"..."9": digits.append(ch)
                case "x", "d", "u", "o", "c": format = ch
                case "b": size = 1
                case "h": size = 2
                case "w": size = 4
                case "g": size = 8
                default: throw HMPError.message("invalid char in format: '\(ch)'")
                }
            }
            if !digits.isEmpty {
                guard let n = Int(digits), n > 0, n <= 4096 else { throw HMPError.message("\(name): count must be 1..4096") }
                count = n
            }
            if format == "c" { size = 1 }
        }
        guard args.count == 1, let address = Self.parseAddress(args[0]) else { throw HMPError.usage("\(name) /fmt addr") }
        let length = count * size
        let bytes: [UInt8]
        do {
            bytes = virtual ? try readVirtual(address, count: length, cpu: cpu)
                            : try controlForMigration.readPhysicalMemory(address, count: length)
        } catch let e as MachineInspectionError {
            // QEMU prints the address, then the failure.
            if case .notRAM = e { throw HMPError.message("\(Self.hex16(address)): Cannot access memory") }
            throw HMPError.message("\(e)")
        }
        let perLine = format == "c" ? 16 : max(1, 16 / size)
        var out = ""
        for i in 0..<count {
            if i % perLine == 0 {
                if i > 0 { out += "\r\n" }
                out += Self.hex16(address &+ UInt64(i * size)) + ":"
            }
            var v: UInt64 = 0
            for b in 0..<size { v |= UInt64(bytes[i * size + b]) << (8 * UInt64(b)) }
            switch format {
            case "x": out += " 0x" + String(repeating: "0", count: max(0, size * 2 - String(v, radix: 16).count)) + String(v, radix: 16)
            case "o": out += " 0" + String(v, radix: 8)
            case "u": out += " \(v)"
            case "d":
                let shift = UInt64(64 - 8 * size)
                out += " \(Int64(bitPattern: v << shift) >> Int64(shift))"
            default:
                out += (v >= 0x20 && v < 0x7f) ? " '\(Character(UnicodeScalar(UInt8(v))))'" : " '\\x\(String(v, radix: 16))'"
            }
        }
        return out + "\r\n"
    }

    /// Reads guest-virtual memory as the CPU sees it in S/U mode: bare or through the Sv39/Sv48
    /// page tables that satp names (M-mode and satp mode 0 read physical addresses).
    func readVirtual(_ address: UInt64, count: Int, cpu: Int) throws -> [UInt8] {
        guard let regs = controlForMigration.cpuRegisters(index: cpu) else { throw HMPError.message("No CPU \(cpu)") }
        let satp = regs.first(where: { $0.name == "satp" })?.value ?? 0
        let priv = regs.first(where: { $0.name == "priv" })?.value ?? 3
        let mode = satp >> 60
        if priv == 3 || mode == 0 { return try controlForMigration.readPhysicalMemory(address, count: count) }
        let levels: Int
        switch mode {
        case 8: levels = 3
        case 9: levels = 4
        default: throw HMPError.message("x: satp mode \(mode) is not Sv39 or Sv48")
        }
        var out: [UInt8] = []
        var va = address
        var remaining = count
        while remaining > 0 {
            var table = (satp & ((1 << 44) - 1)) << 12
            var physical: UInt64? = nil
            for level in stride(from: levels - 1, through: 0, by: -1) {
                let vpn = (va >> (12 + 9 * UInt64(level))) & 0x1ff
                let raw = try controlForMigration.readPhysicalMemory(table + vpn * 8, count: 8)
                let pte = raw.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
                guard pte & 1 != 0 else { break }
                let ppn = (pte >> 10) & ((1 << 44) - 1)
                if pte & 0xa != 0 {  // R or X: a leaf, possibly a superpage
                    let pageBits = 12 + 9 * UInt64(level)
                    physical = ((ppn << 12) & ~((1 << pageBits) - 1)) | (va & ((1 << pageBits) - 1))
                    break
                }
                table = ppn << 12
            }
            guard let pa = physical else {
                throw HMPError.message("Cannot access memory at 0x\(String(va, radix: 16)): no mapping")
            }
            let chunk = min(remaining, Int(4096 - (va & 0xfff)))
            out += try controlForMigration.readPhysicalMemory(pa, count: chunk)
            va &+= UInt64(chunk)
            remaining -= chunk
        }
        return out
    }

    /// QEMU's riscv layout: CSRs one per line, then the integer and FP registers four per line.
    static func formatRegisters(_ regs: [CPURegister]) -> String {
        var out = ""
        var row: [String] = []
        for r in regs {
            let text = " " + r.name.padding(toLength: 8, withPad: " ", startingAt: 0) + " " + hex16(r.value)
            if r.name.hasPrefix("x") && r.name.contains("/") || r.name.hasPrefix("f") && r.name.dropFirst().allSatisfy(\.isNumber) {
                row.append(text)
                if row.count == 4 { out += row.joined() + "\r\n"; row = [] }
            } else {
                out += text + "\r\n"
            }
        }
        if !row.isEmpty { out += row.joined() + "\r\n" }
        return out
    }

    static func hex16(_ v: UInt64) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: max(0, 16 - s.count)) + s
    }

    /// A monitor address: 0x hexadecimal or decimal.
    static func parseAddress(_ text: String) -> UInt64? {
        text.hasPrefix("0x") || text.hasPrefix("0X") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
    }
}
