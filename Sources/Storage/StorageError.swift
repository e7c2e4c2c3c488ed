/// Everything that can go wrong opening, reading or writing a disk image, each with a message a
/// user can act on (worded like qemu-img's where there is an equivalent).
public enum StorageError: Error, Equatable, CustomStringConvertible {
    /// A host system call failed (`errno` text included).
    case io(path: String, operation: String, errno: Int32, message: String)
    /// The file is not a valid image of the format it claims to be.
    case invalidImage(path: String, reason: String)
    /// The image uses a feature this implementation does not support.
    case unsupported(path: String, feature: String)
    /// Another process holds a conflicting lock (QEMU's byte-range locking protocol).
    case locked(path: String, permission: String, shared: Bool)
    /// A write-type request on an image opened read-only.
    case readOnly(path: String)
    /// A request beyond the virtual size.
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    /// A bad argument from the caller (size, format name, option).
    case invalidArgument(String)
    /// A backing chain that loops or is absurdly deep.
    case backingChain(path: String, reason: String)
    /// The path names something that cannot hold an image (a FIFO, socket, character device
    /// or directory); `kind` says which ("a FIFO").
    case notAFile(path: String, kind: String)

    public var description: String {
        switch self {
        case .io(let p, let op, _, let m): return "Could not \(op) '\(p)': \(m)"
        case .invalidImage(let p, let r): return "Image '\(p)' is corrupt or not a valid image: \(r)"
        case .unsupported(let p, let f): return "Image '\(p)' uses an unsupported feature: \(f)"
        case .locked(let p, let perm, let shared):
            return "Failed to get \(shared ? "shared " : "")\"\(perm)\" lock\nIs another process using the image [\(p)]?"
        case .readOnly(let p): return "Image '\(p)' is read-only"
        case .outOfRange(let o, let l, let s): return "Request of \(l) bytes at offset \(o) is beyond the image size \(s)"
        case .invalidArgument(let m): return m
        case .backingChain(let p, let r): return "Backing chain of '\(p)': \(r)"
        case .notAFile(let p, let k): return "Could not open '\(p)': it is \(k), not a regular file or block device"
        }
    }
}
