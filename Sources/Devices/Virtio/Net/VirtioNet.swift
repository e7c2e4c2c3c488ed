import Logging
import Machine
import Synchronization

/// virtio-net (virtio 1.2 section 5.1): one receive and one transmit queue, a MAC address and
/// link status in its configuration space, mergeable receive buffers, and checksum offload
/// both ways (the guest may leave transmit checksums to the device; received frames are
/// marked as already checked).
///
/// Threading: both queues are driven on the backend's thread (`NetworkBackend.perform`); a
/// vCPU notifying a queue only schedules work there, so no vCPU waits on a socket. The
/// loop-thread state below is touched only on that thread (or while it waits in `perform`).
public final class VirtioNet: VirtioDevice, NetworkFrontend, @unchecked Sendable {  // unchecked: queue state is touched on the backend's loop thread only
    /// Feature bits (section 5.1.3).
    public enum Feature {
        public static let csum: UInt64 = 1 << 0, guestCsum: UInt64 = 1 << 1, mac: UInt64 = 1 << 5
        public static let mergeableRxBuffers: UInt64 = 1 << 15, status: UInt64 = 1 << 16
    }
    /// The header before every frame in both queues (with VERSION_1 always 12 bytes).
    public static let headerSize = 12
    /// `flags` bits of the header.
    public static let needsCsum: UInt8 = 1, dataValid: UInt8 = 2
    /// Queue size offered (QEMU's default).
    public static let queueSize: UInt16 = 256
    /// Largest frame accepted from the guest (without TSO, an MTU-sized frame; this leaves room for jumbo frames).
    public static let maxTxFrame = 65_550

    public let name: String
    public let deviceID = Virtio.DeviceID.network
    public let queueCount = 2
    public let maxQueueSize = VirtioNet.queueSize
    public let deviceFeatures = Feature.csum | Feature.guestCsum | Feature.mac | Feature.mergeableRxBuffers | Feature.status
    /// The MAC address the guest reads.
    public let mac: [UInt8]
    /// The host side of the link.
    public let backend: any NetworkBackend
    private let logger: Logger
    private let link = Atomic<Bool>(true)
    private let txScheduled = Atomic<Bool>(false)
    /// Guest RX buffer kicks and frames counted for `query-rx-filter`-style reporting.
    private let counters = Mutex((rxFrames: 0, txFrames: 0, rxDropped: 0, txDropped: 0))

    // Backend thread only.
    private nonisolated(unsafe) var context: VirtioContext?
    private nonisolated(unsafe) var broken = false
    private nonisolated(unsafe) var quiesced = false
    private nonisolated(unsafe) var txBuffer = [UInt8](repeating: 0, count: VirtioNet.headerSize + VirtioNet.maxTxFrame)
    private nonisolated(unsafe) var rxChains: [DescriptorChain] = []

    /// Creates a NIC with address `mac` on `backend` and attaches it. `name` is for logs.
    public init(mac: [UInt8], backend: any NetworkBackend, name: String = "virtio-net0",
                logger: Logger = Logger(label: "machine.virtio-net")) {
        precondition(mac.count == 6, "a MAC address has 6 bytes")
        self.mac = mac
        self.backend = backend
        self.name = name
        self.logger = logger
        backend.attach(self)
    }

    /// Whether the link is up (`set_link`); the guest sees it in the status field.
    public var linkUp: Bool { link.load(ordering: .relaxed) }

    /// Sets the link state and tells the driver (a configuration-change interrupt) when it changed.
    public func setLink(up: Bool) {
        let old = link.exchange(up, ordering: .relaxed)
        backend.linkUp = up
        guard old != up else { return }
        backend.perform(wait: false) { [self] in
            context?.interrupt.signalConfigChange()
        }
    }

    /// Frames moved each way and dropped (for `info network`).
    public var statistics: (rxFrames: Int, txFrames: Int, rxDropped: Int, txDropped: Int) { counters.withLock { $0 } }

