/// Which engine executes guest code.
public enum ExecutionEngine: String, Sendable, CaseIterable {
    /// The pre-decoded interpreter (`Execute.swift`): the reference, available on every host.
    case interpreter
    /// The x86-64 JIT (`JIT.swift`); falls back to the interpreter on other hosts.
    case jit

    /// Whether this host can run the JIT.
    public static var jitSupported: Bool {
        #if arch(x86_64)
        return true
        #else
        return false
        #endif
    }

    /// The engine used when a machine description does not choose one: the JIT where it
    /// runs, the interpreter elsewhere.
    public static var hostDefault: ExecutionEngine { jitSupported ? .jit : .interpreter }
}

/// The JIT's side of the hart: compiling blocks, running them, and the helpers compiled code
/// calls for the ops it does not emit itself. Runs on the hart's vCPU thread.
extension Hart {
    /// Calls `body` with the hart whose state block `state` is (as stored at
    /// `StateLayout.hart`), without retaining it: the hart outlives every call from its code.
    @inline(__always) static func withHart(_ state: UnsafeMutableRawPointer, _ body: (Hart) -> Int64) -> Int64 {
        Unmanaged<Hart>.fromOpaque(state.load(fromByteOffset: StateLayout.hart, as: UnsafeRawPointer.self))
            ._withUnsafeGuaranteedRef(body)
    }

    /// Compiles `block` (to become block `index`) into the code cache, setting its code offset
    /// and chain sites.
    func compileJIT(_ block: inout TranslationBlock, index: Int32, virtualPC: UInt64, _ cache: CodeCache) {
        let start = cache.used
        var c = BlockCompiler(emitter: cache.emitter(), helpers: jitHelpers, exitOffset: cache.exitOffset, blockIndex: index,
                              hasFMA: cache.hasFMA, pageOffset: Int(block.physicalPC & 0xfff))
        c.compile(ops: ops + Int(block.opStart), count: Int(block.opCount), byteLength: Int(block.byteLength))
        cache.commit(c.e)
        jitBytes += cache.used - start
        block.jitCode = Int32(start)
        block.jitSites = c.sites
        block.jitSamePageTargets = c.samePageTargets
        PerfMap.shared?.record(address: cache.code(at: start), bytes: cache.writable + start, size: c.e.position - start,
                               pc: block.physicalPC, virtualPC: virtualPC, privilege: block.privilege)
    }

    /// The JIT counterpart of `execute`: runs block `index` entered at virtual PC `base` and
    /// follows chains and the jump cache for up to `budget` blocks. Same results and contract.
    @inline(never)
    func executeJIT(_ index: Int32, base: UInt64, budget: Int, cache: CodeCache) -> Int {
        let lines = interrupts
        let jumpBase = fetchMMUIndex * Hart.jumpCacheSize
        let jumpMask = UInt64(Hart.jumpCacheSize - 1)
        let enter = cache.enter
        let st = state
        var index = index
        var budget = budget
        while true {
            setHot(StateLayout.budget, UInt64(bitPattern: Int64(budget)))
            let r = enter(st, cache.code(at: Int(blocks[Int(index)].jitCode)))
            // The code may have chained through other blocks: continue from the last one.
            index = st.load(fromByteOffset: StateLayout.lastBlock, as: Int32.self)
            lastBlock = index
            if r < 0 { return -1 }
            let block = blocks + Int(index)
            let slot = r == JITExit.indirect ? -1 : Int(r)
            budget = Int(Int64(bitPattern: hot(StateLayout.budget)))
            if budget <= 0 || lines.kick.load(ordering: .relaxed) { return slot }
            checkCodeEpoch()
            let next = pcValue
            if slot >= 0 && block.pointee.chainEpoch == mmuEpoch {
                let (c, cpc) = slot == 0 ? (block.pointee.chainTB.0, block.pointee.chainPC.0)
                                         : (block.pointee.chainTB.1, block.pointee.chainPC.1)
                if c >= 0 && cpc == next && blocks[Int(c)].valid {
                    index = c
                    continue
                }
            }
            let jc = jumpBase + Int((next >> 1) & jumpMask)
            if jumpTags[jc] == next {
                let c = jumpBlocks[jc]
                if blocks[Int(c)].valid {
                    if slot >= 0 { link(index, slot: slot, to: c, pc: next) }
                    index = c
                    continue
                }
            }
            return slot
        }
    }

