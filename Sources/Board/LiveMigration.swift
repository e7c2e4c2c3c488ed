import Foundation
import Machine
import Storage
import Synchronization

/// The settings and switches of outgoing migrations, and what a running one shares with the
/// QMP thread (the cancel flag and the connection to shut down). Any thread.
final class LiveMigrationControl: Sendable {
    let parameters = Mutex(MigrationParameters())
    let capabilities = Mutex(MigrationCapabilities())
    /// Set by `migrate_cancel`; the sender checks it between page records.
    let cancelled = Atomic<Bool>(false)
    /// The running migration's connection (-1 when none): cancel shuts it down so that a
    /// blocked send or receive returns at once.
    let socket = Mutex<Int32>(-1)
    /// Auto-converge's throttle in percent (0 when not throttling).
    let throttle = Atomic<Int>(0)
    /// True while the disks' locks belong to a destination (after a completed live
    /// migration): the source must not run the guest again.
    let disksHandedOver = Atomic<Bool>(false)
}

/// How long the source waits, paused, for the destination to confirm the switch-over.
private let replyTimeout: Double = 60

/// Pages per page record (1 MiB of data): the granularity of cancel and bandwidth checks.
private let pagesPerRecord = 256

private func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

extension VirtualMachine {
    // MARK: Parameters, capabilities, events

    public func migrationParameters() -> MigrationParameters { live.parameters.withLock { $0 } }

    public func setMigrationParameters(_ p: MigrationParameters) { live.parameters.withLock { $0 = p } }

    public func migrationCapabilities() -> MigrationCapabilities { live.capabilities.withLock { $0 } }

    public func setMigrationCapabilities(_ c: MigrationCapabilities) throws {
        let busy = migration.withLock { [.setup, .active, .cancelling].contains($0.status) }
        if busy { throw MachineStateError("There's a migration process in progress") }
        live.capabilities.withLock { $0 = c }
    }

    /// Records a new migration status and sends MIGRATION when the `events` capability is on.
    func setMigrationStatus(_ status: MigrationProgress.Status, _ update: (inout MigrationProgress) -> Void = { _ in }) {
        migration.withLock { m in
            m.status = status
            update(&m)
        }
        emitMigrationEvent(.migration(status: status))
    }

    func emitMigrationEvent(_ e: MachineEvent) {
        if live.capabilities.withLock({ $0.events }) { onControl { emit(e) } }
    }

    public func cancelMigration() {
        let cancelling = migration.withLock { m -> Bool in
            guard m.status == .setup || m.status == .active else { return false }
            m.status = .cancelling
            return true
        }
        guard cancelling else { return }
        emitMigrationEvent(.migration(status: .cancelling))
        live.cancelled.store(true, ordering: .sequentiallyConsistent)
        live.socket.withLock { fd in if fd >= 0 { shutdown(fd, Int32(SHUT_RDWR)) } }
    }

    /// Runs `body` with every hart out of guest code (a pause the guest does not see as a
    /// stop: no run-state change, no event). Control queue.
    func withHartsOut<T>(_ body: () throws -> T) rethrows -> T {
        let running = runState == .running
        if running { pauseHarts() }
        defer { if running { for v in vcpus { v.resume() } } }
        return try body()
    }

    // MARK: Source

