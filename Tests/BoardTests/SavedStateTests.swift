import Devices
import Foundation
import FuzzSupport
import Machine
import Testing
@testable import Board

/// The device manager and the machine-state stream: every device is reset and saved through
/// one owner, a saved machine loads back exactly, and a damaged stream is refused by name.
struct SavedStateTests {
    typealias R = VirtioMMIOTransport.Register

    /// A board with a virtio keyboard in slot 0 (a device with queues and state of its own).
    func board() throws -> (VirtBoard, VirtioInput) {
        var c = BoardConfig()
        c.memorySize = 64 << 20
        c.rngSeedBytes = 0
        let keyboard = VirtioInput(kind: .keyboard, display: nil, name: "kbd0")
        c.virtioTransports = [{ ctx in
            VirtioMMIOTransport(device: keyboard, ram: ctx.ram, interrupt: ctx.irq, name: "virtio-mmio (kbd0)",
                                stateSection: "virtio-mmio@\(String(ctx.region.base.raw, radix: 16))")
        }]
        return (try VirtBoard(config: c, system: NullSystem()), keyboard)
    }

    /// Drives slot 0 through the driver's initialisation: features, queue 0 at `ring` and
    /// DRIVER_OK, as Linux's virtio-mmio driver does.
    func activateSlot0(_ b: VirtBoard, ring: UInt64 = 0x8100_0000) {
        let base = VirtMemoryMap.virtioBase
        func w(_ r: UInt64, _ v: UInt64) { b.bus.write(base + r, size: 4, value: v) }
        w(R.status, 1)
        w(R.status, 3)
        w(R.driverFeaturesSel, 1)
        w(R.driverFeatures, 1)  // VIRTIO_F_VERSION_1
        w(R.status, 11)
        w(R.queueSel, 0)
        w(R.queueNum, 64)
        w(R.queueDescLow, ring & 0xffff_ffff)
        w(R.queueDescHigh, ring >> 32)
        w(R.queueDriverLow, (ring + 0x1000) & 0xffff_ffff)
        w(R.queueDriverHigh, (ring + 0x1000) >> 32)
        w(R.queueDeviceLow, (ring + 0x2000) & 0xffff_ffff)
        w(R.queueDeviceHigh, (ring + 0x2000) >> 32)
        w(R.queueReady, 1)
        w(R.status, 15)
    }

    func status(_ b: VirtBoard) -> UInt64 { b.bus.read(VirtMemoryMap.virtioBase + R.status, size: 4) }

    /// The bug this issue started from: `system_reset` left virtio transports live at their old
    /// ring addresses while RAM was reloaded. Every transport now resets with the board.
    @Test func systemResetResetsVirtioTransports() throws {
        let (b, _) = try board()
        activateSlot0(b)
        #expect(status(b) == 15)
        _ = try b.resetForBoot()
        #expect(status(b) == 0, "the transport still holds the driver's status after a system reset")
        #expect(b.bus.read(VirtMemoryMap.virtioBase + R.queueReady, size: 4) == 0)
    }

    @Test func everyDeviceIsManagedOnce() throws {
        let (b, _) = try board()
        let names = b.deviceManager.all.map(\.stateSection)
        #expect(names == ["clint", "plic", "uart0", "rtc", "test", "htif", "virtio-mmio@10001000"])
        #expect(Set(names).count == names.count)
    }

    /// Saves a board with live state (an active queue, UART input, PLIC programming, a timer
    /// compare, RAM contents) and loads it into a fresh board: every section and RAM come back
    /// equal, byte for byte.
    @Test func aSavedBoardLoadsBackExactly() throws {
        let (a, _) = try board()
        activateSlot0(a)
        a.uart.receive(Array("hello".utf8))
        a.bus.write(VirtMemoryMap.plic.base + 4 * 10, size: 4, value: 5)       // priority of source 10
        a.bus.write(VirtMemoryMap.plic.base + 0x2000, size: 4, value: 1 << 10)  // enable for context 0
        a.bus.write(VirtMemoryMap.clint.base + 0x4000, size: 8, value: 123_456)  // mtimecmp hart 0
        for i in stride(from: 0, to: 1 << 20, by: 4096) { a.ram.pointer.storeBytes(of: UInt64(i | 1), toByteOffset: i, as: UInt64.self) }

        let stream = try save(a)
        let (b, _) = try board()
        try withPipeSource(stream) { source in
            let read = try MachineStateReader(source: source)
            #expect(read.identity == "test-identity")
            for s in read.sections {
                var r = StateReader(section: s.name, bytes: s.payload)
                try #require(b.deviceManager.device(section: s.name)).loadState(from: &r, version: s.version)
            }
            try read.loadRAM(into: b.ram)
        }

        #expect(sections(a) == sections(b))
        #expect(memcmp(a.ram.pointer, b.ram.pointer, Int(a.ram.size)) == 0)
        #expect(status(b) == 15)
        #expect(b.uart.pendingInputBytes == 5)
        #expect(b.hartInterrupts[0].mtimecmp.load(ordering: .relaxed) == 123_456)
    }

