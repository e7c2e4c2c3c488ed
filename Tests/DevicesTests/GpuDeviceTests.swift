import Machine
import Synchronization
import Testing
@testable import Devices

/// Records what a device asks of its transport.
final class RecordingVirtioInterrupt: VirtioInterrupt, @unchecked Sendable {
    private let log = Mutex<[String]>([])
    func signalUsedBuffer(queue: Int) { log.withLock { $0.append("used \(queue)") } }
    func signalConfigChange() { log.withLock { $0.append("config") } }
    func markNeedsReset(reason: String) { log.withLock { $0.append("reset: \(reason)") } }
    var entries: [String] { log.withLock { $0 } }
}

/// The driver's side of one split virtqueue, laid out in guest RAM at `base`.
final class VirtqueueDriverRing {
    let ram: GuestRAM
    let base: UInt64
    let size: UInt16
    var availIdx: UInt16 = 0
    var nextDesc: UInt16 = 0
    let queue: Virtqueue

    init(ram: GuestRAM, index: Int, base: UInt64, size: UInt16 = 16) throws {
        self.ram = ram
        self.base = base
        self.size = size
        queue = try Virtqueue(index: index, size: size, descriptorTable: GuestPhysicalAddress(base),
                              driverArea: GuestPhysicalAddress(base + 0x400), deviceArea: GuestPhysicalAddress(base + 0x800),
                              ram: ram, eventIndex: false)
    }

    func put<T: FixedWidthInteger>(_ v: T, at a: UInt64) {
        withUnsafeBytes(of: v.littleEndian) { try! ram.write($0, at: GuestPhysicalAddress(a)) }
    }
    func peek<T: FixedWidthInteger>(_: T.Type, at a: UInt64) -> T {
        T(littleEndian: ram.hostPointer(GuestPhysicalAddress(a), length: UInt64(MemoryLayout<T>.size))!.loadUnaligned(as: T.self))
    }

    /// Posts a chain of (address, length, writable) buffers; returns its head.
    @discardableResult
    func post(_ buffers: [(UInt64, UInt32, Bool)]) -> UInt16 {
        let head = nextDesc % size
        for (i, b) in buffers.enumerated() {
            let d = base + 16 * UInt64((nextDesc + UInt16(i)) % size)
            let last = i == buffers.count - 1
            put(b.0, at: d); put(b.1, at: d + 8)
            put(UInt16((last ? 0 : 1) | (b.2 ? 2 : 0)), at: d + 12)
            put(UInt16((nextDesc + UInt16(i) + 1) % size), at: d + 14)
        }
        nextDesc = nextDesc &+ UInt16(buffers.count)
        put(head, at: base + 0x400 + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        put(availIdx, at: base + 0x400 + 2)
        return head
    }

    var usedIdx: UInt16 { peek(UInt16.self, at: base + 0x800 + 2) }
    func used(_ i: UInt16) -> (id: UInt32, len: UInt32) {
        let e = base + 0x800 + 4 + 8 * UInt64(i % size)
        return (peek(UInt32.self, at: e), peek(UInt32.self, at: e + 4))
    }
}

/// Watches a display like the VNC server does.
final class RecordingListener: DisplayListener, @unchecked Sendable {
    private let log = Mutex<(surfaces: [DisplaySurface?], rects: [DisplayRect])>(([], []))
    func displaySurfaceChanged(_ surface: DisplaySurface?) { log.withLock { $0.surfaces.append(surface) } }
    func displayRegionUpdated(_ rect: DisplayRect) { log.withLock { $0.rects.append(rect) } }
    var surfaces: [DisplaySurface?] { log.withLock { $0.surfaces } }
    var rects: [DisplayRect] { log.withLock { $0.rects } }
}

/// A GPU with its control queue driven from guest RAM, the way Linux's virtio-gpu driver does.
final class GpuHarness {
    let ram = try! GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 4 << 20)
    let display = Display(preferredWidth: 1280, preferredHeight: 800)
    let listener = RecordingListener()
    let irq = RecordingVirtioInterrupt()
    let gpu: VirtioGPU
    let control: VirtqueueDriverRing
    let cursor: VirtqueueDriverRing
    static let request: UInt64 = 0x8001_0000, response: UInt64 = 0x8001_8000

