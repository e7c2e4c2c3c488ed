/// IEEE 754 binary16 arithmetic for Zfh/Zfhmin, in integers only.
///
/// Every operation computes its exact result (or the exact result's leading bits and whether
/// anything nonzero lies below them) in integers and rounds once (`round`), so results and
/// flags are those of the spec in every rounding mode, independent of the host FPU: the host
/// rounding mode and sticky flags are neither read nor disturbed. Flags are RISC-V `fflags`
/// bits; tininess is detected after rounding, as RISC-V specifies; NaN results are the
/// canonical NaN (0x7e00). Pure functions, callable from any thread.
enum SoftHalf {
    static let canonicalNaN: UInt16 = 0x7e00
    static let nx: UInt64 = 1, uf: UInt64 = 2, of: UInt64 = 4, dz: UInt64 = 8, nv: UInt64 = 16

    /// A result: the binary16 bit pattern and the exception flags raised.
    struct Result: Equatable {
        var bits: UInt16
        var flags: UInt64 = 0
    }

    /// What a binary16 datum is, with its value as `m * 2^e` for finite nonzero ones.
    struct Unpacked {
        enum Class { case zero, finite, infinity, quietNaN, signalingNaN }
        var sign: Bool
        var cls: Class
        var m: UInt64 = 0
        var e: Int = 0
        var isNaN: Bool { cls == .quietNaN || cls == .signalingNaN }
    }

    static func unpack(_ h: UInt16) -> Unpacked {
        let sign = h & 0x8000 != 0
        let exp = Int((h >> 10) & 0x1f)
        let frac = UInt64(h & 0x3ff)
        switch exp {
        case 0x1f:
            if frac == 0 { return Unpacked(sign: sign, cls: .infinity) }
            return Unpacked(sign: sign, cls: frac & 0x200 != 0 ? .quietNaN : .signalingNaN)
        case 0:
            if frac == 0 { return Unpacked(sign: sign, cls: .zero) }
            return Unpacked(sign: sign, cls: .finite, m: frac, e: -24)
        default:
            return Unpacked(sign: sign, cls: .finite, m: frac | 0x400, e: exp - 25)
        }
    }

    @inline(__always) static func signed(_ bits: UInt16, _ sign: Bool) -> UInt16 { sign ? bits | 0x8000 : bits }

    /// Rounds `sign * (mag + s) * 2^exp` to binary16 under RISC-V rounding mode `rm` (0 RNE,
    /// 1 RTZ, 2 RDN, 3 RUP, 4 RMM), where `s` is 0 when `sticky` is false and strictly between
    /// 0 and 1 when it is true. With `sticky`, `mag` must have at least 14 significant bits so
    /// that the unknown part lies below the rounding position.
    static func round(sign: Bool, mag: UInt64, exp: Int, sticky: Bool, rm: UInt64) -> Result {
        if mag == 0 {
            // Only an exact zero reaches here without sticky bits.
            return Result(bits: signed(0, sign), flags: sticky ? nx | uf : 0)
        }
        let n = 64 - mag.leadingZeroBitCount
        precondition(!sticky || n >= 14, "sticky rounding needs at least 14 significant bits")
        let e = exp + n - 1                       // value in [2^e, 2^(e+1))
        let qe = max(e, -14) - 10                 // exponent of the last kept bit

        /// Rounds to a multiple of 2^quantum: the kept integer and whether it is inexact.
        func roundAt(_ quantum: Int) -> (kept: UInt64, inexact: Bool) {
            let shift = quantum - exp
            if shift <= 0 { return (mag << UInt64(-shift), sticky) }   // shift <= 0 only without sticky
            let kept: UInt64, rem: UInt64, half: UInt64
            if shift >= 65 {
                kept = 0; rem = 1; half = 2               // below half a quantum, nonzero
            } else if shift == 64 {
                kept = 0; rem = mag; half = 1 << 63
            } else {
                kept = mag >> UInt64(shift); rem = mag & ((1 << UInt64(shift)) - 1); half = 1 << UInt64(shift - 1)
            }
            let inexact = rem != 0 || sticky
            let aboveHalf = rem > half || (rem == half && sticky)
            let atHalf = rem == half && !sticky
            let up: Bool
            switch rm {
            case 1: up = false
            case 2: up = inexact && sign
            case 3: up = inexact && !sign
            case 4: up = aboveHalf || atHalf
            default: up = aboveHalf || (atHalf && kept & 1 == 1)
            }
            return (up ? kept + 1 : kept, inexact)
        }

        var (kept, inexact) = roundAt(qe)
        var flags: UInt64 = inexact ? nx : 0
        if e < -14 {
            // Subnormal range: kept counts units of 2^-24 (1024 of them is the smallest normal,
            // whose encoding is the same number). Tiny unless rounding with an unbounded
            // exponent range reaches 2^-14.
            let tiny = e < -15 || roundAt(e - 10).kept < 2048
            if tiny && inexact { flags |= uf }
            return Result(bits: signed(UInt16(kept), sign), flags: flags)
        }
        var exponent = e
        if kept == 2048 { kept = 1024; exponent += 1 }
        if exponent > 15 {
            flags |= of | nx
            let toMax: Bool
            switch rm {
            case 1: toMax = true
            case 2: toMax = !sign
            case 3: toMax = sign
            default: toMax = false
            }
            return Result(bits: signed(toMax ? 0x7bff : 0x7c00, sign), flags: flags)
        }
        return Result(bits: signed(UInt16(exponent + 15) << 10 | UInt16(kept & 0x3ff), sign), flags: flags)
    }

