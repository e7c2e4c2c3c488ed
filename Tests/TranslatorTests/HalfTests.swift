import Testing
@testable import Translator

/// `SoftHalf` (Zfh's binary16 arithmetic) against an independent reference: the exact result
/// computed in double (exact for add, sub and mul; for div and sqrt never within a double's
/// precision of a half or of a midpoint between two unless exact) and rounded by looking up its
/// two neighbours among all binary16 values, with each rounding mode's rule and IEEE 754's
/// flags (tininess after rounding) written out directly.
@Suite struct HalfTests {
    static let nx = SoftHalf.nx, uf = SoftHalf.uf, of = SoftHalf.of, dz = SoftHalf.dz, nv = SoftHalf.nv

    /// Every non-negative finite binary16 value in increasing order, then 2^16 (where rounding
    /// past the largest finite value lands).
    static let grid: [Double] = (0..<0x7c00).map { Double(Float16(bitPattern: UInt16($0))) } + [65536]

    /// Rounds a finite double to binary16 under `rm` the slow, obvious way.
    static func reference(_ d: Double, rm: UInt64) -> SoftHalf.Result {
        let sign = d.sign == .minus
        let a = d.magnitude
        // The neighbours lo <= a <= hi on the grid (beyond it: the largest finite and 2^16).
        var i = grid.count - 1
        if a < 65536 {
            var l = 0, h = grid.count - 1
            while l < h {
                let m = (l + h) / 2
                if grid[m] < a { l = m + 1 } else { h = m }
            }
            i = l  // first grid value >= a
        }
        let hiIndex = i, loIndex = grid[i] == a ? i : i - 1
        func pick(_ lo: Double, _ hi: Double, loOdd: Bool) -> Bool {  // true: hi
            if lo == a { return false }
            switch rm {
            case 1: return false
            case 2: return sign
            case 3: return !sign
            case 4: return a - lo >= hi - a
            default: return a - lo > hi - a || (a - lo == hi - a && loOdd)
            }
        }
        let upper = pick(grid[loIndex], grid[hiIndex], loOdd: loIndex & 1 == 1)
        let chosenIndex = upper ? hiIndex : loIndex
        var flags: UInt64 = grid[loIndex] == a ? 0 : nx
        let bits: UInt16
        if chosenIndex == grid.count - 1 {
            bits = 0x7c00
        } else {
            bits = UInt16(chosenIndex)
        }
        if a >= 65536 || chosenIndex == grid.count - 1 { flags |= of | nx }
        // Tiny: below 2^-14 even when rounded to 11 bits with an unbounded exponent.
        let minNormal = 0x1p-14
        if a < minNormal && flags & nx != 0 {
            var reaches = false
            if a > minNormal - 0x1p-25 {
                let lo = minNormal - 0x1p-25, hi = minNormal
                reaches = pick(lo, hi, loOdd: true)
            }
            if !reaches { flags |= uf }
        }
        return SoftHalf.Result(bits: sign ? bits | 0x8000 : bits, flags: flags)
    }

    /// A deterministic generator (xorshift) so failures reproduce.
    struct Rand {
        var s: UInt64
        mutating func next() -> UInt64 {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return s
        }
        /// A finite binary16, biased toward interesting exponents and the subnormals.
        mutating func half() -> UInt16 {
            let r = next()
            switch r % 8 {
            case 0: return UInt16(truncatingIfNeeded: r >> 8) & 0x83ff          // subnormal or zero
            case 1: return (UInt16(truncatingIfNeeded: r >> 8) & 0x87ff) | 0x3800            // in [0.5, 2)
            default:
                let v = UInt16(truncatingIfNeeded: r >> 8)
                return v & 0x7c00 == 0x7c00 ? v & 0xfbff : v
            }
        }
    }

    static func double(_ h: UInt16) -> Double { Double(Float16(bitPattern: h)) }

