import Machine
import Synchronization

/// A read-only MMIO region holding fixed bytes (QEMU's mask ROM at 0x1000, where `virt` keeps
/// `fw_dynamic_info`). Reads are little-endian; bytes past the contents read as zero; writes are
/// ignored. Immutable, so any thread may read it.
public final class MaskROM: MMIODevice, Sendable {
    public let name: String
    /// The ROM contents, starting at offset 0.
    public let bytes: [UInt8]

    /// Creates a ROM with the given contents.
    public init(name: String = "mrom", bytes: [UInt8]) {
        self.name = name
        self.bytes = bytes
    }

    public func read(offset: UInt64, size: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<size {
            let o = offset &+ UInt64(i)
            if o < UInt64(bytes.count) { v |= UInt64(bytes[Int(o)]) << (8 * UInt64(i)) }
        }
        return v
    }

    public func write(offset: UInt64, size: Int, value: UInt64) {}
}

/// Where the first instruction runs and what the harts find in a0–a2 at reset, as QEMU's
/// reset vector sets them: a0 = hart ID, a1 = device-tree address, a2 = `fw_dynamic_info`.
public struct BootState: Sendable, Equatable {
    /// The first instruction (firmware entry, or the kernel's when there is no firmware).
    public let entry: GuestPhysicalAddress
    /// Where the flattened device tree was copied.
    public let deviceTreeAddress: GuestPhysicalAddress
    /// Where `fw_dynamic_info` lives (in the mask ROM).
    public let firmwareInfoAddress: GuestPhysicalAddress

    /// Resets `cpu` to this state (control thread, while the hart is not running).
    public func apply(to cpu: any VirtualCPU) {
        cpu.reset(entry: entry, a0: UInt64(cpu.hartID), a1: deviceTreeAddress.raw, a2: firmwareInfoAddress.raw)
    }
}

/// A piece of an image to copy into RAM: `fileSize` bytes from `fileOffset` of the image, then
/// zeros up to `memorySize`.
struct ImageSegment: Sendable, Equatable {
    var address: GuestPhysicalAddress
    var fileOffset: Int
    var fileSize: Int
    var memorySize: UInt64
    var region: GuestRegion { GuestRegion(base: address, size: memorySize) }
}

/// A parsed boot image: its bytes (kept for reloading on reset), where they go, and its entry.
struct PlacedImage: Sendable {
    /// "firmware 'path'", "kernel 'path'"...: used in messages.
    var what: String
    var bytes: [UInt8]
    var segments: [ImageSegment]
    var entry: GuestPhysicalAddress
    /// The RAM the image claims (for a Linux Image, its declared in-memory size).
    var footprint: [GuestRegion]
    /// The address of an ELF's `tohost` symbol (riscv-tests and other Spike programs), if any.
    var tohost: GuestPhysicalAddress? = nil

    /// One past the highest address the image occupies.
    var end: GuestPhysicalAddress { footprint.map(\.end).max() ?? entry }
}

/// Boot-image placement and loading for `virt`, following QEMU's rules (hw/riscv/boot.c):
/// - firmware: an ELF by its program headers, otherwise a raw binary at the DRAM base;
/// - kernel: an ELF by its program headers, otherwise raw at the firmware's end rounded up to
///   2 MiB (0x8020_0000 for OpenSBI), or at the DRAM base with no firmware; a Linux RISC-V
///   `Image` is recognised by "RSC\x05" at 0x38 and its declared size is reserved;
/// - initrd: at kernel entry + min(RAM / 2, 128 MiB);
/// - device tree: at min(RAM end, 3 GiB) − its size, aligned down to 2 MiB;
/// - `fw_dynamic_info` (magic "OSBI", version 2, next address = kernel entry, next mode S,
///   boot hart 0) in the mask ROM.
/// Built once on the control thread; `load(into:)` can be repeated for every system reset.
public struct BootLoader: Sendable {
    /// `fw_dynamic_info.magic` ("OSBI").
    public static let firmwareInfoMagic: UInt64 = 0x4942_534F
    /// `fw_dynamic_info.version` written.
    public static let firmwareInfoVersion: UInt64 = 2
    /// `fw_dynamic_info.next_mode` for S-mode.
    public static let nextModeSupervisor: UInt64 = 1
    /// Alignment of the kernel after firmware and of the device tree (RV64).
    public static let alignment: UInt64 = 2 << 20

