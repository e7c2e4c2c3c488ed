#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// F and D arithmetic on the host FPU.
///
/// Rounding: the host rounding mode is switched only when an instruction's effective mode
/// differs from the one programmed (almost never: code uses round-to-nearest-even). RMM, which
/// hosts lack, is done by computing the exact error of the nearest-even result and moving one
/// ulp away from zero on a tie. Operands are always loaded from the register file after the
/// mode switch and results stored before any later call, so the compiler cannot move the
/// arithmetic across `fesetround`.
///
/// Flags: the host's sticky exception flags accumulate the guest's `fflags` lazily; they are
/// folded into `fflags` when the guest reads them. Any host floating-point work the emulator
/// itself does on the vCPU thread (device callbacks, clock reads) is bracketed by
/// `saveHostFlags`/`restoreHostFlags` so it cannot leak into the guest's flags.
extension Hart {
    // <fenv.h> values; Swift sees the C macros and enumerators as ambiguous, so they are
    // spelled out per host architecture.
    #if arch(x86_64)
    static let hostInvalid: Int32 = 0x01, hostDivByZero: Int32 = 0x04, hostOverflow: Int32 = 0x08
    static let hostUnderflow: Int32 = 0x10, hostInexact: Int32 = 0x20
    static let hostToNearest: Int32 = 0, hostDownward: Int32 = 0x400, hostUpward: Int32 = 0x800
    static let hostTowardZero: Int32 = 0xc00
    #else
    static let hostInvalid: Int32 = 0x01, hostDivByZero: Int32 = 0x02, hostOverflow: Int32 = 0x04
    static let hostUnderflow: Int32 = 0x08, hostInexact: Int32 = 0x10
    static let hostToNearest: Int32 = 0, hostUpward: Int32 = 0x40_0000, hostDownward: Int32 = 0x80_0000
    static let hostTowardZero: Int32 = 0xc0_0000
    #endif
    static let hostAll = hostInvalid | hostDivByZero | hostOverflow | hostUnderflow | hostInexact

    static let flagNX: UInt64 = 1, flagUF: UInt64 = 2, flagOF: UInt64 = 4, flagDZ: UInt64 = 8, flagNV: UInt64 = 16

    static let canonicalNaN32: UInt32 = 0x7fc0_0000
    static let canonicalNaN64: UInt64 = 0x7ff8_0000_0000_0000

    func saveHostFlags() -> Int32 { fetestexcept(Self.hostAll) }

    func restoreHostFlags(_ saved: Int32) {
        feclearexcept(Self.hostAll)
        if saved != 0 { feraiseexcept(saved) }
    }

    func clearHostFlags() { feclearexcept(Self.hostAll) }

    /// Folds the host's sticky flags into `fflags`.
    func syncFlags() {
        let h = fetestexcept(Self.hostAll)
        if h == 0 { return }
        var v: UInt64 = 0
        if h & Self.hostInvalid != 0 { v |= Self.flagNV }
        if h & Self.hostDivByZero != 0 { v |= Self.flagDZ }
        if h & Self.hostOverflow != 0 { v |= Self.flagOF }
        if h & Self.hostUnderflow != 0 { v |= Self.flagUF }
        if h & Self.hostInexact != 0 { v |= Self.flagNX }
        fflags |= v
        feclearexcept(Self.hostAll)
    }

    func setHostRounding(_ rm: UInt64) {
        let mode: Int32
        switch rm {
        case 1: mode = Self.hostTowardZero
        case 2: mode = Self.hostDownward
        case 3: mode = Self.hostUpward
        default: mode = Self.hostToNearest
        }
        fesetround(mode)
        hostRoundingMode = rm == 4 ? 0 : rm
    }

    // MARK: Register access

    @inline(__always) func readS(_ i: UInt8) -> Float {
        let v = f[Int(i)]
        return v >> 32 == 0xffff_ffff ? Float(bitPattern: UInt32(truncatingIfNeeded: v)) : Float(bitPattern: Self.canonicalNaN32)
    }

