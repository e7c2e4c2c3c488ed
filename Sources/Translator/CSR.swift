import Machine

/// Control and status registers.
extension Hart {
    enum CSRNumber {
        static let fflags = 0x001, frm = 0x002, fcsr = 0x003
        static let cycle = 0xc00, time = 0xc01, instret = 0xc02
        static let sstatus = 0x100, sie = 0x104, stvec = 0x105, scounteren = 0x106, senvcfg = 0x10a
        static let stimecmp = 0x14d
        static let sscratch = 0x140, sepc = 0x141, scause = 0x142, stval = 0x143, sip = 0x144, satp = 0x180
        static let mvendorid = 0xf11, marchid = 0xf12, mimpid = 0xf13, mhartid = 0xf14, mconfigptr = 0xf15
        static let mstatus = 0x300, misa = 0x301, medeleg = 0x302, mideleg = 0x303, mie = 0x304, mtvec = 0x305
        static let mcounteren = 0x306, menvcfg = 0x30a, mcountinhibit = 0x320
        static let mscratch = 0x340, mepc = 0x341, mcause = 0x342, mtval = 0x343, mip = 0x344
        static let pmpcfg0 = 0x3a0, pmpaddr0 = 0x3b0
        static let mcycle = 0xb00, minstret = 0xb02
    }

    /// Executes a CSR instruction. Returns false when a trap was taken.
    func executeCSR(_ o: Op, pc: UInt64) -> Bool {
        let csr = Int(o.imm & 0xfff)
        let rs1Field = UInt64(o.rs1)
        let source: UInt64
        switch o.kind {
        case .csrrwi, .csrrsi, .csrrci: source = rs1Field
        default: source = x[Int(o.rs1)]
        }
        let isWrite: Bool
        switch o.kind {
        case .csrrw, .csrrwi: isWrite = true
        default: isWrite = rs1Field != 0
        }
        let isRead = !(o.kind == .csrrw || o.kind == .csrrwi) || o.rd != 32
        // Privilege and read-only checks.
        let required = (csr >> 8) & 3
        if UInt64(required) > privilege.rawValue || (isWrite && (csr >> 10) == 3) {
            raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
            return false
        }
        var old: UInt64 = 0
        if isRead || o.kind != .csrrw && o.kind != .csrrwi {
            guard let v = readCSR(csr) else {
                raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
                return false
            }
            old = v
        } else if !csrExists(csr) {
            raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
            return false
        }
        if isWrite {
            // Only the software-writable SEIP bit takes part in a read-modify-write of mip/sip
            // (privileged spec, 3.1.9); the PLIC's line must not be latched into it.
            var base = old
            if csr == CSRNumber.mip || csr == CSRNumber.sip {
                base = (old & ~Irq.sei) | (mipSoftware & Irq.sei)
            }
            let new: UInt64
            switch o.kind {
            case .csrrw, .csrrwi: new = source
            case .csrrs, .csrrsi: new = base | source
            default: new = base & ~source
            }
            if !writeCSR(csr, new) {
                raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
                return false
            }
        }
        x[Int(o.rd)] = old
        return true
    }

    private func csrExists(_ csr: Int) -> Bool {
        readCSR(csr) != nil
    }

    /// Whether a counter CSR (cycle, time, instret, hpmcounterN) may be read at this privilege.
    private func counterAllowed(_ bit: Int) -> Bool {
        switch privilege {
        case .machine: return true
        case .supervisor: return (mcounteren >> UInt64(bit)) & 1 != 0
        case .user: return (mcounteren >> UInt64(bit)) & 1 != 0 && (scounteren >> UInt64(bit)) & 1 != 0
        }
    }

