import Machine
import Synchronization

/// virtio-rng (virtio 1.2 section 5.4): one request queue whose writable buffers the device
/// fills with host entropy. No features, no configuration space, no state beyond its queue.
///
/// Requests are served on the vCPU thread that notifies (a buffer is at most a few KiB and the
/// system generator does not block), so there is nothing to quiesce. The context sits behind a
/// `Mutex` because `reset` may come from the control thread.
public final class VirtioEntropy: VirtioDevice, Sendable {
    public let name: String
    public let deviceID = Virtio.DeviceID.entropy
    public let deviceFeatures: UInt64 = 0
    public let queueCount = 1
    public let maxQueueSize: UInt16 = 256
    /// Most bytes handed out per request (QEMU's virtio-rng also serves requests piecewise).
    public static let maxRequest = 64 * 1024
    private let context = Mutex<VirtioContext?>(nil)

    /// Creates the device; `name` is for logs.
    public init(name: String = "virtio-rng0") { self.name = name }

    public func readConfig(offset: Int, size: Int) -> UInt64 { 0 }
    public func writeConfig(offset: Int, size: Int, value: UInt64) {}

    public func activate(_ context: VirtioContext) throws { self.context.withLock { $0 = context } }

    public func queueNotify(_ index: Int) {
        guard let ctx = context.withLock({ $0 }), index == 0, let q = ctx.queues[0] else { return }
        var rng = SystemRandomNumberGenerator()
        do {
            while let chain = try q.nextChain() {
                let n = min(chain.writableLength, Self.maxRequest)
                var bytes = [UInt8](repeating: 0, count: n)
                var i = 0
                while i < n {
                    var word = rng.next()
                    for _ in 0..<min(8, n - i) {
                        bytes[i] = UInt8(truncatingIfNeeded: word)
                        word >>= 8
                        i += 1
                    }
                }
                let written = chain.write(bytes, to: ctx.ram, offset: 0)
                q.complete(chain, written: UInt32(written))
            }
        } catch {
            ctx.interrupt.markNeedsReset(reason: "\(error)")
        }
        if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: 0) }
    }

    public func reset() { context.withLock { $0 = nil } }
}
