import Machine
import Synchronization
@testable import QMP

/// A machine façade that records calls and emits events like the real one.
final class FakeMachine: MachineControl {
    private struct State {
        var runState: RunState = .running
        var calls: [String] = []
        var observers: [Int: @Sendable (MachineEvent) -> Void] = [:]
        var next = 0
    }
    private let state = Mutex(State())

    var runState: RunState { state.withLock { $0.runState } }
    var machineName: String? { "fake" }
    var calls: [String] { state.withLock { $0.calls } }

    private func record(_ call: String, state newState: RunState? = nil, event: MachineEvent?) {
        let observers = state.withLock { s in
            s.calls.append(call)
            if let newState { s.runState = newState }
            return Array(s.observers.values)
        }
        if let event { for o in observers { o(event) } }
    }

    func stop() { record("stop", state: .paused, event: runState == .running ? .stop : nil) }
    func cont() { record("cont", state: .running, event: runState == .paused ? .resume : nil) }
    func systemReset() { record("system_reset", event: .reset(cause: .hostQMPSystemReset)) }
    func systemPowerdown() { record("system_powerdown", event: .powerdown) }
    func quit() { record("quit", state: .shutdown, event: .shutdown(cause: .hostQMPQuit)) }
    func cpus() -> [CPUInfo] { [CPUInfo(index: 0, threadID: 100, pc: 0x8000_0000), CPUInfo(index: 1, threadID: 101, pc: 0)] }
    func addEventObserver(_ observer: @escaping @Sendable (MachineEvent) -> Void) -> Int {
        state.withLock { s in
            s.next += 1
            s.observers[s.next] = observer
            return s.next
        }
    }
    func removeEventObserver(_ token: Int) { _ = state.withLock { $0.observers.removeValue(forKey: token) } }
}

/// A chardev with a fixed id.
final class FakeChardev: CharBackend {
    let id: String
    let filename: String
    init(id: String, filename: String) {
        self.id = id
        self.filename = filename
    }
    func write(_ bytes: UnsafeRawBufferPointer) {}
    func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) {}
    var isConnected: Bool { true }
    func close() {}
}

/// One ring buffer ("serial0") and one non-ring chardev ("mon0").
final class FakeChardevs: ChardevRegistry {
    private let output = Mutex<[UInt8]>(Array("hello".utf8) + [0xFF])
    let input = Mutex<[UInt8]>([])

    func chardevs() -> [any CharBackend] {
        [FakeChardev(id: "serial0", filename: "ringbuf"), FakeChardev(id: "mon0", filename: "stdio")]
    }
    func readRingbuf(id: String, maxBytes: Int) throws(ChardevRegistryError) -> [UInt8] {
        try check(id)
        return output.withLock { o in
            let n = min(maxBytes, o.count)
            defer { o.removeFirst(n) }
            return Array(o.prefix(n))
        }
    }
    func writeRingbuf(id: String, bytes: [UInt8]) throws(ChardevRegistryError) {
        try check(id)
        input.withLock { $0 += bytes }
    }
    private func check(_ id: String) throws(ChardevRegistryError) {
        if id == "mon0" { throw .notARingbuf(id: id) }
        if id != "serial0" { throw .notFound(id: id) }
    }
}
