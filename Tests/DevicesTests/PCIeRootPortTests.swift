import Machine
import Synchronization
import Testing
@testable import Devices

@Suite struct PCIeRootPortTests {
    typealias SC = PCIeRootPort.SlotControl
    typealias SS = PCIeRootPort.SlotStatus
    let cap = PCIeRootPort.expressCapability

    func harness() throws -> (PCIHarness, PCIeRootPort) {
        let h = PCIHarness()
        let port = PCIeRootPort(name: "rp0", stateSection: "pcie-root-port@00:01.0",
                                intx: h.host.intx.line(slot: 1, pin: 1), port: 1, physicalSlot: 5)
        try h.host.plug(port, slot: 1)
        return (h, port)
    }

    @Test func isABridgeWithAHotPlugCapableSlot() throws {
        let (h, _) = try harness()
        #expect(h.cfg(1, 0) == 0x000c_1b36)
        #expect(h.cfg(1, 8) >> 8 == 0x06_0400)
        #expect(h.cfg(1, PCIConfig.headerType, 1) == 1)
        #expect(h.cfg(1, PCIConfig.capabilitiesPointer, 1) == UInt32(cap))
        #expect(h.cfg(1, cap, 1) == 0x10)                                  // PCI Express
        #expect(h.cfg(1, cap + 2, 2) == 0x0142)                            // v2, root port, slot implemented
        let slotCaps = h.cfg(1, cap + PCIeRootPort.Express.slotCapabilities)
        #expect(slotCaps & (1 << 6) != 0 && slotCaps & (1 << 18) != 0)     // hot-plug capable, no command completed
        #expect(slotCaps >> 19 == 5)                                       // physical slot
        // Bus numbers are the driver's; windows keep their type bits.
        h.setCfg(1, PCIConfig.Bridge.primaryBus, 0x00ff_0100)
        #expect(h.cfg(1, PCIConfig.Bridge.primaryBus) & 0xff_ffff == 0xff_0100)
        #expect(h.cfg(1, PCIConfig.Bridge.prefetchableBase) & 0xf_000f == 0x1_0001)
    }

    @Test func configCyclesReachTheDeviceOnTheSecondaryBusOnly() throws {
        let (h, port) = try harness()
        try port.plug(ScratchFunction(), hotPlug: false)
        #expect(h.host.ecam.read(offset: 1 << 20, size: 4) == 0xffff_ffff)   // bus 1 not assigned yet
        h.setCfg(1, PCIConfig.Bridge.primaryBus, 0x0001_0100)               // secondary 1, subordinate 1
        #expect(h.host.ecam.read(offset: 1 << 20, size: 4) == 0x0011_1234)
        #expect(h.host.ecam.read(offset: 1 << 20 | 1 << 15, size: 4) == 0xffff_ffff)   // only device 0
        #expect(h.cfg(1, cap + PCIeRootPort.Express.slotStatus, 2) & UInt32(SS.presenceDetectState) != 0)
        #expect(h.cfg(1, cap + PCIeRootPort.Express.linkStatus, 2) & UInt32(PCIeRootPort.linkActive) != 0)
    }

    @Test func hotPlugInterruptsOnlyWhenEnabledAndEventsClearByWritingOne() throws {
        let (h, port) = try harness()
        let status = cap + PCIeRootPort.Express.slotStatus, control = cap + PCIeRootPort.Express.slotControl
        try port.plug(ScratchFunction(), hotPlug: true)
        #expect(!h.wires[1].isRaised)                                      // events not enabled
        h.setCfg(1, control, UInt32(SC.hotPlugInterruptEnable | SC.presenceDetectEnable | SC.linkStateChangedEnable), 2)
        #expect(h.wires[1].isRaised)
        let s = UInt16(h.cfg(1, status, 2))
        #expect(s & (SS.presenceDetectChanged | SS.linkStateChanged | SS.presenceDetectState)
                == SS.presenceDetectChanged | SS.linkStateChanged | SS.presenceDetectState)
        h.setCfg(1, status, UInt32(SS.presenceDetectChanged), 2)           // RW1C, one event at a time
        #expect(h.wires[1].isRaised)
        h.setCfg(1, status, UInt32(SS.linkStateChanged | SS.presenceDetectState), 2)
        #expect(!h.wires[1].isRaised)
        #expect(UInt16(h.cfg(1, status, 2)) & SS.presenceDetectState != 0)   // read-only, stays
    }

    @Test func attentionButtonThenPowerOffCompletesAnUnplug() throws {
        let (h, port) = try harness()
        let control = cap + PCIeRootPort.Express.slotControl, status = cap + PCIeRootPort.Express.slotStatus
        try port.plug(ScratchFunction(), hotPlug: false)
        let poweredOff = Mutex(0)
        port.onPowerOff.withLock { $0 = { poweredOff.withLock { $0 += 1 } } }
        h.setCfg(1, control, UInt32(SC.hotPlugInterruptEnable | SC.attentionButtonEnable), 2)
        port.pressAttentionButton()
        #expect(h.wires[1].isRaised)
        #expect(UInt16(h.cfg(1, status, 2)) & SS.attentionButtonPressed != 0)
        h.setCfg(1, status, UInt32(SS.attentionButtonPressed), 2)
        #expect(!h.wires[1].isRaised)
        h.setCfg(1, control, UInt32(SC.hotPlugInterruptEnable | SC.attentionButtonEnable | SC.powerControllerOff), 2)
        #expect(poweredOff.withLock { $0 } == 1)
        port.unplug()
        #expect(port.child == nil)
        #expect(UInt16(h.cfg(1, status, 2)) & SS.presenceDetectState == 0)
        #expect(UInt16(h.cfg(1, status, 2)) & SS.presenceDetectChanged != 0)
    }

    @Test func stateRoundTripsAndIsRefusedWhenThePresenceDisagrees() throws {
        let (h, port) = try harness()
        try port.plug(ScratchFunction(), hotPlug: false)
        h.setCfg(1, PCIConfig.Bridge.primaryBus, 0x0002_0200)
        var w = StateWriter()
        port.saveState(to: &w)
        port.reset()
        #expect(port.secondaryBus == 0)
        var r = StateReader(section: port.stateSection, bytes: w.bytes)
        try port.loadState(from: &r, version: PCIeRootPort.State.version)
        #expect(port.secondaryBus == 2)
        let (_, empty) = try harness()
        var r2 = StateReader(section: empty.stateSection, bytes: w.bytes)
        #expect(throws: SavedStateError.self) { try empty.loadState(from: &r2, version: PCIeRootPort.State.version) }
    }
}
