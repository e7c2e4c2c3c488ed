import Foundation
import Machine
import Testing
@testable import Translator

/// Runs the project's bare-metal ISA programs (tests/isa/*.S, assembled here with Debian's
/// riscv64 cross toolchain) on a bare hart with RAM and a `tohost` register.
@Suite struct ISATests {
    static let sourceDir = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("tests/isa")

    /// A `tohost` register (offset 0): records the first value written and stops the hart.
    /// Test controls: offset 8 drives the hart's external SEIP line, offset 16 sets `mtimecmp`
    /// (the harness clock runs, so `time` advances); offset 24 sets an address and a write to
    /// offset 32 stores 4 bytes there the way a device's DMA does (behind the CPU's back).
    final class ToHost: MMIODevice, @unchecked Sendable {
        let name = "tohost"
        var value: UInt64?
        let interrupts: HartInterrupts
        let ram: GuestRAM
        var dmaAddress: UInt64 = 0
        init(_ i: HartInterrupts, _ ram: GuestRAM) {
            interrupts = i
            self.ram = ram
        }
        func read(offset: UInt64, size: Int) -> UInt64 { 0 }
        func write(offset: UInt64, size: Int, value v: UInt64) {
            switch offset {
            case 0 where value == nil:
                value = v
                interrupts.requestExit()
            case 8: interrupts.set(HartInterrupts.seip, v != 0)
            case 16: interrupts.setTimerCompare(v)
            case 24: dmaAddress = v
            case 32:
                let a = GuestPhysicalAddress(dmaAddress)
                ram.hostPointer(a, length: 4)?.storeBytes(of: UInt32(truncatingIfNeeded: v), as: UInt32.self)
                ram.noteExternalWrite(a, length: 4)
            default: break
            }
        }
    }

    /// What the assembler accepts beyond RV64GC (Debian's GCC 12 driver knows fewer extension
    /// names than its binutils, so the list goes to the assembler directly; Zicond is written
    /// with `.insn`, binutils 2.40 having no mnemonics for it).
    static let assemblerISA = "rv64gc_zfh_zba_zbb_zbc_zbs_zicbom_zicboz_zicbop_zihintpause_svinval"

    static func assemble(_ name: String) throws -> Data {
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("isa-\(name)-\(getpid())-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        let elf = out.appendingPathComponent("\(name).elf").path
        let bin = out.appendingPathComponent("\(name).bin").path
        for (tool, args) in [
            ("riscv64-linux-gnu-gcc", ["-march=rv64gc", "-Wa,-march=\(assemblerISA)", "-mabi=lp64d", "-nostdlib", "-nostartfiles",
                                       "-T", sourceDir.appendingPathComponent("link.ld").path,
                                       "-o", elf, sourceDir.appendingPathComponent("\(name).S").path]),
            ("riscv64-linux-gnu-objcopy", ["-O", "binary", elf, bin]),
        ] {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/\(tool)")
            p.arguments = args
            try p.run()
            p.waitUntilExit()
            guard p.terminationStatus == 0 else { throw CocoaError(.executableLoad) }
        }
        return try Data(contentsOf: URL(fileURLWithPath: bin))
    }

    /// Runs one program; returns what it wrote to tohost (nil on timeout).
    static func run(_ name: String, engine: ExecutionEngine) throws -> UInt64? {
        let image = try assemble(name)
        let ram = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 16 << 20)
        try ram.write(image, at: ram.base)
        let bus = MemoryBus()
        let interrupts = HartInterrupts(hartID: 0)
        let tohost = ToHost(interrupts, ram)
        try bus.map(tohost, at: GuestRegion(base: GuestPhysicalAddress(0x0010_2000), size: 0x1000))
        let hart = Hart(hartID: 0, ram: ram, bus: bus, interrupts: interrupts, clock: VirtualClock(), engine: engine)
        #expect(hart.engine == engine || !ExecutionEngine.jitSupported)
        hart.reset(entry: ram.base, a0: 0, a1: 0, a2: 0)
        let watchdog = DispatchWorkItem { interrupts.requestExit() }
        DispatchQueue.global().asyncAfter(deadline: .now() + 20, execute: watchdog)
        hart.run()
        watchdog.cancel()
        if hart.engine == .jit { #expect(hart.jitBytes > 0, "the JIT generated no code") }
        return tohost.value
    }

    @Test(arguments: ["alu", "mem", "atomic", "trap", "vm", "sfence", "smc", "fp", "irq",
                      "bitmanip", "cbo", "sstc", "pte", "counters", "trigger", "zfh"], ExecutionEngine.allCases)
    func program(_ name: String, engine: ExecutionEngine) throws {
        let result = try Self.run(name, engine: engine)
        let failed = result.map { $0 >> 1 } ?? 0
        #expect(result == 1, "ISA test \(name) (\(engine)) failed at check \(failed) (tohost = \(String(describing: result)))")
    }
}
