import Machine

/// The translation-block cache: lookup by virtual PC through a per-privilege jump cache, then
/// by physical PC; translation of new blocks; exact invalidation when code is overwritten.
extension Hart {
    /// Returns the block for the current privilege at virtual `pc`, translating it if needed.
    /// On a fetch fault the trap is taken and -1 is returned.
    func lookupBlock(_ pc: UInt64) -> Int32 {
        let jc = fetchMMUIndex * Hart.jumpCacheSize + Int((pc >> 1) & UInt64(Hart.jumpCacheSize - 1))
        if jumpTags[jc] == pc {
            let b = jumpBlocks[jc]
            if blocks[Int(b)].valid { return b }
        }
        // Translation uses Swift collections whose growth arithmetic touches the host FPU.
        let savedFlags = saveHostFlags()
        defer { restoreHostFlags(savedFlags) }
        if pc & 1 != 0 {
            raise(.instructionMisaligned, tval: pc, pc: pc)
            trapped = false
            return -1
        }
        let pa: UInt64
        switch translate(pc, .execute, mmuIndex: fetchMMUIndex) {
        case .fault(let cause):
            raise(cause, tval: pc, pc: pc)
            trapped = false
            return -1
        case .ok(let p):
            pa = p
        }
        guard ram.contains(GuestPhysicalAddress(pa), length: 2) else {
            raise(.instructionAccessFault, tval: pc, pc: pc)
            trapped = false
            return -1
        }
        let key = (pa << 2) | privilege.rawValue
        var index = blockByPhysical[key] ?? -1
        if index < 0 || !blocks[Int(index)].valid {
            index = translateBlock(physicalPC: pa, virtualPC: pc)
            if index < 0 { return -1 }
            blockByPhysical[key] = index
        }
        jumpTags[jc] = pc
        jumpBlocks[jc] = index
        return index
    }

    /// Decodes guest code at `physicalPC` into a new block. Returns -1 (after taking the trap)
    /// when an instruction straddling into the next page cannot be fetched.
    private func translateBlock(physicalPC: UInt64, virtualPC: UInt64) -> Int32 {
        if blockCount >= Hart.maxBlocks || opCount + Hart.maxOpsPerBlock > Hart.maxOps || codeCache?.hasRoom == false {
            flushAllTranslations()
        }
        let index = Int32(blockCount)
        var block = TranslationBlock()
        block.physicalPC = physicalPC
        block.opStart = Int32(opCount)
        block.privilege = UInt8(privilege.rawValue)
        let page = physicalPC & ~0xfff
        let host = ram.pointer + Int(physicalPC &- ram.base.raw)
        var offset = 0
        var n = 0
        let room = Int(4096 - (physicalPC & 0xfff))
        // Under a debugger every block is one instruction, so stops are exact.
        let maxOps = exactMode ? 1 : Hart.maxOpsPerBlock
        while n < maxOps {
            if offset + 2 > room { break }
            let low = host.loadUnaligned(fromByteOffset: offset, as: UInt16.self)
            var op: Op
            if low & 3 != 3 {
                if let expanded = Decoder.expandCompressed(low) {
                    op = Decoder.decode(expanded, extensions: extensions)
                } else {
                    op = Op()
                    op.kind = .illegal
                }
                op.raw = UInt32(low)
                op.length = 2
            } else if offset + 4 <= room {
                op = Decoder.decode(host.loadUnaligned(fromByteOffset: offset, as: UInt32.self), extensions: extensions)
            } else {
                // The instruction straddles into the next page: only as the first of a block.
                if n > 0 { break }
                let nextVA = (virtualPC & ~0xfff) &+ 4096
                switch translate(nextVA, .execute, mmuIndex: fetchMMUIndex) {
                case .fault(let cause):
                    raise(cause, tval: nextVA, pc: virtualPC)
                    trapped = false
                    return -1
                case .ok(let nextPA):
                    guard let p = ram.hostPointer(GuestPhysicalAddress(nextPA), length: 2) else {
                        raise(.instructionAccessFault, tval: nextVA, pc: virtualPC)
                        trapped = false
                        return -1
                    }
                    let high = p.load(as: UInt16.self)
                    op = Decoder.decode(UInt32(low) | (UInt32(high) << 16), extensions: extensions)
                    block.secondPage = nextPA & ~0xfff
                }
            }
            op.pcOffset = UInt16(offset)
            ops[opCount + n] = op
            n += 1
            offset += Int(op.length)
            if op.endsBlock || block.secondPage != .max { break }
        }
        block.opCount = Int32(n)
        block.byteLength = Int32(offset)
        block.valid = true
        if let cache = codeCache { compileJIT(&block, index: index, virtualPC: virtualPC, cache) }
        blocks[Int(index)] = block
        blockCount += 1
        opCount += n
        blocksTranslated += 1
        markCode(page: page, block: index)
        if block.secondPage != .max { markCode(page: block.secondPage, block: index) }
        return index
    }

    private func markCode(page: UInt64, block: Int32) {
        let ramPage = Int((page &- ram.base.raw) >> 12)
        if codePages[ramPage] == 0 {
            codePages[ramPage] = 1
            ram.codeEpoch.add(1, ordering: .acquiringAndReleasing)
            checkCodeEpoch()
        }
        blocksByPage[page, default: []].append(block)
    }

    /// A store from this hart hit a code page: drop this hart's blocks from it now, and tell
    /// the other harts, which drop theirs at their next `fence.i`.
    func storeHitCode(physicalPage: UInt64) {
        codePages[Int(physicalPage)] = 0
        invalidateCode(physicalPage: physicalPage)
        ram.noteExternalWrite(GuestPhysicalAddress(ram.base.raw &+ (physicalPage << 12)), length: 4096)
    }

    /// Invalidates this hart's blocks with code from the RAM page `physicalPage` (a page index
    /// relative to the RAM base).
    func invalidateCode(physicalPage: UInt64) {
        let page = ram.base.raw &+ (physicalPage << 12)
        guard let list = blocksByPage.removeValue(forKey: page) else { return }
        for b in list where blocks[Int(b)].valid {
            blocks[Int(b)].valid = false
            let key = (blocks[Int(b)].physicalPC << 2) | UInt64(blocks[Int(b)].privilege)
            if blockByPhysical[key] == b { blockByPhysical[key] = nil }
            blocksInvalidated += 1
        }
        mmuEpoch &+= 1
        blockInvalidated = true
    }

    /// Invalidates translated code in the guest physical range (for DMA writes by devices).
    public func invalidateCode(in region: GuestRegion) {
        guard region.size > 0 else { return }
        var a = region.base.raw & ~0xfff
        while a < region.end.raw {
            let off = a &- ram.base.raw
            if off < ram.size { invalidateCode(physicalPage: off >> 12) }
            a &+= 4096
        }
    }

    /// Drops every translation (pool full, or reset).
    func flushAllTranslations() {
        translationFlushes += 1
        for i in 0..<blockCount { blocks[i].valid = false }
        blockCount = 0
        opCount = 0
        blockByPhysical.removeAll(keepingCapacity: true)
        blocksByPage.removeAll(keepingCapacity: true)
        // The shared code-page map is left as it is: other harts may still have code there,
        // and a stale mark costs one slow-path store.
        jumpTags.update(repeating: .max, count: 4 * Hart.jumpCacheSize)
        codeCache?.reset()
        flushTLB()
        mmuEpoch &+= 1
        linkedPages.update(repeating: 0, count: 64)
        hasSuperpages = false
    }
}
