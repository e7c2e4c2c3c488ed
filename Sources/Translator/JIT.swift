/// The x86-64 block compiler.
///
/// A translation block's ops become one piece of host code that runs with the hart state pinned
/// in rbx (every guest register at its `StateLayout` offset). Integer ALU ops, multiplies,
/// branches and jumps, and integer and FP loads and stores (with the soft-TLB fast path inline)
/// are emitted directly; every other op is a call to a helper that runs the interpreter's code
/// for that single op, so every op is covered and keeps the interpreter's exact semantics.
///
/// Conventions inside a block: `state.pc` holds the virtual PC the block was entered at until
/// the block leaves, when it is set to the next PC. While generated code runs, instret lives in
/// r15 (written to the state around helper calls and at the exit) and the chain budget in r14;
/// each block adds exactly the ops it retired. The block returns (in eax) one of the `JITExit`
/// codes.
///
/// Threading: runs on the hart's vCPU thread.
enum JITExit {
    /// Left through the taken branch or direct jump (chain slot 0).
    static let taken: Int64 = 0
    /// Fell through (chain slot 1).
    static let fallThrough: Int64 = 1
    /// Indirect jump: continue through the jump cache, but do not chain.
    static let indirect: Int64 = 2
    /// A trap was taken or a system instruction ran: return to the run loop.
    static let toRunLoop: Int64 = -1
}

/// Helper results: continue with the next op, a trap was taken (the op did not retire), or the
/// op retired and the block must be left (the helper set the next PC).
enum JITStatus {
    static let next: Int64 = 0
    static let trapped: Int64 = 1
    static let leave: Int64 = 2
}

/// Addresses of the helpers generated code calls.
struct JITHelpers {
    typealias OpHelper = @convention(c) (UnsafeMutableRawPointer, UnsafeRawPointer, UInt64) -> Int64
    typealias MemHelper = @convention(c) (UnsafeMutableRawPointer, UnsafeRawPointer, UInt64, UInt64) -> Int64
    typealias DivHelper = @convention(c) (UInt64, UInt64, UInt64) -> UInt64

    let load: UInt64
    let store: UInt64
    let atomic: UInt64
    let fp: UInt64
    let system: UInt64
    let divRem: UInt64
    let bitManip: UInt64

    init() {
        // `withHart` borrows the hart without retaining it: these run once per helper call.
        let load: MemHelper = { s, o, va, pc in Hart.withHart(s) { $0.jitLoadSlow(o.assumingMemoryBound(to: Op.self), va: va, pc: pc) } }
        let store: MemHelper = { s, o, va, pc in Hart.withHart(s) { $0.jitStoreSlow(o.assumingMemoryBound(to: Op.self), va: va, pc: pc) } }
        let atomic: OpHelper = { s, o, pc in Hart.withHart(s) { $0.jitAtomic(o.assumingMemoryBound(to: Op.self), pc: pc) } }
        let fp: OpHelper = { s, o, pc in Hart.withHart(s) { $0.jitFP(o.assumingMemoryBound(to: Op.self), pc: pc) } }
        let system: OpHelper = { s, o, pc in Hart.withHart(s) { $0.jitSystem(o.assumingMemoryBound(to: Op.self), pc: pc) } }
        let divRem: DivHelper = { a, b, kind in jitDivRem(a, b, OpKind(rawValue: UInt8(kind)) ?? .div) }
        self.load = UInt64(UInt(bitPattern: unsafeBitCast(load, to: UnsafeRawPointer.self)))
        self.store = UInt64(UInt(bitPattern: unsafeBitCast(store, to: UnsafeRawPointer.self)))
        self.atomic = UInt64(UInt(bitPattern: unsafeBitCast(atomic, to: UnsafeRawPointer.self)))
        self.fp = UInt64(UInt(bitPattern: unsafeBitCast(fp, to: UnsafeRawPointer.self)))
        self.system = UInt64(UInt(bitPattern: unsafeBitCast(system, to: UnsafeRawPointer.self)))
        self.divRem = UInt64(UInt(bitPattern: unsafeBitCast(divRem, to: UnsafeRawPointer.self)))
        let bits: DivHelper = { a, b, kind in Translator.bitManip(OpKind(rawValue: UInt8(kind)) ?? .illegal, a, b) }
        self.bitManip = UInt64(UInt(bitPattern: unsafeBitCast(bits, to: UnsafeRawPointer.self)))
    }
}

/// Compiles one block into the code cache.
struct BlockCompiler {
    var e: X86Emitter
    let helpers: JITHelpers
    let exitOffset: Int
    /// Ops of this block already added to instret on the current straight-line path.
    var retired = 0
    /// The block's index, recorded in the state at every exit.
    let blockIndex: Int32
    /// Chain sites emitted for slots 0 and 1 (offsets in the code cache), or -1.
    var sites: (Int32, Int32) = (-1, -1)
    /// The in-page offsets of the targets of same-page sites (no PC check), or -1.
    var samePageTargets: (Int32, Int32) = (-1, -1)