    public func readConfig(offset: Int, size: Int) -> UInt64 {
        var config = mac
        let status: UInt16 = linkUp ? 1 : 0
        config += [UInt8(status & 0xff), UInt8(status >> 8)]   // status (VIRTIO_NET_S_LINK_UP)
        config += [1, 0]                                       // max_virtqueue_pairs
        var v: UInt64 = 0
        for i in 0..<size where offset + i >= 0 && offset + i < config.count {
            v |= UInt64(config[offset + i]) << (8 * UInt64(i))
        }
        return v
    }

    /// The MAC is read-only once VERSION_1 is negotiated (no VIRTIO_NET_F_CTRL_MAC_ADDR); writes are ignored.
    public func writeConfig(offset: Int, size: Int, value: UInt64) {}

    public func activate(_ context: VirtioContext) throws {
        backend.perform(wait: true) { [self] in
            self.context = context
            broken = false
            rxChains = []
        }
    }

    public func queueNotify(_ index: Int) {
        if index == 1 {
            // One pending wake-up is enough: the loop drains the whole ring.
            guard !txScheduled.exchange(true, ordering: .acquiringAndReleasing) else { return }
            backend.perform(wait: false) { [self] in
                txScheduled.store(false, ordering: .releasing)
                processTX()
            }
        } else if index == 0 {
            backend.perform(wait: false) { [self] in backend.receiveRoomAvailable() }
        }
    }

    public func reset() {
        backend.perform(wait: true) { [self] in
            context = nil
            broken = false
            rxChains = []
        }
        // The link state is the host's (set_link), so a driver reset leaves it as it is.
    }

    public func quiesce() {
        backend.perform(wait: true) { [self] in quiesced = true }
    }

    public func resume() {
        backend.perform(wait: false) { [self] in
            quiesced = false
            processTX()
            backend.receiveRoomAvailable()
        }
    }

    // MARK: Saved state: the link state (the MAC is configuration, checked by the machine's identity).

    public var deviceStateVersion: UInt32 { 1 }

    public func saveDeviceState(to w: inout StateWriter) {
        w.bytes(mac)
        w.bool(linkUp)
    }

    public func loadDeviceState(from r: inout StateReader, version: UInt32, ram: GuestRAM) throws(SavedStateError) {
        guard version == 1 else { throw r.invalid("(device-state-version)", "virtio-net state version \(version) is not supported (this build reads 1)") }
        let saved = try r.bytes("mac", limit: 6)
        guard saved == mac else {
            throw r.invalid("mac", "saved for MAC \(Self.format(saved)), this NIC has \(Self.format(mac))")
        }
        let up = try r.bool("link-up")
        link.store(up, ordering: .relaxed)
        backend.linkUp = up
    }

    /// "52:54:00:12:34:56".
    public static func format(_ mac: [UInt8]) -> String {
        MACAddress(bytes: mac)?.description ?? mac.map { String($0, radix: 16) }.joined(separator: ":")
    }

    /// Parses "52:54:00:12:34:56" (`MACAddress`'s grammar); nil when it is not six hex bytes.
    public static func parseMAC(_ text: String) -> [UInt8]? { MACAddress(text)?.bytes }

    // MARK: Backend thread

    private func fail(_ ctx: VirtioContext, _ error: any Error) {
        broken = true
        ctx.interrupt.markNeedsReset(reason: "\(name): \(error)")
    }

