import Foundation
import Machine
import Testing
@testable import Translator

#if canImport(Glibc)
import Glibc
#endif

/// Differential testing of the JIT against the interpreter: random valid RV64GC (and Zfh) programs run on
/// one hart of each engine in lock step, one block at a time, and the architectural state
/// (integer and FP registers, pc, instret, privilege, trap CSRs, fflags/frm, data memory) must
/// be identical after every block.
///
/// CI runs a small number of blocks; `DIFF_BLOCKS=1000000 swift test --filter Differential`
/// runs the long mode (`DIFF_SEED` picks the first program's seed).
@Suite struct DifferentialTests {
    static let ramBase: UInt64 = 0x8000_0000
    static let handler: UInt64 = ramBase
    static let codeStart: UInt64 = ramBase + 0x100
    /// x8 points into the middle of a 16 KiB data window, on a page boundary, so random offsets
    /// cross pages.
    static let dataBase: UInt64 = ramBase + 0x10_0000
    static let dataSize = 0x4000
    static let dataPointer: UInt64 = dataBase + 0x2000

    /// One engine's machine: RAM, bus, hart.
    struct Rig {
        let ram: GuestRAM
        let hart: Hart
        /// The host FP exception flags and rounding mode this hart left programmed: both harts
        /// run on the test's thread, so each one's host FPU state is swapped in around its steps.
        var hostFlags: Int32 = 0

        init(engine: ExecutionEngine, code: [UInt8], data: [UInt8], codeCacheSize: Int = Hart.defaultCodeCacheSize,
             seedState: (Hart) -> Void) throws {
            ram = try GuestRAM(base: GuestPhysicalAddress(DifferentialTests.ramBase), size: 4 << 20)
            try ram.write(Data(code), at: ram.base)
            try ram.write(Data(data), at: GuestPhysicalAddress(DifferentialTests.dataBase))
            hart = Hart(hartID: 0, ram: ram, bus: MemoryBus(), interrupts: HartInterrupts(hartID: 0),
                        clock: VirtualClock(), engine: engine, codeCacheSize: codeCacheSize)
            hart.reset(entry: GuestPhysicalAddress(DifferentialTests.codeStart), a0: 0, a1: 0, a2: 0)
            seedState(hart)
            hostFlags = 0
        }

        /// Runs one turn of the run loop (at most `budget` blocks) with this hart's host FPU
        /// state in place.
        mutating func step(budget: Int = 1) {
            feclearexcept(Hart.hostAll)
            if hostFlags != 0 { feraiseexcept(hostFlags) }
            hart.setHostRounding(hart.hostRoundingMode)
            hart.runSlice(budget: budget)
            hostFlags = fetestexcept(Hart.hostAll)
        }

        /// fflags as the guest would read them now.
        mutating func guestFFlags() -> UInt64 {
            feclearexcept(Hart.hostAll)
            if hostFlags != 0 { feraiseexcept(hostFlags) }
            hart.syncFlags()
            hostFlags = fetestexcept(Hart.hostAll)
            return hart.fflags
        }
    }

    /// The first difference between the two harts, or nil.
    static func difference(_ a: inout Rig, _ b: inout Rig, memory: Bool) -> String? {
        let x = a.hart, y = b.hart
        for i in 1..<32 where x.register(i) != y.register(i) {
            return "x\(i): interpreter \(hex(x.register(i))), jit \(hex(y.register(i)))"
        }
        for i in 0..<32 where x.fpRegister(i) != y.fpRegister(i) {
            return "f\(i): interpreter \(hex(x.fpRegister(i))), jit \(hex(y.fpRegister(i)))"
        }
        let fields: [(String, (Hart) -> UInt64)] = [
            ("pc", { $0.pc }), ("instret", { $0.instret }), ("privilege", { $0.privilege.rawValue }),
            ("mstatus", { $0.mstatus }), ("mepc", { $0.mepc }), ("mcause", { $0.mcause }),
            ("mtval", { $0.mtval }), ("frm", { $0.frm }), ("reservation", { $0.reservation }),
        ]
        for (name, get) in fields where get(x) != get(y) {
            return "\(name): interpreter \(hex(get(x))), jit \(hex(get(y)))"
        }
        let fa = a.guestFFlags(), fb = b.guestFFlags()
        if fa != fb { return "fflags: interpreter \(hex(fa)), jit \(hex(fb))" }
        if memory {
            let pa = a.ram.pointer + Int(dataBase - ramBase), pb = b.ram.pointer + Int(dataBase - ramBase)
            if memcmp(pa, pb, dataSize) != 0 {
                let i = (0..<dataSize).first { pa.load(fromByteOffset: $0, as: UInt8.self) != pb.load(fromByteOffset: $0, as: UInt8.self) }!
                return "data memory at \(hex(dataBase + UInt64(i)))"
            }
            if memcmp(a.ram.pointer, b.ram.pointer, Int(dataBase - ramBase)) != 0 { return "code memory" }
        }
        return nil
    }

