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
    /// migration, or once a post-copy package has gone out): the source must not run the
    /// guest again.
    let disksHandedOver = Atomic<Bool>(false)
    /// Set by `migrate-start-postcopy`; the sender checks it between page records.
    let postcopyRequested = Atomic<Bool>(false)
    /// What the destination answered to the post-copy advice (source).
    let postcopyReadiness = Mutex(PostcopyReadiness.unknown)
    /// Destination: post-copy broke off; harts may be blocked on pages that will never come,
    /// so nothing may wait for them (shutdown, stop).
    let postcopyBroken = Atomic<Bool>(false)
    /// Destination: the userfaultfd of a post-copy migration. Held until the process ends if
    /// post-copy breaks: closing it would let blocked harts run on zero pages.
    let userFault = Mutex<UserFault?>(nil)
}

/// Whether the destination of the running migration can switch to post-copy.
enum PostcopyReadiness: Equatable {
    case unknown
    case ready
    case unavailable(String)
}

/// A refusal the destination sent on the return path.
private struct DestinationRefused: Error, CustomStringConvertible {
    let reason: String
    var description: String { "the destination refused the stream: \(reason)" }
}

/// How long the source waits, paused, for the destination to confirm the switch-over.
private let replyTimeout: Double = 60

/// Pages per page record (1 MiB of data): the granularity of cancel and bandwidth checks.
private let pagesPerRecord = 256

/// Pages per background record in post-copy: small, so that a requested page waits behind
/// little data.
private let postcopyPagesPerRecord = 32

private func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

/// Timestamps of a switch-over's steps, written to stderr when MACHINE_SERVER_MIGRATION_TRACE
/// is set (for docs/PERFORMANCE.md: where the pause goes). One thread at a time.
struct SwitchOverTrace {
    static let enabled = ProcessInfo.processInfo.environment["MACHINE_SERVER_MIGRATION_TRACE"] != nil
    private var marks: [(String, UInt64)] = []

    mutating func mark(_ label: @autoclosure () -> String) {
        if Self.enabled { marks.append((label(), now())) }
    }

    /// Writes every step with its time since the first mark (and the first mark's clock, so
    /// that two processes' traces line up), in microseconds.
    func dump(_ side: String) {
        guard Self.enabled, let first = marks.first else { return }
        var line = "machine-server: migration trace (\(side), t0 \(first.1 / 1000) us):"
        for (label, t) in marks { line += " \(label) +\((t &- first.1) / 1000)" }
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }
}

extension VirtualMachine {
    // MARK: Parameters, capabilities, events

    public func migrationParameters() -> MigrationParameters { live.parameters.withLock { $0 } }

    public func setMigrationParameters(_ p: MigrationParameters) { live.parameters.withLock { $0 = p } }

    public func migrationCapabilities() -> MigrationCapabilities { live.capabilities.withLock { $0 } }

    public func setMigrationCapabilities(_ c: MigrationCapabilities) throws {
        // A destination may still change its capabilities while it waits for the stream.
        let waiting = runState == .inmigrate
        let busy = migration.withLock { m in
            [.active, .cancelling, .postcopyActive, .postcopyPaused].contains(m.status) || (m.status == .setup && !waiting)
        }
        if busy { throw MachineStateError("There's a migration process in progress") }
        if c.postcopyRam && !live.capabilities.withLock({ $0.postcopyRam }) && waiting {
            // The destination places pages with userfaultfd: refuse now rather than mid-way.
            do {
                try UserFault.checkAvailable()
            } catch {
                throw MachineStateError("Postcopy is not supported: \(error)")
            }
        }
        live.capabilities.withLock { $0 = c }
    }

