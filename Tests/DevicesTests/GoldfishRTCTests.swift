import Foundation
import Machine
import Synchronization
import Testing
@testable import Devices

/// A settable wall clock.
final class FakeWallClock: Sendable {
    let now = Atomic<UInt64>(1_700_000_000_000_000_000)
    var read: @Sendable () -> UInt64 { { [self] in now.load(ordering: .relaxed) } }
}

struct GoldfishRTCTests {
    @Test func timeLowLatchesTimeHigh() {
        let wall = FakeWallClock()
        let rtc = GoldfishRTC(irq: RecordingLine(), wallClock: wall.read)
        let t = wall.now.load(ordering: .relaxed)
        let low = rtc.read(offset: 0, size: 4)
        wall.now.store(t + (5 << 32), ordering: .relaxed)  // time moves on before the high read
        let high = rtc.read(offset: 4, size: 4)
        #expect(high << 32 | low == t)
    }

    @Test func guestWritesSetTheTimeAsAnOffset() {
        let wall = FakeWallClock()
        let rtc = GoldfishRTC(irq: RecordingLine(), wallClock: wall.read)
        let target: UInt64 = 0x0000_0012_3456_7890
        rtc.write(offset: 4, size: 4, value: target >> 32)     // driver: high, then low
        rtc.write(offset: 0, size: 4, value: target & 0xFFFF_FFFF)
        #expect(rtc.guestTime == target)
        wall.now.add(1000, ordering: .relaxed)
        let low = rtc.read(offset: 0, size: 4), high = rtc.read(offset: 4, size: 4)
        #expect(high << 32 | low == target + 1000)
    }

    @Test func alarmInThePastFiresAtOnceAndInterruptIsGatedByEnable() {
        let wall = FakeWallClock()
        let line = RecordingLine()
        let rtc = GoldfishRTC(irq: line, wallClock: wall.read)
        let now = rtc.guestTime
        rtc.write(offset: 0x0C, size: 4, value: (now - 10) >> 32)
        rtc.write(offset: 0x08, size: 4, value: (now - 10) & 0xFFFF_FFFF)
        #expect(rtc.read(offset: 0x18, size: 4) == 0)  // no longer armed: it fired
        #expect(!line.level)                            // IRQ not enabled yet
        rtc.write(offset: 0x10, size: 4, value: 1)
        #expect(line.level)
        #expect(rtc.read(offset: 0x10, size: 4) == 1)
        rtc.write(offset: 0x1C, size: 4, value: 1)      // CLEAR_INTERRUPT
        #expect(!line.level)
    }

    @Test func futureAlarmFiresFromTheTimer() async throws {
        let wall = FakeWallClock()
        let line = RecordingLine()
        let rtc = GoldfishRTC(irq: line, wallClock: wall.read)
        rtc.write(offset: 0x10, size: 4, value: 1)
        let when = rtc.guestTime + 30_000_000  // 30 ms
        rtc.write(offset: 0x0C, size: 4, value: when >> 32)
        rtc.write(offset: 0x08, size: 4, value: when & 0xFFFF_FFFF)
        #expect(rtc.read(offset: 0x18, size: 4) == 1)
        #expect(!line.level)
        wall.now.add(30_000_000, ordering: .relaxed)  // due now; the timer set for 30 ms fires it
        for _ in 0..<300 where !line.level { try await Task.sleep(nanoseconds: 10_000_000) }
        #expect(line.level)
        #expect(rtc.read(offset: 0x18, size: 4) == 0)
    }

    @Test func clearAlarmDisarmsIt() async throws {
        // The clock stands still while the alarm is set and cleared (a loaded machine must not
        // let it fall due in between), then moves past it; the timer set for it must do nothing.
        let wall = FakeWallClock()
        let line = RecordingLine()
        let rtc = GoldfishRTC(irq: line, wallClock: wall.read)
        rtc.write(offset: 0x10, size: 4, value: 1)
        let when = rtc.guestTime + 20_000_000
        rtc.write(offset: 0x0C, size: 4, value: when >> 32)
        rtc.write(offset: 0x08, size: 4, value: when & 0xFFFF_FFFF)
        #expect(rtc.read(offset: 0x18, size: 4) == 1)
        rtc.write(offset: 0x14, size: 4, value: 1)
        #expect(rtc.read(offset: 0x18, size: 4) == 0)
        wall.now.add(100_000_000, ordering: .relaxed)
        try await Task.sleep(nanoseconds: 100_000_000)  // the 20 ms timer has run by now
        #expect(!line.level)
    }
}
