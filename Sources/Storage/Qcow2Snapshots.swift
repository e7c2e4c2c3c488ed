import Foundation

/// Internal snapshots in QEMU's on-disk format (docs/interop/qcow2.txt, block/qcow2-snapshot.c),
/// so that `qemu-img snapshot` and QEMU's savevm/loadvm interoperate with machine-server's:
///
/// - The VM state of a snapshot lives in the image, past the virtual disk: from the first
///   L1-entry boundary at or after the disk's end (`vmStateOffset`, QEMU's
///   `qcow2_vm_state_offset`), mapped through the active L1 table like guest data (the table
///   grows as needed). Creating the snapshot hands it to the snapshot alone.
/// - Snapshot table entries are written as QEMU writes them (40-byte header, 24 bytes of extra
///   data: 64-bit VM state size, disk size, icount; then ID and name); other entries are kept
///   byte for byte. The snapshot's L1 table and reference counting follow QEMU's rules, so
///   `qemu-img check` finds every state clean and QEMU can apply and delete our snapshots.
/// - Where QEMU updates metadata in place (refcounts, COPIED flags, the active L1 table), which
///   leaves leaks and COPIED/refcount mismatches when killed in the middle, every operation here
///   builds the changed metadata in fresh clusters — the new active L1 table and copies of its L2
///   tables, copies of the refcount blocks that change and a new refcount table, the new snapshot
///   table — and commits it with one 48-byte write inside the header (`MetadataUpdate`).
///   A kill at any moment therefore leaves the image exactly as before or exactly as after the
///   operation, with no leak (tests/storage/snapshot-kill.sh kills at every write).
/// - Writes after a snapshot copy shared data clusters on write (`writeInCluster` honours the
///   COPIED flags); the active image gets its own L2 tables at every create and apply.
extension Qcow2Image {
    /// Longest snapshot name QEMU keeps (its `QEMUSnapshotInfo.name` holds 255 bytes).
    public static let maxSnapshotNameBytes = 255
    /// Longest snapshot ID QEMU keeps (`QEMUSnapshotInfo.id_str` holds 127 bytes).
    public static let maxSnapshotIDBytes = 127
    /// Most snapshots one image may hold (QEMU's QCOW_MAX_SNAPSHOTS).
    public static let maxSnapshots = 65536

    // MARK: Public API

    /// Where the VM state starts in the image's address space: the virtual disk size rounded up
    /// to what one L1 entry maps (QEMU's `qcow2_vm_state_offset`). Any thread.
    public var vmStateOffset: UInt64 { lock.withLock { vmStateOffsetLocked } }

    /// Finds a snapshot by ID first, then by name (the first one with that name), as QEMU does.
    /// Any thread; takes the image's lock.
    public func findSnapshot(_ idOrName: String) -> Qcow2Snapshot? {
        lock.withLock { snapshotIndex(idOrName).map { snapshots[$0] } }
    }

    /// Writes VM state bytes at `position` (0 = start of the VM state) into the VM-state area of
    /// the active image, allocating clusters and growing the L1 table as QEMU's
    /// `qcow2_save_vmstate` does. The bytes become part of the next snapshot created with a
    /// `vmStateSize` covering them. Any thread (takes the image's lock); the image must be
    /// writable.
    public func writeVMState(_ data: UnsafeRawBufferPointer, at position: UInt64) throws {
        try checkWritable()
        try lock.withLock {
            guard data.count > 0 else { return }
            let start = try vmStateRange(position, UInt64(data.count))
            let need = try l1Entries(covering: start + UInt64(data.count))
            if need > l1.count { try growL1(minEntries: need) }
            var done = 0
            while done < data.count {
                let pos = start + UInt64(done)
                let vc = pos / clusterSize, inCluster = Int(pos % clusterSize)
                let n = min(data.count - done, Int(clusterSize) - inCluster)
                try writeInCluster(vc, at: inCluster, UnsafeRawBufferPointer(rebasing: data[done..<(done + n)]))
                done += n
            }
        }
    }

    /// Writes `bytes` as VM state at `position`; see `writeVMState(_:at:)`.
    public func writeVMState(_ bytes: [UInt8], at position: UInt64) throws {
        try bytes.withUnsafeBytes { try writeVMState($0, at: position) }
    }