    /// The guest registers pinned to host registers for as long as generated code runs, chained
    /// blocks included: the entry trampoline loads them, the common exit stores them, and every
    /// helper call stores them before and reloads them after (so caller-saved host registers
    /// serve too). While generated code runs, the state's copy of a pinned register is stale.
    /// Chosen by how often CoreMark's hot blocks (GCC 12 -O2) name them, weighted by their
    /// share of a perf profile: a5, a4, a3, a0, s0, a2, a1, a6 (the callee-saved host registers
    /// for the first three, which pure helper calls keep).
    static let pinned: [(guest: UInt8, host: X86Reg)] = [
        (15, .rbp), (14, .r12), (13, .r13), (10, .r8), (8, .r9), (12, .r10), (11, .r11), (16, .rdi),
    ]
    /// Guest register -> the host register pinned to it.
    static let pinnedHost: [X86Reg?] = {
        var m = [X86Reg?](repeating: nil, count: 33)
        for (g, h) in pinned { m[Int(g)] = h }
        return m
    }()
    /// Guest register -> host register holding it (`pinnedHost`, copied for the hot lookups).
    let cachedHost = BlockCompiler.pinnedHost

    static let state = X86Reg.rbx

    @inline(__always) static func xr(_ i: UInt8) -> X86Mem { X86Mem(.rbx, Int32(StateLayout.x + 8 * Int(i))) }
    @inline(__always) static func fr(_ i: UInt8) -> X86Mem { X86Mem(.rbx, Int32(StateLayout.f + 8 * Int(i))) }
    @inline(__always) static func field(_ offset: Int) -> X86Mem { X86Mem(.rbx, Int32(offset)) }

    /// Whether fused multiply-adds may be emitted (the host has FMA3).
    let hasFMA: Bool
    /// Where the block's ops start.
    var bodyStart = 0
    /// The offset of the block's first op in its (first) page.
    let pageOffset: Int

    /// Code emitted after the block's last exit, out of the fast paths' way.
    enum Deferred {
        /// A helper call after a TLB miss (`memory`: va in rsi) or a failed inline-FP check,
        /// with the compiler's retirement state at the branch.
        case helper(misses: [Int], resume: Int, address: UInt64, op: UnsafeMutablePointer<Op>, k: Int,
                    retired: Int, memory: Bool)
        /// An FP result that is a NaN: store the canonical NaN to f[rd] instead.
        case canonicalNaN(from: Int, resume: Int, rd: UInt8)
    }
    var deferred: [Deferred] = []

    init(emitter: X86Emitter, helpers: JITHelpers, exitOffset: Int, blockIndex: Int32, hasFMA: Bool, pageOffset: Int) {
        self.hasFMA = hasFMA
        self.pageOffset = pageOffset
        e = emitter
        self.helpers = helpers
        self.exitOffset = exitOffset
        self.blockIndex = blockIndex
    }

    // MARK: Chaining

    /// Layout of a chain site (see `chainExit`): where the epoch, the PC and the jump's
    /// displacement sit relative to the site's start; a site without the PC check (a target in
    /// the block's own page) has its jump at `siteJumpSamePage` instead.
    static let siteEpoch = 15, sitePC = 27, siteJump = 49, siteEnd = 53
    static let siteJumpSamePage = 26, siteEndSamePage = 30

    /// Leaves through chain slot `slot` to the PC `target` bytes from the block's start
    /// (state.pc already holds it): counts the block against the budget, then, when the site is
    /// linked and still valid (same MMU epoch, same next PC), jumps straight into the
    /// successor's code; otherwise returns `slot`.
    ///
    /// A target in the block's own page needs no PC check: whatever virtual alias of the page
    /// the block was entered through, that page maps to the block's physical page under the
    /// current epoch, so the target is the same physical block (of the same privilege, which
    /// no chained exit changes) as the one the site was linked to. `Hart.link` links such a
    /// site only to the block at that physical address (the run loop may offer another one,
    /// after taking an interrupt, say).
    mutating func chainExit(_ slot: Int64, retiringUpTo upTo: Int, target: Int64) {
        retire(upTo - retired)
        let site = e.position
        e.rr(0xff, .b64, reg: 1, rm: X86Reg.r14.rawValue)            // dec r14: 3 bytes
        let noBudget = e.jcc(.le)
        e.rm(0x81, .b32, reg: X86ALU.cmp.rawValue, Self.field(StateLayout.mmuEpoch))
        e.u32(0)                                                     // epoch, patched
        let staleEpoch = e.jcc(.ne)
        var exits = [noBudget, staleEpoch]
        let inPage = Int64(pageOffset) + target
        if inPage >= 0 && inPage < 4096 {
            if slot == 0 { samePageTargets.0 = Int32(inPage) } else { samePageTargets.1 = Int32(inPage) }
            let link = e.jmp()                                       // patched to the successor
            precondition(link == site + Self.siteJumpSamePage && e.position == site + Self.siteEndSamePage,
                         "chain site layout")
            exits.append(link)
        } else {
            e.byte(0x48)
            e.byte(0xb8)
            e.u64(0)                                                 // mov rax, pc (patched)
            e.alu(.cmp, Self.field(StateLayout.pc), .rax)
            exits.append(e.jcc(.ne))
            let link = e.jmp()                                       // patched to the successor
            precondition(link == site + Self.siteJump && e.position == site + Self.siteEnd, "chain site layout")
            exits.append(link)
        }
        for j in exits { e.patch(j, to: e.position) }
        if slot == 0 { sites.0 = Int32(site) } else { sites.1 = Int32(site) }
        leave(slot)
    }