    @inline(__always) func writeS(_ i: UInt8, _ v: Float) {
        let bits = v.isNaN ? Self.canonicalNaN32 : v.bitPattern
        f[Int(i)] = 0xffff_ffff_0000_0000 | UInt64(bits)
    }

    @inline(__always) func writeSRaw(_ i: UInt8, _ bits: UInt32) {
        f[Int(i)] = 0xffff_ffff_0000_0000 | UInt64(bits)
    }

    @inline(__always) func readD(_ i: UInt8) -> Double { Double(bitPattern: f[Int(i)]) }

    @inline(__always) func writeD(_ i: UInt8, _ v: Double) {
        f[Int(i)] = v.isNaN ? Self.canonicalNaN64 : v.bitPattern
    }

    // MARK: Execution

    /// Executes an F/D arithmetic op. Returns false for an invalid rounding mode (illegal).
    func executeFP(_ o: Op) -> Bool {
        if o.kind.isHalf { return executeHalf(o) }
        var rm = UInt64(o.rm)
        if rm == 7 { rm = frm }
        let usesRM: Bool
        switch o.kind {
        case .fsgnjS, .fsgnjnS, .fsgnjxS, .fminS, .fmaxS, .feqS, .fltS, .fleS, .fclassS, .fmvXW, .fmvWX,
             .fsgnjD, .fsgnjnD, .fsgnjxD, .fminD, .fmaxD, .feqD, .fltD, .fleD, .fclassD, .fmvXD, .fmvDX,
             .fcvtDS, .fcvtDW, .fcvtDWU:
            usesRM = false
        default:
            usesRM = true
        }
        if usesRM {
            if rm > 4 { return false }
            let hostRM = rm == 4 ? 0 : rm
            if hostRM != hostRoundingMode { setHostRounding(hostRM) }
        }
        let rd = o.rd
        switch o.kind {
        // Single precision arithmetic
        case .faddS, .fsubS, .fmulS, .fdivS:
            if rm == 4 { writeS(rd, roundAwaySingle(o)); break }
            let a = readS(o.rs1), b = readS(o.rs2)
            switch o.kind {
            case .faddS: writeS(rd, a + b)
            case .fsubS: writeS(rd, a - b)
            case .fmulS: writeS(rd, a * b)
            default: writeS(rd, a / b)
            }
        case .fsqrtS: writeS(rd, readS(o.rs1).squareRoot())
        case .fmaddS: writeS(rd, readS(o.rs3).addingProduct(readS(o.rs1), readS(o.rs2)))
        case .fmsubS: writeS(rd, (-readS(o.rs3)).addingProduct(readS(o.rs1), readS(o.rs2)))
        case .fnmsubS: writeS(rd, readS(o.rs3).addingProduct(-readS(o.rs1), readS(o.rs2)))
        case .fnmaddS: writeS(rd, (-readS(o.rs3)).addingProduct(-readS(o.rs1), readS(o.rs2)))
        case .fsgnjS, .fsgnjnS, .fsgnjxS:
            let a = readS(o.rs1).bitPattern, b = readS(o.rs2).bitPattern
            let sign: UInt32
            switch o.kind {
            case .fsgnjS: sign = b & 0x8000_0000
            case .fsgnjnS: sign = ~b & 0x8000_0000
            default: sign = (a ^ b) & 0x8000_0000
            }
            writeSRaw(rd, (a & 0x7fff_ffff) | sign)
        case .fminS, .fmaxS:
            let a = readS(o.rs1), b = readS(o.rs2)
            if a.isSignalingNaN || b.isSignalingNaN { fflags |= Self.flagNV }
            writeS(rd, minMax(a, b, max: o.kind == .fmaxS))
        case .feqS, .fltS, .fleS:
            let a = readS(o.rs1), b = readS(o.rs2)
            x[Int(rd)] = compare(a, b, o.kind == .feqS ? 0 : o.kind == .fltS ? 1 : 2)
        case .fclassS: x[Int(rd)] = classify(readS(o.rs1))
        case .fmvXW: x[Int(rd)] = sx32(UInt32(truncatingIfNeeded: f[Int(o.rs1)]))
        case .fmvWX: writeSRaw(rd, UInt32(truncatingIfNeeded: x[Int(o.rs1)]))
        case .fcvtWS: x[Int(rd)] = toInt(Double(readS(o.rs1)), rm: rm, lo: -2147483648, hi: 2147483647, signExtend32: true)
        case .fcvtWUS: x[Int(rd)] = toUInt(Double(readS(o.rs1)), rm: rm, hi: 4294967295, signExtend32: true)
        case .fcvtLS: x[Int(rd)] = toInt(Double(readS(o.rs1)), rm: rm, lo: -9223372036854775808, hi: 9223372036854775808.0, signExtend32: false)
        case .fcvtLUS: x[Int(rd)] = toUInt(Double(readS(o.rs1)), rm: rm, hi: 18446744073709551616.0, signExtend32: false)
        case .fcvtSW: writeS(rd, Float(Int32(truncatingIfNeeded: x[Int(o.rs1)])))
        case .fcvtSWU: writeS(rd, Float(Int64(UInt32(truncatingIfNeeded: x[Int(o.rs1)]))))
        case .fcvtSL: writeS(rd, Float(Int64(bitPattern: x[Int(o.rs1)])))
        case .fcvtSLU: writeS(rd, floatFromUInt64(x[Int(o.rs1)]))

        // Double precision arithmetic
        case .faddD, .fsubD, .fmulD, .fdivD:
            if rm == 4 { writeD(rd, roundAwayDouble(o)); break }
            let a = readD(o.rs1), b = readD(o.rs2)
            switch o.kind {
            case .faddD: writeD(rd, a + b)
            case .fsubD: writeD(rd, a - b)
            case .fmulD: writeD(rd, a * b)
            default: writeD(rd, a / b)
            }
        case .fsqrtD: writeD(rd, readD(o.rs1).squareRoot())
        case .fmaddD: writeD(rd, readD(o.rs3).addingProduct(readD(o.rs1), readD(o.rs2)))
        case .fmsubD: writeD(rd, (-readD(o.rs3)).addingProduct(readD(o.rs1), readD(o.rs2)))
        case .fnmsubD: writeD(rd, readD(o.rs3).addingProduct(-readD(o.rs1), readD(o.rs2)))
        case .fnmaddD: writeD(rd, (-readD(o.rs3)).addingProduct(-readD(o.rs1), readD(o.rs2)))
        case .fsgnjD, .fsgnjnD, .fsgnjxD:
            let a = f[Int(o.rs1)], b = f[Int(o.rs2)]
            let sign: UInt64
            switch o.kind {
            case .fsgnjD: sign = b & (1 << 63)
            case .fsgnjnD: sign = ~b & (1 << 63)
            default: sign = (a ^ b) & (1 << 63)
            }
            f[Int(rd)] = (a & ~(1 << 63)) | sign
        case .fminD, .fmaxD:
            let a = readD(o.rs1), b = readD(o.rs2)
            if a.isSignalingNaN || b.isSignalingNaN { fflags |= Self.flagNV }
            writeD(rd, minMax(a, b, max: o.kind == .fmaxD))
        case .feqD, .fltD, .fleD:
            let a = readD(o.rs1), b = readD(o.rs2)
            x[Int(rd)] = compare(a, b, o.kind == .feqD ? 0 : o.kind == .fltD ? 1 : 2)
        case .fclassD: x[Int(rd)] = classify(readD(o.rs1))
        case .fmvXD: x[Int(rd)] = f[Int(o.rs1)]
        case .fmvDX: f[Int(rd)] = x[Int(o.rs1)]
        case .fcvtWD: x[Int(rd)] = toInt(readD(o.rs1), rm: rm, lo: -2147483648, hi: 2147483647, signExtend32: true)
        case .fcvtWUD: x[Int(rd)] = toUInt(readD(o.rs1), rm: rm, hi: 4294967295, signExtend32: true)
        case .fcvtLD: x[Int(rd)] = toInt(readD(o.rs1), rm: rm, lo: -9223372036854775808, hi: 9223372036854775808.0, signExtend32: false)
        case .fcvtLUD: x[Int(rd)] = toUInt(readD(o.rs1), rm: rm, hi: 18446744073709551616.0, signExtend32: false)
        case .fcvtDW: writeD(rd, Double(Int32(truncatingIfNeeded: x[Int(o.rs1)])))
        case .fcvtDWU: writeD(rd, Double(UInt32(truncatingIfNeeded: x[Int(o.rs1)])))
        case .fcvtDL: writeD(rd, Double(Int64(bitPattern: x[Int(o.rs1)])))
        case .fcvtDLU: writeD(rd, doubleFromUInt64(x[Int(o.rs1)]))
        case .fcvtSD:
            if rm == 4 {
                writeS(rd, roundFloatAway(readD(o.rs1)))
            } else {
                writeS(rd, Float(readD(o.rs1)))
            }
        case .fcvtDS:
            writeD(rd, Double(readS(o.rs1)))
        default:
            return false
        }
        markFPDirty()
        return true
    }