    /// Reads VM state bytes at `position` through the current L1 table: after `applySnapshot`
    /// (or in a view from `openSnapshot`) that is the snapshot's VM state, as QEMU's
    /// `qcow2_load_vmstate` reads it. Bytes never written read as zeros. Any thread.
    public func readVMState(into buffer: UnsafeMutableRawBufferPointer, at position: UInt64) throws {
        try lock.withLock {
            guard buffer.count > 0 else { return }
            let start = try vmStateRange(position, UInt64(buffer.count))
            var done = 0
            while done < buffer.count {
                let pos = start + UInt64(done)
                let vc = pos / clusterSize, inCluster = Int(pos % clusterSize)
                let n = min(buffer.count - done, Int(clusterSize) - inCluster)
                try readCluster(try mapping(virtualCluster: vc), virtualCluster: vc,
                                into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)]),
                                from: inCluster, count: n)
                done += n
            }
        }
    }

    /// Reads the VM state of snapshot `idOrName` (ID or name) at `position` without applying
    /// it. Opens a read-only view per call; for long reads use `vmStateReader(snapshot:)`.
    public func readVMState(snapshot idOrName: String, into buffer: UnsafeMutableRawBufferPointer,
                            at position: UInt64) throws {
        try openSnapshot(idOrName).readVMState(into: buffer, at: position)
    }

    /// Unmaps the VM-state area of the active image (every L1 entry past the disk), for a savevm
    /// that failed after writing VM state, or to drop the state an `applySnapshot` mapped once it
    /// has been read. Snapshots keep theirs. Committed atomically like a snapshot operation.
    public func discardVMState() throws {
        try checkWritable()
        try lock.withLock {
            let first = try l1Entries(covering: header.size)
            guard first < l1.count, l1[first...].contains(where: { $0 & Self.offsetMask != 0 }) else { return }
            var u = MetadataUpdate(image: self)
            try u.releaseTree(Array(l1[first...]))
            u.replaceActiveL1(Array(l1[..<first]) + [UInt64](repeating: 0, count: l1.count - first))
            try u.commit()
        }
    }

    /// A sequential writer of VM state from position 0 that hands the image whole clusters.
    /// Its `finish()` returns the size to pass to `createSnapshot(vmStateSize:)`.
    public func vmStateWriter() throws -> Qcow2VMStateWriter {
        try checkWritable()
        return Qcow2VMStateWriter(image: self)
    }

    /// A sequential reader of the `size` bytes of VM state mapped by the active L1 table (after
    /// `applySnapshot`, pass the applied snapshot's `vmStateSize`).
    public func vmStateReader(size: UInt64) -> Qcow2VMStateReader {
        Qcow2VMStateReader(image: self, size: size)
    }

    /// A sequential reader of the VM state of snapshot `idOrName` (ID or name), through a
    /// read-only view of it; the image itself is not changed.
    public func vmStateReader(snapshot idOrName: String) throws -> Qcow2VMStateReader {
        let view = try openSnapshot(idOrName)
        guard let s = findSnapshot(idOrName) else {
            throw StorageError.invalidArgument("Can't find snapshot '\(idOrName)' in '\(path)'")
        }
        return Qcow2VMStateReader(image: view, size: s.vmStateSize)
    }

    /// Creates an internal snapshot of the active image, as QEMU's `qcow2_snapshot_create`.
    ///
    /// `vmStateSize` is the number of VM-state bytes written beforehand with `writeVMState` or a
    /// `vmStateWriter()` (0 for a disk-only snapshot; savevm gives it to the one disk that holds
    /// the state). `id` nil picks the next free numeric ID, as QEMU does; an ID that exists is
    /// refused. Names need not be unique (qemu-img allows duplicates; lookups take the first).
    /// `icount` nil is stored as -1 ("not recorded", as QEMU's savevm); qemu-img stores 0.
    /// Ends with the snapshot durable (fsync). Takes the image's lock, so it is atomic with
    /// respect to guest I/O, but call it only while the device using the image is quiesced:
    /// the snapshot captures whatever writes completed before it. (QEMU's savevm with a tag that
    /// exists first deletes the old snapshots of that name on every disk; do the same with
    /// `deleteSnapshot` when that is wanted.)
    /// If it throws, nothing changed (unless the final flush failed: then `snapshots` shows the
    /// committed snapshot, whose durability the error puts in doubt).
    @discardableResult
    public func createSnapshot(name: String, id: String? = nil, vmStateSize: UInt64 = 0,
                               vmClockNanoseconds: UInt64 = 0, date: Date = Date(),
                               icount: UInt64? = nil) throws -> Qcow2Snapshot {
        try checkWritable()
        return try lock.withLock {
            try createSnapshotLocked(name: name, id: id, vmStateSize: vmStateSize,
                                     vmClockNanoseconds: vmClockNanoseconds, date: date, icount: icount)
        }
    }

    /// Streams the VM state through `body` (given a writer positioned at 0), then creates the
    /// snapshot with the size written; see `createSnapshot(name:id:vmStateSize:...)`. If `body`
    /// throws, the state written so far is discarded (`discardVMState`) and the error rethrown.
    @discardableResult
    public func createSnapshot(name: String, id: String? = nil, vmClockNanoseconds: UInt64 = 0,
                               date: Date = Date(), icount: UInt64? = nil,
                               writingVMState body: (Qcow2VMStateWriter) throws -> Void) throws -> Qcow2Snapshot {
        let writer = try vmStateWriter()
        let size: UInt64
        do {
            try body(writer)
            size = try writer.finish()
        } catch {
            try? discardVMState()
            throw error
        }
        return try createSnapshot(name: name, id: id, vmStateSize: size, vmClockNanoseconds: vmClockNanoseconds,
                                  date: date, icount: icount)
    }

    /// Reverts the active image to snapshot `idOrName` (ID first, then name), as QEMU's
    /// `qcow2_snapshot_goto`; the snapshot stays in the table. Afterwards the disk reads as it
    /// did when the snapshot was taken, `virtualSize` is the snapshot's disk size, and the
    /// snapshot's VM state can be read with `readVMState(into:at:)` or
    /// `vmStateReader(size: snapshot.vmStateSize)`. Returns the snapshot. Same locking and
    /// quiescing rules as `createSnapshot`; the caller must drop anything it cached from the
    /// disk. If it throws, the active image is either untouched or fully reverted.
    @discardableResult
    public func applySnapshot(_ idOrName: String) throws -> Qcow2Snapshot {
        try checkWritable()
        return try lock.withLock { try applySnapshotLocked(idOrName) }
    }

    /// Deletes snapshot `idOrName` (ID first, then name), as QEMU's `qcow2_snapshot_delete`: in
    /// one commit the snapshot table loses its entry, the clusters only it used are freed and the
    /// active image's COPIED flags are set where it becomes the sole owner.
    /// Returns the deleted snapshot. Same locking rules as `createSnapshot`; views opened on the
    /// snapshot with `openSnapshot` must not be used afterwards.
    @discardableResult
    public func deleteSnapshot(_ idOrName: String) throws -> Qcow2Snapshot {
        try checkWritable()
        return try lock.withLock { try deleteSnapshotLocked(idOrName) }
    }

    // MARK: Operations (callers hold the lock)

    private func createSnapshotLocked(name: String, id: String?, vmStateSize: UInt64, vmClockNanoseconds: UInt64,
                                      date: Date, icount: UInt64?) throws -> Qcow2Snapshot {
        let newID = id ?? nextSnapshotID()
        let nameBytes = Array(name.utf8), idBytes = Array(newID.utf8)
        guard nameBytes.count <= Self.maxSnapshotNameBytes else {
            throw StorageError.invalidArgument("Snapshot name is longer than \(Self.maxSnapshotNameBytes) bytes")
        }
        guard !idBytes.isEmpty, idBytes.count <= Self.maxSnapshotIDBytes else {
            throw StorageError.invalidArgument("Snapshot ID must be 1 to \(Self.maxSnapshotIDBytes) bytes long")
        }
        guard !snapshots.contains(where: { $0.id == newID }) else {
            throw StorageError.invalidArgument("Snapshot ID '\(newID)' already exists in '\(path)'")
        }
        guard snapshots.count < Self.maxSnapshots else {
            throw StorageError.invalidArgument("Image '\(path)' already has \(Self.maxSnapshots) snapshots")
        }
        let seconds = date.timeIntervalSince1970
        guard seconds >= 0, seconds < 4_294_967_296 else {
            throw StorageError.invalidArgument("Snapshot date \(date) cannot be stored (1970 to 2106 only)")
        }
        let dateSeconds = UInt32(seconds.rounded(.down))
        let dateNanoseconds = UInt32(min(999_999_999, ((seconds - seconds.rounded(.down)) * 1e9).rounded(.down)))
        let existing = try rawSnapshotEntries()

        // The active L1 table, as it is on disk, becomes the snapshot's. The new active table
        // maps the disk (not the VM state, which stays the snapshot's alone) through copies of
        // the L2 tables whose entries lose their COPIED flags: every mapped cluster gains the new
        // active table's reference.
        var u = MetadataUpdate(image: self)
        let vmIndex = try l1Entries(covering: header.size)
        var newL1 = [UInt64](repeating: 0, count: l1.count)
        for i in 0..<min(vmIndex, l1.count) {
            guard let l2 = try l2Offset(l1[i], index: i) else { continue }
            let t = try loadL2(l2)
            u.plus += try mappedClusters(t, table: l2)
            newL1[i] = try u.newTable(t.map { $0 & ~Self.copiedBit }) | Self.copiedBit
        }
        u.replaceActiveL1(newL1, keepingOld: true)
        let entry = Self.snapshotEntry(l1Offset: header.l1TableOffset, l1Size: UInt32(l1.count), id: idBytes, name: nameBytes,
                                       dateSeconds: dateSeconds, dateNanoseconds: dateNanoseconds,
                                       vmClock: vmClockNanoseconds, vmStateSize: vmStateSize,
                                       diskSize: header.size, icount: icount)
        let parsed = try Qcow2Snapshot.parseTable(entry, count: 1, header: header,
                                                  fileSize: fileClusters * clusterSize, path: path).snapshots[0]
        u.replaceSnapshotTable(existing.entries + [entry], snapshots: snapshots + [parsed], oldLength: existing.length)
        try u.commit()
        return parsed
    }

    private func applySnapshotLocked(_ idOrName: String) throws -> Qcow2Snapshot {
        guard let index = snapshotIndex(idOrName) else {
            throw StorageError.invalidArgument("Can't find snapshot '\(idOrName)' in '\(path)'")
        }
        let sn = snapshots[index]
        guard sn.diskSize <= Qcow2Header.maxVirtualSize else {
            throw bad("snapshot '\(sn.name)' has a disk size of \(sn.diskSize) bytes")
        }
        let snL1 = try readTable(at: sn.l1TableOffset, count: Int(sn.l1Size))
        var u = MetadataUpdate(image: self)
        // The new active table maps what the snapshot maps (VM state included, for loadvm)
        // through copies of its L2 tables; everything mapped gains that reference.
        var newL1 = [UInt64](repeating: 0, count: max(l1.count, snL1.count, try l1Entries(covering: sn.diskSize)))
        for (j, e) in snL1.enumerated() {
            guard let l2 = try l2Offset(e, index: j) else { continue }
            let t = try loadL2(l2)
            u.plus += try mappedClusters(t, table: l2)
            newL1[j] = try u.newTable(t.map { $0 & ~Self.copiedBit }) | Self.copiedBit
        }
        // The old active tree loses the active table's reference.
        try u.releaseTree(l1)
        u.replaceActiveL1(newL1, size: sn.diskSize)
        try u.commit()
        return sn
    }

    private func deleteSnapshotLocked(_ idOrName: String) throws -> Qcow2Snapshot {
        guard let index = snapshotIndex(idOrName) else {
            throw StorageError.invalidArgument("Can't find snapshot '\(idOrName)' in '\(path)'")
        }
        let sn = snapshots[index]
        var existing = try rawSnapshotEntries()
        guard existing.entries.count == snapshots.count else { throw bad("the snapshot table does not match its header") }
        var u = MetadataUpdate(image: self)
        try u.releaseTree(try readTable(at: sn.l1TableOffset, count: Int(sn.l1Size)), l1Offset: sn.l1TableOffset)
        existing.entries.remove(at: index)
        var remaining = snapshots
        remaining.remove(at: index)
        u.replaceSnapshotTable(existing.entries, snapshots: remaining, oldLength: existing.length)
        // Clusters the active table shares only with this snapshot become exclusively its own:
        // their COPIED flags must be set. L2 tables whose entries change are replaced by copies
        // (a live table is never modified before the commit); the L1 table too if it changes.
        let change = u.netChange()
        func finalRefcount(_ c: UInt64) throws -> Int64 { Int64(try refcount(c)) + change(c) }
        var newL1 = l1
        for (i, e) in l1.enumerated() {
            guard let l2 = try l2Offset(e, index: i) else { continue }
            let t = try loadL2(l2)
            var fixed = t
            let what = "L2 table at 0x\(String(l2, radix: 16))"
            for k in t.indices where t[k] != 0 {
                let host = try exclusiveHost(t[k], what: what)
                let plain = t[k] & ~Self.copiedBit
                fixed[k] = try host.map { try finalRefcount($0 / clusterSize) == 1 } == true ? plain | Self.copiedBit : plain
            }
            if fixed != t {
                u.minus.append(l2 / clusterSize)
                newL1[i] = try u.newTable(fixed) | Self.copiedBit
            } else {
                newL1[i] = try finalRefcount(l2 / clusterSize) == 1 ? l2 | Self.copiedBit : l2
            }
        }
        if newL1 != l1 { u.replaceActiveL1(newL1) }
        try u.commit()
        return sn
    }

    // MARK: Helpers (callers hold the lock)

    /// Bytes of guest address space one L1 entry maps.
    private var l1Span: UInt64 { clusterSize * l2Entries }

    var vmStateOffsetLocked: UInt64 { (header.size + l1Span - 1) / l1Span * l1Span }

    /// Absolute offset of VM-state bytes `[position, position+count)`; throws if they cannot be
    /// mapped by an L1 table of the largest size QEMU accepts.
    private func vmStateRange(_ position: UInt64, _ count: UInt64) throws -> UInt64 {
        let base = vmStateOffsetLocked
        let limit = Qcow2Header.maxL1Bytes / 8 * l1Span
        guard base <= limit, position <= limit - base, count <= limit - base - position else {
            throw StorageError.invalidArgument("VM state range of \(count) bytes at \(position) does not fit in '\(path)'")
        }
        return base + position
    }

    /// Number of L1 entries needed to map `[0, end)`.
    private func l1Entries(covering end: UInt64) throws -> Int {
        let n = (end + l1Span - 1) / l1Span
        guard n * 8 <= Qcow2Header.maxL1Bytes else {
            throw StorageError.invalidArgument("\(end) bytes cannot be mapped by one L1 table")
        }
        return Int(n)
    }

    private func snapshotIndex(_ idOrName: String) -> Int? {
        snapshots.firstIndex { $0.id == idOrName } ?? snapshots.firstIndex { $0.name == idOrName }
    }

    /// QEMU's `find_new_snapshot_id`: one more than the largest numeric ID (strtoul of each).
    private func nextSnapshotID() -> String {
        let largest = snapshots.map { s -> UInt64 in
            UInt64(String(s.id.prefix { $0.isASCII && $0.isNumber })) ?? 0
        }.max() ?? 0
        return String(largest &+ 1)
    }

    private func readTable(at offset: UInt64, count: Int) throws -> [UInt64] {
        let bytes = try file.read(count: count * 8, at: offset)
        return (0..<count).map { BE.u64(bytes, $0 * 8) }
    }

    static func tableBytes(_ table: [UInt64], paddedTo size: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: size)
        for (i, e) in table.enumerated() where e != 0 { BE.put(e, &bytes, i * 8) }
        return bytes
    }

    /// Clusters needed to hold `entries` 8-byte table entries.
    func tableClusters(_ entries: Int) -> UInt64 { (UInt64(entries) * 8 + clusterSize - 1) / clusterSize }

    /// The L2 table offset in L1 entry `e` (nil when unmapped), validated.
    fileprivate func l2Offset(_ e: UInt64, index i: Int) throws -> UInt64? {
        let l2 = e & Self.offsetMask
        guard l2 != 0 else { return nil }
        guard l2 % clusterSize == 0, l2 >= clusterSize, l2 / clusterSize < fileClusters else {
            throw bad("L1 entry \(i) points at an invalid L2 table offset 0x\(String(l2, radix: 16))")
        }
        return l2
    }

    /// The host cluster an L2 entry maps that can carry a COPIED flag (data, preallocated zero).
    private func exclusiveHost(_ entry: UInt64, what: String) throws -> UInt64? {
        switch try decode(entry, at: what) {
        case .zero(let h, _), .data(let h, _): return h != 0 ? h : nil
        case .unallocated, .compressed: return nil
        }
    }

    /// Every host cluster the entries of L2 table `t` reference, once per reference (data,
    /// preallocated zero, each cluster a compressed cluster spans): what `check` counts.
    fileprivate func mappedClusters(_ t: [UInt64], table: UInt64) throws -> [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(t.count)
        let what = "L2 table at 0x\(String(table, radix: 16))"
        for entry in t where entry != 0 {
            switch try decode(entry, at: what) {
            case .unallocated: break
            case .zero(let host, _), .data(let host, _):
                if host != 0 { out.append(host / clusterSize) }
            case .compressed(let host, let length):
                out += Array((host / clusterSize)...((host + length - 1) / clusterSize))
            }
        }
        return out
    }

    /// Grows the active L1 table to at least `minEntries` (by half again each step, as QEMU's
    /// `qcow2_grow_l1_table`), committed like a snapshot operation.
    private func growL1(minEntries: Int) throws {
        var n = max(l1.count, 1)
        while n < minEntries { n = (n * 3 + 1) / 2 }
        n = min(n, Int(Qcow2Header.maxL1Bytes / 8))
        guard n >= minEntries else { throw StorageError.invalidArgument("the L1 table of '\(path)' cannot grow further") }
        var u = MetadataUpdate(image: self)
        u.replaceActiveL1(l1 + [UInt64](repeating: 0, count: n - l1.count))
        try u.commit()
    }

    /// Stores refcount `value` at index `i` of a refcount block.
    static func putRefcountEntry(_ block: inout [UInt8], _ i: Int, bits: UInt64, _ value: UInt64) {
        switch bits {
        case 8: block[i] = UInt8(value)
        case 16: BE.put(UInt16(value), &block, i * 2)
        case 32: BE.put(UInt32(value), &block, i * 4)
        case 64: BE.put(value, &block, i * 8)
        default:
            let perByte = 8 / Int(bits), shift = UInt8(i % perByte) * UInt8(bits)
            let mask = UInt8((1 << bits) - 1) << shift
            let b = i / perByte
            block[b] = (block[b] & ~mask) | (UInt8(value) << shift)
        }
    }

    /// The snapshot table's entries as stored (unpadded, unknown extra data kept byte for byte)
    /// and the table's length in bytes.
    private func rawSnapshotEntries() throws -> (entries: [[UInt8]], length: Int) {
        guard header.snapshotCount > 0 else { return ([], 0) }
        let fileSize = fileClusters * clusterSize
        guard header.snapshotsOffset < fileSize else { throw bad("snapshot table lies outside the file") }
        let bytes = try file.read(count: Int(min(fileSize - header.snapshotsOffset, 64 << 20)), at: header.snapshotsOffset)
        // Validates every entry (bounds, L1 tables inside the file) before we copy any.
        _ = try Qcow2Snapshot.parseTable(bytes, count: Int(header.snapshotCount), header: header, fileSize: fileSize, path: path)
        var entries: [[UInt8]] = []
        var o = 0
        for _ in 0..<Int(header.snapshotCount) {
            o = (o + 7) / 8 * 8
            let total = 40 + Int(BE.u32(bytes, o + 36)) + Int(BE.u16(bytes, o + 12)) + Int(BE.u16(bytes, o + 14))
            entries.append(Array(bytes[o..<(o + total)]))
            o += total
        }
        return (entries, o)
    }

    /// One snapshot table entry as QEMU writes it: the 40-byte header, 24 bytes of extra data
    /// (64-bit VM state size, disk size, icount), the ID and the name.
    static func snapshotEntry(l1Offset: UInt64, l1Size: UInt32, id: [UInt8], name: [UInt8], dateSeconds: UInt32,
                              dateNanoseconds: UInt32, vmClock: UInt64, vmStateSize: UInt64, diskSize: UInt64,
                              icount: UInt64?) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 64)
        BE.put(l1Offset, &b, 0)
        BE.put(l1Size, &b, 8)
        BE.put(UInt16(id.count), &b, 12)
        BE.put(UInt16(name.count), &b, 14)
        BE.put(dateSeconds, &b, 16)
        BE.put(dateNanoseconds, &b, 20)
        BE.put(vmClock, &b, 24)
        // Older readers see a state too large for 32 bits as a disk-only snapshot, not a truncated one.
        BE.put(vmStateSize <= UInt64(UInt32.max) ? UInt32(vmStateSize) : 0, &b, 32)
        BE.put(UInt32(24), &b, 36)
        BE.put(vmStateSize, &b, 40)
        BE.put(diskSize, &b, 48)
        BE.put(icount ?? .max, &b, 56)
        return b + id + name
    }
}

