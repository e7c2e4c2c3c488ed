import Foundation
import Testing
@testable import Storage

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
func pseudoRandomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    var out = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27
        var v = x &* 0x2545_F491_4F6C_DD1D
        for _ in 0..<8 where i < count {
            out[i] = UInt8(truncatingIfNeeded: v)
            v >>= 8
            i += 1
        }
    }
    return out
}

/// Expects `check()` to find neither corruption nor leaks.
func expectClean(_ img: Qcow2Image, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let r = try img.check()
    #expect(r.corruptions == 0 && r.leaks == 0, "\(what): \(r.messages.prefix(5))", sourceLocation: sourceLocation)
}

@Suite struct Qcow2SnapshotTests {
    let dir = tempDir()

    /// A disk model: what the active image must read, updated alongside every write.
    struct Model {
        var bytes: [UInt8]
        mutating func write(_ data: [UInt8], at offset: Int) { bytes.replaceSubrange(offset..<(offset + data.count), with: data) }
        mutating func zero(_ offset: Int, _ length: Int) { write([UInt8](repeating: 0, count: length), at: offset) }
    }

    @Test(arguments: [UInt32(2), 3]) func snapshotKeepsItsContentWhileTheActiveDiskChanges(version: UInt32) throws {
        // 4 KiB clusters: one L2 table maps 2 MiB, so the 8 MiB disk has four of them.
        let p = dir + "/s.qcow2", size = 8 << 20
        try Qcow2Image.create(path: p, size: UInt64(size), clusterBits: 12, version: version)
        var model = Model(bytes: [UInt8](repeating: 0, count: size))
        let before: [UInt8]
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            let a = pseudoRandomBytes(3 << 20, seed: 1)
            try img.write(a, at: 100)
            model.write(a, at: 100)
            try img.write([7, 7, 7], at: 6 << 20)
            model.write([7, 7, 7], at: 6 << 20)
            before = model.bytes
            let s = try img.createSnapshot(name: "before")
            #expect(s.id == "1" && s.name == "before" && s.vmStateSize == 0 && s.diskSize == UInt64(size))
            try expectClean(img, "after create")

            // Partial-cluster, whole-cluster, cross-table writes; zeroes; discard; fresh areas.
            let b = pseudoRandomBytes(1 << 20, seed: 2)
            try img.write(b, at: 2_000_001)
            model.write(b, at: 2_000_001)
            try img.write([9], at: 4096 * 3 + 5)
            model.write([9], at: 4096 * 3 + 5)
            try img.writeZeroes(offset: 1 << 20, length: 64 << 10)
            model.zero(1 << 20, 64 << 10)
            try img.write(pseudoRandomBytes(8192, seed: 3), at: 7 << 20)
            model.write(pseudoRandomBytes(8192, seed: 3), at: 7 << 20)
            if version == 3 {  // v2 without backing discards to zeros as well, but only v3 keeps zero flags
                try img.discard(offset: 2 << 20, length: 16 << 10)
                model.zero(2 << 20, 16 << 10)
            }
            #expect(try img.read(count: size, at: 0) == model.bytes)
            #expect(try img.openSnapshot("before").read(count: size, at: 0) == before)
            try expectClean(img, "after writes")
        }
        // The same from a fresh open.
        let img = try Qcow2Image(path: p, readOnly: true)
        #expect(img.snapshots.map(\.name) == ["before"])
        #expect(try img.read(count: size, at: 0) == model.bytes)
        #expect(try img.openSnapshot("1").read(count: size, at: 0) == before)
        try expectClean(img, "reopened")
    }

    @Test func vmStateRoundTripsByteExactly() throws {
        let p = dir + "/vm.qcow2", size = 8 << 20
        try Qcow2Image.create(path: p, size: UInt64(size), clusterBits: 12)
        let state = pseudoRandomBytes(5 << 20, seed: 42)
        let disk = pseudoRandomBytes(1 << 20, seed: 43)
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            try img.write(disk, at: 0)
            let l1Before = img.l1.count
            #expect(img.vmStateOffset == UInt64(size))  // 8 MiB is a multiple of the 2 MiB one L1 entry maps
            let s = try img.createSnapshot(name: "vm", vmClockNanoseconds: 1_234_567_890) { w in
                // Odd chunk sizes exercise the writer's buffering across cluster boundaries.
                var o = 0
                for n in [1, 4095, 4097, 100_000, 3 << 20].cycled(until: state.count) {
                    let m = min(n, state.count - o)
                    try w.write(Array(state[o..<(o + m)]))
                    o += m
                }
                #expect(w.size == UInt64(state.count))
            }
            #expect(s.vmStateSize == UInt64(state.count) && s.vmClockNanoseconds == 1_234_567_890)
            #expect(img.l1.count > l1Before, "the L1 table grows to map the VM state")
            // The state belongs to the snapshot now: nothing past the disk in the active table.
            #expect(img.l1[(size >> 21)...].allSatisfy { $0 == 0 })
            #expect(try img.read(count: disk.count, at: 0) == disk)
            try expectClean(img, "after create")
        }
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            let r = try img.vmStateReader(snapshot: "vm")
            #expect(r.size == UInt64(state.count))
            var got: [UInt8] = []
            while true {
                let part = try r.read(count: 300_001)
                if part.isEmpty { break }
                got += part
            }
            #expect(got == state)
            // loadvm: apply, then read the state back through the active table.
            let s = try img.applySnapshot("vm")
            let reader = img.vmStateReader(size: s.vmStateSize)
            #expect(try reader.read(count: state.count + 10) == state)
            try expectClean(img, "after apply")
        }
        let img = try Qcow2Image(path: p, readOnly: true)
        var buf = [UInt8](repeating: 0, count: 4096)
        try buf.withUnsafeMutableBytes { try img.readVMState(snapshot: "vm", into: $0, at: 1_000_000) }
        #expect(buf == Array(state[1_000_000..<1_004_096]))
    }

    @Test func applyRevertsTheDiskAndLaterWritesCopyOnWrite() throws {
        let p = dir + "/a.qcow2"
        try Qcow2Image.create(path: p, size: 4 << 20, clusterBits: 12)
        let img = try Qcow2Image(path: p, readOnly: false)
        let a = pseudoRandomBytes(1 << 20, seed: 5), b = pseudoRandomBytes(1 << 20, seed: 6)
        try img.write(a, at: 0)
        try img.createSnapshot(name: "a")
        try img.write(b, at: 512 << 10)
        try img.write([1, 2, 3], at: 3 << 20)
        try img.applySnapshot("a")
        #expect(try img.read(count: 1 << 20, at: 0) == a)
        #expect(try img.read(count: 3, at: 3 << 20) == [0, 0, 0])
        try expectClean(img, "after apply")
        // Writing after the revert must not reach the snapshot's clusters.
        try img.write(b, at: 0)
        #expect(try img.read(count: 1 << 20, at: 0) == b)
        #expect(try img.openSnapshot("a").read(count: 1 << 20, at: 0) == a)
        try img.applySnapshot("a")
        #expect(try img.read(count: 1 << 20, at: 0) == a)
        try expectClean(img, "after second apply")
    }

    @Test func applyRestoresTheSnapshotDiskSize() throws {
        let p = dir + "/r.qcow2"
        try Qcow2Image.create(path: p, size: 4 << 20, clusterBits: 12)
        let img = try Qcow2Image(path: p, readOnly: false)
        try img.write([5], at: 0)
        try img.createSnapshot(name: "small")
        try img.resize(to: 8 << 20)
        try img.write([6], at: 7 << 20)
        #expect(img.virtualSize == 8 << 20)
        try img.applySnapshot("small")
        #expect(img.virtualSize == 4 << 20)
        #expect(img.vmStateOffset == 4 << 20)
        #expect(try img.read(count: 1, at: 0) == [5])
        try expectClean(img, "after apply")
        #expect(try Qcow2Image(path: p, readOnly: true, lock: false).virtualSize == 4 << 20)
    }

    @Test func deleteFreesExactlyWhatOnlyTheSnapshotUsed() throws {
        let p = dir + "/d.qcow2"
        try Qcow2Image.create(path: p, size: 4 << 20, clusterBits: 12)
        let img = try Qcow2Image(path: p, readOnly: false)
        let a = pseudoRandomBytes(256 << 10, seed: 7), b = pseudoRandomBytes(256 << 10, seed: 8)
        try img.write(a, at: 0)
        try img.createSnapshot(name: "one", vmStateSize: 4096)  // with (zero) VM state mapped
        try img.write(b, at: 128 << 10)
        try img.createSnapshot(name: "two")
        try img.write(a, at: 1 << 20)
        let twoView = try img.openSnapshot("two").read(count: 2 << 20, at: 0)
        try img.deleteSnapshot("one")
        #expect(img.snapshots.map(\.name) == ["two"])
        #expect(try img.openSnapshot("two").read(count: 2 << 20, at: 0) == twoView)
        try expectClean(img, "after deleting one")
        try img.deleteSnapshot("2")
        #expect(img.snapshots.isEmpty && img.header.snapshotCount == 0)
        try expectClean(img, "after deleting two")
        // With no snapshot left every active cluster is exclusively owned again: COPIED everywhere.
        for e in img.l1 where e != 0 {
            #expect(e & Qcow2Image.copiedBit != 0)
            for entry in try img.loadL2(e & Qcow2Image.offsetMask) where entry & Qcow2Image.offsetMask != 0 {
                #expect(entry & Qcow2Image.copiedBit != 0)
            }
        }
        #expect(try img.read(count: 128 << 10, at: 0) == Array(a[0..<(128 << 10)]))
        #expect(try img.read(count: 256 << 10, at: 128 << 10) == b)
    }

    @Test func idsAndLookupsFollowQemu() throws {
        let p = dir + "/i.qcow2"
        try Qcow2Image.create(path: p, size: 1 << 20)
        let img = try Qcow2Image(path: p, readOnly: false)
        try img.createSnapshot(name: "x")
        try img.createSnapshot(name: "1")  // a name that looks like another snapshot's ID
        try img.createSnapshot(name: "x")  // duplicate names are allowed, as in qemu-img
        #expect(img.snapshots.map(\.id) == ["1", "2", "3"])
        #expect(img.findSnapshot("1")?.name == "x", "IDs are matched before names")
        #expect(img.findSnapshot("x")?.id == "1", "the first of equal names")
        try img.deleteSnapshot("2")
        #expect(try img.createSnapshot(name: "y").id == "4")
        #expect(throws: StorageError.self) { try img.createSnapshot(name: "z", id: "4") }
        #expect(throws: StorageError.self) { try img.applySnapshot("nope") }
        #expect(throws: StorageError.self) { try img.deleteSnapshot("nope") }
        #expect(throws: StorageError.self) { try img.createSnapshot(name: String(repeating: "n", count: 256)) }
        let date = Date(timeIntervalSince1970: 1_700_000_000.25)
        let s = try img.createSnapshot(name: "dated", id: "custom", date: date, icount: 99)
        #expect(s.dateSeconds == 1_700_000_000 && s.dateNanoseconds == 250_000_000 && s.icount == 99 && s.id == "custom")
        #expect(try Qcow2Image(path: p, readOnly: true, lock: false).snapshots == img.snapshots)
        try expectClean(img, "after all")
        let ro = try Qcow2Image(path: p, readOnly: true, lock: false)
        #expect(throws: StorageError.readOnly(path: p)) { try ro.createSnapshot(name: "r") }
        #expect(throws: StorageError.readOnly(path: p)) { try ro.applySnapshot("x") }
        #expect(throws: StorageError.readOnly(path: p)) { try ro.deleteSnapshot("x") }
    }

    @Test func snapshotTableEntriesOfOthersAreKeptByteForByte() throws {
        // An entry with 8 bytes of extra data this implementation does not know (as a future QEMU
        // might write) must survive when the table is rewritten.
        let p = dir + "/e.qcow2"
        try Qcow2Image.create(path: p, size: 1 << 20)
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            try img.createSnapshot(name: "first")
        }
        let table = try Qcow2Image(path: p, readOnly: true, lock: false).header.snapshotsOffset
        let f = try HostFile(path: p, readOnly: false)
        let old = try f.read(count: 64 + 1 + 5, at: table)  // header, 24 bytes extra, "1", "first"
        var entry = Array(old[0..<64]) + [0xAB, 0xCD, 0xEF, 1, 2, 3, 4, 5] + Array(old[64...])
        BE.put(UInt32(32), &entry, 36)
        try f.write(entry, at: table)  // still inside the table's cluster
        let img = try Qcow2Image(path: p, readOnly: false)
        try expectClean(img, "patched")
        try img.createSnapshot(name: "second")
        let t = try f.read(count: entry.count, at: img.header.snapshotsOffset)
        #expect(t == entry)
        #expect(img.snapshots.map(\.name) == ["first", "second"])
        try expectClean(img, "rewritten")
    }
}

