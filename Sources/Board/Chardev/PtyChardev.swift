import Foundation
import Machine
import Synchronization

/// A pseudo-terminal, QEMU's `pty` chardev: the server holds the master side and a terminal
/// program (`screen /dev/pts/N`, `virsh console`, `minicom`) opens the slave, whose path
/// `query-chardev` reports as `pty:/dev/pts/N`.
///
/// The slave is put in raw mode once at creation (no echo, no line editing, no CR/LF
/// translation), as QEMU does, so guest output reaches the terminal byte for byte and is never
/// echoed back to the guest. While no program has the slave open the pty is disconnected:
/// guest output is dropped (counted in `droppedBytes`) instead of filling the terminal's
/// buffer. The I/O thread ("chardev ID") notices the slave being opened within
/// `reconnectPoll` and its last close at once.
///
/// `write` is called on the vCPU thread and never blocks: it tries one non-blocking write,
/// queues what the terminal did not take in a bounded buffer (`outputLimit` bytes, overflow
/// dropped and counted), and the I/O thread flushes the rest. Input is read only as fast as
/// the receiver's input gate allows, so keystrokes wait in the terminal rather than being lost.
public final class PtyChardev: CharBackend, Sendable {
    /// Bytes of output kept for a slow terminal before newer output is dropped.
    public static let outputLimit = 256 * 1024
    /// How often a disconnected pty checks whether its slave was opened (QEMU checks every second).
    public static let reconnectPoll: Int32 = 100

    public let id: String
    /// The slave's path (`/dev/pts/N`).
    public let slavePath: String

    private let master: Int32
    private let wake: WakePipe
    private let input: ChardevInput
    private let ended = ThreadExit()
    private let state = Mutex(State())

    private struct State {
        var connected = false
        var output = PendingOutput(capacity: PtyChardev.outputLimit)
        var closed = false
        var ioThreadID: pthread_t? = nil
    }

    /// Opens a new pseudo-terminal (posix_openpt, grantpt, unlockpt) and sets its slave raw.
    /// `announce` receives QEMU's line naming the slave ("char device redirected to
    /// /dev/pts/N (label ID)"; default: stderr). Throws when the host has no ptys left.
    public init(id: String, announce: @Sendable (String) -> Void = { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }) throws {
        guard let pt = PseudoTerminalCalls.shared else {
            throw ChardevError.system(what: "cannot find posix_openpt, grantpt, unlockpt and ptsname_r in the C library", errno: ENOSYS)
        }
        let m = pt.openpt(O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard m >= 0 else { throw ChardevError.system(what: "cannot open a pseudo-terminal (posix_openpt)", errno: errno) }
        func fail(_ what: String) -> ChardevError {
            let e = errno
            Glibc.close(m)
            return ChardevError.system(what: what, errno: e)
        }
        guard pt.grant(m) == 0 else { throw fail("cannot grant the pseudo-terminal (grantpt)") }
        guard pt.unlock(m) == 0 else { throw fail("cannot unlock the pseudo-terminal (unlockpt)") }
        var name = [CChar](repeating: 0, count: 128)
        guard pt.name(m, &name, name.count) == 0 else { throw fail("cannot name the pseudo-terminal (ptsname_r)") }
        let path = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // Raw mode lives in the terminal, which stays while the master is open: set it through
        // the slave once, then close the slave (the pty is disconnected until someone opens it).
        let s = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard s >= 0 else { throw fail("cannot open '\(path)'") }
        var t = termios()
        if tcgetattr(s, &t) == 0 {
            cfmakeraw(&t)
            _ = tcsetattr(s, TCSANOW, &t)
        }
        Glibc.close(s)
        setNonBlockingCloseOnExec(m)
        self.id = id
        self.master = m
        self.slavePath = path
        do { self.wake = try WakePipe() } catch {
            Glibc.close(m)
            throw error
        }
        self.input = ChardevInput(wake: wake)
        announce("char device redirected to \(path) (label \(id))")
        start()
    }

    /// QEMU's `query-chardev` filename: `pty:/dev/pts/N`.
    public var filename: String { "pty:\(slavePath)" }

    /// True while a program has the slave open.
    public var isConnected: Bool { state.withLock { $0.connected } }

    /// Output bytes lost so far (no terminal attached, or one too slow for the bounded buffer).
    public var droppedBytes: UInt64 { state.withLock { $0.output.dropped } }

    // Input is read only as fast as the gate allows: while it says 0 the keystrokes stay in
    // the terminal (backpressure, as in QEMU).
    public func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) { input.setReceiver(receiver) }
    public func setInputGate(_ room: @escaping @Sendable () -> Int) { input.setGate(room) }
    public func inputRoomAvailable() { input.roomAvailable() }