    init() throws {
        gpu = VirtioGPU(display: display)
        display.addListener(listener)
        control = try VirtqueueDriverRing(ram: ram, index: 0, base: 0x8000_0000)
        cursor = try VirtqueueDriverRing(ram: ram, index: 1, base: 0x8000_1000)
        try gpu.activate(VirtioContext(queues: [control.queue, cursor.queue], ram: ram, features: Virtio.featureVersion1,
                                       interrupt: irq))
    }

    /// Little-endian 32-bit words as bytes.
    static func words(_ w: [UInt32]) -> [UInt8] { w.flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } } }

    /// Sends a command (header with `type`, then `body`) and returns (response type, response bytes).
    @discardableResult
    func command(_ type: UInt32, _ body: [UInt8], flags: UInt32 = 0, fence: UInt64 = 0, responseSize: UInt32 = 24)
        -> (type: UInt32, bytes: [UInt8]) {
        let header = Self.words([type, flags, UInt32(truncatingIfNeeded: fence), UInt32(fence >> 32), 0, 0])
        let req = header + body
        try! ram.write(req.withUnsafeBytes { Data($0) }, at: GuestPhysicalAddress(Self.request))
        try! ram.write(Data(repeating: 0xee, count: Int(responseSize)), at: GuestPhysicalAddress(Self.response))
        let before = control.usedIdx
        control.post([(Self.request, UInt32(req.count), false), (Self.response, responseSize, true)])
        gpu.queueNotify(0)
        #expect(control.usedIdx == before &+ 1)
        let bytes = try! ram.read(GuestPhysicalAddress(Self.response), count: Int(responseSize))
        let t = UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
        return (t, bytes)
    }

    func create(_ id: UInt32, format: UInt32 = 2, _ w: UInt32, _ h: UInt32) -> UInt32 {
        command(VirtioGPU.Command.resourceCreate2D, Self.words([id, format, w, h])).type
    }
    func attach(_ id: UInt32, _ entries: [(UInt64, UInt32)]) -> UInt32 {
        var body = Self.words([id, UInt32(entries.count)])
        for (a, l) in entries { body += Self.words([UInt32(truncatingIfNeeded: a), UInt32(a >> 32), l, 0]) }
        return command(VirtioGPU.Command.resourceAttachBacking, body).type
    }
    func scanout(_ id: UInt32, _ r: [UInt32], scanout: UInt32 = 0) -> UInt32 {
        command(VirtioGPU.Command.setScanout, Self.words(r + [scanout, id])).type
    }
    func transfer(_ id: UInt32, _ r: [UInt32], offset: UInt64) -> UInt32 {
        command(VirtioGPU.Command.transferToHost2D, Self.words(r + [UInt32(truncatingIfNeeded: offset), UInt32(offset >> 32), id, 0])).type
    }
    func flush(_ id: UInt32, _ r: [UInt32]) -> UInt32 {
        command(VirtioGPU.Command.resourceFlush, Self.words(r + [id, 0])).type
    }
}

import Foundation

private let ok = VirtioGPU.Response.okNoData

@Suite struct GpuDeviceTests {
    @Test func identityAndConfig() {
        let h = try! GpuHarness()
        #expect(h.gpu.deviceID == 16)
        #expect(h.gpu.queueCount == 2)
        #expect(h.gpu.readConfig(offset: 8, size: 4) == 1)  // num_scanouts
        #expect(h.gpu.readConfig(offset: 12, size: 4) == 0)  // num_capsets
    }

