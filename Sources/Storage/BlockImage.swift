import Synchronization

/// A disk image format this module reads and writes.
public enum ImageFormat: String, Sendable, CaseIterable {
    case raw
    case qcow2

    /// Guesses the format from the file's magic, as qemu-img does: qcow2 by its magic, raw when
    /// no known format's magic is there. A file of a format this module cannot read (VMDK, VDI,
    /// VHD/VPC, VHDX, LUKS, QED, Parallels) is refused with `.unsupported` naming it: handing
    /// it to a guest as raw would show the guest the container, not the disk. Name the format
    /// explicitly (raw) to use such a file's bytes as they are.
    public static func probe(path: String) throws -> ImageFormat {
        let f = try HostFile(path: path, readOnly: true)
        let head = try f.read(count: 512, at: 0)
        if head.starts(with: [0x51, 0x46, 0x49, 0xfb]) { return .qcow2 }
        var tail: [UInt8] = []
        let size = try f.size()
        if size >= 512 && size % 512 == 0 { tail = try f.read(count: 512, at: size - 512) }
        if let foreign = ForeignImageFormat.detect(head: head, tail: tail) {
            throw StorageError.unsupported(path: path, feature: "the \(foreign.rawValue) format (its magic is at the start of the file); machine-server reads raw and qcow2 only: convert it with 'qemu-img convert -O qcow2', or name the format raw explicitly to give the guest the file's bytes as they are")
        }
        return .raw
    }
}

/// Image formats qemu-img knows and this module does not read, recognized by their magic so
/// that such a file is never taken for raw.
public enum ForeignImageFormat: String, Sendable, CaseIterable {
    case vmdk, vdi, vpc, vhdx, luks, qed, parallels

    /// The format whose magic `head` (the file's first bytes, up to 512) or `tail` (its last
    /// 512 bytes, for a fixed VHD's footer) carries; nil for none of them.
    public static func detect(head: [UInt8], tail: [UInt8]) -> ForeignImageFormat? {
        func at(_ offset: Int, _ magic: [UInt8], in bytes: [UInt8]) -> Bool {
            bytes.count >= offset + magic.count && Array(bytes[offset..<offset + magic.count]) == magic
        }
        let text = { (s: String) in Array(s.utf8) }
        if at(0, text("KDMV"), in: head) || at(0, text("COWD"), in: head) { return .vmdk }
        // A monolithic-flat or split VMDK is a text descriptor naming its extents.
        if at(0, text("# Disk DescriptorFile"), in: head) { return .vmdk }
        if at(0x40, [0x7f, 0x10, 0xda, 0xbe], in: head) { return .vdi }
        if at(0, text("conectix"), in: head) { return .vpc }
        if at(0, text("vhdxfile"), in: head) { return .vhdx }
        if at(0, text("LUKS") + [0xba, 0xbe], in: head) { return .luks }
        if at(0, text("QED") + [0], in: head) { return .qed }
        if at(0, text("WithoutFreeSpace"), in: head) || at(0, text("WithouFreSpacExt"), in: head) { return .parallels }
        // A fixed-size VHD has only its footer, at the end.
        if at(0, text("conectix"), in: tail) { return .vpc }
        return nil
    }
}

/// A virtual disk addressed by byte offsets: what virtio-blk and machine-img see.
///
/// Implementations serialize their own operations (an internal lock), so any thread may call
/// them; virtio-blk calls them from its I/O thread. Reads of never-written areas return zeros
/// (or the backing file's data).
public protocol BlockImage: AnyObject, Sendable {
    /// Path of the image file.
    var path: String { get }
    /// Its format.
    var format: ImageFormat { get }
    /// Size of the virtual disk in bytes.
    var virtualSize: UInt64 { get }
    /// True when opened read-only: writes, discards and write-zeroes throw `.readOnly`.
    var isReadOnly: Bool { get }
    /// Fills `buffer` with the disk's bytes at `offset`.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// Writes `data` at `offset`.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes every completed write durable (fsync).
    func flush() throws
    /// Tells the image the range's content is no longer needed; afterwards it reads as zeros or
    /// as its old content (the format decides).
    func discard(offset: UInt64, length: UInt64) throws
    /// Makes the range read as zeros, deallocating whole clusters where the format can.
    func writeZeroes(offset: UInt64, length: UInt64) throws
    /// Drops this process's locks on the image (and its backing chain), so that another
    /// process may take them: a migration source hands its disks over. Call after `flush()`
    /// and while nothing writes the image.
    func releaseLocks()
    /// Takes the locks (as at open) and rereads any cached metadata from the file, which
    /// another process may have changed while this one held no lock: a migration
    /// destination taking the disks over, or a source taking them back. Throws `.locked`
    /// when another process still holds them.
    func activate() throws
}

