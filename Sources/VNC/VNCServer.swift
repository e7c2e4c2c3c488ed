import CVNCServer
import Foundation
import Logging
import Machine
import Synchronization

/// How the VNC server listens and authenticates. Plain data; defaults are safe (localhost only).
public struct VNCConfiguration: Sendable, Equatable {
    /// "HOST:PORT" for RFB viewers. `[v6addr]:PORT` for IPv6; an empty host means every
    /// interface; port 0 picks a free port (see `VNCServer.port`). Viewers speaking WebSocket
    /// (noVNC) are recognised on this port too: libvncserver sniffs the first bytes.
    public var listen: String
    /// An extra "HOST:PORT" listener meant for noVNC (QEMU's `websocket=`); nil for none.
    /// Any client, WebSocket or plain RFB, is accepted on it.
    public var websocket: String?
    /// Whether viewers must give the VNC password (QEMU's `password=on`). With no password set
    /// yet, nobody can log in until `setPassword` is called.
    public var passwordRequired: Bool
    /// The desktop name viewers show.
    public var desktopName: String

    /// Creates a configuration.
    public init(listen: String = "127.0.0.1:5900", websocket: String? = nil, passwordRequired: Bool = false,
                desktopName: String = "machine-server") {
        self.listen = listen
        self.websocket = websocket
        self.passwordRequired = passwordRequired
        self.desktopName = desktopName
    }
}

/// Errors of the VNC server, each naming what is wrong.
public enum VNCError: Error, CustomStringConvertible, Equatable {
    case badAddress(String, reason: String)
    case cannotListen(String, reason: String)
    case passwordAuthDisabled
    case cannotStart(reason: String)

    public var description: String {
        switch self {
        case .badAddress(let a, let r): return "invalid VNC listen address '\(a)': \(r) (expected HOST:PORT)"
        case .cannotListen(let a, let r): return "cannot listen for VNC on '\(a)': \(r)"
        case .passwordAuthDisabled:
            return "could not set password: VNC password authentication is not enabled (start with password required)"
        case .cannotStart(let r): return "cannot start the VNC server: \(r)"
        }
    }
}

/// A viewer connection event, as QMP's VNC_CONNECTED / VNC_INITIALIZED / VNC_DISCONNECTED report.
public enum VNCClientEvent: Sendable, Equatable {
    case connected(RemoteDisplayInfo.Client)
    case initialized(RemoteDisplayInfo.Client)
    case disconnected(RemoteDisplayInfo.Client)
}

/// The built-in VNC server: shows a `Display` to any number of RFB viewers (and noVNC over
/// WebSocket) and forwards their keyboard and pointer to the display's input devices.
///
/// libvncserver runs entirely on one event thread that this class owns: it accepts viewers,
/// copies the rectangles the GPU reported dirty into its framebuffer (no whole-frame comparing),
/// encodes and sends updates, and resizes the viewers' desktops when the guest changes mode.
/// Display callbacks arrive on the vCPU thread and only queue work. Public methods are
/// thread-safe.
public final class VNCServer: RemoteDisplayServer, DisplayListener, @unchecked Sendable {  // unchecked: the libvncserver vars are touched only on the event thread after `start`; shared state is in `shared`
    /// The display shown.
    public let display: Display
    /// The configuration it was created with.
    public let configuration: VNCConfiguration
    /// The TCP port the RFB listener is bound to (the real one when configured with port 0).
    public let port: Int
    /// The port of the extra WebSocket listener, if configured.
    public let websocketPort: Int?

    private let logger: Logger
    private let listeners: [Listener]

