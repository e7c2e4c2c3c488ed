import Foundation

/// A qcow2 image (versions 2 and 3): L1/L2 mapping, refcounts, copy-on-write, backing files,
/// compressed and zero clusters, internal snapshots (listed, readable, created, applied and
/// deleted: `Qcow2Snapshots.swift`).
///
/// Crash consistency (against the process being killed at any point): a newly allocated
/// cluster's refcount is written before anything points at it, and data is written before the
/// L2 entry that maps it; refcounts of released clusters drop only after the pointer to them
/// is gone. The worst outcome of a kill is therefore leaked clusters, never corruption.
/// Metadata is written through (no dirty caches), so `flush()` is an fsync. Thread-safe: every
/// public operation takes the image's lock.
public final class Qcow2Image: BlockImage, @unchecked Sendable {  // unchecked: every mutable table and cache is touched only under `lock`
    /// The open image file.
    public let file: HostFile
    /// The header as currently on disk.
    public internal(set) var header: Qcow2Header
    /// The opened backing image, if the header names one.
    public let backing: (any BlockImage)?
    /// Path of the backing file as resolved (relative names resolved against this image's directory).
    public let backingPath: String?
    /// Internal snapshots from the snapshot table. Changed only by `createSnapshot` and
    /// `deleteSnapshot`; read it while no snapshot operation runs on another thread.
    public internal(set) var snapshots: [Qcow2Snapshot]
    public var path: String { file.path }
    public var format: ImageFormat { .qcow2 }
    public let isReadOnly: Bool
    public var virtualSize: UInt64 { lock.withLock { header.size } }

    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let copiedBit: UInt64 = 1 << 63
    static let compressedBit: UInt64 = 1 << 62
    static let zeroBit: UInt64 = 1
    /// Bits of an L1 entry that must be zero (QEMU's L1E_RESERVED_MASK): 0-8 and 56-62.
    static let l1ReservedMask: UInt64 = 0x7f00_0000_0000_01ff
    /// Bits of a standard (uncompressed) L2 entry that must be zero (L2E_STD_RESERVED_MASK).
    static let l2ReservedMask: UInt64 = 0x3f00_0000_0000_01fe
    /// Deepest backing chain accepted.
    public static let maxBackingDepth = 32

    let lock = NSLock()
    let clusterSize: UInt64
    let clusterBits: UInt64
    let l2Entries: UInt64
    var l1: [UInt64]
    var refTable: [UInt64]
    var l2Cache: [UInt64: [UInt64]] = [:]
    var refBlockCache: [UInt64: [UInt8]] = [:]
    /// Index of the first cluster past everything allocated (new clusters are appended here).
    var endCluster: UInt64
    /// Byte offset where the next compressed cluster may be packed (in the last allocated cluster).
    private var compressedTail: UInt64?
    private var suppressRefTableWrites = false
    private var lastDecompressed: (host: UInt64, data: [UInt8])?
    /// Set for read-only views of an internal snapshot.
    private let snapshotView: Bool

    /// Opens an existing qcow2 image (and its backing chain, read-only).
    public convenience init(path: String, readOnly: Bool, lock: Bool = true) throws {
        try self.init(path: path, readOnly: readOnly, lock: lock, chain: [])
    }

