import Foundation
import FuzzSupport
import Machine
import Storage
import Testing
@testable import Devices

/// Fuzzes every virtio device's request handling with what a hostile guest can put in its
/// queues: the rings themselves are well formed (the virtqueue target covers broken rings), but
/// the chains' shapes, lengths, addresses and contents come from the input, so each device's own
/// parser (block request headers and discard segments, the net header and frames, GPU commands,
/// input status events, entropy requests) sees nonsense.
///
/// Input: byte 0 picks the device (block, net, GPU, keyboard, entropy); then records of
/// `[queue] [buffer count] ([flags] [length: u16 LE] [content length] [content])...`, where
/// flags bit 0 makes the buffer writable, bit 1 points it outside RAM, bit 2 gives it length 0,
/// bit 3 makes it overlap the previous buffer. For the NIC a queue byte with bit 7 set delivers
/// the record's first content to the guest as a received frame instead. After the records the
/// device is quiesced (in-flight work must finish), resumed and reset. Nothing may crash or
/// hang, every used entry must name a descriptor of the ring, and every reset request must
/// give a reason.
@Suite struct VirtioDeviceFuzzTests {
    static let ramBase: UInt64 = 0x8000_0000
    static let ramSize: UInt64 = 256 << 10
    static let arena: UInt64 = ramBase + 0x1_0000
    static let arenaSize: UInt64 = 0x2_0000

    /// One or two sensible requests per device, in the input format.
    static func seeds() -> [[UInt8]] {
        func buffer(_ content: [UInt8], length: Int? = nil, writable: Bool = false) -> [UInt8] {
            let l = UInt16(length ?? content.count)
            return [writable ? 1 : 0, UInt8(l & 0xff), UInt8(l >> 8), UInt8(content.count)] + content
        }
        func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
        func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
        let blkRead = [0, 3] + buffer(le32(0) + le32(0) + le64(2)) + buffer([], length: 512, writable: true) + buffer([], length: 1, writable: true)
        let blkWrite = [0, 3] + buffer(le32(1) + le32(0) + le64(4)) + buffer([UInt8](repeating: 0x5a, count: 64), length: 512) + buffer([], length: 1, writable: true)
        let blkDiscard = [0, 3] + buffer(le32(11) + le32(0) + le64(0)) + buffer(le64(8) + le32(8) + le32(0)) + buffer([], length: 1, writable: true)
        let frame = [UInt8](repeating: 0xff, count: 6) + [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x00] + [UInt8](repeating: 0x45, count: 40)
        let netTX = [1, 1] + buffer([UInt8](repeating: 0, count: 12) + frame)
        let netRX = [0, 1] + buffer([], length: 1526, writable: true) + [0x80, 1] + buffer(frame)
        let gpuInfo = [0, 2] + buffer(le32(0x0100) + [UInt8](repeating: 0, count: 20)) + buffer([], length: 408, writable: true)
        let gpuCreate = [0, 2] + buffer(le32(0x0101) + [UInt8](repeating: 0, count: 20) + le32(1) + le32(2) + le32(64) + le32(64))
            + buffer([], length: 24, writable: true)
        let kbdStatus = [1, 1] + buffer([0x11, 0, 0, 0, 1, 0, 0, 0])
        let kbdEvent = [0, 1] + buffer([], length: 8, writable: true)
        let rng = [0, 1] + buffer([], length: 64, writable: true)
        return [
            [0] + blkRead + blkWrite, [0] + blkDiscard, [1] + netRX + netTX, [2] + gpuInfo + gpuCreate,
            [3] + kbdEvent + kbdStatus, [4] + rng,
        ]
    }

