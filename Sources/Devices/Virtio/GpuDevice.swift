import Logging
import Machine
import Synchronization

/// virtio-gpu in 2D mode (virtio 1.2 section 5.7): one scanout shown on a `Display`.
///
/// Resources are host pixel buffers; the guest attaches its own pages as backing, copies them
/// into the resource with TRANSFER_TO_HOST_2D, and RESOURCE_FLUSH publishes the flushed
/// rectangle of the scanned-out resource to the display as a dirty rectangle. No 3D (virgl),
/// no blob resources, no EDID. The cursor queue is drained and its commands are accepted and
/// ignored: there is no hardware-cursor plane yet, so a guest that relies on one (X11, Wayland)
/// shows no pointer; Linux's fbcon draws no cursor sprite and is unaffected.
///
/// Malformed commands (unknown resource, rectangles outside a resource, backing pages outside
/// RAM, short buffers) get a `VIRTIO_GPU_RESP_ERR_*` answer; a broken ring marks the device
/// DEVICE_NEEDS_RESET. Driven on the vCPU thread that notifies the queue (the transport
/// serializes every call); the state is also behind a lock so statistics can be read anywhere.
public final class VirtioGPU: VirtioDevice, Sendable {
    /// Command and response codes (`enum virtio_gpu_ctrl_type`).
    public enum Command {
        public static let getDisplayInfo: UInt32 = 0x0100
        public static let resourceCreate2D: UInt32 = 0x0101
        public static let resourceUnref: UInt32 = 0x0102
        public static let setScanout: UInt32 = 0x0103
        public static let resourceFlush: UInt32 = 0x0104
        public static let transferToHost2D: UInt32 = 0x0105
        public static let resourceAttachBacking: UInt32 = 0x0106
        public static let resourceDetachBacking: UInt32 = 0x0107
        public static let updateCursor: UInt32 = 0x0300
        public static let moveCursor: UInt32 = 0x0301
    }

    /// Response codes.
    public enum Response {
        public static let okNoData: UInt32 = 0x1100
        public static let okDisplayInfo: UInt32 = 0x1101
        public static let errUnspecified: UInt32 = 0x1200
        public static let errOutOfMemory: UInt32 = 0x1201
        public static let errInvalidScanoutID: UInt32 = 0x1202
        public static let errInvalidResourceID: UInt32 = 0x1203
        public static let errInvalidContextID: UInt32 = 0x1204
        public static let errInvalidParameter: UInt32 = 0x1205
    }

    /// `VIRTIO_GPU_FLAG_FENCE`: the response must echo the fence id.
    public static let flagFence: UInt32 = 1
    /// `VIRTIO_GPU_FLAG_INFO_RING_IDX`: the response must echo the ring index too.
    public static let flagRingIndex: UInt32 = 2
    /// Size of `struct virtio_gpu_ctrl_hdr`.
    public static let headerSize = 24
    /// Largest number of backing entries accepted in one ATTACH_BACKING (QEMU's limit).
    public static let maxBackingEntries = 16384
    /// Largest width or height of a resource.
    public static let maxDimension = 16384

    /// Format codes (`enum virtio_gpu_formats`) and the pixel layouts they name.
    public static let formats: [UInt32: PixelFormat] = [
        1: .b8g8r8a8, 2: .b8g8r8x8, 3: .a8r8g8b8, 4: .x8r8g8b8,
        67: .r8g8b8a8, 68: .x8b8g8r8, 121: .a8b8g8r8, 134: .r8g8b8x8,
    ]

    public let name: String
    public let deviceID: UInt32 = Virtio.DeviceID.gpu
    public let deviceFeatures: UInt64 = 0
    public let queueCount = 2
    public let maxQueueSize: UInt16 = 256

    /// The display the single scanout is shown on.
    public let display: Display
    /// Host memory all resources together may use (QEMU's `max_hostmem` default, 256 MiB).
    public let hostMemoryLimit: Int
    private let logger: Logger

    private struct Backing: @unchecked Sendable {  // unchecked: points into guest RAM, which outlives the device
        /// The guest-physical address the driver gave (what a saved state keeps).
        var address: GuestPhysicalAddress
        var host: UnsafeMutableRawPointer
        var length: Int
    }

