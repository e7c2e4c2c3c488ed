import Machine
import Testing
@testable import Translator

/// A hart's saved state holds its whole architectural state and is validated before it is
/// applied.
struct HartStateTests {
    func hart(_ id: Int = 0) throws -> Hart {
        let ram = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)
        return Hart(hartID: id, ram: ram, bus: MemoryBus(), interrupts: HartInterrupts(hartID: id), clock: VirtualClock())
    }

    @Test func aSavedHartLoadsBackExactly() throws {
        let a = try hart()
        a.reset(entry: GuestPhysicalAddress(0x8000_0000), a0: 1, a1: 2, a2: 3)
        for i in 1..<32 { a.setRegister(i, UInt64(i) &* 0x1111_2222_3333) }
        for i in 0..<32 { a.f[i] = UInt64(i) << 40 | 0xabc }
        a.satp = (8 << 60) | 0x1234
        a.mstatus |= MStatus.sum | MStatus.mpp
        a.privilege = .supervisor
        a.fflags = 0x13
        a.frm = 2
        a.instret = 987_654
        a.reservation = 0x8000_1000
        a.reservationValue = 77
        a.stvec = 0x8020_0000
        a.pmpaddr[5] = 0xfff
        var w = StateWriter()
        a.saveState(to: &w)

        let b = try hart()
        var r = StateReader(section: "hart0", bytes: w.bytes)
        try b.loadState(from: &r, version: a.stateVersion)
        #expect(b.captureState() == a.captureState())
        #expect(b.register(7) == 7 &* 0x1111_2222_3333)
        #expect(b.privilege == .supervisor)
        #expect(b.dataMMUIndex == 2, "the MMU context follows the loaded privilege and SUM")
    }

    @Test func impossibleValuesAreRefusedByField() throws {
        let a = try hart()
        var s = a.captureState()
        s.privilege = 2
        #expect(throws: SavedStateError(section: "hart0", field: "privilege", reason: "2 is not 0, 1 or 3")) {
            try a.applyState(s)
        }
        s = a.captureState()
        s.satp = 5 << 60
        #expect(throws: SavedStateError(section: "hart0", field: "satp", reason: "translation mode 5 is not Bare, Sv39 or Sv48")) {
            try a.applyState(s)
        }
        s = a.captureState()
        s.frm = 6
        #expect(throws: SavedStateError.self) { try a.applyState(s) }
        var short = StateReader(section: "hart0", bytes: [1, 2, 3])
        #expect(throws: SavedStateError.self) { try a.loadState(from: &short, version: 1) }
    }
}
