import Machine

/// Address translation (Sv39/Sv48), the soft TLB, and the slow paths of guest memory access.
extension Hart {
    /// Recomputes which TLB set data accesses and fetches use; call after any change of
    /// privilege, `mstatus` or `satp`.
    func updateMMUContext() {
        let effective: Privilege
        if privilege == .machine && (mstatus & MStatus.mprv) != 0 {
            effective = Privilege(rawValue: (mstatus & MStatus.mpp) >> MStatus.mppShift) ?? .user
        } else {
            effective = privilege
        }
        dataMMUIndex = mmuIndex(for: effective, sum: (mstatus & MStatus.sum) != 0)
        fetchMMUIndex = mmuIndex(for: privilege, sum: false)
        state.storeBytes(of: jumpTags + fetchMMUIndex * Hart.jumpCacheSize, toByteOffset: StateLayout.jumpTags,
                         as: UnsafeMutablePointer<UInt64>.self)
        state.storeBytes(of: jumpBlocks + fetchMMUIndex * Hart.jumpCacheSize, toByteOffset: StateLayout.jumpBlocks,
                         as: UnsafeMutablePointer<Int32>.self)
        state.storeBytes(of: tlbTags + tlbBase(dataMMUIndex, .read), toByteOffset: StateLayout.readTags,
                         as: UnsafeMutablePointer<UInt64>.self)
        state.storeBytes(of: tlbTags + tlbBase(dataMMUIndex, .write), toByteOffset: StateLayout.writeTags,
                         as: UnsafeMutablePointer<UInt64>.self)
    }

    private func mmuIndex(for p: Privilege, sum: Bool) -> Int {
        switch p {
        case .user: return 0
        case .supervisor: return sum ? 2 : 1
        case .machine: return 3
        }
    }

    @inline(__always) func tlbBase(_ mmuIndex: Int, _ access: AccessType) -> Int {
        (mmuIndex * 3 + access.rawValue) * Hart.tlbEntries
    }

    /// Empties every TLB set.
    func flushTLB() {
        tlbTags.update(repeating: .max, count: 4 * 3 * Hart.tlbEntries)
    }

    /// Empties the write TLBs (a page became code, so stores must take the slow path).
    func flushWriteTLB() {
        for m in 0..<4 {
            (tlbTags + tlbBase(m, .write)).update(repeating: .max, count: Hart.tlbEntries)
        }
    }

    /// `sfence.vma` or a `satp` write: translations may have changed.
    func flushTranslations() {
        flushTLB()
        // Jump caches of U and S hold virtual PCs; M's are physical and stay valid.
        jumpTags.update(repeating: .max, count: 3 * Hart.jumpCacheSize)
        mmuEpoch &+= 1
        linkedPages.update(repeating: 0, count: 64)
        hasSuperpages = false
    }

    /// `sfence.vma` with an address: the translation of the page holding `va` may have
    /// changed. Drops exactly what may depend on it: its TLB entries, the jump-cache entries of
    /// blocks starting in it or in the page before (a block there may straddle into it), and
    /// every chain when chains may lead into either page. When a superpage translated since the
    /// last full flush could hold `va`, everything is flushed, as for `sfence.vma` without one.
    func flushTranslations(page va: UInt64) {
        if hasSuperpages && (va & superpageMask) == superpageBase {
            flushTranslations()
            return
        }
        let vpn = va >> 12
        let i = Int(vpn & UInt64(Hart.tlbEntries - 1))
        for set in 0..<(4 * 3) where tlbTags[set * Hart.tlbEntries + i] == vpn {
            tlbTags[set * Hart.tlbEntries + i] = .max
        }
        var chained = false
        for page in [vpn, vpn &- 1] {
            // A page's PCs fill one half of the jump cache (index = pc >> 1 & 4095).
            let half = Int(page & 1) * (Hart.jumpCacheSize / 2)
            for m in 0..<3 {
                let base = m * Hart.jumpCacheSize + half
                for j in base..<(base + Hart.jumpCacheSize / 2) where jumpTags[j] >> 12 == page {
                    jumpTags[j] = .max
                }
            }
            let bit = Int(page & 4095)
            if linkedPages[bit >> 6] & (1 << UInt64(bit & 63)) != 0 { chained = true }
        }
        if chained {
            mmuEpoch &+= 1
            linkedPages.update(repeating: 0, count: 64)
        }
    }

