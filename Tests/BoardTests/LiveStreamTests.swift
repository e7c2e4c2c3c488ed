import Foundation
import FuzzSupport
import Machine
import Testing
@testable import Board

/// The live-migration stream (format version 2): page records in passes, then the sections,
/// the run state and the end. Round trips, the refusals a hostile peer meets, and a fuzzer.
struct LiveStreamTests {
    static let pageSize = MachineStateFormat.pageSize

    /// A stream as a source writes it: pass 1 with `first`, pass 2 with `second` (pages then
    /// re-read from `ram`), each ending with a sync record, sections, run state, end.
    static func stream(ram: GuestRAM, first: [UInt64], second: [UInt64], sections: [StateSection],
                       running: Bool = true, identity: String = "test-identity") throws -> [UInt8] {
        var out: [UInt8] = []
        let sink = StateSink(write: { out += $0 })
        try MachineStateWriter.writeHeader(identity: identity, version: MachineStateFormat.liveVersion, to: sink)
        for pass in [first, second] {
            var i = 0
            while i < pass.count {
                let end = min(i + 300, pass.count)
                try MachineStateWriter.writePages(pass[i..<end], ram: ram, skipZero: pass == first, to: sink)
                i = end
            }
            try MachineStateWriter.writeSync(sequence: pass == first ? 1 : 2, to: sink)
        }
        try MachineStateWriter.writeSections(sections, to: sink)
        try MachineStateWriter.writeRunState(running: running, to: sink)
        try MachineStateWriter.writeEnd(to: sink)
        try sink.finish()
        return out
    }

