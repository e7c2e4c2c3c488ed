#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An open host file with positioned I/O, fsync and QEMU-compatible OFD byte-range locks.
///
/// Thread-safe for positioned reads and writes (pread/pwrite); the owner serializes anything
/// stateful. Closed on deinit, which also drops its locks.
public final class HostFile: Sendable {
    /// Path as given by the caller.
    public let path: String
    /// The file descriptor (valid for the object's life).
    public let fd: Int32
    /// Whether the file was opened for reading only.
    public let readOnly: Bool

    /// QEMU's raw-posix lock bases: byte 100+n is read-locked while permission n is held, byte
    /// 200+n while permission n is refused to others.
    static let permBase: Int64 = 100, sharedBase: Int64 = 200
    /// QEMU's permission bit numbers and names.
    static let permissions: [(bit: Int64, name: String)] = [
        (0, "consistent read"), (1, "write"), (2, "write unchanged"), (3, "resize"),
    ]

    /// Opens `path`; `create` creates or truncates it.
    ///
    /// Only a regular file or a block device is accepted. The file is opened non-blocking and
    /// checked with fstat before anything else touches it, so a FIFO, socket or character
    /// device given as an image (or as a backing file) is refused at once instead of blocking
    /// in open or read forever.
    public init(path: String, readOnly: Bool, create: Bool = false) throws {
        self.path = path
        self.readOnly = readOnly
        var flags = readOnly ? O_RDONLY : O_RDWR
        if create { flags |= O_CREAT | O_TRUNC }
        flags |= O_CLOEXEC | O_NONBLOCK | O_NOCTTY
        let fd = open(path, flags, 0o644)
        guard fd >= 0 else { throw Self.error(path, "open", errno) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw Self.error(path, "stat", e)
        }
        let kind = st.st_mode & S_IFMT
        guard kind == S_IFREG || kind == S_IFBLK else {
            close(fd)
            throw StorageError.notAFile(path: path, kind: Self.fileKind(kind))
        }
        // Regular files and block devices never block; clear O_NONBLOCK all the same so that
        // reads and writes behave as on an ordinary descriptor.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        self.fd = fd
    }

    /// A human name for a file type from `st_mode & S_IFMT`.
    static func fileKind(_ kind: mode_t) -> String {
        switch kind {
        case S_IFIFO: return "a FIFO"
        case S_IFCHR: return "a character device"
        case S_IFSOCK: return "a socket"
        case S_IFDIR: return "a directory"
        case S_IFLNK: return "a symbolic link"
        default: return "a special file"
        }
    }

    deinit { close(fd) }

    static func error(_ path: String, _ op: String, _ e: Int32) -> StorageError {
        .io(path: path, operation: op, errno: e, message: String(cString: strerror(e)))
    }