    /// A taken branch back to the block's own start (state.pc already holds it): nothing can
    /// have changed the block or its mapping without leaving it, so after counting the block
    /// against the budget it loops to its first op.
    mutating func selfLoop(retiringUpTo upTo: Int) {
        retire(upTo - retired)
        e.rr(0xff, .b64, reg: 1, rm: X86Reg.r14.rawValue)            // dec r14
        e.jcc(.g, to: bodyStart)
        leave(JITExit.taken)
    }

    /// Links the chain site at `site` to the code at `target` for `epoch` and next PC `pc`.
    /// A site already linked that way is left alone: writing to code the host may have in its
    /// pipeline costs a machine clear.
    static func patchChain(_ cache: CodeCache, site: Int, epoch: UInt32, pc: UInt64, target: Int) {
        let e = X86Emitter(buffer: cache.writable, capacity: cache.size, position: site)
        if cache.writable[site + siteJumpSamePage - 1] == 0xe9 {
            // A same-page site: no PC to check.
            let rel = UInt32(bitPattern: Int32(target - (site + siteEndSamePage)))
            if e.read32(at: site + siteEpoch) == epoch && e.read32(at: site + siteJumpSamePage) == rel { return }
            e.write32(epoch, at: site + siteEpoch)
            e.patch(site + siteJumpSamePage, to: target)
            return
        }
        let rel = UInt32(bitPattern: Int32(target - (site + siteJump + 4)))
        if e.read32(at: site + siteEpoch) == epoch && e.read32(at: site + siteJump) == rel
            && e.read32(at: site + sitePC) == UInt32(truncatingIfNeeded: pc)
            && e.read32(at: site + sitePC + 4) == UInt32(truncatingIfNeeded: pc >> 32) {
            return
        }
        e.write32(epoch, at: site + siteEpoch)
        e.write32(UInt32(truncatingIfNeeded: pc), at: site + sitePC)
        e.write32(UInt32(truncatingIfNeeded: pc >> 32), at: site + sitePC + 4)
        e.patch(site + siteJump, to: target)
    }

    /// Indirect jump (state.pc holds the target, also in rax): looks the target up in the jump
    /// cache and enters its block directly when it is there and valid; otherwise returns
    /// `JITExit.indirect`.
    mutating func indirectExit() {
        var misses: [Int] = []
        e.rr(0xff, .b64, reg: 1, rm: X86Reg.r14.rawValue)            // dec r14
        misses.append(e.jcc(.le))
        e.mov(.rcx, .rax)
        e.shift(.shr, .rcx, 1)
        e.alu(.and, .rcx, imm: Int32(Hart.jumpCacheSize - 1), .b32)
        e.load(.rdx, Self.field(StateLayout.jumpTags))
        e.alu(.cmp, .rax, X86Mem(.rdx, index: .rcx, scale: 3))
        misses.append(e.jcc(.ne))
        e.load(.rdx, Self.field(StateLayout.jumpBlocks))
        e.loadSigned(.rcx, X86Mem(.rdx, index: .rcx, scale: 2), .b32)
        e.imul(.rcx, .rcx, imm: Int32(MemoryLayout<TranslationBlock>.stride))
        e.alu(.add, .rcx, Self.field(StateLayout.blocks))
        e.cmpByte(X86Mem(.rcx, Int32(MemoryLayout<TranslationBlock>.offset(of: \.valid)!)), 0)
        misses.append(e.jcc(.e))
        e.loadSigned(.rdx, X86Mem(.rcx, Int32(MemoryLayout<TranslationBlock>.offset(of: \.jitCode)!)), .b32)
        e.alu(.add, .rdx, Self.field(StateLayout.codeBase))
        e.jmp(.rdx)
        for m in misses { e.patch(m, to: e.position) }
        leave(JITExit.indirect)
    }

    /// Records this block as the last one run and returns `code` to the caller of the chain.
    mutating func leave(_ code: Int64) {
        e.storeImm32(Self.field(StateLayout.lastBlock), blockIndex)
        e.movImm(.rax, UInt64(bitPattern: code))
        e.jmp(to: exitOffset)
    }

    // MARK: Guest registers

    /// host = guest register `g`.
    mutating func gload(_ host: X86Reg, _ g: UInt8) {
        if g == 0 {
            e.alu(.xor, host, host, .b32)
        } else if let c = cachedHost[Int(g)] {
            if c != host { e.mov(host, c) }
        } else {
            e.load(host, Self.xr(g))
        }
    }

    /// guest register `g` = host.
    mutating func gstore(_ g: UInt8, _ host: X86Reg) {
        if let c = cachedHost[Int(g)] {
            e.mov(c, host)
        } else {
            e.store(Self.xr(g), host)
        }
    }

    /// `op host, guest register g`.
    mutating func galu(_ op: X86ALU, _ host: X86Reg, _ g: UInt8, _ size: X86Size = .b64) {
        if g == 0 {
            e.alu(op, host, imm: 0, size)
        } else if let c = cachedHost[Int(g)] {
            e.alu(op, host, c, size)
        } else {
            e.alu(op, host, Self.xr(g), size)
        }
    }

    /// Guest register `rd` = guest register `rs`.
    mutating func gmove(_ rd: UInt8, _ rs: UInt8) {
        if let d = cachedHost[Int(rd)] {
            gload(d, rs)
        } else if let c = cachedHost[Int(rs)] {
            e.store(Self.xr(rd), c)
        } else {
            gload(.rax, rs)
            gstore(rd, .rax)
        }
    }