    static func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

    /// Runs the program from `seed` on both engines; returns the blocks compared, or records
    /// the first difference. With `chained`, each step runs a random budget of up to 64 blocks,
    /// so the JIT's chains and inline jump-cache lookups run between comparisons (both engines
    /// count blocks against the budget the same way).
    static func runProgram(seed: UInt64, segments: Int, chained: Bool,
                           codeCacheSize: Int = Hart.defaultCodeCacheSize) throws -> (steps: Int, jitFlushes: Int) {
        var gen = ProgramGenerator(seed: seed)
        let code = gen.program(segments: segments)
        var data = [UInt8](repeating: 0, count: dataSize)
        for i in data.indices { data[i] = UInt8(truncatingIfNeeded: gen.rng.next()) }
        let regs = (0..<32).map { _ in gen.randomValue() }
        let fregs = (0..<32).map { _ in gen.randomFP() }
        let frm = gen.rng.next() % 5
        let seedState: (Hart) -> Void = { h in
            for i in 1..<32 { h.setRegister(i, regs[i]) }
            h.setRegister(8, dataPointer)
            h.setRegister(7, 0)
            for i in 0..<32 { h.f[i] = fregs[i] }
            h.mtvec = handler
            h.mstatus |= MStatus.fs
            h.frm = frm
        }
        var ref = try Rig(engine: .interpreter, code: code, data: data, seedState: seedState)
        var jit = try Rig(engine: .jit, code: code, data: data, codeCacheSize: codeCacheSize, seedState: seedState)
        #expect(jit.hart.engine == .jit)
        let end = codeStart + UInt64(gen.endOffset)
        var blocks = 0
        while blocks < 100_000 {
            let before = ref.hart.pc
            let budget = chained ? 1 + gen.rng.below(64) : 1
            ref.step(budget: budget)
            jit.step(budget: budget)
            blocks += 1
            if let d = difference(&ref, &jit, memory: blocks % 16 == 0 || ref.hart.pc == end) {
                Issue.record("seed \(seed)\(chained ? " (chained)" : ""): after step \(blocks) (entered at \(hex(before))): \(d)")
                return (blocks, jit.hart.translationFlushes)
            }
            if ref.hart.pc == end { break }
        }
        return (blocks, jit.hart.translationFlushes)
    }

    @Test func randomBlocksAgree() throws {
        let env = ProcessInfo.processInfo.environment
        let target = Int(env["DIFF_BLOCKS"] ?? "") ?? 30_000
        var seed = UInt64(env["DIFF_SEED"] ?? "") ?? 1
        var blocks = 0
        var programs = 0
        while blocks < target {
            let n = try Self.runProgram(seed: seed, segments: 60, chained: seed % 2 == 0).steps
            blocks += n
            programs += 1
            seed &+= 1
        }
        #expect(blocks >= target)
        if env["DIFF_BLOCKS"] != nil {
            print("differential: \(programs) programs, \(blocks) comparisons (after every block, or every run of up to 64 blocks in the chained half)")
        }
    }

    /// A code cache with room for only a few blocks fills and is flushed (with every
    /// translation) again and again; the engines must still agree.
    @Test func fullCodeCacheFlushesAndAgrees() throws {
        let small = CodeCache.blockReserve + 16 * 1024   // room for about 16 KiB of blocks
        var flushes = 0
        for seed: UInt64 in 500..<520 {
            // One flush is the reset's.
            flushes += try Self.runProgram(seed: seed, segments: 60, chained: seed % 2 == 0, codeCacheSize: small).jitFlushes - 1
        }
        #expect(flushes > 20, "the small code cache never filled")
    }

