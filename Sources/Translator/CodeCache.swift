#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Executable memory for one hart's JIT code, never writable and executable at once: one
/// shared-memory object is mapped twice, read-write (where the compiler writes) and
/// read-execute (where the code runs). Space is bump-allocated; when a block no longer fits,
/// the owner flushes every translation and `reset()` starts over.
///
/// The start of the cache holds the entry trampoline and the common exit, which survive resets.
///
/// Threading: owned by its hart's vCPU thread.
final class CodeCache {
    /// Bytes reserved per block: enough for the largest block the compiler can emit.
    static let blockReserve = 96 * 1024

    let size: Int
    /// Where the compiler writes.
    let writable: UnsafeMutablePointer<UInt8>
    /// Where the code runs (same bytes, other mapping).
    let executable: UnsafeMutableRawPointer
    /// First free byte.
    var used = 0
    /// End of the trampolines; `reset()` rewinds to here.
    private(set) var firstBlock = 0
    /// Offset of the common exit: restores the host's callee-saved registers and returns eax.
    private(set) var exitOffset = 0

    /// Whether the host has FMA3 with the OS saving AVX state (CPUID leaf 1: FMA, OSXSAVE, AVX).
    private(set) var hasFMA = false

    /// Calls generated code: `enter(state, code)` pins `state` in rbx and jumps to `code`.
    typealias Entry = @convention(c) (UnsafeMutableRawPointer, UnsafeRawPointer) -> Int64
    private(set) var enter: Entry

    /// Maps `size` bytes twice. Fails (nil) when the host refuses shared or executable memory.
    init?(size: Int) {
        // A private, immediately unlinked shared-memory object (the name only has to be unique
        // for the moment between open and unlink).
        var fd: Int32 = -1
        for _ in 0..<16 {
            let name = "/machine-server-jit-\(getpid())-\(UInt64.random(in: 0 ... .max))"
            fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0o600)
            if fd >= 0 {
                shm_unlink(name)
                break
            }
        }
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { return nil }
        guard let w = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), w != MAP_FAILED else { return nil }
        guard let x = mmap(nil, size, PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0), x != MAP_FAILED else {
            munmap(w, size)
            return nil
        }
        self.size = size
        writable = w.assumingMemoryBound(to: UInt8.self)
        executable = x
        enter = unsafeBitCast(x, to: Entry.self)
        emitTrampolines()
    }

    deinit {
        munmap(writable, size)
        munmap(executable, size)
    }

    /// Entry: save the callee-saved registers (keeping the stack 16-byte aligned for helper
    /// calls), pin the state in rbx, load the chain budget into r14, instret into r15 and the
    /// pinned guest registers (`BlockCompiler.pinned`) into theirs, jump to the block. Exit:
    /// store them all back, restore, return eax.
    private func emitTrampolines() {
        var e = X86Emitter(buffer: writable, capacity: size, position: 0)
        for r: X86Reg in [.rbx, .rbp, .r12, .r13, .r14, .r15] { e.push(r) }
        e.alu(.sub, .rsp, imm: 8)
        e.mov(.rbx, .rdi)
        e.load(.r14, X86Mem(.rbx, Int32(StateLayout.budget)))
        e.load(.r15, X86Mem(.rbx, Int32(StateLayout.instret)))
        e.mov(.rax, .rsi)
        for (g, h) in BlockCompiler.pinned { e.load(h, BlockCompiler.xr(g)) }
        e.jmp(.rax)
        exitOffset = e.position
        e.store(X86Mem(.rbx, Int32(StateLayout.budget)), .r14)
        e.store(X86Mem(.rbx, Int32(StateLayout.instret)), .r15)
        for (g, h) in BlockCompiler.pinned { e.store(BlockCompiler.xr(g), h) }
        e.alu(.add, .rsp, imm: 8)
        for r: X86Reg in [.r15, .r14, .r13, .r12, .rbp, .rbx] { e.pop(r) }
        e.ret()
        // cpuid(1) -> ecx, to learn the host's features.
        let cpuidOffset = e.position
        e.push(.rbx)
        e.movImm(.rax, 1)
        e.alu(.xor, .rcx, .rcx, .b32)
        e.byte(0x0f)
        e.byte(0xa2)
        e.mov(.rax, .rcx)
        e.pop(.rbx)
        e.ret()
        used = (e.position + 63) & ~63
        firstBlock = used
        typealias CPUID = @convention(c) () -> UInt64
        let ecx = unsafeBitCast(executable + cpuidOffset, to: CPUID.self)()
        let need: UInt64 = (1 << 12) | (1 << 27) | (1 << 28)
        hasFMA = ecx & need == need
    }

    /// Whether another block surely fits.
    var hasRoom: Bool { used + Self.blockReserve <= size }

    /// Forgets every block (their code may be overwritten from now on).
    func reset() { used = firstBlock }

    /// An emitter positioned at the first free byte.
    func emitter() -> X86Emitter {
        X86Emitter(buffer: writable, capacity: size, position: used)
    }

    /// Marks the emitter's output as used (16-byte aligned).
    func commit(_ e: X86Emitter) {
        used = (e.position + 15) & ~15
    }

    /// The executable address of a cache offset.
    @inline(__always) func code(at offset: Int) -> UnsafeRawPointer {
        UnsafeRawPointer(executable + offset)
    }
}