    /// The outgoing live migration (`tcp:`/`unix:`), from connecting to the switch-over.
    /// Migration queue. Whatever fails, the guest runs on with its disks, as before.
    func runLiveMigration(_ target: MigrationURI, start: UInt64) {
        var fd: Int32 = -1
        var logging = false
        do {
            fd = try MigrationSocket.connect(target)
            let connected = fd
            live.socket.withLock { $0 = connected }
            if live.cancelled.load(ordering: .sequentiallyConsistent) { throw MachineStateError("cancelled") }
            let sink = StateSink(write: { try MigrationSocket.sendAll(connected, $0) })
            setMigrationStatus(.active) { $0.setupTime = (now() &- start) / 1_000_000 }
            try MachineStateWriter.writeHeader(identity: stateIdentity, version: MachineStateFormat.liveVersion, to: sink)

            let firstPass: [UInt64] = try onControl {
                guard isLive, hasStarted, runState != .inmigrate else { throw MachineStateError("the machine is not running") }
                return withHartsOut {
                    board.ram.startDirtyLogging()
                    logging = true
                    let candidates = board.ram.possiblyNonZeroPages()
                    let pages = Int(board.ram.size >> 12)
                    return (0..<pages).compactMap { (candidates?[$0] ?? true) ? UInt64($0) : nil }
                }
            }
            let ramPages = board.ram.size >> 12
            migration.withLock { $0.zeroPages = ramPages - UInt64(firstPass.count) }

            var pages = firstPass
            var pass = 1
            var highDirtyCount = 0
            emitMigrationEvent(.migrationPass(pass))
            while true {
                let passStart = now()
                let bytesBefore = sink.position
                try sendPages(pages, skipZero: pass == 1, sink: sink, fd: connected)
                let dirty = onControl { withHartsOut { board.ram.harvestDirtyPages() } }
                let seconds = max(Double(now() &- passStart) / 1e9, 1e-4)
                let sent = sink.position - bytesBefore
                let bandwidth = Double(sent) / seconds
                let remaining = UInt64(dirty.count) * 4096
                let limit = live.parameters.withLock { $0 }
                let expectedMs = Double(remaining) / max(bandwidth, 1) * 1000
                let expected = UInt64(expectedMs.rounded(.up))
                migration.withLock { m in
                    m.remaining = remaining
                    m.expectedDowntime = expected
                    m.dirtySyncCount += 1
                    m.dirtyPagesRate = UInt64(Double(dirty.count) / seconds)
                    m.pagesPerSecond = UInt64(Double(pages.count) / seconds)
                    m.mbps = bandwidth * 8 / 1_000_000
                    m.transferred = sink.position
                }
                // Switch over once the rest fits downtime-limit; but while passes still shrink
                // the dirty set (to under half of what the pass sent), one more pass is cheap
                // and makes the pause shorter, down to about a millisecond's worth of pages.
                let shrinking = dirty.count * 2 < pages.count && pass < 30
                let small = Double(remaining) <= bandwidth / 1000 || dirty.count <= 16
                if expectedMs <= Double(limit.downtimeLimit) && (small || !shrinking) { pages = dirty; break }
                if migrationCapabilities().autoConverge {
                    // QEMU's rule: when the guest dirtied more than half of what was sent, twice
                    // in a row, slow the vCPUs down (first step, then one increment each time).
                    if remaining * 2 > sent {
                        highDirtyCount += 1
                        if highDirtyCount >= 2 {
                            highDirtyCount = 0
                            raiseThrottle(limit)
                        }
                    }
                }
                pages = dirty
                pass += 1
                emitMigrationEvent(.migrationPass(pass))
            }
            try switchOver(remainingPages: pages, sink: sink, fd: connected, start: start)
            logging = false
        } catch {
            stopThrottle()
            if logging { onControl { withHartsOut { board.ram.stopDirtyLogging() } } }
            let cancelled = live.cancelled.load(ordering: .sequentiallyConsistent)
            var reason = "\(error)"
            // A destination that refused the stream says why on the return path.
            if !cancelled, fd >= 0, MigrationSocket.hasInput(fd), let why = try? MigrationReply.read(fd, timeout: 1) {
                reason = "the destination refused the stream: \(why)"
            }
            setMigrationStatus(cancelled ? .cancelled : .failed) { m in
                m.error = cancelled ? nil : reason
                m.totalTime = (now() &- start) / 1_000_000
            }
        }
        live.socket.withLock { $0 = -1 }
        if fd >= 0 { close(fd) }
    }

    /// Sends `pages` in page records, honouring `max-bandwidth` and `migrate_cancel`.
    private func sendPages(_ pages: [UInt64], skipZero: Bool, sink: StateSink, fd: Int32) throws {
        var windowStart = now()
        var windowBytes: UInt64 = 0
        var i = 0
        while i < pages.count {
            if live.cancelled.load(ordering: .relaxed) { throw MachineStateError("cancelled") }
            // A refusal on the return path ends the migration at once.
            if MigrationSocket.hasInput(fd) { throw MachineStateError("the destination stopped the migration") }
            let end = min(i + pagesPerRecord, pages.count)
            let before = sink.position
            let sent = try MachineStateWriter.writePages(pages[i..<end], ram: board.ram, skipZero: skipZero, to: sink)
            try sink.flush()
            windowBytes += sink.position - before
            migration.withLock { m in
                m.normalPages += UInt64(sent.normal)
                m.zeroPages += skipZero ? 0 : UInt64(sent.zero)
                m.transferred = sink.position
            }
            i = end
            // Rate limit: the bytes of this window may not run ahead of max-bandwidth.
            let bandwidth = max(live.parameters.withLock { $0.maxBandwidth }, 1)
            while true {
                let due = UInt64(Double(windowBytes) / Double(bandwidth) * 1e9)
                let elapsed = now() &- windowStart
                if elapsed >= due { break }
                if live.cancelled.load(ordering: .relaxed) { throw MachineStateError("cancelled") }
                usleep(useconds_t(min((due - elapsed) / 1000, 10_000)))
            }
            if now() &- windowStart > 100_000_000 {
                windowStart = now()
                windowBytes = 0
            }
        }
    }