    /// Self-checking ISA programs (all but the timer-driven one) in lock step on both engines.
    @Test(arguments: ["alu", "mem", "atomic", "trap", "vm", "sfence", "smc", "fp"])
    func isaProgramsAgree(_ name: String) throws {
        let image = [UInt8](try ISATests.assemble(name))
        func make(_ engine: ExecutionEngine) throws -> (Rig, ISATests.ToHost) {
            let ram = try GuestRAM(base: GuestPhysicalAddress(Self.ramBase), size: 16 << 20)
            try ram.write(Data(image), at: ram.base)
            let bus = MemoryBus()
            let interrupts = HartInterrupts(hartID: 0)
            let tohost = ISATests.ToHost(interrupts, ram)
            try bus.map(tohost, at: GuestRegion(base: GuestPhysicalAddress(0x0010_2000), size: 0x1000))
            let hart = Hart(hartID: 0, ram: ram, bus: bus, interrupts: interrupts, clock: VirtualClock(), engine: engine)
            hart.reset(entry: ram.base, a0: 0, a1: 0, a2: 0)
            return (Rig(ram: ram, hart: hart), tohost)
        }
        var (ref, refHost) = try make(.interpreter)
        var (jit, jitHost) = try make(.jit)
        var blocks = 0
        while refHost.value == nil && blocks < 2_000_000 {
            ref.step()
            jit.step()
            blocks += 1
            if let d = Self.difference(&ref, &jit, memory: false) {
                Issue.record("\(name): after block \(blocks): \(d)")
                return
            }
        }
        #expect(refHost.value == 1 && jitHost.value == 1, "\(name): tohost \(String(describing: refHost.value)) / \(String(describing: jitHost.value))")
    }
}

extension DifferentialTests.Rig {
    init(ram: GuestRAM, hart: Hart) {
        self.ram = ram
        self.hart = hart
    }
}

/// xorshift64*: a small deterministic generator, so a failing seed can be replayed.
struct TestRNG {
    var state: UInt64
    init(seed: UInt64) { state = seed &* 0x9e37_79b9_7f4a_7c15 | 1 }
    mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_f491_4f6c_dd1d
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    mutating func chance(_ percent: Int) -> Bool { below(100) < percent }
}

/// Generates random, valid, terminating RV64GC (and Zfh) programs: straight-line runs of random integer,
/// M, A, F/D, CSR and memory instructions, with forward branches, direct and indirect jumps,
/// counted loops, traps (a handler at `handler` skips the faulting 4-byte instruction) and the
/// occasional store into the code itself. x7 is the loop counter, x8 the data pointer, x9 the
/// trap handler's and indirect jumps' scratch register; they are never random destinations.
struct ProgramGenerator {
    var rng: TestRNG
    var code: [UInt8] = []
    private(set) var endOffset = 0

    init(seed: UInt64) { rng = TestRNG(seed: seed) }

    mutating func randomValue() -> UInt64 {
        switch rng.below(6) {
        case 0: return UInt64(rng.below(16))
        case 1: return UInt64(bitPattern: -Int64(rng.below(16)))
        case 2: return [0x8000_0000_0000_0000, 0x7fff_ffff_ffff_ffff, 0x8000_0000, 0x7fff_ffff, 0xffff_ffff][rng.below(5)]
        default: return rng.next()
        }
    }

    mutating func randomFP() -> UInt64 {
        let specials: [UInt64] = [0, 1 << 63, 0x7ff0_0000_0000_0000, 0xfff0_0000_0000_0000, 0x7ff8_0000_0000_0000,
                                  0x7ff0_0000_0000_0001, 0x0000_0000_0000_0001, 0x3ff0_0000_0000_0000,
                                  0xffff_ffff_7f80_0000, 0xffff_ffff_7fc0_0000, 0xffff_ffff_7f80_0001,
                                  0xffff_ffff_3f80_0000, 0xffff_ffff_0000_0001, 0x0000_0000_3f80_0000,
                                  0xffff_ffff_ffff_7c01, 0xffff_ffff_ffff_7e00, 0xffff_ffff_ffff_0001,
                                  0xffff_ffff_ffff_3c00, 0xffff_ffff_ffff_fbff, 0xffff_fffe_ffff_3c00]
        switch rng.below(5) {
        case 0: return specials[rng.below(specials.count)]
        case 1: return 0xffff_ffff_0000_0000 | (rng.next() & 0xffff_ffff)
        case 4: return 0xffff_ffff_ffff_0000 | (rng.next() & 0xffff)                            // a boxed half
        case 2: return Double(Int64(bitPattern: rng.next()) >> Int64(rng.below(60))).bitPattern   // integer-valued
        default: return rng.next()
        }
    }

    // MARK: Encoders

