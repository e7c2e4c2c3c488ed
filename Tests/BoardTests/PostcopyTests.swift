import Foundation
import FuzzSupport
import Machine
import Synchronization
import Testing
@testable import Board

/// Post-copy migration's pieces without a guest: the return path's messages and parser, the
/// page bitmap, the post-copy records of the live stream, the destination's fault decisions,
/// and userfaultfd placing pages under a thread that waits for them.
struct PostcopyTests {
    static let pageSize = MachineStateFormat.pageSize

    static let messages: [ReturnPathMessage] = [
        .postcopyReady, .pageRequest([5]), .running, .pageRequest([0, 63, 7, 7]), .postcopyUnavailable("no userfaultfd"),
        .refused("disk locked: é"), .synced(7), .ok, .synced(UInt32.max),
    ]
    static let largest = ReturnPathMessage.pageRequest((0..<1024).map { UInt64($0) % 64 })

    // MARK: Return path

    @Test func everyMessageSurvivesAnySplit() throws {
        let wire = Self.messages.flatMap(\.encoded)
        for cut in 0...wire.count {
            var parser = ReturnPathParser(ramPages: 64)
            var got = try parser.feed(Array(wire[..<cut]))
            got += try parser.feed(Array(wire[cut...]))
            #expect(got == Self.messages, "split at \(cut)")
            #expect(parser.pendingBytes == 0)
        }
        // Byte by byte, and the largest request.
        var parser = ReturnPathParser(ramPages: 64)
        var got: [ReturnPathMessage] = []
        for b in wire { got += try parser.feed([b]) }
        #expect(got == Self.messages)
        #expect(try parser.feed(Self.largest.encoded) == [Self.largest])
    }

    @Test func hostileReturnPathsAreRefusedWithTheReason() {
        func refusal(_ bytes: [UInt8]) -> String? {
            var parser = ReturnPathParser(ramPages: 64)
            do {
                _ = try parser.feed(bytes)
                return nil
            } catch {
                return "\(error)"
            }
        }
        func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        func le64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        #expect(refusal(Array("MSVMNOPE".utf8))?.contains("unknown message 'MSVMNOPE'") == true)
        #expect(refusal(ReturnPathMessage.tagRequest + le32(0))?.contains("request for 0 pages") == true)
        #expect(refusal(ReturnPathMessage.tagRequest + le32(1025))?.contains("request for 1025 pages") == true)
        #expect(refusal(ReturnPathMessage.tagRequest + le32(2) + le64(3) + le64(64))?.contains("page 64, outside the 64 pages") == true)
        #expect(refusal(ReturnPathMessage.tagRefused + le32(4097))?.contains("4097 bytes is over the limit") == true)
        #expect(refusal(ReturnPathMessage.tagPostcopyUnavailable + le32(UInt32.max))?.contains("over the limit") == true)
        // Incomplete messages wait for the rest instead.
        #expect(refusal(ReturnPathMessage.tagRequest + le32(2) + le64(3)) == nil)
        #expect(refusal(Array("MSVMR".utf8)) == nil)
        // A reason longer than the limit is cut when sent.
        let long = ReturnPathMessage.refused(String(repeating: "x", count: 5000)).encoded
        var parser = ReturnPathParser(ramPages: 1)
        #expect((try? parser.feed(long)) == [.refused(String(repeating: "x", count: 4096))])
    }

