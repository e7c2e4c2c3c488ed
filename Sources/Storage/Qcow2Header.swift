/// Big-endian field access on byte arrays (qcow2 metadata is big-endian).
enum BE {
    static func u16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) << 8 | UInt16(b[o + 1]) }
    static func u32(_ b: [UInt8], _ o: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(b[o + $1]) }
    }
    static func u64(_ b: [UInt8], _ o: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(b[o + $1]) }
    }
    static func put<T: FixedWidthInteger>(_ v: T, _ b: inout [UInt8], _ o: Int) {
        let n = MemoryLayout<T>.size
        for i in 0..<n { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * (n - 1 - i))) }
    }
    static func bytes<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: MemoryLayout<T>.size)
        put(v, &b, 0)
        return b
    }
}

/// The qcow2 file header (QEMU's docs/interop/qcow2.txt), versions 2 and 3, with the header
/// extensions this implementation understands. Every field is validated by `parse`.
public struct Qcow2Header: Sendable, Equatable {
    /// "QFI\xfb".
    public static let magic: UInt32 = 0x5146_49fb
    /// Incompatible feature bits.
    public static let dirtyBit: UInt64 = 1, corruptBit: UInt64 = 2, externalDataBit: UInt64 = 4
    public static let compressionTypeBit: UInt64 = 8, extendedL2Bit: UInt64 = 16
    /// Compatible feature bit: lazy refcounts.
    public static let lazyRefcountsBit: UInt64 = 1
    /// Header extension types.
    static let extEnd: UInt32 = 0, extBackingFormat: UInt32 = 0xe279_2aca, extFeatureNames: UInt32 = 0x6803_f857
    /// Largest L1 table QEMU accepts (32 MiB), largest refcount table (8 MiB).
    static let maxL1Bytes: UInt64 = 32 << 20, maxRefTableBytes: UInt64 = 8 << 20
    /// Largest virtual size accepted (QEMU's limit is 2^63 bytes-ish; 2^56 keeps arithmetic safe).
    public static let maxVirtualSize: UInt64 = 1 << 56

    public var version: UInt32 = 3
    public var backingFileOffset: UInt64 = 0
    public var backingFileSize: UInt32 = 0
    public var clusterBits: UInt32 = 16
    public var size: UInt64 = 0
    public var cryptMethod: UInt32 = 0
    public var l1Size: UInt32 = 0
    public var l1TableOffset: UInt64 = 0
    public var refcountTableOffset: UInt64 = 0
    public var refcountTableClusters: UInt32 = 0
    public var snapshotCount: UInt32 = 0
    public var snapshotsOffset: UInt64 = 0
    public var incompatibleFeatures: UInt64 = 0
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = 112
    public var compressionType: UInt8 = 0
    /// Backing file name as stored (may be relative to the image's directory).
    public var backingFile: String?
    /// Backing format from the header extension, if any.
    public var backingFormat: String?

