import Foundation
import Machine
import Synchronization
import Testing
@testable import Board

/// A board with RAM, a bus and per-hart interrupts but no devices; counts resets and
/// power-button presses and keeps the `SystemControl` it was given so tests can act as a device.
final class FakeBoard: MachineBoard, @unchecked Sendable {
    let ram: GuestRAM
    let bus = MemoryBus()
    let clock = VirtualClock()
    let hartInterrupts: [HartInterrupts]
    let system: any SystemControl
    let resets = Atomic<Int>(0)
    let powerPresses = Atomic<Int>(0)
    let failNextReset = Atomic<Bool>(false)
    let deviceManager = DeviceManager()

    init(harts: Int, system: any SystemControl) throws {
        ram = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)
        hartInterrupts = (0..<harts).map { HartInterrupts(hartID: $0) }
        self.system = system
    }

    func resetForBoot() throws -> [HartResetVector] {
        if failNextReset.exchange(false, ordering: .sequentiallyConsistent) {
            throw MachineError.invalidImage(what: "kernel", reason: "vanished")
        }
        let n = resets.add(1, ordering: .sequentiallyConsistent).newValue
        return hartInterrupts.indices.map {
            HartResetVector(entry: GuestPhysicalAddress(0x8000_0000 + UInt64(n) * 0x1000), a0: UInt64($0), a1: 0x8220_0000, a2: 0)
        }
    }

    func pressPowerButton() -> Bool {
        powerPresses.add(1, ordering: .sequentiallyConsistent)
        return true
    }
}

/// A CPU that "executes" by counting loop iterations (sleeping 200 µs in `wfi` style between
/// them) until its exit request is set, like the real hart's contract. It can be told to make
/// a `SystemControl` request from inside `run()`, as a guest device access would.
final class FakeCPU: VirtualCPU, @unchecked Sendable {
    enum GuestAction { case shutdown(Int32), reset }

    let hartID: Int
    let interrupts: HartInterrupts
    let system: any SystemControl
    let iterations = Atomic<Int>(0)
    let runCalls = Atomic<Int>(0)
    let inRun = Atomic<Bool>(false)
    let pending = Mutex<GuestAction?>(nil)
    private(set) var pc: UInt64 = 0
    private(set) var resetArguments: [UInt64] = []
    var instructionsRetired: UInt64 { UInt64(iterations.load(ordering: .relaxed)) }

    init(hartID: Int, interrupts: HartInterrupts, system: any SystemControl) {
        self.hartID = hartID
        self.interrupts = interrupts
        self.system = system
    }

    let stateVersion: UInt32 = 1

    /// The fake's whole state is its pc.
    func saveState(to w: inout StateWriter) { w.u64(pc) }

    func loadState(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
        precondition(!inRun.load(ordering: .sequentiallyConsistent), "load while in run()")
        pc = try r.u64("pc")
    }

    func reset(entry: GuestPhysicalAddress, a0: UInt64, a1: UInt64, a2: UInt64) {
        precondition(!inRun.load(ordering: .sequentiallyConsistent), "reset while in run()")
        pc = entry.raw
        resetArguments = [a0, a1, a2]
    }

    func run() {
        runCalls.add(1, ordering: .sequentiallyConsistent)
        inRun.store(true, ordering: .sequentiallyConsistent)
        defer { inRun.store(false, ordering: .sequentiallyConsistent) }
        while true {
            if interrupts.exitRequest.exchange(false, ordering: .sequentiallyConsistent) { return }
            iterations.add(1, ordering: .relaxed)
            pc &+= 4
            switch pending.withLock({ p -> GuestAction? in defer { p = nil }; return p }) {
            case .shutdown(let code)?: system.requestShutdown(cause: .guestShutdown, exitCode: code)
            case .reset?: system.requestReset(cause: .guestReset)
            case nil: break
            }
            interrupts.waitForInterrupt(untilUptimeNanoseconds: DispatchTime.now().uptimeNanoseconds + 200_000)
        }
    }
}

/// Records events in order.
final class EventLog: Sendable {
    private let events = Mutex<[MachineEvent]>([])
    var all: [MachineEvent] { events.withLock { $0 } }
    func observe(_ vm: VirtualMachine) { _ = vm.addEventObserver { e in self.events.withLock { $0.append(e) } } }
}

