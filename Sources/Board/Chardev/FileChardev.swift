import Foundation
import Machine
import Synchronization

/// Guest output written to a host file; there is no input.
///
/// The file is truncated when opened, or appended to with `append`. `write` is called on the
/// vCPU thread and writes straight to the file (a local file is not a peer that can stall).
public final class FileChardev: CharBackend, @unchecked Sendable {
    public let id: String
    /// The file being written.
    public let path: String
    private let fd = Mutex<Int32>(-1)

    /// Opens (creating with mode 0644 if needed) the file at `path`; throws when the host refuses.
    public init(id: String, path: String, append: Bool) throws {
        let flags = O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC)
        let f = open(path, flags, 0o644)
        guard f >= 0 else { throw ChardevError.system(what: "cannot open '\(path)' for serial output", errno: errno) }
        self.id = id
        self.path = path
        fd.withLock { $0 = f }
    }

    public var filename: String { "file:\(path)" }
    /// Always true: a file is always there to take output.
    public var isConnected: Bool { true }

    /// Appends guest output to the file. vCPU thread.
    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        fd.withLock { f in
            if f >= 0 { writeAll(f, bytes) }
        }
    }

    /// Files give no input; the receiver is never called.
    public func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) {}

    /// Closes the file. Idempotent; any thread.
    public func close() {
        fd.withLock { f in
            if f >= 0 { Glibc.close(f) }
            f = -1
        }
    }
}

/// An in-memory ring buffer chardev, QEMU's `ringbuf`: guest output accumulates in a buffer of
/// `size` bytes (the oldest bytes are overwritten when it is full), `read` takes it out, and
/// `inject` feeds input to the guest. Backs QMP `ringbuf-read` and `ringbuf-write`.
///
/// Any thread may call any method.
public final class RingbufChardev: CharBackend, @unchecked Sendable {
    public let id: String
    /// Capacity in bytes.
    public let size: Int
    private let state: Mutex<State>

    private struct State {
        var buffer: ByteQueue
        var overwritten: UInt64 = 0
        var receiver: (@Sendable ([UInt8]) -> Void)? = nil
    }

    /// Creates an empty ring of `size` bytes (at least 1).
    public init(id: String, size: Int = ChardevSpec.defaultRingbufSize) {
        self.id = id
        self.size = max(1, size)
        state = Mutex(State(buffer: ByteQueue(capacity: max(1, size))))
    }

    public var filename: String { "ringbuf" }
    /// Always true: the buffer always takes output.
    public var isConnected: Bool { true }
    /// Bytes currently buffered.
    public var count: Int { state.withLock { $0.buffer.count } }
    /// Output bytes lost because the ring was full and overwritten.
    public var overwrittenBytes: UInt64 { state.withLock { $0.overwritten } }

    /// Stores guest output, overwriting the oldest bytes when full. vCPU thread.
    public func write(_ bytes: UnsafeRawBufferPointer) {
        state.withLock { s in s.overwritten &+= UInt64(s.buffer.appendOverwriting(bytes)) }
    }

    /// Removes and returns up to `maxBytes` of the oldest buffered output.
    public func read(maxBytes: Int = .max) -> [UInt8] {
        state.withLock { $0.buffer.removeFirst(upTo: max(0, maxBytes)) }
    }

    /// Delivers `bytes` to the guest as if typed on the line; returns false when no device
    /// has installed a receiver (the bytes are dropped).
    @discardableResult
    public func inject(_ bytes: [UInt8]) -> Bool {
        guard let r = state.withLock({ $0.receiver }) else { return false }
        if !bytes.isEmpty { r(bytes) }
        return true
    }

    public func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) {
        state.withLock { $0.receiver = receiver }
    }

    /// Drops the buffered output. Idempotent.
    public func close() {
        state.withLock { $0.buffer.removeAll() }
    }
}