    @Test func displayInfoOffersDefaultMode() {
        let h = try! GpuHarness()
        let r = h.command(VirtioGPU.Command.getDisplayInfo, [], responseSize: 24 + 16 * 24)
        #expect(r.type == VirtioGPU.Response.okDisplayInfo)
        let w = { (i: Int) -> UInt32 in UInt32(r.bytes[i]) | UInt32(r.bytes[i + 1]) << 8 | UInt32(r.bytes[i + 2]) << 16 }
        #expect(w(24 + 8) == 1280 && w(24 + 12) == 800 && w(24 + 16) == 1)
        #expect(w(24 + 24 + 16) == 0)  // scanout 1 disabled
    }

    @Test func drawFlowReachesDisplay() throws {
        let h = try GpuHarness()
        let w: UInt32 = 64, ht: UInt32 = 32
        #expect(h.create(1, w, ht) == ok)
        // Backing in two pieces, like scattered guest pages.
        let fb1: UInt64 = 0x8010_0000, fb2: UInt64 = 0x8020_0000
        let half = w * 4 * 16
        #expect(h.attach(1, [(fb1, half), (fb2, half)]) == ok)
        #expect(h.scanout(1, [0, 0, w, ht]) == ok)
        let surface = try #require(h.listener.surfaces.last ?? nil)
        #expect(surface.width == 64 && surface.height == 32 && surface.format == .b8g8r8x8)

        // The guest paints pixel (5, 20) (in the second backing piece) red: B,G,R,X = 0,0,255,0.
        let off = UInt64(20 * w * 4 + 5 * 4)
        try h.ram.write(Data([0, 0, 255, 0]), at: GuestPhysicalAddress(fb2 + off - UInt64(half)))
        #expect(h.transfer(1, [5, 20, 1, 1], offset: off) == ok)
        #expect(h.flush(1, [5, 20, 1, 1]) == ok)
        #expect(h.listener.rects.last == DisplayRect(x: 5, y: 20, width: 1, height: 1))
        #expect(surface.rgb(x: 5, y: 20) == (255, 0, 0))
        #expect(surface.rgb(x: 4, y: 20) == (0, 0, 0))

        // A whole-frame transfer works too.
        try h.ram.write(Data([9, 8, 7, 0]), at: GuestPhysicalAddress(fb1))
        #expect(h.transfer(1, [0, 0, w, ht], offset: 0) == ok)
        #expect(surface.rgb(x: 0, y: 0) == (7, 8, 9))
        #expect(try h.display.screendump(format: .ppm).count == "P6\n64 32\n255\n".utf8.count + 64 * 32 * 3)
    }

    @Test func scanoutOfSubRectangleTranslatesFlush() throws {
        let h = try GpuHarness()
        #expect(h.create(7, format: 67, 100, 100) == ok)  // R8G8B8A8
        #expect(h.scanout(7, [10, 20, 50, 40]) == ok)
        let s = try #require(h.listener.surfaces.last ?? nil)
        #expect(s.width == 50 && s.height == 40 && s.offset == 20 * 400 + 40 && s.format == .r8g8b8a8)
        #expect(h.flush(7, [0, 0, 100, 100]) == ok)
        #expect(h.listener.rects.last == DisplayRect(x: 0, y: 0, width: 50, height: 40))
        #expect(h.flush(7, [0, 0, 5, 5]) == ok)  // outside the scanout window: nothing to show
        #expect(h.listener.rects.count == 1)
        // Unref of the scanned-out resource disables the display.
        #expect(h.command(VirtioGPU.Command.resourceUnref, GpuHarness.words([7, 0])).type == ok)
        #expect(h.listener.surfaces.last! == nil)
        #expect(h.display.surface == nil)
        #expect(h.gpu.resourceCount == 0)
    }