struct Rig {
    let vm: VirtualMachine
    let board: FakeBoard
    let cpus: [FakeCPU]
    let log = EventLog()

    init(harts: Int = 2, paused: Bool = false) throws {
        var board: FakeBoard?
        let cpus = Mutex<[FakeCPU]>([])
        vm = try VirtualMachine(name: "test-vm", startPaused: paused,
                                makeBoard: { sys in
                                    let b = try FakeBoard(harts: harts, system: sys)
                                    board = b
                                    return b
                                },
                                makeCPU: { id, _, _, irq, _ in
                                    let c = FakeCPU(hartID: id, interrupts: irq, system: board!.system)
                                    cpus.withLock { $0.append(c) }
                                    return c
                                })
        self.board = board!
        self.cpus = cpus.withLock { $0 }
        log.observe(vm)
        try vm.start()
    }

    /// Total loop iterations across harts.
    var progress: Int { cpus.reduce(0) { $0 + $1.iterations.load(ordering: .relaxed) } }
    var anyInRun: Bool { cpus.contains { $0.inRun.load(ordering: .sequentiallyConsistent) } }

    func waitExit() -> Int32 { vm.waitUntilExit() }
}

@Suite struct VirtualMachineTests {
    @Test func startsRunningAndResetsHartsToTheBoardsVectors() throws {
        let rig = try Rig(harts: 2)
        defer { rig.vm.quit(); _ = rig.waitExit() }
        #expect(rig.vm.runState == .running)
        #expect(rig.vm.machineName == "test-vm")
        #expect(rig.board.resets.load(ordering: .sequentiallyConsistent) == 1)
        #expect(rig.cpus.map(\.resetArguments) == [[0, 0x8220_0000, 0], [1, 0x8220_0000, 0]])
        #expect(eventually { rig.cpus.allSatisfy { $0.iterations.load(ordering: .relaxed) > 5 } })
        let infos = rig.vm.cpus()
        #expect(infos.map(\.index) == [0, 1])
        #expect(infos.allSatisfy { $0.threadID > 0 } && infos[0].threadID != infos[1].threadID)
        #expect(rig.log.all.isEmpty)
    }

    @Test func stopLeavesGuestCodeAndContResumes() throws {
        let rig = try Rig()
        defer { rig.vm.quit(); _ = rig.waitExit() }
        #expect(eventually { rig.progress > 10 })
        rig.vm.stop()
        #expect(rig.vm.runState == .paused)
        #expect(!rig.anyInRun, "stop returns only after every hart left run()")
        let frozen = rig.progress
        let clockAt = rig.board.clock.nanoseconds
        usleep(50_000)
        #expect(rig.progress == frozen, "no guest progress while paused")
        #expect(rig.board.clock.nanoseconds == clockAt, "virtual time stands still while paused")
        rig.vm.stop()  // already paused: no second STOP
        let pcs = rig.vm.cpus().map(\.pc)
        #expect(pcs == rig.cpus.map(\.pc))
        rig.vm.cont()
        #expect(rig.vm.runState == .running)
        #expect(eventually { rig.progress > frozen + 10 })
        rig.vm.cont()  // already running: no second RESUME
        #expect(rig.log.all == [.stop, .resume])
    }

    @Test func startPausedIsPrelaunchUntilCont() throws {
        let rig = try Rig(paused: true)
        defer { rig.vm.quit(); _ = rig.waitExit() }
        #expect(rig.vm.runState == .prelaunch)
        usleep(30_000)
        #expect(rig.progress == 0)
        #expect(rig.cpus.allSatisfy { $0.runCalls.load(ordering: .sequentiallyConsistent) == 0 })
        rig.vm.stop()  // QEMU: stop in prelaunch changes nothing
        #expect(rig.vm.runState == .prelaunch)
        rig.vm.cont()
        #expect(rig.vm.runState == .running)
        #expect(eventually { rig.progress > 0 })
        #expect(rig.log.all == [.resume])
    }

