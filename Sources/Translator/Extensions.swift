/// The ISA extensions a hart implements beyond RV64IMAFDC with Zicsr and Zifencei.
///
/// A machine may narrow its CPU to a subset (to match firmware written for an older core): an
/// extension left out decodes as an illegal instruction, its CSRs do not exist and its
/// `menvcfg` bits read as zero. The device tree claims exactly the set a hart runs with.
public struct ISAExtensions: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Address generation: sh1add…sh3add, add.uw, slli.uw.
    public static let zba = ISAExtensions(rawValue: 1 << 0)
    /// Basic bit manipulation: andn…xnor, clz/ctz/cpop, min/max, sext/zext, rotations, orc.b, rev8.
    public static let zbb = ISAExtensions(rawValue: 1 << 1)
    /// Carry-less multiplication.
    public static let zbc = ISAExtensions(rawValue: 1 << 2)
    /// Single-bit instructions.
    public static let zbs = ISAExtensions(rawValue: 1 << 3)
    /// Integer conditional operations (czero.eqz, czero.nez).
    public static let zicond = ISAExtensions(rawValue: 1 << 4)
    /// Cache-block management (cbo.clean, cbo.flush, cbo.inval).
    public static let zicbom = ISAExtensions(rawValue: 1 << 5)
    /// Cache-block zero (cbo.zero).
    public static let zicboz = ISAExtensions(rawValue: 1 << 6)
    /// Cache-block prefetch hints (prefetch.i/r/w, which are ORI encodings with rd = x0).
    public static let zicbop = ISAExtensions(rawValue: 1 << 7)
    /// The pause hint (a FENCE encoding).
    public static let zihintpause = ISAExtensions(rawValue: 1 << 8)
    /// The cycle, time and instret counters.
    public static let zicntr = ISAExtensions(rawValue: 1 << 9)
    /// The hardware performance counters (hpmcounter3…31, reading zero).
    public static let zihpm = ISAExtensions(rawValue: 1 << 10)
    /// The supervisor timer compare register (stimecmp, menvcfg.STCE).
    public static let sstc = ISAExtensions(rawValue: 1 << 11)
    /// Page-based memory types (PTE bits 62:61, menvcfg.PBMTE).
    public static let svpbmt = ISAExtensions(rawValue: 1 << 12)
    /// Fine-grained address-translation cache invalidation (sinval.vma, sfence.w.inval, sfence.inval.ir).
    public static let svinval = ISAExtensions(rawValue: 1 << 13)
    /// NAPOT translation contiguity (64 KiB pages through PTE bit 63).
    public static let svnapot = ISAExtensions(rawValue: 1 << 14)
    /// Minimal half precision: flh/fsh, fmv.x.h/fmv.h.x and conversions between H and S/D.
    public static let zfhmin = ISAExtensions(rawValue: 1 << 15)
    /// Half-precision arithmetic, comparisons and integer conversions (implies Zfhmin).
    public static let zfh = ISAExtensions(rawValue: 1 << 16)

    /// Every extension this CPU implements.
    public static let all: ISAExtensions = [.zba, .zbb, .zbc, .zbs, .zicond, .zicbom, .zicboz, .zicbop,
                                            .zihintpause, .zicntr, .zihpm, .zfh, .zfhmin,
                                            .sstc, .svpbmt, .svinval, .svnapot]

    /// Each extension with its name as the device tree and ISA strings spell it, in the
    /// canonical order of an ISA string (Z extensions by their category letter, then S ones).
    public static let names: [(ISAExtensions, String)] = [
        (.zicbom, "zicbom"), (.zicbop, "zicbop"), (.zicboz, "zicboz"), (.zicntr, "zicntr"), (.zicond, "zicond"),
        (.zihintpause, "zihintpause"), (.zihpm, "zihpm"),
        (.zfh, "zfh"), (.zfhmin, "zfhmin"),
        (.zba, "zba"), (.zbb, "zbb"), (.zbc, "zbc"), (.zbs, "zbs"),
        (.sstc, "sstc"), (.svinval, "svinval"), (.svnapot, "svnapot"), (.svpbmt, "svpbmt"),
    ]

    /// The cache-block size of Zicbom and Zicboz in bytes.
    public static let cacheBlockSize: UInt64 = 64

    /// The single-letter base every hart has.
    public static let baseLetters = ["i", "m", "a", "f", "d", "c"]

    /// The `riscv,isa` string: `rv64imafdc` then `zicsr`, `zifencei` and the extensions in `self`.
    public var isaString: String {
        var parts = ["rv64imafdc"]
        let z = Self.names.filter { contains($0.0) }.map(\.1)
        // zicsr and zifencei sit between zicntr/zicond and zihintpause in canonical order.
        var zi = z.filter { $0.hasPrefix("zi") } + ["zicsr", "zifencei"]
        zi.sort()
        parts += zi
        parts += z.filter { !$0.hasPrefix("zi") }
        return parts.joined(separator: "_")
    }

    /// The `riscv,isa-extensions` list: the base letters, zicsr, zifencei and every extension in `self`.
    public var extensionList: [String] {
        var zi = Self.names.filter { contains($0.0) && $0.1.hasPrefix("zi") }.map(\.1) + ["zicsr", "zifencei"]
        zi.sort()
        return Self.baseLetters + zi + Self.names.filter { contains($0.0) && !$0.1.hasPrefix("zi") }.map(\.1)
    }

    /// Parses an ISA string such as `rv64gc`, `rv64imafdc_zicsr_zifencei_zba_zbb` or
    /// `rv64gc_zba`: the base must be RV64 with I, M, A, F, D and C (G stands for IMAFD with
    /// Zicsr and Zifencei); each `_`-separated name must be one this CPU implements.
    /// Zfh implies Zfhmin. Returns the extensions beyond the base, or a message naming what is wrong.
    public static func parse(_ s: String) -> Result<ISAExtensions, ISAStringError> {
        let lower = s.lowercased()
        let parts = lower.split(separator: "_", omittingEmptySubsequences: false).map(String.init)
        guard let first = parts.first, first.hasPrefix("rv64") else {
            return .failure(ISAStringError(message: "ISA string '\(s)' does not start with rv64"))
        }
        var letters = Set(first.dropFirst(4).map(String.init))
        if letters.remove("g") != nil { letters.formUnion(["i", "m", "a", "f", "d"]) }
        let required: Set<String> = ["i", "m", "a", "f", "d", "c"]
        guard letters.isSubset(of: required) else {
            let extra = letters.subtracting(required).sorted().joined(separator: ", ")
            return .failure(ISAStringError(message: "ISA string '\(s)': single-letter extension(s) \(extra) not implemented"))
        }
        guard letters == required else {
            let missing = required.subtracting(letters).sorted().joined(separator: ", ")
            return .failure(ISAStringError(message: "ISA string '\(s)': this CPU cannot run without \(missing)"))
        }
        var result: ISAExtensions = []
        for name in parts.dropFirst() {
            if name == "zicsr" || name == "zifencei" { continue }
            guard let e = names.first(where: { $0.1 == name })?.0 else {
                let known = (names.map(\.1) + ["zicsr", "zifencei"]).sorted().joined(separator: ", ")
                return .failure(ISAStringError(message: "ISA string '\(s)': unknown or unimplemented extension '\(name)' (known: \(known))"))
            }
            result.insert(e)
        }
        if result.contains(.zfh) { result.insert(.zfhmin) }
        return .success(result)
    }
}