    mutating func emit32(_ w: UInt32) {
        for i in 0..<4 { code.append(UInt8(truncatingIfNeeded: w >> (8 * UInt32(i)))) }
    }

    mutating func emit16(_ h: UInt16) {
        code.append(UInt8(truncatingIfNeeded: h))
        code.append(UInt8(truncatingIfNeeded: h >> 8))
    }

    static func r(_ f7: UInt32, _ rs2: UInt32, _ rs1: UInt32, _ f3: UInt32, _ rd: UInt32, _ op: UInt32) -> UInt32 {
        (f7 << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op
    }

    static func i(_ imm: Int32, _ rs1: UInt32, _ f3: UInt32, _ rd: UInt32, _ op: UInt32) -> UInt32 {
        (UInt32(bitPattern: imm) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op
    }

    static func s(_ imm: Int32, _ rs2: UInt32, _ rs1: UInt32, _ f3: UInt32, _ op: UInt32) -> UInt32 {
        let u = UInt32(bitPattern: imm)
        return (((u >> 5) & 0x7f) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | ((u & 0x1f) << 7) | op
    }

    static func b(_ imm: Int32, _ rs2: UInt32, _ rs1: UInt32, _ f3: UInt32) -> UInt32 {
        let u = UInt32(bitPattern: imm)
        return (((u >> 12) & 1) << 31) | (((u >> 5) & 0x3f) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12)
            | (((u >> 1) & 0xf) << 8) | (((u >> 11) & 1) << 7) | 0x63
    }

    static func j(_ imm: Int32, _ rd: UInt32) -> UInt32 {
        let u = UInt32(bitPattern: imm)
        return (((u >> 20) & 1) << 31) | (((u >> 1) & 0x3ff) << 21) | (((u >> 11) & 1) << 20) | (((u >> 12) & 0xff) << 12)
            | (rd << 7) | 0x6f
    }

    // MARK: Registers

    mutating func dest() -> UInt32 {
        while true {
            let r = UInt32(rng.below(32))
            if r != 7 && r != 8 && r != 9 { return r }
        }
    }

    mutating func src() -> UInt32 { UInt32(rng.below(32)) }
    mutating func freg() -> UInt32 { UInt32(rng.below(32)) }
    mutating func rm() -> UInt32 {
        rng.chance(3) ? UInt32(5 + rng.below(2)) : [0, 1, 2, 3, 4, 7, 7, 7][rng.below(8)]
    }

    // MARK: Instructions

    /// One random instruction that does not transfer control (it may trap).
    mutating func instruction() {
        switch rng.below(100) {
        case 0..<22:
            let ops: [(UInt32, UInt32)] = [(0, 0), (0x20, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0x20, 5), (0, 6), (0, 7),
                                           (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7)]
            let (f7, f3) = ops[rng.below(ops.count)]
            emit32(Self.r(f7, src(), src(), f3, dest(), 0x33))
        case 22..<30:
            let ops: [(UInt32, UInt32)] = [(0, 0), (0x20, 0), (0, 1), (0, 5), (0x20, 5), (1, 0), (1, 4), (1, 5), (1, 6), (1, 7)]
            let (f7, f3) = ops[rng.below(ops.count)]
            emit32(Self.r(f7, src(), src(), f3, dest(), 0x3b))
        case 30..<44:
            let f3 = [0, 2, 3, 4, 6, 7, 1, 5][rng.below(8)]
            var imm = Int32(rng.below(4096)) - 2048
            if f3 == 1 { imm = Int32(rng.below(64)) }
            if f3 == 5 { imm = Int32(rng.below(64)) | (rng.chance(50) ? 0x400 : 0) }
            emit32(Self.i(imm, src(), UInt32(f3), dest(), 0x13))
        case 44..<48:
            let f3 = [0, 1, 5][rng.below(3)]
            var imm = Int32(rng.below(4096)) - 2048
            if f3 == 1 { imm = Int32(rng.below(32)) }
            if f3 == 5 { imm = Int32(rng.below(32)) | (rng.chance(50) ? 0x400 : 0) }
            emit32(Self.i(imm, src(), UInt32(f3), dest(), 0x1b))
        case 48..<51:
            emit32((UInt32(truncatingIfNeeded: rng.next()) & 0xffff_f000) | (dest() << 7) | (rng.chance(50) ? 0x37 : 0x17))
        case 51..<62:
            // Loads through the data pointer (any alignment, crossing pages), rarely through a
            // random register (faults, or reads of unmapped space).
            let base: UInt32 = rng.chance(5) ? src() : 8
            let f3 = UInt32([0, 1, 2, 3, 4, 5, 6][rng.below(7)])
            emit32(Self.i(Int32(rng.below(4096)) - 2048, base, f3, dest(), 0x03))
        case 62..<70:
            let base: UInt32 = rng.chance(5) ? src() : 8
            emit32(Self.s(Int32(rng.below(4096)) - 2048, src(), base, UInt32(rng.below(4)), 0x23))
        case 70..<72:
            // AMOs, LR and SC on the data pointer (aligned).
            let f5s: [UInt32] = [0, 1, 2, 3, 4, 8, 0xc, 0x10, 0x14, 0x18, 0x1c]
            let f5 = f5s[rng.below(f5s.count)]
            let rs2 = f5 == 2 ? 0 : src()
            emit32((f5 << 27) | (rs2 << 20) | (8 << 15) | ((rng.chance(50) ? 2 : 3) << 12) | (dest() << 7) | 0x2f)
        case 72..<76:
            // FP loads and stores through the data pointer (half, single, double).
            let f3 = UInt32(1 + rng.below(3))
            let imm = Int32(rng.below(4096)) - 2048
            if rng.chance(50) {
                emit32(Self.i(imm, 8, f3, freg(), 0x07))
            } else {
                emit32(Self.s(imm, freg(), 8, f3, 0x27))
            }
        case 76..<90:
            fpInstruction()
        case 90..<92:
            // CSR: fcsr/frm/fflags reads and writes.
            switch rng.below(4) {
            case 0: emit32(Self.i(0x003, src(), 1, dest(), 0x73))         // csrrw rd, fcsr, rs1
            case 1: emit32(Self.i(0x001, 0, 2, dest(), 0x73))             // csrr rd, fflags
            case 2: emit32(Self.i(0x002, UInt32(rng.below(5)), 5, dest(), 0x73))   // csrrwi rd, frm, uimm
            default: emit32(Self.i(0xc02, 0, 2, dest(), 0x73))            // rdinstret
            }
        case 92..<98:
            compressed()
        default:
            emit32(0x0ff0_000f)                                           // fence
        }
    }

    mutating func fpInstruction() {
        let fmt = UInt32(rng.below(3))  // single, double, half
        switch rng.below(12) {
        case 0..<4:
            let f5 = [0x00, 0x04, 0x08, 0x0c][rng.below(4)]
            emit32(Self.r(UInt32(f5) | fmt, freg(), freg(), rm(), freg(), 0x53))
        case 4:
            emit32(Self.r(0x2c | fmt, 0, freg(), rm(), freg(), 0x53))                   // fsqrt
        case 5:
            let op = [0x43, 0x47, 0x4b, 0x4f][rng.below(4)]
            emit32((freg() << 27) | (fmt << 25) | (freg() << 20) | (freg() << 15) | (rm() << 12) | (freg() << 7) | UInt32(op))
        case 6:
            emit32(Self.r(0x10 | fmt, freg(), freg(), UInt32(rng.below(3)), freg(), 0x53))  // fsgnj*
        case 7:
            emit32(Self.r(0x14 | fmt, freg(), freg(), UInt32(rng.below(2)), freg(), 0x53))  // fmin/fmax
        case 8:
            emit32(Self.r(0x50 | fmt, freg(), freg(), UInt32(rng.below(3)), dest(), 0x53))  // fle/flt/feq
        case 9:
            emit32(Self.r(0x60 | fmt, UInt32(rng.below(4)), freg(), rm(), dest(), 0x53))    // fcvt.{w,wu,l,lu}
        case 10:
            emit32(Self.r(0x68 | fmt, UInt32(rng.below(4)), src(), rm(), freg(), 0x53))     // fcvt to FP
        default:
            switch rng.below(6) {
            case 0: emit32(Self.r(0x70 | fmt, 0, freg(), 0, dest(), 0x53))                  // fmv.x
            case 1: emit32(Self.r(0x78 | fmt, 0, src(), 0, freg(), 0x53))                   // fmv to FP
            case 2: emit32(Self.r(0x70 | fmt, 0, freg(), 1, dest(), 0x53))                  // fclass
            case 3: emit32(Self.r(0x20, 1, freg(), rm(), freg(), 0x53))                     // fcvt.s.d
            case 4: emit32(Self.r(0x21, 0, freg(), rm(), freg(), 0x53))                     // fcvt.d.s
            default:
                // fcvt.h.s, fcvt.h.d, fcvt.s.h, fcvt.d.h
                let (f7, rs2): (UInt32, UInt32) = [(0x22, 0), (0x22, 1), (0x20, 2), (0x21, 2)][rng.below(4)]
                emit32(Self.r(f7, rs2, freg(), rm(), freg(), 0x53))
            }
        }
    }

    /// c.addi, c.li, c.mv, c.add, c.addiw (never trap).
    mutating func compressed() {
        let rdOK = UInt16(max(1, Int(dest())))
        let imm = UInt16(1 + rng.below(31))
        switch rng.below(5) {
        case 0: emit16((0b000 << 13) | (((imm >> 5) & 1) << 12) | (rdOK << 7) | ((imm & 0x1f) << 2) | 0b01)
        case 1: emit16((0b010 << 13) | (((imm >> 5) & 1) << 12) | (rdOK << 7) | ((imm & 0x1f) << 2) | 0b01)
        case 2: emit16((0b1000 << 12) | (rdOK << 7) | (UInt16(max(1, Int(src()))) << 2) | 0b10)
        case 3: emit16((0b1001 << 12) | (rdOK << 7) | (UInt16(max(1, Int(src()))) << 2) | 0b10)
        default: emit16((0b001 << 13) | (((imm >> 5) & 1) << 12) | (rdOK << 7) | ((imm & 0x1f) << 2) | 0b01)
        }
    }

    mutating func straight(_ n: Int) { for _ in 0..<n { instruction() } }

    /// The trap handler (skips the 4-byte faulting instruction), then the program.
    mutating func program(segments: Int) -> [UInt8] {
        code = []
        emit32(Self.i(0x341, 0, 2, 9, 0x73))        // csrr x9, mepc
        emit32(Self.i(4, 9, 0, 9, 0x13))            // addi x9, x9, 4
        emit32(Self.i(0x341, 9, 1, 0, 0x73))        // csrw mepc, x9
        emit32(0x3020_0073)                          // mret
        while code.count < 0x100 { emit32(0x13) }
        for _ in 0..<segments {
            switch rng.below(6) {
            case 0:
                // Forward conditional branch over one instruction.
                straight(1 + rng.below(8))
                emit32(Self.b(8, src(), src(), [0, 1, 4, 5, 6, 7][rng.below(6)]))
                emit32(Self.i(Int32(rng.below(2048)), src(), 0, dest(), 0x13))
            case 1:
                // Direct jump over one instruction, linking a random register.
                straight(1 + rng.below(8))
                emit32(Self.j(8, dest()))
                emit32(Self.i(1, src(), 0, dest(), 0x13))
            case 2:
                // Indirect jump over one instruction.
                straight(1 + rng.below(8))
                emit32(0x17 | (9 << 7))                       // auipc x9, 0
                emit32(Self.i(12, 9, 0, dest(), 0x67))        // jalr rd, 12(x9)
                emit32(Self.i(1, src(), 0, dest(), 0x13))
            case 3:
                // A counted loop (chained back edge).
                emit32(Self.i(Int32(1 + rng.below(8)), 0, 0, 7, 0x13))   // li x7, n
                let top = code.count
                straight(1 + rng.below(6))
                emit32(Self.i(-1, 7, 0, 7, 0x13))             // addi x7, x7, -1
                emit32(Self.b(Int32(top - code.count), 0, 7, 1))   // bne x7, x0, top
            case 4:
                // Self-modifying code: overwrite the next instruction with a nop, then fence.i.
                straight(1 + rng.below(4))
                // A: auipc; A+4: sw x0 over A+16; A+8: a random instruction; A+12: fence.i or
                // a nop; A+16: overwritten with zeros (illegal), so it traps and is skipped.
                emit32(0x17 | (9 << 7))                       // auipc x9, 0
                emit32(Self.s(16, 0, 9, 2, 0x23))             // sw x0, 16(x9)
                emit32(Self.r(0, src(), src(), 0, dest(), 0x33))   // add (4 bytes)
                emit32(rng.chance(50) ? 0x0000_100f : 0x13)   // fence.i, or a nop
                emit32(Self.i(1, src(), 0, dest(), 0x13))
            default:
                straight(1 + rng.below(12))
            }
        }
        endOffset = code.count - 0x100
        emit32(Self.j(0, 0))                                  // j . (the end)
        return code
    }
}