    /// Cluster size in bytes.
    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }

    /// Creates a header with QEMU's defaults (v3, 64 KiB clusters, 16-bit refcounts).
    public init() {}

    /// Parses and validates a header from the first cluster of a file of `fileSize` bytes.
    /// `bytes` must hold at least the first 104 bytes, ideally the whole first cluster.
    public static func parse(_ bytes: [UInt8], fileSize: UInt64, path: String) throws -> Qcow2Header {
        func bad(_ r: String) -> StorageError { .invalidImage(path: path, reason: r) }
        guard bytes.count >= 72, BE.u32(bytes, 0) == magic else { throw bad("no qcow2 magic") }
        guard fileSize >= 72 else { throw bad("the file (\(fileSize) bytes) is too short for a qcow2 header") }
        var h = Qcow2Header()
        h.version = BE.u32(bytes, 4)
        guard h.version == 2 || h.version == 3 else {
            throw StorageError.unsupported(path: path, feature: "qcow2 version \(h.version)")
        }
        h.backingFileOffset = BE.u64(bytes, 8)
        h.backingFileSize = BE.u32(bytes, 16)
        h.clusterBits = BE.u32(bytes, 20)
        guard (9...21).contains(h.clusterBits) else { throw bad("cluster size 2^\(h.clusterBits) is not between 512 B and 2 MiB") }
        let cs = h.clusterSize
        h.size = BE.u64(bytes, 24)
        guard h.size <= maxVirtualSize else { throw bad("virtual size \(h.size) is too large") }
        h.cryptMethod = BE.u32(bytes, 32)
        guard h.cryptMethod == 0 else { throw StorageError.unsupported(path: path, feature: "encryption") }
        h.l1Size = BE.u32(bytes, 36)
        h.l1TableOffset = BE.u64(bytes, 40)
        h.refcountTableOffset = BE.u64(bytes, 48)
        h.refcountTableClusters = BE.u32(bytes, 56)
        h.snapshotCount = BE.u32(bytes, 60)
        h.snapshotsOffset = BE.u64(bytes, 64)
        if h.version == 3 {
            guard bytes.count >= 104, fileSize >= 104 else { throw bad("the file is too short for a version 3 header") }
            h.incompatibleFeatures = BE.u64(bytes, 72)
            h.compatibleFeatures = BE.u64(bytes, 80)
            h.autoclearFeatures = BE.u64(bytes, 88)
            h.refcountOrder = BE.u32(bytes, 96)
            h.headerLength = BE.u32(bytes, 100)
            guard h.headerLength >= 104, h.headerLength % 8 == 0 || h.headerLength == 105,
                  UInt64(h.headerLength) <= cs else {
                throw bad("header length \(h.headerLength) is invalid")
            }
            if h.headerLength > 104 && bytes.count > 104 { h.compressionType = bytes[104] }
        } else {
            h.refcountOrder = 4
            h.headerLength = 72
        }
        guard h.refcountOrder <= 6 else { throw bad("refcount order \(h.refcountOrder) is larger than 6") }
        guard (h.incompatibleFeatures & compressionTypeBit != 0) == (h.compressionType != 0) else {
            throw bad("compression type \(h.compressionType) does not match the incompatible feature bit")
        }

        // Tables: aligned, inside the file, sizes sane.
        func table(_ name: String, _ off: UInt64, _ len: UInt64) throws {
            guard off % cs == 0 else { throw bad("\(name) offset \(off) is not cluster aligned") }
            guard off <= fileSize, len <= fileSize - off else {
                throw bad("\(name) (\(len) bytes at \(off)) lies outside the file (\(fileSize) bytes)")
            }
        }
        let l2Entries = cs / 8
        let needL1 = (h.size + cs * l2Entries - 1) / (cs * l2Entries)
        guard UInt64(h.l1Size) * 8 <= maxL1Bytes else { throw bad("L1 table size \(h.l1Size) is too large") }
        guard UInt64(h.l1Size) >= needL1 else { throw bad("L1 table (\(h.l1Size) entries) is too small for the virtual size") }
        if h.l1Size > 0 { try table("L1 table", h.l1TableOffset, UInt64(h.l1Size) * 8) }
        guard h.refcountTableClusters > 0, UInt64(h.refcountTableClusters) * cs <= maxRefTableBytes else {
            throw bad("refcount table size of \(h.refcountTableClusters) clusters is invalid")
        }
        try table("refcount table", h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs)
        guard h.snapshotCount <= 65536 else { throw bad("\(h.snapshotCount) snapshots is too many") }
        if h.snapshotCount > 0 { try table("snapshot table", h.snapshotsOffset, UInt64(h.snapshotCount) * 40) }

        // Overlapping metadata.
        var regions: [(String, UInt64, UInt64)] = [("header", 0, cs),
                                                   ("refcount table", h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs)]
        if h.l1Size > 0 { regions.append(("L1 table", h.l1TableOffset, UInt64(h.l1Size) * 8)) }
        if h.snapshotCount > 0 { regions.append(("snapshot table", h.snapshotsOffset, UInt64(h.snapshotCount) * 40)) }
        for i in regions.indices {
            for j in regions.indices where j > i {
                let a = regions[i], b = regions[j]
                if a.1 < b.1 + b.2 && b.1 < a.1 + a.2 { throw bad("\(a.0) overlaps \(b.0)") }
            }
        }

        // Header extensions (between the header and the end of the first cluster).
        var off = Int(h.headerLength)
        let limit = min(bytes.count, Int(cs))
        while off + 8 <= limit {
            let type = BE.u32(bytes, off), len = Int(BE.u32(bytes, off + 4))
            if type == extEnd { break }
            guard len <= limit - off - 8 else { throw bad("header extension 0x\(String(type, radix: 16)) is too long") }
            let data = Array(bytes[(off + 8)..<(off + 8 + len)])
            if type == extBackingFormat {
                h.backingFormat = String(decoding: data, as: UTF8.self)
            }
            off += 8 + (len + 7) / 8 * 8
        }

        if h.backingFileOffset != 0 {
            let (end, overflow) = h.backingFileOffset.addingReportingOverflow(UInt64(h.backingFileSize))
            guard h.backingFileSize > 0, h.backingFileSize <= 1023, !overflow,
                  end <= min(cs, UInt64(bytes.count)) else {
                throw bad("backing file name (\(h.backingFileSize) bytes at \(h.backingFileOffset)) is invalid")
            }
            let start = Int(h.backingFileOffset)
            h.backingFile = String(decoding: bytes[start..<(start + Int(h.backingFileSize))], as: UTF8.self)
        }
        return h
    }

    /// Serializes the header, its extensions and the backing file name into one cluster-sized
    /// (or shorter) byte array. Sets `headerLength`, `backingFileOffset` and `backingFileSize`.
    public mutating func serialize() -> [UInt8] {
        headerLength = version == 3 ? 112 : 72
        var ext: [UInt8] = []
        if let fmt = backingFormat {
            let d = Array(fmt.utf8)
            ext += BE.bytes(Self.extBackingFormat) + BE.bytes(UInt32(d.count)) + d
            ext += [UInt8](repeating: 0, count: (8 - d.count % 8) % 8)
        }
        ext += [UInt8](repeating: 0, count: 8)  // end of extensions
        var name: [UInt8] = []
        if let bf = backingFile {
            name = Array(bf.utf8)
            backingFileOffset = UInt64(headerLength) + UInt64(ext.count)
            backingFileSize = UInt32(name.count)
        } else {
            backingFileOffset = 0
            backingFileSize = 0
        }
        var b = [UInt8](repeating: 0, count: Int(headerLength))
        BE.put(Self.magic, &b, 0)
        BE.put(version, &b, 4)
        BE.put(backingFileOffset, &b, 8)
        BE.put(backingFileSize, &b, 16)
        BE.put(clusterBits, &b, 20)
        BE.put(size, &b, 24)
        BE.put(cryptMethod, &b, 32)
        BE.put(l1Size, &b, 36)
        BE.put(l1TableOffset, &b, 40)
        BE.put(refcountTableOffset, &b, 48)
        BE.put(refcountTableClusters, &b, 56)
        BE.put(snapshotCount, &b, 60)
        BE.put(snapshotsOffset, &b, 64)
        if version == 3 {
            BE.put(incompatibleFeatures, &b, 72)
            BE.put(compatibleFeatures, &b, 80)
            BE.put(autoclearFeatures, &b, 88)
            BE.put(refcountOrder, &b, 96)
            BE.put(headerLength, &b, 100)
            b[104] = compressionType
        }
        return b + ext + name
    }
}

