import Foundation
import Machine

/// One RV64GC hart: the reference execution engine (pre-decoded translation blocks, a soft TLB,
/// block chaining). A later JIT is tested against it.
///
/// Threading: owned by its vCPU thread. `run()` executes there; `reset` and the inspection
/// properties are called by the control thread only while `run()` is not executing. Devices
/// reach the hart only through its `HartInterrupts`.
public final class Hart: VirtualCPU {
    public let hartID: Int
    public let interrupts: HartInterrupts
    let ram: GuestRAM
    let bus: MemoryBus
    let clock: VirtualClock

    // MARK: Hot state (one raw allocation at fixed offsets, see `StateLayout`)

    let state: UnsafeMutableRawPointer
    /// x0…x31 and the x0 sink at index 32.
    let x: UnsafeMutablePointer<UInt64>
    /// f0…f31 as raw 64-bit patterns.
    let f: UnsafeMutablePointer<UInt64>

    var pcValue: UInt64 {
        get { state.load(fromByteOffset: StateLayout.pc, as: UInt64.self) }
        set { state.storeBytes(of: newValue, toByteOffset: StateLayout.pc, as: UInt64.self) }
    }

    var privilege: Privilege {
        get { Privilege(rawValue: state.load(fromByteOffset: StateLayout.privilege, as: UInt64.self)) ?? .machine }
        set { state.storeBytes(of: newValue.rawValue, toByteOffset: StateLayout.privilege, as: UInt64.self) }
    }

    /// A 64-bit field of the hot state at a `StateLayout` offset.
    @inline(__always) func hot(_ offset: Int) -> UInt64 { state.load(fromByteOffset: offset, as: UInt64.self) }
    @inline(__always) func setHot(_ offset: Int, _ v: UInt64) { state.storeBytes(of: v, toByteOffset: offset, as: UInt64.self) }

    // MARK: CSRs

    var mstatus: UInt64 {
        get { hot(StateLayout.mstatus) }
        set { setHot(StateLayout.mstatus, newValue) }
    }
    var misa: UInt64 = Hart.misaValue
    var medeleg: UInt64 = 0
    var mideleg: UInt64 = 0
    var mie: UInt64 = 0
    /// Software-writable pending bits (SSIP, STIP, SEIP); device lines are ORed in on read.
    var mipSoftware: UInt64 = 0
    /// MTIP as last computed from the clock and `mtimecmp`.
    var mtipLevel = false
    var mtvec: UInt64 = 0
    var mcounteren: UInt64 = 0
    var mscratch: UInt64 = 0
    var mepc: UInt64 = 0
    var mcause: UInt64 = 0
    var mtval: UInt64 = 0
    var menvcfg: UInt64 = 0
    /// Sstc's supervisor timer compare value.
    var stimecmp: UInt64 = .max
    /// STIP as last computed from the clock and `stimecmp` (used while `menvcfg.STCE` is set).
    var stipLevel = false
    var mcountinhibit: UInt64 = 0
    var stvec: UInt64 = 0
    var scounteren: UInt64 = 0
    var senvcfg: UInt64 = 0
    var sscratch: UInt64 = 0
    var sepc: UInt64 = 0
    var scause: UInt64 = 0
    var stval: UInt64 = 0
    var satp: UInt64 = 0
    var pmpcfg = [UInt64](repeating: 0, count: 8)
    var pmpaddr = [UInt64](repeating: 0, count: 64)
    /// fflags (low 5 bits) as last synchronised with the host's sticky exception flags.
    var fflags: UInt64 {
        get { hot(StateLayout.fflags) }
        set { setHot(StateLayout.fflags, newValue) }
    }
    var frm: UInt64 {
        get { hot(StateLayout.frm) }
        set { setHot(StateLayout.frm, newValue) }
    }
    /// Instructions retired since reset.
    var instret: UInt64 {
        get { hot(StateLayout.instret) }
        set { setHot(StateLayout.instret, newValue) }
    }

    // MARK: Reservation (LR/SC)

    var reservation: UInt64 = .max
    /// The value LR read at the reservation; SC compares against it.
    var reservationValue: UInt64 = 0