    /// Reads a CSR, or nil if it does not exist or may not be read now (illegal instruction).
    func readCSR(_ csr: Int) -> UInt64? {
        switch csr {
        case CSRNumber.fflags:
            guard fpEnabled else { return nil }
            syncFlags()
            return fflags
        case CSRNumber.frm:
            guard fpEnabled else { return nil }
            return frm
        case CSRNumber.fcsr:
            guard fpEnabled else { return nil }
            syncFlags()
            return (frm << 5) | fflags
        case CSRNumber.cycle, CSRNumber.instret:
            guard extensions.contains(.zicntr), counterAllowed(csr & 0x1f) else { return nil }
            return instret
        case CSRNumber.time:
            guard extensions.contains(.zicntr), counterAllowed(1) else { return nil }
            return clock.ticks  // integer arithmetic only: no host FPU flags to guard
        case 0xc03...0xc1f:
            guard extensions.contains(.zihpm), counterAllowed(csr & 0x1f) else { return nil }
            return 0
        case CSRNumber.stimecmp:
            guard stimecmpAccessible else { return nil }
            return stimecmp
        case CSRNumber.sstatus: return sstatusView
        case CSRNumber.sie: return mie & mideleg
        case CSRNumber.stvec: return stvec
        case CSRNumber.scounteren: return scounteren
        case CSRNumber.senvcfg: return senvcfg
        case CSRNumber.sscratch: return sscratch
        case CSRNumber.sepc: return sepc
        case CSRNumber.scause: return scause
        case CSRNumber.stval: return stval
        case CSRNumber.sip:
            pollTimer()
            return mip & mideleg
        case CSRNumber.satp:
            if privilege == .supervisor && (mstatus & MStatus.tvm) != 0 { return nil }
            return satp
        case CSRNumber.mvendorid, CSRNumber.marchid, CSRNumber.mimpid, CSRNumber.mconfigptr: return 0
        case CSRNumber.mhartid: return UInt64(hartID)
        case CSRNumber.mstatus: return mstatusView
        case CSRNumber.misa: return misa
        case CSRNumber.medeleg: return medeleg
        case CSRNumber.mideleg: return mideleg
        case CSRNumber.mie: return mie
        case CSRNumber.mtvec: return mtvec
        case CSRNumber.mcounteren: return mcounteren
        case CSRNumber.menvcfg: return menvcfg
        case CSRNumber.mcountinhibit: return mcountinhibit
        case CSRNumber.mscratch: return mscratch
        case CSRNumber.mepc: return mepc
        case CSRNumber.mcause: return mcause
        case CSRNumber.mtval: return mtval
        case CSRNumber.mip:
            pollTimer()
            return mip
        case 0x3a0...0x3af:
            // RV64: only the even pmpcfg registers exist.
            guard csr & 1 == 0 else { return nil }
            return pmpcfg[(csr - 0x3a0) / 2]
        case 0x3b0...0x3ef: return pmpaddr[csr - 0x3b0]
        case CSRNumber.mcycle, CSRNumber.minstret: return instret
        case 0xb03...0xb1f: return 0   // mhpmcounter3..31: hardwired zero (Zihpm)
        case 0x323...0x33f: return 0   // mhpmevent3..31: hardwired zero
        // Sdtrig: mcontrol (type 2) triggers; tinfo says type 2 is the one supported.
        case 0x7a0: return tselect
        case 0x7a1: return tdata1[Int(tselect)]
        case 0x7a2: return tdata2[Int(tselect)]
        case 0x7a3: return 0
        case 0x7a4: return 1 << 2
        default: return nil
        }
    }

    var mstatusView: UInt64 {
        var s = mstatus | MStatus.uxl | MStatus.sxl
        if (s & MStatus.fs) == MStatus.fs { s |= MStatus.sd }
        return s
    }

    var sstatusView: UInt64 { mstatusView & MStatus.sstatusMask }