/// A change of qcow2 metadata prepared entirely in fresh clusters past the end of the file and
/// committed by one write of 48 bytes inside the header (disk size, L1 table, refcount table,
/// snapshot table): before that write the image on disk is exactly the old one, after it exactly
/// the new one; a kill in between leaves nothing but unreferenced clusters with refcount 0.
///
/// Refcounts change by delta (`plus`/`minus`: one reference per listed cluster), so metadata this
/// implementation does not know (bitmaps, for instance) keeps its refcounts. Every refcount block
/// that changes is written as a copy, and a new refcount table points at the copies; the old
/// blocks, table and whatever loses its last reference drop to 0 in the new blocks.
/// Used with the image's lock held, by one operation at a time.
struct MetadataUpdate {
    let image: Qcow2Image
    /// Clusters gaining one reference each (listed once per reference).
    var plus: [UInt64] = []
    /// Clusters losing one reference each (listed once per reference).
    var minus: [UInt64] = []
    /// New disk size.
    var size: UInt64
    private var writes: [(offset: UInt64, bytes: [UInt8])] = []
    /// Next free cluster index: fresh clusters are appended past everything allocated.
    private var next: UInt64
    private var l1: [UInt64]?
    private var l1Offset: UInt64
    private var snapshotEntries: [[UInt8]]?
    private var snapshots: [Qcow2Snapshot]?
    private var oldSnapshotTableLength = 0

