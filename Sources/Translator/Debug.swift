import Machine

/// What a debugger asks of a hart: breakpoints, watchpoints and single-stepping.
///
/// While any of them is active the hart runs one instruction per block on the interpreter (the
/// JIT and block chaining are bypassed), checks the breakpoints before each instruction and the
/// watchpoints against each instruction's memory access, so a stop is exact whatever the engine.
public struct DebugRequest: Sendable, Equatable {
    /// Virtual PCs that stop the hart before the instruction there executes.
    public var breakpoints: Set<UInt64> = []
    /// Watched virtual address ranges.
    public var watchpoints: [Watchpoint] = []
    /// Execute one instruction (or take one trap), then stop.
    public var singleStep = false

    public init() {}

    /// Whether the hart must run in the exact, one-instruction-at-a-time mode.
    public var isActive: Bool { !breakpoints.isEmpty || !watchpoints.isEmpty || singleStep }
}

/// A watched range of guest virtual memory.
public struct Watchpoint: Sendable, Equatable, Hashable {
    /// Which accesses stop the hart.
    public enum Kind: Sendable, Equatable, Hashable {
        case write, read, access
    }
    public var address: UInt64
    public var length: UInt64
    public var kind: Kind

    public init(address: UInt64, length: UInt64, kind: Kind) {
        self.address = address
        self.length = length
        self.kind = kind
    }
}

/// Why a hart stopped for its debugger.
public enum DebugStop: Sendable, Equatable {
    /// Before the instruction at a breakpoint.
    case breakpoint
    /// Before an instruction whose access touches a watchpoint (at `address`, the watched
    /// range's start).
    case watchpoint(Watchpoint.Kind, address: UInt64)
    /// After one step.
    case step
}

extension Hart {
    /// Sets what the debugger asks of this hart. Control thread, hart out of `run()`.
    /// Entering or leaving the exact mode drops every translation (blocks are one instruction
    /// long in it).
    public func setDebugRequest(_ request: DebugRequest) {
        debugRequest = request
        debugStop = nil
        let exact = request.isActive || triggersArmed
        if exact != exactMode {
            exactMode = exact
            flushAllTranslations()
        }
    }

    /// The current debugger request.
    public var currentDebugRequest: DebugRequest { debugRequest }

    /// Why the hart last stopped for its debugger (nil: it did not). Read while it is out of
    /// `run()`; cleared by `setDebugRequest`.
    public var lastDebugStop: DebugStop? { debugStop }

    /// One turn of the run loop in the exact mode: interrupts as `runSlice` takes them, then
    /// one instruction, with breakpoints checked before it and watchpoints against its access.
    /// Returns a stop, or nil to go on.
    func runDebugStep() -> DebugStop? {
        let lines = interrupts
        checkCodeEpoch()
        lines.kick.store(false, ordering: .relaxed)
        pollToHost()
        pollTimer()
        if takePendingInterrupt() {
            waitingForInterrupt = false
            if debugRequest.singleStep { return .step }
        }
        if waitingForInterrupt {
            if pendingAndEnabledLocally() != 0 {
                waitingForInterrupt = false
            } else {
                sleepUntilInterrupt()
                return nil
            }
        }
        let pc = pcValue
        if debugRequest.breakpoints.contains(pc) && !debugSkipBreakpoint {
            return .breakpoint
        }
        debugSkipBreakpoint = false
        if triggersArmed && triggerFires(execute: true, address: pc) {
            raise(.breakpoint, tval: pc, pc: pc)
            trapped = false
            return debugRequest.singleStep ? .step : nil
        }
        let index = lookupBlock(pc)
        if index < 0 { return debugRequest.singleStep ? .step : nil }  // fetch fault taken
        let op = ops[Int(blocks[Int(index)].opStart)]
        if !debugRequest.watchpoints.isEmpty, let hit = watchHit(op) {
            return hit
        }
        if triggersArmed, let (address, _, reads, writes) = access(of: op),
           (reads && triggerFires(load: true, address: address)) || (writes && triggerFires(store: true, address: address)) {
            raise(.breakpoint, tval: address, pc: pc)
            trapped = false
            return debugRequest.singleStep ? .step : nil
        }
        previousBlock = -1
        _ = execute(index, base: pc, budget: 1)
        return debugRequest.singleStep ? .step : nil
    }