    @Test(arguments: [0, 1, 2, 3, 4] as [UInt64])
    func arithmeticMatchesTheReference(rm: UInt64) {
        var rng = Rand(s: 0x9e37_79b9_7f4a_7c15 &+ rm)
        for _ in 0..<20_000 {
            let a = rng.half(), b = rng.half()
            let x = Self.double(a), y = Self.double(b)
            let sum = x + y, difference = x - y, product = x * y
            if sum != 0 { #expect(SoftHalf.add(a, b, subtract: false, rm: rm) == Self.reference(sum, rm: rm), "add \(a) \(b) rm \(rm)") }
            if difference != 0 { #expect(SoftHalf.add(a, b, subtract: true, rm: rm) == Self.reference(difference, rm: rm), "sub \(a) \(b) rm \(rm)") }
            if product != 0 { #expect(SoftHalf.mul(a, b, rm: rm) == Self.reference(product, rm: rm), "mul \(a) \(b) rm \(rm)") }
            if x != 0 && y != 0 { #expect(SoftHalf.div(a, b, rm: rm) == Self.reference(x / y, rm: rm), "div \(a) \(b) rm \(rm)") }
            if x > 0 { #expect(SoftHalf.sqrt(a, rm: rm) == Self.reference(x.squareRoot(), rm: rm), "sqrt \(a) rm \(rm)") }
            // fma where the exact result fits a double (TwoSum's error is zero).
            let c = rng.half(), z = Self.double(c)
            let p = x * y, s = p + z, v = s - p, err = (p - (s - v)) + (z - v)
            if err == 0 && s != 0 {
                #expect(SoftHalf.fma(a, b, c, negateProduct: false, negateAddend: false, rm: rm) == Self.reference(s, rm: rm),
                        "fmadd \(a) \(b) \(c) rm \(rm)")
                #expect(SoftHalf.fma(a, b, c, negateProduct: true, negateAddend: true, rm: rm) == Self.reference(-s, rm: rm),
                        "fnmadd \(a) \(b) \(c) rm \(rm)")
            }
        }
    }

    @Test(arguments: [0, 1, 2, 3, 4] as [UInt64])
    func conversionsFromWiderFormatsMatchTheReference(rm: UInt64) {
        var rng = Rand(s: 0x1234_5678_9abc_def1 &+ rm)
        for _ in 0..<20_000 {
            // Doubles and singles from far below the subnormals to beyond the largest half.
            let exponent = Int(rng.next() % 70) - 40
            let d = Double(sign: rng.next() & 1 == 0 ? .plus : .minus, exponent: exponent,
                           significand: 1 + Double(rng.next() >> 12) * 0x1p-52)
            #expect(SoftHalf.fromDouble(d.bitPattern, rm: rm) == Self.reference(d, rm: rm), "double \(d) rm \(rm)")
            let f = Float(d)  // the test's own rounding; the conversion below is from f exactly
            #expect(SoftHalf.fromSingle(f.bitPattern, rm: rm) == Self.reference(Double(f), rm: rm), "single \(f) rm \(rm)")
            let i = Int64(bitPattern: rng.next()) >> Int64(rng.next() % 64)
            if let back = Int64(exactly: Double(i)), back == i {
                #expect(SoftHalf.fromInteger(UInt64(bitPattern: i), signed: true, rm: rm) == Self.reference(Double(i), rm: rm), "int \(i) rm \(rm)")
            }
        }
        // Integers too wide for a double to hold exactly round like their exact values.
        #expect(SoftHalf.fromInteger(.max, signed: false, rm: rm).bits == (rm == 1 || rm == 2 ? 0x7bff : 0x7c00))
        #expect(SoftHalf.fromInteger(65519, signed: false, rm: rm) == Self.reference(65519, rm: rm))
        #expect(SoftHalf.fromInteger(UInt64(bitPattern: -65520), signed: true, rm: rm) == Self.reference(-65520, rm: rm))
    }

    @Test func wideningIsExactForEveryHalf() {
        for h in 0...UInt16.max {
            let v = Float16(bitPattern: h)
            let (s, sFlags) = SoftHalf.toSingle(h)
            let (d, dFlags) = SoftHalf.toDouble(h)
            if v.isNaN {
                #expect(s == 0x7fc0_0000 && d == 0x7ff8_0000_0000_0000)
                #expect(sFlags == (v.isSignalingNaN ? Self.nv : 0) && dFlags == sFlags)
            } else {
                #expect(s == Float(v).bitPattern && d == Double(v).bitPattern, "\(h)")
                #expect(sFlags == 0 && dFlags == 0)
            }
            // Widening and narrowing back is the identity on non-NaN values in every mode.
            if !v.isNaN {
                for rm: UInt64 in 0...4 {
                    #expect(SoftHalf.fromSingle(s, rm: rm) == SoftHalf.Result(bits: h))
                }
            }
        }
    }

    @Test func specialCasesRaiseTheSpecFlags() {
        let inf: UInt16 = 0x7c00, ninf: UInt16 = 0xfc00, zero: UInt16 = 0, nzero: UInt16 = 0x8000
        let one: UInt16 = 0x3c00, snan: UInt16 = 0x7c01, qnan: UInt16 = 0x7e00, two: UInt16 = 0x4000
        let canonical = SoftHalf.canonicalNaN
        #expect(SoftHalf.add(inf, ninf, subtract: false, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.add(inf, inf, subtract: true, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.add(snan, one, subtract: false, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.add(qnan, one, subtract: false, rm: 0) == .init(bits: canonical, flags: 0))
        #expect(SoftHalf.mul(inf, zero, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.div(zero, zero, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.div(inf, ninf, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.div(one, nzero, rm: 0) == .init(bits: ninf, flags: Self.dz))
        #expect(SoftHalf.div(one, inf, rm: 0) == .init(bits: zero))
        #expect(SoftHalf.sqrt(nzero, rm: 0) == .init(bits: nzero))
        #expect(SoftHalf.sqrt(0xbc00, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.sqrt(inf, rm: 0) == .init(bits: inf))
        // Signs of exact zeros: x - x is +0 except rounding down; like-signed zeros keep theirs.
        for rm: UInt64 in 0...4 {
            let z: UInt16 = rm == 2 ? nzero : zero
            #expect(SoftHalf.add(one, one, subtract: true, rm: rm) == .init(bits: z))
            #expect(SoftHalf.add(zero, nzero, subtract: false, rm: rm) == .init(bits: z))
            #expect(SoftHalf.add(nzero, nzero, subtract: false, rm: rm) == .init(bits: nzero))
            #expect(SoftHalf.fma(one, one, 0xbc00, negateProduct: false, negateAddend: false, rm: rm) == .init(bits: z))
            #expect(SoftHalf.fma(zero, one, nzero, negateProduct: false, negateAddend: false, rm: rm) == .init(bits: z))
            #expect(SoftHalf.fma(nzero, one, nzero, negateProduct: false, negateAddend: false, rm: rm) == .init(bits: nzero))
        }
        // fma: ∞ × 0 is invalid even with a quiet NaN addend; ∞ - ∞ after the product too.
        #expect(SoftHalf.fma(inf, zero, qnan, negateProduct: false, negateAddend: false, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.fma(qnan, zero, one, negateProduct: false, negateAddend: false, rm: 0) == .init(bits: canonical))
        #expect(SoftHalf.fma(inf, one, inf, negateProduct: false, negateAddend: true, rm: 0) == .init(bits: canonical, flags: Self.nv))
        #expect(SoftHalf.fma(inf, two, one, negateProduct: true, negateAddend: false, rm: 0) == .init(bits: ninf))
        // A tiny product below a large addend: rounded once from the exact sum (a double fma
        // would lose it). 2^-24 * 2^-24 + 2^15.
        let tiny: UInt16 = 0x0001, big: UInt16 = 0x7800
        #expect(SoftHalf.fma(tiny, tiny, big, negateProduct: false, negateAddend: false, rm: 3) == .init(bits: 0x7801, flags: Self.nx))
        #expect(SoftHalf.fma(tiny, tiny, big, negateProduct: false, negateAddend: false, rm: 0) == .init(bits: 0x7800, flags: Self.nx))
        #expect(SoftHalf.fma(tiny, tiny, big, negateProduct: false, negateAddend: true, rm: 1) == .init(bits: 0xf7ff, flags: Self.nx))
        // Overflow by mode, and underflow only when tiny after rounding and inexact.
        let max: UInt16 = 0x7bff
        #expect(SoftHalf.add(max, max, subtract: false, rm: 0) == .init(bits: inf, flags: Self.of | Self.nx))
        #expect(SoftHalf.add(max, max, subtract: false, rm: 1) == .init(bits: max, flags: Self.of | Self.nx))
        #expect(SoftHalf.add(0xfbff, 0xfbff, subtract: false, rm: 3) == .init(bits: 0xfbff, flags: Self.of | Self.nx))
        #expect(SoftHalf.mul(tiny, 0x3800, rm: 0) == .init(bits: 0, flags: Self.uf | Self.nx))     // 2^-25: tie to even 0
        #expect(SoftHalf.mul(tiny, 0x3800, rm: 4) == .init(bits: 1, flags: Self.uf | Self.nx))
        #expect(SoftHalf.mul(0x0400, 0x3800, rm: 0) == .init(bits: 0x0200))                        // exact subnormal: no UF
        // 0x03ff * (1 + 2^-10) = just below 2^-14; rounds up to the smallest normal, which it
        // would also reach with an unbounded exponent: not tiny, so no underflow.
        #expect(SoftHalf.mul(0x03ff, 0x3c01, rm: 0) == .init(bits: 0x0400, flags: Self.nx))
    }

    @Test func comparisonsMinMaxAndClassification() {
        let one: UInt16 = 0x3c00, none: UInt16 = 0xbc00, zero: UInt16 = 0, nzero: UInt16 = 0x8000
        let snan: UInt16 = 0x7d00, qnan: UInt16 = 0x7e00
        #expect(SoftHalf.compare(zero, nzero, kind: 0) == (true, 0))
        #expect(SoftHalf.compare(none, one, kind: 1) == (true, 0))
        #expect(SoftHalf.compare(one, one, kind: 2) == (true, 0))
        #expect(SoftHalf.compare(qnan, one, kind: 0) == (false, 0))
        #expect(SoftHalf.compare(snan, one, kind: 0) == (false, Self.nv))
        #expect(SoftHalf.compare(qnan, one, kind: 1) == (false, Self.nv))
        #expect(SoftHalf.compare(qnan, one, kind: 2) == (false, Self.nv))
        #expect(SoftHalf.minMax(zero, nzero, max: false) == .init(bits: nzero))
        #expect(SoftHalf.minMax(nzero, zero, max: true) == .init(bits: zero))
        #expect(SoftHalf.minMax(qnan, one, max: false) == .init(bits: one))
        #expect(SoftHalf.minMax(one, snan, max: true) == .init(bits: one, flags: Self.nv))
        #expect(SoftHalf.minMax(snan, qnan, max: true) == .init(bits: SoftHalf.canonicalNaN, flags: Self.nv))
        let classes: [(UInt16, UInt64)] = [(0xfc00, 1), (none, 2), (0x8001, 4), (nzero, 8), (zero, 16), (0x0001, 32),
                                           (one, 64), (0x7c00, 128), (snan, 256), (qnan, 512)]
        for (h, c) in classes { #expect(SoftHalf.classify(h) == c, "\(h)") }
    }

    @Test func decoderNarrowsHalfPrecision() throws {
        let faddH: UInt32 = 0x04c5_7553, flh: UInt32 = 0x0005_1507, fcvtSH: UInt32 = 0x4025_0553
        #expect(Decoder.decode(faddH, extensions: .all).kind == .faddH)
        #expect(Decoder.decode(faddH, extensions: [.zfhmin]).kind == .illegal)
        #expect(Decoder.decode(flh, extensions: [.zfhmin]).kind == .flh)
        #expect(Decoder.decode(fcvtSH, extensions: [.zfhmin]).kind == .fcvtSH)
        #expect(Decoder.decode(fcvtSH, extensions: []).kind == .illegal)
        #expect(try ISAExtensions.parse("rv64gc_zfh").get() == [.zfh, .zfhmin])
        #expect(try ISAExtensions.parse("rv64gc_zfhmin").get() == [.zfhmin])
    }
}