    let firmware: PlacedImage?
    let kernel: PlacedImage?
    let initrd: PlacedImage?
    /// The initrd's RAM range, for `/chosen`.
    public let initrdRegion: GuestRegion?
    /// The kernel's entry (fw_dynamic's next address), if there is a kernel.
    public let kernelEntry: GuestPhysicalAddress?
    /// The first instruction.
    public let entry: GuestPhysicalAddress
    /// Where the firmware's or (failing that) the kernel's ELF has its `tohost` symbol: the
    /// HTIF is then served at that RAM word, as by Spike and QEMU's `spike` machine.
    public var tohost: GuestPhysicalAddress? { firmware?.tohost ?? kernel?.tohost }
    let ram: GuestRegion

    /// Reads and places the images, validating that each fits in RAM and none overlap.
    public init(ram: GuestRegion, firmware: BootFile?, kernel: BootFile?, initrd: BootFile?) throws {
        self.ram = ram
        var fw: PlacedImage? = nil
        if let firmware {
            let what = "firmware '\(firmware.displayName)'"
            fw = try Self.place(what: what, bytes: try firmware.load(what: what, limit: ram.size),
                                rawAt: ram.base, ram: ram, linuxHeader: false)
        }
        let kernelBase = GuestPhysicalAddress(Self.alignUp(fw?.end.raw ?? ram.base.raw, Self.alignment))
        var k: PlacedImage? = nil
        if let kernel {
            let what = "kernel '\(kernel.displayName)'"
            k = try Self.place(what: what, bytes: try kernel.load(what: what, limit: ram.size),
                               rawAt: kernelBase, ram: ram, linuxHeader: true)
        }
        var rd: PlacedImage? = nil
        var rdRegion: GuestRegion? = nil
        if let initrd {
            let what = "initrd '\(initrd.displayName)'"
            let bytes = try initrd.load(what: what, limit: ram.size)
            let start = (k?.entry ?? kernelBase) + min(ram.size / 2, 128 << 20)
            guard ram.contains(start) else {
                throw MachineError.imageTooLarge(what: what, size: UInt64(bytes.count), room: 0)
            }
            let room = ram.end - start
            guard UInt64(bytes.count) <= room else {
                throw MachineError.imageTooLarge(what: what, size: UInt64(bytes.count), room: room)
            }
            let region = GuestRegion(base: start, size: UInt64(bytes.count))
            rd = PlacedImage(what: what, bytes: bytes,
                             segments: [ImageSegment(address: start, fileOffset: 0, fileSize: bytes.count,
                                                     memorySize: UInt64(bytes.count))],
                             entry: start, footprint: [region])
            rdRegion = region
        }
        let images = [fw, k, rd].compactMap { $0 }
        for (i, a) in images.enumerated() {
            for b in images[(i + 1)...] {
                for ra in a.footprint where ra.size > 0 {
                    for rb in b.footprint where rb.size > 0 && ra.overlaps(rb) {
                        throw BoardError.overlappingImages(a.what, ra, b.what, rb)
                    }
                }
            }
        }
        self.firmware = fw
        self.kernel = k
        self.initrd = rd
        self.initrdRegion = rdRegion
        self.kernelEntry = k?.entry
        self.entry = fw?.entry ?? k?.entry ?? ram.base
    }

    /// Where a device tree of `size` bytes goes: below min(RAM end, 3 GiB), 2 MiB aligned.
    public func deviceTreeAddress(size: Int) throws -> GuestPhysicalAddress {
        let top = ram.base.raw < 0xC000_0000 ? min(ram.end.raw, 0xC000_0000) : ram.end.raw
        guard UInt64(size) <= top - ram.base.raw else {
            throw MachineError.imageTooLarge(what: "device tree", size: UInt64(size), room: top - ram.base.raw)
        }
        let address = GuestPhysicalAddress((top - UInt64(size)) & ~(Self.alignment - 1))
        let region = GuestRegion(base: address, size: UInt64(size))
        for image in [firmware, kernel, initrd].compactMap({ $0 }) {
            for r in image.footprint where r.size > 0 && r.overlaps(region) {
                throw BoardError.overlappingImages(image.what, r, "device tree", region)
            }
        }
        return address
    }

    /// The 48-byte `fw_dynamic_info` (six little-endian 64-bit words).
    public var firmwareInfo: [UInt8] {
        let words: [UInt64] = [Self.firmwareInfoMagic, Self.firmwareInfoVersion, kernelEntry?.raw ?? 0,
                               Self.nextModeSupervisor, 0, 0]
        return words.flatMap { w in (0..<8).map { UInt8(truncatingIfNeeded: w >> (8 * UInt64($0))) } }
    }