    /// The paused part: the guest stops, the last dirty pages, the device state and the run
    /// state go over, the disks are handed over, and the destination confirms. On any failure
    /// the disks are taken back and the guest runs again (unless it was paused before).
    private func switchOver(remainingPages: [UInt64], sink: StateSink, fd: Int32, start: UInt64) throws {
        stopThrottle()
        try onControl {
            guard isLive else { throw MachineStateError("the machine shut down during the migration") }
            let pausedAt = now()
            let wasRunning = runState == .running
            var handedOver = false
            try whilePaused(during: .finishMigrate) {
                do {
                    if live.cancelled.load(ordering: .sequentiallyConsistent) { throw MachineStateError("cancelled") }
                    let last = Set(remainingPages).union(board.ram.harvestDirtyPages()).sorted()
                    board.ram.stopDirtyLogging()
                    var i = 0
                    while i < last.count {
                        let end = min(i + pagesPerRecord, last.count)
                        let sent = try MachineStateWriter.writePages(last[i..<end], ram: board.ram, skipZero: false, to: sink)
                        migration.withLock { m in
                            m.normalPages += UInt64(sent.normal)
                            m.zeroPages += UInt64(sent.zero)
                        }
                        i = end
                    }
                    try MachineStateWriter.writeSections(collectSections(), to: sink)
                    // The disks: flushed and their locks released before the destination is
                    // told to go, so that it can take them.
                    try handOverDisks()
                    handedOver = true
                    try MachineStateWriter.writeRunState(running: wasRunning, to: sink)
                    try MachineStateWriter.writeEnd(to: sink)
                    try sink.flush()
                    if let refusal = try MigrationReply.read(fd, timeout: replyTimeout) {
                        throw MachineStateError("the destination refused the stream: \(refusal)")
                    }
                    live.disksHandedOver.store(true, ordering: .sequentiallyConsistent)
                    let downtime = (now() &- pausedAt) / 1_000_000
                    let total = (now() &- start) / 1_000_000
                    migration.withLock { m in
                        m.status = .completed
                        m.downtime = downtime
                        m.totalTime = total
                        m.transferred = sink.position
                        m.remaining = 0
                        m.mbps = Double(sink.position) * 8 / 1_000_000 / max(Double(total) / 1000, 0.001)
                    }
                    return .postmigrate
                } catch {
                    if handedOver {
                        do {
                            try takeBackDisks()
                        } catch let lockError {
                            // Someone else holds the images now: running would risk two writers.
                            FileHandle.standardError.write(Data("machine-server: error: cannot take back the disks after a failed migration: \(lockError)\n".utf8))
                            throw MachineStateError("\(error); the disks could not be taken back (\(lockError)), so the machine stays paused")
                        }
                    }
                    throw error
                }
            }
        }
        emitMigrationEvent(.migration(status: .completed))
    }

    /// Flushes every writable disk and releases its image locks (QEMU's inactivation).
    func handOverDisks() throws {
        let disks = snapshotDisks()
        for d in disks where !d.readOnly { try d.image.flush() }
        for d in disks { d.image.releaseLocks() }
    }

    /// Takes every disk's locks back and rereads its metadata (QEMU's activation).
    func takeBackDisks() throws {
        for d in snapshotDisks() { try d.image.activate() }
    }

    // MARK: Auto-converge

    private func raiseThrottle(_ p: MigrationParameters) {
        let current = live.throttle.load(ordering: .relaxed)
        let next = current == 0 ? p.throttleInitial : min(current + p.throttleIncrement, p.maxThrottle)
        live.throttle.store(next, ordering: .relaxed)
        migration.withLock { $0.throttlePercentage = next }
        if current == 0 {
            let t = Thread { [self] in throttleLoop() }
            t.name = "migration throttle"
            t.start()
        }
    }