    /// Writes a CSR; returns false when the write is illegal.
    func writeCSR(_ csr: Int, _ v: UInt64) -> Bool {
        switch csr {
        case CSRNumber.fflags:
            guard fpEnabled else { return false }
            fflags = v & 0x1f
            clearHostFlags()
            markFPDirty()
        case CSRNumber.frm:
            guard fpEnabled else { return false }
            frm = v & 7
            markFPDirty()
        case CSRNumber.fcsr:
            guard fpEnabled else { return false }
            fflags = v & 0x1f
            frm = (v >> 5) & 7
            clearHostFlags()
            markFPDirty()
        case CSRNumber.sstatus:
            let mask = MStatus.sie | MStatus.spie | MStatus.spp | MStatus.fs | MStatus.sum | MStatus.mxr
            setMStatus((mstatus & ~mask) | (v & mask))
        case CSRNumber.sie:
            mie = (mie & ~mideleg) | (v & mideleg)
        case CSRNumber.stvec: stvec = v & ~2
        case CSRNumber.scounteren: scounteren = v & 0xffff_ffff
        case CSRNumber.senvcfg: senvcfg = envcfgValue(old: senvcfg, v, mask: envcfgWritable & ~(EnvCfg.pbmte | EnvCfg.stce))
        case CSRNumber.stimecmp:
            guard stimecmpAccessible else { return false }
            stimecmp = v
            pollTimer()
        case CSRNumber.sscratch: sscratch = v
        case CSRNumber.sepc: sepc = v & ~1
        case CSRNumber.scause: scause = v
        case CSRNumber.stval: stval = v
        case CSRNumber.sip:
            // Only SSIP is writable from S-mode.
            let mask = Irq.ssi & mideleg
            mipSoftware = (mipSoftware & ~mask) | (v & mask)
        case CSRNumber.satp:
            if privilege == .supervisor && (mstatus & MStatus.tvm) != 0 { return false }
            let mode = v >> 60
            // WARL: an unsupported mode leaves satp unchanged.
            guard mode == 0 || mode == 8 || mode == 9 else { break }
            satp = v
            flushTranslations()
        case CSRNumber.mstatus:
            setMStatus(v)
        case CSRNumber.misa: break
        case CSRNumber.medeleg: medeleg = v & 0xb3ff   // not ecall-from-M (11) or reserved bits
        case CSRNumber.mideleg:
            mideleg = v & Irq.sMask
        case CSRNumber.mie:
            mie = v & Irq.all
        case CSRNumber.mtvec: mtvec = v & ~2
        case CSRNumber.mcounteren: mcounteren = v & 0xffff_ffff
        case CSRNumber.menvcfg:
            let old = menvcfg
            menvcfg = envcfgValue(old: old, v, mask: envcfgWritable)
            // PBMTE changes which PTEs are valid; STCE changes where STIP comes from.
            if (old ^ menvcfg) & EnvCfg.pbmte != 0 { flushTranslations() }
            pollTimer()
        case CSRNumber.mcountinhibit: mcountinhibit = v & 0xffff_fffd
        case CSRNumber.mscratch: mscratch = v
        case CSRNumber.mepc: mepc = v & ~1
        case CSRNumber.mcause: mcause = v
        case CSRNumber.mtval: mtval = v
        case CSRNumber.mip:
            let mask = Irq.ssi | Irq.sti | Irq.sei
            mipSoftware = (mipSoftware & ~mask) | (v & mask)
        case 0x3a0...0x3af:
            guard csr & 1 == 0 else { return false }
            let i = (csr - 0x3a0) / 2
            var n: UInt64 = 0
            for byte in 0..<8 {
                let shift = UInt64(byte * 8)
                let oldB = (pmpcfg[i] >> shift) & 0xff
                var newB = (v >> shift) & 0xff
                if oldB & 0x80 != 0 { newB = oldB }            // locked entries do not change
                if newB & 0x3 == 0x2 { newB &= ~0x3 }          // R=0,W=1 is reserved
                n |= (newB & 0x9f) << shift
            }
            pmpcfg[i] = n
        case 0x3b0...0x3ef:
            let i = csr - 0x3b0
            let cfg = (pmpcfg[i / 8] >> UInt64((i % 8) * 8)) & 0xff
            if cfg & 0x80 == 0 { pmpaddr[i] = v & 0x003f_ffff_ffff_ffff }
        case CSRNumber.mcycle, CSRNumber.minstret:
            // The write takes the place of this instruction's own increment, which both
            // engines add when the CSR instruction retires.
            instret = v &- 1
        case 0xb03...0xb1f, 0x323...0x33f: break
        case 0x7a0: if v < UInt64(Hart.triggerCount) { tselect = v }
        case 0x7a1:
            // WARL: an mcontrol with action 0 (breakpoint exception), match 0 (equal), no
            // chain, timing before; its M, S, U, execute, store and load bits. Anything else
            // (or type 0) leaves no trigger at this index.
            tdata1[Int(tselect)] = v >> 60 == 2 ? (2 << 60) | (v & Hart.mcontrolBits) : 0
        case 0x7a2: tdata2[Int(tselect)] = v
        case 0x7a3, 0x7a4: break
        default:
            return readCSR(csr) != nil
        }
        return true
    }

    /// Whether `stimecmp` may be accessed now: Sstc is present, and below M-mode
    /// `menvcfg.STCE` and `mcounteren.TM` allow it.
    private var stimecmpAccessible: Bool {
        guard extensions.contains(.sstc) else { return false }
        if privilege == .machine { return true }
        return sstcEnabled && (mcounteren >> 1) & 1 != 0
    }

    /// The `menvcfg` fields this hart's extensions implement.
    private var envcfgWritable: UInt64 {
        var m = EnvCfg.fiom
        if extensions.contains(.zicbom) { m |= EnvCfg.cbie | EnvCfg.cbcfe }
        if extensions.contains(.zicboz) { m |= EnvCfg.cbze }
        if extensions.contains(.svpbmt) { m |= EnvCfg.pbmte }
        if extensions.contains(.sstc) { m |= EnvCfg.stce }
        return m
    }

    /// A WARL `menvcfg`/`senvcfg` write: the reserved CBIE value 2 keeps the old field.
    private func envcfgValue(old: UInt64, _ v: UInt64, mask: UInt64) -> UInt64 {
        var n = v & mask
        if (n & EnvCfg.cbie) >> EnvCfg.cbieShift == 2 { n = (n & ~EnvCfg.cbie) | (old & EnvCfg.cbie) }
        return n
    }

    private func setMStatus(_ v: UInt64) {
        var n = (mstatus & ~MStatus.writable) | (v & MStatus.writable)
        // MPP is WARL: the reserved value 2 becomes U.
        if (n & MStatus.mpp) >> MStatus.mppShift == 2 { n &= ~MStatus.mpp }
        let old = mstatus
        mstatus = n
        if (old ^ n) & (MStatus.mxr) != 0 { flushTLB() }
        updateMMUContext()
    }

    /// Whether F/D instructions may execute (`mstatus.FS` is not Off).
    var fpEnabled: Bool { (mstatus & MStatus.fs) != 0 }

    /// Marks the FP state dirty after an instruction changed it.
    @inline(__always) func markFPDirty() {
        if (mstatus & MStatus.fs) != MStatus.fs { mstatus |= MStatus.fs }
    }
}