    /// Random bytes and mutations of valid return paths, fed in random pieces: every outcome
    /// is messages or a refusal, and messages name only pages inside RAM. `Fuzz.budget`.
    @Test func mutatedReturnPathsNeverCrash() {
        let seed = Self.messages.flatMap(\.encoded)
        let report = Fuzz.run(target: "return-path", seeds: [seed, ReturnPathMessage.pageRequest([1, 2]).encoded],
                              seconds: Fuzz.budget(ci: 2), maxLength: seed.count * 2,
                              dictionary: [ReturnPathMessage.tagRequest, ReturnPathMessage.tagOK, ReturnPathMessage.tagRefused,
                                           ReturnPathMessage.tagRunning, [0, 4, 0, 0], [0xff, 0xff, 0xff, 0xff]]) { input in
            var parser = ReturnPathParser(ramPages: 64)
            var at = 0
            var piece = 1
            while at < input.count {
                let end = min(at + piece, input.count)
                for m in try parser.feed(Array(input[at..<end])) {
                    if case .pageRequest(let pages) = m {
                        guard !pages.isEmpty, pages.count <= 1024, pages.allSatisfy({ $0 < 64 }) else {
                            Issue.record("a request the parser should have refused: \(pages)")
                            return
                        }
                    }
                }
                at = end
                piece = piece * 3 % 17 + 1
            }
            if parser.pendingBytes > 0 { throw MachineStateError("incomplete") }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(report.executions > 10)
    }

    // MARK: Page bitmap

    @Test func pageBitmapCountsFindsAndRuns() throws {
        var b = PageBitmap(pageCount: 130)
        for p: UInt64 in [0, 1, 2, 63, 64, 129] { b.insert(p) }
        b.insert(1)
        #expect(b.count == 6)
        b.remove(1)
        b.remove(100)
        #expect(b.count == 5 && !b.contains(1) && b.contains(64) && !b.contains(130))
        #expect(b.next(from: 0) == 0 && b.next(from: 1) == 2 && b.next(from: 3) == 63 && b.next(from: 65) == 129)
        #expect(b.next(from: 130) == nil)
        #expect(b.runs.map { [$0.0, $0.1] } == [[0, 1], [2, 1], [63, 2], [129, 1]])
        #expect(throws: MachineStateError.self) { _ = try PageBitmap(pageCount: 130, words: [0, 0, 1 << 2]) }
        #expect(try PageBitmap(pageCount: 130, words: [0, 0, 1 << 1]).count == 1)
    }

    // MARK: Post-copy records

    /// A post-copy stream: pass 1 with `first`, the package (pending pages, sections, run
    /// state), then `later` as post-copy page records, then (if `end`) the end record.
    static func postcopyStream(ram: GuestRAM, first: [UInt64], pending: PageBitmap, later: [[UInt64]],
                               sections: [StateSection], advised: Bool = true, end: Bool = true) throws -> [UInt8] {
        var out: [UInt8] = []
        let sink = StateSink(write: { out += $0 })
        try MachineStateWriter.writeHeader(identity: "test-identity", version: MachineStateFormat.liveVersion,
                                           flags: advised ? MachineStateFormat.flagPostcopy : 0, to: sink)
        if !first.isEmpty { try MachineStateWriter.writePages(first[...], ram: ram, skipZero: true, to: sink) }
        try MachineStateWriter.writePostcopy(pending: pending, to: sink)
        try MachineStateWriter.writeSections(sections, to: sink)
        try MachineStateWriter.writeRunState(running: true, to: sink)
        for batch in later { try MachineStateWriter.writePages(batch[...], ram: ram, skipZero: false, to: sink) }
        if end { try MachineStateWriter.writeEnd(to: sink) }
        try sink.finish()
        return out
    }

    static func source(_ bytes: [UInt8]) -> StateSource {
        var offset = 0
        return StateSource(read: { p, n in
            let k = min(n, bytes.count - offset)
            bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + offset, byteCount: k) }
            offset += k
            return k
        })
    }

    /// Loads a post-copy stream into `ram`: the package, then each page copied in by the
    /// placer (as UFFDIO_COPY would); returns the pending set and the placed pages in order.
    static func load(_ bytes: [UInt8], into ram: GuestRAM) throws -> (pending: PageBitmap, placed: [UInt64]) {
        let reader = try LiveStateReader(source: source(bytes))
        guard case .postcopy(_, let running, let pending) = try reader.readUntilSwitchOver(into: ram), running else {
            throw MachineStateError("not a post-copy package")
        }
        var placed: [UInt64] = []
        try reader.readPostcopyPages(pending: pending) { page, data in
            let dst = ram.pointer + Int(page) * pageSize
            if let data { dst.copyMemory(from: data, byteCount: pageSize) } else { dst.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize) }
            placed.append(page)
        }
        return (pending, placed)
    }

    @Test func postcopyPackageThenPendingPagesRebuildRAM() throws {
        let a = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 256 << 10)
        for p in [0, 3, 9, 40, 41, 63] { LiveStreamTests.fill(a, page: p, with: UInt64(p) << 20 | 5) }
        var out: [UInt8] = []
        let sink = StateSink(write: { out += $0 })
        try MachineStateWriter.writeHeader(identity: "test-identity", version: MachineStateFormat.liveVersion,
                                           flags: MachineStateFormat.flagPostcopy, to: sink)
        // Pass 1 sends pages 0...31; then 3 and 9 change (dirty), and 40 becomes zero.
        try MachineStateWriter.writePages((0..<UInt64(32)).map { $0 }[...], ram: a, skipZero: true, to: sink)
        LiveStreamTests.fill(a, page: 3, with: 0xabc)
        LiveStreamTests.fill(a, page: 9, with: 0xdef)
        a.pointer.advanced(by: 40 * Self.pageSize).initializeMemory(as: UInt8.self, repeating: 0, count: Self.pageSize)
        var pending = PageBitmap(pageCount: 64)
        for p: UInt64 in [3, 9] + (32..<64).map({ $0 }) { pending.insert(p) }
        let sections = [StateSection(name: "clock", version: 1, payload: [9, 9, 9, 9, 9, 9, 9, 9])]
        try MachineStateWriter.writePostcopy(pending: pending, to: sink)
        try MachineStateWriter.writeSections(sections, to: sink)
        try MachineStateWriter.writeRunState(running: true, to: sink)
        // Page 41 asked for first, then the rest in order.
        try MachineStateWriter.writePages([41], ram: a, skipZero: false, to: sink)
        try MachineStateWriter.writePages(([3, 9] + (32..<41).map { $0 } + (42..<64).map { $0 })[...], ram: a, skipZero: false, to: sink)
        try MachineStateWriter.writeEnd(to: sink)
        try sink.finish()

        let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 256 << 10)
        let reader = try LiveStateReader(source: Self.source(out))
        #expect(reader.postcopyAdvised)
        guard case .postcopy(let got, let running, let gotPending) = try reader.readUntilSwitchOver(into: b) else {
            Issue.record("no post-copy package")
            return
        }
        #expect(got == sections && running && gotPending == pending)
        // Before the pending pages come, the pre-copy pages hold their pass-1 contents.
        #expect(b.pointer.load(fromByteOffset: 0, as: UInt64.self) == 5)
        var placed: [UInt64] = []
        try reader.readPostcopyPages(pending: gotPending) { page, data in
            let dst = b.pointer + Int(page) * Self.pageSize
            if let data { dst.copyMemory(from: data, byteCount: Self.pageSize) } else { dst.initializeMemory(as: UInt8.self, repeating: 0, count: Self.pageSize) }
            placed.append(page)
        }
        #expect(placed.first == 41 && placed.count == 34 && Set(placed).count == 34)
        #expect(memcmp(a.pointer, b.pointer, Int(a.size)) == 0)
    }

    @Test func hostilePostcopyStreamsAreRefusedWithTheReason() throws {
        let a = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
        for p in 0..<8 { LiveStreamTests.fill(a, page: p, with: UInt64(p) + 1) }
        var pending = PageBitmap(pageCount: 64)
        for p: UInt64 in [2, 5] { pending.insert(p) }
        let sections = [StateSection(name: "clock", version: 1, payload: [1, 2, 3, 4, 5, 6, 7, 8])]
        func refusal(_ later: [[UInt64]], advised: Bool = true, end: Bool = true) throws -> String? {
            let bytes = try Self.postcopyStream(ram: a, first: [0, 1, 2], pending: pending, later: later, sections: sections,
                                                advised: advised, end: end)
            let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
            do {
                _ = try Self.load(bytes, into: b)
                return nil
            } catch {
                return "\(error)"
            }
        }
        #expect(try refusal([[5, 2]]) == nil)
        #expect(try refusal([[5], [2, 3]])?.contains("post-copy page 3") == true)
        #expect(try refusal([[5], [2, 5]])?.contains("page 5 at offset") == true)
        #expect(try refusal([[5, 5]])?.contains("was sent twice") == true)
        #expect(try refusal([[5]])?.contains("1 post-copy pages not sent") == true)
        #expect(try refusal([[5, 2]], end: false)?.contains("truncated") == true)
        #expect(try refusal([[5, 2]], advised: false)?.contains("did not advise post-copy") == true)
        // A pre-copy load refuses a post-copy package.
        let bytes = try Self.postcopyStream(ram: a, first: [0], pending: pending, later: [[2, 5]], sections: sections)
        let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
        #expect(throws: MachineStateError.self) { _ = try LiveStateReader(source: Self.source(bytes)).readAll(into: b) }
        // A bitmap for another RAM size, or corrupt.
        let c = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 128 << 12)
        #expect(throws: MachineStateError.self) { _ = try Self.load(bytes, into: c) }
        // Without pre-copy pages the post-copy record follows the 37-byte header.
        var corrupt = try Self.postcopyStream(ram: a, first: [], pending: pending, later: [[2, 5]], sections: sections)
        #expect(corrupt[37] == MachineStateFormat.kindPostcopy)
        #expect(try Self.load(corrupt, into: b).placed == [2, 5])
        corrupt[37 + 9] ^= 0x10
        #expect(throws: MachineStateError.self) { _ = try Self.load(corrupt, into: b) }
    }

    /// Found by the postcopy-stream fuzzer's hour-long run (its input kept in
    /// tests/fuzz/corpus/postcopy-stream): a section whose length field claims up to 1 GiB, in
    /// a stream from a socket, had the whole claim allocated and zeroed before its first byte was
    /// read (0.5 s and a gigabyte per record). The reader now grows with the bytes that arrive:
    /// no read asks the source for more than twice what it has delivered, and the refusal names
    /// the section.
    @Test func aSectionLengthIsAClaimNotAnAllocation() throws {
        var stream: [UInt8] = []
        let sink = StateSink(write: { stream += $0 })
        try MachineStateWriter.writeHeader(identity: "test-identity", version: MachineStateFormat.liveVersion, to: sink)
        var w = StateWriter()
        w.u8(MachineStateFormat.kindSection)
        w.string("clock")
        w.u32(1)
        w.u64(MachineStateFormat.maxSectionBytes)  // the claim
        w.u32(0)
        try sink.write(w.bytes + [UInt8](repeating: 7, count: 100))  // the bytes that follow
        try sink.finish()
        var offset = 0, largestAsk = 0
        let source = StateSource(read: { p, n in
            largestAsk = max(largestAsk, n)
            let k = min(n, stream.count - offset)
            stream.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + offset, byteCount: k) }
            offset += k
            return k
        })
        let ram = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 16 << 12)
        let reader = try LiveStateReader(source: source)
        #expect {
            _ = try reader.readUntilSwitchOver(into: ram)
        } throws: { "\($0)".contains("truncated in section clock") }
        #expect(largestAsk <= 2 << 20, "asked the source for \(largestAsk) bytes at once")

        // The fuzzer's input (now a seed of its corpus): refused the same way.
        let kept = Fuzz.corpus("postcopy-stream")
        #expect(!kept.isEmpty)
        let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
        for input in kept {
            #expect {
                _ = try LiveStateReader(source: Self.source(input)).readUntilSwitchOver(into: b)
            } throws: { "\($0)".contains("truncated in section clock") }
        }
    }

    /// Mutations of a post-copy stream: a clean refusal or a load, never a crash or a hang;
    /// no page outside RAM or outside the pending set reaches the placer. `Fuzz.budget`.
    @Test func mutatedPostcopyStreamsNeverCrash() throws {
        let a = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
        for p in [0, 2, 3, 40, 63] { LiveStreamTests.fill(a, page: p, with: UInt64(p)) }
        var pending = PageBitmap(pageCount: 64)
        for p: UInt64 in [3, 40, 41, 63] { pending.insert(p) }
        let sections = [StateSection(name: "clock", version: 1, payload: [1, 2, 3, 4, 5, 6, 7, 8])]
        let seed = try Self.postcopyStream(ram: a, first: [0, 2, 3], pending: pending, later: [[41], [3, 40, 63]], sections: sections)
        let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
        let report = Fuzz.run(target: "postcopy-stream", seeds: [seed] + Fuzz.corpus("postcopy-stream"), seconds: Fuzz.budget(ci: 2), maxLength: seed.count * 2,
                              dictionary: [MachineStateFormat.magic, [5], [3], [4], [6], [0xff], [1, 0, 0, 0]]) { input in
            let reader = try LiveStateReader(source: Self.source(input))
            guard case .postcopy(_, _, let pend) = try reader.readUntilSwitchOver(into: b) else { return }
            try reader.readPostcopyPages(pending: pend) { page, _ in
                if page >= 64 || !pend.contains(page) { Issue.record("page \(page) reached the placer") }
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(report.executions > 10)
        #expect(report.rejected > report.executions / 2, "most mutants should be refused: \(report)")
    }

    // MARK: Destination

    @Test func faultsOnPagesAreAnsweredOnce() {
        var pending = PageBitmap(pageCount: 16)
        pending.insert(4)
        pending.insert(5)
        let pages = PostcopyPages(pending: pending)
        #expect(pages.onFault(1) == .zero)  // never had data on the source
        #expect(pages.onFault(4) == .request)
        #expect(pages.onFault(4) == .wait)  // already asked for
        pages.placed(5)
        #expect(pages.onFault(5) == .wake)  // arrived while the fault was queued
        #expect(pages.missing == 1)
        pages.placed(4)
        pages.placed(4)
        #expect(pages.missing == 0)
    }

    /// userfaultfd end to end: a thread touching missing pages blocks until the fault thread
    /// has asked for them and the "receiver" has placed them with UFFDIO_COPY (or a zero page
    /// for one that never had data); a second placement of the same page reports EEXIST.
    @Test func userfaultfdPlacesPagesUnderAWaitingThread() throws {
        let ram = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
        try UserFault.checkAvailable()
        LiveStreamTests.fill(ram, page: 7, with: 1)  // stale content, dropped below
        var pending = PageBitmap(pageCount: 64)
        for p: UInt64 in [7, 8, 20] { pending.insert(p) }
        let fault = try UserFault(start: ram.pointer, length: Int(ram.size))
        for (first, count) in pending.runs { madvise(ram.pointer + Int(first) * Self.pageSize, Int(count) * Self.pageSize, MADV_DONTNEED) }
        try fault.register()
        let pages = PostcopyPages(pending: pending)
        let requests = Mutex<[UInt64]>([])
        let faults = PostcopyFaultThread(fault: fault, pages: pages) { m in
            if case .pageRequest(let ps) = m { requests.withLock { $0 += ps } }
        }
        faults.start()
        // The guest touches page 7 (pending), page 30 (never had data) and page 8.
        let seen = Mutex<[UInt64]>([])
        let done = DispatchSemaphore(value: 0)
        let base = UInt(bitPattern: ram.pointer)
        let toucher = Thread {
            let p = UnsafeMutableRawPointer(bitPattern: base)!
            let values = [7, 30, 8].map { p.load(fromByteOffset: $0 * 4096 + 8, as: UInt64.self) }
            seen.withLock { $0 = values }
            done.signal()
        }
        toucher.start()
        // Serve requests as the source would, until the toucher is through.
        var data = [UInt8](repeating: 0, count: Self.pageSize)
        var served = Set<UInt64>()
        let deadline = Date(timeIntervalSinceNow: 30)
        while done.wait(timeout: .now() + .milliseconds(5)) == .timedOut {
            #expect(Date() < deadline, "the toucher is still blocked")
            if Date() >= deadline { break }
            for p in requests.withLock({ $0 }) where !served.contains(p) {
                served.insert(p)
                data.withUnsafeMutableBytes { d in
                    for w in 0..<(Self.pageSize / 8) { d.storeBytes(of: p * 1000 + UInt64(w), toByteOffset: w * 8, as: UInt64.self) }
                }
                #expect(try data.withUnsafeBytes { try fault.copy(page: p, from: $0.baseAddress!) })
                pages.placed(p)
            }
        }
        #expect(seen.withLock { $0 } == [7001, 0, 8001])
        #expect(Set(requests.withLock { $0 }) == [7, 8])
        // Already present: EEXIST is reported as false, not as an error.
        #expect(try data.withUnsafeBytes { try fault.copy(page: 7, from: $0.baseAddress!) } == false)
        #expect(try fault.zero(page: 30) == false)
        faults.stop()
        fault.unregister()
        // Unregistered: a missing page is an ordinary zero page again.
        #expect(ram.pointer.load(fromByteOffset: 20 * 4096, as: UInt64.self) == 0)
    }
}