    /// `imul host, guest register g`.
    mutating func gimul(_ host: X86Reg, _ g: UInt8, _ size: X86Size = .b64) {
        if let c = cachedHost[Int(g)] {
            e.rr(0x0faf, size, reg: host.rawValue, rm: c.rawValue)
        } else {
            e.imul(host, Self.xr(g), size)
        }
    }

    /// rdx:rax = rax * guest register g (signed or unsigned).
    mutating func gmulWide(signed: Bool, _ g: UInt8) {
        if let c = cachedHost[Int(g)] {
            e.rr(0xf7, .b64, reg: signed ? 5 : 4, rm: c.rawValue)
        } else {
            e.mulWide(signed: signed, Self.xr(g))
        }
    }

    /// Writes the pinned registers back to the state (before a helper call; `callerSaved`: only
    /// those a call clobbers, around a pure helper that reads no state).
    mutating func flush(callerSavedOnly: Bool = false) {
        for (g, h) in Self.pinned where !callerSavedOnly || !h.calleeSaved { e.store(Self.xr(g), h) }
    }

    /// Reloads the pinned registers from the state (after a helper call).
    mutating func reloadAll(callerSavedOnly: Bool = false) {
        for (g, h) in Self.pinned where !callerSavedOnly || !h.calleeSaved { e.load(h, Self.xr(g)) }
    }

    // MARK: Exits

    /// Adds `count` to instret.
    mutating func retire(_ count: Int) {
        if count != 0 { e.alu(.add, .r15, imm: Int32(count)) }
    }

    /// Calls the helper at `address` (arguments already in place, pinned registers already
    /// flushed) with instret in the state, where helpers read and write it; reloads instret and
    /// the pinned registers after it.
    mutating func callHelper(_ address: UInt64) {
        e.store(Self.field(StateLayout.instret), .r15)
        e.movImm(.rax, address)
        e.call(.rax)
        e.load(.r15, Self.field(StateLayout.instret))
        reloadAll()
    }


    /// After a helper call for op `k` returned a nonzero status in rax (trapped: retire the ops
    /// before `k`; leave: retire `k` too), leaves the block for the run loop.
    mutating func helperExit(op k: Int) {
        // instret += k + status - 1 - retired
        e.lea(.rax, X86Mem(.rax, Int32(k - 1 - retired)))
        e.alu(.add, .r15, .rax)
        leave(JITExit.toRunLoop)
    }

    /// Calls an op helper `(state, op, pc)`; on a nonzero status leaves the block.
    mutating func callOpHelper(_ address: UInt64, op: UnsafeMutablePointer<Op>, k: Int, endsBlock: Bool) {
        // Helpers see guest registers in the state only.
        flush()
        e.mov(.rdi, .rbx)
        e.movImm(.rsi, UInt64(UInt(bitPattern: op)))
        e.load(.rdx, Self.field(StateLayout.pc))
        e.alu(.add, .rdx, imm: Int32(op.pointee.pcOffset))
        callHelper(address)
        if endsBlock {
            helperExit(op: k)
        } else {
            e.test(.rax, .rax)
            let ok = e.jcc(.e)
            helperExit(op: k)
            e.patch(ok, to: e.position)
        }
    }

    // MARK: Block

    /// Emits the whole block. `ops` are its ops; `byteLength` the guest bytes it covers.
    mutating func compile(ops: UnsafeMutablePointer<Op>, count: Int, byteLength: Int) {
        bodyStart = e.position
        var k = 0
        var ended = false
        while k < count {
            let op = ops + k
            if compileOp(op, k: k) {
                ended = true
                break
            }
            k += 1
        }
        if !ended {
            // Fell off the end (page end or op limit).
            e.alu(.add, Self.field(StateLayout.pc), imm: Int32(byteLength))
            chainExit(JITExit.fallThrough, retiringUpTo: count, target: Int64(byteLength))
        }
        emitDeferred()
    }

    /// Emits the deferred slow paths, each jumping back to where its fast path continues.
    private mutating func emitDeferred() {
        let list = deferred
        deferred = []
        let mainRetired = retired
        for d in list {
            switch d {
            case let .helper(misses, resume, address, op, k, retiredThen, memory):
                for m in misses { e.patch(m, to: e.position) }
                retired = retiredThen
                flush()
                if memory {
                    // helper(state, op, va, pc)
                    e.mov(.rdx, .rsi)
                    e.mov(.rdi, .rbx)
                    e.movImm(.rsi, UInt64(UInt(bitPattern: op)))
                    e.load(.rcx, Self.field(StateLayout.pc))
                    e.alu(.add, .rcx, imm: Int32(op.pointee.pcOffset))
                } else {
                    // helper(state, op, pc)
                    e.mov(.rdi, .rbx)
                    e.movImm(.rsi, UInt64(UInt(bitPattern: op)))
                    e.load(.rdx, Self.field(StateLayout.pc))
                    e.alu(.add, .rdx, imm: Int32(op.pointee.pcOffset))
                }
                callHelper(address)
                e.test(.rax, .rax)
                let ok = e.jcc(.e)
                helperExit(op: k)
                e.patch(ok, to: e.position)
                e.jmp(to: resume)
            case let .canonicalNaN(from, resume, rd):
                e.patch(from, to: e.position)
                e.movImm(.rax, Hart.canonicalNaN64)
                e.store(Self.fr(rd), .rax)
                e.jmp(to: resume)
            }
        }
        retired = mainRetired
    }

