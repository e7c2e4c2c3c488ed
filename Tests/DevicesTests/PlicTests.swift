import Machine
import Testing
@testable import Devices

struct PlicTests {
    func make(harts n: Int = 2) -> (Plic, [HartInterrupts]) {
        let harts = (0..<n).map { HartInterrupts(hartID: $0) }
        return (Plic(harts: harts), harts)
    }
    func bits(_ h: HartInterrupts) -> UInt64 { h.lines.load(ordering: .relaxed) }
    func enable(_ p: Plic, ctx: UInt64, word: UInt64 = 0, _ v: UInt64) { p.write(offset: 0x2000 + 0x80 * ctx + 4 * word, size: 4, value: v) }
    func claim(_ p: Plic, ctx: UInt64) -> UInt64 { p.read(offset: 0x20_0004 + 0x1000 * ctx, size: 4) }
    func complete(_ p: Plic, ctx: UInt64, _ src: UInt64) { p.write(offset: 0x20_0004 + 0x1000 * ctx, size: 4, value: src) }

    @Test func enabledSourceAboveThresholdRaisesSupervisorExternalInterrupt() {
        let (plic, harts) = make()
        plic.write(offset: 4 * 10, size: 4, value: 1)  // priority of source 10
        enable(plic, ctx: 1, 1 << 10)                  // hart 0, S-mode
        plic.line(10).raise()
        #expect(bits(harts[0]) == HartInterrupts.seip)
        #expect(bits(harts[1]) == 0)
        #expect(plic.read(offset: 0x1000, size: 4) == 1 << 10)
        // Threshold at the priority masks it.
        plic.write(offset: 0x20_1000, size: 4, value: 1)
        #expect(bits(harts[0]) == 0)
        plic.write(offset: 0x20_1000, size: 4, value: 0)
        #expect(bits(harts[0]) == HartInterrupts.seip)
    }

    @Test func machineContextDrivesMEIPOfTheRightHart() {
        let (plic, harts) = make()
        plic.write(offset: 4 * 3, size: 4, value: 7)
        enable(plic, ctx: 2, 1 << 3)  // hart 1, M-mode
        plic.line(3).raise()
        #expect(bits(harts[1]) == HartInterrupts.meip)
        #expect(bits(harts[0]) == 0)
    }

    @Test func claimReturnsHighestPriorityThenLowestNumber() {
        let (plic, _) = make(harts: 1)
        for (src, prio) in [(5, 2), (6, 3), (7, 3)] { plic.write(offset: 4 * UInt64(src), size: 4, value: UInt64(prio)) }
        enable(plic, ctx: 1, (1 << 5) | (1 << 6) | (1 << 7))
        for s in [5, 6, 7] { plic.line(s).raise() }
        #expect(claim(plic, ctx: 1) == 6)
        #expect(claim(plic, ctx: 1) == 7)
        #expect(claim(plic, ctx: 1) == 5)
        #expect(claim(plic, ctx: 1) == 0)
    }

    @Test func gatewayHoldsClaimedSourceUntilCompleteAndRependsIfStillHigh() {
        let (plic, harts) = make(harts: 1)
        plic.write(offset: 4 * 1, size: 4, value: 1)
        enable(plic, ctx: 1, 1 << 1)
        let line = plic.line(1)
        line.raise()
        #expect(claim(plic, ctx: 1) == 1)
        #expect(bits(harts[0]) == 0)           // claimed: not pending, output low
        #expect(plic.read(offset: 0x1000, size: 4) == 0)
        line.lower(); line.raise()              // toggling while claimed changes nothing
        #expect(bits(harts[0]) == 0)
        complete(plic, ctx: 1, 1)
        #expect(bits(harts[0]) == HartInterrupts.seip)  // still high: pending again
        #expect(claim(plic, ctx: 1) == 1)
        line.lower()
        complete(plic, ctx: 1, 1)
        #expect(bits(harts[0]) == 0)
        #expect(claim(plic, ctx: 1) == 0)
    }

