import Machine

/// What the GDB stub needs of the machine: stop it for the debugger (run state `debug`, as
/// QEMU's gdbstub does), resume it whole or one hart at a time. Every action runs on the
/// control queue; any thread may call.
extension VirtualMachine {
    /// Stops every hart (and the clock and devices) for the debugger. Returns false when the
    /// machine has shut down or has not started.
    @discardableResult
    public func debugStop() -> Bool {
        onControl {
            guard isLive, hasStarted else { return false }
            if runState == .running {
                pauseHarts()
                board.deviceManager.quiesce()
                board.clock.pause()
                setRunState(.debug)
                emit(.stop)
            }
            return true
        }
    }

    /// Resumes the machine after a debugger stop: every hart, or only `hart` (a single step;
    /// the others stay stopped). Returns false when the machine is not stopped or not live.
    @discardableResult
    public func debugResume(onlyHart hart: Int? = nil) -> Bool {
        onControl {
            guard isLive, hasStarted else { return false }
            let state = runState
            guard state == .debug || state == .paused || state == .prelaunch || state == .postmigrate else { return false }
            if let hart, hart >= 0, hart < vcpus.count {
                board.deviceManager.resume()
                board.clock.resume()
                setRunState(.running)
                vcpus[hart].resume()
            } else {
                resumeAll()
            }
            emit(.resume)
            return true
        }
    }

    /// Starts a GDB server for this machine's harts on `host:port`. Returns nil when it
    /// listens, else the reason. The server ends when the machine shuts down.
    public func startGDBServer(host: String, port: Int) -> String? {
        let harts = vcpus.compactMap { $0.hart }
        guard harts.count == vcpus.count else { return "the harts are not RISC-V harts of this emulator" }
        guard isLive else { return "the machine has shut down" }
        do {
            let server = try GDBServer(machine: self, harts: harts, host: host, port: port)
            gdbServers.withLock { $0.append(server) }
            server.start()
            return nil
        } catch {
            return error.message
        }
    }

    /// Tells every GDB server that the machine ended (called once, on shutdown).
    func stopGDBServers(exitCode: Int32) {
        for s in gdbServers.withLock({ $0 }) { s.machineExited(code: exitCode) }
    }

    /// Whether the machine is stopped (not running guest code) and live.
    public var isStoppedForDebugger: Bool {
        onControl { isLive && runState != .running }
    }
}