    /// Sends every frame the guest queued. Malformed frames (a bad checksum offset, GSO the
    /// device did not offer, too long) are dropped and completed; a malformed ring stops the device.
    private func processTX() {
        guard let ctx = context, !broken, !quiesced, let q = ctx.queues[1] else { return }
        var sent = 0, dropped = 0
        do {
            while let chain = try q.nextChain() {
                let length = chain.readableLength
                if length < Self.headerSize + 14 || length > txBuffer.count {
                    dropped += 1
                } else {
                    let ok = txBuffer.withUnsafeMutableBytes { buf -> Bool in
                        let b = UnsafeMutableRawBufferPointer(rebasing: buf[0..<length])
                        chain.read(from: ctx.ram, offset: 0, into: b)
                        let frame = UnsafeMutableRawBufferPointer(rebasing: b[Self.headerSize...])
                        guard b[1] == 0 else { return false }   // gso_type: no GSO was offered
                        if b[0] & Self.needsCsum != 0 {
                            let start = Int(b[6]) | Int(b[7]) << 8, offset = Int(b[8]) | Int(b[9]) << 8
                            guard Self.insertChecksum(frame, start: start, offset: offset) else { return false }
                        }
                        guard link.load(ordering: .relaxed) else { return false }
                        backend.send(UnsafeRawBufferPointer(frame))
                        return true
                    }
                    if ok { sent += 1 } else { dropped += 1 }
                }
                q.complete(chain, written: 0)
            }
        } catch {
            fail(ctx, error)
        }
        if sent + dropped > 0 { counters.withLock { $0.txFrames += sent; $0.txDropped += dropped } }
        if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: 1) }
    }

    /// Computes the Internet checksum over `frame[start...]` and stores it at `start + offset`
    /// (the guest's VIRTIO_NET_HDR_F_NEEDS_CSUM request). False when the offsets are outside the frame.
    static func insertChecksum(_ frame: UnsafeMutableRawBufferPointer, start: Int, offset: Int) -> Bool {
        guard start < frame.count, offset + 2 <= frame.count - start else { return false }
        var sum: UInt64 = 0
        var i = start
        let n = frame.count
        while i + 1 < n {
            sum &+= UInt64(frame[i]) << 8 | UInt64(frame[i + 1])
            i += 2
        }
        if i < n { sum &+= UInt64(frame[i]) << 8 }
        while sum >> 16 != 0 { sum = (sum & 0xffff) &+ (sum >> 16) }
        let csum = ~UInt16(truncatingIfNeeded: sum)
        frame[start + offset] = UInt8(csum >> 8)
        frame[start + offset + 1] = UInt8(csum & 0xff)
        return true
    }

    /// Puts one frame into the receive queue: the header, then the frame, across as many buffers
    /// as it takes with mergeable buffers (one buffer otherwise). False when the guest has not
    /// made enough room available (the backend holds the frame); a frame too big for the guest's
    /// buffers is dropped.
    public func receive(_ frame: UnsafeRawBufferPointer) -> Bool {
        guard let ctx = context, !broken else {
            counters.withLock { $0.rxDropped += 1 }
            return true   // no driver: the frame goes nowhere, as on a cable with nothing at the end
        }
        guard !quiesced, let q = ctx.queues[0] else { return false }
        let mergeable = ctx.features & Feature.mergeableRxBuffers != 0
        let total = Self.headerSize + frame.count
        var header = [UInt8](repeating: 0, count: Self.headerSize)
        if ctx.features & Feature.guestCsum != 0 { header[0] = Self.dataValid }
        rxChains.removeAll(keepingCapacity: true)
        var room = 0
        do {
            while room < total {
                guard let chain = try q.nextChain() else {
                    q.unpop(rxChains.count)
                    return false
                }
                rxChains.append(chain)
                room += chain.writableLength
                if !mergeable { break }
            }
        } catch {
            fail(ctx, error)
            return true
        }
        if room < total {
            // A single (non-mergeable) buffer too small for the frame: drop the frame, give the
            // buffer back used and empty, as QEMU does for a guest that posts tiny buffers.
            counters.withLock { $0.rxDropped += 1 }
            for c in rxChains { q.complete(c, written: 0) }
            if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: 0) }
            return true
        }
        if mergeable {
            header[10] = UInt8(rxChains.count & 0xff)
            header[11] = UInt8(rxChains.count >> 8)
        }
        var done = 0
        for c in rxChains {
            let cap = c.writableLength
            var wrote = 0
            if done < Self.headerSize {
                wrote = header.withUnsafeBytes { h in
                    c.write(UnsafeRawBufferPointer(rebasing: h[done...]), to: ctx.ram, offset: 0)
                }
            }
            let dataOffset = max(0, done + wrote - Self.headerSize)
            if wrote < cap, dataOffset < frame.count {
                wrote += c.write(UnsafeRawBufferPointer(rebasing: frame[dataOffset...]), to: ctx.ram, offset: wrote)
            }
            done += wrote
            q.complete(c, written: UInt32(wrote))
        }
        counters.withLock { $0.rxFrames += 1 }
        if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: 0) }
        return true
    }
}