    init(image: Qcow2Image) {
        self.image = image
        next = image.endCluster
        size = image.header.size
        l1Offset = image.header.l1TableOffset
    }

    /// Allocates `n` fresh clusters (with one reference each); returns the byte offset.
    mutating func allocate(_ n: UInt64) -> UInt64 {
        let first = next
        next += n
        plus += Array(first..<next)
        return first * image.clusterSize
    }

    /// Writes L2 table `t` to a fresh cluster now (nothing references it before the commit);
    /// returns its offset.
    mutating func newTable(_ t: [UInt64]) throws -> UInt64 {
        let offset = allocate(1)
        try image.file.write(Qcow2Image.tableBytes(t, paddedTo: Int(image.clusterSize)), at: offset)
        return offset
    }

    /// One L1 table's references go away: its L2 tables, everything they map and, given its
    /// offset, the L1 table's own clusters.
    mutating func releaseTree(_ table: [UInt64], l1Offset offset: UInt64? = nil) throws {
        for (i, e) in table.enumerated() {
            guard let l2 = try image.l2Offset(e, index: i) else { continue }
            minus.append(l2 / image.clusterSize)
            minus += try image.mappedClusters(try image.loadL2(l2), table: l2)
        }
        if let offset, !table.isEmpty {
            let first = offset / image.clusterSize
            minus += Array(first..<(first + image.tableClusters(table.count)))
        }
    }

