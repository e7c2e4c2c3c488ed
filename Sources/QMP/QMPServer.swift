import Dispatch
import Logging
import Machine
import NIOCore
import NIOPosix
import Schema
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where a QMP server listens: `unix:PATH` or `tcp:HOST:PORT`.
public enum QMPListenerSpec: Sendable, Equatable, CustomStringConvertible {
    /// A unix socket at this path (created with mode 0600; a stale socket file is replaced).
    case unix(path: String)
    /// A TCP listener (port 0 picks a free port; see `QMPServer.boundAddresses`).
    case tcp(host: String, port: Int)
    /// An inherited, bound and listening socket descriptor (libvirt's monitor socket).
    case fd(Int32)

    /// Parses "unix:PATH" or "tcp:HOST:PORT"; the error names what is wrong.
    public init(parsing text: String) throws(QMPServerError) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw .badListener(text, "the socket path is empty") }
            self = .unix(path: path)
        } else if text.hasPrefix("tcp:") {
            guard let hp = SchemaCheck.parseHostPort(String(text.dropFirst(4))) else {
                throw .badListener(text, "expected tcp:HOST:PORT")
            }
            self = .tcp(host: hp.host, port: Int(hp.port))
        } else {
            throw .badListener(text, "expected unix:PATH or tcp:HOST:PORT")
        }
    }

    /// The spec in its textual form.
    public var description: String {
        switch self {
        case .unix(let p): return "unix:\(p)"
        case .tcp(let h, let p): return "tcp:\(h):\(p)"
        case .fd(let fd): return "fd:\(fd)"
        }
    }
}

/// Why the QMP server could not start.
public enum QMPServerError: Error, Equatable, CustomStringConvertible {
    /// A listener spec is malformed.
    case badListener(String, String)
    /// Binding a listener failed.
    case bindFailed(String, String)
    /// `start` was called twice or after `shutdown`.
    case notStartable

    /// A message naming the listener and the cause.
    public var description: String {
        switch self {
        case .badListener(let s, let why): return "bad QMP listener '\(s)': \(why)"
        case .bindFailed(let s, let why): return "cannot listen on \(s): \(why)"
        case .notStartable: return "the QMP server was already started or shut down"
        }
    }
}

/// Settings for a QMP server.
public struct QMPServerConfiguration: Sendable {
    /// What `query-version` and the greeting report.
    public var version: VersionInfo
    /// The largest accepted message; a longer one gets an error and the connection is closed.
    public var maxMessageSize: Int

    /// Defaults: QEMU 7.2.0 behaviour, "machine-server 0.1.0", 4 MiB messages.
    public init(version: VersionInfo = VersionInfo(qemu: VersionTriple(major: 7, minor: 2, micro: 0),
                                                   package: "machine-server 0.1.0"),
                maxMessageSize: Int = 4 << 20) {
        self.version = version
        self.maxMessageSize = maxMessageSize
    }
}

/// The QMP server: listens on unix and TCP sockets, speaks QMP to any number of clients, each
/// negotiating on its own, and forwards machine events to every negotiated client.
///
/// I/O runs on one SwiftNIO event-loop thread; commands run on a serial queue per connection
/// (so a slow `stop` never blocks other clients' I/O) and replies go out in request order.
/// All methods may be called from any thread.
public final class QMPServer: Sendable {
    private let control: any MachineControl
    private let chardevs: any ChardevRegistry
    private let devices: (any DeviceRegistry)?
    private let configuration: QMPServerConfiguration
    private let group: MultiThreadedEventLoopGroup
    private let logger = Logger(label: "machine-server.qmp")

    private struct State {
        var started = false
        var stopped = false
        var listeners: [any Channel] = []
        /// Unix-socket listeners (relayed so that clients can pass descriptors).
        var unixListeners: [UnixMonitorListener] = []
        /// What each listener is bound to, in listener order ("unix:PATH", "tcp:HOST:PORT").
        var addresses: [String] = []
        var connections: [ObjectIdentifier: QMPConnection] = [:]
        var observerToken: Int?
    }
    private let state = Mutex(State())