    // MARK: Execution bookkeeping

    /// Set when a trap was taken inside a helper; the executor leaves the block.
    var trapped = false
    /// Set when a store invalidated translated code; the executor leaves the block.
    var blockInvalidated = false
    /// Set by `wfi`; the run loop sleeps until an interrupt is pending.
    var waitingForInterrupt = false

    // MARK: Debugger

    /// Breakpoints, watchpoints and stepping (`Debug.swift`); set while out of `run()`.
    var debugRequest = DebugRequest()
    /// Why `run()` last stopped for the debugger.
    var debugStop: DebugStop?
    /// Run the instruction at the current PC even if it has a breakpoint (once).
    var debugSkipBreakpoint = false
    /// Whether blocks are one instruction long (a debugger's request or an armed trigger);
    /// changed only between runs of blocks, with every translation dropped.
    var exactMode = false

    // MARK: Sdtrig

    /// The trigger module: `Hart.triggerCount` mcontrol (type 2) triggers, `tselect` picking one.
    static let triggerCount = 2
    var tselect: UInt64 = 0
    var tdata1 = [UInt64](repeating: 0, count: Hart.triggerCount)
    var tdata2 = [UInt64](repeating: 0, count: Hart.triggerCount)
    /// Whether some trigger matches executes, loads or stores (and so needs the exact mode).
    var triggersArmed: Bool { tdata1.contains { $0 & 7 != 0 } }
    /// The mcontrol bits a trigger keeps (M, S, U, execute, store, load); the rest of a
    /// type-2 `tdata1` reads as zero.
    static let mcontrolBits: UInt64 = 0x5f
    /// Whether `v` is a `tdata1` the WARL write can leave: no trigger, or an mcontrol with only
    /// `mcontrolBits`.
    static func isValidTData1(_ v: UInt64) -> Bool { v == 0 || v & ~mcontrolBits == 2 << 60 }
    /// Called on the vCPU thread when the hart stops for its debugger (with the hart id); the
    /// hart then waits in `run()` until asked to exit. Set while out of `run()`.
    public var debugStopHandler: (@Sendable (Int) -> Void)?

    /// A Spike-style `tohost` word in RAM (at a program's `tohost` symbol) and what a nonzero
    /// value written there means; checked between runs of blocks (a program writing it spins
    /// until it is cleared). Set while out of `run()`.
    var toHost: (word: UnsafeMutableRawPointer, handle: @Sendable (UInt64) -> Void)?

    /// Serves HTIF requests written to the RAM word at `address` (cleared once taken) through
    /// `handle`; nil stops. Control thread, hart out of `run()`.
    public func watchToHost(at address: GuestPhysicalAddress?, handle: @escaping @Sendable (UInt64) -> Void) {
        guard let address, let p = ram.hostPointer(address, length: 8) else {
            toHost = nil
            return
        }
        toHost = (p, handle)
    }
    /// The last block `execute` ran, and the chain slot it left through (-1: do not chain).
    var lastBlock: Int32 = -1
    var previousBlock: Int32 = -1
    var previousSlot = -1
    /// The host rounding mode currently programmed (RISC-V encoding).
    var hostRoundingMode: UInt64 {
        get { hot(StateLayout.hostRoundingMode) }
        set { setHot(StateLayout.hostRoundingMode, newValue) }
    }
    /// Set when the hart's state was replaced from another thread (reset, state load): the
    /// vCPU thread's host rounding mode and sticky flags (both per thread) are reprogrammed
    /// when `run()` next starts.
    var hostFPUStale = true

    // MARK: Soft TLB

    static let tlbEntries = 256
    /// Tags (virtual page numbers) per [mmu index][access type][entry]; `.max` is empty.
    let tlbTags: UnsafeMutablePointer<UInt64>
    /// Host address minus virtual address of the page, per entry (in the tags' allocation).
    let tlbAddends: UnsafeMutablePointer<Int>
    /// Bytes from a TLB tag to its addend.
    static let tlbAddendDistance = 4 * 3 * tlbEntries * MemoryLayout<UInt64>.stride
    /// The current MMU index for data accesses and for fetch (0 U, 1 S, 2 S+SUM, 3 M).
    var dataMMUIndex = 3
    var fetchMMUIndex = 3