    @Test func systemResetReloadsAndKeepsTheRunState() throws {
        let rig = try Rig()
        defer { rig.vm.quit(); _ = rig.waitExit() }
        rig.vm.systemReset()
        #expect(rig.board.resets.load(ordering: .sequentiallyConsistent) == 2)
        #expect(rig.vm.runState == .running)
        #expect(eventually { rig.progress > 0 })
        rig.vm.stop()
        rig.vm.systemReset()
        #expect(rig.vm.runState == .paused, "a reset while paused stays paused")
        #expect(rig.cpus.allSatisfy { $0.pc == 0x8000_0000 + 3 * 0x1000 }, "harts restart at the reloaded entry")
        #expect(rig.log.all == [.reset(cause: .hostQMPSystemReset), .stop, .reset(cause: .hostQMPSystemReset)])
    }

    @Test func failedResetIsAnInternalError() throws {
        let rig = try Rig()
        defer { rig.vm.quit(); _ = rig.waitExit() }
        rig.board.failNextReset.store(true, ordering: .sequentiallyConsistent)
        rig.vm.systemReset()
        #expect(rig.vm.runState == .internalError)
        #expect(!rig.anyInRun)
        #expect(rig.log.all.isEmpty)
    }

    @Test func guestResetFromAVCPUThreadReboots() throws {
        let rig = try Rig()
        defer { rig.vm.quit(); _ = rig.waitExit() }
        rig.cpus[1].pending.withLock { $0 = .reset }
        #expect(eventually { rig.log.all == [.reset(cause: .guestReset)] })
        #expect(rig.board.resets.load(ordering: .sequentiallyConsistent) == 2)
        #expect(rig.vm.runState == .running)
        let after = rig.progress
        #expect(eventually { rig.progress > after })
    }

    @Test func guestShutdownEndsWithTheGuestsExitCode() throws {
        let rig = try Rig()
        #expect(eventually { rig.progress > 0 })
        rig.cpus[0].pending.withLock { $0 = .shutdown(3) }
        #expect(rig.waitExit() == 3)
        #expect(rig.vm.runState == .shutdown)
        #expect(rig.log.all == [.shutdown(cause: .guestShutdown)])
        #expect(!rig.anyInRun)
        rig.vm.cont()  // after shutdown nothing restarts
        usleep(20_000)
        #expect(!rig.anyInRun)
        #expect(rig.vm.runState == .shutdown)
    }

    @Test func quitEmitsHostQMPQuitAndExitsZero() throws {
        let rig = try Rig()
        rig.vm.quit()
        #expect(rig.waitExit() == 0)
        #expect(rig.log.all == [.shutdown(cause: .hostQMPQuit)])
        rig.vm.quit()  // a second quit is ignored
        usleep(10_000)
        #expect(rig.log.all.count == 1)
    }

    @Test func powerdownEmitsAndPressesTheButton() throws {
        let rig = try Rig()
        defer { rig.vm.quit(); _ = rig.waitExit() }
        rig.vm.systemPowerdown()
        #expect(rig.log.all == [.powerdown])
        #expect(rig.board.powerPresses.load(ordering: .sequentiallyConsistent) == 1)
        #expect(rig.vm.runState == .running)
    }

    @Test func observersCanCallBackIntoTheMachine() throws {
        let rig = try Rig()
        defer { rig.vm.quit(); _ = rig.waitExit() }
        // An observer that pauses again on RESUME must not deadlock the control queue.
        let token = rig.vm.addEventObserver { [vm = rig.vm] e in if e == .resume { vm.stop() } }
        rig.vm.stop()
        rig.vm.cont()
        #expect(rig.vm.runState == .paused)
        rig.vm.removeEventObserver(token)
        rig.vm.cont()
        #expect(rig.vm.runState == .running)
        #expect(rig.log.all == [.stop, .resume, .stop, .resume])
    }

    @Test func hartThreadsAreNamed() throws {
        let rig = try Rig(harts: 1)
        defer { rig.vm.quit(); _ = rig.waitExit() }
        let tid = rig.vm.cpus()[0].threadID
        let comm = try String(contentsOfFile: "/proc/self/task/\(tid)/comm", encoding: .utf8)
        #expect(comm.trimmingCharacters(in: .whitespacesAndNewlines) == "vcpu 0")
    }
}