    /// Current file size in bytes.
    public func size() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw Self.error(path, "stat", errno) }
        return UInt64(st.st_size)
    }

    /// Bytes actually allocated on the host (st_blocks * 512), as qemu-img's "actual-size".
    public func allocatedSize() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw Self.error(path, "stat", errno) }
        return UInt64(st.st_blocks) * 512
    }

    /// Reads exactly `buffer.count` bytes at `offset`; bytes past end of file read as zero.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw Self.error(path, "read", errno)
            }
            if n == 0 {
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += n
        }
    }

    /// Reads `count` bytes at `offset` into a new array (zero past end of file).
    public func read(count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        return out
    }

    /// Writes all of `data` at `offset`.
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < data.count {
            let n = pwrite(fd, data.baseAddress! + done, data.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw Self.error(path, "write", errno)
            }
            done += n
        }
    }

    /// Writes all of `bytes` at `offset`.
    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// Flushes data and metadata to stable storage.
    public func sync() throws {
        guard fsync(fd) == 0 else { throw Self.error(path, "flush", errno) }
    }

    /// Sets the file length.
    public func truncate(to size: UInt64) throws {
        guard ftruncate(fd, off_t(size)) == 0 else { throw Self.error(path, "resize", errno) }
    }

    /// Deallocates a byte range (reads then return zeros); falls back to writing zeros.
    public func punchHole(offset: UInt64, length: UInt64) throws {
        #if os(Linux)
        // fallocate(2) is not exported by Glibc's Swift overlay (it needs _GNU_SOURCE); look it up.
        typealias Fallocate = @convention(c) (Int32, Int32, off_t, off_t) -> Int32
        if let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "fallocate") {
            let f = unsafeBitCast(sym, to: Fallocate.self)
            if f(fd, 0x02 | 0x01, off_t(offset), off_t(length)) == 0 { return }  // PUNCH_HOLE | KEEP_SIZE
        }
        #endif
        let zero = [UInt8](repeating: 0, count: 1 << 16)
        var o = offset
        let end = offset + length
        while o < end {
            let n = Int(min(UInt64(zero.count), end - o))
            try zero.withUnsafeBytes { try write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: o) }
            o += UInt64(n)
        }
    }

    #if os(Linux)
    private func lockCommand(_ cmd: Int32, type: Int32, byte: Int64) -> (ok: Bool, errno: Int32, type: Int32) {
        var fl = flock()
        fl.l_type = Int16(type)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = off_t(byte)
        fl.l_len = 1
        fl.l_pid = 0
        let r = withUnsafeMutablePointer(to: &fl) { fcntl(fd, cmd, $0) }
        return (r == 0, r == 0 ? 0 : errno, Int32(fl.l_type))
    }
    #endif

    /// Releases every lock this descriptor holds on the file.
    public func unlockAll() {
        #if os(Linux)
        var fl = flock()
        fl.l_type = Int16(F_UNLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = 0
        fl.l_len = 0
        fl.l_pid = 0
        _ = withUnsafeMutablePointer(to: &fl) { fcntl(fd, 37 /* F_OFD_SETLK */, $0) }
        #endif
    }

    /// Takes QEMU-compatible locks: holds "consistent read" (and "write"/"write unchanged" when
    /// writable), refuses "write" and "resize" to others. Throws `.locked` when another process
    /// (QEMU, qemu-img or another machine-server) holds a conflicting lock.
    public func lockLikeQEMU(write: Bool) throws {
        #if os(Linux)
        let F_OFD_GETLK: Int32 = 36, F_OFD_SETLK: Int32 = 37
        let held: [Int64] = write ? [0, 1, 2] : [0]
        let refused: [Int64] = [1, 3]
        func name(_ bit: Int64) -> String { Self.permissions.first { $0.bit == bit }?.name ?? "perm \(bit)" }
        for bit in held + refused.map({ $0 + 1000 }) {
            let isRefusal = bit >= 1000
            let b = isRefusal ? bit - 1000 : bit
            let r = lockCommand(F_OFD_SETLK, type: Int32(F_RDLCK), byte: (isRefusal ? Self.sharedBase : Self.permBase) + b)
            if !r.ok {
                if r.errno == EINVAL || r.errno == ENOSYS || r.errno == ENOTSUP { return }  // no OFD locks here
                throw Self.error(path, "lock", r.errno)
            }
        }
        // Someone refuses what we hold?
        for b in held {
            let r = lockCommand(F_OFD_GETLK, type: Int32(F_WRLCK), byte: Self.sharedBase + b)
            if r.ok && r.type != Int32(F_UNLCK) { throw StorageError.locked(path: path, permission: name(b), shared: false) }
        }
        // Someone holds what we refuse?
        for b in refused {
            let r = lockCommand(F_OFD_GETLK, type: Int32(F_WRLCK), byte: Self.permBase + b)
            if r.ok && r.type != Int32(F_UNLCK) { throw StorageError.locked(path: path, permission: name(b), shared: true) }
        }
        #endif
    }
}