    @Test func loweredLineIsNoLongerPending() {
        let (plic, harts) = make(harts: 1)
        plic.write(offset: 4 * 2, size: 4, value: 1)
        enable(plic, ctx: 0, 1 << 2)
        plic.line(2).raise()
        #expect(bits(harts[0]) == HartInterrupts.meip)
        plic.line(2).lower()
        #expect(bits(harts[0]) == 0)
        #expect(claim(plic, ctx: 0) == 0)
    }

    @Test func highSourcesUseTheSecondAndThirdEnableWords() {
        let (plic, harts) = make(harts: 1)
        plic.write(offset: 4 * 40, size: 4, value: 1)
        plic.write(offset: 4 * 96, size: 4, value: 1)
        enable(plic, ctx: 1, word: 1, 1 << 8)
        enable(plic, ctx: 1, word: 3, 1)
        plic.line(40).raise()
        plic.line(96).raise()
        #expect(bits(harts[0]) == HartInterrupts.seip)
        #expect(plic.read(offset: 0x1004, size: 4) == 1 << 8)
        #expect(plic.read(offset: 0x100C, size: 4) == 1)
        #expect(claim(plic, ctx: 1) == 40)
        #expect(claim(plic, ctx: 1) == 96)
    }

    @Test func registersMaskToTheirWidthAndSourceZeroIsHardwired() {
        let (plic, _) = make(harts: 1)
        plic.write(offset: 4, size: 4, value: 0xFF)
        #expect(plic.read(offset: 4, size: 4) == 7)
        plic.write(offset: 0, size: 4, value: 5)
        #expect(plic.read(offset: 0, size: 4) == 0)
        enable(plic, ctx: 0, 0xFFFF_FFFF)
        #expect(plic.read(offset: 0x2000, size: 4) == 0xFFFF_FFFE)
        enable(plic, ctx: 0, word: 3, 0xFFFF_FFFF)
        #expect(plic.read(offset: 0x200C, size: 4) == 1)  // only source 96 exists in word 3
        plic.write(offset: 0x20_0000, size: 4, value: 9)
        #expect(plic.read(offset: 0x20_0000, size: 4) == 1)
        // A context that does not exist reads zero and ignores writes.
        plic.write(offset: 0x20_5000, size: 4, value: 3)
        #expect(plic.read(offset: 0x20_5000, size: 4) == 0)
    }

    @Test func completionOfAnUnenabledSourceIsIgnored() {
        let (plic, _) = make(harts: 1)
        plic.write(offset: 4 * 4, size: 4, value: 1)
        enable(plic, ctx: 1, 1 << 4)
        plic.line(4).raise()
        #expect(claim(plic, ctx: 1) == 4)
        complete(plic, ctx: 0, 4)  // M context does not enable source 4
        #expect(claim(plic, ctx: 1) == 0)
        complete(plic, ctx: 1, 4)
        #expect(claim(plic, ctx: 1) == 4)
    }

    @Test func linesFromOtherThreadsAreSafe() async {
        let (plic, harts) = make(harts: 1)
        for s in 1...8 { plic.write(offset: 4 * UInt64(s), size: 4, value: 1) }
        enable(plic, ctx: 1, 0x1FE)
        await withTaskGroup(of: Void.self) { g in
            for s in 1...8 {
                let line = plic.line(s)
                g.addTask { for i in 0..<1000 { line.set(i % 2 == 0) } ; line.raise() }
            }
        }
        #expect(plic.read(offset: 0x1000, size: 4) == 0x1FE)
        #expect(bits(harts[0]) == HartInterrupts.seip)
    }

    @Test func interruptCountsCountEachTimeASourceBecomesPending() {
        let (plic, _) = make()
        #expect(plic.interruptCounts().isEmpty)
        plic.setLevel(source: 5, true)
        plic.setLevel(source: 5, true)  // still pending: not a new interrupt
        #expect(plic.interruptCounts().map(\.source) == [5] && plic.interruptCounts().map(\.count) == [1])
        plic.setLevel(source: 5, false)
        plic.setLevel(source: 5, true)
        plic.setLevel(source: 10, true)
        #expect(plic.interruptCounts().map(\.source) == [5, 10] && plic.interruptCounts().map(\.count) == [2, 1])
        plic.reset()
        #expect(plic.interruptCounts().map(\.count) == [2, 1], "a system reset keeps the counts, as the inputs are kept")
    }
}