    private struct Resource {
        var width: Int
        var height: Int
        /// The virtio format code (`formats`' key).
        var formatCode: UInt32
        var format: PixelFormat
        var buffer: PixelBuffer
        var backing: [Backing] = []
        var stride: Int { width * 4 }
    }

    private struct Scanout {
        var resourceID: UInt32
        var rect: DisplayRect
    }

    private struct State {
        var context: VirtioContext?
        var resources: [UInt32: Resource] = [:]
        var scanout: Scanout?
        var hostMemory = 0
        var eventsRead: UInt32 = 0
        var commandErrors: UInt64 = 0
    }
    private let state = Mutex(State())

    /// Creates the device. The display's preferred size is the mode GET_DISPLAY_INFO offers.
    public init(display: Display, name: String = "virtio-gpu", hostMemoryLimit: Int = 256 << 20,
                logger: Logger = Logger(label: "machine.virtio-gpu")) {
        self.display = display
        self.name = name
        self.hostMemoryLimit = hostMemoryLimit
        self.logger = logger
    }

    /// Commands answered with an error since creation (for tests and diagnostics).
    public var commandErrors: UInt64 { state.withLock { $0.commandErrors } }

    /// Number of live resources.
    public var resourceCount: Int { state.withLock { $0.resources.count } }

    // MARK: Config space: events_read, events_clear, num_scanouts, num_capsets.

    public func readConfig(offset: Int, size: Int) -> UInt64 {
        let events = state.withLock { $0.eventsRead }
        let words: [UInt32] = [events, 0, 1, 0]
        var v: UInt64 = 0
        for i in 0..<size {
            let o = offset + i
            guard o >= 0, o < 16 else { continue }
            v |= UInt64((words[o / 4] >> (8 * UInt32(o % 4))) & 0xff) << (8 * UInt64(i))
        }
        return v
    }

    public func writeConfig(offset: Int, size: Int, value: UInt64) {
        // Only events_clear (offset 4) is writable: it clears the bits written.
        guard offset == 4, size == 4 else { return }
        state.withLock { $0.eventsRead &= ~UInt32(truncatingIfNeeded: value) }
    }

    public func activate(_ context: VirtioContext) throws {
        state.withLock { $0.context = context }
    }

    public func reset() {
        let hadScanout = state.withLock { s -> Bool in
            let had = s.scanout != nil
            s = State()
            return had
        }
        if hadScanout { display.setSurface(nil) }
    }

    public func queueNotify(_ index: Int) {
        guard let ctx = state.withLock({ $0.context }), index < ctx.queues.count, let q = ctx.queues[index] else { return }
        do {
            while let chain = try q.nextChain() {
                let written = index == 0 ? process(chain, ram: ctx.ram) : 0
                q.complete(chain, written: UInt32(written))
            }
        } catch {
            ctx.interrupt.markNeedsReset(reason: "\(name): \(error)")
        }
        if q.needsNotification() { ctx.interrupt.signalUsedBuffer(queue: index) }
    }

    // MARK: Commands

    /// What a command produced: a response type and its body after the header.
    private struct Reply {
        var type: UInt32
        var body: [UInt8] = []
        static func error(_ t: UInt32) -> Reply { Reply(type: t) }
        static let ok = Reply(type: Response.okNoData)
    }

    /// Little-endian reader over the request bytes.
    private struct Request {
        let bytes: [UInt8]
        func u32(_ o: Int) -> UInt32 {
            UInt32(bytes[o]) | UInt32(bytes[o + 1]) << 8 | UInt32(bytes[o + 2]) << 16 | UInt32(bytes[o + 3]) << 24
        }
        func u64(_ o: Int) -> UInt64 { UInt64(u32(o)) | UInt64(u32(o + 4)) << 32 }
        /// A `virtio_gpu_rect` at `o` (fields are unsigned; kept as Int without loss).
        func rect(_ o: Int) -> (x: Int, y: Int, width: Int, height: Int) {
            (Int(u32(o)), Int(u32(o + 4)), Int(u32(o + 8)), Int(u32(o + 12)))
        }
    }