extension Array where Element == Int {
    /// The elements repeated in order until their sum reaches `total`.
    func cycled(until total: Int) -> [Int] {
        var out: [Int] = [], sum = 0, i = 0
        while sum < total {
            out.append(self[i % count])
            sum += self[i % count]
            i += 1
        }
        return out
    }
}

/// One long-lived `/bin/sh` that runs the tools a test needs, one command at a time.
///
/// Spawning from the test process is kept to one per test on purpose: a child inherits every
/// open file description of the (multi-threaded) test process until it execs, so an image just
/// closed by a test running in parallel would stay OFD-locked for that moment and its next
/// locked open would fail. The shell spawns the tools from a process that holds no image.
final class ToolShell {
    private let process = Process()
    private let input = Pipe(), output = Pipe()
    private let marker = "@@rc-\(UUID().uuidString)="

    init() throws {
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.standardInput = input
        process.standardOutput = output
        process.standardError = output
        try process.run()
    }

    deinit {
        try? input.fileHandleForWriting.close()
        process.waitUntilExit()
    }

    /// Runs `executable args...` (stdin from `stdin`, or empty); returns its exit status and its
    /// merged stdout and stderr.
    @discardableResult
    func run(_ executable: String, _ args: [String], stdin: String? = nil) throws -> (status: Int32, output: String) {
        func quote(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }
        var source = "/dev/null"
        if let stdin {
            source = FileManager.default.temporaryDirectory.appendingPathComponent("stdin-\(UUID().uuidString)").path
            try Data(stdin.utf8).write(to: URL(fileURLWithPath: source))
        }
        defer { if stdin != nil { try? FileManager.default.removeItem(atPath: source) } }
        let line = ([executable] + args).map(quote).joined(separator: " ") + " <\(quote(source)) 2>&1; rc=$?; echo; echo \"\(marker)$rc\"\n"
        input.fileHandleForWriting.write(Data(line.utf8))
        var text = ""
        while true {
            let data = output.fileHandleForReading.availableData
            guard !data.isEmpty else { throw StorageError.invalidArgument("the tool shell exited") }
            text += String(decoding: data, as: UTF8.self)
            if let m = text.range(of: marker), let end = text[m.upperBound...].firstIndex(of: "\n") {
                let status = Int32(text[m.upperBound..<end]) ?? -1
                var out = String(text[..<m.lowerBound])
                out.removeLast()  // the newline `echo` added before the marker
                return (status, out)
            }
        }
    }
}

