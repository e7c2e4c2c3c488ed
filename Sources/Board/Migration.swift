import Foundation
import Machine
import Storage

/// A migration destination or source, parsed from QEMU's URI syntax.
enum MigrationURI: Equatable {
    /// `file:PATH` (QEMU 8.2's file migration).
    case file(String)
    /// `exec:CMD`, run with /bin/sh.
    case exec(String)
    /// `tcp:HOST:PORT` (HOST may be a name, an IPv4 address or a bracketed IPv6 address).
    case tcp(host: String, port: UInt16)
    /// `unix:PATH`, a Unix-domain stream socket.
    case unix(String)
    /// `fd:N`, an open descriptor of this process (a file, pipe or socket) that the migration
    /// owns and closes; written or read one way from its current offset, like `exec:`. QMP's
    /// `fd:NAME` (a descriptor passed with `getfd`) is turned into this form by the monitor.
    case fd(Int32)
    /// `fd:N` naming a connected stream socket (libvirt connects to the destination itself and
    /// passes the socket): a live migration over it, as over `tcp:`.
    case socket(Int32)

    init(_ uri: String) throws {
        if uri.hasPrefix("file:") {
            let path = String(uri.dropFirst(5))
            guard !path.isEmpty else { throw MachineStateError("file: needs a path") }
            guard !path.contains(",") else { throw MachineStateError("file: options (offset=) are not supported") }
            self = .file(path)
        } else if uri.hasPrefix("exec:") {
            let command = String(uri.dropFirst(5))
            guard !command.isEmpty else { throw MachineStateError("exec: needs a command") }
            self = .exec(command)
        } else if uri.hasPrefix("tcp:") {
            let rest = uri.dropFirst(4)
            guard let colon = rest.lastIndex(of: ":") else {
                throw MachineStateError("tcp: needs HOST:PORT (got '\(rest)')")
            }
            var host = String(rest[rest.startIndex..<colon])
            let portText = rest[rest.index(after: colon)...]
            guard let port = UInt16(portText), port > 0 else {
                throw MachineStateError("tcp: '\(portText)' is not a port number (1-65535)")
            }
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty else { throw MachineStateError("tcp: needs a host before the port") }
            self = .tcp(host: host, port: port)
        } else if uri.hasPrefix("unix:") {
            let path = String(uri.dropFirst(5))
            guard !path.isEmpty else { throw MachineStateError("unix: needs a socket path") }
            guard path.utf8.count < 108 else { throw MachineStateError("unix: the socket path is longer than 107 bytes") }
            self = .unix(path)
        } else if uri.hasPrefix("fd:") {
            let text = uri.dropFirst(3)
            guard let fd = Int32(text), fd >= 0 else {
                throw MachineStateError("fd: needs a descriptor number or the name of a descriptor passed with getfd (got '\(text)')")
            }
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw MachineStateError("fd:\(fd): not an open descriptor") }
            let kind = st.st_mode & S_IFMT
            guard kind == S_IFREG || kind == S_IFIFO || kind == S_IFSOCK || kind == S_IFBLK else {
                throw MachineStateError("fd:\(fd): not a file, pipe or socket")
            }
            // The stream is written and read with blocking calls on the migration queue.
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
            var type: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            if kind == S_IFSOCK, getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0, type == Int32(SOCK_STREAM.rawValue) {
                self = .socket(fd)
            } else {
                self = .fd(fd)
            }
        } else if uri.hasPrefix("rdma:") || uri.hasPrefix("vsock:") {
            let scheme = uri.prefix { $0 != ":" }
            throw MachineStateError("migration URI scheme '\(scheme):' is not supported (use tcp:, unix:, fd:, file: or exec:)")
        } else {
            throw MachineStateError("unknown migration protocol: \(uri)")
        }
    }

    /// True for the socket transports, which run a live (pre-copy) migration.
    var isLive: Bool {
        switch self {
        case .tcp, .unix, .socket: return true
        case .file, .exec, .fd: return false
        }
    }
}

private func milliseconds(since start: UInt64) -> UInt64 {
    (DispatchTime.now().uptimeNanoseconds &- start) / 1_000_000
}

/// Runs `/bin/sh -c command` with one end of a pipe as its stdin (`toChild`) or its stdout.
private final class ShellPipe {
    let process = Process()
    let fd: Int32
    private let pipe = Pipe()