    // MARK: Translation-block cache

    static let maxBlocks = 1 << 16
    static let maxOps = 1 << 20
    static let maxOpsPerBlock = 128
    let blocks: UnsafeMutablePointer<TranslationBlock>
    let ops: UnsafeMutablePointer<Op>
    var blockCount = 0
    var opCount = 0
    /// Physical PC and privilege -> block index.
    var blockByPhysical: [UInt64: Int32] = [:]
    /// Physical page -> blocks that contain code from it.
    var blocksByPage: [UInt64: [Int32]] = [:]
    /// The shared map of RAM pages holding translated code (see `GuestRAM.codePages`).
    let codePages: UnsafeMutablePointer<UInt8>
    /// `GuestRAM.codeEpoch` as of this hart's last write-TLB flush.
    var seenCodeEpoch: UInt64 = 0
    /// Virtual-PC jump cache per fetch MMU index: tag (virtual PC) and block index.
    static let jumpCacheSize = 4096
    let jumpTags: UnsafeMutablePointer<UInt64>
    let jumpBlocks: UnsafeMutablePointer<Int32>
    /// Bumped whenever translations may have changed (satp, sfence.vma, flush); chains made
    /// under an older epoch are ignored.
    var mmuEpoch: UInt32 {
        get { state.load(fromByteOffset: StateLayout.mmuEpoch, as: UInt32.self) }
        set { state.storeBytes(of: newValue, toByteOffset: StateLayout.mmuEpoch, as: UInt32.self) }
    }
    /// Virtual pages (by `vpn & 4095`, one bit each) that chains may lead into since the last
    /// epoch change: an `sfence.vma` of any other page leaves the chains alone.
    let linkedPages: UnsafeMutablePointer<UInt64>
    /// The region (`va & superpageMask == superpageBase`) covering every superpage translated
    /// since the last full flush, when `hasSuperpages`: an `sfence.vma` inside it flushes all.
    var hasSuperpages = false
    var superpageBase: UInt64 = 0
    var superpageMask: UInt64 = 0
    /// Pages devices wrote behind this hart's back; drained at `fence.i`.
    let externalWrites: ExternalWriteLog
    /// Called with the virtual PC before each block executes, when set (debug tracing, like
    /// QEMU's `-d exec`). Costs one nil check per block when unset.
    public var blockTrace: ((UInt64) -> Void)?
    /// Statistics for tests and benchmarks.
    public internal(set) var blocksTranslated = 0
    public internal(set) var blocksInvalidated = 0
    /// Bytes of host code the JIT generated since the hart was created.
    public internal(set) var jitBytes = 0
    /// Times every translation was dropped (reset, or the block pool or code cache full).
    public internal(set) var translationFlushes = 0

    // MARK: JIT

    /// The engine that actually runs this hart (the JIT falls back to the interpreter when the
    /// host cannot run it).
    public let engine: ExecutionEngine
    /// The ISA extensions this hart runs with (fixed for its lifetime).
    public let extensions: ISAExtensions
    /// Generated code (JIT engine only).
    let codeCache: CodeCache?
    let jitHelpers: JITHelpers
    /// Size of each hart's code cache.
    static let defaultCodeCacheSize = 32 << 20

    /// Creates a hart in its reset state, stopped at address 0 in M-mode, executing with
    /// `engine` when the host supports it (else with the interpreter).
    /// `extensions` narrows the ISA (every implemented extension by default).
    public convenience init(hartID: Int, ram: GuestRAM, bus: MemoryBus, interrupts: HartInterrupts,
                            clock: VirtualClock, engine: ExecutionEngine = .hostDefault,
                            extensions: ISAExtensions = .all) {
        self.init(hartID: hartID, ram: ram, bus: bus, interrupts: interrupts, clock: clock, engine: engine,
                  codeCacheSize: Self.defaultCodeCacheSize, extensions: extensions)
    }