    /// Emits one op; returns true when the op ended the block (its exits are emitted).
    private mutating func compileOp(_ opPtr: UnsafeMutablePointer<Op>, k: Int) -> Bool {
        let o = opPtr.pointee
        let imm32 = Int32(truncatingIfNeeded: o.imm)
        switch o.kind {
        case .nop, .fence:
            break
        case .lui:
            e.movImm(.rax, UInt64(bitPattern: o.imm))
            gstore(o.rd, .rax)
        case .auipc:
            e.load(.rax, Self.field(StateLayout.pc))
            addConstant(.rax, o.imm &+ Int64(o.pcOffset))
            gstore(o.rd, .rax)
        case .jal:
            e.load(.rax, Self.field(StateLayout.pc))
            e.lea(.rcx, X86Mem(.rax, Int32(o.pcOffset) + Int32(o.length)))
            gstore(o.rd, .rcx)
            addConstant(.rax, o.imm &+ Int64(o.pcOffset))
            e.store(Self.field(StateLayout.pc), .rax)
            chainExit(JITExit.taken, retiringUpTo: k + 1, target: o.imm &+ Int64(o.pcOffset))
            return true
        case .jalr:
            gload(.rax, o.rs1)
            e.alu(.add, .rax, imm: imm32)
            e.alu(.and, .rax, imm: -2)
            e.load(.rcx, Self.field(StateLayout.pc))
            e.alu(.add, .rcx, imm: Int32(o.pcOffset) + Int32(o.length))
            gstore(o.rd, .rcx)
            e.store(Self.field(StateLayout.pc), .rax)
            retire(k + 1 - retired)
            indirectExit()
            return true
        case .beq, .bne, .blt, .bge, .bltu, .bgeu:
            if let a = cachedHost[Int(o.rs1)] {
                galu(.cmp, a, o.rs2)
            } else {
                gload(.rax, o.rs1)
                galu(.cmp, .rax, o.rs2)
            }
            let cc: X86Cond
            switch o.kind {
            case .beq: cc = .e
            case .bne: cc = .ne
            case .blt: cc = .l
            case .bge: cc = .ge
            case .bltu: cc = .b
            default: cc = .ae
            }
            let taken = e.jcc(cc)
            e.alu(.add, Self.field(StateLayout.pc), imm: Int32(o.pcOffset) + Int32(o.length))
            chainExit(JITExit.fallThrough, retiringUpTo: k + 1, target: Int64(o.pcOffset) + Int64(o.length))
            e.patch(taken, to: e.position)
            if o.imm &+ Int64(o.pcOffset) == 0 {
                selfLoop(retiringUpTo: k + 1)
            } else {
                addConstantToPC(o.imm &+ Int64(o.pcOffset))
                chainExit(JITExit.taken, retiringUpTo: k + 1, target: o.imm &+ Int64(o.pcOffset))
            }
            return true

        case .lb: emitLoad(opPtr, k: k, size: .b8, signed: true, fp: false)
        case .lbu: emitLoad(opPtr, k: k, size: .b8, signed: false, fp: false)
        case .lh: emitLoad(opPtr, k: k, size: .b16, signed: true, fp: false)
        case .lhu: emitLoad(opPtr, k: k, size: .b16, signed: false, fp: false)
        case .lw: emitLoad(opPtr, k: k, size: .b32, signed: true, fp: false)
        case .lwu: emitLoad(opPtr, k: k, size: .b32, signed: false, fp: false)
        case .ld: emitLoad(opPtr, k: k, size: .b64, signed: false, fp: false)
        case .sb: emitStore(opPtr, k: k, size: .b8, fp: false)
        case .sh: emitStore(opPtr, k: k, size: .b16, fp: false)
        case .sw: emitStore(opPtr, k: k, size: .b32, fp: false)
        case .sd: emitStore(opPtr, k: k, size: .b64, fp: false)
        case .flw, .fld, .fsw, .fsd:
            // FP disabled: the system helper raises illegal instruction.
            e.test(Self.field(StateLayout.mstatus), imm: Int32(MStatus.fs))
            let enabled = e.jcc(.ne)
            callOpHelper(helpers.system, op: opPtr, k: k, endsBlock: true)
            e.patch(enabled, to: e.position)
            switch o.kind {
            case .flw: emitLoad(opPtr, k: k, size: .b32, signed: false, fp: true)
            case .fld: emitLoad(opPtr, k: k, size: .b64, signed: false, fp: true)
            case .fsw: emitStore(opPtr, k: k, size: .b32, fp: true)
            default: emitStore(opPtr, k: k, size: .b64, fp: true)
            }

        case .addi: aluImm(.add, o)
        case .xori: aluImm(.xor, o)
        case .ori: aluImm(.or, o)
        case .andi: aluImm(.and, o)
        case .slti, .sltiu:
            e.alu(.xor, .rcx, .rcx, .b32)
            gload(.rax, o.rs1)
            e.alu(.cmp, .rax, imm: imm32)
            e.setcc(o.kind == .slti ? .l : .b, .rcx)
            gstore(o.rd, .rcx)
        case .slli, .srli, .srai:
            let s: X86Shift = o.kind == .slli ? .shl : o.kind == .srli ? .shr : .sar
            if let d = cachedDestination(o, readsRs2: false) {
                if o.rs1 != o.rd { gload(d, o.rs1) }
                e.shift(s, d, UInt8(o.imm & 63))
            } else {
                gload(.rax, o.rs1)
                e.shift(s, .rax, UInt8(o.imm & 63))
                gstore(o.rd, .rax)
            }
        case .addiw:
            gload(.rax, o.rs1)
            e.alu(.add, .rax, imm: imm32, .b32)
            e.movsxd(.rax, .rax)
            gstore(o.rd, .rax)
        case .slliw, .srliw, .sraiw:
            gload(.rax, o.rs1)
            e.shift(o.kind == .slliw ? .shl : o.kind == .srliw ? .shr : .sar, .rax, UInt8(o.imm & 31), .b32)
            e.movsxd(.rax, .rax)
            gstore(o.rd, .rax)

        case .add: aluReg(.add, o)
        case .sub: aluReg(.sub, o)
        case .xor: aluReg(.xor, o)
        case .or: aluReg(.or, o)
        case .and: aluReg(.and, o)
        case .slt, .sltu:
            e.alu(.xor, .rcx, .rcx, .b32)
            gload(.rax, o.rs1)
            galu(.cmp, .rax, o.rs2)
            e.setcc(o.kind == .slt ? .l : .b, .rcx)
            gstore(o.rd, .rcx)
        case .sll, .srl, .sra, .sllw, .srlw, .sraw:
            gload(.rcx, o.rs2)
            gload(.rax, o.rs1)
            let w = o.kind == .sllw || o.kind == .srlw || o.kind == .sraw
            let s: X86Shift = (o.kind == .sll || o.kind == .sllw) ? .shl : (o.kind == .srl || o.kind == .srlw) ? .shr : .sar
            e.shiftCL(s, .rax, w ? .b32 : .b64)
            if w { e.movsxd(.rax, .rax) }
            gstore(o.rd, .rax)
        case .addw, .subw:
            gload(.rax, o.rs1)
            galu(o.kind == .addw ? .add : .sub, .rax, o.rs2, .b32)
            e.movsxd(.rax, .rax)
            gstore(o.rd, .rax)

        case .mul:
            gload(.rax, o.rs1)
            gimul(.rax, o.rs2)
            gstore(o.rd, .rax)
        case .mulw:
            gload(.rax, o.rs1)
            gimul(.rax, o.rs2, .b32)
            e.movsxd(.rax, .rax)
            gstore(o.rd, .rax)
        case .mulh, .mulhu:
            gload(.rax, o.rs1)
            gmulWide(signed: o.kind == .mulh, o.rs2)
            gstore(o.rd, .rdx)
        case .mulhsu:
            // high(signed a * unsigned b) = high(unsigned a * b) - (a < 0 ? b : 0)
            gload(.rax, o.rs1)
            e.mov(.rcx, .rax)
            gmulWide(signed: false, o.rs2)
            e.shift(.sar, .rcx, 63)
            galu(.and, .rcx, o.rs2)
            e.alu(.sub, .rdx, .rcx)
            gstore(o.rd, .rdx)
        case .div, .divu, .rem, .remu, .divw, .divuw, .remw, .remuw:
            // A pure helper, but the call clobbers the caller-saved pinned registers. rsi first:
            // rdi may hold rs2.
            flush(callerSavedOnly: true)
            gload(.rsi, o.rs2)
            gload(.rdi, o.rs1)
            e.movImm(.rdx, UInt64(o.kind.rawValue))
            e.movImm(.rax, helpers.divRem)
            e.call(.rax)
            reloadAll(callerSavedOnly: true)
            gstore(o.rd, .rax)

        case .lr, .sc, .amo, .cbo:
            callOpHelper(helpers.atomic, op: opPtr, k: k, endsBlock: false)

        case .csrrw, .csrrs, .csrrc, .csrrwi, .csrrsi, .csrrci:
            // The CSR may read instret: retire the ops before it first.
            retire(k - retired)
            retired = k
            callOpHelper(helpers.system, op: opPtr, k: k, endsBlock: true)
            return true
        case .illegal, .ecall, .ebreak, .fenceI, .mret, .sret, .wfi, .sfenceVma, .sfenceInval:
            callOpHelper(helpers.system, op: opPtr, k: k, endsBlock: true)
            return true

        case _ where o.kind.isBitManip:
            // Zba/Zbb/Zbc/Zbs/Zicond: the interpreter's pure function, called like division.
            flush(callerSavedOnly: true)
            gload(.rsi, o.rs2)
            gload(.rdi, o.rs1)
            if o.imm != 0 { e.alu(.add, .rsi, imm: Int32(o.imm)) }
            e.movImm(.rdx, UInt64(o.kind.rawValue))
            e.movImm(.rax, helpers.bitManip)
            e.call(.rax)
            reloadAll(callerSavedOnly: true)
            gstore(o.rd, .rax)

        default:
            // Floating-point arithmetic.
            emitFP(opPtr, k: k)
        }
        return false
    }