    init(path: String, readOnly: Bool, lock takeLock: Bool, chain: [String], snapshot: Qcow2Snapshot? = nil) throws {
        let file = try HostFile(path: path, readOnly: readOnly)
        if takeLock { try file.lockLikeQEMU(write: !readOnly) }
        self.file = file
        self.isReadOnly = readOnly
        self.snapshotView = snapshot != nil
        let fileSize = try file.size()
        let first = try file.read(count: Int(min(max(fileSize, 104), 2 << 20)), at: 0)
        var header = try Qcow2Header.parse(first, fileSize: fileSize, path: path)
        func bad(_ r: String) -> StorageError { .invalidImage(path: path, reason: r) }

        let known = Qcow2Header.dirtyBit | Qcow2Header.corruptBit | Qcow2Header.compressionTypeBit
        if header.incompatibleFeatures & ~known != 0 {
            let f = header.incompatibleFeatures & ~known
            let name = f & Qcow2Header.externalDataBit != 0 ? "external data file"
                : f & Qcow2Header.extendedL2Bit != 0 ? "extended L2 entries" : "incompatible features 0x\(String(f, radix: 16))"
            throw StorageError.unsupported(path: path, feature: name)
        }
        if header.compressionType != 0 {
            throw StorageError.unsupported(path: path, feature: "compression type \(header.compressionType) (only zlib)")
        }
        if !readOnly && header.incompatibleFeatures & Qcow2Header.corruptBit != 0 {
            throw bad("the image is marked corrupt; it can only be opened read-only")
        }
        if !readOnly && header.incompatibleFeatures & Qcow2Header.dirtyBit != 0 {
            throw StorageError.unsupported(path: path, feature: "dirty image with lazy refcounts (repair with qemu-img check -r all)")
        }

        clusterSize = header.clusterSize
        clusterBits = UInt64(header.clusterBits)
        l2Entries = clusterSize / 8
        let cs = clusterSize

        // Snapshot table.
        if header.snapshotCount > 0 {
            let len = Int(min(fileSize - header.snapshotsOffset, 64 << 20))
            let bytes = try file.read(count: len, at: header.snapshotsOffset)
            snapshots = try Qcow2Snapshot.parseTable(bytes, count: Int(header.snapshotCount), header: header,
                                                     fileSize: fileSize, path: path).snapshots
        } else {
            snapshots = []
        }

        // L1 table (the active one, or a snapshot's for a snapshot view).
        let l1Offset = snapshot?.l1TableOffset ?? header.l1TableOffset
        let l1Count = Int(snapshot?.l1Size ?? header.l1Size)
        let l1Bytes = try file.read(count: l1Count * 8, at: l1Offset)
        l1 = (0..<l1Count).map { BE.u64(l1Bytes, $0 * 8) }
        for (i, e) in l1.enumerated() {
            let off = e & Self.offsetMask
            guard off != 0 else { continue }
            // Reserved bits are not fatal here (QEMU reads such images too); `check` reports them.
            guard off % cs == 0 else { throw bad("L1 entry \(i) has an unaligned L2 offset 0x\(String(off, radix: 16))") }
            guard off < fileSize, cs <= fileSize - off || off + cs <= (fileSize + cs - 1) / cs * cs else {
                throw bad("L1 entry \(i) points outside the image file (0x\(String(off, radix: 16)))")
            }
            guard off >= cs else { throw bad("L1 entry \(i) points at the header") }
        }
        if let snapshot { header.size = snapshot.diskSize }
        guard UInt64(l1.count) * cs * l2Entries >= header.size else { throw bad("L1 table is too small for the disk") }

        // Refcount table.
        let rtCount = Int(UInt64(header.refcountTableClusters) * cs / 8)
        let rtBytes = try file.read(count: rtCount * 8, at: header.refcountTableOffset)
        refTable = (0..<rtCount).map { BE.u64(rtBytes, $0 * 8) }
        for (i, e) in refTable.enumerated() where e != 0 {
            guard e & (cs - 1) == 0, e & ~Self.offsetMask == 0 else {
                throw bad("refcount table entry \(i) is unaligned (0x\(String(e, radix: 16)))")
            }
            guard e < fileSize else { throw bad("refcount table entry \(i) points outside the image file") }
            guard e >= cs else { throw bad("refcount table entry \(i) points at the header") }
        }

        endCluster = (fileSize + cs - 1) / cs
        self.header = header

        // Backing chain.
        if let name = header.backingFile {
            let dir = (path as NSString).deletingLastPathComponent
            let resolved = name.hasPrefix("/") || dir.isEmpty ? name : dir + "/" + name
            let real = URL(fileURLWithPath: resolved).resolvingSymlinksInPath().path
            let me = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
            guard !(chain + [me]).contains(real) else {
                throw StorageError.backingChain(path: path, reason: "'\(name)' loops back into the chain")
            }
            guard chain.count < Self.maxBackingDepth else {
                throw StorageError.backingChain(path: path, reason: "more than \(Self.maxBackingDepth) backing files")
            }
            let fmt: ImageFormat
            if let f = header.backingFormat {
                guard let known = ImageFormat(rawValue: f) else {
                    throw StorageError.unsupported(path: path, feature: "backing format '\(f)'")
                }
                fmt = known
            } else {
                fmt = try ImageFormat.probe(path: resolved)
            }
            switch fmt {
            case .raw: backing = try RawImage(path: resolved, readOnly: true, lock: takeLock)
            case .qcow2: backing = try Qcow2Image(path: resolved, readOnly: true, lock: takeLock, chain: chain + [me])
            }
            backingPath = resolved
        } else {
            backing = nil
            backingPath = nil
        }
    }

    /// Opens a read-only view of an internal snapshot, found by ID or name.
    public func openSnapshot(_ idOrName: String) throws -> Qcow2Image {
        guard let s = snapshots.first(where: { $0.id == idOrName }) ?? snapshots.first(where: { $0.name == idOrName }) else {
            throw StorageError.invalidArgument("Can't find snapshot '\(idOrName)' in '\(path)'")
        }
        return try Qcow2Image(path: path, readOnly: true, lock: false, chain: [], snapshot: s)
    }