    private func stopThrottle() {
        live.throttle.store(0, ordering: .relaxed)
        migration.withLock { $0.throttlePercentage = 0 }
    }

    /// Every 10 ms of guest time, sleeps each vCPU for pct/(100-pct) of it (QEMU's
    /// cpu_throttle_timer). Ends when the throttle drops to zero.
    private func throttleLoop() {
        let slice: UInt64 = 10_000_000
        while true {
            let pct = live.throttle.load(ordering: .relaxed)
            if pct <= 0 { return }
            let sleep = slice * UInt64(pct) / UInt64(100 - pct)
            for v in vcpus { v.throttle(nanoseconds: sleep) }
            usleep(useconds_t((slice + sleep) / 1000))
        }
    }

    // MARK: Destination

    /// Listens on a `tcp:`/`unix:` source and receives the migration in the background; when
    /// it fails the server exits with status 1, as QEMU's destination does. Returns once
    /// listening. Any thread.
    func listenForLiveMigration(_ source: MigrationURI, uri: String) throws {
        let listener = try MigrationSocket.listen(source)
        migrationQueue.async { [self] in
            var start = now()
            var conn: Int32 = -1
            do {
                conn = try MigrationSocket.acceptOne(listener, uri: source)
                start = now()
                try receiveLive(conn, start: start)
                close(conn)
            } catch {
                if conn >= 0 { close(conn) }
                setMigrationStatus(.failed) { m in
                    m.error = "\(error)"
                    m.totalTime = (now() &- start) / 1_000_000
                }
                FileHandle.standardError.write(Data("machine-server: error: load of migration failed (\(uri)): \(error)\n".utf8))
                requestHostShutdown(cause: .hostError, exitCode: 1)
            }
        }
    }

    /// Receives a live stream into this machine (in `inmigrate`), takes the disks, confirms to
    /// the source and runs. Migration queue.
    private func receiveLive(_ fd: Int32, start: UInt64) throws {
        // The listener may have been bound before the machine started (`--incoming`); nothing
        // may touch RAM before `start()` has loaded and reset the board. Its action on the
        // control queue has finished once an empty action queued after it has run.
        while !hasStarted {
            guard isLive else { throw MachineStateError("the machine shut down before the migration arrived") }
            usleep(1000)
        }
        onControl {}
        setMigrationStatus(.active) { m in m.ramTotal = board.ram.size }
        let source = StateSource(fileDescriptor: fd)
        func refuse(_ error: any Error) -> any Error {
            let message = "\(error)"
            try? MigrationReply.refusal(message).withUnsafeBytes { try MigrationSocket.sendAll(fd, $0) }
            shutdown(fd, Int32(SHUT_WR))
            return error
        }
        let reader: LiveStateReader
        do {
            reader = try LiveStateReader(source: source)
            guard reader.identity == stateIdentity else {
                throw MachineStateError("the state was saved from a different machine: "
                                        + describeIdentityMismatch(reader.identity, stateIdentity))
            }
        } catch {
            throw refuse(error)
        }
        guard runState == .inmigrate else { throw refuse(MachineStateError("the machine is not waiting for a migration")) }
        let (sections, running) = try reader.readAll(into: board.ram)
        let switchStart = now()
        try onControl {
            guard isLive, runState == .inmigrate else { throw MachineStateError("the machine is not waiting for a migration") }
            do {
                try checkSectionsPresent(sections)
                try applySections(sections)
                try takeBackDisks()
            } catch {
                throw refuse(error)
            }
            try MigrationReply.ok.withUnsafeBytes { try MigrationSocket.sendAll(fd, $0) }
            if running && !startPaused {
                resumeAll()
                emit(.resume)
            } else {
                setRunState(.paused)
            }
        }
        let micros = (now() &- start) / 1000
        setMigrationStatus(.completed) { m in
            m.totalTime = micros / 1000
            m.downtime = (now() &- switchStart) / 1_000_000
            m.transferred = reader.position
            m.normalPages = reader.normalPages
            m.zeroPages = reader.zeroPages
        }
        FileHandle.standardError.write(Data("machine-server: received the machine over the migration connection in \(micros / 1000) ms\n".utf8))
    }
}
