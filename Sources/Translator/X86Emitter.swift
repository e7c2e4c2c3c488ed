/// x86-64 general-purpose registers, by their encoding number.
enum X86Reg: UInt8 {
    case rax = 0, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15

    var low: UInt8 { rawValue & 7 }
    var high: UInt8 { rawValue >> 3 }
    /// Whether the System V ABI has a callee preserve it.
    var calleeSaved: Bool { [.rbx, .rsp, .rbp, .r12, .r13, .r14, .r15].contains(self) }
}

/// A memory operand `[base + index << scale + disp]`.
struct X86Mem {
    var base: X86Reg
    var index: X86Reg? = nil
    /// log2 of the index scale (0…3).
    var scale: UInt8 = 0
    var disp: Int32 = 0

    init(_ base: X86Reg, _ disp: Int32 = 0) {
        self.base = base
        self.disp = disp
    }

    init(_ base: X86Reg, index: X86Reg, scale: UInt8, _ disp: Int32 = 0) {
        self.base = base
        self.index = index
        self.scale = scale
        self.disp = disp
    }
}

/// x86 condition codes (the low nibble of `jcc`, `setcc`, `cmovcc`).
enum X86Cond: UInt8 {
    case o = 0, no, b, ae, e, ne, be, a, s, ns, p, np, l, ge, le, g
}

/// Operand sizes of integer instructions.
enum X86Size {
    case b8, b16, b32, b64
}

/// Group-1 ALU operations, by their `/digit` (the register-form opcode is `digit * 8 + 1`).
enum X86ALU: UInt8 {
    case add = 0, or = 1, and = 4, sub = 5, xor = 6, cmp = 7
}

/// Shift operations, by their `/digit`.
enum X86Shift: UInt8 {
    case shl = 4, shr = 5, sar = 7
}

/// Writes x86-64 machine code into a buffer: the small instruction subset the block compiler
/// uses, encoded by hand (REX, ModRM, SIB). Positions are byte offsets from the buffer start;
/// relative branches are resolved against those offsets, so the code runs from any mapping of
/// the buffer at the same relative layout.
///
/// Threading: used by one vCPU thread while it compiles a block.
struct X86Emitter {
    let buffer: UnsafeMutablePointer<UInt8>
    let capacity: Int
    var position: Int

    init(buffer: UnsafeMutablePointer<UInt8>, capacity: Int, position: Int) {
        self.buffer = buffer
        self.capacity = capacity
        self.position = position
    }

    // MARK: Raw bytes

    @inline(__always) mutating func byte(_ b: UInt8) {
        precondition(position < capacity, "JIT code buffer overflow")
        buffer[position] = b
        position += 1
    }

    mutating func u32(_ v: UInt32) {
        for i in 0..<4 { byte(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) }
    }

