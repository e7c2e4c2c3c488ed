import Machine

/// The saved state of one hart: every architectural register (x, f, pc, privilege, every CSR,
/// fflags and frm held explicitly, the Sdtrig trigger registers), the LR reservation and
/// whether the hart waits in `wfi`.
/// Translations, the soft TLB and the jump cache are caches and are rebuilt after a load.
public struct HartSavedState: DeviceState {
    /// Version 2 added `stimecmp` (Sstc); version 3 the Sdtrig triggers (`tselect`, `tdata1`,
    /// `tdata2`). Older versions load with `stimecmp` at its reset value and no trigger armed.
    public static let version: UInt32 = 3

    public var x: [UInt64]          // x1…x31 (x0 is zero)
    public var f: [UInt64]          // f0…f31, raw bits
    public var pc: UInt64
    public var privilege: UInt64
    public var mstatus: UInt64
    public var misa: UInt64
    public var medeleg: UInt64
    public var mideleg: UInt64
    public var mie: UInt64
    public var mipSoftware: UInt64
    public var mtvec: UInt64
    public var mcounteren: UInt64
    public var mscratch: UInt64
    public var mepc: UInt64
    public var mcause: UInt64
    public var mtval: UInt64
    public var menvcfg: UInt64
    public var mcountinhibit: UInt64
    public var stvec: UInt64
    public var scounteren: UInt64
    public var senvcfg: UInt64
    public var sscratch: UInt64
    public var sepc: UInt64
    public var scause: UInt64
    public var stval: UInt64
    public var satp: UInt64
    public var pmpcfg: [UInt64]     // 8 entries (even-numbered pmpcfg registers hold 8 each)
    public var pmpaddr: [UInt64]    // 64 entries
    public var fflags: UInt64
    public var frm: UInt64
    public var instret: UInt64
    public var reservation: UInt64
    public var reservationValue: UInt64
    public var waitingForInterrupt: Bool
    public var stimecmp: UInt64
    public var tselect: UInt64
    public var tdata1: [UInt64]     // `Hart.triggerCount` entries
    public var tdata2: [UInt64]     // `Hart.triggerCount` entries

    public func encode(to w: inout StateWriter) {
        w.u64s(x)
        w.u64s(f)
        for v in [pc, privilege, mstatus, misa, medeleg, mideleg, mie, mipSoftware, mtvec, mcounteren, mscratch,
                  mepc, mcause, mtval, menvcfg, mcountinhibit, stvec, scounteren, senvcfg, sscratch, sepc, scause,
                  stval, satp] {
            w.u64(v)
        }
        w.u64s(pmpcfg)
        w.u64s(pmpaddr)
        for v in [fflags, frm, instret, reservation, reservationValue] { w.u64(v) }
        w.bool(waitingForInterrupt)
        w.u64(stimecmp)
        w.u64(tselect)
        w.u64s(tdata1)
        w.u64s(tdata2)
    }

