import CAtomics
import Machine

extension Hart {
    /// Executes block `index` entered at virtual PC `base`, then keeps going through chained
    /// successors (or, for indirect jumps, the jump cache) for up to `budget` blocks without
    /// returning to the run loop. Leaves `pcValue` at the next PC and `lastBlock` at the last
    /// block executed, and returns the chain slot that block left through (0 taken/jump,
    /// 1 fall-through) or -1 when the next block must not be chained to it (indirect jump,
    /// trap, system instruction).
    @inline(never)
    func execute(_ index: Int32, base: UInt64, budget: Int) -> Int {
        let r = x
        let fr = f
        let rIdx = dataMMUIndex
        let readTags = tlbTags + tlbBase(rIdx, .read)
        let readAdd = tlbAddends + tlbBase(rIdx, .read)
        let writeTags = tlbTags + tlbBase(rIdx, .write)
        let writeAdd = tlbAddends + tlbBase(rIdx, .write)
        let mask = UInt64(Hart.tlbEntries - 1)
        let jumpBase = fetchMMUIndex * Hart.jumpCacheSize
        let jumpMask = UInt64(Hart.jumpCacheSize - 1)
        let lines = interrupts
        var index = index
        var base = base
        var budget = budget
        var block = TranslationBlock()
        var opBase = ops

        @inline(__always) func readPtr(_ va: UInt64, _ size: UInt64) -> UnsafeMutableRawPointer? {
            let vpn = va >> 12
            let i = Int(vpn & mask)
            if readTags[i] == vpn && (va & 0xfff) &+ size <= 4096 {
                return UnsafeMutableRawPointer(bitPattern: readAdd[i] &+ Int(bitPattern: UInt(va)))
            }
            return nil
        }
        @inline(__always) func writePtr(_ va: UInt64, _ size: UInt64) -> UnsafeMutableRawPointer? {
            let vpn = va >> 12
            let i = Int(vpn & mask)
            if writeTags[i] == vpn && (va & 0xfff) &+ size <= 4096 {
                return UnsafeMutableRawPointer(bitPattern: writeAdd[i] &+ Int(bitPattern: UInt(va)))
            }
            return nil
        }
        /// Retires the ops before the current one and reports a trap exit.
        @inline(__always) func trapExit(_ op: UnsafeMutablePointer<Op>) -> Int {
            instret &+= UInt64(op - opBase)
            trapped = false
            lastBlock = index
            return -1
        }
        @inline(__always) func pcOf(_ op: UnsafeMutablePointer<Op>) -> UInt64 { base &+ UInt64(op.pointee.pcOffset) }

        var reload = true
        var end = ops
        blockLoop: while true {
            if reload {
                block = blocks[Int(index)]
                opBase = ops + Int(block.opStart)
                end = opBase + Int(block.opCount)
                lastBlock = index
            }
            var op = opBase
            var slot = 1

            opLoop: while op < end {
                let o = op.pointee
                let rd = Int(o.rd), rs1 = Int(o.rs1), rs2 = Int(o.rs2)
                switch o.kind {
                case .nop, .fence:
                    break
                case .lui:
                    r[rd] = UInt64(bitPattern: o.imm)
                case .auipc:
                    r[rd] = pcOf(op) &+ UInt64(bitPattern: o.imm)
                case .jal:
                    let pc = pcOf(op)
                    r[rd] = pc &+ UInt64(o.length)
                    pcValue = pc &+ UInt64(bitPattern: o.imm)
                    slot = 0
                    break opLoop
                case .jalr:
                    let pc = pcOf(op)
                    let target = (r[rs1] &+ UInt64(bitPattern: o.imm)) & ~1
                    r[rd] = pc &+ UInt64(o.length)
                    pcValue = target
                    slot = -1
                    break opLoop
                case .beq, .bne, .blt, .bge, .bltu, .bgeu:
                    let a = r[rs1], b = r[rs2]
                    let taken: Bool
                    switch o.kind {
                    case .beq: taken = a == b
                    case .bne: taken = a != b
                    case .blt: taken = Int64(bitPattern: a) < Int64(bitPattern: b)
                    case .bge: taken = Int64(bitPattern: a) >= Int64(bitPattern: b)
                    case .bltu: taken = a < b
                    default: taken = a >= b
                    }
                    let pc = pcOf(op)
                    if taken {
                        pcValue = pc &+ UInt64(bitPattern: o.imm)
                        slot = 0
                    } else {
                        pcValue = pc &+ UInt64(o.length)
                    }
                    break opLoop

                // Loads
                case .lb, .lbu:
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    let v: UInt64
                    if let p = readPtr(va, 1) { v = UInt64(p.load(as: UInt8.self)) } else {
                        v = loadSlow(va, size: 1, pc: pcOf(op)); if trapped { return trapExit(op) }
                    }
                    r[rd] = o.kind == .lb ? UInt64(bitPattern: Int64(Int8(truncatingIfNeeded: v))) : v
                case .lh, .lhu:
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    let v: UInt64
                    if let p = readPtr(va, 2) { v = UInt64(p.loadUnaligned(as: UInt16.self)) } else {
                        v = loadSlow(va, size: 2, pc: pcOf(op)); if trapped { return trapExit(op) }
                    }
                    r[rd] = o.kind == .lh ? UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: v))) : v
                case .lw, .lwu:
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    let v: UInt64
                    if let p = readPtr(va, 4) { v = UInt64(p.loadUnaligned(as: UInt32.self)) } else {
                        v = loadSlow(va, size: 4, pc: pcOf(op)); if trapped { return trapExit(op) }
                    }
                    r[rd] = o.kind == .lw ? UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: v))) : v
                case .ld:
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    if let p = readPtr(va, 8) { r[rd] = p.loadUnaligned(as: UInt64.self) } else {
                        let v = loadSlow(va, size: 8, pc: pcOf(op)); if trapped { return trapExit(op) }
                        r[rd] = v
                    }

                // Stores
                case .sb:
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    if let p = writePtr(va, 1) { p.storeBytes(of: UInt8(truncatingIfNeeded: r[rs2]), as: UInt8.self) } else {
                        if let e = storeSlowExit(op, va, 1, r[rs2], pcOf(op), opBase) { return e }
                    }
                case .sh:
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    if let p = writePtr(va, 2) { p.storeBytes(of: UInt16(truncatingIfNeeded: r[rs2]), as: UInt16.self) } else {
                        if let e = storeSlowExit(op, va, 2, r[rs2], pcOf(op), opBase) { return e }
                    }
                case .sw:
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    if let p = writePtr(va, 4) { p.storeBytes(of: UInt32(truncatingIfNeeded: r[rs2]), as: UInt32.self) } else {
                        if let e = storeSlowExit(op, va, 4, r[rs2], pcOf(op), opBase) { return e }
                    }
                case .sd:
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    if let p = writePtr(va, 8) { p.storeBytes(of: r[rs2], as: UInt64.self) } else {
                        if let e = storeSlowExit(op, va, 8, r[rs2], pcOf(op), opBase) { return e }
                    }

                // Integer register-immediate
                case .addi: r[rd] = r[rs1] &+ UInt64(bitPattern: o.imm)
                case .slti: r[rd] = Int64(bitPattern: r[rs1]) < o.imm ? 1 : 0
                case .sltiu: r[rd] = r[rs1] < UInt64(bitPattern: o.imm) ? 1 : 0
                case .xori: r[rd] = r[rs1] ^ UInt64(bitPattern: o.imm)
                case .ori: r[rd] = r[rs1] | UInt64(bitPattern: o.imm)
                case .andi: r[rd] = r[rs1] & UInt64(bitPattern: o.imm)
                case .slli: r[rd] = r[rs1] << UInt64(o.imm)
                case .srli: r[rd] = r[rs1] >> UInt64(o.imm)
                case .srai: r[rd] = UInt64(bitPattern: Int64(bitPattern: r[rs1]) >> o.imm)
                case .addiw: r[rd] = sx32(UInt32(truncatingIfNeeded: r[rs1] &+ UInt64(bitPattern: o.imm)))
                case .slliw: r[rd] = sx32(UInt32(truncatingIfNeeded: r[rs1]) << UInt32(o.imm))
                case .srliw: r[rd] = sx32(UInt32(truncatingIfNeeded: r[rs1]) >> UInt32(o.imm))
                case .sraiw: r[rd] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: r[rs1]) >> Int32(o.imm)))

                // Integer register-register
                case .add: r[rd] = r[rs1] &+ r[rs2]
                case .sub: r[rd] = r[rs1] &- r[rs2]
                case .sll: r[rd] = r[rs1] << (r[rs2] & 63)
                case .slt: r[rd] = Int64(bitPattern: r[rs1]) < Int64(bitPattern: r[rs2]) ? 1 : 0
                case .sltu: r[rd] = r[rs1] < r[rs2] ? 1 : 0
                case .xor: r[rd] = r[rs1] ^ r[rs2]
                case .srl: r[rd] = r[rs1] >> (r[rs2] & 63)
                case .sra: r[rd] = UInt64(bitPattern: Int64(bitPattern: r[rs1]) >> Int64(r[rs2] & 63))
                case .or: r[rd] = r[rs1] | r[rs2]
                case .and: r[rd] = r[rs1] & r[rs2]
                case .addw: r[rd] = sx32(UInt32(truncatingIfNeeded: r[rs1] &+ r[rs2]))
                case .subw: r[rd] = sx32(UInt32(truncatingIfNeeded: r[rs1] &- r[rs2]))
                case .sllw: r[rd] = sx32(UInt32(truncatingIfNeeded: r[rs1]) << UInt32(r[rs2] & 31))
                case .srlw: r[rd] = sx32(UInt32(truncatingIfNeeded: r[rs1]) >> UInt32(r[rs2] & 31))
                case .sraw: r[rd] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: r[rs1]) >> Int32(r[rs2] & 31)))

                // M
                case .mul: r[rd] = r[rs1] &* r[rs2]
                case .mulh:
                    r[rd] = UInt64(bitPattern: Int64(bitPattern: r[rs1]).multipliedFullWidth(by: Int64(bitPattern: r[rs2])).high)
                case .mulhu:
                    r[rd] = r[rs1].multipliedFullWidth(by: r[rs2]).high
                case .mulhsu:
                    let a = Int64(bitPattern: r[rs1]), b = r[rs2]
                    var high = a.magnitude.multipliedFullWidth(by: b)
                    if a < 0 {
                        // Two's complement negate the 128-bit product.
                        let lowNeg = (~high.low) &+ 1
                        high = (high: ~high.high &+ (lowNeg == 0 ? 1 : 0), low: lowNeg)
                    }
                    r[rd] = high.high
                case .div:
                    let a = Int64(bitPattern: r[rs1]), b = Int64(bitPattern: r[rs2])
                    r[rd] = b == 0 ? .max : (a == .min && b == -1) ? UInt64(bitPattern: a) : UInt64(bitPattern: a / b)
                case .divu:
                    let b = r[rs2]
                    r[rd] = b == 0 ? .max : r[rs1] / b
                case .rem:
                    let a = Int64(bitPattern: r[rs1]), b = Int64(bitPattern: r[rs2])
                    r[rd] = b == 0 ? UInt64(bitPattern: a) : (a == .min && b == -1) ? 0 : UInt64(bitPattern: a % b)
                case .remu:
                    let b = r[rs2]
                    r[rd] = b == 0 ? r[rs1] : r[rs1] % b
                case .mulw: r[rd] = sx32(UInt32(truncatingIfNeeded: r[rs1] &* r[rs2]))
                case .divw:
                    let a = Int32(truncatingIfNeeded: r[rs1]), b = Int32(truncatingIfNeeded: r[rs2])
                    let q: Int32 = b == 0 ? -1 : (a == .min && b == -1) ? a : a / b
                    r[rd] = UInt64(bitPattern: Int64(q))
                case .divuw:
                    let a = UInt32(truncatingIfNeeded: r[rs1]), b = UInt32(truncatingIfNeeded: r[rs2])
                    r[rd] = sx32(b == 0 ? .max : a / b)
                case .remw:
                    let a = Int32(truncatingIfNeeded: r[rs1]), b = Int32(truncatingIfNeeded: r[rs2])
                    let m: Int32 = b == 0 ? a : (a == .min && b == -1) ? 0 : a % b
                    r[rd] = UInt64(bitPattern: Int64(m))
                case .remuw:
                    let a = UInt32(truncatingIfNeeded: r[rs1]), b = UInt32(truncatingIfNeeded: r[rs2])
                    r[rd] = sx32(b == 0 ? a : a % b)

                // A
                case .lr, .sc, .amo:
                    if !executeAtomic(o, pc: pcOf(op)) { return trapExit(op) }
                    if blockInvalidated {
                        blockInvalidated = false
                        instret &+= UInt64(op - opBase + 1)
                        pcValue = pcOf(op) &+ UInt64(o.length)
                        return -1
                    }

                // Zba, Zbb, Zbc, Zbs, Zicond (immediate forms: rs2 is x0, the amount in imm)
                case .addUW, .sh1add, .sh2add, .sh3add, .sh1addUW, .sh2addUW, .sh3addUW, .slliUW,
                     .andn, .orn, .xnor, .clz, .clzw, .ctz, .ctzw, .cpop, .cpopw, .max, .maxu, .min, .minu,
                     .sextB, .sextH, .zextH, .rol, .rolw, .ror, .rori, .roriw, .rorw, .orcB, .rev8,
                     .clmul, .clmulh, .clmulr, .bclr, .bclri, .bext, .bexti, .binv, .binvi, .bset, .bseti,
                     .czeroEqz, .czeroNez:
                    r[rd] = bitManip(o.kind, r[rs1], r[rs2] &+ UInt64(bitPattern: o.imm))

                // Zicbom, Zicboz
                case .cbo:
                    if !executeCBO(o, pc: pcOf(op)) { return trapExit(op) }
                    if blockInvalidated {
                        blockInvalidated = false
                        instret &+= UInt64(op - opBase + 1)
                        pcValue = pcOf(op) &+ UInt64(o.length)
                        return -1
                    }

                // FP loads and stores
                case .flw, .fld, .fsw, .fsd:
                    if !fpEnabled { raise(.illegalInstruction, tval: UInt64(o.raw), pc: pcOf(op)); return trapExit(op) }
                    let va = r[rs1] &+ UInt64(bitPattern: o.imm)
                    switch o.kind {
                    case .flw:
                        let v: UInt64
                        if let p = readPtr(va, 4) { v = UInt64(p.loadUnaligned(as: UInt32.self)) } else {
                            v = loadSlow(va, size: 4, pc: pcOf(op)); if trapped { return trapExit(op) }
                        }
                        fr[rd] = v | 0xffff_ffff_0000_0000
                        markFPDirty()
                    case .fld:
                        let v: UInt64
                        if let p = readPtr(va, 8) { v = p.loadUnaligned(as: UInt64.self) } else {
                            v = loadSlow(va, size: 8, pc: pcOf(op)); if trapped { return trapExit(op) }
                        }
                        fr[rd] = v
                        markFPDirty()
                    case .fsw:
                        if let p = writePtr(va, 4) { p.storeBytes(of: UInt32(truncatingIfNeeded: fr[rs2]), as: UInt32.self) } else {
                            if let e = storeSlowExit(op, va, 4, fr[rs2], pcOf(op), opBase) { return e }
                        }
                    default:
                        if let p = writePtr(va, 8) { p.storeBytes(of: fr[rs2], as: UInt64.self) } else {
                            if let e = storeSlowExit(op, va, 8, fr[rs2], pcOf(op), opBase) { return e }
                        }
                    }

                case .flh, .fsh:
                    switch executeHalfMemory(o, pc: pcOf(op)) {
                    case JITStatus.trapped: return trapExit(op)
                    case JITStatus.leave:
                        instret &+= UInt64(op - opBase + 1)
                        return -1
                    default: break
                    }

                // System
                case .illegal:
                    raise(.illegalInstruction, tval: UInt64(o.raw), pc: pcOf(op))
                    return trapExit(op)
                case .ecall:
                    let cause: Cause = privilege == .user ? .ecallFromU : privilege == .supervisor ? .ecallFromS : .ecallFromM
                    raise(cause, tval: 0, pc: pcOf(op))
                    return trapExit(op)
                case .ebreak:
                    raise(.breakpoint, tval: pcOf(op), pc: pcOf(op))
                    return trapExit(op)
                case .fenceI:
                    // Our own stores already invalidated what they overwrote; device DMA did not.
                    if !externalWrites.isEmpty.load(ordering: .acquiring) {
                        for page in externalWrites.drain() where page < ram.size >> 12 {
                            invalidateCode(physicalPage: page)
                        }
                        blockInvalidated = false
                    }
                    instret &+= UInt64(block.opCount)
                    pcValue = pcOf(op) &+ UInt64(o.length)
                    return -1
                case .mret, .sret, .wfi, .sfenceVma, .sfenceInval:
                    if !executePrivileged(o, pc: pcOf(op)) { return trapExit(op) }
                    instret &+= UInt64(block.opCount)
                    return -1
                case .csrrw, .csrrs, .csrrc, .csrrwi, .csrrsi, .csrrci:
                    let retiredBefore = UInt64(op - opBase)
                    instret &+= retiredBefore
                    if !executeCSR(o, pc: pcOf(op)) {
                        trapped = false
                        return -1
                    }
                    instret &+= UInt64(block.opCount) &- retiredBefore
                    pcValue = pcOf(op) &+ UInt64(o.length)
                    return -1

                default:
                    // Floating-point arithmetic.
                    if !fpEnabled { raise(.illegalInstruction, tval: UInt64(o.raw), pc: pcOf(op)); return trapExit(op) }
                    if !executeFP(o) {
                        raise(.illegalInstruction, tval: UInt64(o.raw), pc: pcOf(op))
                        return trapExit(op)
                    }
                }
                op += 1
            }
            if op == end {
                // Fell off the end of the block (page end or op limit).
                pcValue = base &+ UInt64(block.byteLength)
            }
            instret &+= UInt64(block.opCount)

            // Go on to the successor without returning to the run loop, while allowed.
            budget -= 1
            if budget <= 0 || lines.kick.load(ordering: .relaxed) { return slot }
            checkCodeEpoch()
            let next = pcValue
            if slot == 0 && next == base {
                // A loop back to this block's start (a block that overwrote itself has already
                // returned), so nothing needs looking up.
                reload = false
                continue blockLoop
            }
            reload = true
            if slot >= 0 && block.chainEpoch == mmuEpoch {
                let (c, cpc) = slot == 0 ? (block.chainTB.0, block.chainPC.0) : (block.chainTB.1, block.chainPC.1)
                if c >= 0 && cpc == next && blocks[Int(c)].valid {
                    index = c
                    base = next
                    continue blockLoop
                }
            }
            let jc = jumpBase + Int((next >> 1) & jumpMask)
            if jumpTags[jc] == next {
                let c = jumpBlocks[jc]
                if blocks[Int(c)].valid {
                    if slot >= 0 { link(index, slot: slot, to: c, pc: next) }
                    index = c
                    base = next
                    continue blockLoop
                }
            }
            return slot
        }
    }

    /// The slow path of a store from inside a block: returns the exit slot when the block must
    /// be left (a trap, or the store overwrote translated code), nil to continue.
    @inline(never)
    func storeSlowExit(_ op: UnsafeMutablePointer<Op>, _ va: UInt64, _ size: Int, _ value: UInt64,
                       _ pc: UInt64, _ opBase: UnsafeMutablePointer<Op>) -> Int? {
        storeSlow(va, size: size, value: value, pc: pc)
        let done = UInt64(op - opBase)
        if trapped {
            trapped = false
            instret &+= done
            return -1
        }
        if blockInvalidated {
            blockInvalidated = false
            instret &+= done &+ 1
            pcValue = pc &+ UInt64(op.pointee.length)
            return -1
        }
        return nil
    }

    /// LR, SC and AMOs. Returns false when a trap was taken.
    ///
    /// Every read-modify-write is a host atomic, so harts on other threads see it whole. SC is
    /// a compare-and-swap against the value LR read: it succeeds when the reserved word still
    /// holds that value (an ABA change in between is not detected, which the ISA permits only
    /// in the absence of other stores; Linux's uses of LR/SC tolerate it).
    func executeAtomic(_ o: Op, pc: UInt64) -> Bool {
        let r = x
        let va = r[Int(o.rs1)]
        let size = Int(o.imm)
        let src = r[Int(o.rs2)]
        switch o.kind {
        case .lr:
            guard let p = atomicPointer(va, size: size, write: false, pc: pc) else { trapped = false; return false }
            let v = size == 4 ? sx32(catomic_load_32(p.assumingMemoryBound(to: UInt32.self)))
                              : catomic_load_64(p.assumingMemoryBound(to: UInt64.self))
            r[Int(o.rd)] = v
            reservation = physicalAddress(of: p)
            reservationValue = v
            return true
        case .sc:
            guard let p = atomicPointer(va, size: size, write: true, pc: pc) else { trapped = false; return false }
            let pa = physicalAddress(of: p)
            var ok = false
            if reservation != .max && reservation == pa {
                if size == 4 {
                    ok = catomic_cas_32(p.assumingMemoryBound(to: UInt32.self),
                                        UInt32(truncatingIfNeeded: reservationValue), UInt32(truncatingIfNeeded: src))
                } else {
                    ok = catomic_cas_64(p.assumingMemoryBound(to: UInt64.self), reservationValue, src)
                }
            }
            r[Int(o.rd)] = ok ? 0 : 1
            reservation = .max
            return true
        default:
            guard let p = atomicPointer(va, size: size, write: true, pc: pc) else { trapped = false; return false }
            if size == 4 {
                let w = p.assumingMemoryBound(to: UInt32.self)
                let b = UInt32(truncatingIfNeeded: src)
                let old: UInt32
                switch o.rm {
                case 0x01: old = catomic_swap_32(w, b)
                case 0x00: old = catomic_add_32(w, b)
                case 0x04: old = catomic_xor_32(w, b)
                case 0x0c: old = catomic_and_32(w, b)
                case 0x08: old = catomic_or_32(w, b)
                default:
                    var cur = catomic_load_32(w)
                    while true {
                        let new: UInt32
                        switch o.rm {
                        case 0x10: new = Int32(bitPattern: cur) < Int32(bitPattern: b) ? cur : b
                        case 0x14: new = Int32(bitPattern: cur) > Int32(bitPattern: b) ? cur : b
                        case 0x18: new = cur < b ? cur : b
                        default: new = cur > b ? cur : b
                        }
                        if catomic_cas_32(w, cur, new) { break }
                        cur = catomic_load_32(w)
                    }
                    old = cur
                }
                r[Int(o.rd)] = sx32(old)
            } else {
                let w = p.assumingMemoryBound(to: UInt64.self)
                let b = src
                let old: UInt64
                switch o.rm {
                case 0x01: old = catomic_swap_64(w, b)
                case 0x00: old = catomic_add_64(w, b)
                case 0x04: old = catomic_xor_64(w, b)
                case 0x0c: old = catomic_and_64(w, b)
                case 0x08: old = catomic_or_64(w, b)
                default:
                    var cur = catomic_load_64(w)
                    while true {
                        let new: UInt64
                        switch o.rm {
                        case 0x10: new = Int64(bitPattern: cur) < Int64(bitPattern: b) ? cur : b
                        case 0x14: new = Int64(bitPattern: cur) > Int64(bitPattern: b) ? cur : b
                        case 0x18: new = cur < b ? cur : b
                        default: new = cur > b ? cur : b
                        }
                        if catomic_cas_64(w, cur, new) { break }
                        cur = catomic_load_64(w)
                    }
                    old = cur
                }
                r[Int(o.rd)] = old
            }
            return true
        }
    }

    /// mret, sret, wfi, sfence.vma. Sets the next PC. Returns false when a trap was taken.
    func executePrivileged(_ o: Op, pc: UInt64) -> Bool {
        func illegal() -> Bool {
            raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
            trapped = false
            return false
        }
        switch o.kind {
        case .mret:
            guard privilege == .machine else { return illegal() }
            mret(pc: pc)
        case .sret:
            guard privilege == .machine || (privilege == .supervisor && (mstatus & MStatus.tsr) == 0) else { return illegal() }
            sret(pc: pc)
        case .wfi:
            if privilege == .user || (privilege == .supervisor && (mstatus & MStatus.tw) != 0) { return illegal() }
            pcValue = pc &+ UInt64(o.length)
            waitingForInterrupt = true
        case .sfenceInval:
            // sfence.w.inval and sfence.inval.ir order sinval.vma (which is as strong as
            // sfence.vma here) against other accesses: nothing more to do.
            if privilege == .user { return illegal() }
            pcValue = pc &+ UInt64(o.length)
        default: // sfence.vma, sinval.vma
            if privilege == .user || (privilege == .supervisor && (mstatus & MStatus.tvm) != 0) { return illegal() }
            if o.rs1 != 0 {
                flushTranslations(page: x[Int(o.rs1)])
            } else {
                flushTranslations()
            }
            pcValue = pc &+ UInt64(o.length)
        }
        return true
    }
}