/// One internal snapshot from the snapshot table.
public struct Qcow2Snapshot: Sendable, Equatable {
    /// Offset and entry count of the snapshot's own L1 table.
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    /// Unique ID string ("1", "2", ...).
    public var id: String
    /// User-visible name (tag).
    public var name: String
    /// Creation time.
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    /// Guest clock at creation, in nanoseconds.
    public var vmClockNanoseconds: UInt64
    /// Size of saved VM state (0 for disk-only snapshots).
    public var vmStateSize: UInt64
    /// Virtual disk size when the snapshot was taken (extra data; falls back to the image's size).
    public var diskSize: UInt64
    /// Instruction count, or nil when not recorded (-1 in the file).
    public var icount: UInt64?

    /// Parses `count` snapshot entries starting at `bytes[0]`, validating each against the file.
    static func parseTable(_ bytes: [UInt8], count: Int, header: Qcow2Header, fileSize: UInt64, path: String) throws
        -> (snapshots: [Qcow2Snapshot], length: Int) {
        func bad(_ r: String) -> StorageError { .invalidImage(path: path, reason: "snapshot table: " + r) }
        var out: [Qcow2Snapshot] = []
        var o = 0
        for i in 0..<count {
            guard o + 40 <= bytes.count else { throw bad("entry \(i) is truncated") }
            let l1Off = BE.u64(bytes, o), l1Size = BE.u32(bytes, o + 8)
            let idLen = Int(BE.u16(bytes, o + 12)), nameLen = Int(BE.u16(bytes, o + 14))
            let extra = Int(BE.u32(bytes, o + 36))
            guard extra <= 1024 else { throw bad("entry \(i) has \(extra) bytes of extra data") }
            let total = 40 + extra + idLen + nameLen
            guard o + total <= bytes.count else { throw bad("entry \(i) is truncated") }
            guard l1Off % header.clusterSize == 0, UInt64(l1Size) * 8 <= Qcow2Header.maxL1Bytes,
                  l1Off <= fileSize, UInt64(l1Size) * 8 <= fileSize - l1Off else {
                throw bad("entry \(i) has an L1 table outside the file")
            }
            var s = Qcow2Snapshot(l1TableOffset: l1Off, l1Size: l1Size, id: "", name: "",
                                  dateSeconds: BE.u32(bytes, o + 16), dateNanoseconds: BE.u32(bytes, o + 20),
                                  vmClockNanoseconds: BE.u64(bytes, o + 24), vmStateSize: UInt64(BE.u32(bytes, o + 32)),
                                  diskSize: header.size, icount: nil)
            let e = o + 40
            if extra >= 8 { s.vmStateSize = BE.u64(bytes, e) }
            if extra >= 16 { s.diskSize = BE.u64(bytes, e + 8) }
            if extra >= 24 { let ic = BE.u64(bytes, e + 16); s.icount = ic == .max ? nil : ic }
            s.id = String(decoding: bytes[(e + extra)..<(e + extra + idLen)], as: UTF8.self)
            s.name = String(decoding: bytes[(e + extra + idLen)..<(e + extra + idLen + nameLen)], as: UTF8.self)
            out.append(s)
            o += (total + 7) / 8 * 8
        }
        return (out, o)
    }
}