    /// The result of an operation with a NaN operand: canonical NaN, NV if any is signaling.
    private static func nanResult(_ ops: Unpacked...) -> Result {
        Result(bits: canonicalNaN, flags: ops.contains { $0.cls == .signalingNaN } ? nv : 0)
    }

    /// The sign of an exact zero sum of operands that are not both zero of one sign.
    @inline(__always) private static func zeroSumSign(_ rm: UInt64) -> Bool { rm == 2 }

    // MARK: Arithmetic

    /// a + b (or a - b with `subtract`).
    static func add(_ ha: UInt16, _ hb: UInt16, subtract: Bool, rm: UInt64) -> Result {
        let a = unpack(ha)
        var b = unpack(hb)
        if a.isNaN || b.isNaN { return nanResult(a, b) }
        if subtract { b.sign.toggle() }
        if a.cls == .infinity || b.cls == .infinity {
            if a.cls == .infinity && b.cls == .infinity && a.sign != b.sign { return Result(bits: canonicalNaN, flags: nv) }
            return Result(bits: signed(0x7c00, a.cls == .infinity ? a.sign : b.sign))
        }
        if a.cls == .zero && b.cls == .zero {
            return Result(bits: signed(0, a.sign == b.sign ? a.sign : zeroSumSign(rm)))
        }
        // Both are multiples of 2^-24 below 2^16: exact as integers.
        let x = a.cls == .zero ? 0 : Int64(a.m << UInt64(a.e + 24))
        let y = b.cls == .zero ? 0 : Int64(b.m << UInt64(b.e + 24))
        let s = (a.sign ? -x : x) + (b.sign ? -y : y)
        if s == 0 { return Result(bits: signed(0, zeroSumSign(rm))) }
        return round(sign: s < 0, mag: s.magnitude, exp: -24, sticky: false, rm: rm)
    }

    /// a * b.
    static func mul(_ ha: UInt16, _ hb: UInt16, rm: UInt64) -> Result {
        let a = unpack(ha), b = unpack(hb)
        if a.isNaN || b.isNaN { return nanResult(a, b) }
        let sign = a.sign != b.sign
        if a.cls == .infinity || b.cls == .infinity {
            if a.cls == .zero || b.cls == .zero { return Result(bits: canonicalNaN, flags: nv) }
            return Result(bits: signed(0x7c00, sign))
        }
        if a.cls == .zero || b.cls == .zero { return Result(bits: signed(0, sign)) }
        return round(sign: sign, mag: a.m * b.m, exp: a.e + b.e, sticky: false, rm: rm)
    }

    /// The significand of a finite nonzero value scaled into [2^10, 2^11), with its exponent.
    @inline(__always) private static func normalized(_ u: Unpacked) -> (UInt64, Int) {
        let s = u.m.leadingZeroBitCount - 53
        return (u.m << UInt64(s), u.e - s)
    }

