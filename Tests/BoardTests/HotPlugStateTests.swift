import Devices
import Foundation
import Machine
import Testing
@testable import Board

/// A device with a one-byte state, to stand for a hot-plugged one.
final class TokenDevice: ManagedDevice {
    let stateSection: String
    let stateVersion: UInt32 = 1
    init(_ section: String) { stateSection = section }
    func reset() {}
    func quiesce() {}
    func resume() {}
    func saveState(to w: inout StateWriter) { w.u8(7) }
    func loadState(from r: inout StateReader, version: UInt32) throws(SavedStateError) { _ = try r.u8("token") }
}

/// Saved states cover the machine as launched: with a hot-plugged device in, saves, loads and
/// migrations are refused naming it, and allowed again once it is gone.
@Suite struct HotPlugStateTests {
    @Test func statesAreRefusedWhileAHotPluggedDeviceIsIn() throws {
        let rig = try Rig(harts: 1)
        defer { rig.vm.quit(); _ = rig.waitExit() }
        let device = TokenDevice("virtio-pci@rp0")
        try rig.vm.changeDevices { try rig.board.deviceManager.register(device, hotPlugged: "the device in root port 'rp0'") }
        #expect(rig.vm.runState == .running)                  // the change does not pause the machine for clients
        #expect(rig.board.deviceManager.hotPlugged == ["the device in root port 'rp0'"])
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("hotplug-\(UUID().uuidString).state").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        do {
            try rig.vm.startMigration(uri: "file:\(path)")
            Issue.record("migration started with a hot-plugged device in")
        } catch {
            #expect("\(error)".contains("the device in root port 'rp0'") && "\(error)".contains("device_del"))
        }
        #expect(rig.vm.migrationProgress().status == .none)
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(rig.log.all.isEmpty, "a refused save does not stop the machine")
        try rig.vm.changeDevices { rig.board.deviceManager.unregister(device) }
        #expect(rig.board.deviceManager.hotPlugged.isEmpty)
        try rig.vm.startMigration(uri: "file:\(path)")
        #expect(eventually { rig.vm.migrationProgress().status == .completed })
    }

    @Test func rootPortsTakeAPinOffTheWiresOfDevicesBehindPorts() throws {
        // Ports in slots 1 and 2: their devices use wires 1 and 2, so the ports' own interrupts
        // go on wires 3 and 0 (INTC in slot 1, INTB in slot 2).
        #expect(VirtBoard.rootPortPin(slot: 1, avoiding: [1, 2]) == 3)
        #expect(VirtBoard.rootPortPin(slot: 2, avoiding: [1, 2]) == 2)
        #expect(VirtBoard.rootPortPin(slot: 5, avoiding: [0, 1, 2, 3]) == 2)   // four ports: no free wire
        var c = BoardConfig()
        c.memorySize = 256 * mib
        c.rngSeedBytes = 0
        c.pciDevices = [.rootPort(id: "rp0", slot: 1, physicalSlot: 1), .rootPort(id: "rp1", slot: 2, physicalSlot: 2)]
        let board = try VirtBoard(config: c, system: NullSystem())
        let ecam = VirtMemoryMap.pcieECAM.base
        let pins = [1, 2].map { board.bus.read(ecam + UInt64($0 << 15) + UInt64(PCIConfig.interruptPin), size: 1) }
        #expect(pins == [3, 2])
        let wires = zip([1, 2], pins).map { PCIIntxRouter.wire(slot: $0, pin: Int($1)) }
        #expect(Set(wires).isDisjoint(with: [1, 2]))
    }
}
