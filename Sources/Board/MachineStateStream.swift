import CZlib
import Foundation
import Machine

/// The machine-state stream: what `migrate` to a file or a socket, `--incoming`, and internal
/// snapshots (`savevm`) write and read.
///
/// Layout (all integers little-endian):
///
/// | part | contents |
/// |---|---|
/// | header | magic `MSVMSTAT`, format version (u32), flags (u32), the machine identity (u32 length + UTF-8 JSON), CRC-32 of the header so far |
/// | section record | kind 1, name (u32 length + UTF-8), layout version (u32), length (u64), CRC-32 (u32), payload |
/// | RAM record | kind 2, RAM size (u64), run count (u32), runs of non-zero pages (first page u64, count u64), CRC-32 of the run table, CRC-32 of the page data, zero padding to the next 4 KiB of the stream, then the pages of every run in order |
/// | end record | kind 0xFF, the magic again |
///
/// A live migration (`migrate tcp:`/`unix:`) writes format version 2, in which RAM arrives in
/// passes while the guest runs and the device sections come last:
///
/// | part | contents |
/// |---|---|
/// | header | as above, version 2 |
/// | page record | kind 3, page count n (u32, 1...1024), n entries (u64: page index << 1, bit 0 set for an all-zero page whose data is not sent), CRC-32 of the count and entries, CRC-32 of the data, then 4 KiB of data for each entry without bit 0, in order |
/// | section record | as above, after the last page record |
/// | run-state record | kind 4, u8: 1 when the source was running (the destination then runs), 0 when paused |
/// | end record | kind 0xFF, the magic again |
///
/// Header flag bit 0 (`flagPostcopy`) advises post-copy: the destination answers on the return
/// path whether it can do it. A post-copy switch-over puts a post-copy record (kind 5: RAM
/// pages u64, a bitmap of the pages the destination does not hold up to date, one bit per
/// page, u64 words, CRC-32 of both) after the last pre-copy page record; then come the
/// sections and the run-state record, which ends the package; then page records holding only
/// pending pages, each once, in any order; then the end record.
///
/// A sync record (kind 6, u32 sequence number) may follow any pre-copy page record: the
/// destination answers on the return path once it has read everything before it, so that the
/// source knows the stream is drained (each pass ends with one; see LiveMigration.swift).
///
/// The destination zeroes its RAM when the stream starts, so the first pass leaves out zero
/// pages; a page may appear in many records (each pass resends what the guest dirtied), and
/// the last copy wins.
///
/// Zero pages are not stored. Page data starts 4 KiB-aligned in the stream, so a file can be
/// mapped copy-on-write straight into guest RAM (restore time then does not grow with RAM).
/// Each device section carries its own layout version, so one device can change without
/// breaking old streams; the format version changes only when this framing does.
public enum MachineStateFormat {
    public static let magic: [UInt8] = Array("MSVMSTAT".utf8)
    public static let version: UInt32 = 1
    /// Format version of a live-migration stream (page records in passes, sections last).
    public static let liveVersion: UInt32 = 2
    static let kindPages: UInt8 = 3
    static let kindRunState: UInt8 = 4
    static let kindPostcopy: UInt8 = 5
    static let kindSync: UInt8 = 6
    /// Header flag: the source may switch to post-copy (`postcopy-ram`).
    public static let flagPostcopy: UInt32 = 1
    /// Most pages in one page record.
    public static let maxPagesPerRecord = 1024
    public static let pageSize = 4096
    static let kindSection: UInt8 = 1
    static let kindRAM: UInt8 = 2
    static let kindEnd: UInt8 = 0xFF
    /// Largest section payload accepted (GPU resources are the largest sections).
    static let maxSectionBytes: UInt64 = 1 << 30
    /// Largest identity accepted.
    static let maxIdentityBytes = 1 << 20
}

/// Why a machine-state stream was refused or could not be written.
public struct MachineStateError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A CRC-32 (zlib's) over a buffer, continuing `crc`.
func crc32Update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
    guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
    var c = UInt(crc)
    var p = base.assumingMemoryBound(to: UInt8.self)
    var left = bytes.count
    while left > 0 {
        let n = min(left, 1 << 30)
        c = CZlib.crc32(c, p, UInt32(n))
        p += n
        left -= n
    }
    return UInt32(truncatingIfNeeded: c)
}

// MARK: Byte sinks and sources

/// Where a state stream goes: a file, a pipe, a socket or a disk image's VM-state area.
/// Writes are buffered. Not thread-safe.
public final class StateSink {
    private let output: (UnsafeRawBufferPointer) throws -> Void
    private let done: () throws -> Void
    private var buffer = [UInt8]()
    /// Bytes accepted so far (the stream offset of the next byte).
    public private(set) var position: UInt64 = 0
    private static let flushSize = 1 << 20

    /// Writes to `fd`; `close` says whether `finish()` closes it.
    public convenience init(fileDescriptor fd: Int32, close: Bool) {
        self.init(write: Self.writeAll(to: fd), finish: {
            if close { Foundation.close(fd) }
        })
    }

