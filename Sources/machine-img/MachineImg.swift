import ArgumentParser
import Foundation
import Machine
import Storage

/// Parses a qemu-img style size: a number with an optional k/M/G/T/P/E suffix (powers of 1024).
func parseSize(_ s: String) throws -> UInt64 {
    let units: [Character: UInt64] = ["b": 1, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
                                      "P": 1 << 50, "E": 1 << 60]
    var text = s
    var mult: UInt64 = 1
    if let last = text.last, let m = units[last] { mult = m; text.removeLast() }
    if let n = UInt64(text) {
        let (v, o) = n.multipliedReportingOverflow(by: mult)
        if !o { return v }
    } else if let d = Double(text), d >= 0, d * Double(mult) < 9.2e18 {
        return UInt64(d * Double(mult))
    }
    throw ValidationError("Invalid image size specified. You may use k, M, G, T, P or E suffixes for")
}

/// qemu-img's human size ("1 GiB", "196 KiB").
func humanSize(_ n: UInt64) -> String { SnapshotTable.humanSize(n) }

/// Prints "machine-img: message" to stderr and exits with `code`, as qemu-img does.
func fail(_ message: String, code: Int32 = 1) -> Never {
    FileHandle.standardError.write(Data("machine-img: \(message)\n".utf8))
    exit(code)
}

func attempt<T>(_ body: () throws -> T) -> T {
    do { return try body() } catch { fail("\(error)") }
}

func formatArgument(_ s: String?) -> ImageFormat? {
    guard let s else { return nil }
    guard let f = ImageFormat(rawValue: s) else { fail("Unknown file format '\(s)'") }
    return f
}

@main
struct MachineImg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "machine-img",
        abstract: "Create, inspect, convert, check and resize raw and qcow2 disk images (qemu-img compatible).",
        subcommands: [Create.self, Info.self, Convert.self, Check.self, Resize.self, Snapshot.self])
}

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a new image.")
    @Option(name: .short, help: "Image format (raw or qcow2).") var f: String = "raw"
    @Option(name: .short, help: "Backing file.") var b: String?
    @Option(name: .customShort("F"), help: "Backing file format.") var backingFormat: String?
    @Option(name: .short, help: "Options: compat=0.10|1.1, cluster_size=N.") var o: String?
    @Flag(name: .short, help: "Quiet.") var q = false
    @Argument var filename: String
    @Argument var size: String?

    func run() throws {
        guard let fmt = ImageFormat(rawValue: f) else { fail("Unknown file format '\(f)'") }
        var version: UInt32 = 3, clusterBits: UInt32 = 16
        for opt in (o ?? "").split(separator: ",") {
            let kv = opt.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { fail("Invalid option '\(opt)'") }
            switch kv[0] {
            case "compat": version = kv[1] == "0.10" || kv[1] == "v2" ? 2 : 3
            case "cluster_size":
                let cs = attempt { try parseSize(kv[1]) }
                guard cs.nonzeroBitCount == 1 else { fail("Cluster size must be a power of two between 512 and 2048k") }
                clusterBits = UInt32(cs.trailingZeroBitCount)
            default: fail("Invalid parameter '\(kv[0])'")
            }
        }
        var bytes: UInt64
        if let size { bytes = attempt { try parseSize(size) } } else if b == nil { fail("Expecting image size") } else { bytes = 0 }
        var backingFmt = formatArgument(backingFormat)
        if let b {
            guard fmt == .qcow2 else { fail("Backing file not supported for file format '\(f)'") }
            let dir = (filename as NSString).deletingLastPathComponent
            let resolved = b.hasPrefix("/") || dir.isEmpty ? b : dir + "/" + b
            let img = attempt { try openImage(path: resolved, format: backingFmt, readOnly: true, lock: false) }
            if backingFmt == nil { backingFmt = img.format }
            if size == nil { bytes = img.virtualSize }
        }
        if !q {
            var line = "Formatting '\(filename)', fmt=\(fmt.rawValue)"
            if fmt == .qcow2 { line += " cluster_size=\(1 << clusterBits)" }
            if let b { line += " backing_file=\(b)" }
            if let backingFmt, b != nil { line += " backing_fmt=\(backingFmt.rawValue)" }
            print(line + " size=\(bytes)")
        }
        attempt {
            switch fmt {
            case .raw: try RawImage.create(path: filename, size: bytes)
            case .qcow2: try Qcow2Image.create(path: filename, size: bytes, clusterBits: clusterBits, version: version,
                                                backingFile: b, backingFormat: backingFmt)
            }
        }
    }
}

