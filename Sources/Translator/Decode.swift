/// Instruction decoding: 32-bit RV64IMAFD (with Zfh) and the C extension (expanded to 32-bit first).
enum Decoder {
    @inline(__always) static func bits(_ i: UInt32, _ hi: Int, _ lo: Int) -> UInt32 {
        (i >> UInt32(lo)) & ((1 << UInt32(hi - lo + 1)) - 1)
    }

    @inline(__always) static func signExtend(_ v: UInt32, bits n: Int) -> Int64 {
        let shift = 64 - n
        return (Int64(v) << Int64(shift)) >> Int64(shift)
    }

    /// Decodes one 32-bit instruction for a hart with `extensions`: an instruction of an
    /// extension not in the set is illegal.
    static func decode(_ i: UInt32, extensions: ISAExtensions) -> Op {
        let op = decode(i)
        if let e = op.kind.requiredExtension, !extensions.contains(e) {
            var o = Op(); o.raw = i; o.kind = .illegal; return o
        }
        if op.kind == .cbo && !extensions.contains(op.imm == 4 ? .zicboz : .zicbom) {
            var o = Op(); o.raw = i; o.kind = .illegal; return o
        }
        if op.kind == .sfenceVma && (i >> 25) == 0x0b && !extensions.contains(.svinval) {
            var o = Op(); o.raw = i; o.kind = .illegal; return o
        }
        return op
    }