    /// The watchpoint an op's memory access touches, if any.
    private func watchHit(_ o: Op) -> DebugStop? {
        guard let (address, size, reads, writes) = access(of: o) else { return nil }
        for w in debugRequest.watchpoints where address < w.address &+ w.length && w.address < address &+ size {
            switch w.kind {
            case .write where writes, .read where reads, .access where reads || writes:
                return .watchpoint(w.kind, address: w.address)
            default: continue
            }
        }
        return nil
    }

    /// Whether an enabled mcontrol trigger matches (equal address, current privilege; in
    /// M-mode only while `mstatus.MIE` is set, so a handler cannot re-trigger itself).
    func triggerFires(execute: Bool = false, load: Bool = false, store: Bool = false, address: UInt64) -> Bool {
        if privilege == .machine && mstatus & MStatus.mie == 0 { return false }
        let modeBit: UInt64 = privilege == .machine ? 1 << 6 : privilege == .supervisor ? 1 << 4 : 1 << 3
        for i in 0..<Hart.triggerCount {
            let t = tdata1[i]
            guard t & modeBit != 0, tdata2[i] == address else { continue }
            if (execute && t & 4 != 0) || (store && t & 2 != 0) || (load && t & 1 != 0) { return true }
        }
        return false
    }

    /// The virtual address, size and direction of an op's data access, if it has one.
    private func access(of o: Op) -> (UInt64, UInt64, Bool, Bool)? {
        var address = x[Int(o.rs1)]
        let size: UInt64
        var reads = false, writes = false
        switch o.kind {
        case .lb, .lbu: size = 1; reads = true
        case .lh, .lhu, .flh: size = 2; reads = true
        case .lw, .lwu, .flw: size = 4; reads = true
        case .ld, .fld: size = 8; reads = true
        case .sb: size = 1; writes = true
        case .sh, .fsh: size = 2; writes = true
        case .sw, .fsw: size = 4; writes = true
        case .sd, .fsd: size = 8; writes = true
        case .lr: size = UInt64(o.imm); reads = true
        case .sc: size = UInt64(o.imm); writes = true
        case .amo: size = UInt64(o.imm); reads = true; writes = true
        case .cbo:
            size = ISAExtensions.cacheBlockSize
            address &= ~(size - 1)
            writes = o.imm == 4
        default: return nil
        }
        switch o.kind {
        case .lr, .sc, .amo, .cbo: break
        default: address &+= UInt64(bitPattern: o.imm)
        }
        return (address, size, reads, writes)
    }

    /// After a stop at a breakpoint the debugger resumes at the same PC: the first instruction
    /// then runs without stopping again. Control thread, hart out of `run()`.
    public func skipBreakpointOnce() { debugSkipBreakpoint = true }

    // MARK: Inspection for a debugger (control thread, hart out of `run()`)

    /// The physical address `va` maps to for the hart's current data accesses, ignoring
    /// permissions and without touching A/D bits; nil when unmapped.
    public func debugTranslate(_ va: UInt64) -> UInt64? {
        if dataMMUIndex == 3 { return va }
        let mode = satp >> 60
        if mode == 0 { return va }
        let levels = mode == 9 ? 4 : 3
        let vaBits = 12 + 9 * levels
        let shifted = (Int64(bitPattern: va) << Int64(64 - vaBits)) >> Int64(64 - vaBits)
        guard UInt64(bitPattern: shifted) == va else { return nil }
        var table = (satp & 0xfff_ffff_ffff) << 12
        var level = levels - 1
        while true {
            let vpn = (va >> UInt64(12 + 9 * level)) & 0x1ff
            guard let p = ram.hostPointer(GuestPhysicalAddress(table &+ vpn &* 8), length: 8) else { return nil }
            let pte = p.load(as: UInt64.self)
            if pte & 1 == 0 { return nil }
            if pte & 0xa == 0 {
                if level == 0 { return nil }
                level -= 1
                table = ((pte >> 10) & 0xfff_ffff_ffff) << 12
                continue
            }
            var ppn = (pte >> 10) & 0xfff_ffff_ffff
            if pte >> 63 != 0 && level == 0 { ppn = (ppn & ~0xf) | ((va >> 12) & 0xf) }
            let offsetMask: UInt64 = (1 << UInt64(12 + 9 * level)) - 1
            return ((ppn << 12) & ~offsetMask) | (va & offsetMask)
        }
    }