    /// Double-precision add, sub, mul, div, sqrt and fused multiply-adds run inline on SSE/FMA3
    /// when the FPU is on and the host already rounds the way the op asks (the helper switches
    /// the host mode, and does RMM); the host's sticky flags collect fflags exactly as the
    /// interpreter's arithmetic does, and NaN results become the canonical NaN. Every other FP
    /// op calls the helper.
    private mutating func emitFP(_ opPtr: UnsafeMutablePointer<Op>, k: Int) {
        let o = opPtr.pointee
        var arith: UInt8? = nil
        var fused: UInt8? = nil
        switch o.kind {
        case .faddD: arith = 0x58
        case .fsubD: arith = 0x5c
        case .fmulD: arith = 0x59
        case .fdivD: arith = 0x5e
        case .fsqrtD: arith = 0x51
        case .fmaddD where hasFMA: fused = 0xb9
        case .fmsubD where hasFMA: fused = 0xbb
        case .fnmsubD where hasFMA: fused = 0xbd
        case .fnmaddD where hasFMA: fused = 0xbf
        default: break
        }
        if (arith == nil && fused == nil) || (o.rm >= 4 && o.rm != 7) {
            callOpHelper(helpers.fp, op: opPtr, k: k, endsBlock: false)
            return
        }
        var slow: [Int] = []
        e.test(Self.field(StateLayout.mstatus), imm: Int32(MStatus.fs))
        slow.append(e.jcc(.e))
        if o.rm == 7 {
            // Dynamic: frm must be what the host has (0…3; RMM and invalid modes never are).
            e.load(.rax, Self.field(StateLayout.frm))
            e.alu(.cmp, .rax, Self.field(StateLayout.hostRoundingMode))
        } else {
            e.alu(.cmp, Self.field(StateLayout.hostRoundingMode), imm: Int32(o.rm))
        }
        slow.append(e.jcc(.ne))
        if let op = arith {
            if o.kind == .fsqrtD {
                e.sse(0xf2, op, xmm: 0, Self.fr(o.rs1))
            } else {
                e.sse(0xf2, 0x10, xmm: 0, Self.fr(o.rs1))
                e.sse(0xf2, op, xmm: 0, Self.fr(o.rs2))
            }
        } else if let op = fused {
            e.sse(0xf2, 0x10, xmm: 0, Self.fr(o.rs3))
            e.sse(0xf2, 0x10, xmm: 1, Self.fr(o.rs1))
            e.fma231sd(op, Self.fr(o.rs2))
        }
        e.sse(0x66, 0x2e, xmm: 0, xmm2: 0)          // ucomisd xmm0, xmm0: PF when NaN
        let nan = e.jcc(.p)
        e.sse(0xf2, 0x11, xmm: 0, Self.fr(o.rd))
        deferred.append(.canonicalNaN(from: nan, resume: e.position, rd: o.rd))
        e.alu(.or, Self.field(StateLayout.mstatus), imm: Int32(MStatus.fs))
        deferred.append(.helper(misses: slow, resume: e.position, address: helpers.fp, op: opPtr, k: k,
                                retired: retired, memory: false))
    }