    /// Decodes one 32-bit instruction with every extension this CPU implements.
    static func decode(_ i: UInt32) -> Op {
        var op = Op()
        op.raw = i
        op.length = 4
        let opcode = i & 0x7f
        let rd = UInt8(bits(i, 11, 7))
        let rs1 = UInt8(bits(i, 19, 15))
        let rs2 = UInt8(bits(i, 24, 20))
        let f3 = bits(i, 14, 12)
        let f7 = bits(i, 31, 25)
        let immI = Int64(Int32(bitPattern: i) >> 20)
        let immS = Int64((Int32(bitPattern: i) >> 25) << 5) | Int64(bits(i, 11, 7))
        let immB = signExtend((bits(i, 31, 31) << 12) | (bits(i, 7, 7) << 11) | (bits(i, 30, 25) << 5) | (bits(i, 11, 8) << 1), bits: 13)
        let immU = Int64(Int32(bitPattern: i & 0xffff_f000))
        let immJ = signExtend((bits(i, 31, 31) << 20) | (bits(i, 19, 12) << 12) | (bits(i, 20, 20) << 11) | (bits(i, 30, 21) << 1), bits: 21)
        op.rd = rd == 0 ? 32 : rd
        op.rs1 = rs1
        op.rs2 = rs2

        func ill() -> Op { var o = Op(); o.raw = i; o.kind = .illegal; return o }

        switch opcode {
        case 0x37: op.kind = .lui; op.imm = immU
        case 0x17: op.kind = .auipc; op.imm = immU
        case 0x6f: op.kind = .jal; op.imm = immJ
        case 0x67:
            guard f3 == 0 else { return ill() }
            op.kind = .jalr; op.imm = immI
        case 0x63:
            op.imm = immB
            switch f3 {
            case 0: op.kind = .beq
            case 1: op.kind = .bne
            case 4: op.kind = .blt
            case 5: op.kind = .bge
            case 6: op.kind = .bltu
            case 7: op.kind = .bgeu
            default: return ill()
            }
        case 0x03:
            op.imm = immI
            switch f3 {
            case 0: op.kind = .lb
            case 1: op.kind = .lh
            case 2: op.kind = .lw
            case 3: op.kind = .ld
            case 4: op.kind = .lbu
            case 5: op.kind = .lhu
            case 6: op.kind = .lwu
            default: return ill()
            }
        case 0x23:
            op.imm = immS
            switch f3 {
            case 0: op.kind = .sb
            case 1: op.kind = .sh
            case 2: op.kind = .sw
            case 3: op.kind = .sd
            default: return ill()
            }
        case 0x13:
            op.imm = immI
            switch f3 {
            case 0: op.kind = .addi
            case 2: op.kind = .slti
            case 3: op.kind = .sltiu
            case 4: op.kind = .xori
            case 6: op.kind = .ori
            case 7: op.kind = .andi
            case 1:
                let shamt = Int64(bits(i, 25, 20))
                switch (bits(i, 31, 26), bits(i, 31, 20)) {
                case (0, _): op.kind = .slli; op.imm = shamt
                case (0x12, _): op.kind = .bclri; op.imm = shamt; op.rs2 = 0
                case (0x1a, _): op.kind = .binvi; op.imm = shamt; op.rs2 = 0
                case (0x0a, _): op.kind = .bseti; op.imm = shamt; op.rs2 = 0
                case (_, 0x600): op.kind = .clz; op.imm = 0; op.rs2 = 0
                case (_, 0x601): op.kind = .ctz; op.imm = 0; op.rs2 = 0
                case (_, 0x602): op.kind = .cpop; op.imm = 0; op.rs2 = 0
                case (_, 0x604): op.kind = .sextB; op.imm = 0; op.rs2 = 0
                case (_, 0x605): op.kind = .sextH; op.imm = 0; op.rs2 = 0
                default: return ill()
                }
            case 5:
                op.imm = Int64(bits(i, 25, 20))
                switch (bits(i, 31, 26), bits(i, 31, 20)) {
                case (0, _): op.kind = .srli
                case (0x10, _): op.kind = .srai
                case (0x18, _): op.kind = .rori; op.rs2 = 0
                case (0x12, _): op.kind = .bexti; op.rs2 = 0
                case (_, 0x287): op.kind = .orcB; op.imm = 0; op.rs2 = 0
                case (_, 0x6b8): op.kind = .rev8; op.imm = 0; op.rs2 = 0
                default: return ill()
                }
            default: return ill()
            }
        case 0x1b:
            op.imm = immI
            switch f3 {
            case 0: op.kind = .addiw
            case 1:
                switch (f7, bits(i, 31, 26), bits(i, 31, 20)) {
                case (0, _, _): op.kind = .slliw; op.imm = Int64(bits(i, 24, 20))
                case (_, 0x02, _): op.kind = .slliUW; op.imm = Int64(bits(i, 25, 20)); op.rs2 = 0
                case (_, _, 0x600): op.kind = .clzw; op.imm = 0; op.rs2 = 0
                case (_, _, 0x601): op.kind = .ctzw; op.imm = 0; op.rs2 = 0
                case (_, _, 0x602): op.kind = .cpopw; op.imm = 0; op.rs2 = 0
                default: return ill()
                }
            case 5:
                op.imm = Int64(bits(i, 24, 20))
                switch f7 {
                case 0: op.kind = .srliw
                case 0x20: op.kind = .sraiw
                case 0x30: op.kind = .roriw; op.rs2 = 0
                default: return ill()
                }
            default: return ill()
            }
        case 0x33:
            switch (f7, f3) {
            case (0, 0): op.kind = .add
            case (0x20, 0): op.kind = .sub
            case (0, 1): op.kind = .sll
            case (0, 2): op.kind = .slt
            case (0, 3): op.kind = .sltu
            case (0, 4): op.kind = .xor
            case (0, 5): op.kind = .srl
            case (0x20, 5): op.kind = .sra
            case (0, 6): op.kind = .or
            case (0, 7): op.kind = .and
            case (1, 0): op.kind = .mul
            case (1, 1): op.kind = .mulh
            case (1, 2): op.kind = .mulhsu
            case (1, 3): op.kind = .mulhu
            case (1, 4): op.kind = .div
            case (1, 5): op.kind = .divu
            case (1, 6): op.kind = .rem
            case (1, 7): op.kind = .remu
            case (0x10, 2): op.kind = .sh1add
            case (0x10, 4): op.kind = .sh2add
            case (0x10, 6): op.kind = .sh3add
            case (0x20, 7): op.kind = .andn
            case (0x20, 6): op.kind = .orn
            case (0x20, 4): op.kind = .xnor
            case (0x05, 1): op.kind = .clmul
            case (0x05, 2): op.kind = .clmulr
            case (0x05, 3): op.kind = .clmulh
            case (0x05, 4): op.kind = .min
            case (0x05, 5): op.kind = .minu
            case (0x05, 6): op.kind = .max
            case (0x05, 7): op.kind = .maxu
            case (0x07, 5): op.kind = .czeroEqz
            case (0x07, 7): op.kind = .czeroNez
            case (0x30, 1): op.kind = .rol
            case (0x30, 5): op.kind = .ror
            case (0x24, 1): op.kind = .bclr
            case (0x24, 5): op.kind = .bext
            case (0x34, 1): op.kind = .binv
            case (0x14, 1): op.kind = .bset
            default: return ill()
            }
        case 0x3b:
            switch (f7, f3) {
            case (0, 0): op.kind = .addw
            case (0x20, 0): op.kind = .subw
            case (0, 1): op.kind = .sllw
            case (0, 5): op.kind = .srlw
            case (0x20, 5): op.kind = .sraw
            case (1, 0): op.kind = .mulw
            case (1, 4): op.kind = .divw
            case (1, 5): op.kind = .divuw
            case (1, 6): op.kind = .remw
            case (1, 7): op.kind = .remuw
            case (0x04, 0): op.kind = .addUW
            case (0x04, 4):
                guard rs2 == 0 else { return ill() }
                op.kind = .zextH
            case (0x10, 2): op.kind = .sh1addUW
            case (0x10, 4): op.kind = .sh2addUW
            case (0x10, 6): op.kind = .sh3addUW
            case (0x30, 1): op.kind = .rolw
            case (0x30, 5): op.kind = .rorw
            default: return ill()
            }
        case 0x0f:
            switch f3 {
            case 0: op.kind = .fence
            case 1: op.kind = .fenceI
            case 2:
                // cbo.inval/clean/flush/zero: rd = 0, the function in imm[11:0].
                let function = bits(i, 31, 20)
                guard rd == 0, [0, 1, 2, 4].contains(function) else { return ill() }
                op.kind = .cbo
                op.imm = Int64(function)
            default: return ill()
            }
        case 0x73:
            op.imm = Int64(bits(i, 31, 20))  // CSR number or system function
            switch f3 {
            case 0:
                if i == 0x0000_0073 { op.kind = .ecall }
                else if i == 0x0010_0073 { op.kind = .ebreak }
                else if i == 0x3020_0073 { op.kind = .mret }
                else if i == 0x1020_0073 { op.kind = .sret }
                else if i == 0x1050_0073 { op.kind = .wfi }
                else if (f7 == 0x09 || f7 == 0x0b) && rd == 0 { op.kind = .sfenceVma }  // sfence.vma, sinval.vma
                else if i == 0x1800_0073 || i == 0x1810_0073 { op.kind = .sfenceInval }
                else { return ill() }
            case 1: op.kind = .csrrw
            case 2: op.kind = .csrrs
            case 3: op.kind = .csrrc
            case 5: op.kind = .csrrwi
            case 6: op.kind = .csrrsi
            case 7: op.kind = .csrrci
            default: return ill()
            }
        case 0x2f:
            let f5 = bits(i, 31, 27)
            guard f3 == 2 || f3 == 3 else { return ill() }
            op.imm = f3 == 2 ? 4 : 8
            op.rm = UInt8(f5)
            switch f5 {
            case 0x02:
                guard rs2 == 0 else { return ill() }
                op.kind = .lr
            case 0x03: op.kind = .sc
            case 0x00, 0x01, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x18, 0x1c: op.kind = .amo
            default: return ill()
            }
        case 0x07:
            op.rd = rd
            op.imm = immI
            switch f3 {
            case 1: op.kind = .flh
            case 2: op.kind = .flw
            case 3: op.kind = .fld
            default: return ill()
            }
        case 0x27:
            op.imm = immS
            switch f3 {
            case 1: op.kind = .fsh
            case 2: op.kind = .fsw
            case 3: op.kind = .fsd
            default: return ill()
            }
        case 0x43, 0x47, 0x4b, 0x4f:
            let fmt = bits(i, 26, 25)
            op.rd = rd
            op.rs3 = UInt8(bits(i, 31, 27))
            op.rm = UInt8(f3)
            switch (fmt, opcode) {
            case (0, 0x43): op.kind = .fmaddS
            case (0, 0x47): op.kind = .fmsubS
            case (0, 0x4b): op.kind = .fnmsubS
            case (0, _): op.kind = .fnmaddS
            case (1, 0x43): op.kind = .fmaddD
            case (1, 0x47): op.kind = .fmsubD
            case (1, 0x4b): op.kind = .fnmsubD
            case (1, _): op.kind = .fnmaddD
            case (2, 0x43): op.kind = .fmaddH
            case (2, 0x47): op.kind = .fmsubH
            case (2, 0x4b): op.kind = .fnmsubH
            case (2, _): op.kind = .fnmaddH
            default: return ill()
            }
        case 0x53:
            return decodeFP(i, op)
        default:
            return ill()
        }
        return op
    }