/// Internal snapshots exchanged with Debian's qemu-img (and QEMU's savevm/loadvm when
/// qemu-system-riscv64 is installed); skipped only when qemu-img is not installed.
@Suite(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img")))
struct Qcow2SnapshotInteropTests {
    let dir = tempDir()
    let shell: ToolShell
    static let qemuSystem = "/usr/bin/qemu-system-riscv64"

    init() throws { shell = try ToolShell() }

    @discardableResult
    func qemuImg(_ args: String...) throws -> (status: Int32, output: String) { try shell.run("/usr/bin/qemu-img", args) }

    func expectQemuCheckClean(_ path: String, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (rc, out) = try qemuImg("check", path)
        #expect(rc == 0, "qemu-img check \(what): \(out)", sourceLocation: sourceLocation)
    }

    /// The whole disk as qemu-img reads it.
    func qemuRead(_ path: String) throws -> [UInt8] {
        let raw = path + ".raw"
        let (rc, out) = try qemuImg("convert", "-O", "raw", path, raw)
        #expect(rc == 0, "\(out)")
        return try RawImage(path: raw, readOnly: true, lock: false).read(count: Int(try HostFile(path: raw, readOnly: true).size()), at: 0)
    }

    @Test func qemuListsOurSnapshotWithItsVMStateSize() throws {
        let p = dir + "/vm.qcow2"
        try Qcow2Image.create(path: p, size: 64 << 20)
        let state = pseudoRandomBytes(5 << 20, seed: 11)
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            try img.write(pseudoRandomBytes(300_000, seed: 12), at: 1 << 20)
            try img.createSnapshot(name: "vm5", vmClockNanoseconds: 3_723_004_000_000) { try $0.write(state) }
        }
        let (rc, list) = try qemuImg("snapshot", "-l", p)
        #expect(rc == 0)
        let row = list.split(separator: "\n").first { $0.contains("vm5") } ?? ""
        #expect(row.contains("5 MiB") && row.contains("01:02:03.004"), "\(list)")
        let (_, json) = try qemuImg("info", "--output=json", p)
        #expect(json.contains("\"vm-state-size\": \(5 << 20)"), "\(json)")
        try expectQemuCheckClean(p, "after our snapshot with VM state")
        // QEMU can delete it again, leaving no trace.
        let (drc, dout) = try qemuImg("snapshot", "-d", "vm5", p)
        #expect(drc == 0, "\(dout)")
        try expectQemuCheckClean(p, "after qemu-img deleted it")
    }

    @Test func qemuAppliesOurSnapshotAndTheDataMatches() throws {
        let p = dir + "/ours.qcow2", size = 8 << 20
        try Qcow2Image.create(path: p, size: UInt64(size))
        var expected = [UInt8](repeating: 0, count: size)
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            let a = pseudoRandomBytes(2 << 20, seed: 21)
            try img.write(a, at: 1 << 20)
            expected.replaceSubrange((1 << 20)..<(3 << 20), with: a)
            try img.createSnapshot(name: "a")
            try img.write(pseudoRandomBytes(3 << 20, seed: 22), at: 2_000_000)
            try img.writeZeroes(offset: 1 << 20, length: 65536)
            try img.flush()
        }
        try expectQemuCheckClean(p, "after our writes on top of our snapshot")
        let (rc, out) = try qemuImg("snapshot", "-a", "a", p)
        #expect(rc == 0, "\(out)")
        #expect(try qemuRead(p) == expected)
        try expectQemuCheckClean(p, "after qemu-img applied our snapshot")
    }

    @Test func qemuSnapshotIsAppliedAndDeletedByUs() throws {
        let p = dir + "/q.qcow2"
        try qemuImg("create", "-q", "-f", "qcow2", p, "8M")
        try shell.run("/usr/bin/qemu-io", ["-c", "write -P 0x11 0 1M", "-c", "write -P 0x33 5M 64k", p])
        try qemuImg("snapshot", "-c", "qs", p)
        try shell.run("/usr/bin/qemu-io", ["-c", "write -P 0x22 512k 1M", "-c", "write -z 5M 64k", p])
        var expected = [UInt8](repeating: 0, count: 8 << 20)
        expected.replaceSubrange(0..<(1 << 20), with: [UInt8](repeating: 0x11, count: 1 << 20))
        expected.replaceSubrange((5 << 20)..<((5 << 20) + 65536), with: [UInt8](repeating: 0x33, count: 65536))
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            try img.applySnapshot("qs")
            #expect(try img.read(count: 8 << 20, at: 0) == expected)
        }
        try expectQemuCheckClean(p, "after we applied qemu's snapshot")
        #expect(try qemuRead(p) == expected)
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            try img.deleteSnapshot("qs")
            #expect(img.snapshots.isEmpty)
        }
        try expectQemuCheckClean(p, "after we deleted qemu's snapshot")
        #expect(try qemuImg("snapshot", "-l", p).output.isEmpty)
        #expect(try qemuRead(p) == expected)
    }

    @Test func mixedSequencesStayCleanAndEverySnapshotKeepsItsData() throws {
        // Random rounds of writes, snapshots, reverts and deletions, alternating between us and
        // qemu-img; after every step qemu-img check must be clean and every remaining snapshot
        // must read as the disk did when it was taken.
        let p = dir + "/mix.qcow2", size = 4 << 20
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "4M")
        var disk = [UInt8](repeating: 0, count: size)
        var saved: [String: [UInt8]] = [:]
        var rng = pseudoRandomBytes(4096, seed: 99).makeIterator()
        func next(_ n: Int) -> Int { Int(rng.next()!) % n }
        var created = 0, applied = 0, deleted = 0
        for round in 0..<12 {
            do {  // our turn; the image is closed (and unlocked) at the end of the block
                let img = try Qcow2Image(path: p, readOnly: false)
                let data = pseudoRandomBytes(1 + next(200) * 1000, seed: UInt64(round + 1000))
                let at = next(size - data.count)
                try img.write(data, at: UInt64(at))
                disk.replaceSubrange(at..<(at + data.count), with: data)
                let tag = "r\(round)"
                switch next(4) {
                case 0, 1:
                    try img.createSnapshot(name: tag)
                    saved[tag] = disk
                    created += 1
                case 2:
                    if let victim = saved.keys.sorted().first {
                        try img.applySnapshot(victim)
                        disk = saved[victim]!
                        applied += 1
                    }
                default:
                    if let victim = saved.keys.sorted().last {
                        try img.deleteSnapshot(victim)
                        saved[victim] = nil
                        deleted += 1
                    }
                }
                #expect(try img.read(count: size, at: 0) == disk, "round \(round)")
            }
            try expectQemuCheckClean(p, "round \(round) (ours)")
            // qemu-img's turn: a snapshot of its own, which we must keep intact too.
            if round % 3 == 0 {
                try qemuImg("snapshot", "-c", "q\(round)", p)
                saved["q\(round)"] = disk
                try expectQemuCheckClean(p, "round \(round) (qemu-img)")
            }
            let reopened = try Qcow2Image(path: p, readOnly: true)
            for (tag, content) in saved {
                #expect(try reopened.openSnapshot(tag).read(count: size, at: 0) == content, "round \(round) snapshot \(tag)")
            }
        }
        #expect(created > 1 && applied > 1 && deleted > 1, "the seed must exercise every operation")
    }

    @Test func refcountOverflowIsRefusedWithoutChangingTheImage() throws {
        // 1-bit refcounts cannot count a second reference: QEMU refuses such snapshots too.
        let p = dir + "/one.qcow2"
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", p, "1M")
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            try img.write([1, 2, 3], at: 0)
            #expect(throws: StorageError.self) { try img.createSnapshot(name: "no") }
            #expect(img.snapshots.isEmpty)
            #expect(try img.read(count: 3, at: 0) == [1, 2, 3])
            try expectClean(img, "after the refused snapshot")
            try img.write([4], at: 1)  // still writable in place
        }
        try expectQemuCheckClean(p, "after the refused snapshot")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: Qcow2SnapshotInteropTests.qemuSystem)))
    func qemuSavevmStateIsReadAndOursIsLoadedByQemu() throws {
        let p = dir + "/machine.qcow2"
        try qemuImg("create", "-q", "-f", "qcow2", p, "64M")
        func qemu(_ extra: [String], monitor: String) throws -> (status: Int32, output: String) {
            try shell.run(Self.qemuSystem, ["-machine", "virt", "-bios", "none", "-nodefaults", "-display", "none", "-S",
                                          "-m", "64", "-drive", "file=\(p),if=none,id=d0,format=qcow2",
                                          "-monitor", "stdio"] + extra, stdin: monitor)
        }
        let saved = try qemu([], monitor: "savevm s1\nquit\n")
        #expect(saved.status == 0, "\(saved.output)")
        // QEMU's VM state, read where QEMU put it: its stream starts with "QEVM".
        let state: [UInt8]
        do {
            let img = try Qcow2Image(path: p, readOnly: false)
            let s1 = try #require(img.findSnapshot("s1"))
            #expect(s1.vmStateSize > 0 && s1.icount == nil)
            let r = try img.vmStateReader(snapshot: "s1")
            state = try r.read(count: Int(s1.vmStateSize))
            #expect(state.count == Int(s1.vmStateSize) && Array(state.prefix(4)) == Array("QEVM".utf8))
            // Our own snapshot with that state, and a disk-only one.
            try img.createSnapshot(name: "ours", vmClockNanoseconds: s1.vmClockNanoseconds) { try $0.write(state) }
            try img.createSnapshot(name: "diskonly")
            try img.deleteSnapshot("s1")  // QEMU's own entry is no longer needed
        }
        try expectQemuCheckClean(p, "after our snapshots")
        let loaded = try qemu(["-loadvm", "ours"], monitor: "info status\nquit\n")
        #expect(loaded.status == 0 && loaded.output.contains("VM status: paused"), "\(loaded.output)")
        // The control: QEMU does refuse to load a snapshot without VM state.
        let refused = try qemu(["-loadvm", "diskonly"], monitor: "quit\n")
        #expect(refused.status != 0 && refused.output.contains("disk-only"), "\(refused.output)")
        try expectQemuCheckClean(p, "after QEMU loaded our snapshot")
    }
}