    /// A `write` function for `init(write:finish:)` that writes whole buffers to `fd`.
    public static func writeAll(to fd: Int32) -> (UnsafeRawBufferPointer) throws -> Void {
        { bytes in
            var done = 0
            while done < bytes.count {
                let n = Foundation.write(fd, bytes.baseAddress! + done, bytes.count - done)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw MachineStateError("write failed: \(String(cString: strerror(errno)))")
                }
                done += n
            }
        }
    }

    /// Hands the stream to `write` in chunks of about 1 MiB; `finish` runs after the last one.
    public init(write: @escaping (UnsafeRawBufferPointer) throws -> Void, finish: @escaping () throws -> Void = {}) {
        output = write
        done = finish
        buffer.reserveCapacity(Self.flushSize)
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        position += UInt64(bytes.count)
        if buffer.count + bytes.count <= Self.flushSize {
            buffer.append(contentsOf: bytes)
            return
        }
        try flushBuffer()
        if bytes.count >= Self.flushSize {
            try output(bytes)
        } else {
            buffer.append(contentsOf: bytes)
        }
    }

    public func write(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try write($0) } }

    /// Writes what is buffered (without finishing the output).
    public func flush() throws { try flushBuffer() }

    /// Writes what is buffered and finishes the output; throws if any write failed.
    public func finish() throws {
        try flushBuffer()
        try done()
    }

    private func flushBuffer() throws {
        if buffer.isEmpty { return }
        try buffer.withUnsafeBytes { try output($0) }
        buffer.removeAll(keepingCapacity: true)
    }
}

/// Where a state stream comes from. Reads are buffered and exact: a stream that ends early is
/// refused as truncated. Not thread-safe.
public final class StateSource {
    /// The descriptor, for mapping RAM pages of a regular file (-1 for other sources).
    let fd: Int32
    /// Whether `fd` is a regular file (RAM may then be mapped instead of read).
    let isRegularFile: Bool
    private let fileSize: UInt64
    /// Reads up to n bytes into p; 0 at the end.
    private let input: (UnsafeMutableRawPointer, Int) throws -> Int
    private var buffer = [UInt8](repeating: 0, count: 1 << 20)
    private var bufferStart = 0
    private var bufferEnd = 0
    /// Stream offset of the next byte to be returned.
    public private(set) var position: UInt64 = 0

    /// A source that is not a file: `read` fills up to n bytes and returns how many (0 at the end).
    public init(read: @escaping (UnsafeMutableRawPointer, Int) throws -> Int) {
        fd = -1
        isRegularFile = false
        fileSize = 0
        input = read
    }

    public init(fileDescriptor fd: Int32) {
        self.fd = fd
        input = { p, n in
            while true {
                let r = Foundation.read(fd, p, n)
                if r >= 0 { return r }
                if errno == EINTR { continue }
                throw MachineStateError("read failed: \(String(cString: strerror(errno)))")
            }
        }
        var st = stat()
        if fstat(fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG {
            isRegularFile = true
            fileSize = UInt64(st.st_size)
        } else {
            isRegularFile = false
            fileSize = 0
        }
    }

    /// Bytes of a regular file after the current position.
    var remainingFileBytes: UInt64 { fileSize > position ? fileSize - position : 0 }

    public func read(into out: UnsafeMutableRawBufferPointer, what: String) throws {
        var done = 0
        while done < out.count {
            if bufferStart == bufferEnd {
                // Large reads bypass the buffer.
                if out.count - done >= buffer.count {
                    let n = try readSome(out.baseAddress! + done, out.count - done, what: what)
                    done += n
                    position += UInt64(n)
                    continue
                }
                let n = try buffer.withUnsafeMutableBytes { try readSome($0.baseAddress!, $0.count, what: what) }
                bufferStart = 0
                bufferEnd = n
            }
            let n = min(bufferEnd - bufferStart, out.count - done)
            buffer.withUnsafeBytes { (out.baseAddress! + done).copyMemory(from: $0.baseAddress! + bufferStart, byteCount: n) }
            bufferStart += n
            done += n
            position += UInt64(n)
        }
    }

    public func bytes(_ count: Int, what: String) throws -> [UInt8] {
        // A length read from the stream is only the peer's claim: the array grows (doubling)
        // with the bytes that arrive, so a section that announces a gigabyte and holds a few
        // bytes costs a few bytes and a truncation error, not a gigabyte zeroed first.
        let first = 1 << 20
        var out = [UInt8](repeating: 0, count: min(count, first))
        try out.withUnsafeMutableBytes { try read(into: $0, what: what) }
        while out.count < count {
            let start = out.count
            out.append(contentsOf: repeatElement(0, count: min(count - start, start)))
            try out.withUnsafeMutableBytes {
                try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[start...]), what: what)
            }
        }
        return out
    }

    /// Moves past `count` bytes of a regular file without reading them.
    func skipInFile(_ count: UInt64, what: String) throws {
        precondition(isRegularFile)
        guard count <= remainingFileBytes else { throw MachineStateError("the stream is truncated in \(what)") }
        let buffered = UInt64(bufferEnd - bufferStart)
        if count <= buffered {
            bufferStart += Int(count)
        } else {
            bufferStart = 0
            bufferEnd = 0
            guard lseek(fd, off_t(position + count), SEEK_SET) >= 0 else {
                throw MachineStateError("cannot seek in the stream: \(String(cString: strerror(errno)))")
            }
        }
        position += count
    }

    private func readSome(_ p: UnsafeMutableRawPointer, _ n: Int, what: String) throws -> Int {
        let r = try input(p, n)
        if r == 0 { throw MachineStateError("the stream is truncated in \(what)") }
        return r
    }
}