    @Test func zeroPagesAreNotStored() throws {
        let (a, _) = try board()
        a.ram.pointer.storeBytes(of: UInt64(7), toByteOffset: 3 * 4096, as: UInt64.self)
        a.ram.pointer.storeBytes(of: UInt64(7), toByteOffset: 4 * 4096, as: UInt64.self)
        let runs = MachineStateWriter.nonZeroRuns(a.ram)
        #expect(runs.count == 1 && runs[0].0 == 3 && runs[0].1 == 2)
        let stream = try save(a)
        #expect(stream.count < 64 * 1024, "a 64 MiB machine with two non-zero pages took \(stream.count) bytes")
    }

    /// Untouched pages are skipped without being read; written pages and pages mapped from a
    /// state file are read (a mapped page holds the file's bytes though the host never
    /// touched it).
    @Test func untouchedPagesAreSkippedAndMappedPagesRead() throws {
        let ram = try GuestRAM(base: VirtMemoryMap.dramBase, size: 1 << 20)
        ram.pointer.storeBytes(of: UInt64(9), toByteOffset: 3 * 4096, as: UInt64.self)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("pages-\(UUID())").path
        try Data(repeating: 0xab, count: 3 * 4096).write(to: URL(fileURLWithPath: path))
        let fd = open(path, O_RDONLY)
        defer { close(fd); unlink(path) }
        try ram.mapPrivate(fileDescriptor: fd, fileOffset: 0, firstPage: 10, pageCount: 3)
        let candidates = try #require(ram.possiblyNonZeroPages())
        #expect(candidates[3] && candidates[10] && candidates[11] && candidates[12])
        #expect(!candidates[50], "an untouched page was reported as materialised")
        let runs = MachineStateWriter.nonZeroRuns(ram)
        #expect(runs.map { [$0.0, $0.1] } == [[3, 1], [10, 3]])
        try ram.zeroAll()
        #expect(MachineStateWriter.nonZeroRuns(ram).isEmpty)
    }

    /// 100 mutants of a saved stream (truncations and flipped bytes outside the RAM pages, which
    /// are verified on stream loads) are each refused with an error, never loaded, never a crash.
    @Test func damagedStreamsAreRefused() throws {
        let (a, _) = try board()
        activateSlot0(a)
        a.ram.pointer.storeBytes(of: UInt64(42), toByteOffset: 8192, as: UInt64.self)
        let stream = try save(a)
        var rng = SplitMix64(seed: 0x5eed)
        let ramDataStart = stream.count - 9 - 4096  // one non-zero page before the end record
        for i in 0..<100 {
            var m = stream
            if i % 4 == 0 {
                m.removeLast(Int(rng.next() % UInt64(m.count - 1)) + 1)
            } else {
                var at = Int(rng.next() % UInt64(m.count))
                if at >= ramDataStart && at < stream.count - 9 { at = Int(rng.next() % UInt64(ramDataStart)) }
                m[at] ^= UInt8(1 << (rng.next() % 8))
            }
            let (b, _) = try board()
            var refused = false
            do {
                try withFileSource(m) { source in
                    let read = try MachineStateReader(source: source)
                    for s in read.sections {
                        var r = StateReader(section: s.name, bytes: s.payload)
                        try b.deviceManager.device(section: s.name)?.loadState(from: &r, version: s.version)
                    }
                    try read.loadRAM(into: b.ram)
                }
            } catch is MachineStateError {
                refused = true
            } catch is SavedStateError {
                refused = true
            }
            #expect(refused, "mutant \(i) was accepted")
        }
    }