    /// The active L1 table becomes `table` (in fresh clusters); `size` changes the disk size.
    /// The old active table's clusters are released unless `keepingOld` (it became a snapshot's).
    mutating func replaceActiveL1(_ table: [UInt64], size newSize: UInt64? = nil, keepingOld: Bool = false) {
        let n = image.tableClusters(table.count)
        l1Offset = n == 0 ? 0 : allocate(n)
        if n > 0 { writes.append((l1Offset, Qcow2Image.tableBytes(table, paddedTo: Int(n * image.clusterSize)))) }
        l1 = table
        if let newSize { size = newSize }
        if !keepingOld && !image.l1.isEmpty {
            let first = image.header.l1TableOffset / image.clusterSize
            minus += Array(first..<(first + image.tableClusters(image.l1.count)))
        }
    }

    /// The snapshot table becomes `entries` (raw, in order); `snapshots` is their parsed form and
    /// `oldLength` the length of the table being replaced.
    mutating func replaceSnapshotTable(_ entries: [[UInt8]], snapshots parsed: [Qcow2Snapshot], oldLength: Int) {
        snapshotEntries = entries
        snapshots = parsed
        oldSnapshotTableLength = oldLength
    }

    /// The net reference change of a cluster so far (a lookup over sorted copies).
    func netChange() -> (UInt64) -> Int64 {
        let ups = plus.sorted(), downs = minus.sorted()
        func count(_ a: [UInt64], _ c: UInt64) -> Int64 {
            var lo = 0, hi = a.count
            while lo < hi { let m = (lo + hi) / 2; if a[m] < c { lo = m + 1 } else { hi = m } }
            var n: Int64 = 0
            while lo < a.count && a[lo] == c { n += 1; lo += 1 }
            return n
        }
        return { c in count(ups, c) - count(downs, c) }
    }

