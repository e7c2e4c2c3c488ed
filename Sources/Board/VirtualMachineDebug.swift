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

    /// Whether the machine is stopped (not running guest code) and live.
    public var isStoppedForDebugger: Bool {
        onControl { isLive && runState != .running }
    }
}
