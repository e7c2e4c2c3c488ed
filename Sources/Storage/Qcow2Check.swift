/// What `Qcow2Image.check()` found, in the terms qemu-img check uses.
public struct Qcow2CheckResult: Sendable, Equatable {
    /// One line per problem ("Leaked cluster 5 refcount=1 reference=0", "ERROR ...").
    public var messages: [String] = []
    /// Clusters whose stored refcount is lower than their references, and other corruptions.
    public var corruptions = 0
    /// Clusters whose stored refcount is higher than their references.
    public var leaks = 0
    /// Virtual clusters allocated in the active L1, of `totalClusters`.
    public var allocatedClusters: UInt64 = 0
    public var totalClusters: UInt64 = 0
    public var fragmentedClusters: UInt64 = 0
    public var compressedClusters: UInt64 = 0
    /// End of the last cluster in use.
    public var imageEndOffset: UInt64 = 0

    /// qemu-img check's exit code: 0 clean, 2 corruptions, 3 leaks only.
    public var exitCode: Int32 { corruptions > 0 ? 2 : leaks > 0 ? 3 : 0 }
}

extension Qcow2Image {
    /// Recomputes every cluster's reference count from the metadata and compares it with the
    /// stored refcounts, as `qemu-img check` does. Read-only; takes the image's lock.
    public func check() throws -> Qcow2CheckResult {
        try lock.withLock { try checkLocked() }
    }

    private func checkLocked() throws -> Qcow2CheckResult {
        var r = Qcow2CheckResult()
        let cs = clusterSize
        let nClusters = fileClusters
        var refs = [UInt32](repeating: 0, count: Int(nClusters))
        func ref(_ offset: UInt64, _ length: UInt64, _ what: String) {
            guard length > 0 else { return }
            let first = offset / cs, last = (offset + length - 1) / cs
            for c in first...last {
                if c >= nClusters {
                    r.corruptions += 1
                    r.messages.append("ERROR \(what) at 0x\(String(offset, radix: 16)) is outside the image file")
                    return
                }
                refs[Int(c)] &+= 1
            }
        }
        ref(0, cs, "header")
        ref(header.refcountTableOffset, UInt64(header.refcountTableClusters) * cs, "refcount table")
        for e in refTable where e != 0 { ref(e, cs, "refcount block") }

        func walkL1(_ table: [UInt64], offset: UInt64, active: Bool) throws {
            ref(offset, UInt64(table.count) * 8, "L1 table")
            var lastHost: UInt64?
            for (i, e) in table.enumerated() {
                if e & Self.l1ReservedMask != 0 {
                    r.corruptions += 1
                    r.messages.append("ERROR found L1 entry with reserved bits set: 0x\(String(e, radix: 16))")
                }
                let l2 = e & Self.offsetMask
                guard l2 != 0 else { continue }
                guard l2 % cs == 0, l2 / cs < nClusters else {
                    r.corruptions += 1
                    r.messages.append("ERROR L2 table at 0x\(String(l2, radix: 16)) (l1_index=\(i)) is outside the image file")
                    continue
                }
                ref(l2, cs, "L2 table")
                if active {
                    let rc = try refcount(l2 / cs)
                    if (e & Self.copiedBit != 0) != (rc == 1) {
                        r.corruptions += 1
                        r.messages.append("ERROR OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(String(e, radix: 16)) refcount=\(rc)")
                    }
                }
                let t = try loadL2(l2)
                for (k, entry) in t.enumerated() where entry != 0 {
                    let m: Mapping
                    do { m = try decode(entry, at: "L2 entry \(k)") } catch {
                        r.corruptions += 1
                        r.messages.append("ERROR \(error)")
                        continue
                    }
                    switch m {
                    case .unallocated: break
                    case .zero(let host, let copied), .data(let host, let copied):
                        if host != 0 && entry & Self.l2ReservedMask != 0 {
                            r.corruptions += 1
                            r.messages.append("ERROR found L2 entry with reserved bits set: 0x\(String(entry, radix: 16))")
                        }
                        if host != 0 {
                            ref(host, cs, "data cluster")
                            if active {
                                let rc = try refcount(host / cs)
                                if copied != (rc == 1) {
                                    r.corruptions += 1
                                    r.messages.append("ERROR OFLAG_COPIED data cluster: l2_entry=\(String(entry, radix: 16)) refcount=\(rc)")
                                }
                            }
                        }
                        if active, case .data = m {
                            r.allocatedClusters += 1
                            if let lastHost, host != lastHost + cs { r.fragmentedClusters += 1 }
                            lastHost = host
                        }
                    case .compressed(let host, let length):
                        ref(host & ~511, (host & 511) + length, "compressed cluster")
                        if active {
                            r.allocatedClusters += 1
                            r.compressedClusters += 1
                            if entry & Self.copiedBit != 0 {
                                r.corruptions += 1
                                r.messages.append("ERROR compressed cluster with OFLAG_COPIED: l2_entry=\(String(entry, radix: 16))")
                            }
                        }
                    }
                }
            }
        }
        try walkL1(l1, offset: header.l1TableOffset, active: true)
        if header.snapshotCount > 0 {
            let bytes = try file.read(count: Int(min(nClusters * cs - header.snapshotsOffset, 64 << 20)),
                                      at: header.snapshotsOffset)
            let length = try Qcow2Snapshot.parseTable(bytes, count: snapshots.count, header: header,
                                                  fileSize: nClusters * cs, path: path).length
            ref(header.snapshotsOffset, UInt64(length), "snapshot table")
            for s in snapshots {
                let b = try file.read(count: Int(s.l1Size) * 8, at: s.l1TableOffset)
                try walkL1((0..<Int(s.l1Size)).map { BE.u64(b, $0 * 8) }, offset: s.l1TableOffset, active: false)
            }
        }

        // Compare with the stored refcounts of every cluster in the file (like QEMU, refcounts of
        // clusters past the end of the file are not examined).
        var lastUsed: UInt64 = 0
        for c in 0..<nClusters {
            let computed = c < nClusters ? UInt64(refs[Int(c)]) : 0
            let stored = try refcount(c)
            if computed > 0 { lastUsed = c + 1 }
            if stored < computed {
                r.corruptions += 1
                r.messages.append("ERROR cluster \(c) refcount=\(stored) reference=\(computed)")
            } else if stored > computed {
                r.leaks += 1
                r.messages.append("Leaked cluster \(c) refcount=\(stored) reference=\(computed)")
            }
        }
        r.totalClusters = (header.size + cs - 1) / cs
        r.imageEndOffset = lastUsed * cs
        return r
    }
}