    /// Sends guest output; never blocks (see the type's documentation). vCPU thread.
    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        let needWake = state.withLock { s in
            s.output.write(bytes, peerPresent: s.connected && !s.closed) { Glibc.write(master, $0.baseAddress, $0.count) }
        }
        if needWake { wake.signal() }
    }

    /// Stops the I/O thread and closes the master (a program on the slave sees a hang-up).
    /// Idempotent; any thread.
    public func close() {
        let onIOThread = state.withLock { s -> Bool in
            s.closed = true
            return s.ioThreadID.map { pthread_equal($0, pthread_self()) != 0 } ?? false
        }
        wake.signal()
        if !onIOThread { ended.wait(timeout: 5) }
    }

    private func start() {
        startThread(named: "chardev \(id)") { [self] in
            state.withLock { $0.ioThreadID = pthread_self() }
            ioLoop()
            state.withLock { s in
                s.connected = false
                s.output.removeAll()
            }
            Glibc.close(master)
            ended.finish()
        }
    }

    /// True when a program has the slave open: the master reports POLLHUP while none does.
    private func slaveIsOpen() -> Bool {
        var p = pollfd(fd: master, events: Int16(POLLOUT), revents: 0)
        guard poll(&p, 1, 0) >= 0 else { return false }
        return p.revents & Int16(POLLHUP) == 0
    }

    private func ioLoop() {
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let (closed, connected, wantOut) = state.withLock { ($0.closed, $0.connected, !$0.output.isEmpty) }
            if closed { return }
            if !connected {
                var w = pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0)
                if poll(&w, 1, Self.reconnectPoll) > 0 { wake.drain() }
                if slaveIsOpen() {
                    state.withLock { s in
                        s.connected = true
                        s.output.removeAll()
                    }
                }
                continue
            }
            let room = input.room(limit: buf.count)
            // POLLHUP (the slave's last close) is reported whatever the events asked for.
            var fds = [pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: master, events: (room > 0 ? Int16(POLLIN) : 0) | (wantOut ? Int16(POLLOUT) : 0), revents: 0)]
            let rc = poll(&fds, 2, -1)
            if rc < 0 {
                if errno == EINTR { continue }
                return
            }
            if fds[0].revents != 0 { wake.drain() }
            let ev = fds[1].revents
            if ev & Int16(POLLOUT) != 0 { flush() }
            if room > 0 && ev & Int16(POLLIN) != 0 {
                let n = buf.withUnsafeMutableBytes { Glibc.read(master, $0.baseAddress, min($0.count, room)) }
                if n > 0 {
                    input.deliver(Array(buf[0..<n]))
                    continue
                }
            }
            if ev & Int16(POLLHUP | POLLERR) != 0 {
                state.withLock { s in
                    s.connected = false
                    s.output.removeAll()
                }
            }
        }
    }

    /// Writes out queued output while the terminal takes it (its hang-up is seen by `poll`).
    private func flush() {
        state.withLock { s in
            _ = s.output.flush { Glibc.write(master, $0.baseAddress, $0.count) }
        }
    }
}

/// The C library's pseudo-terminal calls. Glibc declares them only for _XOPEN_SOURCE, which
/// the Swift overlay does not define, so they are looked up by name once.
private struct PseudoTerminalCalls: @unchecked Sendable {
    let openpt: @convention(c) (Int32) -> Int32
    let grant: @convention(c) (Int32) -> Int32
    let unlock: @convention(c) (Int32) -> Int32
    let name: @convention(c) (Int32, UnsafeMutablePointer<CChar>?, Int) -> Int32

    static let shared: PseudoTerminalCalls? = {
        guard let libc = dlopen(nil, RTLD_NOW) else { return nil }
        func look<T>(_ symbol: String, _: T.Type) -> T? {
            guard let p = dlsym(libc, symbol) else { return nil }
            return unsafeBitCast(p, to: T.self)
        }
        guard let o = look("posix_openpt", (@convention(c) (Int32) -> Int32).self),
              let g = look("grantpt", (@convention(c) (Int32) -> Int32).self),
              let u = look("unlockpt", (@convention(c) (Int32) -> Int32).self),
              let n = look("ptsname_r", (@convention(c) (Int32, UnsafeMutablePointer<CChar>?, Int) -> Int32).self) else { return nil }
        return PseudoTerminalCalls(openpt: o, grant: g, unlock: u, name: n)
    }()
}