extension BlockImage {
    /// Reads `count` bytes at `offset` into an array.
    public func read(count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        return out
    }

    /// Writes `bytes` at `offset`.
    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// Throws `.outOfRange` unless `[offset, offset+length)` is inside the disk.
    func checkRange(_ offset: UInt64, _ length: UInt64) throws {
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw StorageError.outOfRange(offset: offset, length: length, size: virtualSize)
        }
    }
}

/// Opens an image file. `format` nil probes it (like qemu-img without -f). `lock` takes
/// QEMU-compatible OFD locks so that a second writer is refused.
public func openImage(path: String, format: ImageFormat? = nil, readOnly: Bool, lock: Bool = true) throws -> any BlockImage {
    switch try format ?? ImageFormat.probe(path: path) {
    case .raw: return try RawImage(path: path, readOnly: readOnly, lock: lock)
    case .qcow2: return try Qcow2Image(path: path, readOnly: readOnly, lock: lock)
    }
}

/// A raw image: the file is the disk, byte for byte.
///
/// Thread-safe (pread/pwrite); discard punches holes.
public final class RawImage: BlockImage, Sendable {
    /// The open host file.
    public let file: HostFile
    public var path: String { file.path }
    public var format: ImageFormat { .raw }
    public var isReadOnly: Bool { file.readOnly }
    private let size: Atomic<UInt64>
    public var virtualSize: UInt64 { size.load(ordering: .relaxed) }

    /// Opens an existing raw file.
    public init(path: String, readOnly: Bool, lock: Bool = true) throws {
        file = try HostFile(path: path, readOnly: readOnly)
        if lock { try file.lockLikeQEMU(write: !readOnly) }
        size = Atomic(try file.size())
    }

    /// Creates (or truncates) a sparse raw file of `size` bytes.
    public static func create(path: String, size: UInt64) throws {
        let f = try HostFile(path: path, readOnly: false, create: true)
        try f.truncate(to: size)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, UInt64(buffer.count))
        try file.read(into: buffer, at: offset)
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard !isReadOnly else { throw StorageError.readOnly(path: path) }
        try checkRange(offset, UInt64(data.count))
        try file.write(data, at: offset)
    }

    public func flush() throws {
        if !isReadOnly { try file.sync() }
    }

    public func releaseLocks() { file.unlockAll() }

    public func activate() throws {
        try file.lockLikeQEMU(write: !isReadOnly)
        size.store(try file.size(), ordering: .relaxed)
    }

    public func discard(offset: UInt64, length: UInt64) throws {
        guard !isReadOnly else { throw StorageError.readOnly(path: path) }
        try checkRange(offset, length)
        try file.punchHole(offset: offset, length: length)
    }

    public func writeZeroes(offset: UInt64, length: UInt64) throws {
        try discard(offset: offset, length: length)
    }

    /// Grows (or, with `allowShrink`, shrinks) the disk.
    public func resize(to newSize: UInt64, allowShrink: Bool = false) throws {
        guard !isReadOnly else { throw StorageError.readOnly(path: path) }
        guard newSize >= virtualSize || allowShrink else {
            throw StorageError.invalidArgument("Use the --shrink option to perform a shrink operation.")
        }
        try file.truncate(to: newSize)
        size.store(newSize, ordering: .relaxed)
    }
}