    static func read(_ bytes: [UInt8], into ram: GuestRAM) throws -> (sections: [StateSection], running: Bool) {
        var offset = 0
        let source = StateSource(read: { p, n in
            let k = min(n, bytes.count - offset)
            bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + offset, byteCount: k) }
            offset += k
            return k
        })
        let reader = try LiveStateReader(source: source)
        guard reader.identity == "test-identity" else { throw MachineStateError("identity \(reader.identity)") }
        return try reader.readAll(into: ram)
    }

    static func fill(_ ram: GuestRAM, page: Int, with value: UInt64) {
        for w in 0..<(pageSize / 8) {
            ram.pointer.storeBytes(of: value &+ UInt64(w), toByteOffset: page * pageSize + w * 8, as: UInt64.self)
        }
    }

    @Test func passesArriveAndTheLastCopyWins() throws {
        let a = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)
        for p in [0, 1, 7, 100, 255] { Self.fill(a, page: p, with: UInt64(p) << 32 | 1) }
        let sections = [StateSection(name: "clock", version: 1, payload: [1, 2, 3, 4, 5, 6, 7, 8])]
        // Pass 1 lists every page (zero ones are left out); then page 7 changes, page 100
        // becomes zero, and pass 2 resends both.
        var out: [UInt8] = []
        let sink = StateSink(write: { out += $0 })
        try MachineStateWriter.writeHeader(identity: "test-identity", version: MachineStateFormat.liveVersion, to: sink)
        let all = (0..<UInt64(256)).map { $0 }
        let first = try MachineStateWriter.writePages(all[0..<256], ram: a, skipZero: true, to: sink)
        #expect(first.normal == 5 && first.zero == 251)
        Self.fill(a, page: 7, with: 0xdead_0000)
        a.pointer.advanced(by: 100 * Self.pageSize).initializeMemory(as: UInt8.self, repeating: 0, count: Self.pageSize)
        let second = try MachineStateWriter.writePages([7, 100], ram: a, skipZero: false, to: sink)
        #expect(second.normal == 1 && second.zero == 1)
        try MachineStateWriter.writeSections(sections, to: sink)
        try MachineStateWriter.writeRunState(running: false, to: sink)
        try MachineStateWriter.writeEnd(to: sink)
        try sink.finish()

        let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)
        Self.fill(b, page: 50, with: 99)  // stale content of the destination is cleared
        let got = try Self.read(out, into: b)
        #expect(got.sections == sections)
        #expect(got.running == false)
        #expect(memcmp(a.pointer, b.pointer, Int(a.size)) == 0)
    }

    /// Bytes of a valid stream of one page (page 3) and no sections, with `edit` applied.
    func refusal(_ edit: (inout [UInt8]) -> Void) throws -> String {
        let a = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 10)
        Self.fill(a, page: 3, with: 5)
        var bytes = try Self.stream(ram: a, first: [3], second: [], sections: [])
        edit(&bytes)
        let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 10)
        do {
            _ = try Self.read(bytes, into: b)
        } catch let e as MachineStateError {
            return e.message
        }
        return "accepted"
    }

    /// Offset of the first page record's kind byte in a stream with identity "test-identity".
    static let recordStart = 8 + 12 + "test-identity".utf8.count + 4

    @Test func hostileRecordsAreRefusedWithAReason() throws {
        #expect(try refusal { _ in } == "accepted")
        // Page count 0 and over the limit.
        #expect(try refusal { $0.replaceSubrange((Self.recordStart + 1)..<(Self.recordStart + 5), with: [0, 0, 0, 0]) }
            .contains("holds 0 pages"))
        #expect(try refusal { $0.replaceSubrange((Self.recordStart + 1)..<(Self.recordStart + 5), with: [1, 4, 0, 0]) }
            .contains("holds 1025 pages"))
        // A page outside RAM (entry = page << 1): page 16 of a 16-page RAM, table CRC fixed up.
        #expect(try refusal { b in
            let entry = Self.recordStart + 5
            b.replaceSubrange(entry..<(entry + 8), with: [32, 0, 0, 0, 0, 0, 0, 0])
            let crc = b[(Self.recordStart + 1)..<(entry + 8)].withUnsafeBytes { crc32Update(0, $0) }
            withUnsafeBytes(of: crc.littleEndian) { b.replaceSubrange((entry + 8)..<(entry + 12), with: $0) }
        }.contains("outside the 16 pages"))
        // Corrupt table, corrupt page data.
        #expect(try refusal { $0[Self.recordStart + 5] ^= 2 }.contains("fails its checksum"))
        #expect(try refusal { $0[Self.recordStart + 5 + 8 + 8 + 100] ^= 1 }.contains("fail their checksum"))
        // Truncated anywhere; unknown kind; no run state; a page record after the run state.
        #expect(try refusal { $0.removeLast(3) }.contains("truncated"))
        #expect(try refusal { $0[Self.recordStart] = 9 }.contains("unknown record kind 9"))
        #expect(try refusal { b in b.remove(at: b.count - 10); b.remove(at: b.count - 10) }.contains("without its run-state record"))
        #expect(try refusal { b in
            let record = Array(b[Self.recordStart..<(b.count - 11)])
            b.insert(contentsOf: record, at: b.count - 9)
        }.contains("follows the device sections"))
    }

    @Test func aFileLoadRefusesALiveStream() throws {
        let a = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 10)
        let bytes = try Self.stream(ram: a, first: [], second: [], sections: [])
        var offset = 0
        let source = StateSource(read: { p, n in
            let k = min(n, bytes.count - offset)
            bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + offset, byteCount: k) }
            offset += k
            return k
        })
        #expect(throws: MachineStateError.self) { _ = try MachineStateReader(source: source) }
    }

    /// Sync records end each pass: the reader reports each one once everything before it is in
    /// RAM; one after the sections is refused.
    @Test func syncRecordsAreReportedAfterWhatPrecedesThem() throws {
        let a = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
        for p in [1, 9] { Self.fill(a, page: p, with: UInt64(p) + 3) }
        func stream(syncAfterSections: Bool) throws -> [UInt8] {
            var out: [UInt8] = []
            let sink = StateSink(write: { out += $0 })
            try MachineStateWriter.writeHeader(identity: "test-identity", version: MachineStateFormat.liveVersion, to: sink)
            try MachineStateWriter.writePages([1], ram: a, skipZero: true, to: sink)
            try MachineStateWriter.writeSync(sequence: 1, to: sink)
            try MachineStateWriter.writePages([9], ram: a, skipZero: true, to: sink)
            try MachineStateWriter.writeSync(sequence: 2, to: sink)
            try MachineStateWriter.writeSections([StateSection(name: "clock", version: 1, payload: [0, 0, 0, 0, 0, 0, 0, 0])], to: sink)
            if syncAfterSections { try MachineStateWriter.writeSync(sequence: 3, to: sink) }
            try MachineStateWriter.writeRunState(running: true, to: sink)
            try MachineStateWriter.writeEnd(to: sink)
            try sink.finish()
            return out
        }
        func source(_ bytes: [UInt8]) -> StateSource {
            var offset = 0
            return StateSource(read: { p, n in
                let k = min(n, bytes.count - offset)
                bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress! + offset, byteCount: k) }
                offset += k
                return k
            })
        }
        let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 64 << 12)
        var seen: [(UInt32, UInt64, UInt64)] = []
        let result = try LiveStateReader(source: source(try stream(syncAfterSections: false))).readUntilSwitchOver(into: b) { n in
            seen.append((n, b.pointer.load(fromByteOffset: 1 * 4096, as: UInt64.self), b.pointer.load(fromByteOffset: 9 * 4096, as: UInt64.self)))
        }
        #expect(seen.map { [UInt64($0.0), $0.1, $0.2] } == [[1, 4, 0], [2, 4, 12]])
        guard case .complete(_, let running) = result else {
            Issue.record("not complete")
            return
        }
        #expect(running)
        #expect(throws: MachineStateError("a sync record at offset \(try stream(syncAfterSections: true).count - 9 - 2 - 5) follows the device sections")) {
            _ = try LiveStateReader(source: source(try stream(syncAfterSections: true))).readAll(into: b)
        }
    }

    /// Mutations of a valid live stream fed to a destination's reader: every outcome is a
    /// clean refusal or a load, never a crash or a hang. `Fuzz.budget` (3 s in CI).
    @Test func mutatedLiveStreamsNeverCrash() throws {
        let a = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 256 << 10)
        for p in [0, 2, 3, 40, 63] { Self.fill(a, page: p, with: UInt64(p)) }
        let sections = [StateSection(name: "clock", version: 1, payload: [1, 2, 3, 4, 5, 6, 7, 8]),
                        StateSection(name: "hart0", version: 1, payload: Array(repeating: 7, count: 40))]
        let seed = try Self.stream(ram: a, first: (0..<64).map { $0 }, second: [2, 40, 5], sections: sections)
        let b = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 256 << 10)
        let report = Fuzz.run(target: "live-stream", seeds: [seed], seconds: Fuzz.budget(ci: 3),
                              maxLength: seed.count * 2,
                              dictionary: [MachineStateFormat.magic, [2, 0, 0, 0], [3], [4], [6], [0xff], [0, 4, 0, 0]]) { input in
            _ = try Self.read(input, into: b)
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(report.executions > 10)
        #expect(report.rejected > report.executions / 2, "most mutants should be refused: \(report)")
    }
}