    /// As the public initializer, with the JIT's code cache size (tests use small ones to make
    /// the cache fill and flush).
    init(hartID: Int, ram: GuestRAM, bus: MemoryBus, interrupts: HartInterrupts, clock: VirtualClock,
         engine: ExecutionEngine, codeCacheSize: Int, extensions: ISAExtensions = .all) {
        self.extensions = extensions
        if engine == .jit && ExecutionEngine.jitSupported, let cache = CodeCache(size: codeCacheSize) {
            codeCache = cache
            self.engine = .jit
        } else {
            codeCache = nil
            self.engine = .interpreter
        }
        jitHelpers = JITHelpers()
        self.hartID = hartID
        self.ram = ram
        self.bus = bus
        self.interrupts = interrupts
        self.clock = clock
        externalWrites = ram.addExternalWriteLog()
        state = UnsafeMutableRawPointer.allocate(byteCount: StateLayout.size, alignment: 64)
        state.initializeMemory(as: UInt8.self, repeating: 0, count: StateLayout.size)
        x = (state + StateLayout.x).assumingMemoryBound(to: UInt64.self)
        f = (state + StateLayout.f).assumingMemoryBound(to: UInt64.self)
        let tlbCount = 4 * 3 * Self.tlbEntries
        // One allocation: the addends sit `tlbAddendDistance` bytes after their tags, so the
        // JIT reaches both from one base.
        tlbTags = .allocate(capacity: 2 * tlbCount)
        tlbTags.initialize(repeating: .max, count: tlbCount)
        tlbAddends = UnsafeMutableRawPointer(tlbTags + tlbCount).bindMemory(to: Int.self, capacity: tlbCount)
        tlbAddends.initialize(repeating: 0, count: tlbCount)
        blocks = .allocate(capacity: Self.maxBlocks)
        blocks.initialize(repeating: TranslationBlock(), count: Self.maxBlocks)
        ops = .allocate(capacity: Self.maxOps)
        ops.initialize(repeating: Op(), count: Self.maxOps)
        codePages = ram.codePages
        jumpTags = .allocate(capacity: 4 * Self.jumpCacheSize)
        jumpTags.initialize(repeating: .max, count: 4 * Self.jumpCacheSize)
        jumpBlocks = .allocate(capacity: 4 * Self.jumpCacheSize)
        jumpBlocks.initialize(repeating: -1, count: 4 * Self.jumpCacheSize)
        linkedPages = .allocate(capacity: 64)
        linkedPages.initialize(repeating: 0, count: 64)
        privilege = .machine
        mmuEpoch = 1
        state.storeBytes(of: Unmanaged.passUnretained(self).toOpaque(), toByteOffset: StateLayout.hart,
                         as: UnsafeMutableRawPointer.self)
        state.storeBytes(of: UnsafeMutableRawPointer(blocks), toByteOffset: StateLayout.blocks, as: UnsafeMutableRawPointer.self)
        state.storeBytes(of: codeCache?.executable, toByteOffset: StateLayout.codeBase, as: UnsafeMutableRawPointer?.self)
        updateMMUContext()
    }

    deinit {
        state.deallocate()
        tlbTags.deallocate()
        blocks.deallocate()
        ops.deallocate()
        jumpTags.deallocate()
        jumpBlocks.deallocate()
        linkedPages.deallocate()
    }

    public var pc: UInt64 { pcValue }
    public var instructionsRetired: UInt64 { instret }

    /// Reads integer register `i` (0…31).
    public func register(_ i: Int) -> UInt64 { i == 0 ? 0 : x[i] }
    /// Writes integer register `i` (1…31); writes to x0 are ignored.
    public func setRegister(_ i: Int, _ v: UInt64) { if i != 0 { x[i] = v } }
    /// Reads FP register `i` as raw bits.
    public func fpRegister(_ i: Int) -> UInt64 { f[i] }