    /// Handles one control-queue request; returns the bytes written into its response buffer.
    private func process(_ chain: DescriptorChain, ram: GuestRAM) -> Int {
        let readable = min(chain.readableLength, Self.headerSize + 8 + 16 * Self.maxBackingEntries)
        let req = Request(bytes: chain.readBytes(from: ram, count: readable))
        var reply: Reply
        var flags: UInt32 = 0, fence: UInt64 = 0, ctxID: UInt32 = 0, ringIdx: UInt8 = 0
        if req.bytes.count < Self.headerSize {
            reply = .error(Response.errUnspecified)
        } else {
            flags = req.u32(4) & (Self.flagFence | Self.flagRingIndex)
            fence = req.u64(8)
            ctxID = req.u32(16)
            ringIdx = req.bytes[20]
            reply = execute(type: req.u32(0), req, ram: ram)
        }
        if reply.type >= Response.errUnspecified {
            state.withLock { $0.commandErrors &+= 1 }
        }
        logger.trace("\(name): command 0x\(String(req.bytes.count >= 4 ? req.u32(0) : 0, radix: 16)) -> 0x\(String(reply.type, radix: 16)), fence flags \(flags)")
        var out = [UInt8](repeating: 0, count: Self.headerSize)
        func put32(_ v: UInt32, _ o: Int) { for i in 0..<4 { out[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
        put32(reply.type, 0)
        put32(flags, 4)
        if flags & Self.flagFence != 0 {
            for i in 0..<8 { out[8 + i] = UInt8(truncatingIfNeeded: fence >> (8 * UInt64(i))) }
            put32(ctxID, 16)
            if flags & Self.flagRingIndex != 0 { out[20] = ringIdx }
        }
        out += reply.body
        return chain.write(out, to: ram, offset: 0)
    }

    private func execute(type: UInt32, _ req: Request, ram: GuestRAM) -> Reply {
        let sizes: [UInt32: Int] = [
            Command.getDisplayInfo: 0, Command.resourceCreate2D: 16, Command.resourceUnref: 8,
            Command.setScanout: 24, Command.resourceFlush: 24, Command.transferToHost2D: 32,
            Command.resourceAttachBacking: 8, Command.resourceDetachBacking: 8,
        ]
        guard let need = sizes[type] else {
            logger.debug("\(name): unsupported command 0x\(String(type, radix: 16))")
            return .error(Response.errUnspecified)
        }
        guard req.bytes.count >= Self.headerSize + need else {
            logger.debug("\(name): command 0x\(String(type, radix: 16)) is \(req.bytes.count) bytes, too short")
            return .error(Response.errUnspecified)
        }
        let h = Self.headerSize
        switch type {
        case Command.getDisplayInfo:
            return displayInfo()
        case Command.resourceCreate2D:
            return createResource(id: req.u32(h), format: req.u32(h + 4), width: req.u32(h + 8), height: req.u32(h + 12))
        case Command.resourceUnref:
            return unref(id: req.u32(h))
        case Command.setScanout:
            return setScanout(rect: req.rect(h), scanoutID: req.u32(h + 16), resourceID: req.u32(h + 20))
        case Command.resourceFlush:
            return flush(rect: req.rect(h), resourceID: req.u32(h + 16))
        case Command.transferToHost2D:
            return transfer(rect: req.rect(h), offset: req.u64(h + 16), resourceID: req.u32(h + 24))
        case Command.resourceAttachBacking:
            return attachBacking(req, ram: ram)
        case Command.resourceDetachBacking:
            return state.withLock { s in
                guard s.resources[req.u32(h)] != nil else { return .error(Response.errInvalidResourceID) }
                s.resources[req.u32(h)]!.backing = []
                return .ok
            }
        default:
            return .error(Response.errUnspecified)
        }
    }

    private func displayInfo() -> Reply {
        // pmodes[16] of { rect r; le32 enabled; le32 flags }; only scanout 0 exists.
        var body = [UInt8](repeating: 0, count: 16 * 24)
        let values: [UInt32] = [0, 0, UInt32(display.preferredWidth), UInt32(display.preferredHeight), 1, 0]
        for (i, v) in values.enumerated() {
            for b in 0..<4 { body[i * 4 + b] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(b))) }
        }
        return Reply(type: Response.okDisplayInfo, body: body)
    }

    private func createResource(id: UInt32, format code: UInt32, width: UInt32, height: UInt32) -> Reply {
        guard id != 0 else { return .error(Response.errInvalidResourceID) }
        guard let format = Self.formats[code] else {
            logger.debug("\(name): resource \(id) has unknown format \(code)")
            return .error(Response.errInvalidParameter)
        }
        guard width > 0, height > 0, width <= Self.maxDimension, height <= Self.maxDimension else {
            return .error(Response.errInvalidParameter)
        }
        let bytes = Int(width) * Int(height) * 4
        return state.withLock { s in
            guard s.resources[id] == nil else { return .error(Response.errInvalidResourceID) }
            guard s.hostMemory + bytes <= hostMemoryLimit, let buffer = PixelBuffer(count: bytes) else {
                return .error(Response.errOutOfMemory)
            }
            s.hostMemory += bytes
            s.resources[id] = Resource(width: Int(width), height: Int(height), formatCode: code, format: format, buffer: buffer)
            return .ok
        }
    }

    private func unref(id: UInt32) -> Reply {
        let (reply, disable) = state.withLock { s -> (Reply, Bool) in
            guard let r = s.resources.removeValue(forKey: id) else { return (.error(Response.errInvalidResourceID), false) }
            s.hostMemory -= r.buffer.count
            if s.scanout?.resourceID == id {
                s.scanout = nil
                return (.ok, true)
            }
            return (.ok, false)
        }
        if disable { display.setSurface(nil) }
        return reply
    }

    /// True when the rectangle lies inside a `width` x `height` resource (no overflow possible:
    /// every field came from a 32-bit value).
    private static func fits(_ r: (x: Int, y: Int, width: Int, height: Int), width: Int, height: Int) -> Bool {
        r.x <= width && r.y <= height && r.width <= width - r.x && r.height <= height - r.y
    }

    private func setScanout(rect r: (x: Int, y: Int, width: Int, height: Int), scanoutID: UInt32, resourceID: UInt32) -> Reply {
        guard scanoutID == 0 else { return .error(Response.errInvalidScanoutID) }
        if resourceID == 0 || r.width == 0 || r.height == 0 {
            // Disables the scanout (what Linux does on DPMS off / CRTC disable).
            let had = state.withLock { s -> Bool in
                let had = s.scanout != nil
                s.scanout = nil
                return had
            }
            if had { display.setSurface(nil) }
            return .ok
        }
        let result = state.withLock { s -> (Reply, DisplaySurface?) in
            guard let res = s.resources[resourceID] else { return (.error(Response.errInvalidResourceID), nil) }
            guard Self.fits(r, width: res.width, height: res.height),
                  let surface = DisplaySurface(buffer: res.buffer, offset: r.y * res.stride + r.x * 4, width: r.width,
                                               height: r.height, stride: res.stride, format: res.format)
            else { return (.error(Response.errInvalidParameter), nil) }
            s.scanout = Scanout(resourceID: resourceID, rect: DisplayRect(x: r.x, y: r.y, width: r.width, height: r.height))
            return (.ok, surface)
        }
        if let surface = result.1 { display.setSurface(surface) }
        return result.0
    }

    private func flush(rect r: (x: Int, y: Int, width: Int, height: Int), resourceID: UInt32) -> Reply {
        let result = state.withLock { s -> (Reply, DisplayRect?) in
            guard let res = s.resources[resourceID] else { return (.error(Response.errInvalidResourceID), nil) }
            guard Self.fits(r, width: res.width, height: res.height) else { return (.error(Response.errInvalidParameter), nil) }
            guard let sc = s.scanout, sc.resourceID == resourceID else { return (.ok, nil) }
            // Into scanout coordinates.
            let moved = DisplayRect(x: r.x - sc.rect.x, y: r.y - sc.rect.y, width: r.width, height: r.height)
            return (.ok, moved.clipped(width: sc.rect.width, height: sc.rect.height))
        }
        if let dirty = result.1, !dirty.isEmpty { display.update(dirty) }
        return result.0
    }

    private func transfer(rect r: (x: Int, y: Int, width: Int, height: Int), offset: UInt64, resourceID: UInt32) -> Reply {
        state.withLock { s in
            guard let res = s.resources[resourceID] else { return .error(Response.errInvalidResourceID) }
            guard !res.backing.isEmpty else {
                logger.debug("\(name): transfer to resource \(resourceID), which has no backing")
                return .error(Response.errUnspecified)
            }
            guard Self.fits(r, width: res.width, height: res.height) else { return .error(Response.errInvalidParameter) }
            if r.width == 0 || r.height == 0 { return .ok }
            let backingSize = res.backing.reduce(0) { $0 + $1.length }
            let rowBytes = r.width * 4
            let lastRow = offset.addingReportingOverflow(UInt64(res.stride) * UInt64(r.height - 1))
            guard !lastRow.overflow, lastRow.partialValue + UInt64(rowBytes) <= UInt64(backingSize) else {
                logger.debug("\(name): transfer reads past the \(backingSize)-byte backing of resource \(resourceID)")
                return .error(Response.errInvalidParameter)
            }
            for row in 0..<r.height {
                let src = Int(offset) + row * res.stride
                let dst = res.buffer.bytes + (r.y + row) * res.stride + r.x * 4
                Self.gather(res.backing, from: src, count: rowBytes, into: dst)
            }
            return .ok
        }
    }

    /// Copies `count` bytes starting at byte `offset` of the scattered backing into `dst`.
    private static func gather(_ backing: [Backing], from offset: Int, count: Int, into dst: UnsafeMutableRawPointer) {
        var skip = offset, done = 0
        for seg in backing where done < count {
            if skip >= seg.length { skip -= seg.length; continue }
            let n = min(seg.length - skip, count - done)
            (dst + done).copyMemory(from: seg.host + skip, byteCount: n)
            done += n
            skip = 0
        }
    }

    private func attachBacking(_ req: Request, ram: GuestRAM) -> Reply {
        let h = Self.headerSize
        let id = req.u32(h), count = Int(req.u32(h + 4))
        guard count > 0, count <= Self.maxBackingEntries else { return .error(Response.errInvalidParameter) }
        // The entries follow the command, possibly in further descriptors.
        guard req.bytes.count >= h + 8 + 16 * count else {
            logger.debug("\(name): attach-backing of \(count) entries is only \(req.bytes.count) bytes")
            return .error(Response.errUnspecified)
        }
        var backing: [Backing] = []
        backing.reserveCapacity(count)
        for i in 0..<count {
            let e = h + 8 + 16 * i
            let addr = GuestPhysicalAddress(req.u64(e)), len = req.u32(e + 8)
            guard len > 0, let host = ram.hostPointer(addr, length: UInt64(len)) else {
                logger.debug("\(name): backing entry \(i) (\(len) bytes at \(addr)) is not guest RAM")
                return .error(Response.errInvalidParameter)
            }
            backing.append(Backing(address: addr, host: host, length: Int(len)))
        }
        return state.withLock { s in
            guard s.resources[id] != nil else { return .error(Response.errInvalidResourceID) }
            guard s.resources[id]!.backing.isEmpty else { return .error(Response.errUnspecified) }
            s.resources[id]!.backing = backing
            return .ok
        }
    }
}

// MARK: Saved state

extension VirtioGPU {
    public var deviceStateVersion: UInt32 { 1 }

