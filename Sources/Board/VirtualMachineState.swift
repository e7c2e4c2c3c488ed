import Foundation
import Machine

/// The machine's saved state: sections for the clock, each hart and each managed device, then
/// guest RAM (see `MachineStateFormat`).
extension VirtualMachine {
    /// Section name of the virtual clock.
    static let clockSection = "clock"
    static let clockVersion: UInt32 = 1

    static func hartSection(_ i: Int) -> String { "hart\(i)" }

    /// Collects every section. Control queue; harts paused, devices quiesced.
    func collectSections() -> [StateSection] {
        var sections: [StateSection] = []
        var clock = StateWriter()
        clock.u64(board.clock.nanoseconds)
        sections.append(StateSection(name: Self.clockSection, version: Self.clockVersion, payload: clock.bytes))
        for v in vcpus {
            var w = StateWriter()
            v.saveState(to: &w)
            sections.append(StateSection(name: Self.hartSection(v.index), version: v.stateVersion, payload: w.bytes))
        }
        for d in board.deviceManager.all {
            var w = StateWriter()
            d.saveState(to: &w)
            sections.append(StateSection(name: d.stateSection, version: d.stateVersion, payload: w.bytes))
        }
        return sections
    }

    /// Runs `body` with the harts out of guest code and the devices quiesced, then puts the
    /// machine back as it was unless `body` returns a new run state to stay in. A running
    /// machine emits STOP when it pauses and RESUME when it runs again, as QEMU's savevm,
    /// loadvm and migration do. Control queue.
    func whilePaused(during: RunState, _ body: () throws -> RunState?) throws {
        let before = runState
        if before == .running {
            pauseHarts()
            board.deviceManager.quiesce()
            board.clock.pause()
            emit(.stop)
        }
        setRunState(during)
        var after: RunState? = nil
        defer {
            let final = after ?? before
            if final == .running {
                resumeAll()
                emit(.resume)
            } else {
                setRunState(final)
            }
        }
        after = try body()
    }

    /// Writes the whole machine state to `sink`. The guest is paused for the duration
    /// (run state `runStateDuring`); afterwards the machine runs again if it was running, or
    /// stays paused in `runStateAfter` when one is given (QEMU's `postmigrate` after a
    /// migration). Any thread; the work happens on the control queue.
    @discardableResult
    public func saveState(identity: String, to sink: StateSink, runStateDuring: RunState = .saveVM,
                          runStateAfter: RunState? = nil) throws -> (pages: UInt64, bytes: UInt64) {
        try onControl {
            guard isLive, hasStarted else { throw MachineStateError("the machine is not running") }
            try checkNoHotPluggedDevices()
            var pages: UInt64 = 0
            try whilePaused(during: runStateDuring) {
                pages = try MachineStateWriter.write(identity: identity, sections: collectSections(), ram: board.ram, to: sink)
                try sink.finish()
                return runStateAfter
            }
            return (pages, sink.position)
        }
    }

    /// Replaces the machine's state with the one in `source`, after checking that it was taken
    /// from a machine with the same identity (`describeMismatch` names the difference) and that
    /// every section parses. The machine runs afterwards if it was running (or if `runAfter`).
    /// A stream refused before anything changed leaves the machine as it was; one that fails
    /// while being applied leaves it paused in `internal-error`. Any thread.
    public func loadState(identity: String, from source: StateSource, runAfter: Bool? = nil,
                          describeMismatch: (String, String) -> String) throws {
        try onControl {
            guard isLive, hasStarted else { throw MachineStateError("the machine is not running") }
            try checkNoHotPluggedDevices()
            let before = runState
            var loadError: (any Error)? = nil
            try whilePaused(during: .restoreVM) {
                let reader = try MachineStateReader(source: source)
                guard reader.identity == identity else {
                    throw MachineStateError("the state was saved from a different machine: "
                                            + describeMismatch(reader.identity, identity))
                }
                try checkSectionsPresent(reader.sections)
                // Device sections first, with the current state kept to roll back to: a section
                // refused there leaves the machine exactly as it was.
                let backup = collectSections()
                do {
                    try applySections(reader.sections)
                } catch {
                    try? applySections(backup)
                    throw error
                }
                // RAM last: a file is checked whole before RAM changes; a stream that breaks
                // or fails its checksum mid-RAM leaves the machine stopped.
                do {
                    try reader.loadRAM(into: board.ram)
                } catch {
                    FileHandle.standardError.write(Data("machine-server: error: loading guest RAM failed: \(error)\n".utf8))
                    loadError = error
                    return .internalError
                }
                let run = runAfter ?? (before == .running)
                return run ? .running : .paused
            }
            if let loadError {
                throw MachineStateError("\(loadError); the machine is stopped (internal-error)")
            }
        }
    }

    /// Every section this machine needs is there, and no section is unknown.
    func checkSectionsPresent(_ sections: [StateSection]) throws {
        var needed = Set([Self.clockSection])
        for v in vcpus { needed.insert(Self.hartSection(v.index)) }
        for d in board.deviceManager.all { needed.insert(d.stateSection) }
        let have = Set(sections.map(\.name))
        if let missing = needed.subtracting(have).sorted().first {
            throw MachineStateError("section \(missing) is missing from the stream")
        }
        if let extra = have.subtracting(needed).sorted().first {
            throw MachineStateError("section \(extra) does not belong to this machine")
        }
    }

    /// Applies device, hart and clock sections. Control queue, paused.
    func applySections(_ sections: [StateSection]) throws {
        for s in sections {
            var r = StateReader(section: s.name, bytes: s.payload)
            if s.name == Self.clockSection {
                guard s.version == Self.clockVersion else { throw r.invalid("(version)", "layout version \(s.version) is not supported") }
                let ns = try r.u64("nanoseconds")
                try r.finish()
                board.clock.restore(nanoseconds: ns)
            } else if let v = vcpus.first(where: { Self.hartSection($0.index) == s.name }) {
                try v.loadState(from: &r, version: s.version)
            } else if let d = board.deviceManager.device(section: s.name) {
                try d.loadState(from: &r, version: s.version)
            }
        }
    }
}
