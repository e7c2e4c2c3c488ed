import Foundation
import Machine
import Synchronization

/// The guest's serial line on the server's own standard input and output.
///
/// When the input is a terminal it is put in raw mode (Ctrl-C reaches the guest) and QEMU's
/// escape keys work: Ctrl-A x quits the server, Ctrl-A h prints help, Ctrl-A Ctrl-A sends a
/// literal Ctrl-A. The terminal is restored by `close()`, at `exit()`, and when a fatal or
/// terminating signal kills the process. When the input is not a terminal it is read as is.
///
/// `write` (vCPU thread) only queues into a bounded buffer (`outputLimit`, overflow dropped and
/// counted); a writer thread ("chardev ID out") writes it out, and a reader thread
/// ("chardev ID in") delivers input to the receiver no faster than its input gate allows.
public final class StdioChardev: CharBackend, @unchecked Sendable {  // unchecked: `output`, `outputClosed` and `dropped` are guarded by `outputReady`, the rest by `state`
    /// Bytes of output queued for a slow terminal or pipe before newer output is dropped.
    public static let outputLimit = 1 << 20

    public let id: String
    /// True when the input is a terminal: raw mode and escape keys are active.
    public let isInteractive: Bool

    private let inputFD: Int32
    private let outputFD: Int32
    private let onQuitRequest: @Sendable () -> Void
    private let wake: WakePipe
    private let input: ChardevInput
    private let readerEnded = ThreadExit()
    private let writerEnded = ThreadExit()
    private let outputReady = NSCondition()
    private let state = Mutex(State())
    /// Guarded by `outputReady`.
    private var output = ByteQueue(capacity: StdioChardev.outputLimit)
    /// Guarded by `outputReady`.
    private var outputClosed = false
    /// Guarded by `outputReady`.
    private var dropped: UInt64 = 0

    private struct State {
        var closed = false
    }

    /// Attaches to the process's standard input (fd 0) and output (fd 1).
    /// `onQuitRequest` runs on the reader thread when the user types Ctrl-A x.
    public convenience init(id: String, onQuitRequest: @escaping @Sendable () -> Void) throws {
        try self.init(id: id, inputFD: 0, outputFD: 1, onQuitRequest: onQuitRequest)
    }

    /// Attaches to the given descriptors (tests use a pseudo-terminal or pipes). Raw mode and
    /// escape keys are enabled exactly when `inputFD` is a terminal. The descriptors are not
    /// closed by `close()`.
    public init(id: String, inputFD: Int32, outputFD: Int32, onQuitRequest: @escaping @Sendable () -> Void) throws {
        self.id = id
        self.inputFD = inputFD
        self.outputFD = outputFD
        self.onQuitRequest = onQuitRequest
        self.wake = try WakePipe()
        self.input = ChardevInput(wake: wake)
        self.isInteractive = isatty(inputFD) == 1
        if isInteractive { try TerminalGuard.engage(inputFD) }
        startThread(named: "chardev \(id) in") { [self] in
            readLoop()
            readerEnded.finish()
        }
        startThread(named: "chardev \(id) out") { [self] in
            writeLoop()
            writerEnded.finish()
        }
    }

    public var filename: String { "stdio" }
    /// Always true: standard output is always there.
    public var isConnected: Bool { true }

    /// Output bytes dropped because the output could not keep up.
    public var droppedBytes: UInt64 {
        outputReady.lock()
        defer { outputReady.unlock() }
        return dropped
    }

