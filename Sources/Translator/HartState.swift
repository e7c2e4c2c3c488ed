/// Fixed layout of the hot guest CPU state in one raw allocation, so the JIT addresses every
/// field at a constant offset from one pinned host register.
///
/// | offset | field |
/// |---|---|
/// | 0    | x0…x31, then slot 32: the sink that instructions naming x0 as destination write |
/// | 512  | f0…f31 (64-bit; single values NaN-boxed) |
/// | 768  | pc (inside a JIT block: the virtual PC the block was entered at) |
/// | 776  | privilege level (0 U, 1 S, 3 M), stored only here |
/// | 784  | instret |
/// | 792  | the owning `Hart`, unretained (for JIT helper calls) |
/// | 800  | read TLB tags of the current data MMU context (pointer; addends follow at `Hart.tlbAddendDistance`) |
/// | 816  | write TLB tags of the current data MMU context (pointer; likewise) |
/// | 832  | fflags (low 5 bits, as last folded in from the host's sticky flags) |
/// | 840  | frm |
/// | 848  | mstatus (without the read-only views UXL/SXL/SD) |
/// | 856  | blocks a JIT chain may still run before it returns to the run loop |
/// | 864  | MMU epoch (32 bits): chains made under another epoch are stale |
/// | 872  | jump-cache tags of the current fetch MMU context (pointer) |
/// | 880  | jump-cache block indices of the current fetch MMU context (pointer) |
/// | 888  | the translation-block pool (pointer) |
/// | 896  | the executable base of the JIT code cache (pointer) |
/// | 904  | the last block a JIT chain ran (32 bits) |
/// | 912  | the host rounding mode currently programmed (RISC-V encoding 0…3) |
enum StateLayout {
    static let x = 0
    static let xSink = 32
    static let f = 512
    static let pc = 768
    static let privilege = 776
    static let instret = 784
    static let hart = 792
    static let readTags = 800
    static let writeTags = 816
    static let fflags = 832
    static let frm = 840
    static let mstatus = 848
    static let budget = 856
    static let mmuEpoch = 864
    static let jumpTags = 872
    static let jumpBlocks = 880
    static let blocks = 888
    static let codeBase = 896
    static let lastBlock = 904
    static let hostRoundingMode = 912
    static let size = 1024
}

/// Privilege levels as encoded in `mstatus.MPP`.
enum Privilege: UInt64 {
    case user = 0
    case supervisor = 1
    case machine = 3
}

/// Exception causes (`mcause` without the interrupt bit).
enum Cause: UInt64 {
    case instructionMisaligned = 0
    case instructionAccessFault = 1
    case illegalInstruction = 2
    case breakpoint = 3
    case loadMisaligned = 4
    case loadAccessFault = 5
    case storeMisaligned = 6
    case storeAccessFault = 7
    case ecallFromU = 8
    case ecallFromS = 9
    case ecallFromM = 11
    case instructionPageFault = 12
    case loadPageFault = 13
    case storePageFault = 15
}

/// The kinds of memory access, for translation and faults.
enum AccessType: Int {
    case read = 0
    case write = 1
    case execute = 2

    var pageFault: Cause {
        switch self {
        case .read: return .loadPageFault
        case .write: return .storePageFault
        case .execute: return .instructionPageFault
        }
    }

    var accessFault: Cause {
        switch self {
        case .read: return .loadAccessFault
        case .write: return .storeAccessFault
        case .execute: return .instructionAccessFault
        }
    }
}

/// `mstatus` bit positions and masks.
enum MStatus {
    static let sie: UInt64 = 1 << 1
    static let mie: UInt64 = 1 << 3
    static let spie: UInt64 = 1 << 5
    static let mpie: UInt64 = 1 << 7
    static let spp: UInt64 = 1 << 8
    static let mppShift: UInt64 = 11
    static let mpp: UInt64 = 3 << 11
    static let fsShift: UInt64 = 13
    static let fs: UInt64 = 3 << 13
    static let mprv: UInt64 = 1 << 17
    static let sum: UInt64 = 1 << 18
    static let mxr: UInt64 = 1 << 19
    static let tvm: UInt64 = 1 << 20
    static let tw: UInt64 = 1 << 21
    static let tsr: UInt64 = 1 << 22
    static let uxl: UInt64 = 2 << 32
    static let sxl: UInt64 = 2 << 34
    static let sd: UInt64 = 1 << 63

    static let writable: UInt64 = sie | mie | spie | mpie | spp | mpp | fs | mprv | sum | mxr | tvm | tw | tsr
    static let sstatusMask: UInt64 = sie | spie | spp | fs | sum | mxr | (3 << 32) | sd
}

/// Interrupt bit positions in `mip`/`mie`.
enum Irq {
    static let ssi: UInt64 = 1 << 1
    static let msi: UInt64 = 1 << 3
    static let sti: UInt64 = 1 << 5
    static let mti: UInt64 = 1 << 7
    static let sei: UInt64 = 1 << 9
    static let mei: UInt64 = 1 << 11
    static let sMask: UInt64 = ssi | sti | sei
    static let all: UInt64 = ssi | msi | sti | mti | sei | mei
}

/// `menvcfg`/`senvcfg` fields.
enum EnvCfg {
    static let fiom: UInt64 = 1 << 0
    static let cbieShift: UInt64 = 4
    static let cbie: UInt64 = 3 << 4
    static let cbcfe: UInt64 = 1 << 6
    static let cbze: UInt64 = 1 << 7
    static let pbmte: UInt64 = 1 << 62
    static let stce: UInt64 = 1 << 63
}
