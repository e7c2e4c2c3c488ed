import Foundation
import Machine
import Synchronization

/// The event loop every network backend runs on: one thread sleeping in `poll(2)` on the
/// backend's sockets and a wake pipe, running tasks handed in with `perform`, and holding the
/// frames the NIC had no room for.
///
/// Threading: `perform`, `attach`, `detach`, `linkUp` and `close` may be called from any thread;
/// everything else (the subclass hooks, `deliver`, `send`) runs on the loop's own thread.
/// Subclasses override `fillPoll`, `handlePoll`, `send`, `summary` and `closeResources`.
open class NetworkLoop: NetworkBackend, @unchecked Sendable {  // unchecked: loop state is touched on the loop thread only, the rest behind a Mutex
    /// The netdev id.
    public let id: String
    /// QEMU's type name of the backend ("user", "stream"; "none" for an unconnected NIC).
    open var kind: String { "none" }
    /// One line for `info network`.
    open var summary: String { kind }

    /// Most frames held for a NIC without receive buffers; more are dropped (TCP resends them).
    public static let backlogLimit = 1024

    private let tasks = Mutex<[@Sendable () -> Void]>([])
    private let wakeRead: Int32, wakeWrite: Int32
    private let running = Atomic<Bool>(true)
    /// Set by the loop's thread after its last run of queued tasks.
    private let finished = Atomic<Bool>(false)
    private let link = Atomic<Bool>(true)
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)
    private let threadID = Mutex<pthread_t?>(nil)

    // Loop thread only.
    private nonisolated(unsafe) var frontend: (any NetworkFrontend)?
    private nonisolated(unsafe) var backlog: [[UInt8]] = []
    private nonisolated(unsafe) var backlogHead = 0
    /// Frames dropped because the backlog was full or the link down (for `info network`).
    public nonisolated(unsafe) var droppedFrames = 0

    /// Creates the loop and starts its thread.
    public init(id: String) {
        self.id = id
        var fds: [Int32] = [0, 0]
        precondition(pipe(&fds) == 0, "cannot create a pipe for the network loop")
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        wakeRead = fds[0]
        wakeWrite = fds[1]
    }

    /// Starts the loop's thread; subclasses call it at the end of their initializer.
    public func start() {
        let name = "net-\(id)"
        let t = Thread { [self] in
            Self.nameCurrentThread(name)
            threadID.withLock { $0 = pthread_self() }
            run()
            done.signal()
        }
        t.name = name
        thread = t
        t.start()
    }

    /// Names the calling thread for ps, top and /proc (the first 15 bytes: "net-n0"), by writing
    /// /proc/thread-self/comm (Foundation's `Thread.name` does not reach the kernel on Linux).
    private static func nameCurrentThread(_ name: String) {
        let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        let bytes = Array(name.utf8.prefix(15))
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        Foundation.close(fd)
    }

    /// Whether the link is up (`set_link`); while down, frames are dropped both ways.
    public var linkUp: Bool {
        get { link.load(ordering: .relaxed) }
        set { link.store(newValue, ordering: .relaxed) }
    }

    /// Whether the caller is the loop's thread.
    public var onLoopThread: Bool {
        threadID.withLock { t in t.map { pthread_equal($0, pthread_self()) != 0 } ?? false }
    }

    public func perform(wait: Bool, _ body: @escaping @Sendable () -> Void) {
        if onLoopThread {
            body()
            return
        }
        guard running.load(ordering: .acquiring) else {
            if wait { body() }  // the loop has stopped: nothing else touches the state
            return
        }
        if wait {
            // The task may be queued just after the loop ran its last tasks: then nobody else
            // will run it, and the caller does, once (the claim decides who).
            let sem = DispatchSemaphore(value: 0)
            let claim = Claim()
            enqueue {
                if claim.take() { body() }
                sem.signal()
            }
            while sem.wait(timeout: .now() + .milliseconds(100)) == .timedOut {
                if finished.load(ordering: .acquiring) {
                    if claim.take() { body() }
                    return
                }
            }
        } else {
            enqueue(body)
        }
    }

    private func enqueue(_ body: @escaping @Sendable () -> Void) {
        let wasEmpty = tasks.withLock { t in
            t.append(body)
            return t.count == 1
        }
        if wasEmpty { wake() }
    }

    /// Interrupts the loop's `poll`.
    public func wake() {
        var b: UInt8 = 1
        _ = write(wakeWrite, &b, 1)
    }

    public func attach(_ frontend: any NetworkFrontend) {
        perform(wait: true) { self.frontend = frontend }
    }

    public func detach() {
        perform(wait: true) {
            self.frontend = nil
            self.backlog = []
            self.backlogHead = 0
        }
    }

    /// Hands a frame from the network to the NIC, holding it when the NIC has no room. Loop thread.
    public func deliver(_ frame: UnsafeRawBufferPointer) {
        guard linkUp, let frontend else {
            droppedFrames += 1
            return
        }
        if backlogHead == backlog.count, frontend.receive(frame) { return }
        guard backlog.count - backlogHead < Self.backlogLimit else {
            droppedFrames += 1
            return
        }
        backlog.append(Array(frame))
    }

    /// Whether frames are waiting for the NIC (stream backends stop reading meanwhile). Loop thread.
    public var hasBacklog: Bool { backlogHead < backlog.count }

    public func receiveRoomAvailable() {
        guard let frontend else { return }
        while backlogHead < backlog.count {
            let ok = backlog[backlogHead].withUnsafeBytes { frontend.receive($0) }
            guard ok else { break }
            backlogHead += 1
        }
        if backlogHead == backlog.count {
            backlog.removeAll(keepingCapacity: true)
            backlogHead = 0
        } else if backlogHead > 256 {
            backlog.removeFirst(backlogHead)
            backlogHead = 0
        }
        backlogDrained()
    }

    /// Called after the NIC took frames from the backlog; stream backends resume reading. Loop thread.
    open func backlogDrained() {}

    /// Frames from the guest. Loop thread. The base class drops them (an unconnected NIC).
    open func send(_ frame: UnsafeRawBufferPointer) { droppedFrames += 1 }

    /// Appends the descriptors to wait on (after the wake pipe at index 0) and returns the
    /// longest wait in milliseconds (-1: no limit). Loop thread.
    open func fillPoll(_ fds: inout [pollfd]) -> Int32 { -1 }

    /// Handles what `poll` reported for the descriptors `fillPoll` added (`fds[1...]`), or
    /// timers that expired (`fds` then may show no event). Loop thread.
    open func handlePoll(_ fds: [pollfd], error: Bool) {}

    /// Releases sockets and library state after the loop stopped. Loop thread, last call.
    open func closeResources() {}

    private func run() {
        var fds: [pollfd] = []
        while running.load(ordering: .acquiring) {
            let work = tasks.withLock { t -> [@Sendable () -> Void] in
                defer { t.removeAll(keepingCapacity: true) }
                return t
            }
            for w in work { w() }
            guard running.load(ordering: .acquiring) else { break }
            fds.removeAll(keepingCapacity: true)
            fds.append(pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0))
            var timeout = fillPoll(&fds)
            if !tasks.withLock({ $0.isEmpty }) { timeout = 0 }
            let n = poll(&fds, nfds_t(fds.count), timeout)
            if fds[0].revents != 0 {
                var buf = [UInt8](repeating: 0, count: 256)
                while read(wakeRead, &buf, buf.count) > 0 {}
            }
            handlePoll(fds, error: n < 0 && errno != EINTR)
        }
        // Tasks queued while stopping still run, so no `perform(wait:)` caller is left waiting.
        for w in tasks.withLock({ t -> [@Sendable () -> Void] in defer { t.removeAll() }; return t }) { w() }
        closeResources()
        finished.store(true, ordering: .releasing)
    }

    public func close() {
        guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        if thread != nil {
            wake()
            if !onLoopThread { done.wait() }
        } else {
            closeResources()
            finished.store(true, ordering: .releasing)
        }
        Foundation.close(wakeRead)
        Foundation.close(wakeWrite)
    }
}

/// Who runs a task queued by `perform(wait: true)`: the loop or, once the loop has ended, the caller.
private final class Claim: Sendable {
    private let taken = Atomic<Bool>(false)
    /// True for the first caller only.
    func take() -> Bool { !taken.exchange(true, ordering: .acquiringAndReleasing) }
}

/// The backend of a NIC without a netdev: frames from the guest are dropped and none arrive.
public final class DisconnectedNetwork: NetworkLoop, @unchecked Sendable {  // unchecked: no state of its own
    public override var kind: String { "none" }
    /// Creates and starts it.
    public override init(id: String) {
        super.init(id: id)
        start()
    }
}
