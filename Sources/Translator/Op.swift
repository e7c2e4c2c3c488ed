/// The operations of the pre-decoded form. One guest instruction becomes one `Op`; the
/// executor switches on `kind` and never looks at instruction bits again.
enum OpKind: UInt8 {
    case illegal
    case nop
    // RV64I
    case lui, auipc, jal, jalr
    case beq, bne, blt, bge, bltu, bgeu
    case lb, lh, lw, ld, lbu, lhu, lwu
    case sb, sh, sw, sd
    case addi, slti, sltiu, xori, ori, andi, slli, srli, srai
    case add, sub, sll, slt, sltu, xor, srl, sra, or, and
    case addiw, slliw, srliw, sraiw, addw, subw, sllw, srlw, sraw
    // M
    case mul, mulh, mulhsu, mulhu, div, divu, rem, remu
    case mulw, divw, divuw, remw, remuw
    // A: `rm` holds the AMO function (funct5), `imm` the width (4 or 8)
    case lr, sc, amo
    // F and D loads/stores
    case flw, fld, fsw, fsd
    // F and D arithmetic: `rm` holds the rounding-mode field
    case fmaddS, fmsubS, fnmsubS, fnmaddS, faddS, fsubS, fmulS, fdivS, fsqrtS
    case fsgnjS, fsgnjnS, fsgnjxS, fminS, fmaxS, feqS, fltS, fleS, fclassS
    case fcvtWS, fcvtWUS, fcvtLS, fcvtLUS, fcvtSW, fcvtSWU, fcvtSL, fcvtSLU, fmvXW, fmvWX
    case fmaddD, fmsubD, fnmsubD, fnmaddD, faddD, fsubD, fmulD, fdivD, fsqrtD
    case fsgnjD, fsgnjnD, fsgnjxD, fminD, fmaxD, feqD, fltD, fleD, fclassD
    case fcvtWD, fcvtWUD, fcvtLD, fcvtLUD, fcvtDW, fcvtDWU, fcvtDL, fcvtDLU, fmvXD, fmvDX
    case fcvtSD, fcvtDS
    // System
    case fence, fenceI, ecall, ebreak, mret, sret, wfi, sfenceVma
    case csrrw, csrrs, csrrc, csrrwi, csrrsi, csrrci
    // Zba, Zbb, Zbc, Zbs, Zicond: pure integer ops computed by `bitManip`; an immediate form
    // names x0 as rs2 and holds its shift amount in `imm` (the second operand is rs2 + imm).
    // Keep them contiguous from addUW to czeroNez (`OpKind.isBitManip`).
    case addUW, sh1add, sh2add, sh3add, sh1addUW, sh2addUW, sh3addUW, slliUW
    case andn, orn, xnor, clz, clzw, ctz, ctzw, cpop, cpopw, max, maxu, min, minu, sextB, sextH, zextH
    case rol, rolw, ror, rori, roriw, rorw, orcB, rev8
    case clmul, clmulh, clmulr
    case bclr, bclri, bext, bexti, binv, binvi, bset, bseti
    case czeroEqz, czeroNez
    // Zicbom/Zicboz: `imm` holds the function (0 inval, 1 clean, 2 flush, 4 zero).
    case cbo
    // Svinval: sfence.w.inval and sfence.inval.ir (sinval.vma decodes as sfenceVma).
    case sfenceInval
    // Zfhmin/Zfh: half-precision loads and stores, then the ops `executeHalf` computes (keep
    // those contiguous from fmaddH to fcvtHD: `OpKind.isHalf`). `rm` holds the rounding mode.
    case flh, fsh
    case fmaddH, fmsubH, fnmsubH, fnmaddH, faddH, fsubH, fmulH, fdivH, fsqrtH
    case fsgnjH, fsgnjnH, fsgnjxH, fminH, fmaxH, feqH, fltH, fleH, fclassH
    case fcvtWH, fcvtWUH, fcvtLH, fcvtLUH, fcvtHW, fcvtHWU, fcvtHL, fcvtHLU, fmvXH, fmvHX
    case fcvtSH, fcvtHS, fcvtDH, fcvtHD
}

/// One pre-decoded instruction.
///
/// `rd` of an integer destination is 32 (a scratch slot) when the instruction names x0, so the
/// executor writes unconditionally and x0 stays zero. `pcOffset` is the instruction's offset in
/// its translation block, so the block can be shared by every virtual alias of its physical page.
struct Op {
    var kind: OpKind = .illegal
    var rd: UInt8 = 0
    var rs1: UInt8 = 0
    var rs2: UInt8 = 0
    var rs3: UInt8 = 0
    var rm: UInt8 = 0
    /// Instruction length in bytes: 2 (compressed) or 4.
    var length: UInt8 = 4
    var pcOffset: UInt16 = 0
    var imm: Int64 = 0
    /// The original instruction bits (for `mtval` on an illegal instruction and for CSR numbers).
    var raw: UInt32 = 0

    /// True when the op ends a translation block (control flow or a change of machine state).
    var endsBlock: Bool {
        switch kind {
        case .jal, .jalr, .beq, .bne, .blt, .bge, .bltu, .bgeu,
             .illegal, .fenceI, .ecall, .ebreak, .mret, .sret, .wfi, .sfenceVma, .sfenceInval,
             .csrrw, .csrrs, .csrrc, .csrrwi, .csrrsi, .csrrci:
            return true
        default:
            return false
        }
    }
}
