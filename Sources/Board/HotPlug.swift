import Machine

/// Changing the machine's devices while it runs (hot-plug). The changes happen on the control
/// queue with every hart out of guest code, in order with the other actions; the harts run
/// again afterwards if they were running (no STOP/RESUME: the pause is invisible to clients).
extension VirtualMachine {
    /// Runs `body` on the control queue with the harts out of guest code and returns its
    /// result. Throws `BoardError` once the machine has shut down. Any thread (inline on the
    /// control queue).
    public func changeDevices<T>(_ body: () throws -> T) throws -> T {
        try onControl {
            guard isLive else { throw BoardError.invalidConfig("the machine has shut down") }
            let running = runState == .running
            if running { pauseHarts() }
            defer { if running { for v in vcpus { v.resume() } } }
            return try body()
        }
    }

    /// Queues `body` on the control queue (after the actions already queued); it is dropped if
    /// the machine has shut down by then. For device events raised on a vCPU thread (a guest
    /// powering a slot off), which must not wait for the harts.
    public func changeDevicesLater(_ body: @escaping @Sendable () -> Void) {
        onControlLater { [weak self] in
            guard let self, self.isLive else { return }
            body()
        }
    }

    /// Throws when a saved state cannot be taken or loaded because devices were hot-plugged:
    /// states record the machine as launched (its identity), so such a state could not be
    /// loaded anywhere. Control queue.
    func checkNoHotPluggedDevices() throws {
        let extra = board.deviceManager.hotPlugged
        guard extra.isEmpty else {
            throw MachineStateError("the machine has hot-plugged devices (\(extra.joined(separator: ", "))); saved states and snapshots cover the machine as launched: remove them with device_del first")
        }
    }
}