    public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
        x = try r.u64s("x", exactly: 31)
        f = try r.u64s("f", exactly: 32)
        pc = try r.u64("pc")
        privilege = try r.u64("privilege")
        mstatus = try r.u64("mstatus")
        misa = try r.u64("misa")
        medeleg = try r.u64("medeleg")
        mideleg = try r.u64("mideleg")
        mie = try r.u64("mie")
        mipSoftware = try r.u64("mip")
        mtvec = try r.u64("mtvec")
        mcounteren = try r.u64("mcounteren")
        mscratch = try r.u64("mscratch")
        mepc = try r.u64("mepc")
        mcause = try r.u64("mcause")
        mtval = try r.u64("mtval")
        menvcfg = try r.u64("menvcfg")
        mcountinhibit = try r.u64("mcountinhibit")
        stvec = try r.u64("stvec")
        scounteren = try r.u64("scounteren")
        senvcfg = try r.u64("senvcfg")
        sscratch = try r.u64("sscratch")
        sepc = try r.u64("sepc")
        scause = try r.u64("scause")
        stval = try r.u64("stval")
        satp = try r.u64("satp")
        pmpcfg = try r.u64s("pmpcfg", exactly: 8)
        pmpaddr = try r.u64s("pmpaddr", exactly: 64)
        fflags = try r.u64("fflags")
        frm = try r.u64("frm")
        instret = try r.u64("instret")
        reservation = try r.u64("reservation")
        reservationValue = try r.u64("reservation-value")
        waitingForInterrupt = try r.bool("wfi")
        stimecmp = version >= 2 ? try r.u64("stimecmp") : .max
        if version >= 3 {
            tselect = try r.u64("tselect")
            tdata1 = try r.u64s("tdata1", exactly: Hart.triggerCount)
            tdata2 = try r.u64s("tdata2", exactly: Hart.triggerCount)
        } else {
            tselect = 0
            tdata1 = [UInt64](repeating: 0, count: Hart.triggerCount)
            tdata2 = [UInt64](repeating: 0, count: Hart.triggerCount)
        }
    }

    init(_ h: Hart) {
        x = (1..<32).map { h.x[$0] }
        f = (0..<32).map { h.f[$0] }
        pc = h.pcValue
        privilege = h.privilege.rawValue
        mstatus = h.mstatus; misa = h.misa; medeleg = h.medeleg; mideleg = h.mideleg; mie = h.mie
        mipSoftware = h.mipSoftware; mtvec = h.mtvec; mcounteren = h.mcounteren; mscratch = h.mscratch
        mepc = h.mepc; mcause = h.mcause; mtval = h.mtval; menvcfg = h.menvcfg; mcountinhibit = h.mcountinhibit
        stvec = h.stvec; scounteren = h.scounteren; senvcfg = h.senvcfg; sscratch = h.sscratch; sepc = h.sepc
        scause = h.scause; stval = h.stval; satp = h.satp
        pmpcfg = h.pmpcfg; pmpaddr = h.pmpaddr
        fflags = h.fflags; frm = h.frm; instret = h.instret
        reservation = h.reservation; reservationValue = h.reservationValue
        waitingForInterrupt = h.waitingForInterrupt
        stimecmp = h.stimecmp
        tselect = h.tselect; tdata1 = h.tdata1; tdata2 = h.tdata2
    }

    /// Refuses values the hart could not hold (a hart never produces them), naming the field.
    func validate(section: String) throws(SavedStateError) {
        func bad(_ field: String, _ reason: String) -> SavedStateError {
            SavedStateError(section: section, field: field, reason: reason)
        }
        guard Privilege(rawValue: privilege) != nil else { throw bad("privilege", "\(privilege) is not 0, 1 or 3") }
        guard misa == Hart.misaValue else {
            throw bad("misa", "0x\(String(misa, radix: 16)) is not this CPU's (0x\(String(Hart.misaValue, radix: 16)))")
        }
        guard pc & 1 == 0 else { throw bad("pc", "0x\(String(pc, radix: 16)) is not 2-byte aligned") }
        guard fflags <= 0x1f else { throw bad("fflags", "0x\(String(fflags, radix: 16)) has bits above the five flags") }
        guard frm <= 4 else { throw bad("frm", "\(frm) is not a valid rounding mode") }
        let mode = satp >> 60
        guard mode == 0 || mode == 8 || mode == 9 else { throw bad("satp", "translation mode \(mode) is not Bare, Sv39 or Sv48") }
        guard mstatus & ~(MStatus.writable | MStatus.uxl | MStatus.sxl | MStatus.sd) == 0 else {
            throw bad("mstatus", "0x\(String(mstatus, radix: 16)) sets read-only bits")
        }
        guard mipSoftware & ~(Irq.ssi | Irq.sti | Irq.sei) == 0 else {
            throw bad("mip", "0x\(String(mipSoftware, radix: 16)) sets bits software cannot write")
        }
        guard tselect < UInt64(Hart.triggerCount) else {
            throw bad("tselect", "\(tselect) is not below the \(Hart.triggerCount) triggers")
        }
        for (i, t) in tdata1.enumerated() where !Hart.isValidTData1(t) {
            throw bad("tdata1", "trigger \(i): 0x\(String(t, radix: 16)) is not a value the trigger can hold")
        }
    }
}