/// Why an ISA string was refused.
public struct ISAStringError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public var description: String { message }
}

extension OpKind {
    /// The extension an op belongs to, or nil for the base ISA.
    var requiredExtension: ISAExtensions? {
        switch self {
        case .addUW, .sh1add, .sh2add, .sh3add, .sh1addUW, .sh2addUW, .sh3addUW, .slliUW: return .zba
        case .andn, .orn, .xnor, .clz, .clzw, .ctz, .ctzw, .cpop, .cpopw, .max, .maxu, .min, .minu,
             .sextB, .sextH, .zextH, .rol, .rolw, .ror, .rori, .roriw, .rorw, .orcB, .rev8: return .zbb
        case .clmul, .clmulh, .clmulr: return .zbc
        case .bclr, .bclri, .bext, .bexti, .binv, .binvi, .bset, .bseti: return .zbs
        case .czeroEqz, .czeroNez: return .zicond
        case .sfenceInval: return .svinval
        case .flh, .fsh, .fmvXH, .fmvHX, .fcvtSH, .fcvtHS, .fcvtDH, .fcvtHD: return .zfhmin
        case _ where isHalf: return .zfh
        default: return nil
        }
    }

    /// Whether the op is one of the half-precision ops `executeHalf` computes (not flh/fsh).
    var isHalf: Bool {
        rawValue >= OpKind.fmaddH.rawValue && rawValue <= OpKind.fcvtHD.rawValue
    }