    /// Copies every image (zero-filling BSS) and the device tree into RAM. Repeatable: call it
    /// again on system reset. Control thread, while the vCPUs are stopped.
    public func load(into ram: GuestRAM, deviceTree: [UInt8], at dtbAddress: GuestPhysicalAddress) throws {
        for image in [firmware, kernel, initrd].compactMap({ $0 }) {
            try image.bytes.withUnsafeBytes { all in
                for s in image.segments {
                    try ram.write(UnsafeRawBufferPointer(rebasing: all[s.fileOffset..<(s.fileOffset + s.fileSize)]),
                                  at: s.address)
                    let zeros = s.memorySize - UInt64(s.fileSize)
                    if zeros > 0 {
                        guard let p = ram.hostPointer(s.address + UInt64(s.fileSize), length: zeros) else {
                            throw MachineError.outsideRAM(address: s.address + UInt64(s.fileSize), length: zeros)
                        }
                        p.initializeMemory(as: UInt8.self, repeating: 0, count: Int(zeros))
                        ram.markDirty(s.address + UInt64(s.fileSize), length: zeros)  // a reset during a migration
                    }
                }
            }
        }
        try deviceTree.withUnsafeBytes { try ram.write($0, at: dtbAddress) }
    }

    // MARK: Image parsing

    static func alignUp(_ v: UInt64, _ a: UInt64) -> UInt64 { (v + a - 1) & ~(a - 1) }

    /// Places an ELF by its program headers, or a raw image at `rawAt`.
    static func place(what: String, bytes: [UInt8], rawAt base: GuestPhysicalAddress, ram: GuestRegion,
                      linuxHeader: Bool) throws -> PlacedImage {
        if bytes.count >= 4 && bytes[0] == 0x7F && bytes[1] == 0x45 && bytes[2] == 0x4C && bytes[3] == 0x46 {
            return try placeELF(what: what, bytes: bytes, ram: ram)
        }
        guard !bytes.isEmpty else { throw MachineError.invalidImage(what: what, reason: "the file is empty") }
        var footprint = UInt64(bytes.count)
        if linuxHeader && bytes.count >= 64 && Array(bytes[0x38..<0x3C]) == [0x52, 0x53, 0x43, 0x05] {
            // Linux RISC-V Image header: image_size (little-endian u64 at 0x10) is the memory the
            // kernel needs, including what it zeroes after the file's end.
            let imageSize = le64(bytes, 0x10)
            footprint = max(footprint, imageSize)
        }
        let room = ram.contains(base) ? ram.end - base : 0
        guard footprint <= room else { throw MachineError.imageTooLarge(what: what, size: footprint, room: room) }
        let segment = ImageSegment(address: base, fileOffset: 0, fileSize: bytes.count, memorySize: UInt64(bytes.count))
        return PlacedImage(what: what, bytes: bytes, segments: [segment], entry: base,
                           footprint: [GuestRegion(base: base, size: footprint)])
    }