    static func decodeFP(_ i: UInt32, _ base: Op) -> Op {
        var op = base
        let f7 = bits(i, 31, 25)
        let f3 = bits(i, 14, 12)
        let rd = UInt8(bits(i, 11, 7))
        let rs2 = bits(i, 24, 20)
        op.rm = UInt8(f3)
        op.rd = rd  // FP destination by default; integer destinations fixed below
        func intDest() { op.rd = rd == 0 ? 32 : rd }
        func ill() -> Op { var o = Op(); o.raw = i; o.kind = .illegal; return o }
        let validRM = f3 <= 4 || f3 == 7
        switch f7 {
        case 0x00: guard validRM else { return ill() }; op.kind = .faddS
        case 0x04: guard validRM else { return ill() }; op.kind = .fsubS
        case 0x08: guard validRM else { return ill() }; op.kind = .fmulS
        case 0x0c: guard validRM else { return ill() }; op.kind = .fdivS
        case 0x2c: guard validRM, rs2 == 0 else { return ill() }; op.kind = .fsqrtS
        case 0x01: guard validRM else { return ill() }; op.kind = .faddD
        case 0x05: guard validRM else { return ill() }; op.kind = .fsubD
        case 0x09: guard validRM else { return ill() }; op.kind = .fmulD
        case 0x0d: guard validRM else { return ill() }; op.kind = .fdivD
        case 0x2d: guard validRM, rs2 == 0 else { return ill() }; op.kind = .fsqrtD
        case 0x10:
            switch f3 { case 0: op.kind = .fsgnjS; case 1: op.kind = .fsgnjnS; case 2: op.kind = .fsgnjxS; default: return ill() }
        case 0x11:
            switch f3 { case 0: op.kind = .fsgnjD; case 1: op.kind = .fsgnjnD; case 2: op.kind = .fsgnjxD; default: return ill() }
        case 0x14:
            switch f3 { case 0: op.kind = .fminS; case 1: op.kind = .fmaxS; default: return ill() }
        case 0x15:
            switch f3 { case 0: op.kind = .fminD; case 1: op.kind = .fmaxD; default: return ill() }
        case 0x50:
            intDest()
            switch f3 { case 0: op.kind = .fleS; case 1: op.kind = .fltS; case 2: op.kind = .feqS; default: return ill() }
        case 0x51:
            intDest()
            switch f3 { case 0: op.kind = .fleD; case 1: op.kind = .fltD; case 2: op.kind = .feqD; default: return ill() }
        case 0x60:
            guard validRM else { return ill() }
            intDest()
            switch rs2 { case 0: op.kind = .fcvtWS; case 1: op.kind = .fcvtWUS; case 2: op.kind = .fcvtLS; case 3: op.kind = .fcvtLUS; default: return ill() }
        case 0x61:
            guard validRM else { return ill() }
            intDest()
            switch rs2 { case 0: op.kind = .fcvtWD; case 1: op.kind = .fcvtWUD; case 2: op.kind = .fcvtLD; case 3: op.kind = .fcvtLUD; default: return ill() }
        case 0x68:
            guard validRM else { return ill() }
            switch rs2 { case 0: op.kind = .fcvtSW; case 1: op.kind = .fcvtSWU; case 2: op.kind = .fcvtSL; case 3: op.kind = .fcvtSLU; default: return ill() }
        case 0x69:
            guard validRM else { return ill() }
            switch rs2 { case 0: op.kind = .fcvtDW; case 1: op.kind = .fcvtDWU; case 2: op.kind = .fcvtDL; case 3: op.kind = .fcvtDLU; default: return ill() }
        case 0x20:
            guard validRM else { return ill() }
            switch rs2 { case 1: op.kind = .fcvtSD; case 2: op.kind = .fcvtSH; default: return ill() }
        case 0x21:
            guard validRM else { return ill() }
            switch rs2 { case 0: op.kind = .fcvtDS; case 2: op.kind = .fcvtDH; default: return ill() }
        case 0x70:
            guard rs2 == 0 else { return ill() }
            intDest()
            switch f3 { case 0: op.kind = .fmvXW; case 1: op.kind = .fclassS; default: return ill() }
        case 0x71:
            guard rs2 == 0 else { return ill() }
            intDest()
            switch f3 { case 0: op.kind = .fmvXD; case 1: op.kind = .fclassD; default: return ill() }
        case 0x78:
            guard rs2 == 0, f3 == 0 else { return ill() }
            op.kind = .fmvWX
        case 0x79:
            guard rs2 == 0, f3 == 0 else { return ill() }
            op.kind = .fmvDX
        // Zfh and Zfhmin (fmt = 2)
        case 0x02: guard validRM else { return ill() }; op.kind = .faddH
        case 0x06: guard validRM else { return ill() }; op.kind = .fsubH
        case 0x0a: guard validRM else { return ill() }; op.kind = .fmulH
        case 0x0e: guard validRM else { return ill() }; op.kind = .fdivH
        case 0x2e: guard validRM, rs2 == 0 else { return ill() }; op.kind = .fsqrtH
        case 0x12:
            switch f3 { case 0: op.kind = .fsgnjH; case 1: op.kind = .fsgnjnH; case 2: op.kind = .fsgnjxH; default: return ill() }
        case 0x16:
            switch f3 { case 0: op.kind = .fminH; case 1: op.kind = .fmaxH; default: return ill() }
        case 0x52:
            intDest()
            switch f3 { case 0: op.kind = .fleH; case 1: op.kind = .fltH; case 2: op.kind = .feqH; default: return ill() }
        case 0x62:
            guard validRM else { return ill() }
            intDest()
            switch rs2 { case 0: op.kind = .fcvtWH; case 1: op.kind = .fcvtWUH; case 2: op.kind = .fcvtLH; case 3: op.kind = .fcvtLUH; default: return ill() }
        case 0x6a:
            guard validRM else { return ill() }
            switch rs2 { case 0: op.kind = .fcvtHW; case 1: op.kind = .fcvtHWU; case 2: op.kind = .fcvtHL; case 3: op.kind = .fcvtHLU; default: return ill() }
        case 0x22:
            guard validRM else { return ill() }
            switch rs2 { case 0: op.kind = .fcvtHS; case 1: op.kind = .fcvtHD; default: return ill() }
        case 0x72:
            guard rs2 == 0 else { return ill() }
            intDest()
            switch f3 { case 0: op.kind = .fmvXH; case 1: op.kind = .fclassH; default: return ill() }
        case 0x7a:
            guard rs2 == 0, f3 == 0 else { return ill() }
            op.kind = .fmvHX
        default:
            return ill()
        }
        return op
    }