    private mutating func addConstant(_ r: X86Reg, _ v: Int64) {
        if v >= Int64(Int32.min) && v <= Int64(Int32.max) {
            e.alu(.add, r, imm: Int32(v))
        } else {
            e.movImm(.rdx, UInt64(bitPattern: v))
            e.alu(.add, r, .rdx)
        }
    }

    private mutating func addConstantToPC(_ v: Int64) {
        if v >= Int64(Int32.min) && v <= Int64(Int32.max) {
            e.alu(.add, Self.field(StateLayout.pc), imm: Int32(v))
        } else {
            e.load(.rax, Self.field(StateLayout.pc))
            addConstant(.rax, v)
            e.store(Self.field(StateLayout.pc), .rax)
        }
    }

    /// The host register pinned to `o.rd` when the result can be computed in it directly (it
    /// is not also the second source, unless that is the first source too).
    private func cachedDestination(_ o: Op, readsRs2: Bool) -> X86Reg? {
        guard let d = cachedHost[Int(o.rd)] else { return nil }
        if readsRs2 && o.rs2 == o.rd && o.rs1 != o.rd { return nil }
        return d
    }

    private mutating func aluImm(_ op: X86ALU, _ o: Op) {
        if o.imm == 0 && (op == .add || op == .or || op == .xor) {
            gmove(o.rd, o.rs1)
            return
        }
        if let d = cachedDestination(o, readsRs2: false) {
            if o.rs1 != o.rd { gload(d, o.rs1) }
            e.alu(op, d, imm: Int32(truncatingIfNeeded: o.imm))
            return
        }
        gload(.rax, o.rs1)
        e.alu(op, .rax, imm: Int32(truncatingIfNeeded: o.imm))
        gstore(o.rd, .rax)
    }

    private mutating func aluReg(_ op: X86ALU, _ o: Op) {
        if o.rs2 == 0 && (op == .add || op == .sub || op == .or || op == .xor) {
            gmove(o.rd, o.rs1)
            return
        }
        if o.rs1 == 0 && (op == .add || op == .or || op == .xor) {
            gmove(o.rd, o.rs2)
            return
        }
        if let d = cachedDestination(o, readsRs2: true) {
            if o.rs1 != o.rd { gload(d, o.rs1) }
            galu(op, d, o.rs2)
            return
        }
        gload(.rax, o.rs1)
        galu(op, .rax, o.rs2)
        gstore(o.rd, .rax)
    }

    // MARK: Memory