extension Qcow2SnapshotTests {
    @Test func savevmLoadvmSavevmKeepsEveryStateAndDiscardFreesTheArea() throws {
        // savevm s1 → loadvm s1 → guest writes → savevm s2 (its state overwrites the area s1's
        // state is mapped in, which must copy on write) → both states and disks read back.
        let p = dir + "/cycle.qcow2", size = 4 << 20
        try Qcow2Image.create(path: p, size: UInt64(size), clusterBits: 12)
        let img = try Qcow2Image(path: p, readOnly: false)
        let state1 = pseudoRandomBytes(700_000, seed: 31), state2 = pseudoRandomBytes(300_001, seed: 32)
        let disk1 = pseudoRandomBytes(size, seed: 33)
        try img.write(disk1, at: 0)
        try img.createSnapshot(name: "s1") { try $0.write(state1) }
        try img.write(pseudoRandomBytes(100_000, seed: 34), at: 0)
        let s1 = try img.applySnapshot("s1")
        #expect(try img.vmStateReader(size: s1.vmStateSize).read(count: state1.count) == state1)
        #expect(try img.read(count: size, at: 0) == disk1)
        var disk2 = disk1
        disk2.replaceSubrange(5000..<5003, with: [1, 2, 3])
        try img.write([1, 2, 3], at: 5000)
        try img.createSnapshot(name: "s2") { try $0.write(state2) }
        try expectClean(img, "after the second savevm")
        #expect(try img.vmStateReader(snapshot: "s1").read(count: state1.count + 1) == state1)
        #expect(try img.vmStateReader(snapshot: "s2").read(count: state2.count + 1) == state2)
        #expect(try img.openSnapshot("s1").read(count: size, at: 0) == disk1)
        #expect(try img.openSnapshot("s2").read(count: size, at: 0) == disk2)

        // A savevm that fails after writing state: discardVMState unmaps it, nothing leaks.
        try img.writeVMState(pseudoRandomBytes(50_000, seed: 35), at: 0)
        let mapped = img.l1[(size >> 21)...].filter { $0 != 0 }.count
        #expect(mapped > 0)
        try img.discardVMState()
        #expect(img.l1[(size >> 21)...].allSatisfy { $0 == 0 })
        #expect(try img.read(count: size, at: 0) == disk2)
        try expectClean(img, "after discardVMState")
        #expect(try img.vmStateReader(snapshot: "s2").read(count: state2.count) == state2)
    }
}

