import Foundation

/// Internal snapshots written the way QEMU writes them (block/qcow2-snapshot.c), so that
/// `qemu-img snapshot` and QEMU's savevm/loadvm interoperate with machine-server's:
///
/// - The VM state of a snapshot lives in the image itself, past the virtual disk: at the first
///   L1-entry boundary at or after the disk's end (`vmStateOffset`, QEMU's
///   `qcow2_vm_state_offset`), mapped through the active L1 table like guest data (the table
///   grows as needed). `createSnapshot` then copies the active L1 table, so the snapshot
///   keeps it, and drops it from the active table.
/// - Creating a snapshot copies the active L1 table to fresh clusters, adds one reference to
///   every L2 table and every cluster they map, clears the COPIED flags that no longer hold,
///   writes the whole snapshot table (with the new entry) to fresh clusters, and only then
///   points the header at it. Writes after that copy shared clusters and shared L2 tables on
///   write (`writeInCluster`/`ensureL2` honour the COPIED flags).
/// - Applying a snapshot takes a reference to everything it maps, writes its L1 table (with
///   corrected COPIED flags) to fresh clusters and switches the header to it in one write; the
///   old active tree is released afterwards.
/// - Deleting a snapshot rewrites the snapshot table without it, then releases its tree.
///
/// Crash consistency: a kill at any moment leaves the disk content and every snapshot in the
/// table exactly as before or after the operation (each commit is one small write inside the
/// header, preceded by a flush). What a kill can leave behind is leaked clusters and, for the
/// clusters whose refcount was being changed at that instant, COPIED flags that disagree with
/// their refcount (QEMU has the same window). Both are harmless — a cluster is written in place
/// only if nothing else references it — and `qemu-img check -r all` repairs them.
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
    /// the snapshot captures whatever writes completed before it.
    /// If it throws and `snapshots` does not contain the snapshot, nothing changed but leaked
    /// clusters; if it contains it, the snapshot was committed and a clean-up step failed.
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
    /// snapshot with the size written; see `createSnapshot(name:id:vmStateSize:...)`.
    @discardableResult
    public func createSnapshot(name: String, id: String? = nil, vmClockNanoseconds: UInt64 = 0,
                               date: Date = Date(), icount: UInt64? = nil,
                               writingVMState body: (Qcow2VMStateWriter) throws -> Void) throws -> Qcow2Snapshot {
        let writer = try vmStateWriter()
        try body(writer)
        let size = try writer.finish()
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

    /// Deletes snapshot `idOrName` (ID first, then name), as QEMU's `qcow2_snapshot_delete`:
    /// the snapshot table is rewritten without it, then the clusters only it used are freed.
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
        let tree = try collectTree(l1)  // validates every table before anything is written
        let oldCount = header.snapshotCount
        // 1. The snapshot's own L1 table: a copy of the active one (COPIED flags mean nothing there).
        let l1Copy = l1.map { $0 & ~Self.copiedBit }
        var copyOffset: UInt64 = 0
        var referenced = false
        do {
            copyOffset = try writeNewTable(l1Copy)
            // 2. One more reference to everything the active table maps; COPIED flags follow.
            try addRefcounts(tree, delta: 1)
            referenced = true
            try refreshActiveCopiedFlags()
            try file.sync()
            // 3. The snapshot table with the new entry, then the header (the commit).
            let entry = Self.snapshotEntry(l1Offset: copyOffset, l1Size: UInt32(l1Copy.count), id: idBytes, name: nameBytes,
                                           dateSeconds: dateSeconds, dateNanoseconds: dateNanoseconds,
                                           vmClock: vmClockNanoseconds, vmStateSize: vmStateSize,
                                           diskSize: header.size, icount: icount)
            let parsed = try Qcow2Snapshot.parseTable(entry, count: 1, header: header,
                                                      fileSize: fileClusters * clusterSize, path: path).snapshots[0]
            try commitSnapshotTable(existing.entries + [entry], snapshots: snapshots + [parsed], oldLength: existing.length)
        } catch {
            if header.snapshotCount == oldCount {
                // Not committed: give back what was taken (best effort; a failure here only leaks).
                if referenced {
                    try? addRefcounts(tree, delta: -1)
                    try? refreshActiveCopiedFlags()
                }
                if copyOffset != 0 { try? freeClusters(at: copyOffset, bytes: UInt64(l1Copy.count) * 8) }
            }
            throw error
        }
        // 4. The VM state is the snapshot's now; keeping it in the active table would only make
        // the next savevm copy it on write (QEMU discards it the same way).
        try dropVMStateFromActiveTable()
        try file.sync()
        return snapshots[snapshots.count - 1]
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
        let newCount = max(l1.count, snL1.count, try l1Entries(covering: sn.diskSize))
        let snTree = try collectTree(snL1)
        let oldTree = try collectTree(l1)
        try addRefcounts(snTree, delta: 1)
        var newOffset: UInt64 = 0
        var committed = false
        do {
            var newL1 = try refreshCopiedFlags(snL1)
            newL1 += [UInt64](repeating: 0, count: newCount - newL1.count)
            newOffset = try writeNewTable(newL1)
            try file.sync()
            // The commit: disk size, L1 size and L1 offset in one write inside the header.
            var h = [UInt8](repeating: 0, count: 24)
            BE.put(sn.diskSize, &h, 0)
            BE.put(header.cryptMethod, &h, 8)
            BE.put(UInt32(newCount), &h, 12)
            BE.put(newOffset, &h, 16)
            try file.write(h, at: 24)
            committed = true
            let oldOffset = header.l1TableOffset, oldEntries = l1.count
            header.size = sn.diskSize
            header.l1Size = UInt32(newCount)
            header.l1TableOffset = newOffset
            l1 = newL1
            try file.sync()
            // Release the old active tree, then set COPIED where a refcount dropped to one.
            try addRefcounts(oldTree, delta: -1)
            try freeClusters(at: oldOffset, bytes: UInt64(oldEntries) * 8)
            try refreshActiveCopiedFlags()
            try file.sync()
        } catch {
            if !committed {
                try? addRefcounts(snTree, delta: -1)
                if newOffset != 0 { try? freeClusters(at: newOffset, bytes: UInt64(newCount) * 8) }
                try? refreshActiveCopiedFlags()
            }
            throw error
        }
        return sn
    }

    private func deleteSnapshotLocked(_ idOrName: String) throws -> Qcow2Snapshot {
        guard let index = snapshotIndex(idOrName) else {
            throw StorageError.invalidArgument("Can't find snapshot '\(idOrName)' in '\(path)'")
        }
        let sn = snapshots[index]
        let snL1 = try readTable(at: sn.l1TableOffset, count: Int(sn.l1Size))
        let tree = try collectTree(snL1)
        var existing = try rawSnapshotEntries()
        guard existing.entries.count == snapshots.count else { throw bad("snapshot table changed under us") }
        existing.entries.remove(at: index)
        var remaining = snapshots
        remaining.remove(at: index)
        try commitSnapshotTable(existing.entries, snapshots: remaining, oldLength: existing.length)
        // The snapshot is gone; from here a failure can only leak clusters.
        try addRefcounts(tree, delta: -1)
        try freeClusters(at: sn.l1TableOffset, bytes: UInt64(sn.l1Size) * 8)
        try refreshActiveCopiedFlags()
        try file.sync()
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

    private static func tableBytes(_ table: [UInt64], paddedTo size: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: size)
        for (i, e) in table.enumerated() where e != 0 { BE.put(e, &bytes, i * 8) }
        return bytes
    }

    /// Writes `table` to freshly allocated clusters and returns their offset (0 for an empty table).
    private func writeNewTable(_ table: [UInt64]) throws -> UInt64 {
        guard !table.isEmpty else { return 0 }
        let clusters = (UInt64(table.count) * 8 + clusterSize - 1) / clusterSize
        let offset = try allocateClusters(clusters)
        try file.write(Self.tableBytes(table, paddedTo: Int(clusters * clusterSize)), at: offset)
        return offset
    }

    /// Drops one reference from each cluster covering `[offset, offset+bytes)`.
    private func freeClusters(at offset: UInt64, bytes: UInt64) throws {
        guard bytes > 0 else { return }
        try addRefcounts(Array((offset / clusterSize)...((offset + bytes - 1) / clusterSize)), delta: -1)
    }

    /// Grows the active L1 table to at least `minEntries` (by half again each step, as QEMU's
    /// `qcow2_grow_l1_table`): new table in fresh clusters, then the header, then the old freed.
    private func growL1(minEntries: Int) throws {
        var n = max(l1.count, 1)
        while n < minEntries { n = (n * 3 + 1) / 2 }
        n = min(n, Int(Qcow2Header.maxL1Bytes / 8))
        guard n >= minEntries else { throw StorageError.invalidArgument("the L1 table of '\(path)' cannot grow further") }
        let table = l1 + [UInt64](repeating: 0, count: n - l1.count)
        let newOffset = try writeNewTable(table)
        try file.sync()
        var h = [UInt8](repeating: 0, count: 12)
        BE.put(UInt32(n), &h, 0)
        BE.put(newOffset, &h, 4)
        try file.write(h, at: 36)
        let oldOffset = header.l1TableOffset, oldEntries = l1.count
        header.l1Size = UInt32(n)
        header.l1TableOffset = newOffset
        l1 = table
        try file.sync()
        try freeClusters(at: oldOffset, bytes: UInt64(oldEntries) * 8)
    }

    /// Every cluster the L1 `table` references, once per reference: its L2 tables and every
    /// cluster they map (data, preallocated zero, each cluster a compressed cluster spans) —
    /// the references `check` counts for one L1 table. Validates every entry on the way.
    private func collectTree(_ table: [UInt64]) throws -> [UInt64] {
        var out: [UInt64] = []
        let end = fileClusters
        for (i, e) in table.enumerated() {
            let l2 = e & Self.offsetMask
            guard l2 != 0 else { continue }
            guard l2 % clusterSize == 0, l2 >= clusterSize, l2 / clusterSize < end else {
                throw bad("L1 entry \(i) points at an invalid L2 table offset 0x\(String(l2, radix: 16))")
            }
            out.append(l2 / clusterSize)
            for (k, entry) in try loadL2(l2).enumerated() where entry != 0 {
                switch try decode(entry, at: "L2 table at 0x\(String(l2, radix: 16)) entry \(k)") {
                case .unallocated: break
                case .zero(let host, _), .data(let host, _):
                    if host != 0 { out.append(host / clusterSize) }
                case .compressed(let host, let length):
                    out += Array((host / clusterSize)...((host + length - 1) / clusterSize))
                }
            }
        }
        return out
    }

    /// Adds `delta` (±1) to the refcount of each cluster in `clusters` (a cluster listed n times
    /// changes by n). Every new value is computed and checked against overflow and underflow
    /// before anything is written; then each refcount block is written once.
    private func addRefcounts(_ clusters: [UInt64], delta: Int) throws {
        precondition(delta == 1 || delta == -1)
        let bits = refcountBits
        let maxRefcount: UInt64 = bits == 64 ? .max : (1 << bits) - 1
        let sorted = clusters.sorted()
        var updates: [(offset: UInt64, block: [UInt8], bytes: Range<Int>)] = []
        var i = 0
        while i < sorted.count {
            let blockIndex = sorted[i] / refsPerBlock
            guard blockIndex < UInt64(refTable.count), refTable[Int(blockIndex)] != 0 else {
                throw bad("cluster \(sorted[i]) has no refcount block")
            }
            let blockOffset = refTable[Int(blockIndex)]
            var block = try loadRefBlock(blockOffset)
            var lo = Int.max, hi = 0
            while i < sorted.count && sorted[i] / refsPerBlock == blockIndex {
                let c = sorted[i]
                var n: UInt64 = 0
                while i < sorted.count && sorted[i] == c { n += 1; i += 1 }
                let k = Int(c % refsPerBlock)
                let old = Self.refcountEntry(block, k, bits: bits)
                let new: UInt64
                if delta > 0 {
                    guard old <= maxRefcount - n else { throw bad("refcount of cluster \(c) would overflow \(bits) bits") }
                    new = old + n
                } else {
                    guard old >= n else { throw bad("refcount of cluster \(c) would drop below zero") }
                    new = old - n
                }
                let r = Self.putRefcountEntry(&block, k, bits: bits, new)
                lo = min(lo, r.lowerBound)
                hi = max(hi, r.upperBound)
            }
            updates.append((blockOffset, block, lo..<hi))
        }
        for u in updates {
            refBlockCache[u.offset] = u.block
            try file.write(Array(u.block[u.bytes]), at: u.offset + UInt64(u.bytes.lowerBound))
        }
    }

    /// Stores refcount `value` at index `i` of a refcount block; returns the bytes changed.
    private static func putRefcountEntry(_ block: inout [UInt8], _ i: Int, bits: UInt64, _ value: UInt64) -> Range<Int> {
        switch bits {
        case 8: block[i] = UInt8(value); return i..<(i + 1)
        case 16: BE.put(UInt16(value), &block, i * 2); return (i * 2)..<(i * 2 + 2)
        case 32: BE.put(UInt32(value), &block, i * 4); return (i * 4)..<(i * 4 + 4)
        case 64: BE.put(value, &block, i * 8); return (i * 8)..<(i * 8 + 8)
        default:
            let perByte = 8 / Int(bits), shift = UInt8(i % perByte) * UInt8(bits)
            let mask = UInt8((1 << bits) - 1) << shift
            let b = i / perByte
            block[b] = (block[b] & ~mask) | (UInt8(value) << shift)
            return b..<(b + 1)
        }
    }

    /// Sets each COPIED flag in the L2 tables `table` references to "refcount is exactly one"
    /// (never for compressed or unallocated entries), writing the L2 tables that change, and
    /// returns `table` with its own COPIED flags set the same way (QEMU's
    /// `qcow2_update_snapshot_refcount` with addend 0).
    private func refreshCopiedFlags(_ table: [UInt64]) throws -> [UInt64] {
        var out = table
        for (i, e) in table.enumerated() {
            let l2 = e & Self.offsetMask
            guard l2 != 0 else { continue }
            var t = try loadL2(l2)
            var lo = Int.max, hi = -1
            for k in t.indices where t[k] != 0 {
                let plain = t[k] & ~Self.copiedBit
                var host: UInt64 = 0
                switch try decode(t[k], at: "L2 table at 0x\(String(l2, radix: 16)) entry \(k)") {
                case .zero(let h, _), .data(let h, _): host = h
                case .unallocated, .compressed: break
                }
                let exclusive = host != 0 ? try refcount(host / clusterSize) == 1 : false
                let new = exclusive ? plain | Self.copiedBit : plain
                if new != t[k] {
                    t[k] = new
                    lo = min(lo, k)
                    hi = max(hi, k)
                }
            }
            if hi >= 0 {
                l2Cache[l2] = t
                try file.write(Self.tableBytes(Array(t[lo...hi]), paddedTo: (hi - lo + 1) * 8), at: l2 + UInt64(lo) * 8)
            }
            out[i] = try refcount(l2 / clusterSize) == 1 ? l2 | Self.copiedBit : l2
        }
        return out
    }

    /// `refreshCopiedFlags` on the active L1 table, written in place (only the entries that change).
    private func refreshActiveCopiedFlags() throws {
        let new = try refreshCopiedFlags(l1)
        guard let lo = new.indices.first(where: { new[$0] != l1[$0] }),
              let hi = new.indices.last(where: { new[$0] != l1[$0] }) else { return }
        try file.write(Self.tableBytes(Array(new[lo...hi]), paddedTo: (hi - lo + 1) * 8),
                       at: header.l1TableOffset + UInt64(lo) * 8)
        l1 = new
    }

    /// Removes the VM-state area (every L1 entry past the disk) from the active L1 table: the
    /// entries are zeroed first, then their trees lose one reference.
    private func dropVMStateFromActiveTable() throws {
        let first = try l1Entries(covering: header.size)
        guard first < l1.count else { return }
        let dropped = l1[first...].filter { $0 & Self.offsetMask != 0 }
        guard !dropped.isEmpty else { return }
        let tree = try collectTree(Array(dropped))
        try file.write([UInt8](repeating: 0, count: (l1.count - first) * 8), at: header.l1TableOffset + UInt64(first) * 8)
        for i in first..<l1.count { l1[i] = 0 }
        try file.sync()
        try addRefcounts(tree, delta: -1)
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

    /// Writes the snapshot table `entries` to fresh clusters, flushes, points the header at it
    /// (count and offset in one write: the commit), flushes, then frees the old table.
    private func commitSnapshotTable(_ entries: [[UInt8]], snapshots newList: [Qcow2Snapshot], oldLength: Int) throws {
        var table: [UInt8] = []
        for e in entries {
            table += [UInt8](repeating: 0, count: (8 - table.count % 8) % 8)
            table += e
        }
        guard table.count <= 64 << 20 else { throw StorageError.invalidArgument("the snapshot table would exceed 64 MiB") }
        let oldOffset = header.snapshotsOffset, oldCount = header.snapshotCount
        var newOffset: UInt64 = 0
        var clusters: UInt64 = 0
        if !table.isEmpty {
            clusters = (UInt64(table.count) + clusterSize - 1) / clusterSize
            newOffset = try allocateClusters(clusters)
        }
        do {
            if !table.isEmpty {
                try file.write(table + [UInt8](repeating: 0, count: Int(clusters * clusterSize) - table.count), at: newOffset)
            }
            try file.sync()
            var h = [UInt8](repeating: 0, count: 12)
            BE.put(UInt32(entries.count), &h, 0)
            BE.put(newOffset, &h, 4)
            try file.write(h, at: 60)
        } catch {
            if clusters > 0 { try? freeClusters(at: newOffset, bytes: clusters * clusterSize) }
            throw error
        }
        header.snapshotCount = UInt32(entries.count)
        header.snapshotsOffset = newOffset
        snapshots = newList
        try file.sync()
        if oldCount > 0 { try freeClusters(at: oldOffset, bytes: UInt64(oldLength)) }
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
