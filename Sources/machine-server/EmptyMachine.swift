import Dispatch
import Machine
import Synchronization

/// QEMU's `-machine none`: no CPUs, RAM or devices, only a run state that QMP drives. What
/// libvirt starts to probe a binary's capabilities. Every action runs on one serial queue, in
/// order, as the real machine's control queue does; any thread may call.
final class EmptyMachine: MachineControl, Sendable {
    let machineName: String?
    let machineUUID: String?
    private let control = DispatchQueue(label: "empty machine control")
    private let exited = DispatchSemaphore(value: 0)
    private let shared: Mutex<Shared>

    private struct Shared {
        var runState: RunState
        var observers: [Int: @Sendable (MachineEvent) -> Void] = [:]
        var nextToken = 1
        var ended = false
    }

    init(name: String?, uuid: String?, startPaused: Bool) {
        machineName = name
        machineUUID = uuid
        shared = Mutex(Shared(runState: startPaused ? .prelaunch : .running))
    }

    var runState: RunState { shared.withLock { $0.runState } }

    func stop() {
        control.sync {
            guard transition(from: [.running], to: .paused) else { return }
            emit(.stop)
        }
    }

    func cont() {
        control.sync {
            guard transition(from: [.paused, .prelaunch], to: .running) else { return }
            emit(.resume)
        }
    }

    func systemReset() { control.sync { if isLive { emit(.reset(cause: .hostQMPSystemReset)) } } }

    /// There is no guest to see the button; the event is sent, as QEMU does.
    func systemPowerdown() { control.sync { if isLive { emit(.powerdown) } } }

    func quit() { requestHostShutdown(cause: .hostQMPQuit) }

    func cpus() -> [CPUInfo] { [] }

    func addEventObserver(_ observer: @escaping @Sendable (MachineEvent) -> Void) -> Int {
        shared.withLock { s in
            defer { s.nextToken += 1 }
            s.observers[s.nextToken] = observer
            return s.nextToken
        }
    }

    func removeEventObserver(_ token: Int) { _ = shared.withLock { $0.observers.removeValue(forKey: token) } }

    /// Ends the machine (SHUTDOWN with `cause`); `waitUntilExit` returns 0. Returns at once.
    func requestHostShutdown(cause: ShutdownCause) {
        control.async {
            guard self.isLive else { return }
            self.shared.withLock { $0.runState = .shutdown; $0.ended = true }
            self.emit(.shutdown(cause: cause))
            self.exited.signal()
        }
    }

    /// Blocks until the machine ends; the process exit status (always 0).
    func waitUntilExit() -> Int32 {
        exited.wait()
        exited.signal()
        return 0
    }

    private var isLive: Bool { shared.withLock { !$0.ended } }

    private func transition(from: Set<RunState>, to: RunState) -> Bool {
        shared.withLock { s in
            guard !s.ended, from.contains(s.runState) else { return false }
            s.runState = to
            return true
        }
    }

    private func emit(_ event: MachineEvent) {
        let observers = shared.withLock { $0.observers.sorted { $0.key < $1.key }.map(\.value) }
        for o in observers { o(event) }
    }
}