    @Test func nonsenseGetsErrorsNotCrashes() throws {
        let h = try GpuHarness()
        let R = VirtioGPU.Response.self
        #expect(h.create(0, 10, 10) == R.errInvalidResourceID)
        #expect(h.create(1, format: 99, 10, 10) == R.errInvalidParameter)
        #expect(h.create(1, 0, 10) == R.errInvalidParameter)
        #expect(h.create(1, 100_000, 10) == R.errInvalidParameter)
        #expect(h.create(1, 16, 16) == ok)
        #expect(h.create(1, 16, 16) == R.errInvalidResourceID)  // already exists
        #expect(h.create(2, 16384, 16384) == R.errOutOfMemory)  // 1 GiB > 256 MiB limit
        #expect(h.scanout(9, [0, 0, 16, 16]) == R.errInvalidResourceID)
        #expect(h.scanout(1, [0, 0, 16, 16], scanout: 3) == R.errInvalidScanoutID)
        #expect(h.scanout(1, [8, 8, 16, 16]) == R.errInvalidParameter)
        #expect(h.scanout(1, [0xffff_ffff, 0, 2, 2]) == R.errInvalidParameter)
        #expect(h.flush(1, [0, 0, 17, 1]) == R.errInvalidParameter)
        #expect(h.flush(5, [0, 0, 1, 1]) == R.errInvalidResourceID)
        #expect(h.transfer(1, [0, 0, 16, 16], offset: 0) == R.errUnspecified)  // no backing yet
        #expect(h.attach(1, [(0x1000, 4096)]) == R.errInvalidParameter)  // not guest RAM
        #expect(h.attach(1, [(0x803f_f000, 8192)]) == R.errInvalidParameter)  // runs off the end of RAM
        #expect(h.attach(1, [(0x8010_0000, 512)]) == ok)
        #expect(h.attach(1, [(0x8010_0000, 512)]) == R.errUnspecified)  // already attached
        #expect(h.transfer(1, [0, 0, 16, 16], offset: 0) == R.errInvalidParameter)  // backing too small (1 KiB needed)
        #expect(h.transfer(1, [0, 0, 16, 2], offset: 0) == ok)
        #expect(h.transfer(1, [0, 0, 16, 2], offset: UInt64.max - 10) == R.errInvalidParameter)
        #expect(h.command(VirtioGPU.Command.resourceDetachBacking, GpuHarness.words([1, 0])).type == ok)
        #expect(h.transfer(1, [0, 0, 16, 2], offset: 0) == R.errUnspecified)
        #expect(h.command(0x0999, []).type == R.errUnspecified)
        #expect(h.command(VirtioGPU.Command.resourceCreate2D, [1, 2]).type == R.errUnspecified)  // truncated
        #expect(h.command(VirtioGPU.Command.resourceUnref, GpuHarness.words([42, 0])).type == R.errInvalidResourceID)
        #expect(h.gpu.commandErrors == 22)
        #expect(!h.irq.entries.contains { $0.hasPrefix("reset") })
    }

    @Test func fenceIsEchoed() throws {
        let h = try GpuHarness()
        let r = h.command(VirtioGPU.Command.getDisplayInfo, [], flags: VirtioGPU.flagFence, fence: 0x1234_5678_9abc,
                          responseSize: 24 + 16 * 24)
        #expect(r.bytes[4] == 1)
        #expect(Array(r.bytes[8..<14]) == [0xbc, 0x9a, 0x78, 0x56, 0x34, 0x12])
        #expect(h.irq.entries.contains("used 0"))
    }

    @Test func cursorQueueIsDrained() throws {
        let h = try GpuHarness()
        try h.ram.write(Data(GpuHarness.words([VirtioGPU.Command.moveCursor, 0, 0, 0, 0, 0, 0, 10, 10, 0, 0, 0, 0, 0])),
                        at: GuestPhysicalAddress(GpuHarness.request))
        h.cursor.post([(GpuHarness.request, 56, false)])
        h.gpu.queueNotify(1)
        #expect(h.cursor.usedIdx == 1)
    }

    @Test func resetDropsResourcesAndDisablesDisplay() throws {
        let h = try GpuHarness()
        #expect(h.create(1, 8, 8) == ok)
        #expect(h.scanout(1, [0, 0, 8, 8]) == ok)
        h.gpu.reset()
        #expect(h.display.surface == nil)
        #expect(h.gpu.resourceCount == 0)
    }
}