    init(command: String, toChild: Bool) throws {
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        if toChild {
            process.standardInput = pipe
            fd = pipe.fileHandleForWriting.fileDescriptor
        } else {
            process.standardOutput = pipe
            fd = pipe.fileHandleForReading.fileDescriptor
        }
        do {
            try process.run()
        } catch {
            throw MachineStateError("exec: cannot run '\(command)': \(error.localizedDescription)")
        }
    }

    /// Closes our end and waits for the command; throws when it failed.
    func finish(closing: Bool) throws {
        if closing { close(fd) }
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw MachineStateError("exec: the command exited with status \(process.terminationStatus)")
        }
    }
}

extension VirtualMachine: MachineMigration {
    public func startMigration(uri: String) throws {
        let target = try MigrationURI(uri)
        try onControl { try checkNoHotPluggedDevices() }
        let start = DispatchTime.now().uptimeNanoseconds
        let state = runState
        guard hasStarted, isLive, state != .inmigrate else {
            throw MachineStateError("the machine is not running (run state \(state.rawValue)): there is nothing to migrate")
        }
        if live.disksHandedOver.load(ordering: .sequentiallyConsistent) {
            throw MachineStateError("the machine was already migrated; its disks belong to the destination")
        }
        try migration.withLock { m in
            // (An incoming post-copy still pulling pages counts too.)
            if [.setup, .active, .cancelling, .postcopyActive, .postcopyPaused].contains(m.status) {
                throw MachineStateError("There's a migration process in progress")
            }
            m = MigrationProgress()
            m.status = .setup
            m.ramTotal = board.ram.size
            m.startedAt = start
        }
        live.cancelled.store(false, ordering: .sequentiallyConsistent)
        emitMigrationEvent(.migration(status: .setup))
        if target.isLive {
            migrationQueue.async { self.runLiveMigration(target, start: start) }
        } else {
            migrationQueue.async { self.runMigration(target, start: start) }
        }
    }

    public func migrationProgress() -> MigrationProgress {
        migration.withLock { $0 }
    }