    public func startPostcopy() throws {
        guard migrationCapabilities().postcopyRam else {
            throw MachineStateError("Enable postcopy with migrate_set_capability before the start of migration")
        }
        let status = migration.withLock { $0.status }
        guard runState != .inmigrate else { throw MachineStateError("migrate-start-postcopy is for the source of a migration") }
        switch status {
        case .setup, .active: break
        case .postcopyActive, .postcopyPaused: throw MachineStateError("Postcopy is already started")
        default: throw MachineStateError("Postcopy must be started after migration has been started")
        }
        if case .unavailable(let why) = live.postcopyReadiness.withLock({ $0 }) {
            throw MachineStateError("the destination cannot run post-copy: \(why)")
        }
        live.postcopyRequested.store(true, ordering: .sequentiallyConsistent)
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

    /// The outgoing live migration (`tcp:`/`unix:`), from connecting to the switch-over (or
    /// to the end of post-copy). Migration queue. Whatever fails before the destination may
    /// have run the guest, the guest runs on here with its disks, as before.
    func runLiveMigration(_ target: MigrationURI, start: UInt64) {
        var fd: Int32 = -1
        var logging = false
        var returnPath: ReturnPathReader? = nil
        let postcopy = migrationCapabilities().postcopyRam
        live.postcopyReadiness.withLock { $0 = .unknown }
        do {
            fd = try MigrationSocket.connect(target)
            let connected = fd
            live.socket.withLock { $0 = connected }
            if live.cancelled.load(ordering: .sequentiallyConsistent) { throw MachineStateError("cancelled") }
            let sink = StateSink(write: { try MigrationSocket.sendAll(connected, $0) })
            let ramPages = board.ram.size >> 12
            let replies = ReturnPathReader(fd: connected, ramPages: ramPages)
            returnPath = replies
            try MachineStateWriter.writeHeader(identity: stateIdentity, version: MachineStateFormat.liveVersion,
                                               flags: postcopy ? MachineStateFormat.flagPostcopy : 0, to: sink)
            if postcopy {
                // QEMU's postcopy advice: the destination says at once whether it can do it.
                try sink.flush()
                guard let answer = try replies.next(timeout: 30) else {
                    throw MachineStateError("the destination did not answer the post-copy advice within 30 s")
                }
                switch answer {
                case .postcopyReady:
                    live.postcopyReadiness.withLock { $0 = .ready }
                case .postcopyUnavailable(let why):
                    live.postcopyReadiness.withLock { $0 = .unavailable(why) }
                    if live.postcopyRequested.load(ordering: .sequentiallyConsistent) {
                        throw MachineStateError("post-copy was requested but the destination cannot run it: \(why)")
                    }
                case .refused(let why):
                    throw DestinationRefused(reason: why)
                default:
                    throw MachineStateError("the destination answered the post-copy advice with \(answer)")
                }
            }
            setMigrationStatus(.active) { $0.setupTime = (now() &- start) / 1_000_000 }

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
            migration.withLock { $0.zeroPages = ramPages - UInt64(firstPass.count) }
            // Post-copy needs the pages the destination does not hold up to date: those not
            // yet sent in this pass and those dirtied since they were sent.
            var stale: PageBitmap? = nil
            if postcopy {
                var b = PageBitmap(pageCount: ramPages)
                for p in firstPass { b.insert(p) }
                stale = b
            }

            var pages = firstPass
            var pass = 1
            var highDirtyCount = 0
            var switchToPostcopy = false
            emitMigrationEvent(.migrationPass(pass))
            while true {
                let passStart = now()
                let bytesBefore = sink.position
                let finished = try sendPages(pages, skipZero: pass == 1, sink: sink, replies: replies, stale: &stale)
                // The pass ends when the destination has read it, not when it sits in socket
                // buffers: the bandwidth is then the real one, and a switch-over never starts
                // with megabytes still in flight for the destination to read while paused.
                if finished { try drain(sequence: UInt32(truncatingIfNeeded: pass), sink: sink, replies: replies) }
                let dirty = onControl { withHartsOut { board.ram.harvestDirtyPages() } }
                if stale != nil { for p in dirty { stale!.insert(p) } }
                if !finished {
                    switchToPostcopy = true
                    break
                }
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
                if live.postcopyRequested.load(ordering: .sequentiallyConsistent) {
                    switchToPostcopy = true
                    break
                }
                // Switch over once the rest fits downtime-limit; but while passes still shrink
                // the dirty set (to under half of what the pass sent), one more pass is cheap
                // and makes the pause shorter, down to about a millisecond's worth of pages.
                let shrinking = dirty.count * 2 < pages.count && pass < 30
                let small = Double(remaining) <= bandwidth / 1000 || dirty.count <= 16
                let autoConverge = migrationCapabilities().autoConverge
                if expectedMs <= Double(limit.downtimeLimit) && (small || !shrinking) {
                    // A guest whose dirty set no longer shrinks would switch with up to
                    // downtime-limit's worth of pages. With auto-converge, while the throttle can
                    // still rise, slow it down one more step and take one more pass instead, so
                    // that the pause holds about a millisecond's worth (QEMU's guests dirty
                    // slower under TCG and get there without this).
                    let throttle = live.throttle.load(ordering: .relaxed)
                    if small || !autoConverge || throttle >= limit.maxThrottle || pass >= 30 {
                        pages = dirty
                        break
                    }
                    raiseThrottle(limit)
                    highDirtyCount = 0
                    pages = dirty
                    pass += 1
                    emitMigrationEvent(.migrationPass(pass))
                    continue
                }
                if autoConverge {
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
            if switchToPostcopy, let stale {
                logging = false
                try runPostcopy(stale: stale, sink: sink, replies: replies, start: start)
            } else {
                try switchOver(remainingPages: pages, sink: sink, replies: replies, start: start)
                logging = false
            }
        } catch {
            stopThrottle()
            if logging { onControl { withHartsOut { board.ram.stopDirtyLogging() } } }
            let cancelled = live.cancelled.load(ordering: .sequentiallyConsistent)
            var reason = "\(error)"
            // A destination that refused the stream says why on the return path.
            if !cancelled, !(error is DestinationRefused), let replies = returnPath, MigrationSocket.hasInput(fd),
               let why = try? replies.awaitReply(timeout: 1) {
                reason = DestinationRefused(reason: why).description
            }
            setMigrationStatus(cancelled ? .cancelled : .failed) { m in
                m.error = cancelled ? nil : reason
                m.totalTime = (now() &- start) / 1_000_000
            }
        }
        live.socket.withLock { $0 = -1 }
        if fd >= 0 { close(fd) }
    }

    /// Sends `pages` in page records, honouring `max-bandwidth` and `migrate_cancel`, and
    /// takes each sent page out of `stale`. Returns false when it stopped early because
    /// post-copy was asked for.
    private func sendPages(_ pages: [UInt64], skipZero: Bool, sink: StateSink, replies: ReturnPathReader,
                           stale: inout PageBitmap?) throws -> Bool {
        var windowStart = now()
        var windowBytes: UInt64 = 0
        var i = 0
        while i < pages.count {
            if live.cancelled.load(ordering: .relaxed) { throw MachineStateError("cancelled") }
            if stale != nil && live.postcopyRequested.load(ordering: .relaxed) { return false }
            // A refusal on the return path ends the migration at once.
            for m in try replies.available() {
                if case .refused(let why) = m { throw DestinationRefused(reason: why) }
                throw MachineStateError("the destination sent \(m) during pre-copy")
            }
            let end = min(i + pagesPerRecord, pages.count)
            let before = sink.position
            let sent = try MachineStateWriter.writePages(pages[i..<end], ram: board.ram, skipZero: skipZero, to: sink)
            try sink.flush()
            if stale != nil { for p in pages[i..<end] { stale!.remove(p) } }
            windowBytes += sink.position - before
            migration.withLock { m in
                m.normalPages += UInt64(sent.normal)
                m.zeroPages += skipZero ? 0 : UInt64(sent.zero)
                m.transferred = sink.position
            }
            i = end
            // Rate limit: the bytes of this window may not run ahead of max-bandwidth (read
            // again each time, so that raising it frees a migration held by a low one).
            while true {
                let bandwidth = max(live.parameters.withLock { $0.maxBandwidth }, 1)
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
        return true
    }

    /// Sends a sync record and waits until the destination has read up to it. Migration queue.
    private func drain(sequence: UInt32, sink: StateSink, replies: ReturnPathReader) throws {
        try MachineStateWriter.writeSync(sequence: sequence, to: sink)
        try sink.flush()
        let deadline = now() + UInt64(replyTimeout * 1e9)
        while true {
            if live.cancelled.load(ordering: .relaxed) { throw MachineStateError("cancelled") }
            guard now() < deadline else {
                throw MachineStateError("the destination did not read the stream within \(Int(replyTimeout)) s")
            }
            switch try replies.next(timeout: 0.1) {
            case nil: continue
            case .synced(let n) where n == sequence: return
            case .refused(let why): throw DestinationRefused(reason: why)
            case let m?: throw MachineStateError("the destination sent \(m) instead of sync \(sequence)")
            }
        }
    }

    /// Post-copy, source side. The guest stops (`finish-migrate`) and the package goes out: the
    /// bitmap of pages the destination lacks, the device state and the run state, after the
    /// disks are flushed and handed over; the destination then runs the guest. If anything
    /// fails up to here the destination cannot have run it: the disks come back and the guest
    /// runs on here. After the package, the pending pages stream out in the background, the
    /// destination's requests first, until all are sent and the destination confirms
    /// (`completed`, run state `postmigrate`). If the connection or the destination fails
    /// then, the guest can continue nowhere: the status becomes `postcopy-paused` and this
    /// machine keeps its paused copy (RAM and devices as at the switch-over), never running
    /// it again, since the destination already ran the guest and wrote its disks.
    private func runPostcopy(stale: PageBitmap, sink: StateSink, replies: ReturnPathReader, start: UInt64) throws {
        stopThrottle()
        var pending = stale
        var pausedAt: UInt64 = 0
        try onControl {
            guard isLive else { throw MachineStateError("the machine shut down during the migration") }
            pausedAt = now()
            let wasRunning = runState == .running
            var handedOver = false
            try whilePaused(during: .finishMigrate) {
                do {
                    if live.cancelled.load(ordering: .sequentiallyConsistent) { throw MachineStateError("cancelled") }
                    for p in board.ram.harvestDirtyPages() { pending.insert(p) }
                    board.ram.stopDirtyLogging()
                    try MachineStateWriter.writePostcopy(pending: pending, to: sink)
                    try MachineStateWriter.writeSections(collectSections(), to: sink)
                    try handOverDisks()
                    handedOver = true
                    try MachineStateWriter.writeRunState(running: wasRunning, to: sink)
                    try sink.flush()
                } catch {
                    if handedOver { try takeBackDisksOrStayPaused(after: error) }
                    throw error
                }
                // From here the destination may run the guest: this copy must never run again.
                live.disksHandedOver.store(true, ordering: .sequentiallyConsistent)
                migration.withLock { m in
                    m.status = .postcopyActive
                    m.remaining = UInt64(pending.count) * 4096
                    m.transferred = sink.position
                }
                return .finishMigrate
            }
        }
        emitMigrationEvent(.migration(status: .postcopyActive))

        var destinationRuns = false
        do {
            var toSend = pending
            var urgent: [UInt64] = []
            var cursor: UInt64 = 0
            func handle(_ m: ReturnPathMessage) throws {
                switch m {
                case .pageRequest(let pages): urgent += pages
                case .running:
                    if !destinationRuns {
                        destinationRuns = true
                        let downtime = (now() &- pausedAt) / 1_000_000
                        migration.withLock { $0.downtime = downtime }
                    }
                case .refused(let why): throw DestinationRefused(reason: why)
                default: throw MachineStateError("the destination sent \(m) during post-copy")
                }
            }
            var batch: [UInt64] = []
            batch.reserveCapacity(MachineStateFormat.maxPagesPerRecord)
            var windowStart = now()
            var windowBytes: UInt64 = 0
            while toSend.count > 0 {
                for m in try replies.available() { try handle(m) }
                // max-postcopy-bandwidth holds back the background pages, never requested ones.
                let limit = live.parameters.withLock { $0.maxPostcopyBandwidth }
                if urgent.isEmpty && limit > 0 {
                    let due = UInt64(Double(windowBytes) / Double(limit) * 1e9)
                    let elapsed = now() &- windowStart
                    if elapsed < due {
                        // Wait for the time to pass or a request to arrive, whichever is first.
                        var p = pollfd(fd: replies.fd, events: Int16(POLLIN), revents: 0)
                        _ = poll(&p, 1, Int32(min((due - elapsed) / 1_000_000 + 1, 10)))
                        continue
                    }
                    if elapsed > 100_000_000 {
                        windowStart = now()
                        windowBytes = 0
                    }
                }
                batch.removeAll(keepingCapacity: true)
                // Requested pages first (those not yet sent), then the next ones in order.
                var requested = 0
                while !urgent.isEmpty && batch.count < MachineStateFormat.maxPagesPerRecord {
                    let p = urgent.removeFirst()
                    if toSend.contains(p) {
                        toSend.remove(p)
                        batch.append(p)
                        requested += 1
                    }
                }
                if batch.isEmpty {
                    while batch.count < postcopyPagesPerRecord, let p = toSend.next(from: cursor) ?? toSend.next(from: 0) {
                        toSend.remove(p)
                        batch.append(p)
                        cursor = p + 1
                    }
                }
                if batch.isEmpty { continue }
                let before = sink.position
                let sent = try MachineStateWriter.writePages(batch[...], ram: board.ram, skipZero: false, to: sink)
                try sink.flush()
                if requested == 0 { windowBytes += sink.position - before }
                let left = UInt64(toSend.count) * 4096
                migration.withLock { m in
                    m.normalPages += UInt64(sent.normal)
                    m.zeroPages += UInt64(sent.zero)
                    m.postcopyRequests += UInt64(requested)
                    m.transferred = sink.position
                    m.remaining = left
                }
            }
            try MachineStateWriter.writeEnd(to: sink)
            try sink.flush()
            if let why = try replies.awaitReply(timeout: replyTimeout, other: { m in
                if case .running = m { try handle(m) }
            }) {
                throw DestinationRefused(reason: why)
            }
        } catch {
            if !destinationRuns && error is DestinationRefused {
                // The destination gave up before it ran the guest: nothing ran anywhere since
                // the pause, so the guest goes on here, with its disks.
                try onControl {
                    try takeBackDisksOrStayPaused(after: error)
                    live.disksHandedOver.store(false, ordering: .sequentiallyConsistent)
                    if runState == .finishMigrate {
                        resumeAll()
                        emit(.resume)
                    }
                }
                throw error
            }
            let left = migration.withLock { $0.remaining / 4096 }
            let message = "post-copy broke off: \(error); the guest cannot continue on the destination, and this "
                + "source keeps its paused copy (\(left) pages were not sent yet)"
            FileHandle.standardError.write(Data("machine-server: error: \(message)\n".utf8))
            setMigrationStatus(.postcopyPaused) { m in
                m.error = message
                m.totalTime = (now() &- start) / 1_000_000
            }
            return
        }
        let total = (now() &- start) / 1_000_000
        migration.withLock { m in
            m.status = .completed
            m.totalTime = total
            m.transferred = sink.position
            m.remaining = 0
            m.mbps = Double(sink.position) * 8 / 1_000_000 / max(Double(total) / 1000, 0.001)
        }
        onControl { if runState == .finishMigrate { setRunState(.postmigrate) } }
        emitMigrationEvent(.migration(status: .completed))
    }

    /// Takes the disks back after a failed switch-over; when someone else holds them now,
    /// throws (the machine then stays paused rather than risk two writers). Control queue.
    private func takeBackDisksOrStayPaused(after error: any Error) throws {
        do {
            try takeBackDisks()
        } catch let lockError {
            FileHandle.standardError.write(Data("machine-server: error: cannot take back the disks after a failed migration: \(lockError)\n".utf8))
            throw MachineStateError("\(error); the disks could not be taken back (\(lockError)), so the machine stays paused")
        }
    }

    /// The paused part: the guest stops, the last dirty pages, the device state and the run
    /// state go over, the disks are handed over, and the destination confirms. On any failure
    /// the disks are taken back and the guest runs again (unless it was paused before).
    private func switchOver(remainingPages: [UInt64], sink: StateSink, replies: ReturnPathReader, start: UInt64) throws {
        stopThrottle()
        try onControl {
            guard isLive else { throw MachineStateError("the machine shut down during the migration") }
            let pausedAt = now()
            var trace = SwitchOverTrace()
            trace.mark("pause")
            defer { trace.dump("source") }
            let wasRunning = runState == .running
            var handedOver = false
            try whilePaused(during: .finishMigrate) {
                do {
                    trace.mark("paused")
                    if live.cancelled.load(ordering: .sequentiallyConsistent) { throw MachineStateError("cancelled") }
                    let last = Set(remainingPages).union(board.ram.harvestDirtyPages()).sorted()
                    board.ram.stopDirtyLogging()
                    trace.mark("harvested(\(last.count))")
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
                    trace.mark("pages")
                    let sections = collectSections()
                    trace.mark("collected(\(sections.reduce(0) { $0 + $1.payload.count }))")
                    try MachineStateWriter.writeSections(sections, to: sink)
                    // The disks: flushed and their locks released before the destination is
                    // told to go, so that it can take them.
                    try handOverDisks()
                    trace.mark("disks")
                    handedOver = true
                    try MachineStateWriter.writeRunState(running: wasRunning, to: sink)
                    try MachineStateWriter.writeEnd(to: sink)
                    try sink.flush()
                    trace.mark("sent")
                    defer { trace.mark("answered") }
                    if let refusal = try replies.awaitReply(timeout: replyTimeout, other: { m in
                        throw MachineStateError("the destination sent \(m) instead of its answer")
                    }) {
                        throw DestinationRefused(reason: refusal)
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
                    // Someone else may hold the images now: running would risk two writers.
                    if handedOver { try takeBackDisksOrStayPaused(after: error) }
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
                if live.postcopyBroken.load(ordering: .sequentiallyConsistent) {
                    // The status is already postcopy-paused and the reason printed.
                    migration.withLock { $0.totalTime = (now() &- start) / 1_000_000 }
                } else {
                    setMigrationStatus(.failed) { m in
                        m.error = "\(error)"
                        m.totalTime = (now() &- start) / 1_000_000
                    }
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
        let sendLock = Mutex(())
        func send(_ m: ReturnPathMessage) throws {
            try sendLock.withLock { _ in try m.encoded.withUnsafeBytes { try MigrationSocket.sendAll(fd, $0) } }
        }
        func refuse(_ error: any Error) -> any Error {
            try? send(.refused("\(error)"))
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
        if reader.postcopyAdvised {
            // Answer the advice: this end can do post-copy only with postcopy-ram set and
            // userfaultfd at hand.
            var why: String? = nil
            if !migrationCapabilities().postcopyRam {
                why = "the postcopy-ram capability is not set on the destination"
            } else {
                do { try UserFault.checkAvailable() } catch { why = "\(error)" }
            }
            try send(why.map { .postcopyUnavailable($0) } ?? .postcopyReady)
        }
        let switchOver = try reader.readUntilSwitchOver(into: board.ram) { try send(.synced($0)) }
        guard case .complete(let sections, let running) = switchOver else {
            if case .postcopy(let sections, let running, let pending) = switchOver {
                try receivePostcopy(fd, reader: reader, sections: sections, running: running, pending: pending,
                                    start: start, send: send, refuse: refuse)
            }
            return
        }
        let switchStart = now()
        var trace = SwitchOverTrace()
        trace.mark("end read")
        try onControl {
            trace.mark("control")
            guard isLive, runState == .inmigrate else { throw MachineStateError("the machine is not waiting for a migration") }
            do {
                try checkSectionsPresent(sections)
                try applySections(sections)
                trace.mark("applied")
                try takeBackDisks()
                trace.mark("disks")
            } catch {
                throw refuse(error)
            }
            try send(.ok)
            trace.mark("ok sent")
            if running && !startPaused {
                resumeAll()
                trace.mark("resumed")
                emit(.resume)
            } else {
                setRunState(.paused)
            }
        }
        trace.dump("destination")
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

    /// Post-copy, destination side, once the package is read. The pending pages are dropped
    /// from RAM and guest RAM is registered with userfaultfd; a fault thread answers every
    /// touch of a missing page (a zero page when the source never had data there, otherwise a
    /// request to the source), a receiver thread places the pages the source streams with
    /// UFFDIO_COPY, and meanwhile the devices are loaded, the disks taken and the guest run.
    /// If the stream then breaks, the guest cannot go on: the status becomes
    /// `postcopy-paused`, the harts stop (those waiting for a page stay blocked: the
    /// userfaultfd is kept open until the process ends) and the caller exits with status 1.
    private func receivePostcopy(_ fd: Int32, reader: LiveStateReader, sections: [StateSection], running: Bool,
                                 pending: PageBitmap, start: UInt64, send: @escaping (ReturnPathMessage) throws -> Void,
                                 refuse: (any Error) -> any Error) throws {
        let ram = board.ram
        let fault: UserFault
        do {
            fault = try UserFault(start: ram.pointer, length: Int(ram.size))
            for (first, count) in pending.runs {
                guard madvise(ram.pointer + Int(first) * 4096, Int(count) * 4096, MADV_DONTNEED) == 0 else {
                    throw MachineStateError("cannot drop the stale pages: \(String(cString: strerror(errno)))")
                }
            }
            try fault.register()
        } catch {
            throw refuse(error)
        }
        live.userFault.withLock { $0 = fault }
        setMigrationStatus(.postcopyActive)
        let pages = PostcopyPages(pending: pending)
        let faultThread = PostcopyFaultThread(fault: fault, pages: pages, send: send)
        faultThread.start()

        // The receiver: every pending page, placed as it arrives.
        let received = DispatchSemaphore(value: 0)
        let receiveError = Mutex<(any Error)?>(nil)
        // The reader is used by this thread alone from now on.
        nonisolated(unsafe) let stream = reader
        let receiver = Thread {
            do {
                try stream.readPostcopyPages(pending: pending) { page, data in
                    if let data { try fault.copy(page: page, from: data) } else { try fault.zero(page: page) }
                    pages.placed(page)
                }
            } catch {
                receiveError.withLock { $0 = error }
            }
            received.signal()
        }
        receiver.name = "postcopy receiver"
        receiver.start()

        let switchStart = now()
        var ranGuest = false
        do {
            try onControl {
                guard isLive, runState == .inmigrate else { throw MachineStateError("the machine is not waiting for a migration") }
                do {
                    try checkSectionsPresent(sections)
                    try applySections(sections)
                    try takeBackDisks()
                } catch {
                    throw refuse(error)
                }
                try send(.running)
                ranGuest = true
                if running && !startPaused {
                    resumeAll()
                    emit(.resume)
                } else {
                    setRunState(.paused)
                }
            }
        } catch {
            // The guest never ran here: the source takes it back.
            faultThread.stop()
            throw error
        }
        let downtime = (now() &- switchStart) / 1_000_000
        migration.withLock { $0.downtime = downtime }
        received.wait()
        if let error = receiveError.withLock({ $0 }) {
            let message = "post-copy broke off: \(error); the guest cannot continue here (\(pages.missing) pages are only on the source, which keeps its paused copy)"
            live.postcopyBroken.store(true, ordering: .sequentiallyConsistent)
            // Harts not waiting for a page stop; the others stay blocked in the kernel.
            for v in vcpus { v.requestPause() }
            faultThread.stop()
            if ranGuest { try? send(.refused(message)) }
            setMigrationStatus(.postcopyPaused) { $0.error = message }
            throw MachineStateError(message)
        }
        // Every page is here: later faults on never-written pages are plain zero pages.
        fault.unregister()
        faultThread.stop()
        live.userFault.withLock { $0 = nil }
        try send(.ok)
        let micros = (now() &- start) / 1000
        setMigrationStatus(.completed) { m in
            m.totalTime = micros / 1000
            m.transferred = reader.position
            m.normalPages = reader.normalPages
            m.zeroPages = reader.zeroPages
            m.postcopyRequests = faultThread.requests
        }
        FileHandle.standardError.write(Data("machine-server: received the machine over the migration connection in \(micros / 1000) ms (post-copy: \(faultThread.requests) pages requested)\n".utf8))
    }
}

/// What a post-copy destination knows of each pending page: placed, or asked for. Shared by
/// the receiver and the fault thread.
final class PostcopyPages: Sendable {
    let pending: PageBitmap
    private let state: Mutex<(placed: PageBitmap, requested: PageBitmap, left: Int)>

    init(pending: PageBitmap) {
        self.pending = pending
        state = Mutex((PageBitmap(pageCount: pending.pageCount), PageBitmap(pageCount: pending.pageCount), pending.count))
    }

    /// Pending pages not yet placed.
    var missing: Int { state.withLock { $0.left } }

    func placed(_ page: UInt64) {
        state.withLock { s in
            if !s.placed.contains(page) {
                s.placed.insert(page)
                s.left -= 1
            }
        }
    }

    /// What to do about a fault on `page`.
    enum FaultAction: Equatable {
        /// Never had data on the source: place a zero page here.
        case zero
        /// Placed already (the fault raced with its arrival): wake the waiters.
        case wake
        /// Asked for already: its arrival wakes the waiters.
        case wait
        /// Ask the source for it.
        case request
    }

    func onFault(_ page: UInt64) -> FaultAction {
        guard pending.contains(page) else { return .zero }
        return state.withLock { s in
            if s.placed.contains(page) { return .wake }
            if s.requested.contains(page) { return .wait }
            s.requested.insert(page)
            return .request
        }
    }
}

/// The thread that serves a post-copy destination's page faults: it reads the userfaultfd and
/// answers each fault (see `PostcopyPages.onFault`), sending requests on the return path.
final class PostcopyFaultThread: @unchecked Sendable {  // unchecked: the counters are atomics, the rest immutable
    private let fault: UserFault
    private let pages: PostcopyPages
    private let send: (ReturnPathMessage) throws -> Void
    private let stopping = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)
    private let requestCount = Atomic<UInt64>(0)

    init(fault: UserFault, pages: PostcopyPages, send: @escaping (ReturnPathMessage) throws -> Void) {
        self.fault = fault
        self.pages = pages
        self.send = send
    }

    /// Pages requested from the source so far.
    var requests: UInt64 { requestCount.load(ordering: .relaxed) }

    func start() {
        let t = Thread { [self] in run() }
        t.name = "postcopy faults"
        t.start()
    }

    /// Stops the thread and waits until it has.
    func stop() {
        stopping.store(true, ordering: .sequentiallyConsistent)
        done.wait()
    }

    private func run() {
        defer { done.signal() }
        var linkBroken = false
        while !stopping.load(ordering: .sequentiallyConsistent) {
            guard let faults = try? fault.waitForFaults(timeoutMs: 50) else { return }
            var ask: [UInt64] = []
            for p in faults {
                switch pages.onFault(p) {
                case .zero: _ = try? fault.zero(page: p)
                case .wake: fault.wake(page: p)
                case .wait: break
                case .request: ask.append(p)
                }
            }
            guard !ask.isEmpty, !linkBroken else { continue }
            var i = 0
            while i < ask.count {
                let chunk = Array(ask[i..<min(i + ReturnPathMessage.maxRequestPages, ask.count)])
                do {
                    try send(.pageRequest(chunk))
                } catch {
                    // The receiver sees the broken link too and ends the migration.
                    linkBroken = true
                    break
                }
                requestCount.add(UInt64(chunk.count), ordering: .relaxed)
                i += chunk.count
            }
        }
    }
}