    // MARK: Creation

    /// Creates a qcow2 image (v3 unless `version` is 2) of `size` bytes, optionally on top of a
    /// backing file (stored as given; relative names are relative to the new image's directory).
    public static func create(path: String, size: UInt64, clusterBits: UInt32 = 16, version: UInt32 = 3,
                              backingFile: String? = nil, backingFormat: ImageFormat? = nil) throws {
        guard (9...21).contains(clusterBits) else { throw StorageError.invalidArgument("Cluster size must be a power of two between 512 and 2M") }
        guard version == 2 || version == 3 else { throw StorageError.invalidArgument("Invalid compat level \(version)") }
        guard size <= Qcow2Header.maxVirtualSize else { throw StorageError.invalidArgument("Image size \(size) is too large") }
        var h = Qcow2Header()
        h.version = version
        h.clusterBits = clusterBits
        h.size = size
        let cs = h.clusterSize
        let l2 = cs / 8
        h.l1Size = UInt32((size + cs * l2 - 1) / (cs * l2))
        let l1Clusters = max(1, (UInt64(h.l1Size) * 8 + cs - 1) / cs)
        h.refcountTableOffset = cs
        h.refcountTableClusters = 1
        h.l1TableOffset = 3 * cs
        h.backingFile = backingFile
        h.backingFormat = backingFormat?.rawValue
        let used = 3 + l1Clusters
        let refsPerBlock = cs * 8 / 16
        guard used <= refsPerBlock else { throw StorageError.invalidArgument("Image size \(size) is too large for this cluster size") }
        var headerBytes = h.serialize()
        guard UInt64(headerBytes.count) <= cs else { throw StorageError.invalidArgument("Backing file name is too long") }
        headerBytes += [UInt8](repeating: 0, count: Int(cs) - headerBytes.count)

        let f = try HostFile(path: path, readOnly: false, create: true)
        try f.lockLikeQEMU(write: true)
        var rt = [UInt8](repeating: 0, count: Int(cs))
        BE.put(2 * cs, &rt, 0)
        var rb = [UInt8](repeating: 0, count: Int(cs))
        for c in 0..<Int(used) { BE.put(UInt16(1), &rb, c * 2) }
        try f.write(rt, at: cs)
        try f.write(rb, at: 2 * cs)
        try f.write([UInt8](repeating: 0, count: Int(l1Clusters * cs)), at: 3 * cs)
        try f.write(headerBytes, at: 0)
        try f.sync()
    }

    // MARK: Mapping

    /// Where a virtual cluster's data lives.
    enum Mapping: Equatable {
        case unallocated
        /// Reads as zeros; `host` is a preallocated cluster or 0.
        case zero(host: UInt64, copied: Bool)
        case data(host: UInt64, copied: Bool)
        case compressed(host: UInt64, length: UInt64)
    }

    func bad(_ r: String) -> StorageError { .invalidImage(path: path, reason: r) }

    func loadL2(_ offset: UInt64) throws -> [UInt64] {
        if let t = l2Cache[offset] { return t }
        let b = try file.read(count: Int(clusterSize), at: offset)
        let t = (0..<Int(l2Entries)).map { BE.u64(b, $0 * 8) }
        if l2Cache.count >= 64 { l2Cache.removeAll(keepingCapacity: true) }
        l2Cache[offset] = t
        return t
    }

    func decode(_ e: UInt64, at what: String) throws -> Mapping {
        let fileEnd = endCluster * clusterSize
        if e & Self.compressedBit != 0 {
            let x = 62 - (clusterBits - 8)
            let host = e & ((1 << x) - 1)
            let sectors = (e >> x) & ((1 << (clusterBits - 8)) - 1)
            let length = (sectors + 1) * 512 - (host & 511)
            guard host >= clusterSize, host < fileEnd else {
                throw bad("\(what): compressed cluster at 0x\(String(host, radix: 16)) is outside the image file")
            }
            return .compressed(host: host, length: length)
        }
        let host = e & Self.offsetMask
        let copied = e & Self.copiedBit != 0
        if host != 0 {
            guard host % clusterSize == 0 else { throw bad("\(what): unaligned cluster offset 0x\(String(host, radix: 16))") }
            guard host >= clusterSize, host < fileEnd else {
                throw bad("\(what): cluster offset 0x\(String(host, radix: 16)) is outside the image file")
            }
            guard host != header.l1TableOffset, host != header.refcountTableOffset else {
                throw bad("\(what): data cluster overlaps metadata at 0x\(String(host, radix: 16))")
            }
        }
        if e & Self.zeroBit != 0 && header.version >= 3 { return .zero(host: host, copied: copied) }
        return host == 0 ? .unallocated : .data(host: host, copied: copied)
    }