// MARK: Writing

/// One saved section: a device (or hart, or the clock) and its payload.
public struct StateSection: Equatable, Sendable {
    public var name: String
    public var version: UInt32
    public var payload: [UInt8]
    public init(name: String, version: UInt32, payload: [UInt8]) {
        self.name = name
        self.version = version
        self.payload = payload
    }
}

/// Writes a machine-state stream. Control thread, machine paused.
public enum MachineStateWriter {
    /// Writes the header, every section, guest RAM (non-zero pages only) and the end record.
    /// Returns the number of RAM pages written.
    @discardableResult
    public static func write(identity: String, sections: [StateSection], ram: GuestRAM, to sink: StateSink) throws -> UInt64 {
        try writeHeader(identity: identity, version: MachineStateFormat.version, to: sink)
        try writeSections(sections, to: sink)
        let pages = try writeRAM(ram, to: sink)
        try writeEnd(to: sink)
        return pages
    }

    /// The header: magic, `version`, flags, identity and their CRC.
    public static func writeHeader(identity: String, version: UInt32, flags: UInt32 = 0, to sink: StateSink) throws {
        var h = StateWriter()
        for b in MachineStateFormat.magic { h.u8(b) }
        h.u32(version)
        h.u32(flags)
        h.string(identity)
        let headerCRC = h.bytes.withUnsafeBytes { crc32Update(0, $0) }
        h.u32(headerCRC)
        try sink.write(h.bytes)
    }

    /// One section record per section.
    public static func writeSections(_ sections: [StateSection], to sink: StateSink) throws {
        for s in sections {
            var w = StateWriter()
            w.u8(MachineStateFormat.kindSection)
            w.string(s.name)
            w.u32(s.version)
            w.u64(UInt64(s.payload.count))
            w.u32(s.payload.withUnsafeBytes { crc32Update(0, $0) })
            try sink.write(w.bytes)
            try sink.write(s.payload)
        }
    }

    /// The end record.
    public static func writeEnd(to sink: StateSink) throws {
        var end = StateWriter()
        end.u8(MachineStateFormat.kindEnd)
        for b in MachineStateFormat.magic { end.u8(b) }
        try sink.write(end.bytes)
    }

    /// The run-state record of a live stream.
    public static func writeRunState(running: Bool, to sink: StateSink) throws {
        try sink.write([MachineStateFormat.kindRunState, running ? 1 : 0])
    }

    /// One page record of a live stream holding `pages` (indices relative to the RAM base, at
    /// most `maxPagesPerRecord`). An all-zero page is sent as a flagged entry without data, or
    /// left out when `skipZero` (the first pass: the destination starts from zeroed RAM).
    /// Returns how many pages were sent with data and how many were zero. The pages are read
    /// while the guest may be writing them; a page changed meanwhile is dirty and sent again.
    @discardableResult
    public static func writePages(_ pages: ArraySlice<UInt64>, ram: GuestRAM, skipZero: Bool,
                                  to sink: StateSink) throws -> (normal: Int, zero: Int) {
        precondition(pages.count <= MachineStateFormat.maxPagesPerRecord)
        let pageSize = MachineStateFormat.pageSize
        var entries: [UInt64] = []
        var dataPages: [UInt64] = []
        var zero = 0
        for page in pages {
            let p = (ram.pointer + Int(page) * pageSize).assumingMemoryBound(to: UInt64.self)
            var isZero = true
            for w in 0..<(pageSize / 8) where p[w] != 0 {
                isZero = false
                break
            }
            if isZero {
                zero += 1
                if skipZero { continue }
                entries.append(page << 1 | 1)
            } else {
                entries.append(page << 1)
                dataPages.append(page)
            }
        }
        guard !entries.isEmpty else { return (0, zero) }
        var table = StateWriter()
        table.u32(UInt32(entries.count))
        for e in entries { table.u64(e) }
        // The data is copied first so that its CRC covers exactly the bytes sent.
        var data = [UInt8](repeating: 0, count: dataPages.count * pageSize)
        data.withUnsafeMutableBytes { d in
            for (i, page) in dataPages.enumerated() {
                (d.baseAddress! + i * pageSize).copyMemory(from: ram.pointer + Int(page) * pageSize, byteCount: pageSize)
            }
        }
        var crcs = StateWriter()
        crcs.u32(table.bytes.withUnsafeBytes { crc32Update(0, $0) })
        crcs.u32(data.withUnsafeBytes { crc32Update(0, $0) })
        try sink.write([MachineStateFormat.kindPages])
        try sink.write(table.bytes)
        try sink.write(crcs.bytes)
        try sink.write(data)
        return (dataPages.count, zero)
    }

    /// A sync record of a live stream (the destination answers `sequence` once it reads it).
    public static func writeSync(sequence: UInt32, to sink: StateSink) throws {
        var w = StateWriter()
        w.u8(MachineStateFormat.kindSync)
        w.u32(sequence)
        try sink.write(w.bytes)
    }