    /// Records that a superpage of `size` bytes translated `va`, widening the region that makes
    /// an address-specific `sfence.vma` flush everything.
    func noteSuperpage(_ va: UInt64, size: UInt64) {
        let mask = ~(size &- 1)
        if !hasSuperpages {
            hasSuperpages = true
            superpageMask = mask
            superpageBase = va & mask
            return
        }
        var m = superpageMask & mask
        while (va & m) != (superpageBase & m) { m <<= 1 }
        superpageMask = m
        superpageBase &= m
    }

    // MARK: Page walk

    /// The result of a translation: a physical address, or the exception to raise.
    enum Translation {
        case ok(UInt64)
        case fault(Cause)
    }

    /// Translates `va` for an access of type `access` at the given privilege context.
    func translate(_ va: UInt64, _ access: AccessType, mmuIndex: Int) -> Translation {
        if mmuIndex == 3 { return .ok(va) }
        let mode = satp >> 60
        if mode == 0 { return .ok(va) }
        let levels = mode == 9 ? 4 : 3
        let vaBits = 12 + 9 * levels
        // The virtual address must be sign-extended from its top bit.
        let shifted = (Int64(bitPattern: va) << Int64(64 - vaBits)) >> Int64(64 - vaBits)
        guard UInt64(bitPattern: shifted) == va else { return .fault(access.pageFault) }
        let isUser = mmuIndex == 0
        let sum = mmuIndex == 2
        let mxr = (mstatus & MStatus.mxr) != 0
        var table = (satp & 0xfff_ffff_ffff) << 12
        var level = levels - 1
        while true {
            let vpn = (va >> UInt64(12 + 9 * level)) & 0x1ff
            let pteAddress = table &+ vpn &* 8
            guard let p = ram.hostPointer(GuestPhysicalAddress(pteAddress), length: 8) else {
                return .fault(access.accessFault)
            }
            var pte = p.load(as: UInt64.self)
            let v = pte & 1, r = (pte >> 1) & 1, w = (pte >> 2) & 1, xx = (pte >> 3) & 1
            // Bits 60:54 are reserved; 62:61 are Svpbmt's memory type (only with menvcfg.PBMTE,
            // and 3 is reserved); 63 is Svnapot's N bit.
            let pbmt = (pte >> 61) & 3, napot = pte >> 63
            if v == 0 || (r == 0 && w == 1) || (pte >> 54) & 0x7f != 0 { return .fault(access.pageFault) }
            if pbmt != 0 && (pbmt == 3 || menvcfg & EnvCfg.pbmte == 0) { return .fault(access.pageFault) }
            if napot != 0 && !extensions.contains(.svnapot) { return .fault(access.pageFault) }
            if r == 0 && xx == 0 {
                // Pointer to the next level: memory type, N, D, A and U are reserved there.
                if level == 0 || pbmt != 0 || napot != 0 { return .fault(access.pageFault) }
                level -= 1
                table = ((pte >> 10) & 0xfff_ffff_ffff) << 12
                continue
            }
            // Leaf: check permissions.
            let u = (pte >> 4) & 1
            if isUser {
                if u == 0 { return .fault(access.pageFault) }
            } else {
                if u == 1 && (access == .execute || !sum) { return .fault(access.pageFault) }
            }
            switch access {
            case .read: if r == 0 && !(mxr && xx == 1) { return .fault(access.pageFault) }
            case .write: if w == 0 { return .fault(access.pageFault) }
            case .execute: if xx == 0 { return .fault(access.pageFault) }
            }
            var ppn = (pte >> 10) & 0xfff_ffff_ffff
            // Superpages must be aligned.
            if level > 0 && (ppn & ((1 << UInt64(9 * level)) - 1)) != 0 { return .fault(access.pageFault) }
            if napot != 0 {
                // Svnapot: only 64 KiB pages (a 4 KiB leaf whose PPN ends in 0b1000) exist; the
                // low four PPN bits come from the virtual address.
                if level != 0 || ppn & 0xf != 0x8 { return .fault(access.pageFault) }
                ppn = (ppn & ~0xf) | ((va >> 12) & 0xf)
                noteSuperpage(va, size: 64 << 10)
            }
            // Hardware A/D update.
            let a = (pte >> 6) & 1, d = (pte >> 7) & 1
            if a == 0 || (access == .write && d == 0) {
                pte |= 1 << 6
                if access == .write { pte |= 1 << 7 }
                p.storeBytes(of: pte, as: UInt64.self)
                markDirty(page: (pteAddress &- ram.base.raw) >> 12)
            }
            let offsetMask: UInt64 = (1 << UInt64(12 + 9 * level)) - 1
            if level > 0 { noteSuperpage(va, size: offsetMask &+ 1) }
            return .ok(((ppn << 12) & ~offsetMask) | (va & offsetMask))
        }
    }

