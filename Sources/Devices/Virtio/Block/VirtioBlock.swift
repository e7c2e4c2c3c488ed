import Dispatch
import Logging
import Machine
import Storage
import Synchronization

/// What a virtio-blk device is backed by: an open image and how the guest may use it.
///
/// A plain configuration value; the image is shared with nobody else while the device runs.
public struct DriveConfig: Sendable {
    /// The open image (raw or qcow2), opened read-only when `readOnly` is set.
    public var image: any BlockImage
    /// Offer VIRTIO_BLK_F_RO and fail writes, discards and write-zeroes with IOERR.
    public var readOnly: Bool
    /// Serial number returned by GET_ID (truncated to 20 bytes).
    public var serial: String

    /// Creates a drive configuration; `readOnly` defaults to the image's own read-only state.
    public init(image: any BlockImage, readOnly: Bool? = nil, serial: String = "") {
        self.image = image
        self.readOnly = readOnly ?? image.isReadOnly
        self.serial = serial
    }
}

/// virtio-blk (device ID 2, Linux driver "virtio-blk-device" on virtio-mmio): read, write,
/// flush, discard, write-zeroes and get-id over one request queue.
///
/// Requests run on a dedicated serial I/O queue per device, never on the vCPU thread; each batch
/// completes with a used-buffer interrupt. `reset()` waits for the I/O queue to drain.
public final class VirtioBlock: VirtioDevice, Sendable {
    /// Request types (virtio 1.2 section 5.2.6).
    public enum RequestType {
        public static let `in`: UInt32 = 0, out: UInt32 = 1, flush: UInt32 = 4, getID: UInt32 = 8
        public static let discard: UInt32 = 11, writeZeroes: UInt32 = 13
    }
    /// Request status values.
    public enum RequestStatus {
        public static let ok: UInt8 = 0, ioError: UInt8 = 1, unsupported: UInt8 = 2
    }
    /// Feature bits.
    public enum Feature {
        public static let segMax: UInt64 = 1 << 2, readOnly: UInt64 = 1 << 5, blockSize: UInt64 = 1 << 6
        public static let flush: UInt64 = 1 << 9, discard: UInt64 = 1 << 13, writeZeroes: UInt64 = 1 << 14
    }
    /// Queue size offered.
    public static let queueSize: UInt16 = 256
    /// Largest data transfer accepted in one request (larger ones fail with IOERR).
    public static let maxRequestBytes = 32 << 20
    /// Largest discard / write-zeroes extent in sectors.
    static let maxExtentSectors: UInt32 = 0x3f_ffff

    public let name: String
    public let deviceID = Virtio.DeviceID.block
    public let queueCount = 1
    public let maxQueueSize = VirtioBlock.queueSize
    public let deviceFeatures: UInt64
    /// The drive behind the device.
    public let drive: DriveConfig
    private let config: [UInt8]
    private let io: DispatchQueue
    private let logger: Logger
    /// The current activation; touched only on `io`.
    private nonisolated(unsafe) var context: VirtioContext?
    private nonisolated(unsafe) var broken = false
    /// Set while the machine is paused: requests stay in the ring until `resume()`.
    private nonisolated(unsafe) var quiesced = false
    private let stats = Mutex(BlockIOStatistics())

    /// The requests done so far (not part of the saved state: they count this process's work).
    /// Any thread.
    public var statistics: BlockIOStatistics { stats.withLock { $0 } }

    /// Records one completed request. I/O queue.
    private func account(_ kind: UInt32, ok: Bool, bytes: Int, end: UInt64, since start: UInt64) {
        let now = DispatchTime.now().uptimeNanoseconds
        let ns = now &- start
        stats.withLock { s in
            s.lastCompletion = now
            switch kind {
            case RequestType.in:
                if ok { s.readOperations += 1; s.readBytes += UInt64(bytes); s.readTimeNanoseconds += ns } else { s.failedReadOperations += 1 }
            case RequestType.out, RequestType.writeZeroes:  // QEMU counts write-zeroes as writes
                if ok {
                    s.writeOperations += 1; s.writtenBytes += UInt64(bytes); s.writeTimeNanoseconds += ns
                    s.highestWriteOffset = max(s.highestWriteOffset, end)
                } else {
                    s.failedWriteOperations += 1
                }
            case RequestType.flush:
                if ok { s.flushOperations += 1; s.flushTimeNanoseconds += ns } else { s.failedFlushOperations += 1 }
            case RequestType.discard:
                if ok { s.discardOperations += 1; s.discardedBytes += UInt64(bytes); s.discardTimeNanoseconds += ns } else { s.failedDiscardOperations += 1 }
            default: break
            }
        }
    }