    /// Lays out the snapshot table and the refcount structures, checks every new refcount,
    /// writes all fresh clusters, flushes, commits with the header write, flushes, and updates
    /// the image's in-memory state. Throws before the commit if any refcount would overflow or
    /// drop below zero, leaving the image unchanged.
    mutating func commit() throws {
        let img = image, cs = img.clusterSize, h = img.header
        var snapshotCount = h.snapshotCount, snapshotsOffset = h.snapshotsOffset
        if let entries = snapshotEntries {
            var table: [UInt8] = []
            for e in entries {
                table += [UInt8](repeating: 0, count: (8 - table.count % 8) % 8)
                table += e
            }
            guard table.count <= 64 << 20 else { throw StorageError.invalidArgument("the snapshot table would exceed 64 MiB") }
            if h.snapshotCount > 0 && oldSnapshotTableLength > 0 {
                let first = h.snapshotsOffset / cs, last = (h.snapshotsOffset + UInt64(oldSnapshotTableLength) - 1) / cs
                minus += Array(first...last)
            }
            snapshotsOffset = 0
            if !table.isEmpty {
                let n = (UInt64(table.count) + cs - 1) / cs
                snapshotsOffset = allocate(n)
                writes.append((snapshotsOffset, table + [UInt8](repeating: 0, count: Int(n * cs) - table.count)))
            }
            snapshotCount = UInt32(entries.count)
        }

        // Refcount structures: the new table right after the payload, then a copy of every
        // refcount block that changes. Both count themselves, so iterate to a fixed point.
        let perBlock = img.refsPerBlock, perTableCluster = Int(cs / 8)
        let oldTableFirst = h.refcountTableOffset / cs
        let oldTable = Array(oldTableFirst..<(oldTableFirst + UInt64(h.refcountTableClusters)))
        let tableStart = next
        var tableClusters = UInt64(h.refcountTableClusters), blockCount = 0
        var touched: [UInt64] = [], ownPlus: [UInt64] = [], ownMinus: [UInt64] = []
        var settled = false
        let payloadBlocks = Set(plus.map { $0 / perBlock }).union(minus.map { $0 / perBlock })
        for _ in 0..<64 {
            ownPlus = Array(tableStart..<(tableStart + tableClusters + UInt64(blockCount)))
            ownMinus = oldTable
            var blocks = payloadBlocks.union((ownPlus + ownMinus).map { $0 / perBlock })
            var work = Array(blocks)
            while let bi = work.popLast() {  // a replaced block releases its old copy
                guard bi < UInt64(img.refTable.count), img.refTable[Int(bi)] != 0 else { continue }
                let old = img.refTable[Int(bi)] / cs
                ownMinus.append(old)
                if blocks.insert(old / perBlock).inserted { work.append(old / perBlock) }
            }
            let entries = max(UInt64(img.refTable.count), (blocks.max() ?? 0) + 1)
            let needed = (entries + UInt64(perTableCluster) - 1) / UInt64(perTableCluster)
            if blocks.count == blockCount && needed <= tableClusters {
                touched = blocks.sorted()
                settled = true
                break
            }
            blockCount = blocks.count
            tableClusters = max(tableClusters, needed)
        }
        guard settled else { throw img.bad("the refcount blocks could not be laid out") }
        guard tableClusters * cs <= Qcow2Header.maxRefTableBytes else { throw img.bad("the refcount table would grow too large") }
        let blocksStart = tableStart + tableClusters
        let newEnd = blocksStart + UInt64(blockCount)

        // Every listed cluster lies in a touched block; walk both sorted lists block by block.
        let ups = (plus + ownPlus).sorted(), downs = (minus + ownMinus).sorted()
        var ui = 0, di = 0
        let bits = img.refcountBits
        let maxRefcount: UInt64 = bits == 64 ? .max : (1 << bits) - 1
        var newRefTable = img.refTable
        newRefTable += [UInt64](repeating: 0, count: Int(tableClusters) * perTableCluster - newRefTable.count)
        var blockWrites: [(offset: UInt64, bytes: [UInt8])] = []
        for (k, bi) in touched.enumerated() {
            let oldOffset = bi < UInt64(img.refTable.count) ? img.refTable[Int(bi)] : 0
            var block = oldOffset != 0 ? try img.loadRefBlock(oldOffset) : [UInt8](repeating: 0, count: Int(cs))
            let end = (bi + 1) * perBlock
            while (ui < ups.count && ups[ui] < end) || (di < downs.count && downs[di] < end) {
                let c = min(ui < ups.count ? ups[ui] : .max, di < downs.count ? downs[di] : .max)
                var d: Int64 = 0
                while ui < ups.count && ups[ui] == c { d += 1; ui += 1 }
                while di < downs.count && downs[di] == c { d -= 1; di += 1 }
                guard d != 0 else { continue }
                let i = Int(c % perBlock)
                let old = Qcow2Image.refcountEntry(block, i, bits: bits)
                if d < 0 {
                    guard old >= UInt64(-d) else { throw img.bad("refcount of cluster \(c) would drop below zero") }
                    Qcow2Image.putRefcountEntry(&block, i, bits: bits, old - UInt64(-d))
                } else {
                    guard old <= maxRefcount, UInt64(d) <= maxRefcount - old else {
                        throw img.bad("refcount of cluster \(c) would overflow \(bits) bits")
                    }
                    Qcow2Image.putRefcountEntry(&block, i, bits: bits, old + UInt64(d))
                }
            }
            let offset = (blocksStart + UInt64(k)) * cs
            newRefTable[Int(bi)] = offset
            blockWrites.append((offset, block))
        }
        guard ui == ups.count && di == downs.count else { throw img.bad("refcount changes outside the blocks laid out") }
        let tableWrite = (offset: tableStart * cs, bytes: Qcow2Image.tableBytes(newRefTable, paddedTo: Int(tableClusters * cs)))

        for w in writes + blockWrites + [tableWrite] { try img.file.write(w.bytes, at: w.offset) }
        try img.file.sync()
        let newL1Count = UInt32((l1 ?? img.l1).count)
        var fields = [UInt8](repeating: 0, count: 48)
        BE.put(size, &fields, 0)
        BE.put(h.cryptMethod, &fields, 8)
        BE.put(newL1Count, &fields, 12)
        BE.put(l1Offset, &fields, 16)
        BE.put(tableStart * cs, &fields, 24)
        BE.put(UInt32(tableClusters), &fields, 32)
        BE.put(snapshotCount, &fields, 36)
        BE.put(snapshotsOffset, &fields, 40)
        try img.file.write(fields, at: 24)  // the commit

        img.header.size = size
        img.header.l1Size = newL1Count
        img.header.l1TableOffset = l1Offset
        img.header.refcountTableOffset = tableStart * cs
        img.header.refcountTableClusters = UInt32(tableClusters)
        img.header.snapshotCount = snapshotCount
        img.header.snapshotsOffset = snapshotsOffset
        img.endCluster = newEnd
        img.refTable = newRefTable
        img.refBlockCache.removeAll(keepingCapacity: true)
        for b in blockWrites { img.refBlockCache[b.offset] = b.bytes }
        if let l1 { img.l1 = l1 }
        if let snapshots { img.snapshots = snapshots }
        try img.file.sync()
    }
}