    /// Reads guest memory at virtual `va` through the current translation (RAM only); nil
    /// when some byte is unmapped or not RAM.
    public func debugRead(_ va: UInt64, length: Int) -> [UInt8]? {
        var out = [UInt8]()
        out.reserveCapacity(length)
        var a = va
        var left = length
        while left > 0 {
            let chunk = min(left, Int(4096 - (a & 0xfff)))
            guard let pa = debugTranslate(a), let p = ram.hostPointer(GuestPhysicalAddress(pa), length: UInt64(chunk)) else {
                return nil
            }
            out += UnsafeRawBufferPointer(start: p, count: chunk)
            a &+= UInt64(chunk)
            left -= chunk
        }
        return out
    }

    /// Writes guest memory at virtual `va` through the current translation (RAM only),
    /// dropping translations of code it overwrites. Returns false (writing nothing) when some
    /// byte is unmapped or not RAM.
    public func debugWrite(_ va: UInt64, bytes: [UInt8]) -> Bool {
        var pieces: [(UnsafeMutableRawPointer, UInt64, Range<Int>)] = []
        var a = va
        var done = 0
        while done < bytes.count {
            let chunk = min(bytes.count - done, Int(4096 - (a & 0xfff)))
            guard let pa = debugTranslate(a), let p = ram.hostPointer(GuestPhysicalAddress(pa), length: UInt64(chunk)) else {
                return false
            }
            pieces.append((p, pa, done..<(done + chunk)))
            a &+= UInt64(chunk)
            done += chunk
        }
        for (p, pa, range) in pieces {
            bytes[range].withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: range.count) }
            let page = (pa &- ram.base.raw) >> 12
            if codePages[Int(page)] != 0 { invalidateCode(physicalPage: page) }
            blockInvalidated = false
        }
        return true
    }

    /// Integer register `i` (0…31), the pc (32), or FP register (33…64) as GDB numbers them.
    public func debugRegister(_ n: Int) -> UInt64? {
        switch n {
        case 0: return 0
        case 1...31: return x[n]
        case 32: return pcValue
        case 33...64: return f[n - 33]
        default: return nil
        }
    }

    /// Writes a register numbered as in `debugRegister`; false for an unknown number.
    public func setDebugRegister(_ n: Int, _ v: UInt64) -> Bool {
        switch n {
        case 0: return true
        case 1...31: x[n] = v
        case 32:
            pcValue = v & ~1
        case 33...64:
            f[n - 33] = v
        default: return false
        }
        return true
    }

    /// Reads CSR `csr` as M-mode would (nil when it does not exist).
    public func debugReadCSR(_ csr: Int) -> UInt64? {
        let saved = privilege
        privilege = .machine
        defer { privilege = saved }
        if csr == CSRNumber.fflags || csr == CSRNumber.frm || csr == CSRNumber.fcsr {
            // Readable even while the FPU is off; `run()` folded the host's sticky flags into
            // fflags when it returned (the control thread's own flags must not be read).
            switch csr {
            case CSRNumber.fflags: return fflags
            case CSRNumber.frm: return frm
            default: return (frm << 5) | fflags
            }
        }
        return readCSR(csr)
    }

    /// Writes CSR `csr` as M-mode would; false when it does not exist or is read-only.
    public func debugWriteCSR(_ csr: Int, _ v: UInt64) -> Bool {
        if (csr >> 10) == 3 { return false }
        let saved = privilege
        privilege = .machine
        let ok = writeCSR(csr, csr == CSRNumber.minstret || csr == CSRNumber.mcycle ? v &+ 1 : v)
        privilege = saved
        updateMMUContext()
        return ok
    }

    /// The privilege level (0 U, 1 S, 3 M).
    public var debugPrivilege: UInt64 { privilege.rawValue }

    /// Sets the privilege level (GDB's `priv` register); false for the reserved value 2.
    public func setDebugPrivilege(_ v: UInt64) -> Bool {
        guard let p = Privilege(rawValue: v) else { return false }
        privilege = p
        updateMMUContext()
        return true
    }
}