    func mapping(virtualCluster vc: UInt64) throws -> Mapping {
        let i = Int(vc / l2Entries)
        guard i < l1.count else { return .unallocated }
        let l2Offset = l1[i] & Self.offsetMask
        guard l2Offset != 0 else { return .unallocated }
        let t = try loadL2(l2Offset)
        return try decode(t[Int(vc % l2Entries)], at: "L2 table at 0x\(String(l2Offset, radix: 16))")
    }

    /// Reads the whole content of a virtual cluster given its mapping.
    func readCluster(_ m: Mapping, virtualCluster vc: UInt64, into buf: UnsafeMutableRawBufferPointer,
                             from: Int, count: Int) throws {
        let dst = UnsafeMutableRawBufferPointer(rebasing: buf[0..<count])
        switch m {
        case .unallocated:
            let off = vc * clusterSize + UInt64(from)
            if let backing, off < backing.virtualSize {
                let n = Int(min(UInt64(count), backing.virtualSize - off))
                try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<n]), at: off)
                if n < count { UnsafeMutableRawBufferPointer(rebasing: buf[n..<count]).initializeMemory(as: UInt8.self, repeating: 0) }
            } else {
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            }
        case .zero:
            dst.initializeMemory(as: UInt8.self, repeating: 0)
        case .data(let host, _):
            try file.read(into: dst, at: host + UInt64(from))
        case .compressed(let host, let length):
            if lastDecompressed?.host != host {
                let input = try file.read(count: Int(min(length, 2 * clusterSize + 512)), at: host)
                var out = [UInt8](repeating: 0, count: Int(clusterSize))
                let ok = out.withUnsafeMutableBytes { Deflate.inflateCluster(input, into: $0) }
                guard ok else { throw bad("compressed cluster at 0x\(String(host, radix: 16)) does not decompress") }
                lastDecompressed = (host, out)
            }
            lastDecompressed!.data.withUnsafeBytes { src in
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[from..<(from + count)]))
            }
        }
    }

    // MARK: BlockImage

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try lock.withLock {
            try checkRange(offset, UInt64(buffer.count), header.size)
            var done = 0
            while done < buffer.count {
                let pos = offset + UInt64(done)
                let vc = pos / clusterSize, inCluster = Int(pos % clusterSize)
                let n = min(buffer.count - done, Int(clusterSize) - inCluster)
                let m = try mapping(virtualCluster: vc)
                try readCluster(m, virtualCluster: vc, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)]),
                                from: inCluster, count: n)
                done += n
            }
        }
    }

    func checkRange(_ offset: UInt64, _ length: UInt64, _ size: UInt64) throws {
        guard offset <= size, length <= size - offset else {
            throw StorageError.outOfRange(offset: offset, length: length, size: size)
        }
    }

    func checkWritable() throws {
        guard !isReadOnly else { throw StorageError.readOnly(path: path) }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkWritable()
        try lock.withLock {
            try checkRange(offset, UInt64(data.count), header.size)
            var done = 0
            while done < data.count {
                let pos = offset + UInt64(done)
                let vc = pos / clusterSize, inCluster = Int(pos % clusterSize)
                let n = min(data.count - done, Int(clusterSize) - inCluster)
                try writeInCluster(vc, at: inCluster, UnsafeRawBufferPointer(rebasing: data[done..<(done + n)]))
                done += n
            }
        }
    }

    public func flush() throws {
        guard !isReadOnly else { return }
        try lock.withLock { try file.sync() }
    }

    public func discard(offset: UInt64, length: UInt64) throws {
        try checkWritable()
        try lock.withLock {
            try checkRange(offset, length, header.size)
            // Only whole clusters are discarded; partial ones keep their data (allowed by discard semantics).
            let first = (offset + clusterSize - 1) / clusterSize
            let end = (offset + length) / clusterSize
            let lastPartial = offset + length == header.size && (offset + length) % clusterSize != 0
            let stop = lastPartial ? end + 1 : end
            guard first < stop else { return }
            for vc in first..<stop {
                let newEntry: UInt64? = header.version >= 3 ? (backing == nil ? 0 : Self.zeroBit) : (backing == nil ? 0 : nil)
                if let newEntry { try replaceEntry(vc, with: newEntry) }
            }
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64) throws {
        try checkWritable()
        try lock.withLock {
            try checkRange(offset, length, header.size)
            var pos = offset
            let end = offset + length
            let zeros = [UInt8](repeating: 0, count: Int(clusterSize))
            while pos < end {
                let vc = pos / clusterSize, inCluster = pos % clusterSize
                let n = min(end - pos, clusterSize - inCluster)
                let wholeCluster = inCluster == 0 && (n == clusterSize || pos + n == header.size)
                let m = try mapping(virtualCluster: vc)
                let alreadyZero: Bool = {
                    if case .zero = m { return true }
                    if case .unallocated = m { return backing == nil }
                    return false
                }()
                if alreadyZero {
                    // nothing to do
                } else if wholeCluster && (header.version >= 3 || backing == nil) {
                    try replaceEntry(vc, with: header.version >= 3 ? Self.zeroBit : 0)
                } else {
                    try zeros.withUnsafeBytes {
                        try writeInCluster(vc, at: Int(inCluster), UnsafeRawBufferPointer(rebasing: $0[0..<Int(n)]))
                    }
                }
                pos += n
            }
        }
    }

    // MARK: Allocation and refcounts

    var refcountBits: UInt64 { 1 << UInt64(header.refcountOrder) }
    var refsPerBlock: UInt64 { clusterSize * 8 / refcountBits }

    func loadRefBlock(_ offset: UInt64) throws -> [UInt8] {
        if let b = refBlockCache[offset] { return b }
        let b = try file.read(count: Int(clusterSize), at: offset)
        if refBlockCache.count >= 64 { refBlockCache.removeAll(keepingCapacity: true) }
        refBlockCache[offset] = b
        return b
    }

    static func refcountEntry(_ block: [UInt8], _ i: Int, bits: UInt64) -> UInt64 {
        switch bits {
        case 8: return UInt64(block[i])
        case 16: return UInt64(BE.u16(block, i * 2))
        case 32: return UInt64(BE.u32(block, i * 4))
        case 64: return BE.u64(block, i * 8)
        default:
            let perByte = 8 / Int(bits)
            return UInt64(block[i / perByte] >> (UInt8(i % perByte) * UInt8(bits))) & ((1 << bits) - 1)
        }
    }

    /// The stored refcount of host cluster `c`.
    func refcount(_ c: UInt64) throws -> UInt64 {
        let bi = Int(c / refsPerBlock)
        guard bi < refTable.count, refTable[bi] != 0 else { return 0 }
        let block = try loadRefBlock(refTable[bi])
        return Self.refcountEntry(block, Int(c % refsPerBlock), bits: refcountBits)
    }

    private func setRefcount(_ c: UInt64, _ value: UInt64) throws {
        guard value < (refcountBits == 64 ? .max : (1 << refcountBits)) else {
            throw bad("refcount of cluster \(c) would overflow \(refcountBits) bits")
        }
        let bi = Int(c / refsPerBlock)
        try ensureRefBlock(bi)
        let blockOffset = refTable[bi]
        var block = try loadRefBlock(blockOffset)
        let i = Int(c % refsPerBlock)
        let byteRange: Range<Int>
        switch refcountBits {
        case 8: block[i] = UInt8(value); byteRange = i..<(i + 1)
        case 16: BE.put(UInt16(value), &block, i * 2); byteRange = (i * 2)..<(i * 2 + 2)
        case 32: BE.put(UInt32(value), &block, i * 4); byteRange = (i * 4)..<(i * 4 + 4)
        case 64: BE.put(value, &block, i * 8); byteRange = (i * 8)..<(i * 8 + 8)
        default:
            let perByte = 8 / Int(refcountBits), shift = UInt8(i % perByte) * UInt8(refcountBits)
            let mask = UInt8((1 << refcountBits) - 1) << shift
            let b = i / perByte
            block[b] = (block[b] & ~mask) | (UInt8(value) << shift)
            byteRange = b..<(b + 1)
        }
        refBlockCache[blockOffset] = block
        try file.write(Array(block[byteRange]), at: blockOffset + UInt64(byteRange.lowerBound))
    }

    private func adjustRefcount(_ c: UInt64, by delta: Int) throws {
        let old = try refcount(c)
        if delta < 0 && old == 0 { throw bad("refcount of cluster \(c) would drop below zero") }
        try setRefcount(c, delta < 0 ? old - UInt64(-delta) : old + UInt64(delta))
    }

    private func ensureRefBlock(_ bi: Int) throws {
        if bi >= refTable.count { try growRefTable(minEntries: bi + 1) }
        guard refTable[bi] == 0 else { return }
        let b = endCluster
        endCluster += 1
        let off = b * clusterSize
        let zero = [UInt8](repeating: 0, count: Int(clusterSize))
        try file.write(zero, at: off)
        refTable[bi] = off
        refBlockCache[off] = zero
        if !suppressRefTableWrites { try file.write(BE.bytes(off), at: header.refcountTableOffset + UInt64(bi) * 8) }
        try adjustRefcount(b, by: 1)
    }

    private func growRefTable(minEntries: Int) throws {
        let perCluster = Int(clusterSize / 8)
        let t = endCluster
        var n = max(Int(header.refcountTableClusters) * 2, (minEntries + perCluster - 1) / perCluster)
        while n * perCluster < Int((t + UInt64(n) + 2) / refsPerBlock) + 2 { n += 1 }
        guard UInt64(n) * clusterSize <= Qcow2Header.maxRefTableBytes else { throw bad("refcount table would grow too large") }
        endCluster += UInt64(n)
        let oldOffset = header.refcountTableOffset, oldClusters = UInt64(header.refcountTableClusters)
        refTable += [UInt64](repeating: 0, count: n * perCluster - refTable.count)
        header.refcountTableOffset = t * clusterSize
        header.refcountTableClusters = UInt32(n)
        suppressRefTableWrites = true
        defer { suppressRefTableWrites = false }
        for c in t..<(t + UInt64(n)) { try adjustRefcount(c, by: 1) }
        var bytes = [UInt8](repeating: 0, count: refTable.count * 8)
        for (i, e) in refTable.enumerated() { BE.put(e, &bytes, i * 8) }
        try file.write(bytes, at: header.refcountTableOffset)
        var h = [UInt8](repeating: 0, count: 12)
        BE.put(header.refcountTableOffset, &h, 0)
        BE.put(header.refcountTableClusters, &h, 8)
        try file.write(h, at: 48)
        for c in 0..<oldClusters { try adjustRefcount(oldOffset / clusterSize + c, by: -1) }
    }

    /// Allocates `count` contiguous clusters at the end of the file with refcount 1.
    func allocateClusters(_ count: UInt64) throws -> UInt64 {
        let start = endCluster
        endCluster += count
        for c in start..<(start + count) { try adjustRefcount(c, by: 1) }
        compressedTail = nil
        return start * clusterSize
    }

    private func release(_ m: Mapping) throws {
        switch m {
        case .unallocated: break
        case .zero(let host, _), .data(let host, _):
            if host != 0 { try adjustRefcount(host / clusterSize, by: -1) }
        case .compressed(let host, let length):
            let first = host / clusterSize, last = (host + length - 1) / clusterSize
            for c in first...last { try adjustRefcount(c, by: -1) }
        }
    }

    // MARK: L2 updates

    /// Returns the L2 table offset for L1 index `i`, allocating or copying (when shared with a
    /// snapshot) as needed.
    private func ensureL2(_ i: Int) throws -> UInt64 {
        guard i < l1.count else { throw bad("L1 index \(i) beyond the table") }
        let e = l1[i]
        let old = e & Self.offsetMask
        if old != 0 && e & Self.copiedBit != 0 { return old }
        let contents: [UInt64] = old == 0 ? [UInt64](repeating: 0, count: Int(l2Entries)) : try loadL2(old)
        let new = try allocateClusters(1)
        var bytes = [UInt8](repeating: 0, count: Int(clusterSize))
        for (k, v) in contents.enumerated() where v != 0 { BE.put(v, &bytes, k * 8) }
        try file.write(bytes, at: new)
        l2Cache[new] = contents
        try file.write(BE.bytes(new | Self.copiedBit), at: header.l1TableOffset + UInt64(i) * 8)
        l1[i] = new | Self.copiedBit
        if old != 0 { try adjustRefcount(old / clusterSize, by: -1) }
        return new
    }

    private func setL2Entry(_ vc: UInt64, _ value: UInt64) throws {
        let l2 = try ensureL2(Int(vc / l2Entries))
        let k = Int(vc % l2Entries)
        var t = try loadL2(l2)
        t[k] = value
        l2Cache[l2] = t
        try file.write(BE.bytes(value), at: l2 + UInt64(k) * 8)
    }

    /// Points virtual cluster `vc` at `entry` (0 or the zero flag), releasing what it mapped.
    private func replaceEntry(_ vc: UInt64, with entry: UInt64) throws {
        let m = try mapping(virtualCluster: vc)
        if m == .unallocated && entry == 0 { return }
        if case .zero(0, _) = m, entry == Self.zeroBit { return }
        try setL2Entry(vc, entry)
        try release(m)
    }

    func writeInCluster(_ vc: UInt64, at inCluster: Int, _ data: UnsafeRawBufferPointer) throws {
        let m = try mapping(virtualCluster: vc)
        if case .data(let host, true) = m {
            // Ensure the L2 table itself is not shared before writing in place.
            let i = Int(vc / l2Entries)
            if l1[i] & Self.copiedBit != 0 {
                try file.write(data, at: host + UInt64(inCluster))
                return
            }
        }
        var buf = [UInt8](repeating: 0, count: Int(clusterSize))
        try buf.withUnsafeMutableBytes { b in
            if data.count < Int(clusterSize) {
                try readCluster(m, virtualCluster: vc, into: b, from: 0, count: Int(clusterSize))
            }
            UnsafeMutableRawBufferPointer(rebasing: b[inCluster..<(inCluster + data.count)]).copyMemory(from: data)
        }
        // Data first, then the L2 entry, then release the old cluster.
        if case .zero(let host, true) = m, host != 0, l1[Int(vc / l2Entries)] & Self.copiedBit != 0 {
            try file.write(buf, at: host)
            try setL2Entry(vc, host | Self.copiedBit)
            return
        }
        let host = try allocateClusters(1)
        try file.write(buf, at: host)
        try setL2Entry(vc, host | Self.copiedBit)
        if case .data(let old, true) = m {
            // The data cluster was exclusively owned but its L2 table was shared: the old table
            // (kept by the snapshot) still references it, so its refcount stays.
            _ = old
        } else {
            try release(m)
        }
    }

    /// Writes one whole virtual cluster compressed (used by convert -c). The cluster must be
    /// unallocated. Data that does not compress is written normally.
    public func writeCompressed(virtualCluster vc: UInt64, data: [UInt8]) throws {
        try checkWritable()
        try lock.withLock {
            guard vc * clusterSize < header.size else { throw StorageError.outOfRange(offset: vc * clusterSize, length: clusterSize, size: header.size) }
            guard try mapping(virtualCluster: vc) == .unallocated else {
                throw StorageError.invalidArgument("compressed writes need an unallocated cluster")
            }
            var full = data
            if full.count < Int(clusterSize) { full += [UInt8](repeating: 0, count: Int(clusterSize) - full.count) }
            guard let z = full.withUnsafeBytes({ Deflate.deflateCluster($0) }) else {
                try full.withUnsafeBytes { try writeInCluster(vc, at: 0, $0) }
                return
            }
            let len = UInt64(z.count)
            var host: UInt64
            if let tail = compressedTail, tail / clusterSize == endCluster - 1 {
                host = tail
                let lastNeeded = (host + len - 1) / clusterSize
                try adjustRefcount(host / clusterSize, by: 1)
                if lastNeeded > host / clusterSize {
                    let extra = lastNeeded - host / clusterSize
                    let start = endCluster
                    endCluster += extra
                    for c in start..<(start + extra) { try adjustRefcount(c, by: 1) }
                    if start != host / clusterSize + 1 {
                        // Refcount blocks were allocated in between; start afresh (a leak-free retry).
                        for c in start..<(start + extra) { try adjustRefcount(c, by: -1) }
                        try adjustRefcount(host / clusterSize, by: -1)
                        host = try allocateClusters((len + clusterSize - 1) / clusterSize)
                    }
                }
            } else {
                host = try allocateClusters((len + clusterSize - 1) / clusterSize)
            }
            try file.write(z, at: host)
            let x = 62 - (clusterBits - 8)
            let sectors = ((host + len - 1) >> 9) - (host >> 9)
            try setL2Entry(vc, Self.compressedBit | (sectors << x) | host)
            let next = (host + len + 511) & ~511
            compressedTail = next / clusterSize == endCluster - 1 && next % clusterSize != 0 ? next : nil
        }
    }

    /// Grows the virtual disk to `newSize` bytes (shrinking is refused).
    public func resize(to newSize: UInt64) throws {
        try checkWritable()
        try lock.withLock {
            guard newSize >= header.size else {
                throw StorageError.invalidArgument("qcow2 doesn't support shrinking images yet")
            }
            guard newSize <= Qcow2Header.maxVirtualSize else { throw StorageError.invalidArgument("Image size \(newSize) is too large") }
            let need = Int((newSize + clusterSize * l2Entries - 1) / (clusterSize * l2Entries))
            guard UInt64(need) * 8 <= Qcow2Header.maxL1Bytes else { throw StorageError.invalidArgument("Image size \(newSize) is too large") }
            var h = [UInt8](repeating: 0, count: 24)
            if need > l1.count {
                let haveClusters = max(1, (UInt64(l1.count) * 8 + clusterSize - 1) / clusterSize)
                if UInt64(need) * 8 <= haveClusters * clusterSize {
                    try file.write([UInt8](repeating: 0, count: (need - l1.count) * 8), at: header.l1TableOffset + UInt64(l1.count) * 8)
                    l1 += [UInt64](repeating: 0, count: need - l1.count)
                } else {
                    let clusters = (UInt64(need) * 8 + clusterSize - 1) / clusterSize
                    let newOffset = try allocateClusters(clusters)
                    l1 += [UInt64](repeating: 0, count: need - l1.count)
                    var bytes = [UInt8](repeating: 0, count: Int(clusters * clusterSize))
                    for (k, v) in l1.enumerated() { BE.put(v, &bytes, k * 8) }
                    try file.write(bytes, at: newOffset)
                    let old = header.l1TableOffset
                    header.l1TableOffset = newOffset
                    header.l1Size = UInt32(need)
                    BE.put(newSize, &h, 0)
                    BE.put(header.cryptMethod, &h, 8)
                    BE.put(header.l1Size, &h, 12)
                    BE.put(newOffset, &h, 16)
                    try file.write(h, at: 24)
                    header.size = newSize
                    for c in 0..<haveClusters { try adjustRefcount(old / clusterSize + c, by: -1) }
                    return
                }
            }
            header.l1Size = UInt32(l1.count)
            header.size = newSize
            BE.put(newSize, &h, 0)
            BE.put(header.cryptMethod, &h, 8)
            BE.put(header.l1Size, &h, 12)
            BE.put(header.l1TableOffset, &h, 16)
            try file.write(h, at: 24)
        }
    }

    /// The number of host clusters in the file (for check and info).
    var fileClusters: UInt64 { endCluster }

    /// Virtual-cluster mapping for callers that want allocation status (convert, info).
    public func isAllocated(virtualCluster vc: UInt64) throws -> Bool {
        try lock.withLock { try mapping(virtualCluster: vc) != .unallocated }
    }
}