    /// The post-copy record of a live stream: the pages the destination must fetch.
    public static func writePostcopy(pending: PageBitmap, to sink: StateSink) throws {
        var w = StateWriter()
        w.u64(pending.pageCount)
        for word in pending.words { w.u64(word) }
        let crc = w.bytes.withUnsafeBytes { crc32Update(0, $0) }
        try sink.write([MachineStateFormat.kindPostcopy])
        try sink.write(w.bytes)
        var c = StateWriter()
        c.u32(crc)
        try sink.write(c.bytes)
    }

    /// Runs of non-zero pages: (first page, page count).
    /// Pages the host never materialised are zero without being read (see
    /// `GuestRAM.possiblyNonZeroPages`); the others are read.
    static func nonZeroRuns(_ ram: GuestRAM) -> [(UInt64, UInt64)] {
        let pages = Int(ram.size) / MachineStateFormat.pageSize
        let candidates = ram.possiblyNonZeroPages()
        var runs: [(UInt64, UInt64)] = []
        var start = -1
        for i in 0..<pages {
            var zero = true
            if candidates?[i] ?? true {
                let p = (ram.pointer + i * MachineStateFormat.pageSize).assumingMemoryBound(to: UInt64.self)
                for w in 0..<(MachineStateFormat.pageSize / 8) where p[w] != 0 {
                    zero = false
                    break
                }
            }
            if !zero {
                if start < 0 { start = i }
            } else if start >= 0 {
                runs.append((UInt64(start), UInt64(i - start)))
                start = -1
            }
        }
        if start >= 0 { runs.append((UInt64(start), UInt64(pages - start))) }
        return runs
    }

    private static func writeRAM(_ ram: GuestRAM, to sink: StateSink) throws -> UInt64 {
        let runs = nonZeroRuns(ram)
        var table = StateWriter()
        for (first, count) in runs {
            table.u64(first)
            table.u64(count)
        }
        var dataCRC: UInt32 = 0
        for (first, count) in runs {
            let p = UnsafeRawBufferPointer(start: ram.pointer + Int(first) * MachineStateFormat.pageSize,
                                           count: Int(count) * MachineStateFormat.pageSize)
            dataCRC = crc32Update(dataCRC, p)
        }
        var w = StateWriter()
        w.u8(MachineStateFormat.kindRAM)
        w.u64(ram.size)
        w.count(runs.count)
        try sink.write(w.bytes)
        try sink.write(table.bytes)
        var t = StateWriter()
        t.u32(table.bytes.withUnsafeBytes { crc32Update(0, $0) })
        t.u32(dataCRC)
        try sink.write(t.bytes)
        let pad = (MachineStateFormat.pageSize - Int(sink.position % UInt64(MachineStateFormat.pageSize))) % MachineStateFormat.pageSize
        try sink.write([UInt8](repeating: 0, count: pad))
        for (first, count) in runs {
            try sink.write(UnsafeRawBufferPointer(start: ram.pointer + Int(first) * MachineStateFormat.pageSize,
                                                  count: Int(count) * MachineStateFormat.pageSize))
        }
        return runs.reduce(0) { $0 + $1.1 }
    }
}

// MARK: Reading

/// A parsed stream up to its RAM record: the identity and every section, checked. The RAM is
/// then loaded with `loadRAM`. Control thread.
public struct MachineStateReader {
    public let identity: String
    public let sections: [StateSection]
    private let source: StateSource

    /// Reads and checks the header and every section record (magic, versions, lengths, CRCs),
    /// stopping at the RAM record.
    public init(source: StateSource) throws {
        self.source = source
        let (version, identity, _) = try Self.readHeader(source)
        guard version == MachineStateFormat.version else {
            if version == MachineStateFormat.liveVersion {
                throw MachineStateError("this is a live-migration stream (format version 2): it can only be received by --incoming tcp: or unix:")
            }
            throw MachineStateError("stream format version \(version) is not supported (this build reads \(MachineStateFormat.version) and \(MachineStateFormat.liveVersion))")
        }
        self.identity = identity

        var sections: [StateSection] = []
        while true {
            let kind = try source.bytes(1, what: "a record kind")[0]
            if kind == MachineStateFormat.kindRAM { break }
            guard kind == MachineStateFormat.kindSection else {
                throw MachineStateError("unknown record kind \(kind) at offset \(source.position - 1)")
            }
            let section = try Self.readSection(source)
            guard !sections.contains(where: { $0.name == section.name }) else {
                throw MachineStateError("section \(section.name) appears twice")
            }
            sections.append(section)
        }
        self.sections = sections
    }