extension Hart {
    /// cbo.inval, cbo.clean, cbo.flush and cbo.zero on the 64-byte block holding `rs1`.
    /// Returns false when a trap was taken (sets `blockInvalidated` when cbo.zero overwrote code).
    ///
    /// There are no caches, so clean, flush and inval only check that the block may be
    /// accessed (a load or a store must be permitted; a fault is reported as a store's). Below
    /// M-mode, `menvcfg` (and in U-mode `senvcfg`) must enable the instruction.
    func executeCBO(_ o: Op, pc: UInt64) -> Bool {
        let isZero = o.imm == 4
        if privilege != .machine {
            let user = privilege == .user
            let enabled: Bool
            switch o.imm {
            case 4: enabled = menvcfg & EnvCfg.cbze != 0 && (!user || senvcfg & EnvCfg.cbze != 0)
            case 0: enabled = menvcfg & EnvCfg.cbie != 0 && (!user || senvcfg & EnvCfg.cbie != 0)
            default: enabled = menvcfg & EnvCfg.cbcfe != 0 && (!user || senvcfg & EnvCfg.cbcfe != 0)
            }
            if !enabled {
                raise(.illegalInstruction, tval: UInt64(o.raw), pc: pc)
                trapped = false
                return false
            }
        }
        let va = x[Int(o.rs1)] & ~(ISAExtensions.cacheBlockSize - 1)
        if isZero {
            // One translation covers the block (it never crosses a page); the first store
            // faults before anything is written.
            for k in stride(from: UInt64(0), to: ISAExtensions.cacheBlockSize, by: 8) {
                storeSlow(va &+ k, size: 8, value: 0, pc: pc)
                if trapped {
                    trapped = false
                    return false
                }
            }
            return true
        }
        if case .ok = translate(va, .read, mmuIndex: dataMMUIndex) { return true }
        if case .fault(let cause) = translate(va, .write, mmuIndex: dataMMUIndex) {
            raise(cause, tval: va, pc: pc)
            trapped = false
            return false
        }
        return true
    }
}

@inline(__always) func sx32(_ v: UInt32) -> UInt64 { UInt64(bitPattern: Int64(Int32(bitPattern: v))) }