    // MARK: Helpers (called from generated code)

    private static func accessSize(_ kind: OpKind) -> Int {
        switch kind {
        case .lb, .lbu, .sb: return 1
        case .lh, .lhu, .sh: return 2
        case .lw, .lwu, .sw, .flw, .fsw: return 4
        default: return 8
        }
    }

    /// A load after a TLB miss: performs it and writes the destination register.
    func jitLoadSlow(_ op: UnsafePointer<Op>, va: UInt64, pc: UInt64) -> Int64 {
        let o = op.pointee
        let v = loadSlow(va, size: Self.accessSize(o.kind), pc: pc)
        if trapped {
            trapped = false
            return JITStatus.trapped
        }
        let rd = Int(o.rd)
        switch o.kind {
        case .lb: x[rd] = UInt64(bitPattern: Int64(Int8(truncatingIfNeeded: v)))
        case .lh: x[rd] = UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: v)))
        case .lw: x[rd] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: v)))
        case .flw:
            f[rd] = v | 0xffff_ffff_0000_0000
            markFPDirty()
        case .fld:
            f[rd] = v
            markFPDirty()
        default: x[rd] = v
        }
        return JITStatus.next
    }

    /// A store after a TLB miss (or to a page holding code).
    func jitStoreSlow(_ op: UnsafePointer<Op>, va: UInt64, pc: UInt64) -> Int64 {
        let o = op.pointee
        let value = (o.kind == .fsw || o.kind == .fsd) ? f[Int(o.rs2)] : x[Int(o.rs2)]
        storeSlow(va, size: Self.accessSize(o.kind), value: value, pc: pc)
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

    /// LR, SC and AMOs, and the cache-block operations.
    func jitAtomic(_ op: UnsafePointer<Op>, pc: UInt64) -> Int64 {
        let o = op.pointee
        if !(o.kind == .cbo ? executeCBO(o, pc: pc) : executeAtomic(o, pc: pc)) { return JITStatus.trapped }
        if blockInvalidated {
            blockInvalidated = false
            pcValue = pc &+ UInt64(o.length)
            return JITStatus.leave
        }
        return JITStatus.next
    }

    /// Floating-point arithmetic, comparisons, conversions and moves, and the half-precision
    /// loads and stores (which the compiler does not emit inline).
    func jitFP(_ op: UnsafePointer<Op>, pc: UInt64) -> Int64 {
        let o = op.pointee
        if o.kind == .flh || o.kind == .fsh { return executeHalfMemory(o, pc: pc) }
        if !fpEnabled || !executeFP(o) {
            raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
            trapped = false
            return JITStatus.trapped
        }
        return JITStatus.next
    }

    /// System instructions, CSR accesses, and illegal instructions (including FP loads and
    /// stores while the FPU is off).
    func jitSystem(_ op: UnsafePointer<Op>, pc: UInt64) -> Int64 {
        let o = op.pointee
        switch o.kind {
        case .ecall:
            let cause: Cause = privilege == .user ? .ecallFromU : privilege == .supervisor ? .ecallFromS : .ecallFromM
            raise(cause, tval: 0, pc: pc)
        case .ebreak:
            raise(.breakpoint, tval: pc, pc: pc)
        case .fenceI:
            // Our own stores already invalidated what they overwrote; device DMA did not.
            if !externalWrites.isEmpty.load(ordering: .acquiring) {
                for page in externalWrites.drain() where page < ram.size >> 12 {
                    invalidateCode(physicalPage: page)
                }
                blockInvalidated = false
            }
            pcValue = pc &+ UInt64(o.length)
            return JITStatus.leave
        case .mret, .sret, .wfi, .sfenceVma, .sfenceInval:
            return executePrivileged(o, pc: pc) ? JITStatus.leave : JITStatus.trapped
        case .csrrw, .csrrs, .csrrc, .csrrwi, .csrrsi, .csrrci:
            if !executeCSR(o, pc: pc) {
                trapped = false
                return JITStatus.trapped
            }
            pcValue = pc &+ UInt64(o.length)
            return JITStatus.leave
        default:
            raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
        }
        trapped = false
        return JITStatus.trapped
    }
}