    /// a / b.
    static func div(_ ha: UInt16, _ hb: UInt16, rm: UInt64) -> Result {
        let a = unpack(ha), b = unpack(hb)
        if a.isNaN || b.isNaN { return nanResult(a, b) }
        let sign = a.sign != b.sign
        if a.cls == .infinity {
            if b.cls == .infinity { return Result(bits: canonicalNaN, flags: nv) }
            return Result(bits: signed(0x7c00, sign))
        }
        if b.cls == .infinity { return Result(bits: signed(0, sign)) }
        if b.cls == .zero {
            if a.cls == .zero { return Result(bits: canonicalNaN, flags: nv) }
            return Result(bits: signed(0x7c00, sign), flags: dz)
        }
        if a.cls == .zero { return Result(bits: signed(0, sign)) }
        let (ma, ea) = normalized(a), (mb, eb) = normalized(b)
        let n = ma << 40                          // quotient in (2^39, 2^41)
        let q = n / mb
        return round(sign: sign, mag: q, exp: ea - eb - 40, sticky: n % mb != 0, rm: rm)
    }

    /// The integer square root of `n` and whether it is exact.
    private static func isqrt(_ n: UInt64) -> (UInt64, Bool) {
        var rem = n, root: UInt64 = 0
        var bit: UInt64 = 1 << 62
        while bit > n { bit >>= 2 }
        while bit != 0 {
            if rem >= root + bit {
                rem -= root + bit
                root = (root >> 1) + bit
            } else {
                root >>= 1
            }
            bit >>= 2
        }
        return (root, rem == 0)
    }

    /// √a.
    static func sqrt(_ ha: UInt16, rm: UInt64) -> Result {
        let a = unpack(ha)
        if a.isNaN { return nanResult(a) }
        if a.cls == .zero { return Result(bits: ha) }
        if a.sign { return Result(bits: canonicalNaN, flags: nv) }
        if a.cls == .infinity { return Result(bits: ha) }
        var (m, e) = normalized(a)
        if e & 1 != 0 { m <<= 1; e -= 1 }
        let (root, exact) = isqrt(m << 48)        // root in [2^29, 2^31)
        return round(sign: false, mag: root, exp: (e - 48) / 2, sticky: !exact, rm: rm)
    }

    /// (a * b) negated when `negateProduct`, plus c negated when `negateAddend`, rounded once:
    /// fmadd (false, false), fmsub (false, true), fnmsub (true, false), fnmadd (true, true).
    static func fma(_ ha: UInt16, _ hb: UInt16, _ hc: UInt16, negateProduct: Bool, negateAddend: Bool, rm: UInt64) -> Result {
        let a = unpack(ha), b = unpack(hb)
        var c = unpack(hc)
        // ∞ × 0 is invalid even when the addend is a quiet NaN.
        let infTimesZero = (a.cls == .infinity && b.cls == .zero) || (a.cls == .zero && b.cls == .infinity)
        if a.isNaN || b.isNaN || c.isNaN {
            var r = nanResult(a, b, c)
            if infTimesZero { r.flags |= nv }
            return r
        }
        if infTimesZero { return Result(bits: canonicalNaN, flags: nv) }
        let ps = (a.sign != b.sign) != negateProduct
        if negateAddend { c.sign.toggle() }
        if a.cls == .infinity || b.cls == .infinity {
            if c.cls == .infinity && c.sign != ps { return Result(bits: canonicalNaN, flags: nv) }
            return Result(bits: signed(0x7c00, ps))
        }
        if c.cls == .infinity { return Result(bits: signed(0x7c00, c.sign)) }
        let productZero = a.cls == .zero || b.cls == .zero
        if productZero && c.cls == .zero {
            return Result(bits: signed(0, ps == c.sign ? ps : zeroSumSign(rm)))
        }
        if productZero { return Result(bits: signed(hc & 0x7fff, c.sign)) }
        let pm = a.m * b.m, pe = a.e + b.e       // below 2^22, exponent in [-48, 10]
        if c.cls == .zero { return round(sign: ps, mag: pm, exp: pe, sticky: false, rm: rm) }
        // Align at the smaller exponent: at most 53 bits of shift keep both below 2^64.
        let lo = min(pe, c.e)
        let x = pm << UInt64(pe - lo), y = c.m << UInt64(c.e - lo)
        if ps == c.sign { return round(sign: ps, mag: x + y, exp: lo, sticky: false, rm: rm) }
        if x == y { return Result(bits: signed(0, zeroSumSign(rm))) }
        return x > y ? round(sign: ps, mag: x - y, exp: lo, sticky: false, rm: rm)
                     : round(sign: c.sign, mag: y - x, exp: lo, sticky: false, rm: rm)
    }

    // MARK: Comparisons, min/max, classification

    /// An integer that orders non-NaN values as their values (both zeros are 0).
    @inline(__always) private static func key(_ h: UInt16) -> Int {
        h & 0x8000 != 0 ? -Int(h & 0x7fff) : Int(h)
    }