    // MARK: Helpers

    private func minMax<T: BinaryFloatingPoint>(_ a: T, _ b: T, max: Bool) -> T {
        if a.isNaN && b.isNaN { return .nan }
        if a.isNaN { return b }
        if b.isNaN { return a }
        if a == b {
            // -0 < +0 for min/max.
            let aNeg = a.sign == .minus
            return (aNeg != max) ? a : b
        }
        return max ? (a > b ? a : b) : (a < b ? a : b)
    }

    /// kind 0: feq (quiet), 1: flt, 2: fle (signalling).
    private func compare<T: BinaryFloatingPoint>(_ a: T, _ b: T, _ kind: Int) -> UInt64 {
        if a.isNaN || b.isNaN {
            if kind != 0 || a.isSignalingNaN || b.isSignalingNaN { fflags |= Self.flagNV }
            return 0
        }
        switch kind {
        case 0: return a == b ? 1 : 0
        case 1: return a < b ? 1 : 0
        default: return a <= b ? 1 : 0
        }
    }

    private func classify<T: BinaryFloatingPoint>(_ v: T) -> UInt64 {
        let neg = v.sign == .minus
        if v.isNaN { return v.isSignalingNaN ? 1 << 8 : 1 << 9 }
        if v.isInfinite { return neg ? 1 << 0 : 1 << 7 }
        if v.isZero { return neg ? 1 << 3 : 1 << 4 }
        if v.isSubnormal { return neg ? 1 << 2 : 1 << 5 }
        return neg ? 1 << 1 : 1 << 6
    }