    /// Places an ELF64 little-endian RISC-V executable by its PT_LOAD headers (physical
    /// addresses); refuses anything malformed with a reason.
    static func placeELF(what: String, bytes: [UInt8], ram: GuestRegion) throws -> PlacedImage {
        func bad(_ reason: String) -> MachineError { .invalidImage(what: what, reason: reason) }
        guard bytes.count >= 64 else { throw bad("truncated ELF header (\(bytes.count) bytes)") }
        guard bytes[4] == 2 else { throw bad("not a 64-bit ELF file (EI_CLASS \(bytes[4]))") }
        guard bytes[5] == 1 else { throw bad("not a little-endian ELF file (EI_DATA \(bytes[5]))") }
        let machine = le16(bytes, 18)
        guard machine == 243 else { throw bad("ELF machine is \(machine), not RISC-V (243)") }
        let type = le16(bytes, 16)
        guard type == 2 || type == 3 else { throw bad("ELF type \(type) is not an executable") }
        let entry = le64(bytes, 24)
        let phoff = le64(bytes, 32)
        let phentsize = UInt64(le16(bytes, 54))
        let phnum = UInt64(le16(bytes, 56))
        guard phentsize >= 56 else { throw bad("program header entries are \(phentsize) bytes, expected 56") }
        guard phnum > 0 else { throw bad("no program headers") }
        guard phoff <= UInt64(bytes.count), phnum * phentsize <= UInt64(bytes.count) - phoff else {
            throw bad("program headers (\(phnum) at offset \(phoff)) lie outside the file")
        }
        var segments: [ImageSegment] = []
        var virtualRanges: [(vaddr: UInt64, paddr: UInt64, size: UInt64)] = []
        for i in 0..<phnum {
            let h = Int(phoff + i * phentsize)
            guard le32(bytes, h) == 1 else { continue }  // PT_LOAD only
            let offset = le64(bytes, h + 8), vaddr = le64(bytes, h + 16), paddr = le64(bytes, h + 24)
            let filesz = le64(bytes, h + 32), memsz = le64(bytes, h + 40)
            guard filesz <= memsz else { throw bad("segment \(i) has file size \(filesz) > memory size \(memsz)") }
            guard offset <= UInt64(bytes.count), filesz <= UInt64(bytes.count) - offset else {
                throw bad("segment \(i) (\(filesz) bytes at offset \(offset)) lies outside the file")
            }
            if memsz == 0 { continue }
            let address = GuestPhysicalAddress(paddr)
            guard ram.contains(address), memsz <= ram.end - address else {
                let room = ram.contains(address) ? ram.end - address : 0
                throw MachineError.imageTooLarge(what: "\(what) segment \(i) at \(address)", size: memsz, room: room)
            }
            let seg = ImageSegment(address: address, fileOffset: Int(offset), fileSize: Int(filesz), memorySize: memsz)
            if let clash = segments.first(where: { $0.region.overlaps(seg.region) }) {
                throw bad("segments at \(clash.region) and \(seg.region) overlap")
            }
            segments.append(seg)
            virtualRanges.append((vaddr, paddr, memsz))
        }
        guard !segments.isEmpty else { throw bad("no loadable segments") }
        // The entry is physical if it lies in RAM; otherwise translate it through its segment.
        var physicalEntry: UInt64? = nil
        if ram.contains(GuestPhysicalAddress(entry)) {
            physicalEntry = entry
        } else if let r = virtualRanges.first(where: { entry &- $0.vaddr < $0.size }) {
            physicalEntry = r.paddr + (entry - r.vaddr)
        }
        guard let physicalEntry else { throw bad("entry point 0x\(String(entry, radix: 16)) is in no loaded segment") }
        var image = PlacedImage(what: what, bytes: bytes, segments: segments, entry: GuestPhysicalAddress(physicalEntry),
                                footprint: segments.map(\.region))
        if let t = symbol("tohost", in: bytes), ram.contains(GuestPhysicalAddress(t)), t & 7 == 0, ram.end - GuestPhysicalAddress(t) >= 8 {
            image.tohost = GuestPhysicalAddress(t)
        }
        return image
    }

    /// The value of symbol `name` in an ELF64's `.symtab`, or nil (no table, no such symbol, or
    /// anything out of bounds: the table is outside input and is read defensively).
    static func symbol(_ name: String, in bytes: [UInt8]) -> UInt64? {
        guard bytes.count >= 64 else { return nil }
        let shoff = le64(bytes, 40)
        let shentsize = UInt64(le16(bytes, 58)), shnum = UInt64(le16(bytes, 60))
        guard shentsize >= 64, shoff <= UInt64(bytes.count), shnum * shentsize <= UInt64(bytes.count) - shoff else { return nil }
        let target = Array(name.utf8)
        for i in 0..<shnum {
            let h = Int(shoff + i * shentsize)
            guard le32(bytes, h + 4) == 2 else { continue }  // SHT_SYMTAB
            let off = le64(bytes, h + 24), size = le64(bytes, h + 32), link = UInt64(le32(bytes, h + 40))
            let entsize = le64(bytes, h + 56)
            guard entsize >= 24, off <= UInt64(bytes.count), size <= UInt64(bytes.count) - off, link < shnum else { return nil }
            let sh = Int(shoff + link * shentsize)
            let stroff = le64(bytes, sh + 24), strsize = le64(bytes, sh + 32)
            guard stroff <= UInt64(bytes.count), strsize <= UInt64(bytes.count) - stroff else { return nil }
            for k in 0..<(size / entsize) {
                let e = Int(off + k * entsize)
                let nameOff = UInt64(le32(bytes, e))
                guard nameOff < strsize else { continue }
                let start = Int(stroff + nameOff)
                var end = start
                let limit = Int(stroff + strsize)
                while end < limit && bytes[end] != 0 { end += 1 }
                if bytes[start..<end].elementsEqual(target) { return le64(bytes, e + 8) }
            }
        }
        return nil
    }

    static func le16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
    static func le32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * UInt32($1)) } }
    static func le64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) } }
}