    /// Reads and checks a header (magic, CRC, identity); returns its format version (not yet
    /// checked against what the caller reads) and identity.
    static func readHeader(_ source: StateSource) throws -> (version: UInt32, identity: String, flags: UInt32) {
        let magic = try source.bytes(8, what: "the header")
        guard magic == MachineStateFormat.magic else {
            throw MachineStateError("not a machine-state stream (bad magic)")
        }
        let fixedBytes = try source.bytes(12, what: "the header")
        var fixed = StateReader(section: "header", bytes: fixedBytes)
        let version = try fixed.u32("format version")
        let flags = try fixed.u32("flags")
        let idLength = Int(try fixed.u32("identity length"))
        guard version == MachineStateFormat.version || version == MachineStateFormat.liveVersion else {
            throw MachineStateError("stream format version \(version) is not supported (this build reads \(MachineStateFormat.version) and \(MachineStateFormat.liveVersion))")
        }
        guard idLength <= MachineStateFormat.maxIdentityBytes else {
            throw MachineStateError("header: the machine identity is \(idLength) bytes, over the limit")
        }
        let idBytes = try source.bytes(idLength, what: "the header")
        var crcBytes = StateReader(section: "header", bytes: try source.bytes(4, what: "the header"))
        let storedCRC = try crcBytes.u32("crc")
        var crc = magic.withUnsafeBytes { crc32Update(0, $0) }
        crc = fixedBytes.withUnsafeBytes { crc32Update(crc, $0) }
        crc = idBytes.withUnsafeBytes { crc32Update(crc, $0) }
        guard crc == storedCRC else { throw MachineStateError("header: checksum mismatch (the stream is corrupt)") }
        guard let identity = String(validating: idBytes, as: UTF8.self) else {
            throw MachineStateError("header: the machine identity is not UTF-8")
        }
        return (version, identity, flags)
    }

    /// Reads one section record after its kind byte, checking its limits and CRC.
    static func readSection(_ source: StateSource) throws -> StateSection {
        var lenReader = StateReader(section: "record", bytes: try source.bytes(4, what: "a section name"))
        let nameLength = Int(try lenReader.u32("name length"))
        guard nameLength <= 256 else { throw MachineStateError("a section name of \(nameLength) bytes is over the limit") }
        guard let name = String(validating: try source.bytes(nameLength, what: "a section name"), as: UTF8.self) else {
            throw MachineStateError("a section name is not UTF-8")
        }
        var r = StateReader(section: name, bytes: try source.bytes(16, what: "section \(name)"))
        let version = try r.u32("version")
        let length = try r.u64("length")
        let storedCRC = try r.u32("crc")
        guard length <= MachineStateFormat.maxSectionBytes else {
            throw MachineStateError("section \(name): \(length) bytes is over the limit")
        }
        if source.isRegularFile && length > source.remainingFileBytes {
            throw MachineStateError("the stream is truncated in section \(name)")
        }
        let payload = try source.bytes(Int(length), what: "section \(name)")
        guard payload.withUnsafeBytes({ crc32Update(0, $0) }) == storedCRC else {
            throw MachineStateError("section \(name): checksum mismatch (the stream is corrupt)")
        }
        return StateSection(name: name, version: version, payload: payload)
    }

    /// Loads guest RAM from the RAM record and checks the end record. RAM is zeroed first; for
    /// a regular file the pages are mapped copy-on-write (their checksum is then not verified:
    /// that would read every page), otherwise they are read and verified.
    public func loadRAM(into ram: GuestRAM) throws {
        var head = StateReader(section: "ram", bytes: try source.bytes(12, what: "the RAM record"))
        let size = try head.u64("size")
        let runCount = Int(try head.u32("run count"))
        guard size == ram.size else {
            throw MachineStateError("ram: the stream holds \(size) bytes of RAM, this machine has \(ram.size)")
        }
        let pages = size / UInt64(MachineStateFormat.pageSize)
        guard UInt64(runCount) <= pages else { throw MachineStateError("ram: \(runCount) runs for \(pages) pages") }
        let tableBytes = try source.bytes(runCount * 16, what: "the RAM run table")
        var table = StateReader(section: "ram", bytes: tableBytes)
        var runs: [(UInt64, UInt64)] = []
        var next: UInt64 = 0
        var total: UInt64 = 0
        for i in 0..<runCount {
            let first = try table.u64("runs[\(i)].first"), count = try table.u64("runs[\(i)].count")
            guard count > 0, first >= next, first <= pages, count <= pages - first else {
                throw MachineStateError("ram: run \(i) (\(count) pages at page \(first)) is out of order or outside RAM")
            }
            runs.append((first, count))
            next = first + count
            total += count
        }
        var crcs = StateReader(section: "ram", bytes: try source.bytes(8, what: "the RAM record"))
        let tableCRC = try crcs.u32("run table crc"), dataCRC = try crcs.u32("data crc")
        guard tableBytes.withUnsafeBytes({ crc32Update(0, $0) }) == tableCRC else {
            throw MachineStateError("ram: run table checksum mismatch (the stream is corrupt)")
        }
        let pageSize = UInt64(MachineStateFormat.pageSize)
        let pad = (pageSize - source.position % pageSize) % pageSize
        guard try source.bytes(Int(pad), what: "the RAM record").allSatisfy({ $0 == 0 }) else {
            throw MachineStateError("ram: the padding before the pages is not zero (the stream is corrupt)")
        }
        let dataBytes = total * pageSize
        if source.isRegularFile {
            guard dataBytes + 9 <= source.remainingFileBytes else { throw MachineStateError("the stream is truncated in the RAM pages") }
            var end = [UInt8](repeating: 0, count: 9)
            let n = end.withUnsafeMutableBytes { pread(source.fd, $0.baseAddress, 9, off_t(source.position + dataBytes)) }
            guard n == 9, end[0] == MachineStateFormat.kindEnd, Array(end[1...]) == MachineStateFormat.magic else {
                throw MachineStateError("the end record is missing or corrupt")
            }
            try ram.zeroAll()
            var offset = source.position
            for (first, count) in runs {
                try ram.mapPrivate(fileDescriptor: source.fd, fileOffset: offset, firstPage: first, pageCount: count)
                offset += count * pageSize
            }
            try source.skipInFile(dataBytes, what: "the RAM pages")
        } else {
            try ram.zeroAll()
            var crc: UInt32 = 0
            for (first, count) in runs {
                let p = UnsafeMutableRawBufferPointer(start: ram.pointer + Int(first * pageSize), count: Int(count * pageSize))
                try source.read(into: p, what: "the RAM pages")
                crc = crc32Update(crc, UnsafeRawBufferPointer(p))
            }
            guard crc == dataCRC else { throw MachineStateError("ram: page data checksum mismatch (the stream is corrupt)") }
        }
        let end = try source.bytes(9, what: "the end record")
        guard end[0] == MachineStateFormat.kindEnd, Array(end[1...]) == MachineStateFormat.magic else {
            throw MachineStateError("the end record is missing or corrupt")
        }
    }
}

