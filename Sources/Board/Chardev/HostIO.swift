import Foundation
import Synchronization

/// A self-pipe that lets any thread interrupt a `poll` on a backend's I/O thread.
///
/// Both ends are non-blocking and close-on-exec. `signal` may be called from any thread;
/// `drain` only from the thread that polls `readFD`.
final class WakePipe: Sendable {
    /// The end to include in `poll` with `POLLIN`.
    let readFD: Int32
    private let writeFD: Int32

    init() throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw ChardevError.system(what: "cannot create a wake-up pipe", errno: errno)
        }
        for fd in fds { setNonBlockingCloseOnExec(fd) }
        readFD = fds[0]
        writeFD = fds[1]
    }

    deinit {
        Glibc.close(readFD)
        Glibc.close(writeFD)
    }

    /// Makes the next (or current) poll on `readFD` return. Never blocks.
    func signal() {
        var b: UInt8 = 1
        _ = Glibc.write(writeFD, &b, 1)
    }

    /// Empties the pipe after `poll` reported it readable.
    func drain() {
        var buf = [UInt8](repeating: 0, count: 64)
        while Glibc.read(readFD, &buf, buf.count) > 0 {}
    }
}

/// Something a backend thread signals when it ends, so `close()` can wait for it.
///
/// `finish` is called once by the ending thread; `wait` by whoever closes the backend.
final class ThreadExit: Sendable {
    private let done = DispatchSemaphore(value: 0)
    private let finished = Atomic<Bool>(false)

    /// Marks the thread as ended.
    func finish() {
        if !finished.exchange(true, ordering: .sequentiallyConsistent) { done.signal() }
    }

    /// Waits until `finish` was called or `timeout` seconds passed; true if it was.
    @discardableResult
    func wait(timeout: Double) -> Bool {
        if finished.load(ordering: .sequentiallyConsistent) { return true }
        let ok = done.wait(timeout: .now() + timeout) == .success
        if ok { done.signal() }  // let later waiters through too
        return ok
    }
}

/// Makes `fd` non-blocking and close-on-exec.
func setNonBlockingCloseOnExec(_ fd: Int32) {
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    _ = fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC)
}

/// Starts a host thread running `body`, named `name` (truncated to the 15 bytes Linux keeps)
/// so that it shows in `top -H` and debuggers. The name is set from inside the thread:
/// Foundation's `Thread.name` setter does not reliably name the new thread on Linux.
func startThread(named name: String, _ body: @escaping @Sendable () -> Void) {
    let t = Thread {
        setCurrentThreadName(name)
        body()
    }
    t.start()
}

/// Names the calling thread by writing `/proc/thread-self/comm` (Glibc's
/// `pthread_setname_np` is not visible to Swift); silently does nothing without /proc.
func setCurrentThreadName(_ name: String) {
    let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    Glibc.close(fd)
}

/// Writes all of `bytes` to a blocking descriptor, retrying on EINTR and partial writes.
/// Returns false when the descriptor reported an error (the rest is lost).
@discardableResult
func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
    var off = 0
    while off < bytes.count {
        let n = Glibc.write(fd, bytes.baseAddress! + off, bytes.count - off)
        if n < 0 {
            if errno == EINTR { continue }
            if errno == EAGAIN {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 100)
                continue
            }
            return false
        }
        off += n
    }
    return true
}

/// The input side of a backend whose I/O thread reads host input (pty, socket, stdio): where
/// the bytes go, how many the guest can take now (the gate, see `CharBackend.setInputGate`), and
/// the backend's wake-up pipe, signalled when either changes so the thread polls again.
final class ChardevInput: Sendable {
    private let wake: WakePipe
    private let state = Mutex<(receiver: (@Sendable ([UInt8]) -> Void)?, gate: (@Sendable () -> Int)?)>((nil, nil))

    init(wake: WakePipe) {
        self.wake = wake
    }

    func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) {
        state.withLock { $0.receiver = receiver }
    }

    func setGate(_ room: @escaping @Sendable () -> Int) {
        state.withLock { $0.gate = room }
        wake.signal()
    }

    /// The receiver has room again: the I/O thread asks the gate anew.
    func roomAvailable() { wake.signal() }

    /// How many bytes to read now: what the gate allows, at most `limit` (all of it with no gate).
    func room(limit: Int) -> Int {
        let gate = state.withLock { $0.gate }
        return min(limit, gate?() ?? limit)
    }

    /// Hands bytes read from the host to the receiver (dropped while there is none).
    func deliver(_ bytes: [UInt8]) {
        let receiver = state.withLock { $0.receiver }
        receiver?(bytes)
    }
}