    public func reset(entry: GuestPhysicalAddress, a0: UInt64, a1: UInt64, a2: UInt64) {
        for i in 0..<64 { x[i] = 0 }
        for i in 0..<32 { f[i] = 0 }
        x[10] = a0
        x[11] = a1
        x[12] = a2
        pcValue = entry.raw
        privilege = .machine
        mstatus = MStatus.uxl | MStatus.sxl
        medeleg = 0; mideleg = 0; mie = 0; mipSoftware = 0; mtipLevel = false
        mtvec = 0; mcounteren = 0; mscratch = 0; mepc = 0; mcause = 0; mtval = 0
        menvcfg = 0; mcountinhibit = 0; stimecmp = .max; stipLevel = false
        tselect = 0
        for i in 0..<Hart.triggerCount { tdata1[i] = 0; tdata2[i] = 0 }
        stvec = 0; scounteren = 0; senvcfg = 0; sscratch = 0; sepc = 0; scause = 0; stval = 0; satp = 0
        for i in pmpcfg.indices { pmpcfg[i] = 0 }
        for i in pmpaddr.indices { pmpaddr[i] = 0 }
        fflags = 0; frm = 0
        instret = 0
        reservation = .max
        waitingForInterrupt = false
        hostRoundingMode = 0
        hostFPUStale = true
        flushAllTranslations()
        updateMMUContext()
    }

    // MARK: Run loop

    /// Blocks run per turn of the run loop (JIT chains check for a kick only when they run
    /// out): at a few nanoseconds a block, interrupts wait microseconds at most, and the
    /// turn's own cost (clock read, interrupt check, block lookup, entering generated code)
    /// stays small.
    static let blocksPerTurn = 2048

    public func run() {
        let lines = interrupts
        if hostFPUStale {
            hostFPUStale = false
            setHostRounding(hostRoundingMode)
            clearHostFlags()
        }
        while true {
            if lines.exitRequest.load(ordering: .relaxed) {
                lines.exitRequest.store(false, ordering: .sequentiallyConsistent)
                // The guest's fflags may still sit in this thread's sticky host flags: fold
                // them in so that the state is complete while the hart is out of `run()`.
                syncFlags()
                return
            }
            let exact = debugRequest.isActive || triggersArmed
            if exact != exactMode {
                exactMode = exact
                flushAllTranslations()
            }
            if exact {
                if let stop = runDebugStep() {
                    debugStop = stop
                    syncFlags()
                    debugStopHandler?(hartID)
                    // Stay stopped until the machine pauses this hart.
                    while !lines.exitRequest.load(ordering: .relaxed) {
                        lines.waitForInterrupt(untilUptimeNanoseconds: nil)
                    }
                }
                continue
            }
            runSlice(budget: blockTrace == nil ? Self.blocksPerTurn : 1)
        }
    }

    /// One turn of the run loop: takes a deliverable interrupt (or sleeps in `wfi`), then runs
    /// at most `budget` blocks (fewer when kicked or when a block leaves for the run loop).
    /// `run()` repeats it; the differential tests call it with a budget of 1 to compare the
    /// engines after every block.
    func runSlice(budget: Int) {
        let lines = interrupts
        // Between runs of blocks (at most `blocksPerTurn` blocks apart, or sooner when kicked): see
        // code-page changes, the timer and any interrupt that became deliverable.
        checkCodeEpoch()
        lines.kick.store(false, ordering: .relaxed)
        pollToHost()
        pollTimer()
        if takePendingInterrupt() { waitingForInterrupt = false }
        if waitingForInterrupt {
            if pendingAndEnabledLocally() != 0 {
                waitingForInterrupt = false
            } else {
                sleepUntilInterrupt()
                return
            }
        }
        // Execute a run of blocks; `execute` follows chains itself.
        let pc = pcValue
        let index = lookupBlock(pc)
        if index < 0 { return }  // fetch fault taken
        blockTrace?(pc)
        linkPrevious(to: index, pc: pc)
        if let cache = codeCache {
            previousSlot = executeJIT(index, base: pc, budget: budget, cache: cache)
        } else {
            previousSlot = execute(index, base: pc, budget: budget)
        }
        previousBlock = lastBlock
    }