    /// On a stream (not a mapped file) a flipped bit in a RAM page is caught by its checksum.
    @Test func aDamagedRAMPageIsRefusedOnAStream() throws {
        let (a, _) = try board()
        a.ram.pointer.storeBytes(of: UInt64(42), toByteOffset: 8192, as: UInt64.self)
        var stream = try save(a)
        stream[stream.count - 9 - 4096 + 100] ^= 1
        let (b, _) = try board()
        #expect(throws: MachineStateError("ram: page data checksum mismatch (the stream is corrupt)")) {
            try withPipeSource(stream) { try MachineStateReader(source: $0).loadRAM(into: b.ram) }
        }
    }

    /// A section that parses but holds a value the device cannot take is refused naming the
    /// device and the field.
    @Test func invalidValuesNameTheDeviceAndField() throws {
        let (a, _) = try board()
        var s = a.uart.captureState()
        s.triggerLevel = 3
        #expect(throws: SavedStateError(section: "uart0", field: "trigger-level", reason: "3 is not 1, 4, 8 or 14")) {
            try a.uart.applyState(s)
        }
        var w = StateWriter()
        w.u64(1)
        var r = StateReader(section: "plic", bytes: w.bytes)
        #expect(throws: SavedStateError.self) { try a.plic.loadState(from: &r, version: 1) }
        var r2 = StateReader(section: "plic", bytes: [])
        #expect(throws: SavedStateError(section: "plic", field: "(version)",
                                        reason: "layout version 9 is not supported (this build reads 1...1)")) {
            try a.plic.loadState(from: &r2, version: 9)
        }
    }

    /// While quiesced a virtio-input device keeps reports out of guest RAM; they arrive on resume.
    @Test func quiescedInputWaitsForResume() throws {
        let (b, keyboard) = try board()
        activateSlot0(b)
        let ring: UInt64 = 0x8100_0000
        // One 8-byte buffer posted in queue 0 (descriptor 0 writable, avail idx 1).
        let buffer: UInt64 = 0x8110_0000
        let d = b.ram.hostPointer(GuestPhysicalAddress(ring))!
        d.storeBytes(of: buffer, as: UInt64.self)
        d.storeBytes(of: UInt32(8), toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: UInt16(2), toByteOffset: 12, as: UInt16.self)
        let avail = b.ram.hostPointer(GuestPhysicalAddress(ring + 0x1000))!
        avail.storeBytes(of: UInt16(0), toByteOffset: 4, as: UInt16.self)
        avail.storeBytes(of: UInt16(1), toByteOffset: 2, as: UInt16.self)
        let used = b.ram.hostPointer(GuestPhysicalAddress(ring + 0x2000))!

        b.deviceManager.quiesce()
        keyboard.handle([.key(code: 30, down: true)])
        #expect(used.load(fromByteOffset: 2, as: UInt16.self) == 0, "a quiesced device wrote the used ring")
        b.deviceManager.resume()
        #expect(used.load(fromByteOffset: 2, as: UInt16.self) == 1, "the report was not delivered on resume")
    }

    // MARK: Helpers

    func sections(_ b: VirtBoard) -> [StateSection] {
        b.deviceManager.all.map { d in
            var w = StateWriter()
            d.saveState(to: &w)
            return StateSection(name: d.stateSection, version: d.stateVersion, payload: w.bytes)
        }
    }

    func save(_ b: VirtBoard) throws -> [UInt8] {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("state-\(UUID())").path
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        defer { close(fd); unlink(path) }
        let sink = StateSink(fileDescriptor: fd, close: false)
        try MachineStateWriter.write(identity: "test-identity", sections: sections(b), ram: b.ram, to: sink)
        try sink.finish()
        return Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// Runs `body` with a source reading `bytes` from a regular file (RAM pages get mapped).
    func withFileSource<T>(_ bytes: [UInt8], _ body: (StateSource) throws -> T) throws -> T {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("state-\(UUID())").path
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let fd = open(path, O_RDONLY)
        unlink(path)
        defer { close(fd) }
        return try body(StateSource(fileDescriptor: fd))
    }

    /// Runs `body` with a source reading `bytes` through a pipe (a stream: RAM pages are read
    /// and their checksum verified). The writer thread ends when everything was read or the
    /// read end closes.
    func withPipeSource<T>(_ bytes: [UInt8], _ body: (StateSource) throws -> T) throws -> T {
        signal(SIGPIPE, SIG_IGN)  // the reader may stop early (a refused stream); the writer then gets EPIPE
        var fds: [Int32] = [0, 0]
        pipe(&fds)
        let writer = fds[1]
        Thread.detachNewThread {
            bytes.withUnsafeBytes { p in
                var done = 0
                while done < p.count {
                    let n = write(writer, p.baseAddress! + done, p.count - done)
                    if n <= 0 { break }
                    done += n
                }
            }
            close(writer)
        }
        defer { close(fds[0]) }
        return try body(StateSource(fileDescriptor: fds[0]))
    }
}