    private func roundingRule(_ rm: UInt64) -> FloatingPointRoundingRule {
        switch rm {
        case 1: return .towardZero
        case 2: return .down
        case 3: return .up
        case 4: return .toNearestOrAwayFromZero
        default: return .toNearestOrEven
        }
    }

    /// fcvt to a signed integer with saturation and exact flags.
    func toInt(_ v: Double, rm: UInt64, lo: Double, hi: Double, signExtend32: Bool) -> UInt64 {
        let saved = saveHostFlags()
        defer { restoreHostFlags(saved) }
        if v.isNaN {
            fflags |= Self.flagNV
            return signExtend32 ? 0x7fff_ffff : UInt64(Int64.max)
        }
        let r = v.rounded(roundingRule(rm))
        if r < lo {
            fflags |= Self.flagNV
            return signExtend32 ? sx32(0x8000_0000) : UInt64(bitPattern: Int64.min)
        }
        // `hi` for 64 bits is 2^63 as a Double: anything at or above it overflows.
        if signExtend32 ? r > hi : r >= 9223372036854775808.0 {
            fflags |= Self.flagNV
            return signExtend32 ? 0x7fff_ffff : UInt64(Int64.max)
        }
        if r != v { fflags |= Self.flagNX }
        let i = Int64(r)
        return signExtend32 ? sx32(UInt32(truncatingIfNeeded: i)) : UInt64(bitPattern: i)
    }