/// A JSON value printed in qemu-img's layout (4-space indent, keys in insertion order).
indirect enum JSON {
    case int(UInt64), string(String), bool(Bool), object([(String, JSON)]), array([JSON])

    func render(_ indent: Int = 0) -> String {
        let pad = String(repeating: " ", count: indent + 4), end = String(repeating: " ", count: indent)
        switch self {
        case .int(let n): return String(n)
        case .bool(let b): return b ? "true" : "false"
        case .string(let s):
            var out = "\""
            for u in s.unicodeScalars {
                switch u {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                default: out += u.value < 0x20 ? String(format: "\\u%04x", u.value) : String(u)
                }
            }
            return out + "\""
        case .object(let kv):
            if kv.isEmpty { return "{}" }
            return "{\n" + kv.map { "\(pad)\(JSON.string($0.0).render()): \($0.1.render(indent + 4))" }.joined(separator: ",\n") + "\n\(end)}"
        case .array(let a):
            if a.isEmpty { return "[]" }
            return "[\n" + a.map { pad + $0.render(indent + 4) }.joined(separator: ",\n") + "\n\(end)]"
        }
    }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show information about an image.")
    @Option(name: .short, help: "Image format.") var f: String?
    @Option(name: .long, help: "Output format: human or json.") var output: String = "human"
    @Flag(name: .customShort("U"), help: "Open the image without taking locks (force share).") var forceShare = false
    @Argument var filename: String

    func run() throws {
        let img = attempt { try openImage(path: filename, format: formatArgument(f), readOnly: true, lock: !forceShare) }
        let actual = (try? HostFile(path: filename, readOnly: true).allocatedSize()) ?? 0
        var fields: [(String, JSON)] = []
        var human: [String] = ["image: \(filename)", "file format: \(img.format.rawValue)",
                               "virtual size: \(humanSize(img.virtualSize)) (\(img.virtualSize) bytes)",
                               "disk size: \(humanSize(actual))"]
        if let q = img as? Qcow2Image {
            let h = q.header
            fields.append(("snapshots-placeholder", .bool(false)))
            if !q.snapshots.isEmpty {
                fields.append(("snapshots", .array(q.snapshots.map { s in
                    .object([("icount", .int(s.icount ?? 0)), ("vm-state-size", .int(s.vmStateSize)),
                             ("date-sec", .int(UInt64(s.dateSeconds))), ("date-nsec", .int(UInt64(s.dateNanoseconds))),
                             ("vm-clock-sec", .int(s.vmClockNanoseconds / 1_000_000_000)),
                             ("vm-clock-nsec", .int(s.vmClockNanoseconds % 1_000_000_000)),
                             ("id", .string(s.id)), ("name", .string(s.name))])
                })))
            }
            fields.removeAll { $0.0 == "snapshots-placeholder" }
            fields.append(("virtual-size", .int(img.virtualSize)))
            fields.append(("filename", .string(filename)))
            fields.append(("cluster-size", .int(h.clusterSize)))
            fields.append(("format", .string("qcow2")))
            fields.append(("actual-size", .int(actual)))
            var data: [(String, JSON)] = [("compat", .string(h.version == 2 ? "0.10" : "1.1"))]
            if h.version >= 3 {
                data += [("compression-type", .string("zlib")),
                         ("lazy-refcounts", .bool(h.compatibleFeatures & Qcow2Header.lazyRefcountsBit != 0)),
                         ("refcount-bits", .int(1 << UInt64(h.refcountOrder))),
                         ("corrupt", .bool(h.incompatibleFeatures & Qcow2Header.corruptBit != 0)),
                         ("extended-l2", .bool(false))]
            } else {
                data += [("compression-type", .string("zlib")), ("refcount-bits", .int(16))]
            }
            fields.append(("format-specific", .object([("type", .string("qcow2")), ("data", .object(data))])))
            human.append("cluster_size: \(h.clusterSize)")
            if let b = h.backingFile {
                fields.append(("full-backing-filename", .string(q.backingPath ?? b)))
                fields.append(("backing-filename", .string(b)))
                human.append("backing file: \(b)" + (q.backingPath != b ? " (actual path: \(q.backingPath ?? b))" : ""))
                if let bf = h.backingFormat {
                    fields.append(("backing-filename-format", .string(bf)))
                    human.append("backing file format: \(bf)")
                }
            }
            fields.append(("dirty-flag", .bool(h.incompatibleFeatures & Qcow2Header.dirtyBit != 0)))
            if !q.snapshots.isEmpty {
                human.append("Snapshot list:")
                human += snapshotTable(q.snapshots)
            }
            human.append("Format specific information:")
            for (k, v) in data {
                human.append("    \(k.replacingOccurrences(of: "-", with: " ")): \(v.render())".replacingOccurrences(of: "\"", with: ""))
            }
        } else {
            fields = [("virtual-size", .int(img.virtualSize)), ("filename", .string(filename)), ("format", .string("raw")),
                      ("actual-size", .int(actual)), ("dirty-flag", .bool(false))]
        }
        switch output {
        case "json": print(JSON.object(fields).render())
        case "human": print(human.joined(separator: "\n"))
        default: fail("--output must be used with human or json as argument.")
        }
    }
}