// MARK: Migration hand-over

extension Qcow2Image {
    public func releaseLocks() {
        lock.withLock { file.unlockAll() }
        backing?.releaseLocks()
    }

    /// Takes the locks and rereads the header, the snapshot table, the L1 and refcount tables
    /// and the file's end, dropping every cached L2 and refcount block: another process (a
    /// migration source) may have written the image while this one held no lock. Refuses an
    /// image that changed shape (cluster size) meanwhile.
    public func activate() throws {
        try backing?.activate()
        try lock.withLock {
            try file.lockLikeQEMU(write: !isReadOnly)
            guard !snapshotView else { return }
            let fileSize = try file.size()
            let first = try file.read(count: Int(min(max(fileSize, 104), 2 << 20)), at: 0)
            let h = try Qcow2Header.parse(first, fileSize: fileSize, path: path)
            guard h.clusterSize == clusterSize else {
                throw StorageError.invalidImage(path: path, reason: "the cluster size changed while another process held the image")
            }
            let cs = clusterSize
            let l1Bytes = try file.read(count: Int(h.l1Size) * 8, at: h.l1TableOffset)
            let newL1 = (0..<Int(h.l1Size)).map { BE.u64(l1Bytes, $0 * 8) }
            guard UInt64(newL1.count) * cs * l2Entries >= h.size else {
                throw StorageError.invalidImage(path: path, reason: "L1 table is too small for the disk")
            }
            let rtCount = Int(UInt64(h.refcountTableClusters) * cs / 8)
            let rtBytes = try file.read(count: rtCount * 8, at: h.refcountTableOffset)
            let newRefTable = (0..<rtCount).map { BE.u64(rtBytes, $0 * 8) }
            for (i, e) in newL1.enumerated() where e & Self.offsetMask != 0 {
                let off = e & Self.offsetMask
                guard off % cs == 0, off >= cs, off < fileSize else {
                    throw StorageError.invalidImage(path: path, reason: "L1 entry \(i) is invalid (0x\(String(off, radix: 16)))")
                }
            }
            for (i, e) in newRefTable.enumerated() where e != 0 {
                guard e & (cs - 1) == 0, e & ~Self.offsetMask == 0, e >= cs, e < fileSize else {
                    throw StorageError.invalidImage(path: path, reason: "refcount table entry \(i) is invalid (0x\(String(e, radix: 16)))")
                }
            }
            if h.snapshotCount > 0 {
                let len = Int(min(fileSize - h.snapshotsOffset, 64 << 20))
                let bytes = try file.read(count: len, at: h.snapshotsOffset)
                snapshots = try Qcow2Snapshot.parseTable(bytes, count: Int(h.snapshotCount), header: h,
                                                         fileSize: fileSize, path: path).snapshots
            } else {
                snapshots = []
            }
            header = h
            l1 = newL1
            refTable = newRefTable
            l2Cache.removeAll()
            refBlockCache.removeAll()
            endCluster = (fileSize + cs - 1) / cs
            compressedTail = nil
            lastDecompressed = nil
        }
    }
}