    @Test func hostileRequestsNeverCrashOrHangAnyDevice() throws {
        // The built-in seeds, plus any inputs kept in tests/fuzz/corpus/virtio-devices.
        let seeds = Self.seeds() + Fuzz.corpus("virtio-devices")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("virtio-fuzz-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try RawImage.create(path: dir + "/disk.img", size: 1 << 20)
        let image = try openImage(path: dir + "/disk.img", readOnly: false)
        let ram = try GuestRAM(base: GuestPhysicalAddress(Self.ramBase), size: Self.ramSize)
        var findings: [String] = []

        let report = Fuzz.run(target: "virtio-devices", seeds: seeds, seconds: Fuzz.budget(ci: 3), maxLength: 4096) { input in
            guard var first = input.first else { return }
            if let only = ProcessInfo.processInfo.environment["FUZZ_VIRTIO_DEVICE"].flatMap(UInt8.init) { first = only }
            // A clean RAM for each execution, so one input cannot leave rings for the next.
            try ram.write(Data(count: Int(Self.ramSize)), at: GuestPhysicalAddress(Self.ramBase))
            let irq = RecordingVirtioInterrupt()
            let backend = FakeNetBackend()
            let device: any VirtioDevice
            switch first % 5 {
            case 0: device = VirtioBlock(drive: DriveConfig(image: image, serial: "FUZZ"))
            case 1: device = VirtioNet(mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56], backend: backend)
            case 2: device = VirtioGPU(display: Display(preferredWidth: 640, preferredHeight: 480), hostMemoryLimit: 8 << 20)
            case 3: device = VirtioInput(kind: .keyboard, display: nil)
            default: device = VirtioEntropy()
            }
            let rings = try (0..<device.queueCount).map {
                try VirtqueueDriverRing(ram: ram, index: $0, base: Self.ramBase + 0x1000 * UInt64($0))
            }
            try device.activate(VirtioContext(queues: rings.map(\.queue), ram: ram,
                                              features: device.deviceFeatures | Virtio.featureVersion1, interrupt: irq))
            var at = 1, cursor = Self.arena, previous = Self.arena
            func byte() -> UInt8? {
                guard at < input.count else { return nil }
                defer { at += 1 }
                return input[at]
            }
            while let q = byte(), let n = byte() {
                var chain: [(UInt64, UInt32, Bool)] = []
                var firstContent: [UInt8]?
                for _ in 0..<(1 + Int(n % 4)) {
                    guard let flags = byte(), let lo = byte(), let hi = byte(), let clen = byte() else { break }
                    let content = Array(input[min(at, input.count)..<min(at + Int(clen), input.count)])
                    at += Int(clen)
                    if firstContent == nil { firstContent = content }
                    var length = UInt32(lo) | UInt32(hi) << 8
                    if flags & 4 != 0 { length = 0 }
                    var address = flags & 8 != 0 ? previous : cursor
                    if flags & 2 != 0 { address = 0xffff_ffff_f000 }
                    if address == cursor {
                        if cursor + UInt64(max(length, UInt32(content.count))) > Self.arena + Self.arenaSize { cursor = Self.arena; address = cursor }
                        try ram.write(Data(content), at: GuestPhysicalAddress(address))
                        cursor += UInt64(max(length, UInt32(content.count)) + 15) & ~15
                    }
                    previous = address
                    chain.append((address, length, flags & 1 != 0))
                }
                if chain.isEmpty { break }
                if q & 0x80 != 0, first % 5 == 1 {
                    backend.deliver(firstContent ?? [])
                    continue
                }
                let index = Int(q & 0x7f) % device.queueCount
                rings[index].post(chain)
                device.queueNotify(index)
            }
            device.quiesce()
            device.resume()
            device.reset()
            backend.detach()  // the backend holds its frontend, as NetworkLoop does, until detached
            for ring in rings {
                let used = ring.usedIdx
                for i in 0..<min(used, ring.size) where ring.used(i).id >= UInt32(ring.size) {
                    findings.append("device \(first % 5) used descriptor \(ring.used(i).id) of a ring of \(ring.size)")
                }
            }
            for e in irq.entries where e == "reset: " { findings.append("device \(first % 5) asked for a reset without a reason") }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(findings.isEmpty, "\(findings.prefix(5))")
        #expect(report.executions > seeds.count)
    }
}