    /// Takes a request written to the `tohost` word, if one is watched and nonzero.
    @inline(__always) func pollToHost() {
        if let t = toHost {
            let v = t.word.load(as: UInt64.self)
            if v != 0 {
                t.word.storeBytes(of: 0, as: UInt64.self)
                t.handle(v)
            }
        }
    }

    /// Drops write-TLB entries when another hart (or this one) turned a page into code.
    @inline(__always) func checkCodeEpoch() {
        let e = ram.codeEpoch.load(ordering: .acquiring)
        if e != seenCodeEpoch {
            seenCodeEpoch = e
            flushWriteTLB()
        }
    }

    /// Chains the block the run loop last left (through `previousSlot`) to `index`.
    private func linkPrevious(to index: Int32, pc: UInt64) {
        if previousBlock >= 0 && previousSlot >= 0 && blocks[Int(previousBlock)].valid {
            link(previousBlock, slot: previousSlot, to: index, pc: pc)
        }
        previousBlock = -1
    }

    func link(_ from: Int32, slot: Int, to: Int32, pc: UInt64) {
        let p = blocks + Int(from)
        if p.pointee.chainEpoch != mmuEpoch {
            p.pointee.chainEpoch = mmuEpoch
            p.pointee.chainTB = (-1, -1)
        }
        if slot == 0 { p.pointee.chainTB.0 = to; p.pointee.chainPC.0 = pc }
        else { p.pointee.chainTB.1 = to; p.pointee.chainPC.1 = pc }
        let bit = Int((pc >> 12) & 4095)
        linkedPages[bit >> 6] |= 1 << UInt64(bit & 63)
        if let cache = codeCache {
            let site = slot == 0 ? p.pointee.jitSites.0 : p.pointee.jitSites.1
            let target = blocks[Int(to)].jitCode
            // A site without a PC check takes only the block its own page holds at its target.
            let samePage = slot == 0 ? p.pointee.jitSamePageTargets.0 : p.pointee.jitSamePageTargets.1
            let fits = samePage < 0 || (blocks[Int(to)].physicalPC == (p.pointee.physicalPC & ~0xfff) + UInt64(samePage)
                                        && blocks[Int(to)].privilege == p.pointee.privilege)
            if site >= 0 && target >= 0 && fits {
                BlockCompiler.patchChain(cache, site: Int(site), epoch: mmuEpoch, pc: pc, target: Int(target))
            }
        }
    }

    // MARK: Interrupts

    /// Recomputes MTIP from the virtual clock and this hart's `mtimecmp`.
    /// `VirtualClock` computes in integers only, so no host FPU flags need guarding here.
    /// With Sstc enabled (`menvcfg.STCE`), STIP likewise comes from `stimecmp`.
    func pollTimer() {
        let now = clock.ticks
        mtipLevel = now >= interrupts.mtimecmp.load(ordering: .relaxed)
        stipLevel = now >= stimecmp
    }

    /// Whether Sstc's timer drives STIP (`menvcfg.STCE`).
    @inline(__always) var sstcEnabled: Bool { menvcfg & EnvCfg.stce != 0 }

    /// The `mip` value as the guest sees it. While `menvcfg.STCE` is set, STIP is the
    /// comparison of `time` with `stimecmp`, and the software-written STIP bit is ignored.
    var mip: UInt64 {
        var software = mipSoftware
        if sstcEnabled { software = (software & ~Irq.sti) | (stipLevel ? Irq.sti : 0) }
        return software | (interrupts.lines.load(ordering: .relaxed) & (Irq.msi | Irq.mei | Irq.sei)) | (mtipLevel ? Irq.mti : 0)
    }

    /// Pending and individually enabled interrupts, ignoring global enables (what wakes `wfi`).
    func pendingAndEnabledLocally() -> UInt64 {
        pollTimer()
        return mip & mie
    }