    mutating func u64(_ v: UInt64) {
        for i in 0..<8 { byte(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
    }

    func read32(at p: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(buffer[p + i]) << (8 * UInt32(i)) }
        return v
    }

    func write32(_ v: UInt32, at p: Int) {
        for i in 0..<4 { buffer[p + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
    }

    // MARK: Encoding core

    /// Emits the size prefix and REX byte. `reg`, `index` and `base` are the raw register
    /// numbers going into ModRM.reg, SIB.index and ModRM.rm/SIB.base.
    private mutating func prefix(_ size: X86Size, reg: UInt8, index: UInt8, base: UInt8, byteRegs: Bool) {
        if size == .b16 { byte(0x66) }
        var rex: UInt8 = 0
        if size == .b64 { rex |= 8 }
        if reg & 8 != 0 { rex |= 4 }
        if index & 8 != 0 { rex |= 2 }
        if base & 8 != 0 { rex |= 1 }
        // spl, bpl, sil, dil need a REX prefix to be addressed as bytes.
        let needsRex = byteRegs && ((reg >= 4 && reg < 8) || (base >= 4 && base < 8))
        if rex != 0 || needsRex { byte(0x40 | rex) }
    }

    private mutating func opcode(_ op: UInt32) {
        if op > 0xffff { byte(UInt8(op >> 16)) }
        if op > 0xff { byte(UInt8((op >> 8) & 0xff)) }
        byte(UInt8(op & 0xff))
    }

    /// `op reg, r/m` with a register r/m.
    mutating func rr(_ op: UInt32, _ size: X86Size, reg: UInt8, rm: UInt8) {
        prefix(size, reg: reg, index: 0, base: rm, byteRegs: size == .b8)
        opcode(op)
        byte(0xc0 | ((reg & 7) << 3) | (rm & 7))
    }

    /// `op reg, r/m` with a memory r/m. `byteRegs` when `reg` is an 8-bit register operand.
    mutating func rm(_ op: UInt32, _ size: X86Size, reg: UInt8, _ m: X86Mem, byteRegs: Bool = false) {
        let base = m.base.rawValue
        let index = m.index?.rawValue ?? 0
        prefix(size, reg: reg, index: index, base: base, byteRegs: byteRegs)
        opcode(op)
        let mod: UInt8
        if m.disp == 0 && (base & 7) != 5 {
            mod = 0
        } else if m.disp >= -128 && m.disp <= 127 {
            mod = 1
        } else {
            mod = 2
        }
        if let idx = m.index {
            precondition(idx != .rsp, "rsp cannot be an index")
            byte((mod << 6) | ((reg & 7) << 3) | 4)
            byte((m.scale << 6) | ((idx.rawValue & 7) << 3) | (base & 7))
        } else if base & 7 == 4 {
            byte((mod << 6) | ((reg & 7) << 3) | 4)
            byte(0x24)
        } else {
            byte((mod << 6) | ((reg & 7) << 3) | (base & 7))
        }
        if mod == 1 { byte(UInt8(bitPattern: Int8(m.disp))) }
        if mod == 2 { u32(UInt32(bitPattern: m.disp)) }
    }

    // MARK: Moves

    /// `mov dst, [m]` (64 or 32 bits; 32 zero-extends).
    mutating func load(_ dst: X86Reg, _ m: X86Mem, _ size: X86Size = .b64) {
        switch size {
        case .b64, .b32: rm(0x8b, size, reg: dst.rawValue, m)
        case .b16: rm(0x0fb7, .b32, reg: dst.rawValue, m)   // movzx r32, word
        case .b8: rm(0x0fb6, .b32, reg: dst.rawValue, m)    // movzx r32, byte
        }
    }

    /// Sign-extending load into a 64-bit register.
    mutating func loadSigned(_ dst: X86Reg, _ m: X86Mem, _ size: X86Size) {
        switch size {
        case .b8: rm(0x0fbe, .b64, reg: dst.rawValue, m)
        case .b16: rm(0x0fbf, .b64, reg: dst.rawValue, m)
        case .b32: rm(0x63, .b64, reg: dst.rawValue, m)
        case .b64: rm(0x8b, .b64, reg: dst.rawValue, m)
        }
    }

    /// `mov [m], src` with the given width.
    mutating func store(_ m: X86Mem, _ src: X86Reg, _ size: X86Size = .b64) {
        rm(size == .b8 ? 0x88 : 0x89, size, reg: src.rawValue, m, byteRegs: size == .b8)
    }

    /// `mov dst, src` (64-bit).
    mutating func mov(_ dst: X86Reg, _ src: X86Reg) {
        rr(0x89, .b64, reg: src.rawValue, rm: dst.rawValue)
    }

    /// Loads a 64-bit constant with the shortest encoding.
    mutating func movImm(_ dst: X86Reg, _ v: UInt64) {
        if v <= 0xffff_ffff {
            if dst.rawValue >= 8 { byte(0x41) }
            byte(0xb8 + dst.low)
            u32(UInt32(v))
        } else if Int64(bitPattern: v) >= Int64(Int32.min) && Int64(bitPattern: v) <= Int64(Int32.max) {
            rr(0xc7, .b64, reg: 0, rm: dst.rawValue)
            u32(UInt32(truncatingIfNeeded: v))
        } else {
            byte(0x48 | dst.high)
            byte(0xb8 + dst.low)
            u64(v)
        }
    }

    /// `movsxd dst, src32`.
    mutating func movsxd(_ dst: X86Reg, _ src: X86Reg) {
        rr(0x63, .b64, reg: dst.rawValue, rm: src.rawValue)
    }

    /// `lea dst, [m]`.
    mutating func lea(_ dst: X86Reg, _ m: X86Mem) {
        rm(0x8d, .b64, reg: dst.rawValue, m)
    }

    // MARK: Arithmetic

    /// `op dst, src` (register-register).
    mutating func alu(_ op: X86ALU, _ dst: X86Reg, _ src: X86Reg, _ size: X86Size = .b64) {
        rr(UInt32(op.rawValue) * 8 + 1, size, reg: src.rawValue, rm: dst.rawValue)
    }

    /// `op dst, [m]`.
    mutating func alu(_ op: X86ALU, _ dst: X86Reg, _ m: X86Mem, _ size: X86Size = .b64) {
        rm(UInt32(op.rawValue) * 8 + 3, size, reg: dst.rawValue, m)
    }

    /// `op [m], src`.
    mutating func alu(_ op: X86ALU, _ m: X86Mem, _ src: X86Reg, _ size: X86Size = .b64) {
        rm(UInt32(op.rawValue) * 8 + 1, size, reg: src.rawValue, m)
    }

    /// `op dst, imm32` (sign-extended to 64 bits for 64-bit operations).
    mutating func alu(_ op: X86ALU, _ dst: X86Reg, imm: Int32, _ size: X86Size = .b64) {
        if imm >= -128 && imm <= 127 {
            rr(0x83, size, reg: op.rawValue, rm: dst.rawValue)
            byte(UInt8(bitPattern: Int8(imm)))
        } else {
            rr(0x81, size, reg: op.rawValue, rm: dst.rawValue)
            u32(UInt32(bitPattern: imm))
        }
    }

    /// `op qword [m], imm32`.
    mutating func alu(_ op: X86ALU, _ m: X86Mem, imm: Int32, _ size: X86Size = .b64) {
        if imm >= -128 && imm <= 127 {
            rm(0x83, size, reg: op.rawValue, m)
            byte(UInt8(bitPattern: Int8(imm)))
        } else {
            rm(0x81, size, reg: op.rawValue, m)
            u32(UInt32(bitPattern: imm))
        }
    }

    /// `mov dword [m], imm32`.
    mutating func storeImm32(_ m: X86Mem, _ imm: Int32) {
        rm(0xc7, .b32, reg: 0, m)
        u32(UInt32(bitPattern: imm))
    }

    /// `cmp byte [m], imm8`.
    mutating func cmpByte(_ m: X86Mem, _ imm: UInt8) {
        rm(0x80, .b32, reg: 7, m)
        byte(imm)
    }

    /// `dec qword [m]`.
    mutating func dec(_ m: X86Mem) {
        rm(0xff, .b64, reg: 1, m)
    }

    /// `imul dst, src, imm32`.
    mutating func imul(_ dst: X86Reg, _ src: X86Reg, imm: Int32) {
        rr(0x69, .b64, reg: dst.rawValue, rm: src.rawValue)
        u32(UInt32(bitPattern: imm))
    }

    /// `test a, b`.
    mutating func test(_ a: X86Reg, _ b: X86Reg, _ size: X86Size = .b64) {
        rr(0x85, size, reg: b.rawValue, rm: a.rawValue)
    }

    /// `test dword/qword [m], imm32`.
    mutating func test(_ m: X86Mem, imm: Int32, _ size: X86Size = .b64) {
        rm(0xf7, size, reg: 0, m)
        u32(UInt32(bitPattern: imm))
    }

    /// Shift by an immediate count.
    mutating func shift(_ op: X86Shift, _ dst: X86Reg, _ count: UInt8, _ size: X86Size = .b64) {
        rr(0xc1, size, reg: op.rawValue, rm: dst.rawValue)
        byte(count)
    }

    /// Shift by `cl` (the hardware masks the count to 5 or 6 bits, as RISC-V does).
    mutating func shiftCL(_ op: X86Shift, _ dst: X86Reg, _ size: X86Size = .b64) {
        rr(0xd3, size, reg: op.rawValue, rm: dst.rawValue)
    }

    /// `imul dst, [m]` (truncating multiply).
    mutating func imul(_ dst: X86Reg, _ m: X86Mem, _ size: X86Size = .b64) {
        rm(0x0faf, size, reg: dst.rawValue, m)
    }

    /// One-operand `mul` (unsigned, 4) or `imul` (signed, 5): rdx:rax = rax * [m].
    mutating func mulWide(signed: Bool, _ m: X86Mem) {
        rm(0xf7, .b64, reg: signed ? 5 : 4, m)
    }

    /// `setcc dst8` then `movzx dst32, dst8`.
    mutating func setcc(_ cc: X86Cond, _ dst: X86Reg) {
        rr(0x0f90 + UInt32(cc.rawValue), .b8, reg: 0, rm: dst.rawValue)
        rr(0x0fb6, .b8, reg: dst.rawValue, rm: dst.rawValue)   // .b8: REX for sil/dil, no REX.W
    }

    // MARK: SSE and FMA (scalar double)

    /// A legacy SSE instruction `prefix 0F op xmm, [m]` (prefix F2 for the sd forms, 66 for
    /// ucomisd).
    mutating func sse(_ prefix: UInt8, _ op: UInt8, xmm: UInt8, _ m: X86Mem) {
        byte(prefix)
        rm(0x0f00 | UInt32(op), .b32, reg: xmm, m)
    }

    /// A legacy SSE instruction with two xmm registers.
    mutating func sse(_ prefix: UInt8, _ op: UInt8, xmm: UInt8, xmm2: UInt8) {
        byte(prefix)
        rr(0x0f00 | UInt32(op), .b32, reg: xmm, rm: xmm2)
    }

    /// `vfm*231sd xmm0, xmm1, [m]` (`op` B9 fmadd, BB fmsub, BD fnmadd, BF fnmsub):
    /// xmm0 = ±(xmm1 * [m]) ± xmm0, rounded once. `m`'s base must be one of rax…rdi.
    mutating func fma231sd(_ op: UInt8, _ m: X86Mem) {
        precondition(m.index == nil && m.base.rawValue < 8)
        byte(0xc4)
        byte(0xe2)                 // R̄ X̄ B̄ set (no extended registers), map 0F38
        byte(0xf1)                 // W1, vvvv = ~xmm1, L0, pp = 66
        byte(op)
        byte(0x80 | m.base.low)    // mod 10 (disp32), reg xmm0
        if m.base.low == 4 { byte(0x24) }
        u32(UInt32(bitPattern: m.disp))
    }

    // MARK: Control flow

    /// `jcc rel32` to an unknown target; returns the position of the displacement to patch.
    mutating func jcc(_ cc: X86Cond) -> Int {
        byte(0x0f)
        byte(0x80 + cc.rawValue)
        let at = position
        u32(0)
        return at
    }

    /// `jmp rel32` to an unknown target; returns the position of the displacement to patch.
    mutating func jmp() -> Int {
        byte(0xe9)
        let at = position
        u32(0)
        return at
    }

    /// `jmp rel32` to a known position.
    mutating func jmp(to target: Int) {
        let at = jmp()
        patch(at, to: target)
    }

    /// `jcc rel32` to a known position.
    mutating func jcc(_ cc: X86Cond, to target: Int) {
        let at = jcc(cc)
        patch(at, to: target)
    }

    /// Points the rel32 displacement at `at` to `target`.
    func patch(_ at: Int, to target: Int) {
        write32(UInt32(bitPattern: Int32(target - (at + 4))), at: at)
    }

    /// `call reg`.
    mutating func call(_ r: X86Reg) {
        rr(0xff, .b32, reg: 2, rm: r.rawValue)
    }

    /// `jmp reg`.
    mutating func jmp(_ r: X86Reg) {
        rr(0xff, .b32, reg: 4, rm: r.rawValue)
    }

    mutating func push(_ r: X86Reg) {
        if r.rawValue >= 8 { byte(0x41) }
        byte(0x50 + r.low)
    }

    mutating func pop(_ r: X86Reg) {
        if r.rawValue >= 8 { byte(0x41) }
        byte(0x58 + r.low)
    }

    mutating func ret() { byte(0xc3) }
}