    // Cross-thread state.
    private struct Shared {
        var surfaceChanged = false
        var surface: DisplaySurface?
        var dirty: [DisplayRect] = []
        var password: [CChar]? = nil
        var passwordExpiry: Date? = nil
        var clients: [Int: RemoteDisplayInfo.Client] = [:]
        var observer: (@Sendable (VNCClientEvent) -> Void)?
        var running = false
    }
    private let shared = Mutex(Shared())
    private let stopRequested = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)

    // Event-thread state (touched only on the event thread after `start`).
    private var screen: rfbScreenInfoPtr?
    private var framebuffer: UnsafeMutableRawPointer?
    /// The desktop name as libvncserver holds it (its pointer, freed with the screen).
    private var desktopName: UnsafeMutablePointer<CChar>?
    private var fbWidth = 0
    private var fbHeight = 0
    private var fbFormat = PixelFormat.r8g8b8x8
    private var clientStates: [Int: ClientState] = [:]
    /// Accepted connections not yet handed to libvncserver (see `admitPendingViewers`).
    private var pendingViewers: [PendingViewer] = []

    private final class ClientState {
        var keys = KeyMapper()
        var pointer = PointerMapper()
        var info: RemoteDisplayInfo.Client
        var initialized = false
        /// Since when the client's next message has been incomplete (nil: it is not).
        var partialSince: DispatchTime?
        init(info: RemoteDisplayInfo.Client) { self.info = info }
    }

    private struct PendingViewer {
        var fd: Int32
        var accepted: DispatchTime
    }

    /// How long a plain RFB viewer stays silent before it is handed to libvncserver (it waits
    /// for the server's greeting; a WebSocket client speaks first).
    static let silentViewerDelay: UInt64 = 150_000_000
    /// How long a connection may take to send its first complete message (the WebSocket
    /// request, or the rest of a message it started) before it is closed.
    static let stalledClientTimeout: UInt64 = 10_000_000_000
    /// libvncserver's limit for one blocking read or write on a client (ms); the default is
    /// 20 s. Writes to a viewer that stops reading can still hold the event thread this long
    /// (select granularity is 5 s) before the viewer is dropped.
    static let maxClientWaitMilliseconds: Int32 = 5000

    private struct Listener {
        var fd: Int32
        var host: String
        var port: Int
        var family: String
    }

    /// Binds the listening sockets (so address errors surface here) without serving yet.
    public init(display: Display, configuration: VNCConfiguration = VNCConfiguration(),
                logger: Logger = Logger(label: "vnc")) throws {
        self.display = display
        self.configuration = configuration
        self.logger = logger
        var ls: [Listener] = []
        do {
            ls.append(try Self.listen(on: configuration.listen))
            if let ws = configuration.websocket { ls.append(try Self.listen(on: ws)) }
        } catch {
            for l in ls { close(l.fd) }
            throw error
        }
        listeners = ls
        port = ls[0].port
        websocketPort = configuration.websocket == nil ? nil : ls[1].port
    }

    deinit {
        stop()
        for l in listeners { close(l.fd) }
    }

    /// Registers the function told about viewers connecting, finishing the handshake and leaving.
    /// Called on the event thread; must not block.
    public func setClientObserver(_ observer: (@Sendable (VNCClientEvent) -> Void)?) {
        shared.withLock { $0.observer = observer }
    }

    /// Starts the event thread and subscribes to the display. Calling it twice does nothing.
    public func start() throws {
        let already = shared.withLock { s -> Bool in
            if s.running { return true }
            s.running = true
            return false
        }
        if already { return }
        try setUpScreen()
        display.addListener(self)
        displaySurfaceChanged(display.surface)
        let t = Thread { [self] in eventLoop() }
        t.name = "vnc"
        t.start()
        logger.info("VNC server listening on \(configuration.listen) (port \(port))")
    }

    /// Disconnects every viewer and stops the event thread; returns once it has stopped.
    public func stop() {
        let wasRunning = shared.withLock { s -> Bool in
            let r = s.running
            s.running = false
            return r
        }
        guard wasRunning else { return }
        display.removeListener(self)
        stopRequested.store(true, ordering: .sequentiallyConsistent)
        if finished.wait(timeout: .now() + 10) == .timedOut {
            // Never let shutdown hang on the event thread (it keeps this object alive).
            logger.warning("the VNC event thread did not stop within 10 s; leaving it behind")
        }
    }

    // MARK: RemoteDisplayServer

    /// What `query-vnc` reports: the RFB listener and the viewers past their TCP connect.
    public func info() -> RemoteDisplayInfo {
        let l = listeners[0]
        let clients = shared.withLock { s in s.clients.sorted { $0.key < $1.key }.map(\.value) }
        return RemoteDisplayInfo(enabled: true, host: l.host, service: String(l.port), family: l.family,
                                 auth: configuration.passwordRequired ? "vnc" : "none", clients: clients)
    }

    /// Sets the VNC password (its first 8 bytes count, as in every VNC server); clears any expiry.
    public func setPassword(_ password: String) throws {
        guard configuration.passwordRequired else { throw VNCError.passwordAuthDisabled }
        let bytes = Array(password.utf8.prefix(8)).map { CChar(bitPattern: $0) } + [0]
        shared.withLock {
            $0.password = bytes
            $0.passwordExpiry = nil
        }
    }

    /// From `date` on, logins with the password fail (nil: it never expires).
    public func expirePassword(at date: Date?) throws {
        guard configuration.passwordRequired else { throw VNCError.passwordAuthDisabled }
        shared.withLock { $0.passwordExpiry = date }
    }

    /// Parses QEMU's `expire_password` time: "now", "never", "+SECONDS" or absolute UNIX seconds.
    /// Returns `.some(nil)` for never; nil when the text is none of those.
    public static func parseExpiry(_ text: String, now: Date = Date()) -> Date?? {
        switch text {
        case "now": return .some(now)
        case "never": return .some(nil)
        default:
            if text.hasPrefix("+"), let s = UInt64(text.dropFirst()) { return .some(now + TimeInterval(s)) }
            if let s = UInt64(text) { return .some(Date(timeIntervalSince1970: TimeInterval(s))) }
            return nil
        }
    }

    // MARK: DisplayListener (vCPU thread: queue only)

    /// Queues a mode change for the event thread.
    public func displaySurfaceChanged(_ surface: DisplaySurface?) {
        shared.withLock { s in
            s.surfaceChanged = true
            s.surface = surface
            s.dirty.removeAll()
        }
    }

    /// Queues a dirty rectangle for the event thread (merged into one when too many pile up).
    public func displayRegionUpdated(_ rect: DisplayRect) {
        shared.withLock { s in
            if s.dirty.count >= 128 {
                let all = s.dirty.reduce(rect) { $0.union($1) }
                s.dirty = [all]
            } else {
                s.dirty.append(rect)
            }
        }
    }

    // MARK: Event thread

    private func setUpScreen() throws {
        rfbLogEnable(0)
        let w = display.surface?.width ?? display.preferredWidth
        let h = display.surface?.height ?? display.preferredHeight
        var argc: Int32 = 0
        guard let scr = rfbGetScreen(&argc, nil, Int32(w), Int32(h), 8, 3, 4) else {
            throw VNCError.cannotStart(reason: "rfbGetScreen failed")
        }
        guard let fb = calloc(w * h, 4) else {
            rfbScreenCleanup(scr)
            throw VNCError.cannotStart(reason: "out of memory for a \(w)x\(h) framebuffer")
        }
        framebuffer = fb
        fbWidth = w
        fbHeight = h
        fbFormat = Self.pixelFormat(of: scr.pointee.serverFormat)
        scr.pointee.frameBuffer = fb.assumingMemoryBound(to: CChar.self)
        scr.pointee.port = 0
        scr.pointee.ipv6port = 0
        scr.pointee.autoPort = 0
        scr.pointee.alwaysShared = 1
        scr.pointee.maxClientWait = Self.maxClientWaitMilliseconds
        // No server-drawn cursor: libvncserver would paint it into the framebuffer and later
        // restore stale pixels from under it over what the guest drew meanwhile.
        scr.pointee.cursor = nil
        scr.pointee.screenData = Unmanaged.passUnretained(self).toOpaque()
        desktopName = strdup(configuration.desktopName)
        scr.pointee.desktopName = UnsafePointer(desktopName)
        scr.pointee.kbdAddEvent = { down, keysym, cl in
            guard let cl, let server = VNCServer.owner(of: cl) else { return }
            server.keyEvent(client: cl, keysym: UInt32(truncatingIfNeeded: keysym), down: down != 0)
        }
        scr.pointee.ptrAddEvent = { mask, x, y, cl in
            guard let cl, let server = VNCServer.owner(of: cl) else { return }
            server.pointerEvent(client: cl, mask: UInt8(truncatingIfNeeded: mask), x: Int(x), y: Int(y))
        }
        scr.pointee.newClientHook = { cl in
            guard let cl, let server = VNCServer.owner(of: cl) else { return RFB_CLIENT_REFUSE }
            server.clientConnected(cl)
            return RFB_CLIENT_ACCEPT
        }
        if configuration.passwordRequired {
            scr.pointee.authPasswdData = Unmanaged.passUnretained(self).toOpaque()
            scr.pointee.passwordCheck = { cl, response, len in
                guard let cl, let response, let server = VNCServer.owner(of: cl) else { return 0 }
                return server.checkPassword(client: cl, response: response, length: Int(len)) ? 1 : 0
            }
        }
        rfbInitServerWithPthreadsAndZRLE(scr)  // what rfb.h's rfbInitServer macro names on this build
        screen = scr
    }

    /// The libvncserver pixel format as one of ours (32 bpp true colour, 8 bits a channel).
    private static func pixelFormat(of f: rfbPixelFormat) -> PixelFormat {
        switch (f.redShift, f.greenShift, f.blueShift) {
        case (16, 8, 0): return .b8g8r8x8
        case (24, 16, 8): return .x8r8g8b8
        case (8, 16, 24): return .x8b8g8r8
        default: return .r8g8b8x8
        }
    }

    fileprivate static func owner(of cl: rfbClientPtr) -> VNCServer? {
        guard let data = cl.pointee.screen?.pointee.screenData else { return nil }
        return Unmanaged<VNCServer>.fromOpaque(data).takeUnretainedValue()
    }

    private func eventLoop() {
        guard let scr = screen else { return }
        while !stopRequested.load(ordering: .sequentiallyConsistent) {
            applyDisplayChanges(scr)
            holdIncompleteClients(scr)
            rfbProcessEvents(scr, 10_000)
            acceptViewers(scr)
            admitPendingViewers(scr)
            noticeInitializedClients(scr)
        }
        for p in pendingViewers { close(p.fd) }
        pendingViewers = []
        rfbShutdownServer(scr, 1)
        rfbScreenCleanup(scr)
        screen = nil
        free(framebuffer)
        framebuffer = nil
        free(desktopName)
        desktopName = nil
        stopRequested.store(false, ordering: .sequentiallyConsistent)
        finished.signal()
    }

    private func applyDisplayChanges(_ scr: rfbScreenInfoPtr) {
        let (changed, surface, dirty) = shared.withLock { s -> (Bool, DisplaySurface?, [DisplayRect]) in
            let r = (s.surfaceChanged, s.surface, s.dirty)
            s.surfaceChanged = false
            s.dirty.removeAll(keepingCapacity: true)
            return r
        }
        guard let fb = framebuffer else { return }
        if changed {
            if let surface, surface.width != fbWidth || surface.height != fbHeight {
                resize(scr, width: surface.width, height: surface.height)
            }
            guard let fb = framebuffer else { return }
            let full = DisplayRect(x: 0, y: 0, width: fbWidth, height: fbHeight)
            if let surface {
                surface.copy(full, to: fb, destinationStride: fbWidth * 4, destinationFormat: fbFormat)
            } else {
                memset(fb, 0, fbWidth * fbHeight * 4)
            }
            rfbMarkRectAsModified(scr, 0, 0, Int32(fbWidth), Int32(fbHeight))
            return
        }
        guard let surface, surface.width == fbWidth, surface.height == fbHeight else { return }
        for r in dirty {
            let c = r.clipped(width: fbWidth, height: fbHeight)
            if c.isEmpty { continue }
            surface.copy(c, to: fb, destinationStride: fbWidth * 4, destinationFormat: fbFormat)
            rfbMarkRectAsModified(scr, Int32(c.x), Int32(c.y), Int32(c.x + c.width), Int32(c.y + c.height))
        }
    }

    private func resize(_ scr: rfbScreenInfoPtr, width: Int, height: Int) {
        guard let fb = calloc(width * height, 4) else {
            logger.error("VNC: out of memory for a \(width)x\(height) framebuffer; keeping \(fbWidth)x\(fbHeight)")
            return
        }
        rfbNewFramebuffer(scr, fb.assumingMemoryBound(to: CChar.self), Int32(width), Int32(height), 8, 3, 4)
        fbFormat = Self.pixelFormat(of: scr.pointee.serverFormat)
        free(framebuffer)
        framebuffer = fb
        fbWidth = width
        fbHeight = height
        logger.debug("VNC desktop resized to \(width)x\(height)")
    }

    private func acceptViewers(_ scr: rfbScreenInfoPtr) {
        for l in listeners {
            while true {
                let fd = accept(l.fd, nil, nil)
                if fd < 0 { break }
                _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                pendingViewers.append(PendingViewer(fd: fd, accepted: .now()))
            }
        }
    }

    /// Bytes waiting in a socket's receive queue (FIONREAD).
    private static func available(_ fd: Int32) -> Int {
        var n: Int32 = 0
        return ioctl(fd, UInt(FIONREAD), &n) == 0 ? Int(n) : 0
    }

    /// Copies up to `count` waiting bytes without consuming them.
    private static func peek(_ fd: Int32, _ count: Int) -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: count)
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) }
        return n > 0 ? Array(buf[0..<n]) : []
    }

    /// True when the peer closed its side or at least stopped sending (POLLRDHUP: no more
    /// bytes will come, so an incomplete message never completes).
    private static func peerClosed(_ fd: Int32) -> Bool {
        let pollRDHUP: Int16 = 0x2000  // Linux POLLRDHUP (a _GNU_SOURCE name Glibc's module omits)
        var pfd = pollfd(fd: fd, events: Int16(POLLIN) | pollRDHUP, revents: 0)
        guard poll(&pfd, 1, 0) == 1 else { return false }
        if pfd.revents & (Int16(POLLERR | POLLNVAL | POLLHUP) | pollRDHUP) != 0 { return true }
        var b: UInt8 = 0
        return recv(fd, &b, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) == 0
    }

    /// Hands accepted connections to libvncserver only when its handshake check
    /// (`webSocketsCheck` in `rfbNewClient`, which peeks at 4 bytes with blocking reads and
    /// spins forever on a client that sent 1 to 3 bytes) cannot block: after 150 ms of silence
    /// (a plain RFB viewer, which waits for the server to speak first), or once a WebSocket
    /// request's headers are complete. A connection that sends a few bytes and goes quiet is
    /// closed after 10 s without ever reaching libvncserver. Event thread.
    private func admitPendingViewers(_ scr: rfbScreenInfoPtr) {
        guard !pendingViewers.isEmpty else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        var keep: [PendingViewer] = []
        for p in pendingViewers {
            let age = now - p.accepted.uptimeNanoseconds
            let waiting = Self.available(p.fd)
            var admit = false
            var drop = false
            if waiting < 4 && Self.peerClosed(p.fd) {
                drop = true  // gone, or stopped sending before a complete first message
            } else if waiting == 0 {
                admit = age >= Self.silentViewerDelay
            } else if waiting >= 4 {
                let head = Self.peek(p.fd, min(waiting, 8192))
                if head.starts(with: Array("GET ".utf8)) {
                    // The WebSocket handshake reads the request line by line: wait for all of it.
                    let complete = head.count >= 4 && (0...(head.count - 4)).contains { i in
                        head[i] == 13 && head[i + 1] == 10 && head[i + 2] == 13 && head[i + 3] == 10
                    }
                    admit = complete
                    drop = !complete && (head.count >= 8192 || Self.peerClosed(p.fd))
                } else if head.first == 0x16 || head.first == 0x80 {
                    drop = true  // TLS (wss): not configured
                } else {
                    admit = true  // "RFB " or garbage: libvncserver decides without blocking
                }
            }
            if !admit && !drop && age >= Self.stalledClientTimeout { drop = true }
            if drop {
                close(p.fd)
            } else if admit {
                // With SO_RCVLOWAT 4, select() in libvncserver's 4-byte peek stays quiet until 4
                // bytes arrive, so bytes trickling in during its 100 ms wait cannot make it spin.
                var lowat: Int32 = 4
                setsockopt(p.fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, socklen_t(MemoryLayout<Int32>.size))
                let cl = rfbNewClient(scr, p.fd)
                if cl != nil {
                    lowat = 1
                    setsockopt(p.fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, socklen_t(MemoryLayout<Int32>.size))
                }
            } else {
                keep.append(p)
            }
        }
        pendingViewers = keep
    }

    /// The bytes libvncserver will read at once for the client's next message, judged from
    /// what is waiting on the socket; nil when that cannot be told (libvncserver then decides).
    /// Only message types whose length is certain are measured.
    private static func nextMessageLength(state: Int, head: [UInt8]) -> Int? {
        switch state {
        case Int(RFB_PROTOCOL_VERSION): return 12
        case Int(RFB_SECURITY_TYPE): return 1
        case Int(RFB_AUTHENTICATION): return 16
        case Int(RFB_INITIALISATION): return 1
        case Int(RFB_NORMAL):
            guard let type = head.first else { return 1 }
            func u16(_ o: Int) -> Int? { head.count >= o + 2 ? Int(head[o]) << 8 | Int(head[o + 1]) : nil }
            func u32(_ o: Int) -> Int? {
                head.count >= o + 4 ? (0..<4).reduce(0) { $0 << 8 | Int(head[o + $1]) } : nil
            }
            switch Int32(type) {
            case rfbSetPixelFormat: return 20
            case rfbSetEncodings: return u16(2).map { 4 + 4 * $0 } ?? 4
            case rfbFramebufferUpdateRequest: return 10
            case rfbKeyEvent: return 8
            case rfbPointerEvent: return 6
            case rfbClientCutText:
                // The length is signed: negative for the extended clipboard format.
                guard let raw = u32(4) else { return 8 }
                let length = Int(Int32(bitPattern: UInt32(raw))).magnitude
                return 8 + Int(min(length, 1 << 24))
            default: return nil
            }
        default: return nil
        }
    }

    /// Adds `fd` to (`held` false) or removes it from (`held` true) an fd_set, as FD_SET and
    /// FD_CLR do (the macros are not visible to Swift).
    private static func setSelected(_ fd: Int32, _ held: Bool, in set: inout fd_set) {
        guard fd >= 0 && fd < Int32(FD_SETSIZE) else { return }
        withUnsafeMutableBytes(of: &set) { raw in
            let words = raw.bindMemory(to: UInt.self)
            let bits = UInt.bitWidth
            let bit = UInt(1) << UInt(Int(fd) % bits)
            if held { words[Int(fd) / bits] &= ~bit } else { words[Int(fd) / bits] |= bit }
        }
    }

    /// The length of the WebSocket frame at the start of `head`, or nil while its header is
    /// incomplete.
    private static func webSocketFrameLength(_ head: [UInt8]) -> Int? {
        guard head.count >= 2 else { return nil }
        let masked = head[1] & 0x80 != 0
        var length = Int(head[1] & 0x7f)
        var header = 2
        if length == 126 {
            guard head.count >= 4 else { return nil }
            length = Int(head[2]) << 8 | Int(head[3])
            header = 4
        } else if length == 127 {
            guard head.count >= 10 else { return nil }
            length = Int(min((2...9).reduce(UInt64(0)) { $0 << 8 | UInt64(head[$1]) }, 1 << 24))
            header = 10
        }
        return header + (masked ? 4 : 0) + length
    }

    /// Lets libvncserver look only at clients whose next message has fully arrived (or that
    /// closed): every other client's socket is kept out of its select set and put on hold
    /// (`onHold`), so libvncserver's blocking read of a message never waits for bytes a stalled
    /// client will not send, and bytes that arrive while it waits in select cannot wake it for
    /// an incomplete message. A client whose message stays incomplete for 10 s is closed.
    /// Event thread, before `rfbProcessEvents`.
    private func holdIncompleteClients(_ scr: rfbScreenInfoPtr) {
        let now = DispatchTime.now()
        var stalled: [rfbClientPtr] = []
        let it = rfbGetClientIterator(scr)
        while let cl = rfbClientIteratorNext(it) {
            let fd = cl.pointee.sock
            guard fd >= 0 else { continue }
            let waiting = Self.available(fd)
            var partial = false
            if waiting > 0 {
                let needed: Int?
                if cl.pointee.wsctx != nil {
                    needed = Self.webSocketFrameLength(Self.peek(fd, min(waiting, 16))) ?? Int.max  // header incomplete
                } else {
                    needed = Self.nextMessageLength(state: Int(cl.pointee.state), head: Self.peek(fd, min(waiting, 8)))
                }
                if let needed { partial = waiting < needed }
            }
            // A peer that stopped sending is let through: libvncserver then reads up to the end
            // of its input and closes it, without waiting.
            let selected = (waiting > 0 && !partial) || Self.peerClosed(fd)
            // On hold only while a message is incomplete (a held client also gets no updates).
            cl.pointee.onHold = partial && !selected ? 1 : 0
            Self.setSelected(fd, !selected, in: &scr.pointee.allFds)
            if let st = clientStates[Int(bitPattern: cl)] {
                if !partial {
                    st.partialSince = nil
                } else if let since = st.partialSince {
                    if now.uptimeNanoseconds - since.uptimeNanoseconds >= Self.stalledClientTimeout { stalled.append(cl) }
                } else {
                    st.partialSince = now
                }
            }
        }
        rfbReleaseClientIterator(it)
        for cl in stalled {
            Self.setSelected(cl.pointee.sock, false, in: &scr.pointee.allFds)
            logger.info("VNC viewer \(clientStates[Int(bitPattern: cl)]?.info.host ?? "?") sent an incomplete message and went quiet; disconnecting it")
            cl.pointee.onHold = 0
            rfbCloseClient(cl)
        }
    }

    private func noticeInitializedClients(_ scr: rfbScreenInfoPtr) {
        var fresh: [RemoteDisplayInfo.Client] = []
        let it = rfbGetClientIterator(scr)
        while let cl = rfbClientIteratorNext(it) {
            if cl.pointee.state == RFB_NORMAL, let st = clientStates[Int(bitPattern: cl)], !st.initialized {
                st.initialized = true
                fresh.append(st.info)
            }
        }
        rfbReleaseClientIterator(it)
        if fresh.isEmpty { return }
        let obs = shared.withLock { $0.observer }
        for c in fresh { obs?(.initialized(c)) }
    }

    private func clientConnected(_ cl: rfbClientPtr) {
        let info = Self.peerInfo(cl)
        clientStates[Int(bitPattern: cl)] = ClientState(info: info)
        cl.pointee.clientGoneHook = { cl in
            guard let cl else { return }
            VNCServer.releaseWebSocketContext(cl)
            guard let server = VNCServer.owner(of: cl) else { return }
            server.clientGone(cl)
        }
        let obs = shared.withLock { s in
            s.clients[Int(bitPattern: cl)] = info
            return s.observer
        }
        logger.info("VNC viewer connected from \(info.host):\(info.service)\(info.websocket ? " (websocket)" : "")")
        obs?(.connected(info))
    }

    /// Frees a WebSocket client's decoding context as the client goes. libvncserver 0.9.14
    /// (Debian 12's) never frees it, about 46 KB per WebSocket viewer, so a peer reconnecting
    /// in a loop grew the server without bound (AddressSanitizer's leak report; fixed upstream
    /// in 3acb43eb, where `rfbClientConnectionGone` frees it after this hook unless it is NULL,
    /// so clearing the pointer keeps this right on both). Event thread.
    private static func releaseWebSocketContext(_ cl: rfbClientPtr) {
        guard let ctx = cl.pointee.wsctx else { return }
        free(UnsafeMutableRawPointer(ctx))
        cl.pointee.wsctx = nil
    }

    private func clientGone(_ cl: rfbClientPtr) {
        let key = Int(bitPattern: cl)
        guard let st = clientStates.removeValue(forKey: key) else { return }
        for report in st.keys.releaseAll() { display.sendInput(report) }
        display.sendInput(st.pointer.releaseAll())
        let obs = shared.withLock { s in
            s.clients.removeValue(forKey: key)
            return s.observer
        }
        logger.info("VNC viewer \(st.info.host):\(st.info.service) disconnected")
        obs?(.disconnected(st.info))
    }

    private func keyEvent(client cl: rfbClientPtr, keysym: UInt32, down: Bool) {
        guard let st = clientStates[Int(bitPattern: cl)] else { return }
        let caps = display.keyboardLEDs.contains(.capsLock)
        for report in st.keys.key(keysym, down: down, capsLock: caps) { display.sendInput(report) }
    }

    private func pointerEvent(client cl: rfbClientPtr, mask: UInt8, x: Int, y: Int) {
        guard let st = clientStates[Int(bitPattern: cl)] else { return }
        let report = st.pointer.pointer(x: x, y: y, buttonMask: mask, width: fbWidth, height: fbHeight)
        display.sendInput(report)
    }

    private func checkPassword(client cl: rfbClientPtr, response: UnsafePointer<CChar>, length: Int) -> Bool {
        let (pw, expiry) = shared.withLock { ($0.password, $0.passwordExpiry) }
        guard var pw, length == 16 else { return false }
        if let expiry, Date() >= expiry { return false }
        var challenge = cl.pointee.authChallenge
        let ok = withUnsafeMutableBytes(of: &challenge) { ch -> Bool in
            pw.withUnsafeMutableBufferPointer { rfbEncryptBytes(ch.baseAddress!.assumingMemoryBound(to: UInt8.self), $0.baseAddress!) }
            return memcmp(ch.baseAddress!, response, 16) == 0
        }
        if !ok { logger.info("VNC viewer from \(String(cString: cl.pointee.host)) failed authentication") }
        return ok
    }

    private static func peerInfo(_ cl: rfbClientPtr) -> RemoteDisplayInfo.Client {
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var serv = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        var family = "unknown"
        let sock = cl.pointee.sock
        withUnsafeMutablePointer(to: &ss) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                if getpeername(sock, sa, &len) == 0 {
                    _ = getnameinfo(sa, len, &host, socklen_t(host.count), &serv, socklen_t(serv.count),
                                    NI_NUMERICHOST | NI_NUMERICSERV)
                    family = Int32(sa.pointee.sa_family) == AF_INET6 ? "ipv6" : "ipv4"
                }
            }
        }
        return RemoteDisplayInfo.Client(host: Self.string(host), service: Self.string(serv), family: family,
                                        websocket: cl.pointee.wsctx != nil)
    }

    // MARK: Sockets

    /// The text of a NUL-terminated C buffer.
    private static func string(_ buf: [CChar]) -> String {
        let bytes = buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Splits "HOST:PORT" / "[V6]:PORT" / ":PORT".
    static func parseAddress(_ text: String) throws -> (host: String, port: UInt16) {
        var hostPart: Substring, portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw VNCError.badAddress(text, reason: "missing ']'") }
            hostPart = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw VNCError.badAddress(text, reason: "missing ':PORT'") }
            portPart = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw VNCError.badAddress(text, reason: "missing ':PORT'") }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
            if hostPart.contains(":") {
                throw VNCError.badAddress(text, reason: "IPv6 addresses must be written in brackets")
            }
        }
        guard let port = UInt16(portPart) else {
            throw VNCError.badAddress(text, reason: "'\(portPart)' is not a port number 0-65535")
        }
        return (String(hostPart), port)
    }

    private static func listen(on text: String) throws -> Listener {
        let (host, port) = try parseAddress(text)
        var hints = addrinfo()
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &res)
        guard rc == 0, let first = res else {
            throw VNCError.badAddress(text, reason: String(cString: gai_strerror(rc)))
        }
        defer { freeaddrinfo(res) }
        var lastError = "no usable address"
        var ai: UnsafeMutablePointer<addrinfo>? = first
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype, a.pointee.ai_protocol)
            if fd < 0 { lastError = String(cString: strerror(errno)); continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            guard bind(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0, Glibc.listen(fd, 16) == 0 else {
                lastError = String(cString: strerror(errno))
                close(fd)
                continue
            }
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            var ss = sockaddr_storage()
            var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
            var hostBuf = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            var servBuf = [CChar](repeating: 0, count: Int(NI_MAXSERV))
            withUnsafeMutablePointer(to: &ss) { p in
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                    _ = getsockname(fd, sa, &len)
                    _ = getnameinfo(sa, len, &hostBuf, socklen_t(hostBuf.count), &servBuf, socklen_t(servBuf.count),
                                    NI_NUMERICHOST | NI_NUMERICSERV)
                }
            }
            let family = a.pointee.ai_family == AF_INET6 ? "ipv6" : "ipv4"
            return Listener(fd: fd, host: Self.string(hostBuf), port: Int(Self.string(servBuf)) ?? Int(port),
                            family: family)
        }
        throw VNCError.cannotListen(text, reason: lastError)
    }
}