/// A set of RAM pages, one bit per page: the pages a post-copy destination does not yet hold
/// up to date. A plain value.
public struct PageBitmap: Equatable, Sendable {
    /// Pages the bitmap covers.
    public let pageCount: UInt64
    /// One bit per page, page p at bit p % 64 of word p / 64; bits past `pageCount` are zero.
    public private(set) var words: [UInt64]
    /// Pages in the set.
    public private(set) var count: Int = 0

    public init(pageCount: UInt64) {
        self.pageCount = pageCount
        words = [UInt64](repeating: 0, count: Int((pageCount + 63) / 64))
    }

    /// A bitmap from its words; throws when a bit past `pageCount` is set.
    public init(pageCount: UInt64, words: [UInt64]) throws {
        precondition(words.count == Int((pageCount + 63) / 64))
        self.pageCount = pageCount
        self.words = words
        if pageCount % 64 != 0, let last = words.last, last >> (pageCount % 64) != 0 {
            throw MachineStateError("ram: the post-copy bitmap names pages past the \(pageCount) pages of RAM")
        }
        count = words.reduce(0) { $0 + $1.nonzeroBitCount }
    }

    @inline(__always) public func contains(_ page: UInt64) -> Bool {
        page < pageCount && words[Int(page >> 6)] & (1 << (page & 63)) != 0
    }

    public mutating func insert(_ page: UInt64) {
        let bit: UInt64 = 1 << (page & 63)
        if words[Int(page >> 6)] & bit == 0 {
            words[Int(page >> 6)] |= bit
            count += 1
        }
    }

    public mutating func remove(_ page: UInt64) {
        let bit: UInt64 = 1 << (page & 63)
        if words[Int(page >> 6)] & bit != 0 {
            words[Int(page >> 6)] &= ~bit
            count -= 1
        }
    }

    /// The first page in the set at or after `from`, if any.
    public func next(from: UInt64) -> UInt64? {
        var w = Int(from >> 6)
        guard w < words.count else { return nil }
        var word = words[w] & (~0 << (from & 63))
        while true {
            if word != 0 { return UInt64(w) << 6 + UInt64(word.trailingZeroBitCount) }
            w += 1
            guard w < words.count else { return nil }
            word = words[w]
        }
    }

    /// Runs of consecutive pages in the set: (first page, count).
    public var runs: [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        var p: UInt64 = 0
        while let first = next(from: p) {
            var end = first + 1
            while end < pageCount && contains(end) { end += 1 }
            out.append((first, end - first))
            p = end
        }
        return out
    }
}

/// Where a live stream stands when its switch-over package has been read.
public enum LiveSwitchOver {
    /// A pre-copy stream, complete: RAM is whole; the sections and whether the source ran.
    case complete(sections: [StateSection], running: Bool)
    /// A post-copy package: the sections, whether the source ran, and the pages still to come
    /// (their old contents in RAM are stale); `readPostcopyPages` reads them.
    case postcopy(sections: [StateSection], running: Bool, pending: PageBitmap)
}

/// Reads a live-migration stream (format version 2) into a machine waiting in `inmigrate`:
/// page records go straight into guest RAM as they arrive, sections are collected and
/// checked, and the run-state and end records close it (or, for post-copy, the post-copy
/// record, sections and run state make a package after which the pending pages follow).
/// Everything is validated as untrusted input: indices inside RAM, counts within limits, CRCs
/// over every table and every page. Migration thread, while no hart runs and no device
/// touches RAM (post-copy pages are handed to a placer instead).
public final class LiveStateReader {
    public let identity: String
    /// Whether the header advises post-copy.
    public let postcopyAdvised: Bool
    private let source: StateSource
    /// Pages received with data and as zero.
    public private(set) var normalPages: UInt64 = 0
    public private(set) var zeroPages: UInt64 = 0