    /// fmin.h / fmax.h: -0 is below +0; one NaN operand gives the other; NV for a signaling NaN.
    static func minMax(_ ha: UInt16, _ hb: UInt16, max: Bool) -> Result {
        let a = unpack(ha), b = unpack(hb)
        let flags = (a.cls == .signalingNaN || b.cls == .signalingNaN) ? nv : 0
        if a.isNaN && b.isNaN { return Result(bits: canonicalNaN, flags: flags) }
        if a.isNaN { return Result(bits: hb, flags: flags) }
        if b.isNaN { return Result(bits: ha, flags: flags) }
        let ka = key(ha), kb = key(hb)
        let pick: UInt16
        if ka == kb {
            // Equal values differ at most in the sign of zero.
            pick = (ha & 0x8000 != 0) != max ? ha : hb
        } else {
            pick = (ka < kb) != max ? ha : hb
        }
        return Result(bits: pick, flags: flags)
    }

    /// feq.h (kind 0, quiet), flt.h (1) and fle.h (2, signalling): the answer and the flags.
    static func compare(_ ha: UInt16, _ hb: UInt16, kind: Int) -> (Bool, UInt64) {
        let a = unpack(ha), b = unpack(hb)
        if a.isNaN || b.isNaN {
            let signaling = a.cls == .signalingNaN || b.cls == .signalingNaN
            return (false, kind != 0 || signaling ? nv : 0)
        }
        let ka = key(ha), kb = key(hb)
        switch kind {
        case 0: return (ka == kb, 0)
        case 1: return (ka < kb, 0)
        default: return (ka <= kb, 0)
        }
    }

    /// fclass.h: one bit of the ten classes.
    static func classify(_ h: UInt16) -> UInt64 {
        let u = unpack(h)
        switch u.cls {
        case .infinity: return u.sign ? 1 << 0 : 1 << 7
        case .zero: return u.sign ? 1 << 3 : 1 << 4
        case .signalingNaN: return 1 << 8
        case .quietNaN: return 1 << 9
        case .finite:
            let subnormal = h & 0x7c00 == 0
            return u.sign ? (subnormal ? 1 << 2 : 1 << 1) : (subnormal ? 1 << 5 : 1 << 6)
        }
    }

    // MARK: Conversions

    /// binary16 to binary32, exact: the bit pattern and the flags (NV for a signaling NaN).
    static func toSingle(_ h: UInt16) -> (UInt32, UInt64) {
        let u = unpack(h)
        let sign: UInt32 = u.sign ? 0x8000_0000 : 0
        switch u.cls {
        case .signalingNaN: return (0x7fc0_0000, nv)
        case .quietNaN: return (0x7fc0_0000, 0)
        case .infinity: return (sign | 0x7f80_0000, 0)
        case .zero: return (sign, 0)
        case .finite:
            let (m, e) = normalized(u)               // m in [2^10, 2^11): value m * 2^e
            return (sign | UInt32(e + 10 + 127) << 23 | UInt32((m << 13) & 0x7f_ffff), 0)
        }
    }

    /// binary16 to binary64, exact: the bit pattern and the flags (NV for a signaling NaN).
    static func toDouble(_ h: UInt16) -> (UInt64, UInt64) {
        let u = unpack(h)
        let sign: UInt64 = u.sign ? 1 << 63 : 0
        switch u.cls {
        case .signalingNaN: return (0x7ff8_0000_0000_0000, nv)
        case .quietNaN: return (0x7ff8_0000_0000_0000, 0)
        case .infinity: return (sign | 0x7ff0_0000_0000_0000, 0)
        case .zero: return (sign, 0)
        case .finite:
            let (m, e) = normalized(u)
            return (sign | UInt64(e + 10 + 1023) << 52 | ((m << 42) & 0xf_ffff_ffff_ffff), 0)
        }
    }

    /// binary32 (bit pattern) to binary16, rounded under `rm`.
    static func fromSingle(_ f: UInt32, rm: UInt64) -> Result {
        let sign = f >> 31 != 0
        let exp = Int((f >> 23) & 0xff)
        let frac = UInt64(f & 0x7f_ffff)
        if exp == 0xff {
            if frac == 0 { return Result(bits: signed(0x7c00, sign)) }
            return Result(bits: canonicalNaN, flags: frac & 0x40_0000 == 0 ? nv : 0)
        }
        if exp == 0 {
            if frac == 0 { return Result(bits: signed(0, sign)) }
            return round(sign: sign, mag: frac, exp: -149, sticky: false, rm: rm)
        }
        return round(sign: sign, mag: frac | 0x80_0000, exp: exp - 150, sticky: false, rm: rm)
    }