/// Streams VM state into the VM-state area of a writable qcow2 image from position 0, handing
/// the image whole clusters (so fresh clusters are written once, without a read). Made by
/// `Qcow2Image.vmStateWriter()`; `finish()` writes the tail and returns the size for
/// `createSnapshot(vmStateSize:)`. One thread at a time (the savevm thread); the image's own
/// lock still orders its I/O against other users.
public final class Qcow2VMStateWriter {
    /// The image written to.
    public let image: Qcow2Image
    /// Bytes accepted so far (written to the image or still buffered).
    public var size: UInt64 { written + UInt64(pending.count) }
    /// Bytes handed to the image; a multiple of the cluster size until `finish()`.
    private var written: UInt64 = 0
    private var pending: [UInt8] = []
    private let chunk: Int

    init(image: Qcow2Image) {
        self.image = image
        chunk = Int(image.header.clusterSize)
        pending.reserveCapacity(chunk)
    }

    /// Appends `data` to the VM state.
    public func write(_ data: UnsafeRawBufferPointer) throws {
        var rest = data
        if !pending.isEmpty {
            let n = min(chunk - pending.count, rest.count)
            pending += UnsafeRawBufferPointer(rebasing: rest[0..<n])
            rest = UnsafeRawBufferPointer(rebasing: rest[n...])
            guard pending.count == chunk else { return }
            try flushPending()
        }
        let whole = rest.count / chunk * chunk
        if whole > 0 {
            try image.writeVMState(UnsafeRawBufferPointer(rebasing: rest[0..<whole]), at: written)
            written += UInt64(whole)
            rest = UnsafeRawBufferPointer(rebasing: rest[whole...])
        }
        pending += rest
    }