    // MARK: TLB fill

    /// Installs a TLB entry for the page holding `va` -> `pa` when `pa` is RAM (and, for writes,
    /// when the page holds no translated code and, while a migration logs dirty pages, when the
    /// page is already marked dirty in this pass: so the first store to a page in each pass
    /// comes through `storeSlow` and marks it, and the fast paths of both engines stay as they are).
    @inline(__always) func fillTLB(_ va: UInt64, _ pa: UInt64, _ access: AccessType, mmuIndex: Int) {
        let pageOffset = pa &- ram.base.raw
        guard pageOffset < ram.size else { return }
        if access == .write {
            let page = Int(pageOffset >> 12)
            if codePages[page] != 0 { return }
            if ram.dirtyLogging && ram.cpuDirty[page] == 0 { return }
        }
        let vpn = va >> 12
        let i = tlbBase(mmuIndex, access) + Int(vpn & UInt64(Hart.tlbEntries - 1))
        tlbTags[i] = vpn
        let hostPage = Int(bitPattern: ram.pointer) &+ Int(pageOffset & ~0xfff)
        tlbAddends[i] = hostPage &- Int(bitPattern: UInt(vpn << 12))
    }

    // MARK: Slow paths

    /// Loads `size` bytes at `va`, after a TLB miss. Sets `trapped` and returns 0 on a fault.
    func loadSlow(_ va: UInt64, size: Int, pc: UInt64) -> UInt64 {
        if (va & 0xfff) &+ UInt64(size) > 4096 {
            var v: UInt64 = 0
            for k in 0..<size {
                let b = loadSlow(va &+ UInt64(k), size: 1, pc: pc)
                if trapped { return 0 }
                v |= b << UInt64(8 * k)
            }
            return v
        }
        switch translate(va, .read, mmuIndex: dataMMUIndex) {
        case .fault(let cause):
            raise(cause, tval: va, pc: pc)
            return 0
        case .ok(let pa):
            if let p = ram.hostPointer(GuestPhysicalAddress(pa), length: UInt64(size)) {
                fillTLB(va, pa, .read, mmuIndex: dataMMUIndex)
                switch size {
                case 1: return UInt64(p.load(as: UInt8.self))
                case 2: return UInt64(p.loadUnaligned(as: UInt16.self))
                case 4: return UInt64(p.loadUnaligned(as: UInt32.self))
                default: return p.loadUnaligned(as: UInt64.self)
                }
            }
            if pa & UInt64(size - 1) != 0 {
                raise(.loadAccessFault, tval: va, pc: pc)
                return 0
            }
            let saved = saveHostFlags()
            let v = bus.read(GuestPhysicalAddress(pa), size: size)
            restoreHostFlags(saved)
            return v
        }
    }