    /// Creates a server for `control`; nothing listens until `start`.
    public init(control: any MachineControl, chardevs: any ChardevRegistry, devices: (any DeviceRegistry)? = nil,
                configuration: QMPServerConfiguration = QMPServerConfiguration()) {
        self.control = control
        self.chardevs = chardevs
        self.devices = devices
        self.configuration = configuration
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    /// Binds every listener and starts accepting clients: QMP on `listeners`, the human
    /// monitor (HMP, line-based) on `humanMonitorListeners`. On failure nothing stays bound.
    public func start(listeners: [QMPListenerSpec], humanMonitorListeners: [QMPListenerSpec] = []) throws(QMPServerError) {
        try state.withLock { s throws(QMPServerError) in
            if s.started || s.stopped { throw .notStartable }
            s.started = true
        }
        let token = control.addEventObserver { [weak self] event in self?.broadcast(event) }
        state.withLock { $0.observerToken = token }
        var bound: [any Channel] = []
        var unixBound: [UnixMonitorListener] = []
        var addresses: [String] = []
        for (spec, human) in listeners.map({ ($0, false) }) + humanMonitorListeners.map({ ($0, true) }) {
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { [weak self] channel in
                    guard let self else { return channel.close() }
                    return channel.eventLoop.makeCompletedFuture {
                        try self.addHandler(to: channel, human: human, descriptors: nil)
                    }
                }
            do {
                switch spec {
                case .unix(let path):
                    let fd = try Self.bindPrivately { try UnixMonitorListener.bind(path: path) }
                    unixBound.append(startUnixListener(fd: fd, path: path, human: human))
                    addresses.append("unix:\(path)")
                case .tcp(let host, let port):
                    let channel = try bootstrap.bind(host: host, port: port).wait()
                    bound.append(channel)
                    addresses.append(channel.localAddress.map { "tcp:\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? spec.description)
                case .fd(let fd):
                    var type: Int32 = 0
                    var len = socklen_t(MemoryLayout<Int32>.size)
                    guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0, type == Int32(SOCK_STREAM.rawValue) else {
                        throw QMPServerError.bindFailed(spec.description, "descriptor \(fd) is not an open stream socket")
                    }
                    if UnixMonitorListener.isUnixSocket(fd) {
                        // libvirt's monitor: a listening unix socket it created and passed.
                        _ = fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC)
                        unixBound.append(startUnixListener(fd: fd, path: nil, human: human))
                        addresses.append(spec.description)
                    } else {
                        let channel = try bootstrap.withBoundSocket(fd).wait()
                        bound.append(channel)
                        addresses.append(channel.localAddress.map { "tcp:\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? spec.description)
                    }
                }
                logger.info("\(human ? "HMP" : "QMP") listening on \(addresses.last ?? spec.description)")
            } catch {
                for c in bound { _ = try? c.close().wait() }
                for u in unixBound { u.shutdown() }
                control.removeEventObserver(token)
                state.withLock { $0.observerToken = nil }
                if let e = error as? QMPServerError { throw e }
                throw .bindFailed(spec.description, "\(error)")
            }
        }
        state.withLock { s in
            s.listeners = bound
            s.unixListeners = unixBound
            s.addresses = addresses
        }
    }

    /// The session handler for a new channel: QMP, or the human monitor.
    private func addHandler(to channel: any Channel, human: Bool, descriptors: PassedDescriptors?) throws {
        if human {
            try channel.pipeline.syncOperations.addHandler(HMPChannelHandler(server: self))
        } else {
            try channel.pipeline.syncOperations.addHandler(QMPChannelHandler(server: self, descriptors: descriptors))
        }
    }

    /// Accepts on a listening unix socket; each client's relayed end becomes a NIO channel.
    private func startUnixListener(fd: Int32, path: String?, human: Bool) -> UnixMonitorListener {
        let group = self.group
        return UnixMonitorListener(fd: fd, path: path) { [weak self] local, descriptors in
            guard let self else {
                close(local)
                return
            }
            let connected = ClientBootstrap(group: group)
                .channelInitializer { [weak self] channel in
                    guard let self else { return channel.close() }
                    return channel.eventLoop.makeCompletedFuture {
                        try self.addHandler(to: channel, human: human, descriptors: descriptors)
                    }
                }
                .withConnectedSocket(local)
            if (try? connected.wait()) == nil { close(local) }
        }
    }

    /// Serializes `bindPrivately` between servers of one process.
    private static let umaskLock = Mutex(())

    /// Runs `bind` with the umask at 0177, so that a unix socket file is created with mode
    /// 0600 from the start (a chmod after bind left it open to everyone for a moment under a
    /// permissive umask). The umask is process-wide: for the microseconds of a bind, a file
    /// created by another thread gets at most mode 0600 too; the launch binds before the
    /// machine runs, when no other thread creates files.
    private static func bindPrivately<T>(_ bind: () throws -> T) throws -> T {
        try umaskLock.withLock { _ in
            let old = umask(0o177)
            defer { umask(old) }
            return try bind()
        }
    }

    /// The bound addresses ("unix:PATH" or "tcp:HOST:PORT"), in listener order; useful with port 0.
    public var boundAddresses: [String] {
        state.withLock { $0.addresses }
    }

    /// Stops listening, closes every connection (after pending replies are written) and ends the
    /// I/O thread. Idempotent. Must not be called from a QMP command (it waits for I/O to finish).
    public func shutdown() {
        let (listeners, connections, token, unixListeners) = state.withLock { s in
            if s.stopped { return ([any Channel](), [QMPConnection](), Int?.none, [UnixMonitorListener]()) }
            s.stopped = true
            defer { s.listeners = []; s.unixListeners = []; s.connections = [:]; s.observerToken = nil }
            return (s.listeners, Array(s.connections.values), s.observerToken, s.unixListeners)
        }
        if let token { control.removeEventObserver(token) }
        for l in listeners { _ = try? l.close().wait() }
        for u in unixListeners { u.shutdown() }
        for c in connections { c.closeAfterPendingWork() }
        try? group.syncShutdownGracefully()
    }

    func makeConnection(channel: any Channel, descriptors: PassedDescriptors? = nil) -> QMPConnection {
        let c = QMPConnection(channel: channel, server: self,
                              executor: QMPCommandExecutor(control: control, chardevs: chardevs, devices: devices,
                                                                version: configuration.version, descriptors: descriptors))
        state.withLock { $0.connections[ObjectIdentifier(c)] = c }
        return c
    }

    func remove(_ c: QMPConnection) {
        _ = state.withLock { $0.connections.removeValue(forKey: ObjectIdentifier(c)) }
    }

    var version: VersionInfo { configuration.version }
    fileprivate var maxMessageSize: Int { configuration.maxMessageSize }
    fileprivate var machine: any MachineControl { control }

    /// Sends `event` to every negotiated client, with the current time. Any thread; used for
    /// events that do not come from `MachineControl` (the VNC connection events).
    public func emit(_ event: QMPEvent) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let message = QMPSession.eventMessage(event, seconds: Int64(ts.tv_sec), microseconds: Int64(ts.tv_nsec / 1000))
        let targets = state.withLock { Array($0.connections.values) }
        for c in targets where c.isNegotiated { c.sendEvent(message) }
    }

    private func broadcast(_ event: MachineEvent) {
        let qmpEvent: QMPEvent
        switch event {
        case .stop: qmpEvent = .stop
        case .resume: qmpEvent = .resume
        case .powerdown: qmpEvent = .powerdown
        case .reset(let cause):
            qmpEvent = .reset(ResetEventData(guest: cause.isGuest, reason: ShutdownCause(cause)))
        case .shutdown(let cause):
            qmpEvent = .shutdown(ShutdownEventData(guest: cause.isGuest, reason: ShutdownCause(cause)))
        case .jobStatusChange(let id, let status):
            qmpEvent = .jobStatusChange(JobStatusChangeEventData(id: id, status: Schema.JobStatus(rawValue: status.rawValue) ?? .undefined))
        case .migration(let status):
            qmpEvent = .migration(MigrationEventData(status: Schema.MigrationStatus(rawValue: status.rawValue) ?? .failed))
        case .migrationPass(let pass):
            qmpEvent = .migrationPass(MigrationPassEventData(pass: Int64(pass)))
        }
        emit(qmpEvent)
    }
}

extension Schema.ShutdownCause {
    /// The schema's value for a machine shutdown cause (the names are the same).
    init(_ cause: Machine.ShutdownCause) {
        self = Schema.ShutdownCause(rawValue: cause.rawValue) ?? .none
    }
}

/// One client connection: its channel, its command queue and its executor.
/// Thread-safe; the negotiated flag is set on the I/O thread and read by event broadcasts.
///
/// Output is bounded: `pendingOutputBytes` counts what was handed to the channel and not yet
/// written to the socket. Replies are throttled upstream (the handler stops reading and
/// executing while the channel is not writable); an event that would push a client that has
/// stopped reading past `QMPConnection.maxPendingOutput` closes that client instead.
final class QMPConnection: Sendable {
    /// The most unwritten output kept for one client before it is disconnected.
    static let maxPendingOutput = 4 << 20

    let channel: any Channel
    let executor: QMPCommandExecutor
    private let queue = DispatchQueue(label: "machine-server.qmp.connection")
    private let negotiated = Atomic<Bool>(false)
    private let pending = Atomic<Int>(0)
    private let machine: any MachineControl

    fileprivate init(channel: any Channel, server: QMPServer, executor: QMPCommandExecutor) {
        self.channel = channel
        self.executor = executor
        self.machine = server.machine
    }

    var isNegotiated: Bool { negotiated.load(ordering: .acquiring) }
    func markNegotiated() { negotiated.store(true, ordering: .releasing) }

    /// Bytes handed to the channel and not yet written to the socket.
    var pendingOutputBytes: Int { pending.load(ordering: .relaxed) }

    /// Writes one message followed by CRLF.
    @discardableResult
    func send(_ message: JSONValue) -> EventLoopFuture<Void> {
        var buffer = channel.allocator.buffer(capacity: 256)
        buffer.writeString(message.serialized())
        buffer.writeString("\r\n")
        let n = buffer.readableBytes
        pending.add(n, ordering: .relaxed)
        let written = channel.writeAndFlush(buffer)
        written.whenComplete { [self] _ in pending.subtract(n, ordering: .relaxed) }
        return written
    }

    /// Sends an event unless the client has stopped reading: past `maxPendingOutput` bytes of
    /// unwritten output the connection is closed instead (QEMU likewise stops serving a
    /// monitor client that does not read).
    func sendEvent(_ message: JSONValue) {
        if pendingOutputBytes > Self.maxPendingOutput {
            channel.close(promise: nil)
            return
        }
        send(message)
    }

    /// Runs one human-monitor line behind earlier work and writes its output and the next
    /// prompt; `quit` ends the machine once the output is written. `done` runs afterwards.
    func performHumanMonitor(_ line: String, done: @escaping @Sendable () -> Void) {
        queue.async { [self] in
            defer { done() }
            let out = (try? executor.runHumanMonitorCommand(line, cpuIndex: nil)) ?? ""
            let written = sendText(out + HMPChannelHandler.prompt)
            if executor.takeQuitRequest() {
                let machine = self.machine
                written.whenComplete { _ in DispatchQueue.global().async { machine.quit() } }
            }
        }
    }

    /// Writes raw text (the human monitor's output).
    @discardableResult
    func sendText(_ text: String) -> EventLoopFuture<Void> {
        var buffer = channel.allocator.buffer(capacity: text.utf8.count)
        buffer.writeString(text)
        let n = buffer.readableBytes
        pending.add(n, ordering: .relaxed)
        let written = channel.writeAndFlush(buffer)
        written.whenComplete { [self] _ in pending.subtract(n, ordering: .relaxed) }
        return written
    }

    /// Queues an action behind earlier ones so replies keep request order; `done` runs (on
    /// the connection's queue) once the action has run and its output was handed to the channel.
    func perform(_ action: QMPSession.Action, done: (@Sendable () -> Void)? = nil) {
        queue.async { [self] in
            defer { done?() }
            switch action {
            case .send(let m):
                send(m)
            case .close:
                channel.close(promise: nil)
            case .execute(let id, let command):
                let result = executor.run(command)
                let written = send(QMPSession.reply(id: id, result: result))
                if executor.takeQuitRequest() {
                    // The reply must reach the client before the machine goes away.
                    let machine = self.machine
                    written.whenComplete { _ in DispatchQueue.global().async { machine.quit() } }
                }
            }
        }
    }

    /// Closes the channel once every queued action has run.
    func closeAfterPendingWork() {
        queue.sync {}
        _ = try? channel.close().wait()
    }
}

/// The NIO handler: feeds bytes to the connection's `QMPSession` and hands the resulting actions
/// to the connection. Lives on the channel's event loop.
///
/// Flow control, like QEMU's monitor (which suspends reading from a client while its requests
/// are queued): at most `maxInFlight` actions are on the connection's queue, so that the
/// dispatch pool serves every client in turn and one client's burst cannot queue up work ahead
/// of the others; the rest of a read's actions wait here, and nothing more is read from the socket while actions wait or while the channel is
/// not writable (its unwritten output is above NIO's high-water mark). A client that sends
/// commands and never reads its replies is thereby throttled by TCP/unix backpressure, and the
/// server holds at most one read's worth of parsed actions and a bounded amount of output for it.
final class QMPChannelHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer

    /// Actions handed to the connection's queue at once: one, so commands of different
    /// clients interleave (replies still keep request order).
    static let maxInFlight = 1

    private let server: QMPServer
    private var session: QMPSession
    private var connection: QMPConnection?
    private var waiting: [QMPSession.Action] = []
    private var waitingHead = 0
    private var inFlight = 0
    private var readWithheld = false
    /// The index in `waiting` of the capabilities reply, until it has been handed to the connection.
    private var negotiationReply: Int?

    /// The descriptors the client passes (unix sockets); nil where none can arrive.
    private let descriptors: PassedDescriptors?

    init(server: QMPServer, descriptors: PassedDescriptors? = nil) {
        self.server = server
        self.descriptors = descriptors
        self.session = QMPSession(maxMessageSize: server.maxMessageSize)
    }

    func channelActive(context: ChannelHandlerContext) {
        let c = server.makeConnection(channel: context.channel, descriptors: descriptors)
        connection = c
        c.perform(.send(QMPSession.greeting(version: server.version)))
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        guard let c = connection else { return }
        let wasNegotiated = session.negotiated
        let actions = session.receive(buffer.readableBytesView)
        if !wasNegotiated && session.negotiated {
            // Events may go out only after the capabilities reply: mark the connection
            // negotiated once that reply is on the channel, not when the request is read
            // (an event emitted in between used to overtake the reply, which clients such as
            // qemu.qmp reject). Before negotiation every other reply is an error, so the
            // capabilities reply is the first one with "return".
            if let i = actions.firstIndex(where: { a in
                if case .send(let m) = a, m.objectValue?["return"] != nil { return true }
                return false
            }) {
                negotiationReply = waiting.count + i
            } else {
                c.markNegotiated()
            }
        }
        waiting += actions
        pump(context: context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        pump(context: context)
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if mustWait(context) {
            readWithheld = true
        } else {
            context.read()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let c = connection { server.remove(c) }
        connection = nil
        waiting = []
        waitingHead = 0
        negotiationReply = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func mustWait(_ context: ChannelHandlerContext) -> Bool {
        waitingHead < waiting.count || inFlight >= Self.maxInFlight || !context.channel.isWritable
    }

    /// Hands waiting actions to the connection while there is room, then resumes reading when
    /// nothing is held back.
    private func pump(context: ChannelHandlerContext) {
        guard let c = connection else { return }
        while waitingHead < waiting.count && inFlight < Self.maxInFlight && context.channel.isWritable {
            let action = waiting[waitingHead]
            let completesNegotiation = negotiationReply == waitingHead
            if completesNegotiation { negotiationReply = nil }
            waitingHead += 1
            inFlight += 1
            let loop = context.eventLoop
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            c.perform(action) {
                if completesNegotiation { c.markNegotiated() }
                loop.execute {
                    let (handler, ctx) = bound.value
                    handler.inFlight -= 1
                    handler.pump(context: ctx)
                }
            }
        }
        if waitingHead == waiting.count {
            waiting.removeAll(keepingCapacity: waiting.count <= 64)
            waitingHead = 0
        }
        if readWithheld && !mustWait(context) {
            readWithheld = false
            context.read()
        }
    }
}