extension Qcow2SnapshotTests {
    struct SerializationFailed: Error {}

    @Test func aSavevmWhoseStateFailsLeavesNoSnapshotAndNoState() throws {
        let p = dir + "/fail.qcow2"
        try Qcow2Image.create(path: p, size: 4 << 20, clusterBits: 12)
        let img = try Qcow2Image(path: p, readOnly: false)
        try img.write([1, 2, 3], at: 0)
        #expect(throws: SerializationFailed.self) {
            try img.createSnapshot(name: "broken") { w in
                try w.write(pseudoRandomBytes(200_000, seed: 41))
                throw SerializationFailed()
            }
        }
        #expect(img.snapshots.isEmpty)
        #expect(img.l1[2...].allSatisfy { $0 == 0 }, "the half-written state is unmapped")
        #expect(try img.read(count: 3, at: 0) == [1, 2, 3])
        try expectClean(img, "after the failed savevm")
    }
}

extension Qcow2SnapshotTests {
    @Test func commitsThatNeedNewRefcountBlocksAndALargerRefcountTable() throws {
        // 512-byte clusters: a refcount block covers 256 clusters, one table cluster 64 blocks
        // (8 MiB of file), an L2 table 32 KiB of disk. Each snapshot copies hundreds of L2
        // tables, so commits add refcount blocks and outgrow the refcount table.
        let p = dir + "/tiny.qcow2", size = 6 << 20
        try Qcow2Image.create(path: p, size: UInt64(size), clusterBits: 9)
        let img = try Qcow2Image(path: p, readOnly: false)
        var model = pseudoRandomBytes(size, seed: 51)
        try img.write(model, at: 0)
        var saved: [[UInt8]] = []
        let tableBefore = img.header.refcountTableClusters
        for round in 0..<3 {
            try img.createSnapshot(name: "t\(round)")
            saved.append(model)
            let patch = pseudoRandomBytes(700_000, seed: UInt64(52 + round))
            try img.write(patch, at: UInt64(round) * 1_000_000)
            model.replaceSubrange((round * 1_000_000)..<(round * 1_000_000 + patch.count), with: patch)
            try expectClean(img, "round \(round)")
        }
        #expect(img.header.refcountTableClusters > tableBefore, "the refcount table grew during the commits")
        try img.applySnapshot("t1")
        #expect(try img.read(count: size, at: 0) == saved[1])
        try img.deleteSnapshot("t0")
        try expectClean(img, "after apply and delete")
        let reopened = try Qcow2Image(path: p, readOnly: true, lock: false)
        for (i, content) in saved.enumerated() where i > 0 {
            #expect(try reopened.openSnapshot("t\(i)").read(count: size, at: 0) == content)
        }
        try expectClean(reopened, "reopened")
    }
}