    /// binary64 (bit pattern) to binary16, rounded under `rm`.
    static func fromDouble(_ d: UInt64, rm: UInt64) -> Result {
        let sign = d >> 63 != 0
        let exp = Int((d >> 52) & 0x7ff)
        let frac = d & 0xf_ffff_ffff_ffff
        if exp == 0x7ff {
            if frac == 0 { return Result(bits: signed(0x7c00, sign)) }
            return Result(bits: canonicalNaN, flags: frac & (1 << 51) == 0 ? nv : 0)
        }
        if exp == 0 {
            if frac == 0 { return Result(bits: signed(0, sign)) }
            return round(sign: sign, mag: frac, exp: -1074, sticky: false, rm: rm)
        }
        return round(sign: sign, mag: frac | (1 << 52), exp: exp - 1075, sticky: false, rm: rm)
    }

    /// A signed (`signed`) or unsigned 64-bit integer to binary16, rounded under `rm`.
    static func fromInteger(_ v: UInt64, signed isSigned: Bool, rm: UInt64) -> Result {
        let negative = isSigned && Int64(bitPattern: v) < 0
        let mag = negative ? Int64(bitPattern: v).magnitude : v
        if mag == 0 { return Result(bits: 0) }
        return round(sign: negative, mag: mag, exp: 0, sticky: false, rm: rm)
    }
}

/// Zfh and Zfhmin on the hart: the registers' NaN-boxing and the ops, computed by `SoftHalf`
/// (so the host FPU's rounding mode and sticky flags are not involved). Shared by both
/// engines: the interpreter calls `executeHalf` from `executeFP`, the JIT's FP helper likewise,
/// and both run flh/fsh through `executeHalfMemory` (the JIT through its FP helper).
extension Hart {
    /// A half in an f register is NaN-boxed (bits 63:16 all ones); any other value reads as
    /// the canonical NaN.
    @inline(__always) func readH(_ i: UInt8) -> UInt16 {
        let v = f[Int(i)]
        return v >> 16 == 0xffff_ffff_ffff ? UInt16(truncatingIfNeeded: v) : SoftHalf.canonicalNaN
    }

    @inline(__always) func writeH(_ i: UInt8, _ bits: UInt16) {
        f[Int(i)] = 0xffff_ffff_ffff_0000 | UInt64(bits)
    }

    /// The bit pattern of a NaN-boxed single (the canonical NaN when not boxed).
    @inline(__always) func readSBits(_ i: UInt8) -> UInt32 {
        let v = f[Int(i)]
        return v >> 32 == 0xffff_ffff ? UInt32(truncatingIfNeeded: v) : Self.canonicalNaN32
    }

    /// flh and fsh (the FPU must be on). Returns `JITStatus.next`, `.trapped` (the trap was
    /// taken, the op did not retire) or `.leave` (fsh overwrote translated code: the op retired
    /// and `pcValue` is the next PC).
    func executeHalfMemory(_ o: Op, pc: UInt64) -> Int64 {
        if !fpEnabled {
            raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
            trapped = false
            return JITStatus.trapped
        }
        let va = x[Int(o.rs1)] &+ UInt64(bitPattern: o.imm)
        if o.kind == .flh {
            let v = loadSlow(va, size: 2, pc: pc)
            if trapped {
                trapped = false
                return JITStatus.trapped
            }
            writeH(o.rd, UInt16(truncatingIfNeeded: v))
            markFPDirty()
            return JITStatus.next
        }
        storeSlow(va, size: 2, value: f[Int(o.rs2)] & 0xffff, pc: pc)
        if trapped {
            trapped = false
            return JITStatus.trapped
        }
        if blockInvalidated {
            blockInvalidated = false
            pcValue = pc &+ UInt64(o.length)
            return JITStatus.leave
        }
        return JITStatus.next
    }