    /// Saves the state to `target`; records the outcome in `migration`. Migration queue.
    /// Finishing the destination (fsync and rename, or the command's exit) is part of the
    /// paused save, so a migration that fails at any point leaves the machine as it was
    /// (running again if it was running), as a failed QEMU migration does.
    private func runMigration(_ target: MigrationURI, start: UInt64) {
        do {
            let sink: StateSink
            var cleanup: () -> Void = {}
            switch target {
            case .file(let path):
                // Written beside the target and renamed into place once complete and synced,
                // so a crash at any moment leaves either the old file or the whole new one.
                let partial = path + ".partial-\(getpid())"
                let fd = open(partial, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                guard fd >= 0 else {
                    throw MachineStateError("cannot create '\(partial)': \(String(cString: strerror(errno)))")
                }
                var closed = false
                cleanup = {
                    if !closed { close(fd) }
                    unlink(partial)
                }
                sink = StateSink(write: StateSink.writeAll(to: fd), finish: {
                    guard fsync(fd) == 0 else {
                        throw MachineStateError("cannot sync '\(partial)': \(String(cString: strerror(errno)))")
                    }
                    close(fd)
                    closed = true
                    guard rename(partial, path) == 0 else {
                        throw MachineStateError("cannot rename '\(partial)' to '\(path)': \(String(cString: strerror(errno)))")
                    }
                    let directory = (path as NSString).deletingLastPathComponent
                    let dir = open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                    if dir >= 0 {
                        fsync(dir)
                        close(dir)
                    }
                })
            case .exec(let command):
                let shell = try ShellPipe(command: command, toChild: true)
                var finished = false
                cleanup = { if !finished { try? shell.finish(closing: true) } }
                sink = StateSink(write: StateSink.writeAll(to: shell.fd), finish: {
                    finished = true
                    try shell.finish(closing: true)
                })
            case .fd(let fd):
                // QEMU's fd: migration: the stream goes from the descriptor's current offset
                // (libvirt's save file has its own header before it); the descriptor is ours.
                var closed = false
                cleanup = { if !closed { close(fd) } }
                sink = StateSink(write: StateSink.writeAll(to: fd), finish: {
                    var st = stat()
                    if fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG && fsync(fd) != 0 {
                        throw MachineStateError("fd:\(fd): cannot sync: \(String(cString: strerror(errno)))")
                    }
                    close(fd)
                    closed = true
                })
            case .tcp, .unix, .socket:
                preconditionFailure("a live migration runs in runLiveMigration")
            }
            do {
                try saveToSink(sink, start: start)
            } catch {
                cleanup()
                throw error
            }
            setMigrationStatus(.completed) { m in
                m.totalTime = milliseconds(since: start)
                m.transferred = sink.position
            }
        } catch {
            setMigrationStatus(.failed) { m in
                m.error = "\(error)"
                m.totalTime = milliseconds(since: start)
            }
        }
    }

    /// The paused part: the machine stops, its state goes to `sink`, and it stays in
    /// `postmigrate` (as QEMU leaves a source after a completed migration).
    private func saveToSink(_ sink: StateSink, start: UInt64) throws {
        let pausedAt = DispatchTime.now().uptimeNanoseconds
        setMigrationStatus(.active) { m in m.setupTime = (pausedAt &- start) / 1_000_000 }
        let written = try saveState(identity: stateIdentity, to: sink, runStateDuring: .finishMigrate,
                                    runStateAfter: .postmigrate)
        migration.withLock { m in
            m.downtime = milliseconds(since: pausedAt)
            m.normalPages = written.pages
            m.zeroPages = board.ram.size / UInt64(MachineStateFormat.pageSize) - written.pages
            m.transferred = sink.position
        }
    }

    public func incomingMigration(uri: String) throws {
        let source = try MigrationURI(uri)
        guard runState == .inmigrate else {
            throw MachineStateError("The incoming migration has already been started or the machine was not started with --incoming")
        }
        if source.isLive {
            migration.withLock { m in
                m = MigrationProgress()
                m.status = .setup
                m.ramTotal = board.ram.size
            }
            do {
                try listenForLiveMigration(source, uri: uri)
            } catch {
                migration.withLock { $0 = MigrationProgress() }
                throw error
            }
            return
        }
        let start = DispatchTime.now().uptimeNanoseconds
        migration.withLock { m in
            m = MigrationProgress()
            m.status = .active
            m.ramTotal = board.ram.size
        }
        emitMigrationEvent(.migration(status: .active))
        var failure: (any Error)? = nil
        do {
            try loadFrom(uri)
        } catch {
            failure = error
        }
        let micros = (DispatchTime.now().uptimeNanoseconds &- start) / 1000
        migration.withLock { m in
            m.status = failure == nil ? .completed : .failed
            m.error = failure.map { "\($0)" }
            m.totalTime = micros / 1000
            m.downtime = m.totalTime
        }
        emitMigrationEvent(.migration(status: failure == nil ? .completed : .failed))
        if let failure { throw failure }
        let ms = String(format: "%.3f", Double(micros) / 1000)
        FileHandle.standardError.write(Data("machine-server: restored the machine state from \(uri) in \(ms) ms\n".utf8))
    }

    private func loadFrom(_ uri: String) throws {
        switch try MigrationURI(uri) {
        case .file(let path):
            // HostFile opens without blocking and refuses anything but a regular file or a
            // block device (a FIFO would otherwise block the load forever).
            let file = try HostFile(path: path, readOnly: true)
            try withExtendedLifetime(file) { try loadIncoming(StateSource(fileDescriptor: file.fd)) }
        case .exec(let command):
            let shell = try ShellPipe(command: command, toChild: false)
            do {
                try loadIncoming(StateSource(fileDescriptor: shell.fd))
            } catch {
                shell.process.terminate()
                try? shell.finish(closing: true)
                throw error
            }
            try shell.finish(closing: true)
        case .fd(let fd):
            // Read as a stream from the current offset (a save file may start with its
            // writer's own header, so the RAM is not mapped from it).
            defer { close(fd) }
            try loadIncoming(StateSource { p, n in
                while true {
                    let r = Foundation.read(fd, p, n)
                    if r >= 0 { return r }
                    if errno == EINTR { continue }
                    throw MachineStateError("fd:\(fd): read failed: \(String(cString: strerror(errno)))")
                }
            })
        case .tcp, .unix, .socket:
            preconditionFailure("a live migration is received by listenForLiveMigration")
        }
    }

    private func loadIncoming(_ source: StateSource) throws {
        // A machine started with --incoming opened its images without locks (a live
        // migration's source holds them until the switch-over); they are taken now.
        try takeBackDisks()
        try loadState(identity: stateIdentity, from: source, runAfter: !startPaused,
                      describeMismatch: describeIdentityMismatch)
    }
}