    /// Whether the op is one of the pure integer ops `bitManip` computes.
    var isBitManip: Bool {
        rawValue >= OpKind.addUW.rawValue && rawValue <= OpKind.czeroNez.rawValue
    }
}

/// Computes a Zba/Zbb/Zbc/Zbs/Zicond op: `a` is rs1, `b` is rs2, or the shift amount of an
/// immediate form. Shared by the interpreter and the JIT (which calls it as a helper).
func bitManip(_ kind: OpKind, _ a: UInt64, _ b: UInt64) -> UInt64 {
    @inline(__always) func clmulFull(_ a: UInt64, _ b: UInt64) -> (high: UInt64, low: UInt64) {
        var lo: UInt64 = 0, hi: UInt64 = 0
        for i in 0..<64 where (b >> UInt64(i)) & 1 != 0 {
            lo ^= a << UInt64(i)
            if i != 0 { hi ^= a >> UInt64(64 - i) }
        }
        return (hi, lo)
    }
    let w = UInt32(truncatingIfNeeded: a)
    switch kind {
    case .addUW: return b &+ UInt64(w)
    case .sh1add: return b &+ (a << 1)
    case .sh2add: return b &+ (a << 2)
    case .sh3add: return b &+ (a << 3)
    case .sh1addUW: return b &+ (UInt64(w) << 1)
    case .sh2addUW: return b &+ (UInt64(w) << 2)
    case .sh3addUW: return b &+ (UInt64(w) << 3)
    case .slliUW: return UInt64(w) << (b & 63)
    case .andn: return a & ~b
    case .orn: return a | ~b
    case .xnor: return ~(a ^ b)
    case .clz: return UInt64(a.leadingZeroBitCount)
    case .clzw: return UInt64(w.leadingZeroBitCount)
    case .ctz: return UInt64(a.trailingZeroBitCount)
    case .ctzw: return UInt64(w.trailingZeroBitCount)
    case .cpop: return UInt64(a.nonzeroBitCount)
    case .cpopw: return UInt64(w.nonzeroBitCount)
    case .max: return Int64(bitPattern: a) > Int64(bitPattern: b) ? a : b
    case .maxu: return a > b ? a : b
    case .min: return Int64(bitPattern: a) < Int64(bitPattern: b) ? a : b
    case .minu: return a < b ? a : b
    case .sextB: return UInt64(bitPattern: Int64(Int8(truncatingIfNeeded: a)))
    case .sextH: return UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: a)))
    case .zextH: return a & 0xffff
    case .rol: return a.rotateLeft(b & 63)
    case .ror, .rori: return a.rotateLeft((64 &- (b & 63)) & 63)
    case .rolw: return sx32(w.rotateLeft32(UInt32(b & 31)))
    case .rorw, .roriw: return sx32(w.rotateLeft32((32 &- UInt32(b & 31)) & 31))
    case .orcB:
        var r: UInt64 = 0
        for i in 0..<8 where (a >> UInt64(8 * i)) & 0xff != 0 { r |= 0xff << UInt64(8 * i) }
        return r
    case .rev8: return a.byteSwapped
    case .clmul: return clmulFull(a, b).low
    case .clmulh: return clmulFull(a, b).high
    case .clmulr:
        let p = clmulFull(a, b)
        return (p.high << 1) | (p.low >> 63)
    case .bclr, .bclri: return a & ~(1 << (b & 63))
    case .bext, .bexti: return (a >> (b & 63)) & 1
    case .binv, .binvi: return a ^ (1 << (b & 63))
    case .bset, .bseti: return a | (1 << (b & 63))
    case .czeroEqz: return b == 0 ? 0 : a
    case .czeroNez: return b != 0 ? 0 : a
    default: return 0
    }
}

extension UInt64 {
    @inline(__always) func rotateLeft(_ n: UInt64) -> UInt64 {
        n == 0 ? self : (self << n) | (self >> (64 - n))
    }
}

extension UInt32 {
    @inline(__always) func rotateLeft32(_ n: UInt32) -> UInt32 {
        n == 0 ? self : (self << n) | (self >> (32 - n))
    }
}