    /// Expands a 16-bit compressed instruction to its 32-bit equivalent, or nil if it is
    /// reserved or illegal (including the all-zero parcel).
    static func expandCompressed(_ c: UInt16) -> UInt32? {
        let i = UInt32(c)
        let op = i & 3
        let f3 = bits(i, 15, 13)
        let rdp = bits(i, 4, 2) + 8      // rd' / rs2'
        let rs1p = bits(i, 9, 7) + 8     // rs1' / rd'
        let rd = bits(i, 11, 7)
        let rs2 = bits(i, 6, 2)

        func rType(_ f7: UInt32, _ rs2: UInt32, _ rs1: UInt32, _ f3: UInt32, _ rd: UInt32, _ opc: UInt32) -> UInt32 {
            (f7 << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | opc
        }
        func iType(_ imm: Int32, _ rs1: UInt32, _ f3: UInt32, _ rd: UInt32, _ opc: UInt32) -> UInt32 {
            (UInt32(bitPattern: imm & 0xfff) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | opc
        }
        func sType(_ imm: Int32, _ rs2: UInt32, _ rs1: UInt32, _ f3: UInt32, _ opc: UInt32) -> UInt32 {
            let u = UInt32(bitPattern: imm)
            return (bits(u, 11, 5) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (bits(u, 4, 0) << 7) | opc
        }
        func bType(_ imm: Int32, _ rs2: UInt32, _ rs1: UInt32, _ f3: UInt32) -> UInt32 {
            let u = UInt32(bitPattern: imm)
            return (bits(u, 12, 12) << 31) | (bits(u, 10, 5) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12)
                | (bits(u, 4, 1) << 8) | (bits(u, 11, 11) << 7) | 0x63
        }
        func jType(_ imm: Int32, _ rd: UInt32) -> UInt32 {
            let u = UInt32(bitPattern: imm)
            return (bits(u, 20, 20) << 31) | (bits(u, 10, 1) << 21) | (bits(u, 11, 11) << 20) | (bits(u, 19, 12) << 12)
                | (rd << 7) | 0x6f
        }
        func sext(_ v: UInt32, _ n: Int) -> Int32 { Int32(truncatingIfNeeded: signExtend(v, bits: n)) }

        switch (op, f3) {
        case (0, 0): // c.addi4spn
            let imm = (bits(i, 10, 7) << 6) | (bits(i, 12, 11) << 4) | (bits(i, 5, 5) << 3) | (bits(i, 6, 6) << 2)
            guard imm != 0 else { return nil }
            return iType(Int32(imm), 2, 0, rdp, 0x13)
        case (0, 1): // c.fld
            let imm = (bits(i, 6, 5) << 6) | (bits(i, 12, 10) << 3)
            return iType(Int32(imm), rs1p, 3, rdp, 0x07)
        case (0, 2): // c.lw
            let imm = (bits(i, 5, 5) << 6) | (bits(i, 12, 10) << 3) | (bits(i, 6, 6) << 2)
            return iType(Int32(imm), rs1p, 2, rdp, 0x03)
        case (0, 3): // c.ld
            let imm = (bits(i, 6, 5) << 6) | (bits(i, 12, 10) << 3)
            return iType(Int32(imm), rs1p, 3, rdp, 0x03)
        case (0, 5): // c.fsd
            let imm = (bits(i, 6, 5) << 6) | (bits(i, 12, 10) << 3)
            return sType(Int32(imm), rdp, rs1p, 3, 0x27)
        case (0, 6): // c.sw
            let imm = (bits(i, 5, 5) << 6) | (bits(i, 12, 10) << 3) | (bits(i, 6, 6) << 2)
            return sType(Int32(imm), rdp, rs1p, 2, 0x23)
        case (0, 7): // c.sd
            let imm = (bits(i, 6, 5) << 6) | (bits(i, 12, 10) << 3)
            return sType(Int32(imm), rdp, rs1p, 3, 0x23)
        case (1, 0): // c.addi / c.nop
            let imm = sext((bits(i, 12, 12) << 5) | bits(i, 6, 2), 6)
            return iType(imm, rd, 0, rd, 0x13)
        case (1, 1): // c.addiw
            guard rd != 0 else { return nil }
            let imm = sext((bits(i, 12, 12) << 5) | bits(i, 6, 2), 6)
            return iType(imm, rd, 0, rd, 0x1b)
        case (1, 2): // c.li
            let imm = sext((bits(i, 12, 12) << 5) | bits(i, 6, 2), 6)
            return iType(imm, 0, 0, rd, 0x13)
        case (1, 3):
            if rd == 2 { // c.addi16sp
                let imm = sext((bits(i, 12, 12) << 9) | (bits(i, 4, 3) << 7) | (bits(i, 5, 5) << 6) | (bits(i, 2, 2) << 5) | (bits(i, 6, 6) << 4), 10)
                guard imm != 0 else { return nil }
                return iType(imm, 2, 0, 2, 0x13)
            }
            // c.lui
            let imm = sext((bits(i, 12, 12) << 17) | (bits(i, 6, 2) << 12), 18)
            guard imm != 0 else { return nil }
            return (UInt32(bitPattern: imm) & 0xffff_f000) | (rd << 7) | 0x37
        case (1, 4):
            let f2 = bits(i, 11, 10)
            let shamt = (bits(i, 12, 12) << 5) | bits(i, 6, 2)
            switch f2 {
            case 0: return iType(Int32(shamt), rs1p, 5, rs1p, 0x13)                 // c.srli
            case 1: return iType(Int32(shamt | 0x400), rs1p, 5, rs1p, 0x13)         // c.srai
            case 2:                                                                 // c.andi
                let imm = sext((bits(i, 12, 12) << 5) | bits(i, 6, 2), 6)
                return iType(imm, rs1p, 7, rs1p, 0x13)
            default:
                let f = (bits(i, 12, 12) << 2) | bits(i, 6, 5)
                switch f {
                case 0: return rType(0x20, rdp, rs1p, 0, rs1p, 0x33) // c.sub
                case 1: return rType(0, rdp, rs1p, 4, rs1p, 0x33)    // c.xor
                case 2: return rType(0, rdp, rs1p, 6, rs1p, 0x33)    // c.or
                case 3: return rType(0, rdp, rs1p, 7, rs1p, 0x33)    // c.and
                case 4: return rType(0x20, rdp, rs1p, 0, rs1p, 0x3b) // c.subw
                case 5: return rType(0, rdp, rs1p, 0, rs1p, 0x3b)    // c.addw
                default: return nil
                }
            }
        case (1, 5): // c.j
            let imm = sext((bits(i, 12, 12) << 11) | (bits(i, 8, 8) << 10) | (bits(i, 10, 9) << 8) | (bits(i, 6, 6) << 7)
                           | (bits(i, 7, 7) << 6) | (bits(i, 2, 2) << 5) | (bits(i, 11, 11) << 4) | (bits(i, 5, 3) << 1), 12)
            return jType(imm, 0)
        case (1, 6), (1, 7): // c.beqz / c.bnez
            let imm = sext((bits(i, 12, 12) << 8) | (bits(i, 6, 5) << 6) | (bits(i, 2, 2) << 5) | (bits(i, 11, 10) << 3) | (bits(i, 4, 3) << 1), 9)
            return bType(imm, 0, rs1p, f3 == 6 ? 0 : 1)
        case (2, 0): // c.slli
            let shamt = (bits(i, 12, 12) << 5) | bits(i, 6, 2)
            return iType(Int32(shamt), rd, 1, rd, 0x13)
        case (2, 1): // c.fldsp
            let imm = (bits(i, 4, 2) << 6) | (bits(i, 12, 12) << 5) | (bits(i, 6, 5) << 3)
            return iType(Int32(imm), 2, 3, rd, 0x07)
        case (2, 2): // c.lwsp
            guard rd != 0 else { return nil }
            let imm = (bits(i, 3, 2) << 6) | (bits(i, 12, 12) << 5) | (bits(i, 6, 4) << 2)
            return iType(Int32(imm), 2, 2, rd, 0x03)
        case (2, 3): // c.ldsp
            guard rd != 0 else { return nil }
            let imm = (bits(i, 4, 2) << 6) | (bits(i, 12, 12) << 5) | (bits(i, 6, 5) << 3)
            return iType(Int32(imm), 2, 3, rd, 0x03)
        case (2, 4):
            if bits(i, 12, 12) == 0 {
                if rs2 == 0 { // c.jr
                    guard rd != 0 else { return nil }
                    return iType(0, rd, 0, 0, 0x67)
                }
                return rType(0, rs2, 0, 0, rd, 0x33) // c.mv
            }
            if rs2 == 0 {
                if rd == 0 { return 0x0010_0073 } // c.ebreak
                return iType(0, rd, 0, 1, 0x67)    // c.jalr
            }
            return rType(0, rs2, rd, 0, rd, 0x33)  // c.add
        case (2, 5): // c.fsdsp
            let imm = (bits(i, 9, 7) << 6) | (bits(i, 12, 10) << 3)
            return sType(Int32(imm), rs2, 2, 3, 0x27)
        case (2, 6): // c.swsp
            let imm = (bits(i, 8, 7) << 6) | (bits(i, 12, 9) << 2)
            return sType(Int32(imm), rs2, 2, 2, 0x23)
        case (2, 7): // c.sdsp
            let imm = (bits(i, 9, 7) << 6) | (bits(i, 12, 10) << 3)
            return sType(Int32(imm), rs2, 2, 3, 0x23)
        default:
            return nil
        }
    }
}