    /// Stores `size` bytes at `va`, after a TLB miss. Sets `trapped` on a fault and
    /// `blockInvalidated` when translated code was overwritten.
    func storeSlow(_ va: UInt64, size: Int, value: UInt64, pc: UInt64) {
        if (va & 0xfff) &+ UInt64(size) > 4096 {
            // Translate every byte first so a fault leaves memory unchanged.
            for k in [0, size - 1] {
                if case .fault(let cause) = translate(va &+ UInt64(k), .write, mmuIndex: dataMMUIndex) {
                    raise(cause, tval: va &+ UInt64(k), pc: pc)
                    return
                }
            }
            for k in 0..<size {
                storeSlow(va &+ UInt64(k), size: 1, value: value >> UInt64(8 * k), pc: pc)
            }
            return
        }
        switch translate(va, .write, mmuIndex: dataMMUIndex) {
        case .fault(let cause):
            raise(cause, tval: va, pc: pc)
        case .ok(let pa):
            if let p = ram.hostPointer(GuestPhysicalAddress(pa), length: UInt64(size)) {
                let page = (pa &- ram.base.raw) >> 12
                if codePages[Int(page)] != 0 { storeHitCode(physicalPage: page) }
                markDirty(page: page)
                switch size {
                case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
                case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: value), as: UInt16.self)
                case 4: p.storeBytes(of: UInt32(truncatingIfNeeded: value), as: UInt32.self)
                default: p.storeBytes(of: value, as: UInt64.self)
                }
                fillTLB(va, pa, .write, mmuIndex: dataMMUIndex)
                if reservation != .max && (pa & ~7) == (reservation & ~7) { reservation = .max }
                return
            }
            if pa & UInt64(size - 1) != 0 {
                raise(.storeAccessFault, tval: va, pc: pc)
                return
            }
            let saved = saveHostFlags()
            bus.write(GuestPhysicalAddress(pa), size: size, value: value)
            restoreHostFlags(saved)
        }
    }

    /// Translates `va` for an atomic access and returns a host pointer to RAM, or raises the
    /// right exception (misaligned, page fault, or access fault for non-RAM) and returns nil.
    func atomicPointer(_ va: UInt64, size: Int, write: Bool, pc: UInt64) -> UnsafeMutableRawPointer? {
        if va & UInt64(size - 1) != 0 {
            raise(write ? .storeMisaligned : .loadMisaligned, tval: va, pc: pc)
            return nil
        }
        let access: AccessType = write ? .write : .read
        switch translate(va, access, mmuIndex: dataMMUIndex) {
        case .fault(let cause):
            raise(cause, tval: va, pc: pc)
            return nil
        case .ok(let pa):
            guard let p = ram.hostPointer(GuestPhysicalAddress(pa), length: UInt64(size)) else {
                raise(write ? .storeAccessFault : .loadAccessFault, tval: va, pc: pc)
                return nil
            }
            if write {
                let page = (pa &- ram.base.raw) >> 12
                if codePages[Int(page)] != 0 { storeHitCode(physicalPage: page) }
                markDirty(page: page)
            }
            return p
        }
    }

    /// Marks RAM page `page` (relative to the RAM base) dirty for a live migration; nothing
    /// unless dirty logging is on.
    @inline(__always) func markDirty(page: UInt64) {
        if ram.dirtyLogging { ram.cpuDirty[Int(page)] = 1 }
    }

    /// The guest physical address of a host pointer into RAM that `atomicPointer` returned
    /// (the LR/SC reservation), without walking the page table a second time.
    @inline(__always) func physicalAddress(of p: UnsafeMutableRawPointer) -> UInt64 {
        ram.base.raw &+ UInt64(p - ram.pointer)
    }
}