    // Input is read only as fast as the gate allows: while it says 0 the bytes stay in the
    // pipe or terminal, and a writer into a pipe blocks (backpressure, as in QEMU).
    public func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) { input.setReceiver(receiver) }
    public func setInputGate(_ room: @escaping @Sendable () -> Int) { input.setGate(room) }
    public func inputRoomAvailable() { input.roomAvailable() }

    /// Queues guest output; never blocks on the terminal. vCPU thread.
    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        outputReady.lock()
        if !outputClosed {
            dropped &+= UInt64(output.append(bytes))
            outputReady.signal()
        }
        outputReady.unlock()
    }

    /// Stops reading, writes out what is queued (waiting at most two seconds), and restores
    /// the terminal. Idempotent; any thread.
    public func close() {
        let first = state.withLock { s -> Bool in
            defer { s.closed = true }
            return !s.closed
        }
        guard first else { return }
        wake.signal()
        outputReady.lock()
        outputClosed = true
        outputReady.signal()
        outputReady.unlock()
        writerEnded.wait(timeout: 2)
        readerEnded.wait(timeout: 1)
        if isInteractive { TerminalGuard.restore() }
    }

    private func queueLocalText(_ text: String) {
        var t = text
        t.withUTF8 { write(UnsafeRawBufferPointer($0)) }
    }

    private func readLoop() {
        var buf = [UInt8](repeating: 0, count: 4096)
        var escape = EscapeDecoder()
        var inputOpen = true
        while !state.withLock({ $0.closed }) {
            // With no room for input, the input is not polled: it waits in the host until
            // `inputRoomAvailable` wakes this thread.
            let room = input.room(limit: buf.count)
            let watchInput = inputOpen && room > 0
            var fds = [pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: watchInput ? inputFD : -1, events: Int16(POLLIN), revents: 0)]
            let rc = poll(&fds, 2, -1)
            if rc < 0 {
                if errno == EINTR { continue }
                return
            }
            if fds[0].revents != 0 { wake.drain() }
            guard watchInput, fds[1].revents != 0 else { continue }
            let n = buf.withUnsafeMutableBytes { Glibc.read(inputFD, $0.baseAddress, min($0.count, room)) }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if n <= 0 {
                inputOpen = false  // end of input: keep serving output until closed
                continue
            }
            var forward = [UInt8]()
            forward.reserveCapacity(n)
            var quit = false
            if isInteractive {
                for b in buf[0..<n] {
                    switch escape.feed(b) {
                    case .forward(let c): forward.append(c)
                    case .nothing: break
                    case .help: queueLocalText(EscapeDecoder.helpText)
                    case .quit: quit = true
                    }
                }
            } else {
                forward.append(contentsOf: buf[0..<n])
            }
            if !forward.isEmpty { input.deliver(forward) }
            if quit {
                queueLocalText("machine-server: terminated by Ctrl-A x\r\n")
                onQuitRequest()
            }
        }
    }

    private func writeLoop() {
        while true {
            outputReady.lock()
            while output.isEmpty && !outputClosed { outputReady.wait() }
            if output.isEmpty && outputClosed {
                outputReady.unlock()
                return
            }
            let chunk = output.removeFirst(upTo: 65536)
            outputReady.unlock()
            chunk.withUnsafeBytes { _ = writeAll(outputFD, $0) }
        }
    }
}

/// QEMU's serial-console escape keys as a pure state machine (Ctrl-A is the escape).
///
/// Owned by the stdio reader thread.
struct EscapeDecoder {
    /// What one input byte amounts to.
    enum Action: Equatable {
        /// Send this byte to the guest.
        case forward(UInt8)
        /// Swallowed (the escape key itself, or an unknown escape command).
        case nothing
        /// Print the escape help.
        case help
        /// Quit the server.
        case quit
    }

    /// Ctrl-A.
    static let escapeByte: UInt8 = 0x01

    /// The text Ctrl-A h prints (CRLF line ends, since the terminal is raw).
    static let helpText = "\r\nC-a h    print this help\r\nC-a x    exit machine-server\r\nC-a C-a  send C-a to the guest\r\n"

    private var pending = false

    /// Consumes one input byte.
    mutating func feed(_ byte: UInt8) -> Action {
        if pending {
            pending = false
            switch byte {
            case Self.escapeByte: return .forward(Self.escapeByte)
            case UInt8(ascii: "x"), UInt8(ascii: "X"): return .quit
            case UInt8(ascii: "h"), UInt8(ascii: "H"), UInt8(ascii: "?"): return .help
            default: return .nothing
            }
        }
        if byte == Self.escapeByte {
            pending = true
            return .nothing
        }
        return .forward(byte)
    }
}

