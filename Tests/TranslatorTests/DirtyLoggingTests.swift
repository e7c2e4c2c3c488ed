import Foundation
import Machine
import Testing
@testable import Translator

/// Dirty-page logging for live migration, through each engine's store path: while logging, the
/// first store to a page in a pass takes the slow path and marks it; after a harvest the next
/// store marks it again (the write-TLB entries were dropped); with logging off nothing is marked.
@Suite struct DirtyLoggingTests {
    static let base: UInt64 = 0x8000_0000
    static let data: UInt64 = base + 0x10_0000

    static func u(_ imm: UInt32, _ rd: UInt32, _ op: UInt32) -> UInt32 { (imm << 12) | (rd << 7) | op }
    static func i(_ imm: Int32, _ rs1: UInt32, _ f3: UInt32, _ rd: UInt32, _ op: UInt32) -> UInt32 {
        (UInt32(bitPattern: imm) & 0xfff) << 20 | rs1 << 15 | f3 << 12 | rd << 7 | op
    }
    static func s(_ imm: Int32, _ rs2: UInt32, _ rs1: UInt32, _ f3: UInt32) -> UInt32 {
        let v = UInt32(bitPattern: imm) & 0xfff
        return (v >> 5) << 25 | rs2 << 20 | rs1 << 15 | f3 << 12 | (v & 0x1f) << 7 | 0x23
    }
    static func jal(_ imm: Int32) -> UInt32 {
        let v = UInt32(bitPattern: imm)
        return ((v >> 20) & 1) << 31 | ((v >> 1) & 0x3ff) << 21 | ((v >> 11) & 1) << 20 | ((v >> 12) & 0xff) << 12 | 0x6f
    }

    /// x5 = data, x8 = data + 4 KiB, x6 = 7; then a loop storing to both pages.
    static let program: [UInt32] = [
        u(UInt32(data >> 12), 5, 0x37),  // lui x5, data (sign-extended...)
        i(32, 5, 1, 5, 0x13),            // slli x5, x5, 32
        i(32, 5, 5, 5, 0x13),            // srli x5, x5, 32 (...now zero-extended)
        i(7, 0, 0, 6, 0x13),             // addi x6, x0, 7
        u(1, 7, 0x37),                   // lui x7, 0x1
        0x0072_8433,                     // add x8, x5, x7
        s(0, 6, 5, 3),                   // loop: sd x6, 0(x5)
        s(8, 6, 5, 3),                   // sd x6, 8(x5)
        s(16, 6, 8, 3),                  // sd x6, 16(x8)
        jal(-12),                        // j loop
    ]

    @Test(arguments: [ExecutionEngine.interpreter, .jit])
    func storesMarkTheirPagesOncePerPass(engine: ExecutionEngine) throws {
        let ram = try GuestRAM(base: GuestPhysicalAddress(Self.base), size: 4 << 20)
        var code: [UInt8] = []
        for w in Self.program { withUnsafeBytes(of: w.littleEndian) { code += $0 } }
        try ram.write(Data(code), at: ram.base)
        let hart = Hart(hartID: 0, ram: ram, bus: MemoryBus(), interrupts: HartInterrupts(hartID: 0),
                        clock: VirtualClock(), engine: engine)
        hart.reset(entry: ram.base, a0: 0, a1: 0, a2: 0)
        let d0 = (Self.data - Self.base) >> 12
        func run() { for _ in 0..<6 { hart.runSlice(budget: 4) } }

        run()  // not logging: stores run, nothing is marked
        ram.startDirtyLogging()
        run()
        #expect(ram.harvestDirtyPages() == [d0, d0 + 1])
        #expect(ram.harvestDirtyPages() == [], "a harvest clears the log")
        run()  // the write-TLB entries were dropped by the harvest: the pages are marked again
        #expect(ram.harvestDirtyPages() == [d0, d0 + 1])
        ram.stopDirtyLogging()
        run()
        #expect(ram.harvestDirtyPages() == [])
        #expect(ram.pointer.load(fromByteOffset: Int(Self.data - Self.base) + 4096 + 16, as: UInt64.self) == 7)
    }

    @Test func deviceWritesAreMarkedWhileLogging() throws {
        let ram = try GuestRAM(base: GuestPhysicalAddress(Self.base), size: 1 << 20)
        ram.markDirty(GuestPhysicalAddress(Self.base + 0x3000), length: 8)
        #expect(ram.harvestDirtyPages() == [], "nothing is logged before logging starts")
        ram.startDirtyLogging()
        ram.noteExternalWrite(GuestPhysicalAddress(Self.base + 0x3ff0), length: 0x20)  // straddles pages 3 and 4
        ram.markDirty(GuestPhysicalAddress(Self.base + 0xff000), length: 4096)        // the last page
        ram.markDirty(GuestPhysicalAddress(Self.base + 0x100000), length: 8)          // outside RAM: ignored
        #expect(ram.harvestDirtyPages() == [3, 4, 255])
        #expect(ram.harvestDirtyPages() == [])
    }
}