    /// Executes a Zfh/Zfhmin op other than flh/fsh. Returns false for a reserved rounding mode
    /// (illegal instruction).
    func executeHalf(_ o: Op) -> Bool {
        var rm = UInt64(o.rm)
        if rm == 7 { rm = frm }
        switch o.kind {
        case .fsgnjH, .fsgnjnH, .fsgnjxH, .fminH, .fmaxH, .feqH, .fltH, .fleH, .fclassH, .fmvXH, .fmvHX,
             .fcvtSH, .fcvtDH:
            break  // exact: no rounding mode (QEMU 7.2 does not check a dynamic one here either)
        default:
            if rm > 4 { return false }
        }
        let rd = o.rd
        var r = SoftHalf.Result(bits: 0)
        var writesH = true
        switch o.kind {
        case .faddH, .fsubH: r = SoftHalf.add(readH(o.rs1), readH(o.rs2), subtract: o.kind == .fsubH, rm: rm)
        case .fmulH: r = SoftHalf.mul(readH(o.rs1), readH(o.rs2), rm: rm)
        case .fdivH: r = SoftHalf.div(readH(o.rs1), readH(o.rs2), rm: rm)
        case .fsqrtH: r = SoftHalf.sqrt(readH(o.rs1), rm: rm)
        case .fmaddH, .fmsubH, .fnmsubH, .fnmaddH:
            r = SoftHalf.fma(readH(o.rs1), readH(o.rs2), readH(o.rs3),
                             negateProduct: o.kind == .fnmsubH || o.kind == .fnmaddH,
                             negateAddend: o.kind == .fmsubH || o.kind == .fnmaddH, rm: rm)
        case .fsgnjH, .fsgnjnH, .fsgnjxH:
            let a = readH(o.rs1), b = readH(o.rs2)
            let sign: UInt16
            switch o.kind {
            case .fsgnjH: sign = b & 0x8000
            case .fsgnjnH: sign = ~b & 0x8000
            default: sign = (a ^ b) & 0x8000
            }
            r.bits = (a & 0x7fff) | sign
        case .fminH, .fmaxH: r = SoftHalf.minMax(readH(o.rs1), readH(o.rs2), max: o.kind == .fmaxH)
        case .fcvtHS: r = SoftHalf.fromSingle(readSBits(o.rs1), rm: rm)
        case .fcvtHD: r = SoftHalf.fromDouble(f[Int(o.rs1)], rm: rm)
        case .fcvtHW: r = SoftHalf.fromInteger(sx32(UInt32(truncatingIfNeeded: x[Int(o.rs1)])), signed: true, rm: rm)
        case .fcvtHWU: r = SoftHalf.fromInteger(UInt64(UInt32(truncatingIfNeeded: x[Int(o.rs1)])), signed: false, rm: rm)
        case .fcvtHL: r = SoftHalf.fromInteger(x[Int(o.rs1)], signed: true, rm: rm)
        case .fcvtHLU: r = SoftHalf.fromInteger(x[Int(o.rs1)], signed: false, rm: rm)
        case .fmvHX: r.bits = UInt16(truncatingIfNeeded: x[Int(o.rs1)])
        default:
            writesH = false
            switch o.kind {
            case .feqH, .fltH, .fleH:
                let (answer, flags) = SoftHalf.compare(readH(o.rs1), readH(o.rs2), kind: o.kind == .feqH ? 0 : o.kind == .fltH ? 1 : 2)
                x[Int(rd)] = answer ? 1 : 0
                fflags |= flags
            case .fclassH: x[Int(rd)] = SoftHalf.classify(readH(o.rs1))
            case .fmvXH: x[Int(rd)] = UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: f[Int(o.rs1)])))
            case .fcvtSH:
                let (bits, flags) = SoftHalf.toSingle(readH(o.rs1))
                writeSRaw(rd, bits)
                fflags |= flags
            case .fcvtDH:
                let (bits, flags) = SoftHalf.toDouble(readH(o.rs1))
                f[Int(rd)] = bits
                fflags |= flags
            case .fcvtWH, .fcvtWUH, .fcvtLH, .fcvtLUH:
                // Every half is exact as a double; the double conversions round and saturate.
                let v = Double(bitPattern: SoftHalf.toDouble(readH(o.rs1)).0)
                switch o.kind {
                case .fcvtWH: x[Int(rd)] = toInt(v, rm: rm, lo: -2147483648, hi: 2147483647, signExtend32: true)
                case .fcvtWUH: x[Int(rd)] = toUInt(v, rm: rm, hi: 4294967295, signExtend32: true)
                case .fcvtLH: x[Int(rd)] = toInt(v, rm: rm, lo: -9223372036854775808, hi: 9223372036854775808.0, signExtend32: false)
                default: x[Int(rd)] = toUInt(v, rm: rm, hi: 18446744073709551616.0, signExtend32: false)
                }
            default:
                return false
            }
        }
        if writesH {
            writeH(rd, r.bits)
            fflags |= r.flags
        }
        markFPDirty()
        return true
    }
}