    /// Appends `bytes` to the VM state.
    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }

    /// Writes what is buffered and returns the total size of the VM state.
    public func finish() throws -> UInt64 {
        try flushPending()
        return written
    }

    private func flushPending() throws {
        guard !pending.isEmpty else { return }
        try image.writeVMState(pending, at: written)
        written += UInt64(pending.count)
        pending.removeAll(keepingCapacity: true)
    }
}

/// Reads a VM state sequentially from position 0 up to its size. Made by
/// `Qcow2Image.vmStateReader(size:)` or `vmStateReader(snapshot:)`. One thread at a time.
public final class Qcow2VMStateReader {
    /// The image (or snapshot view) read from.
    public let image: Qcow2Image
    /// Size of the VM state in bytes.
    public let size: UInt64
    /// Bytes read so far.
    public private(set) var position: UInt64 = 0

    init(image: Qcow2Image, size: UInt64) {
        self.image = image
        self.size = size
    }

    /// Fills `buffer` with the next bytes; returns how many (fewer only at the end, 0 at the end).
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = Int(min(UInt64(buffer.count), size - position))
        guard n > 0 else { return 0 }
        try image.readVMState(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: position)
        position += UInt64(n)
        return n
    }

    /// Reads up to `count` next bytes (fewer only at the end).
    public func read(count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withUnsafeMutableBytes { try read(into: $0) }
        out.removeLast(count - n)
        return out
    }
}