/// The saved terminal settings, kept where a signal handler can reach them.
///
/// Written only by `TerminalGuard.engage`/`restore` (serialised by `TerminalGuard.lock`) before
/// handlers that read them are installed; read by those handlers and the `atexit` hook.
/// Allocated once and never freed, like `previousActions`: AddressSanitizer reported the copy
/// into a `termios` held directly in a Swift global as a global-buffer-overflow.
nonisolated(unsafe) private let savedTerminal: UnsafeMutablePointer<termios> = {
    let p = UnsafeMutablePointer<termios>.allocate(capacity: 1)
    p.initialize(to: termios())
    return p
}()
nonisolated(unsafe) private var savedTerminalFD: Int32 = -1
/// The actions that were installed before ours, indexed by signal number (allocated once, never
/// freed, so a signal handler can read it without allocating).
nonisolated(unsafe) private let previousActions: UnsafeMutablePointer<sigaction> = {
    let p = UnsafeMutablePointer<sigaction>.allocate(capacity: 65)
    p.initialize(repeating: sigaction(), count: 65)
    return p
}()

/// Restores the terminal, puts back whatever handled the signal before (the default action, or
/// the Swift runtime's crash reporter) and raises it again so the process ends as it would have.
private let restoreTerminalOnSignal: @convention(c) (Int32) -> Void = { sig in
    if savedTerminalFD >= 0 { _ = tcsetattr(savedTerminalFD, TCSANOW, savedTerminal) }
    if sig > 0 && sig < 65 { sigaction(sig, previousActions + Int(sig), nil) }
    raise(sig)
}

/// Puts a terminal in raw mode and guarantees it is put back: on `restore`, at `exit`, and when
/// a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP) or a terminating signal
/// nobody else handles (SIGTERM, SIGHUP, SIGINT, SIGQUIT) ends the process.
enum TerminalGuard {
    /// Whether the atexit hook and the signal handlers are installed (once per process).
    private static let lock = Mutex<Bool>(false)

    /// Saves `fd`'s settings and switches it to raw mode (the same flags QEMU uses for stdio
    /// with signal=off). Any thread; only one terminal is guarded at a time.
    static func engage(_ fd: Int32) throws {
        try lock.withLock { atexitRegistered in
            var t = termios()
            guard tcgetattr(fd, &t) == 0 else {
                throw ChardevError.system(what: "cannot read the terminal settings of stdin", errno: errno)
            }
            savedTerminal.pointee = t
            savedTerminalFD = fd
            if !atexitRegistered {
                atexit { if savedTerminalFD >= 0 { _ = tcsetattr(savedTerminalFD, TCSANOW, savedTerminal) } }
                installSignalHandlers()
                atexitRegistered = true
            }
            t.c_iflag &= ~tcflag_t(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON)
            t.c_oflag |= tcflag_t(OPOST)
            t.c_lflag &= ~tcflag_t(ECHO | ECHONL | ICANON | IEXTEN | ISIG)
            t.c_cflag &= ~tcflag_t(CSIZE | PARENB)
            t.c_cflag |= tcflag_t(CS8)
            withUnsafeMutableBytes(of: &t.c_cc) { cc in
                cc[Int(VMIN)] = 1
                cc[Int(VTIME)] = 0
            }
            guard tcsetattr(fd, TCSANOW, &t) == 0 else {
                savedTerminalFD = -1
                throw ChardevError.system(what: "cannot put stdin in raw mode", errno: errno)
            }
        }
    }

    /// Puts the saved settings back. Idempotent; any thread.
    static func restore() {
        lock.withLock { _ in
            if savedTerminalFD >= 0 { _ = tcsetattr(savedTerminalFD, TCSANOW, savedTerminal) }
            savedTerminalFD = -1
        }
    }

    private static func installSignalHandlers() {
        let fatal = [SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP]
        let terminating = [SIGTERM, SIGHUP, SIGINT, SIGQUIT]
        for sig in fatal + terminating {
            var old = sigaction()
            sigaction(sig, nil, &old)
            let isDefault = unsafeBitCast(old.__sigaction_handler.sa_handler, to: Int.self) == 0
            // A terminating signal that someone already handles (machine-server turns SIGTERM
            // into an orderly shutdown) is left alone: that path closes this backend.
            if terminating.contains(sig) && !isDefault { continue }
            previousActions[Int(sig)] = old
            var sa = sigaction()
            sa.__sigaction_handler.sa_handler = restoreTerminalOnSignal
            sigemptyset(&sa.sa_mask)
            sa.sa_flags = Int32(SA_NODEFER)
            sigaction(sig, &sa, nil)
        }
    }
}