    /// Computes the virtual address into rsi and looks it up in the data TLB whose tags
    /// pointer sits at `tagsField`: on a hit leaves the addend in rdx (host address rdx+rsi) and
    /// falls through; on a miss jumps to the returned patch position. The tag is compared with
    /// the page of the access's last byte, so an access crossing into the next page misses.
    private mutating func tlbLookup(_ o: Op, size: X86Size, tagsField: Int) -> Int {
        if let base = cachedHost[Int(o.rs1)] {
            e.lea(.rsi, X86Mem(base, Int32(truncatingIfNeeded: o.imm)))
        } else {
            gload(.rsi, o.rs1)
            if o.imm != 0 { e.alu(.add, .rsi, imm: Int32(truncatingIfNeeded: o.imm)) }
        }
        let bytes: Int32 = size == .b8 ? 1 : size == .b16 ? 2 : size == .b32 ? 4 : 8
        e.lea(.rax, X86Mem(.rsi, bytes - 1))
        e.shift(.shr, .rax, 12)
        e.mov(.rcx, .rsi)
        e.shift(.shr, .rcx, 12)
        e.rr(0x0fb6, .b8, reg: X86Reg.rcx.rawValue, rm: X86Reg.rcx.rawValue)   // movzx ecx, cl: 256 entries
        e.load(.rdx, Self.field(tagsField))
        e.alu(.cmp, .rax, X86Mem(.rdx, index: .rcx, scale: 3))
        let miss = e.jcc(.ne)
        e.load(.rdx, X86Mem(.rdx, index: .rcx, scale: 3, Int32(Hart.tlbAddendDistance)))
        return miss
    }

    private mutating func emitLoad(_ opPtr: UnsafeMutablePointer<Op>, k: Int, size: X86Size, signed: Bool, fp: Bool) {
        let o = opPtr.pointee
        let misses = [tlbLookup(o, size: size, tagsField: StateLayout.readTags)]
        let host = X86Mem(.rdx, index: .rsi, scale: 0)
        if signed { e.loadSigned(.rax, host, size) } else { e.load(.rax, host, size) }
        if fp {
            if size == .b32 {
                e.movImm(.rcx, 0xffff_ffff_0000_0000)
                e.alu(.or, .rax, .rcx)
            }
            e.store(Self.fr(o.rd), .rax)
            e.alu(.or, Self.field(StateLayout.mstatus), imm: Int32(MStatus.fs))
        } else {
            gstore(o.rd, .rax)
        }
        slowPath(misses: misses, helper: helpers.load, op: opPtr, k: k)
    }

    private mutating func emitStore(_ opPtr: UnsafeMutablePointer<Op>, k: Int, size: X86Size, fp: Bool) {
        let o = opPtr.pointee
        let misses = [tlbLookup(o, size: size, tagsField: StateLayout.writeTags)]
        var value = X86Reg.rax
        if fp {
            e.load(.rax, Self.fr(o.rs2))
        } else if let c = cachedHost[Int(o.rs2)] {
            value = c
        } else {
            gload(.rax, o.rs2)
        }
        e.store(X86Mem(.rdx, index: .rsi, scale: 0), value, size)
        slowPath(misses: misses, helper: helpers.store, op: opPtr, k: k)
    }

    /// Defers the TLB-miss path, `helper(state, op, va)`: it returns to the current position,
    /// or leaves the block on a trap or when the access overwrote translated code.
    private mutating func slowPath(misses: [Int], helper: UInt64, op: UnsafeMutablePointer<Op>, k: Int) {
        deferred.append(.helper(misses: misses, resume: e.position, address: helper, op: op, k: k,
                                retired: retired, memory: true))
    }
}

/// Integer division and remainder with RISC-V's results for division by zero and overflow.
func jitDivRem(_ x: UInt64, _ y: UInt64, _ kind: OpKind) -> UInt64 {
    switch kind {
    case .div:
        let a = Int64(bitPattern: x), b = Int64(bitPattern: y)
        return b == 0 ? .max : (a == .min && b == -1) ? UInt64(bitPattern: a) : UInt64(bitPattern: a / b)
    case .divu:
        return y == 0 ? .max : x / y
    case .rem:
        let a = Int64(bitPattern: x), b = Int64(bitPattern: y)
        return b == 0 ? UInt64(bitPattern: a) : (a == .min && b == -1) ? 0 : UInt64(bitPattern: a % b)
    case .remu:
        return y == 0 ? x : x % y
    case .divw:
        let a = Int32(truncatingIfNeeded: x), b = Int32(truncatingIfNeeded: y)
        let q: Int32 = b == 0 ? -1 : (a == .min && b == -1) ? a : a / b
        return UInt64(bitPattern: Int64(q))
    case .divuw:
        let a = UInt32(truncatingIfNeeded: x), b = UInt32(truncatingIfNeeded: y)
        return sx32(b == 0 ? .max : a / b)
    case .remw:
        let a = Int32(truncatingIfNeeded: x), b = Int32(truncatingIfNeeded: y)
        let m: Int32 = b == 0 ? a : (a == .min && b == -1) ? 0 : a % b
        return UInt64(bitPattern: Int64(m))
    default:
        let a = UInt32(truncatingIfNeeded: x), b = UInt32(truncatingIfNeeded: y)
        return sx32(b == 0 ? a : a % b)
    }
}