    /// Creates a block device for `drive`. `name` is used for logs and the I/O thread label.
    public init(drive: DriveConfig, name: String = "virtio-blk0", logger: Logger = Logger(label: "machine.virtio-blk")) {
        self.drive = drive
        self.name = name
        self.logger = logger
        self.io = DispatchQueue(label: "machine.\(name).io")
        var f = Feature.segMax | Feature.blockSize | Feature.flush | Feature.discard | Feature.writeZeroes
        if drive.readOnly { f |= Feature.readOnly }
        deviceFeatures = f
        var c = [UInt8](repeating: 0, count: 60)
        func put<T: FixedWidthInteger>(_ v: T, _ o: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { c[o + i] = b } }
        }
        put(drive.image.virtualSize / 512, 0)         // capacity
        put(UInt32(Self.queueSize - 2), 12)           // seg_max
        put(UInt32(512), 20)                          // blk_size
        put(UInt16(1), 34)                            // num_queues
        put(Self.maxExtentSectors, 36)                // max_discard_sectors
        put(UInt32(1), 40)                            // max_discard_seg
        put(UInt32(1), 44)                            // discard_sector_alignment
        put(Self.maxExtentSectors, 48)                // max_write_zeroes_sectors
        put(UInt32(1), 52)                            // max_write_zeroes_seg
        c[56] = 1                                     // write_zeroes_may_unmap
        config = c
    }

    public func readConfig(offset: Int, size: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<size where offset + i < config.count && offset + i >= 0 {
            v |= UInt64(config[offset + i]) << (8 * UInt64(i))
        }
        return v
    }

    /// The configuration space is read-only here (no writeback toggle).
    public func writeConfig(offset: Int, size: Int, value: UInt64) {}

    public func activate(_ context: VirtioContext) throws {
        io.sync {
            self.context = context
            self.broken = false
        }
    }

    public func queueNotify(_ index: Int) {
        io.async { self.process(queue: index) }
    }

    public func reset() {
        io.sync {
            context = nil
            broken = false
        }
    }

    // MARK: I/O thread

    private func process(queue index: Int) {
        guard let ctx = context, !broken, !quiesced, index < ctx.queues.count, let q = ctx.queues[index] else { return }
        do {
            while let chain = try q.nextChain() {
                let written = handle(chain, ram: ctx.ram)
                q.complete(chain, written: written)
            }
        } catch {
            broken = true
            ctx.interrupt.markNeedsReset(reason: "\(name): \(error)")
        }
        if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: index) }
    }

    /// Executes one request; returns the number of bytes written into the guest's buffers.
    func handle(_ chain: DescriptorChain, ram: GuestRAM) -> UInt32 {
        let writableLength = chain.writableLength
        guard writableLength >= 1 else {
            logger.warning("\(name): request without a status byte dropped")
            return 0
        }
        let statusOffset = writableLength - 1
        func finish(_ status: UInt8, data: Int = 0) -> UInt32 {
            chain.write([status], to: ram, offset: statusOffset)
            return UInt32(data + 1)
        }
        let h = chain.readBytes(from: ram, count: 16)
        guard h.count == 16 else { return finish(RequestStatus.ioError) }
        let type = UInt32(h[0]) | UInt32(h[1]) << 8 | UInt32(h[2]) << 16 | UInt32(h[3]) << 24
        let sector = (0..<8).reduce(UInt64(0)) { $0 | UInt64(h[8 + $1]) << (8 * UInt64($1)) }
        let image = drive.image
        let size = image.virtualSize
        func inRange(_ sector: UInt64, _ bytes: UInt64) -> Bool {
            sector <= size / 512 && bytes <= size - sector * 512
        }
        let started = DispatchTime.now().uptimeNanoseconds
        var accounted = (ok: false, bytes: 0, end: UInt64(0))
        defer { account(type, ok: accounted.ok, bytes: accounted.bytes, end: accounted.end, since: started) }
        do {
            switch type {
            case RequestType.in:
                let len = statusOffset
                guard len % 512 == 0, len <= Self.maxRequestBytes, inRange(sector, UInt64(len)) else {
                    return finish(RequestStatus.ioError)
                }
                var buf = [UInt8](repeating: 0, count: len)
                try buf.withUnsafeMutableBytes { try image.read(into: $0, at: sector * 512) }
                chain.write(buf, to: ram, offset: 0)
                accounted = (true, len, 0)
                return finish(RequestStatus.ok, data: len)
            case RequestType.out:
                let len = chain.readableLength - 16
                guard !drive.readOnly else { return finish(RequestStatus.ioError) }
                guard len % 512 == 0, len <= Self.maxRequestBytes, inRange(sector, UInt64(len)) else {
                    return finish(RequestStatus.ioError)
                }
                let data = chain.readBytes(from: ram, offset: 16, count: len)
                try image.write(data, at: sector * 512)
                accounted = (true, len, sector * 512 + UInt64(len))
                return finish(RequestStatus.ok)
            case RequestType.flush:
                try image.flush()
                accounted.ok = true
                return finish(RequestStatus.ok)
            case RequestType.getID:
                var id = Array(drive.serial.utf8.prefix(20))
                id += [UInt8](repeating: 0, count: 20 - id.count)
                let n = min(20, statusOffset)
                chain.write(Array(id[0..<n]), to: ram, offset: 0)
                return finish(RequestStatus.ok, data: n)
            case RequestType.discard, RequestType.writeZeroes:
                guard !drive.readOnly else { return finish(RequestStatus.ioError) }
                let segs = chain.readBytes(from: ram, offset: 16, count: chain.readableLength - 16)
                guard segs.count == 16 else { return finish(RequestStatus.unsupported) }  // max_*_seg is 1
                let start = (0..<8).reduce(UInt64(0)) { $0 | UInt64(segs[$1]) << (8 * UInt64($1)) }
                let count = (0..<4).reduce(UInt32(0)) { $0 | UInt32(segs[8 + $1]) << (8 * UInt32($1)) }
                let flags = (0..<4).reduce(UInt32(0)) { $0 | UInt32(segs[12 + $1]) << (8 * UInt32($1)) }
                let unmap = flags & 1 != 0
                if flags & ~1 != 0 || (type == RequestType.discard && unmap) || count > Self.maxExtentSectors {
                    return finish(RequestStatus.unsupported)
                }
                guard inRange(start, UInt64(count) * 512) else { return finish(RequestStatus.ioError) }
                if type == RequestType.discard {
                    try image.discard(offset: start * 512, length: UInt64(count) * 512)
                } else {
                    try image.writeZeroes(offset: start * 512, length: UInt64(count) * 512)
                }
                accounted = (true, Int(count) * 512, type == RequestType.writeZeroes ? (start + UInt64(count)) * 512 : 0)
                return finish(RequestStatus.ok)
            default:
                return finish(RequestStatus.unsupported)
            }
        } catch {
            logger.error("\(name): \(error)")
            return finish(RequestStatus.ioError)
        }
    }
}

// MARK: Lifecycle

extension VirtioBlock {
    /// Waits for the request being handled (requests run to completion on the I/O queue) and
    /// leaves new ones in the ring, so no guest RAM is touched until `resume()`. A request is
    /// never split: the ring indices saved afterwards describe exactly the completed requests.
    public func quiesce() {
        io.sync { quiesced = true }
    }

    /// Lets the I/O queue run again and picks up what the driver queued meanwhile.
    public func resume() {
        io.sync { quiesced = false }
        io.async { self.process(queue: 0) }
    }
}
