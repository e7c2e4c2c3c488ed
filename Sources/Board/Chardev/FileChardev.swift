import Foundation
import Machine
import Synchronization

/// Guest output written to a host file; there is no input.
///
/// The file is truncated when opened, or appended to with `append`. `write` is called on the
/// vCPU thread and writes straight to the file (a local file is not a peer that can stall).
/// The path must be a regular file or a character device (`/dev/null`); it is opened
/// non-blocking and checked with fstat first, so a FIFO is refused instead of blocking the
/// launch in open. A write error (a full disk, `/dev/full`) is reported once through
/// `report` and the machine keeps running; output that could not be written is counted in
/// `droppedBytes`.
public final class FileChardev: CharBackend, Sendable {
    public let id: String
    /// The file being written.
    public let path: String
    private let state = Mutex(State())
    private let report: @Sendable (String) -> Void

    private struct State {
        var fd: Int32 = -1
        var dropped: UInt64 = 0
        var reported = false
    }

    /// Writes `message` and a newline to the server's stderr: the default error reporter.
    public static let reportToStderr: @Sendable (String) -> Void = { message in
        let line = Array("machine-server: \(message)\n".utf8)
        line.withUnsafeBytes { _ = writeAll(2, $0) }
    }

    /// Opens (creating with mode 0644 if needed) the file at `path`; throws when the host
    /// refuses or the path is not a regular file, a character device or a FIFO with a reader. `report` receives the
    /// one message about a failed write (default: stderr).
    public init(id: String, path: String, append: Bool,
                report: @escaping @Sendable (String) -> Void = FileChardev.reportToStderr) throws {
        let flags = O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (append ? O_APPEND : O_TRUNC)
        let f = open(path, flags, 0o644)
        guard f >= 0 else {
            if errno == ENXIO {
                throw ChardevError.invalidSpec(spec: "file:\(path)", reason: "'\(path)' is a FIFO (or a device) with nothing reading it; serial output needs a regular file")
            }
            throw ChardevError.system(what: "cannot open '\(path)' for serial output", errno: errno)
        }
        var st = stat()
        guard fstat(f, &st) == 0 else {
            let e = errno
            Glibc.close(f)
            throw ChardevError.system(what: "cannot stat '\(path)'", errno: e)
        }
        let kind = st.st_mode & S_IFMT
        // A FIFO opened here has a reader (the non-blocking open fails otherwise): libvirt hands
        // a serial log over as a pipe to its virtlogd. Like a file on a slow disk, a reader that
        // stops reading holds up the writes.
        guard kind == S_IFREG || kind == S_IFCHR || kind == S_IFIFO else {
            Glibc.close(f)
            let what = kind == S_IFIFO ? "a FIFO" : kind == S_IFSOCK ? "a socket" : kind == S_IFBLK ? "a block device" : "not a regular file"
            throw ChardevError.invalidSpec(spec: "file:\(path)", reason: "'\(path)' is \(what); serial output needs a regular file or a character device")
        }
        // Writes are meant to complete (see the type's documentation): back to blocking mode.
        _ = fcntl(f, F_SETFL, fcntl(f, F_GETFL) & ~O_NONBLOCK)
        self.id = id
        self.path = path
        self.report = report
        state.withLock { $0.fd = f }
    }

    public var filename: String { "file:\(path)" }
    /// Always true: a file is always there to take output.
    public var isConnected: Bool { true }
    /// Output bytes that could not be written (after a write error).
    public var droppedBytes: UInt64 { state.withLock { $0.dropped } }

    /// Appends guest output to the file. vCPU thread.
    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        let failure = state.withLock { s -> Int32? in
            guard s.fd >= 0 else { return nil }
            var off = 0
            while off < bytes.count {
                let n = Glibc.write(s.fd, bytes.baseAddress! + off, bytes.count - off)
                if n < 0 {
                    if errno == EINTR { continue }
                    let e = errno
                    s.dropped &+= UInt64(bytes.count - off)
                    if s.reported { return nil }
                    s.reported = true
                    return e
                }
                off += n
            }
            return nil
        }
        if let failure {
            report("\(id): cannot write serial output to '\(path)': \(String(cString: strerror(failure))); output that cannot be written is dropped (reported once)")
        }
    }

    /// Files give no input; the receiver is never called.
    public func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) {}

    /// Closes the file. Idempotent; any thread.
    public func close() {
        state.withLock { s in
            if s.fd >= 0 { Glibc.close(s.fd) }
            s.fd = -1
        }
    }
}