/// The snapshot list as qemu-img prints it (QEMU's bdrv_snapshot_dump: "%-10s%-17s%8s%20s%13s%11s"
/// for the header, "%-9s %-16s %8s%20s%13s%11s" for each row, dates in local time).
func snapshotTable(_ snaps: [Qcow2Snapshot]) -> [String] {
    SnapshotTable.lines(snaps.map {
        SnapshotListing(id: $0.id, name: $0.name, vmStateSize: $0.vmStateSize, dateSeconds: $0.dateSeconds,
                        dateNanoseconds: $0.dateNanoseconds, vmClockNanoseconds: $0.vmClockNanoseconds, icount: $0.icount)
    })
}

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Convert an image to another format.")
    @Option(name: .short, help: "Input format.") var f: String?
    @Option(name: .customShort("O"), help: "Output format (default raw).") var outputFormat: String = "raw"
    @Flag(name: .short, help: "Compress the output (qcow2 only).") var c = false
    @Flag(name: .short, help: "Show progress on stderr.") var p = false
    @Option(name: .short, help: "Options: compat=0.10|1.1, cluster_size=N.") var o: String?
    @Argument var input: String
    @Argument var output: String

    func run() throws {
        guard let outFmt = ImageFormat(rawValue: outputFormat) else { fail("Unknown file format '\(outputFormat)'") }
        if c && outFmt != .qcow2 { fail("Compression not supported for this file format") }
        let src = attempt { try openImage(path: input, format: formatArgument(f), readOnly: true) }
        let size = src.virtualSize
        var clusterBits: UInt32 = 16, version: UInt32 = 3
        for opt in (o ?? "").split(separator: ",") {
            let kv = opt.split(separator: "=", maxSplits: 1).map(String.init)
            if kv.count == 2 && kv[0] == "compat" { version = kv[1] == "0.10" ? 2 : 3 }
            if kv.count == 2 && kv[0] == "cluster_size" { clusterBits = UInt32(attempt { try parseSize(kv[1]) }.trailingZeroBitCount) }
        }
        attempt {
            switch outFmt {
            case .raw: try RawImage.create(path: output, size: size)
            case .qcow2: try Qcow2Image.create(path: output, size: size, clusterBits: clusterBits, version: version)
            }
        }
        let dst = attempt { try openImage(path: output, format: outFmt, readOnly: false) }
        let chunk = UInt64(1) << UInt64(clusterBits)
        var buf = [UInt8](repeating: 0, count: Int(chunk))
        var pos: UInt64 = 0
        var lastShown = -1
        if p { FileHandle.standardError.write(Data("    (0.00/100%)\r".utf8)) }
        while pos < size {
            let n = Int(min(chunk, size - pos))
            attempt {
                try buf.withUnsafeMutableBytes { try src.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
                let isZero = buf[0..<n].allSatisfy { $0 == 0 }
                if !isZero {
                    if c, let q = dst as? Qcow2Image {
                        try q.writeCompressed(virtualCluster: pos / chunk, data: Array(buf[0..<n]))
                    } else {
                        try buf.withUnsafeBytes { try dst.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
                    }
                }
            }
            pos += UInt64(n)
            if p {
                let pct = Int(Double(pos) / Double(size) * 100) * 100
                if pct != lastShown {
                    lastShown = pct
                    FileHandle.standardError.write(Data(String(format: "    (%.2f/100%%)\r", Double(pct) / 100).utf8))
                }
            }
        }
        attempt { try dst.flush() }
        if p { FileHandle.standardError.write(Data("    (100.00/100%)\n".utf8)) }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check an image for consistency (exit 0 clean, 2 corrupt, 3 leaks).")
    @Option(name: .short, help: "Image format.") var f: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument var filename: String

    func run() throws {
        let img: any BlockImage
        do { img = try openImage(path: filename, format: formatArgument(f), readOnly: true) } catch { fail("\(error)") }
        guard let q = img as? Qcow2Image else {
            fail("This image format does not support checks", code: 63)
        }
        let r: Qcow2CheckResult
        do { r = try q.check() } catch {
            FileHandle.standardError.write(Data("machine-img: Check failed: \(error)\n".utf8))
            throw ExitCode(1)
        }
        if !quiet {
            var out = r.messages.map { $0 + "\n" }.joined()
            if r.corruptions == 0 && r.leaks == 0 {
                out += "No errors were found on the image.\n"
            } else {
                if r.corruptions > 0 {
                    out += "\n\(r.corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
                }
                if r.leaks > 0 {
                    out += "\n\(r.leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
                }
            }
            if r.totalClusters > 0 {
                let t = Double(r.totalClusters), a = Double(r.allocatedClusters)
                out += String(format: "%llu/%llu = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n",
                              r.allocatedClusters, r.totalClusters, a * 100 / t,
                              a > 0 ? Double(r.fragmentedClusters) * 100 / a : 0,
                              a > 0 ? Double(r.compressedClusters) * 100 / a : 0)
            }
            out += "Image end offset: \(r.imageEndOffset)\n"
            print(out, terminator: "")
        }
        if r.exitCode != 0 { throw ExitCode(r.exitCode) }
    }
}

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Grow an image to SIZE (or by +SIZE).")
    @Option(name: .short, help: "Image format.") var f: String?
    @Flag(name: .long, help: "Allow shrinking (raw only).") var shrink = false
    @Argument var filename: String
    @Argument var size: String

    func run() throws {
        let img = attempt { try openImage(path: filename, format: formatArgument(f), readOnly: false) }
        var newSize: UInt64
        if size.hasPrefix("+") {
            newSize = img.virtualSize + attempt { try parseSize(String(size.dropFirst())) }
        } else if size.hasPrefix("-") {
            let d = attempt { try parseSize(String(size.dropFirst())) }
            guard d <= img.virtualSize else { fail("New image size must be positive") }
            newSize = img.virtualSize - d
        } else {
            newSize = attempt { try parseSize(size) }
        }
        attempt {
            if let q = img as? Qcow2Image {
                if newSize < q.virtualSize && !shrink { throw StorageError.invalidArgument("Use the --shrink option to perform a shrink operation.") }
                try q.resize(to: newSize)
            } else if let r = img as? RawImage {
                try r.resize(to: newSize, allowShrink: shrink)
            }
            try img.flush()
        }
        print("Image resized.")
    }
}

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List (-l, the default), create (-c TAG), apply (-a TAG) or delete (-d TAG) internal snapshots.")
    @Flag(name: .short, help: "List snapshots.") var l = false
    @Option(name: .short, help: ArgumentHelp("Create a snapshot named TAG.", valueName: "TAG")) var c: String?
    @Option(name: .short, help: ArgumentHelp("Apply (revert the disk to) snapshot TAG (ID or name).", valueName: "TAG"))
    var a: String?
    @Option(name: .short, help: ArgumentHelp("Delete snapshot TAG (ID or name).", valueName: "TAG")) var d: String?
    @Option(name: .short, help: "Image format.") var f: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Flag(name: .customShort("U"), help: "Open the image without taking locks (force share; -l only).") var forceShare = false
    @Argument var filename: String

    func run() throws {
        guard [l, c != nil, a != nil, d != nil].filter({ $0 }).count <= 1 else {
            fail("Cannot mix '-l', '-a', '-c', '-d'\nTry 'machine-img --help' for more information")
        }
        guard c != nil || a != nil || d != nil else { return try list() }
        let img = attempt { try openImage(path: filename, format: formatArgument(f), readOnly: false) }
        let q = img as? Qcow2Image
        if let tag = c {
            guard let q else { fail("Could not create snapshot '\(tag)': -95 (Operation not supported)") }
            // qemu-img records icount 0 (QEMU's savevm records -1, "none").
            do { try q.createSnapshot(name: tag, icount: 0) } catch { fail("Could not create snapshot '\(tag)': \(error)") }
        } else if let tag = a {
            guard let q else { fail("Could not apply snapshot '\(tag)': Block driver does not support snapshots") }
            guard q.findSnapshot(tag) != nil else {
                fail("Could not apply snapshot '\(tag)': Failed to load snapshot: No such file or directory")
            }
            do { try q.applySnapshot(tag) } catch { fail("Could not apply snapshot '\(tag)': \(error)") }
        } else if let tag = d {
            guard let q, q.findSnapshot(tag) != nil else { fail("Could not delete snapshot '\(tag)': snapshot not found") }
            do { try q.deleteSnapshot(tag) } catch { fail("Could not delete snapshot '\(tag)': \(error)") }
        }
    }

    private func list() throws {
        let img = attempt { try openImage(path: filename, format: formatArgument(f), readOnly: true, lock: !forceShare) }
        guard let q = img as? Qcow2Image else { return }
        if q.snapshots.isEmpty { return }
        print("Snapshot list:")
        print(snapshotTable(q.snapshots).joined(separator: "\n"))
    }
}
