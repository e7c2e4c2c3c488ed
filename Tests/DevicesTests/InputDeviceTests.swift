import Foundation
import Machine
import Testing
@testable import Devices

/// An input device with eventq (queue 0) and statusq (queue 1) in guest RAM.
final class InputHarness {
    let ram = try! GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)
    let display = Display()
    let irq = RecordingVirtioInterrupt()
    let device: VirtioInput
    let events: VirtqueueDriverRing
    let status: VirtqueueDriverRing
    static let buffers: UInt64 = 0x8008_0000

    init(_ kind: VirtioInput.Kind, buffers n: Int = 16) throws {
        device = VirtioInput(kind: kind, display: display)
        events = try VirtqueueDriverRing(ram: ram, index: 0, base: 0x8000_0000, size: 64)
        status = try VirtqueueDriverRing(ram: ram, index: 1, base: 0x8000_2000)
        try device.activate(VirtioContext(queues: [events.queue, status.queue], ram: ram, features: Virtio.featureVersion1,
                                          interrupt: irq))
        postBuffers(n)
    }

    var posted = 0
    func postBuffers(_ n: Int) {
        for _ in 0..<n {
            events.post([(Self.buffers + 8 * UInt64(posted), 8, true)])
            posted += 1
        }
        device.queueNotify(0)
    }

    /// The events the device wrote, in order, as (type, code, value).
    var written: [(UInt16, UInt16, Int32)] {
        (0..<Int(events.usedIdx)).map { i in
            let a = Self.buffers + 8 * UInt64(i)
            return (events.peek(UInt16.self, at: a), events.peek(UInt16.self, at: a + 2), Int32(bitPattern: events.peek(UInt32.self, at: a + 4)))
        }
    }

    func config(select: UInt8, subsel: UInt8) -> (size: Int, bytes: [UInt8]) {
        device.writeConfig(offset: 0, size: 1, value: UInt64(select))
        device.writeConfig(offset: 1, size: 1, value: UInt64(subsel))
        let size = Int(device.readConfig(offset: 2, size: 1))
        return (size, (0..<size).map { UInt8(device.readConfig(offset: 8 + $0, size: 1)) })
    }
}

private func bit(_ bytes: [UInt8], _ n: Int) -> Bool { n / 8 < bytes.count && bytes[n / 8] & (1 << (n % 8)) != 0 }

@Suite struct InputDeviceTests {
    @Test func keyboardConfigSpace() throws {
        let h = try InputHarness(.keyboard)
        #expect(h.device.deviceID == 18)
        #expect(String(decoding: h.config(select: 1, subsel: 0).bytes, as: UTF8.self) == "QEMU Virtio Keyboard")
        #expect(h.config(select: 2, subsel: 0).size > 0)
        #expect(h.config(select: 3, subsel: 0).bytes == [6, 0, 0x27, 0x06, 1, 0, 1, 0])
        let keys = h.config(select: 0x11, subsel: 1)
        #expect(keys.size == 32 && bit(keys.bytes, 30) && bit(keys.bytes, Int(LinuxKey.power)) && !bit(keys.bytes, 0))
        #expect(bit(h.config(select: 0x11, subsel: 0x11).bytes, 1))  // LED_CAPSL
        #expect(h.config(select: 0x11, subsel: 2).size == 0)  // no EV_REL on a keyboard
        #expect(h.config(select: 0x12, subsel: 0).size == 0)
        #expect(h.config(select: 0x10, subsel: 0).size == 0)
        #expect(h.config(select: 0x77, subsel: 0).size == 0)
    }

    @Test func tabletConfigSpace() throws {
        let h = try InputHarness(.tablet)
        #expect(String(decoding: h.config(select: 1, subsel: 0).bytes, as: UTF8.self) == "QEMU Virtio Tablet")
        let abs = h.config(select: 0x11, subsel: 3)
        #expect(bit(abs.bytes, 0) && bit(abs.bytes, 1))
        let btn = h.config(select: 0x11, subsel: 1)
        #expect(bit(btn.bytes, 0x110) && bit(btn.bytes, 0x111) && bit(btn.bytes, 0x112) && !bit(btn.bytes, 30))
        #expect(bit(h.config(select: 0x11, subsel: 2).bytes, 8))  // REL_WHEEL
        let info = h.config(select: 0x12, subsel: 0)
        #expect(info.size == 20 && info.bytes[4] == 0xff && info.bytes[5] == 0x7f)
    }

    @Test func keysReachEventqWithSync() throws {
        let h = try InputHarness(.keyboard)
        h.display.sendInput([.key(code: 30, down: true)])
        h.display.sendInput([.key(code: 30, down: false)])
        h.display.sendInput([.absolute(.x, value: 5)])  // not for a keyboard
        let w = h.written
        #expect(w.count == 4)
        #expect(w.map { $0.0 } == [1, 0, 1, 0] && w[0].1 == 30 && w[0].2 == 1 && w[2].2 == 0)
        #expect(h.irq.entries.contains("used 0"))
    }

    @Test func tabletPointerAndWheel() throws {
        let h = try InputHarness(.tablet)
        h.device.handle([.absolute(.x, value: 0x7fff), .absolute(.y, value: 99_999), .button(.left, down: true),
                         .button(.wheelDown, down: true), .key(code: 30, down: true)])
        let w = h.written
        #expect(w.count == 5)
        #expect(w[0] == (3, 0, 0x7fff) && w[1] == (3, 1, 0x7fff))  // clamped
        #expect(w[2] == (1, 0x110, 1) && w[3] == (2, 8, -1) && w[4] == (0, 0, 0))
    }

    @Test func eventsWaitForBuffersAndOverflowIsCounted() throws {
        let h = try InputHarness(.keyboard, buffers: 1)
        h.device.handle([.key(code: 2, down: true)])
        #expect(h.written.count == 1)  // the SYN waits
        h.postBuffers(1)
        #expect(h.written.count == 2 && h.written[1].0 == 0)
        for _ in 0..<3000 { h.device.handle([.key(code: 3, down: true)]) }
        #expect(h.device.droppedReports > 0)
    }

    @Test func powerKey() throws {
        let h = try InputHarness(.keyboard)
        h.device.pressPowerKey()
        #expect(h.written.map { $0.1 } == [116, 0, 116, 0])
    }

    @Test func statusqLEDsReachTheDisplay() throws {
        let h = try InputHarness(.keyboard)
        let a: UInt64 = 0x8009_0000
        // EV_LED LED_CAPSL 1, EV_SYN.
        try h.ram.write(Data([0x11, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), at: GuestPhysicalAddress(a))
        h.status.post([(a, 16, false)])
        h.device.queueNotify(1)
        #expect(h.status.usedIdx == 1)
        #expect(h.device.leds == .capsLock)
        #expect(h.display.keyboardLEDs == .capsLock)
    }

    @Test func hostileEventqMarksNeedsReset() throws {
        let h = try InputHarness(.keyboard, buffers: 0)
        h.events.post([(0x1000, 8, true)])  // not guest RAM
        h.device.handle([.key(code: 2, down: true)])
        #expect(h.irq.entries.contains { $0.hasPrefix("reset") })
    }
}