extension Hart {
    /// `misa` of this CPU (RV64IMAFDC + S + U).
    static let misaValue: UInt64 = (2 << 62) | (1 << 0) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 8) | (1 << 12) | (1 << 18) | (1 << 20)

    public var stateVersion: UInt32 { HartSavedState.version }

    /// The hart's state as a value. Control thread, hart out of `run()`.
    public func captureState() -> HartSavedState { HartSavedState(self) }

    /// Replaces the hart's state with `s` after validating it; translations and TLBs are dropped.
    /// Control thread, hart out of `run()`.
    public func applyState(_ s: HartSavedState) throws(SavedStateError) {
        try s.validate(section: "hart\(hartID)")
        for i in 1..<32 { x[i] = s.x[i - 1] }
        x[0] = 0
        for i in 0..<32 { f[i] = s.f[i] }
        pcValue = s.pc
        privilege = Privilege(rawValue: s.privilege)!
        mstatus = s.mstatus; medeleg = s.medeleg; mideleg = s.mideleg; mie = s.mie
        mipSoftware = s.mipSoftware; mtvec = s.mtvec; mcounteren = s.mcounteren; mscratch = s.mscratch
        mepc = s.mepc; mcause = s.mcause; mtval = s.mtval; menvcfg = s.menvcfg; mcountinhibit = s.mcountinhibit
        stvec = s.stvec; scounteren = s.scounteren; senvcfg = s.senvcfg; sscratch = s.sscratch; sepc = s.sepc
        scause = s.scause; stval = s.stval; satp = s.satp
        pmpcfg = s.pmpcfg; pmpaddr = s.pmpaddr
        fflags = s.fflags; frm = s.frm; instret = s.instret
        reservation = s.reservation; reservationValue = s.reservationValue
        waitingForInterrupt = s.waitingForInterrupt
        stimecmp = s.stimecmp
        tselect = s.tselect; tdata1 = s.tdata1; tdata2 = s.tdata2
        pollTimer()
        hostFPUStale = true
        flushAllTranslations()
        updateMMUContext()
    }

    public func saveState(to w: inout StateWriter) { captureState().encode(to: &w) }

    public func loadState(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
        try HartSavedState.check(version: version, in: r)
        let s = try HartSavedState(from: &r, version: version)
        try r.finish()
        try applyState(s)
    }
}

extension Hart {
    /// The registers as QEMU's riscv `info registers` lists them: pc, the privilege mode, the
    /// machine and supervisor trap CSRs, satp, then x1…x31 by ABI name and f0…f31 (raw bits).
    /// Only while `run()` is not executing (it reads the saved-state snapshot).
    public func registerDump() -> [CPURegister] {
        let s = captureState()
        var out: [CPURegister] = [
            CPURegister(name: "pc", value: s.pc), CPURegister(name: "mhartid", value: UInt64(hartID)),
            CPURegister(name: "priv", value: s.privilege), CPURegister(name: "mstatus", value: s.mstatus),
            CPURegister(name: "misa", value: s.misa), CPURegister(name: "medeleg", value: s.medeleg),
            CPURegister(name: "mideleg", value: s.mideleg), CPURegister(name: "mie", value: s.mie),
            CPURegister(name: "mtvec", value: s.mtvec), CPURegister(name: "stvec", value: s.stvec),
            CPURegister(name: "mepc", value: s.mepc), CPURegister(name: "sepc", value: s.sepc),
            CPURegister(name: "mcause", value: s.mcause), CPURegister(name: "scause", value: s.scause),
            CPURegister(name: "mtval", value: s.mtval), CPURegister(name: "stval", value: s.stval),
            CPURegister(name: "mscratch", value: s.mscratch), CPURegister(name: "sscratch", value: s.sscratch),
            CPURegister(name: "satp", value: s.satp),
        ]
        let abi = ["zero", "ra", "sp", "gp", "tp", "t0", "t1", "t2", "s0", "s1", "a0", "a1", "a2", "a3", "a4", "a5",
                   "a6", "a7", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11", "t3", "t4", "t5", "t6"]
        out.append(CPURegister(name: "x0/zero", value: 0))
        for (i, v) in s.x.enumerated() { out.append(CPURegister(name: "x\(i + 1)/\(abi[i + 1])", value: v)) }
        for (i, v) in s.f.enumerated() { out.append(CPURegister(name: "f\(i)", value: v)) }
        return out
    }
}
