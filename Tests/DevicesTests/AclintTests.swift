import Machine
import Testing
@testable import Devices

struct AclintTests {
    func make(harts n: Int = 2) -> (Aclint, [HartInterrupts], VirtualClock) {
        let harts = (0..<n).map { HartInterrupts(hartID: $0) }
        let clock = VirtualClock()
        return (Aclint(harts: harts, clock: clock), harts, clock)
    }

    @Test func msipDrivesEachHartsSoftwareInterrupt() {
        let (clint, harts, _) = make()
        clint.write(offset: 4, size: 4, value: 1)
        #expect(harts[1].lines.load(ordering: .relaxed) & HartInterrupts.msip != 0)
        #expect(harts[0].lines.load(ordering: .relaxed) & HartInterrupts.msip == 0)
        #expect(clint.read(offset: 4, size: 4) == 1)
        clint.write(offset: 4, size: 4, value: 0)
        #expect(harts[1].lines.load(ordering: .relaxed) == 0)
        #expect(clint.read(offset: 4, size: 4) == 0)
    }

    @Test func mtimecmpTakes64BitAndHalfWrites() {
        let (clint, harts, _) = make()
        clint.write(offset: 0x4008, size: 8, value: 0x1122_3344_5566_7788)
        #expect(harts[1].mtimecmp.load(ordering: .relaxed) == 0x1122_3344_5566_7788)
        #expect(harts[0].mtimecmp.load(ordering: .relaxed) == .max)
        clint.write(offset: 0x4000, size: 4, value: 0xAAAA_BBBB)
        clint.write(offset: 0x4004, size: 4, value: 0x0000_0001)
        #expect(harts[0].mtimecmp.load(ordering: .relaxed) == 0x1_AAAA_BBBB)
        #expect(clint.read(offset: 0x4000, size: 4) == 0xAAAA_BBBB)
        #expect(clint.read(offset: 0x4004, size: 4) == 1)
        #expect(clint.read(offset: 0x4008, size: 8) == 0x1122_3344_5566_7788)
        // The write kicked the hart so it re-evaluates MTIP.
        let kicked = harts[0].kick.load(ordering: .relaxed)
        #expect(kicked)
    }

    @Test func mtimeReadsTheVirtualClockAndIgnoresWrites() {
        let (clint, _, clock) = make()
        clock.pause()
        let t = clock.ticks
        #expect(clint.read(offset: 0xBFF8, size: 8) == t)
        #expect(clint.read(offset: 0xBFF8, size: 4) == t & 0xFFFF_FFFF)
        #expect(clint.read(offset: 0xBFFC, size: 4) == t >> 32)
        clint.write(offset: 0xBFF8, size: 8, value: 12345)
        #expect(clint.read(offset: 0xBFF8, size: 8) == t)
        clock.resume()
        #expect(clint.read(offset: 0xBFF8, size: 8) >= t)
    }

    @Test func accessesOutsideTheHartsAreHarmless() {
        let (clint, harts, _) = make(harts: 1)
        clint.write(offset: 4, size: 4, value: 1)  // no hart 1
        clint.write(offset: 0x4008, size: 8, value: 5)
        #expect(harts[0].lines.load(ordering: .relaxed) == 0)
        #expect(harts[0].mtimecmp.load(ordering: .relaxed) == .max)
        #expect(clint.read(offset: 0x4008, size: 8) == 0)
    }

    @Test func resetRestoresMsipAndMtimecmp() {
        let (clint, harts, _) = make()
        clint.write(offset: 0, size: 4, value: 1)
        clint.write(offset: 0x4000, size: 8, value: 10)
        clint.reset()
        #expect(harts[0].lines.load(ordering: .relaxed) == 0)
        #expect(harts[0].mtimecmp.load(ordering: .relaxed) == .max)
    }
}