    /// fcvt to an unsigned integer with saturation and exact flags.
    func toUInt(_ v: Double, rm: UInt64, hi: Double, signExtend32: Bool) -> UInt64 {
        let saved = saveHostFlags()
        defer { restoreHostFlags(saved) }
        if v.isNaN {
            fflags |= Self.flagNV
            return .max
        }
        let r = v.rounded(roundingRule(rm))
        if r < 0 {
            fflags |= Self.flagNV
            return 0
        }
        if signExtend32 ? r > hi : r >= 18446744073709551616.0 {
            fflags |= Self.flagNV
            return .max
        }
        if r != v { fflags |= Self.flagNX }
        let u = UInt64(r)
        return signExtend32 ? sx32(UInt32(truncatingIfNeeded: u)) : u
    }

    private func doubleFromUInt64(_ v: UInt64) -> Double {
        if v >> 63 == 0 { return Double(Int64(v)) }
        // Halve with a sticky bit so the single rounding below is the correct one.
        return Double(Int64((v >> 1) | (v & 1))) * 2
    }

    private func floatFromUInt64(_ v: UInt64) -> Float {
        if v >> 63 == 0 { return Float(Int64(v)) }
        return Float(Int64((v >> 1) | (v & 1))) * 2
    }

    /// Single-precision add/sub/mul/div with round-to-nearest, ties away from zero.
    private func roundAwaySingle(_ o: Op) -> Float {
        let a = Double(readS(o.rs1)), b = Double(readS(o.rs2))
        let saved = saveHostFlags()
        let d: Double
        switch o.kind {
        case .faddS: d = a + b
        case .fsubS: d = a - b
        case .fmulS: d = a * b
        default: d = a / b
        }
        restoreHostFlags(saved)
        return roundFloatAway(d)
    }

    /// Rounds a double to single precision with ties away from zero, raising the host flags of
    /// the conversion.
    private func roundFloatAway(_ d: Double) -> Float {
        let f = Float(d)
        if f.isNaN || f.isInfinite { return f }
        let saved = saveHostFlags()
        defer { restoreHostFlags(saved) }
        let fd = Double(f)
        if fd == d { return f }
        let other = d > fd ? f.nextUp : f.nextDown
        let mid = (fd + Double(other)) / 2
        if mid == d && other.magnitude > f.magnitude { return other }
        return f
    }

    /// Double-precision add/sub/mul/div with round-to-nearest, ties away from zero.
    private func roundAwayDouble(_ o: Op) -> Double {
        let a = readD(o.rs1), b = readD(o.rs2)
        let s: Double
        switch o.kind {
        case .faddD: s = a + b
        case .fsubD: s = a - b
        case .fmulD: s = a * b
        default: s = a / b
        }
        guard s.isFinite, !s.isZero else { return s }
        let saved = saveHostFlags()
        defer { restoreHostFlags(saved) }
        let halfUlp = s.ulp / 2
        var tie = false
        var errSign: FloatingPointSign = .plus
        switch o.kind {
        case .faddD, .fsubD:
            let bb = o.kind == .faddD ? b : -b
            let v = s - a
            let err = (a - (s - v)) + (bb - v)
            tie = err != 0 && err.magnitude == halfUlp
            errSign = err.sign
        case .fmulD:
            let e = (-s).addingProduct(a, b)  // a*b - s, exact
            tie = e != 0 && e.magnitude == halfUlp
            errSign = e.sign
        default:
            let rem = a.addingProduct(-s, b)  // a - s*b, exact
            tie = rem != 0 && rem.magnitude == b.magnitude * halfUlp
            errSign = (rem.sign == b.sign) ? .plus : .minus
        }
        if tie && errSign == s.sign { return s.sign == .minus ? s.nextDown : s.nextUp }
        return s
    }
}