    /// Reads and checks the header; throws unless it is a version-2 stream.
    public init(source: StateSource) throws {
        self.source = source
        let (version, identity, flags) = try MachineStateReader.readHeader(source)
        guard version == MachineStateFormat.liveVersion else {
            throw MachineStateError("stream format version \(version) is not a live-migration stream (expected \(MachineStateFormat.liveVersion))")
        }
        guard flags & ~MachineStateFormat.flagPostcopy == 0 else {
            throw MachineStateError("header: unknown flags \(flags)")
        }
        self.identity = identity
        postcopyAdvised = flags & MachineStateFormat.flagPostcopy != 0
    }

    /// Bytes read so far.
    public var position: UInt64 { source.position }

    /// Reads every record after the header of a pre-copy stream (see `readUntilSwitchOver`);
    /// throws at a post-copy record.
    public func readAll(into ram: GuestRAM) throws -> (sections: [StateSection], running: Bool) {
        switch try readUntilSwitchOver(into: ram) {
        case .complete(let sections, let running): return (sections, running)
        case .postcopy: throw MachineStateError("the source switched to post-copy, which this load does not accept")
        }
    }

    /// One page record's table after its kind byte: the entries (page << 1 | zero flag) and
    /// the data CRC, checked against RAM's `pages`.
    private func readPageTable(at: UInt64, pages: UInt64) throws -> (entries: [UInt64], dataCRC: UInt32) {
        let countBytes = try source.bytes(4, what: "a page record")
        var c = StateReader(section: "ram", bytes: countBytes)
        let count = Int(try c.u32("page count"))
        guard count > 0, count <= MachineStateFormat.maxPagesPerRecord else {
            throw MachineStateError("ram: a page record at offset \(at) holds \(count) pages (1...\(MachineStateFormat.maxPagesPerRecord) allowed)")
        }
        let entryBytes = try source.bytes(count * 8, what: "a page record")
        var crcs = StateReader(section: "ram", bytes: try source.bytes(8, what: "a page record"))
        let tableCRC = try crcs.u32("table crc"), dataCRC = try crcs.u32("data crc")
        var crc = countBytes.withUnsafeBytes { crc32Update(0, $0) }
        crc = entryBytes.withUnsafeBytes { crc32Update(crc, $0) }
        guard crc == tableCRC else {
            throw MachineStateError("ram: the page table at offset \(at) fails its checksum (the stream is corrupt)")
        }
        var table = StateReader(section: "ram", bytes: entryBytes)
        var entries: [UInt64] = []
        entries.reserveCapacity(count)
        for i in 0..<count {
            let e = try table.u64("pages[\(i)]")
            guard e >> 1 < pages else {
                throw MachineStateError("ram: page \(e >> 1) at offset \(at) is outside the \(pages) pages of RAM")
            }
            entries.append(e)
        }
        return (entries, dataCRC)
    }