    /// Takes the highest-priority deliverable interrupt, if any; returns true when one was taken.
    func takePendingInterrupt() -> Bool {
        let pending = mip & mie
        if pending == 0 { return false }
        let mEnabled = privilege != .machine || (mstatus & MStatus.mie) != 0
        let sEnabled = privilege == .user || (privilege == .supervisor && (mstatus & MStatus.sie) != 0)
        let toM = pending & ~mideleg
        let toS = pending & mideleg
        var chosen: UInt64 = 0
        if mEnabled && toM != 0 { chosen = toM }
        else if sEnabled && toS != 0 && privilege != .machine { chosen = toS }
        if chosen == 0 { return false }
        // Priority: MEI, MSI, MTI, SEI, SSI, STI.
        for cause: UInt64 in [11, 3, 7, 9, 1, 5] where chosen & (1 << cause) != 0 {
            takeTrap(cause: cause | (1 << 63), tval: 0, pc: pcValue)
            return true
        }
        return false
    }

    func sleepUntilInterrupt() {
        let saved = saveHostFlags()
        var cmp: UInt64 = .max
        if (mie & Irq.mti) != 0 { cmp = interrupts.mtimecmp.load(ordering: .relaxed) }
        if (mie & Irq.sti) != 0 && sstcEnabled { cmp = min(cmp, stimecmp) }
        let deadline = cmp != .max ? clock.hostDeadline(forTicks: cmp) : nil
        interrupts.waitForInterrupt(untilUptimeNanoseconds: deadline)
        restoreHostFlags(saved)
    }

    // MARK: Traps

    /// Enters the trap handler for `cause` (with bit 63 for interrupts), saving `pc`.
    func takeTrap(cause: UInt64, tval: UInt64, pc: UInt64) {
        let isInterrupt = cause >> 63 != 0
        let code = cause & 0x3f
        let delegated = privilege != .machine &&
            ((isInterrupt ? mideleg : medeleg) >> code) & 1 != 0
        if delegated {
            sepc = pc
            scause = cause
            stval = tval
            var s = mstatus
            s = (s & ~MStatus.spie) | ((s & MStatus.sie) != 0 ? MStatus.spie : 0)
            s &= ~MStatus.sie
            s = (s & ~MStatus.spp) | (privilege == .supervisor ? MStatus.spp : 0)
            mstatus = s
            privilege = .supervisor
            let base = stvec & ~3
            pcValue = (stvec & 1 != 0 && isInterrupt) ? base &+ 4 &* code : base
        } else {
            mepc = pc
            mcause = cause
            mtval = tval
            var s = mstatus
            s = (s & ~MStatus.mpie) | ((s & MStatus.mie) != 0 ? MStatus.mpie : 0)
            s &= ~MStatus.mie
            s = (s & ~MStatus.mpp) | (privilege.rawValue << MStatus.mppShift)
            mstatus = s
            privilege = .machine
            let base = mtvec & ~3
            pcValue = (mtvec & 1 != 0 && isInterrupt) ? base &+ 4 &* code : base
        }
        updateMMUContext()
    }

    /// Raises a synchronous exception at `pc`; the executor must leave the block.
    func raise(_ cause: Cause, tval: UInt64, pc: UInt64) {
        takeTrap(cause: cause.rawValue, tval: tval, pc: pc)
        trapped = true
    }

    func mret(pc: UInt64) {
        let s = mstatus
        let mpp = (s & MStatus.mpp) >> MStatus.mppShift
        var n = s
        n = (n & ~MStatus.mie) | ((s & MStatus.mpie) != 0 ? MStatus.mie : 0)
        n |= MStatus.mpie
        n &= ~MStatus.mpp
        let target = Privilege(rawValue: mpp) ?? .user
        if target != .machine { n &= ~MStatus.mprv }
        mstatus = n
        privilege = target
        pcValue = mepc
        updateMMUContext()
    }

    func sret(pc: UInt64) {
        let s = mstatus
        var n = s
        n = (n & ~MStatus.sie) | ((s & MStatus.spie) != 0 ? MStatus.sie : 0)
        n |= MStatus.spie
        n &= ~MStatus.spp
        n &= ~MStatus.mprv
        mstatus = n
        privilege = (s & MStatus.spp) != 0 ? .supervisor : .user
        pcValue = sepc
        updateMMUContext()
    }
}