/// An in-memory ring buffer chardev, QEMU's `ringbuf`: guest output accumulates in a buffer of
/// `size` bytes (the oldest bytes are overwritten when it is full), `read` takes it out, and
/// `inject` feeds input to the guest. Backs QMP `ringbuf-read` and `ringbuf-write`.
///
/// Injected input waits in a bounded queue (`inputLimit`) and reaches the guest only as fast as
/// the receiver's input gate allows (the UART's receive queue), so none of it is dropped; an
/// injection that does not fit beside what the guest has not yet taken is refused whole.
///
/// Any thread may call any method.
public final class RingbufChardev: CharBackend, Sendable {
    /// Input bytes waiting for the guest before `inject` refuses more.
    public static let inputLimit = 1 << 20

    public let id: String
    /// Capacity in bytes.
    public let size: Int
    private let state: Mutex<State>
    /// Held while input moves from the queue to the receiver, so that two threads delivering
    /// at once (QMP's and a vCPU's draining the UART) cannot reorder it.
    private let delivery = Mutex(())

    private struct State {
        var buffer: ByteQueue
        var overwritten: UInt64 = 0
        var receiver: (@Sendable ([UInt8]) -> Void)? = nil
        var inputGate: (@Sendable () -> Int)? = nil
        var input = ByteQueue(capacity: RingbufChardev.inputLimit)
    }

    /// Why `inject` refused input.
    public enum InjectError: Error, Equatable {
        /// No device reads this chardev.
        case noReceiver
        /// `bytes` do not fit beside the `waiting` bytes the guest has not taken yet.
        case inputQueueFull(bytes: Int, waiting: Int)
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
    /// Injected bytes the guest has not taken yet.
    public var pendingInputBytes: Int { state.withLock { $0.input.count } }

    /// Stores guest output, overwriting the oldest bytes when full. vCPU thread.
    public func write(_ bytes: UnsafeRawBufferPointer) {
        state.withLock { s in s.overwritten &+= UInt64(s.buffer.appendOverwriting(bytes)) }
    }

    /// Removes and returns up to `maxBytes` of the oldest buffered output.
    public func read(maxBytes: Int = .max) -> [UInt8] {
        state.withLock { $0.buffer.removeFirst(upTo: max(0, maxBytes)) }
    }

    /// Queues `bytes` for the guest, as if typed on the line, and delivers what the receiver
    /// has room for now; the rest follows as the guest reads. All or nothing.
    public func inject(_ bytes: [UInt8]) throws(InjectError) {
        let queued = state.withLock { s -> InjectError? in
            guard s.receiver != nil else { return .noReceiver }
            guard bytes.count <= Self.inputLimit - s.input.count else {
                return .inputQueueFull(bytes: bytes.count, waiting: s.input.count)
            }
            _ = bytes.withUnsafeBytes { s.input.append($0) }
            return nil
        }
        if let queued { throw queued }
        deliver()
    }

    public func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) {
        state.withLock { $0.receiver = receiver }
        deliver()
    }

    /// Input moves to the receiver no faster than `room` says it can take it.
    public func setInputGate(_ room: @escaping @Sendable () -> Int) {
        state.withLock { $0.inputGate = room }
        deliver()
    }

    /// The receiver has room again: delivers more of the queued input. Any thread.
    public func inputRoomAvailable() { deliver() }

    /// Drops the buffered output and any input the guest has not taken. Idempotent.
    public func close() {
        state.withLock {
            $0.buffer.removeAll()
            $0.input.removeAll()
        }
    }

    private func deliver() {
        delivery.withLock { _ in
            while true {
                let (chunk, receiver) = state.withLock { s -> ([UInt8], (@Sendable ([UInt8]) -> Void)?) in
                    guard let r = s.receiver, s.input.count > 0 else { return ([], nil) }
                    let room = s.inputGate?() ?? s.input.count
                    return (s.input.removeFirst(upTo: max(0, room)), r)
                }
                guard let receiver, !chunk.isEmpty else { return }
                receiver(chunk)
            }
        }
    }
}