    /// Every resource (size, format, pixels, backing as guest-physical ranges), the scanout and
    /// the config events.
    public func saveDeviceState(to w: inout StateWriter) {
        state.withLock { s in
            w.u32(s.eventsRead)
            w.count(s.resources.count)
            for (id, r) in s.resources.sorted(by: { $0.key < $1.key }) {
                w.u32(id)
                w.u32(UInt32(r.width))
                w.u32(UInt32(r.height))
                w.u32(r.formatCode)
                w.bytes(UnsafeRawBufferPointer(start: r.buffer.bytes, count: r.buffer.count))
                w.count(r.backing.count)
                for b in r.backing {
                    w.u64(b.address.raw)
                    w.u32(UInt32(b.length))
                }
            }
            w.optional(s.scanout) { w, sc in
                w.u32(sc.resourceID)
                for v in [sc.rect.x, sc.rect.y, sc.rect.width, sc.rect.height] { w.u32(UInt32(v)) }
            }
        }
    }

    /// Rebuilds resources and the scanout, checking sizes against the host-memory limit, formats
    /// against the known ones and backing ranges against guest RAM.
    public func loadDeviceState(from r: inout StateReader, version: UInt32, ram: GuestRAM) throws(SavedStateError) {
        guard version == 1 else { throw r.invalid("(device version)", "layout version \(version) is not supported") }
        let eventsRead = try r.u32("events-read")
        let n = try r.count("resources", limit: 1 << 16, minimumElementSize: 24)
        var resources: [UInt32: Resource] = [:]
        var memory = 0
        for i in 0..<n {
            let f = "resources[\(i)]"
            let id = try r.u32(f + ".id")
            let width = Int(try r.u32(f + ".width")), height = Int(try r.u32(f + ".height"))
            let code = try r.u32(f + ".format")
            guard id != 0, resources[id] == nil else { throw r.invalid(f + ".id", "\(id) is zero or repeated") }
            guard let format = Self.formats[code] else { throw r.invalid(f + ".format", "\(code) is not a known format") }
            guard width > 0, height > 0, width <= Self.maxDimension, height <= Self.maxDimension else {
                throw r.invalid(f + ".width", "\(width)x\(height) is outside 1...\(Self.maxDimension)")
            }
            let size = width * height * 4
            guard memory + size <= hostMemoryLimit else {
                throw r.invalid(f, "resources exceed the host memory limit of \(hostMemoryLimit) bytes")
            }
            let pixels = try r.bytes(f + ".pixels", limit: size)
            guard pixels.count == size else { throw r.invalid(f + ".pixels", "\(pixels.count) bytes, expected \(size)") }
            guard let buffer = PixelBuffer(count: size) else { throw r.invalid(f, "cannot allocate \(size) bytes") }
            pixels.withUnsafeBytes { buffer.bytes.copyMemory(from: $0.baseAddress!, byteCount: size) }
            memory += size
            let bn = try r.count(f + ".backing", limit: Self.maxBackingEntries, minimumElementSize: 12)
            var backing: [Backing] = []
            for j in 0..<bn {
                let addr = GuestPhysicalAddress(try r.u64(f + ".backing[\(j)].address"))
                let len = try r.u32(f + ".backing[\(j)].length")
                guard len > 0, let host = ram.hostPointer(addr, length: UInt64(len)) else {
                    throw r.invalid(f + ".backing[\(j)]", "\(len) bytes at \(addr) are not guest RAM")
                }
                backing.append(Backing(address: addr, host: host, length: Int(len)))
            }
            resources[id] = Resource(width: width, height: height, formatCode: code, format: format, buffer: buffer,
                                     backing: backing)
        }
        let scanout = try r.optional("scanout") { (r: inout StateReader) throws(SavedStateError) -> Scanout in
            let rid = try r.u32("scanout.resource")
            let x = Int(try r.u32("scanout.x")), y = Int(try r.u32("scanout.y"))
            let w = Int(try r.u32("scanout.width")), h = Int(try r.u32("scanout.height"))
            return Scanout(resourceID: rid, rect: DisplayRect(x: x, y: y, width: w, height: h))
        }
        var surface: DisplaySurface?
        if let sc = scanout {
            guard let res = resources[sc.resourceID] else {
                throw r.invalid("scanout.resource", "\(sc.resourceID) is not a saved resource")
            }
            let rect = (x: sc.rect.x, y: sc.rect.y, width: sc.rect.width, height: sc.rect.height)
            guard sc.rect.width > 0, sc.rect.height > 0, Self.fits(rect, width: res.width, height: res.height),
                  let made = DisplaySurface(buffer: res.buffer, offset: rect.y * res.stride + rect.x * 4, width: rect.width,
                                            height: rect.height, stride: res.stride, format: res.format)
            else { throw r.invalid("scanout", "the rectangle does not fit resource \(sc.resourceID)") }
            surface = made
        }
        state.withLock { s in
            s.eventsRead = eventsRead
            s.resources = resources
            s.scanout = scanout
            s.hostMemory = memory
        }
        display.setSurface(surface)
        if let surface { display.update(DisplayRect(x: 0, y: 0, width: surface.width, height: surface.height)) }
    }
}