    /// Reads the records after the header up to the switch-over: RAM pages into `ram` (zeroed
    /// first), then either the sections, run state and end record (`complete`) or the
    /// post-copy record, sections and run state (`postcopy`). RAM is left partly written when
    /// this throws: the caller must not run the machine then.
    /// `onSync` is called with the sequence number of each sync record, when everything before
    /// it has been read.
    public func readUntilSwitchOver(into ram: GuestRAM, onSync: (UInt32) throws -> Void = { _ in }) throws -> LiveSwitchOver {
        try ram.zeroAll()
        let pageSize = MachineStateFormat.pageSize
        let pages = ram.size / UInt64(pageSize)
        var sections: [StateSection] = []
        var sectionBytes: UInt64 = 0
        var running: Bool? = nil
        var pending: PageBitmap? = nil
        while true {
            let at = source.position
            let kind = try source.bytes(1, what: "a record kind")[0]
            switch kind {
            case MachineStateFormat.kindPages:
                guard sections.isEmpty, running == nil, pending == nil else {
                    throw MachineStateError("a page record at offset \(at) follows the device sections")
                }
                let (entries, dataCRC) = try readPageTable(at: at, pages: pages)
                var data: UInt32 = 0
                for e in entries {
                    let p = UnsafeMutableRawBufferPointer(start: ram.pointer + Int(e >> 1) * pageSize, count: pageSize)
                    if e & 1 != 0 {
                        p.initializeMemory(as: UInt8.self, repeating: 0)
                        zeroPages += 1
                    } else {
                        try source.read(into: p, what: "the RAM pages")
                        data = crc32Update(data, UnsafeRawBufferPointer(p))
                        normalPages += 1
                    }
                }
                guard data == dataCRC else {
                    throw MachineStateError("ram: the pages of the record at offset \(at) fail their checksum (the stream is corrupt)")
                }
            case MachineStateFormat.kindSync:
                guard sections.isEmpty, running == nil, pending == nil else {
                    throw MachineStateError("a sync record at offset \(at) follows the device sections")
                }
                var r = StateReader(section: "sync", bytes: try source.bytes(4, what: "a sync record"))
                try onSync(try r.u32("sequence"))
            case MachineStateFormat.kindPostcopy:
                guard postcopyAdvised else {
                    throw MachineStateError("a post-copy record at offset \(at) in a stream whose header did not advise post-copy")
                }
                guard sections.isEmpty, running == nil, pending == nil else {
                    throw MachineStateError("the post-copy record at offset \(at) follows the device sections or another one")
                }
                let wordCount = Int((pages + 63) / 64)
                let body = try source.bytes(8 + wordCount * 8, what: "the post-copy record")
                var crcBytes = StateReader(section: "ram", bytes: try source.bytes(4, what: "the post-copy record"))
                let stored = try crcBytes.u32("crc")
                guard body.withUnsafeBytes({ crc32Update(0, $0) }) == stored else {
                    throw MachineStateError("ram: the post-copy record at offset \(at) fails its checksum (the stream is corrupt)")
                }
                var r = StateReader(section: "ram", bytes: body)
                let count = try r.u64("page count")
                guard count == pages else {
                    throw MachineStateError("ram: the post-copy record covers \(count) pages, this machine has \(pages)")
                }
                var words: [UInt64] = []
                words.reserveCapacity(wordCount)
                for i in 0..<wordCount { words.append(try r.u64("bitmap[\(i)]")) }
                pending = try PageBitmap(pageCount: pages, words: words)
            case MachineStateFormat.kindSection:
                guard running == nil else { throw MachineStateError("a section at offset \(at) follows the run-state record") }
                let section = try MachineStateReader.readSection(source)
                guard !sections.contains(where: { $0.name == section.name }) else {
                    throw MachineStateError("section \(section.name) appears twice")
                }
                guard sections.count < 4096 else { throw MachineStateError("more than 4096 sections") }
                sectionBytes += UInt64(section.payload.count)
                guard sectionBytes <= 2 * MachineStateFormat.maxSectionBytes else {
                    throw MachineStateError("the sections add up to more than \(2 * MachineStateFormat.maxSectionBytes) bytes")
                }
                sections.append(section)
            case MachineStateFormat.kindRunState:
                guard running == nil else { throw MachineStateError("a second run-state record at offset \(at)") }
                let v = try source.bytes(1, what: "the run-state record")[0]
                guard v <= 1 else { throw MachineStateError("the run-state record holds \(v) (0 or 1 expected)") }
                if let pending { return .postcopy(sections: sections, running: v == 1, pending: pending) }
                running = v == 1
            case MachineStateFormat.kindEnd:
                let magic = try source.bytes(8, what: "the end record")
                guard magic == MachineStateFormat.magic else { throw MachineStateError("the end record is corrupt") }
                guard let running else { throw MachineStateError("the stream ends without its run-state record") }
                return .complete(sections: sections, running: running)
            default:
                throw MachineStateError("unknown record kind \(kind) at offset \(at)")
            }
        }
    }

    /// Reads the post-copy pages after the package: page records holding only pending pages,
    /// each at most once, then the end record, which must come once every pending page has
    /// arrived. Each record is read whole and checked before its pages go to `place` (page
    /// index, its 4 KiB, or nil for a zero page), so nothing unchecked reaches guest RAM.
    public func readPostcopyPages(pending: PageBitmap, place: (UInt64, UnsafeRawPointer?) throws -> Void) throws {
        let pageSize = MachineStateFormat.pageSize
        var missing = pending
        var data = [UInt8](repeating: 0, count: MachineStateFormat.maxPagesPerRecord * pageSize)
        while true {
            let at = source.position
            let kind = try source.bytes(1, what: "a record kind")[0]
            switch kind {
            case MachineStateFormat.kindPages:
                let (entries, dataCRC) = try readPageTable(at: at, pages: pending.pageCount)
                var inRecord = Set<UInt64>()
                for e in entries where !missing.contains(e >> 1) || !inRecord.insert(e >> 1).inserted {
                    let why = pending.contains(e >> 1) ? "was sent twice" : "was not pending"
                    throw MachineStateError("ram: post-copy page \(e >> 1) at offset \(at) \(why)")
                }
                let withData = entries.filter { $0 & 1 == 0 }.count
                try data.withUnsafeMutableBytes { d in
                    let buffer = UnsafeMutableRawBufferPointer(rebasing: d[0..<withData * pageSize])
                    try source.read(into: buffer, what: "the RAM pages")
                    guard crc32Update(0, UnsafeRawBufferPointer(buffer)) == dataCRC else {
                        throw MachineStateError("ram: the pages of the record at offset \(at) fail their checksum (the stream is corrupt)")
                    }
                    var k = 0
                    for e in entries {
                        missing.remove(e >> 1)
                        if e & 1 != 0 {
                            zeroPages += 1
                            try place(e >> 1, nil)
                        } else {
                            normalPages += 1
                            try place(e >> 1, UnsafeRawPointer(d.baseAddress! + k * pageSize))
                            k += 1
                        }
                    }
                }
            case MachineStateFormat.kindEnd:
                let magic = try source.bytes(8, what: "the end record")
                guard magic == MachineStateFormat.magic else { throw MachineStateError("the end record is corrupt") }
                guard missing.count == 0 else {
                    throw MachineStateError("the stream ends with \(missing.count) post-copy pages not sent")
                }
                return
            default:
                throw MachineStateError("unknown record kind \(kind) at offset \(at) among the post-copy pages")
            }
        }
    }
}
