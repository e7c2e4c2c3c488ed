import Devices
import Foundation
import Machine
import Translator

/// A boot image given to the board: a file to read, or bytes already in memory (tests, QMP).
public enum BootFile: Sendable, Equatable {
    /// A host file, read once when the board is built.
    case path(String)
    /// In-memory contents; `name` identifies the image in error messages.
    case bytes(name: String, [UInt8])

    /// The name used in messages (the path, or the given name).
    public var displayName: String {
        switch self {
        case .path(let p): return p
        case .bytes(let name, _): return name
        }
    }

    /// Reads the image's bytes; throws `BoardError.unreadableFile` naming the file.
    ///
    /// A file is opened non-blocking and checked with fstat before it is read: it must be a
    /// regular file (a FIFO or device would block or never end), and one larger than `limit`
    /// bytes is refused as `MachineError.imageTooLarge(what:)` without reading any of it.
    public func load(what: String = "boot image", limit: UInt64 = .max) throws -> [UInt8] {
        switch self {
        case .bytes(_, let b):
            guard UInt64(b.count) <= limit else {
                throw MachineError.imageTooLarge(what: what, size: UInt64(b.count), room: limit)
            }
            return b
        case .path(let p):
            return try Self.readRegularFile(p, what: what, limit: limit)
        }
    }

    static func readRegularFile(_ path: String, what: String, limit: UInt64) throws -> [UInt8] {
        func failure(_ e: Int32) -> BoardError { .unreadableFile(path: path, reason: String(cString: strerror(e))) }
        let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY)
        guard fd >= 0 else { throw failure(errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw failure(errno) }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw BoardError.unreadableFile(path: path, reason: "not a regular file")
        }
        let size = UInt64(max(0, st.st_size))
        guard size <= limit else { throw MachineError.imageTooLarge(what: what, size: size, room: limit) }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw failure(errno)
            }
            if n == 0 { break }  // the file shrank while it was read
            done += n
        }
        return done == bytes.count ? bytes : Array(bytes[0..<done])
    }
}

/// Builds one MMIO device for a board slot, given what the board hands every device.
/// Called once on the control thread while the board is assembled (or on hot-plug).
public typealias MMIODeviceFactory = @Sendable (DeviceContext) throws -> any MMIODevice

/// What a device built for a board slot receives: guest RAM (for DMA), its interrupt input,
/// its window, and the machine clock.
public struct DeviceContext: Sendable {
    /// Guest RAM, for devices that do DMA (virtio rings).
    public let ram: GuestRAM
    /// The device's interrupt line (a PLIC source).
    public let irq: any InterruptLine
    /// The PLIC source number of `irq`.
    public let irqNumber: Int
    /// The guest physical window the device is mapped at.
    public let region: GuestRegion
    /// The machine's virtual clock.
    public let clock: VirtualClock
}

/// Everything needed to build a `virt` board. A plain value with defaults like QEMU's
/// (`-m 128M -smp 1`); the CLI fills it in from its options.
public struct BoardConfig: Sendable {
    /// Guest RAM in bytes (a positive multiple of 4 KiB), mapped at 0x8000_0000.
    public var memorySize: UInt64 = 128 << 20
    /// Guest RAM mapped from this file instead of anonymous memory (memory-backend-file).
    public var ramBacking: GuestRAM.BackingFile? = nil
    /// Number of harts (1…`VirtMemoryMap.maxHarts`).
    public var cpuCount: Int = 1
    /// The ISA extensions every hart runs with and the device tree claims (all by default; a
    /// description may narrow them to match older firmware).
    public var cpuExtensions: ISAExtensions = .all
    /// The kernel command line (`/chosen/bootargs`); nil leaves bootargs out.
    public var kernelCommandLine: String? = nil
    /// M-mode firmware (OpenSBI `fw_dynamic.bin`/`.elf`): raw binaries load at 0x8000_0000, ELF
    /// by program headers. Nil means no firmware: the kernel itself runs first, in M-mode.
    public var firmware: BootFile? = nil
    /// The kernel: a raw Linux `Image` or any raw binary, or an ELF file.
    public var kernel: BootFile? = nil
    /// An initial RAM disk, placed as QEMU does and announced in `/chosen`.
    public var initrd: BootFile? = nil
    /// The console backend: UART0's host side and the `/chosen/stdout-path` target. Nil
    /// discards output and provides no input.
    public var serial: (any CharBackend)? = nil
    /// Console for the HTIF test device (usually the same as `serial`); nil discards.
    public var htifConsole: (any CharBackend)? = nil
    /// The virtio-mmio transports, in slot order (at most `VirtMemoryMap.virtioSlotCount`):
    /// slot i is at 0x1000_1000 + i·0x1000 with PLIC IRQ i + 1, like QEMU.
    public var virtioTransports: [MMIODeviceFactory] = []
    /// Build the PCIe host bridge (ECAM at 0x3000_0000, INTx on PLIC 32…35) and its device-tree
    /// node, even with no PCI device (for hot-plug). Implied by a non-empty `pciDevices`.
    public var pcie: Bool = false
    /// PCI functions plugged into the root bus at boot, in order (those without a slot take the
    /// lowest free one when their turn comes).
    public var pciDevices: [PCIPlacement] = []
    /// What pressing the power button does (`system_powerdown`): machine-server sets it to press
    /// KEY_POWER on the virtio keyboard when there is one. Nil: the board has no power button
    /// the guest can see (QEMU's `virt` has none). Called on the machine's control thread.
    public var powerButton: (@Sendable () -> Void)? = nil
    /// Extra bytes filled with host entropy into `/chosen/rng-seed` (QEMU passes 32); 0 omits it.
    public var rngSeedBytes: Int = 32

    /// Creates the default configuration.
    public init() {}

    /// True when the board has a PCIe host.
    public var hasPCIe: Bool { pcie || !pciDevices.isEmpty }

    /// True when firmware runs first (OpenSBI), so the kernel runs in S-mode after it.
    public var hasFirmware: Bool { firmware != nil }
}

/// Errors from board assembly and boot loading, each naming what is wrong.
public enum BoardError: Error, CustomStringConvertible, Equatable {
    /// A boot image file cannot be read.
    case unreadableFile(path: String, reason: String)
    /// The configuration asks for something the board cannot build.
    case invalidConfig(String)
    /// Two boot images (or an image and the device tree) would occupy the same RAM.
    case overlappingImages(String, GuestRegion, String, GuestRegion)
    /// No free MMIO slot or IRQ is left.
    case exhausted(String)

    public var description: String {
        switch self {
        case .unreadableFile(let p, let r): return "cannot read '\(p)': \(r)"
        case .invalidConfig(let why): return "invalid machine configuration: \(why)"
        case .overlappingImages(let a, let ra, let b, let rb):
            return "\(a) at \(ra) overlaps \(b) at \(rb)"
        case .exhausted(let what): return "no free \(what) left"
        }
    }
}

/// The fixed parts of QEMU `virt`'s physical address map and interrupt numbers.
public enum VirtMemoryMap {
    /// Read-only boot ROM holding `fw_dynamic_info` (QEMU's mask ROM).
    public static let maskROM = GuestRegion(base: GuestPhysicalAddress(0x1000), size: 0xF000)
    /// SiFive test device (poweroff/reboot syscon).
    public static let test = GuestRegion(base: GuestPhysicalAddress(0x10_0000), size: SiFiveTest.windowSize)
    /// Goldfish RTC.
    public static let rtc = GuestRegion(base: GuestPhysicalAddress(0x10_1000), size: GoldfishRTC.windowSize)
    /// HTIF test device (ours; a hole in QEMU's map).
    public static let htif = GuestRegion(base: GuestPhysicalAddress(Htif.defaultBase), size: Htif.windowSize)
    /// CLINT (ACLINT MSWI + MTIMER).
    public static let clint = GuestRegion(base: GuestPhysicalAddress(0x200_0000), size: Aclint.windowSize)
    /// PLIC.
    public static let plic = GuestRegion(base: GuestPhysicalAddress(0xC00_0000), size: Plic.windowSize)
    /// UART0.
    public static let uart0 = GuestRegion(base: GuestPhysicalAddress(0x1000_0000), size: Uart16550.windowSize)
    /// First virtio-mmio slot; the others follow at `virtioStride`.
    public static let virtioBase = GuestPhysicalAddress(0x1000_1000)
    /// Distance between virtio-mmio slots (and each slot's window size).
    public static let virtioStride: UInt64 = 0x1000
    /// Number of virtio-mmio slots.
    public static let virtioSlotCount = 8
    /// DRAM base.
    public static let dramBase = GuestPhysicalAddress(0x8000_0000)

    /// PLIC source of UART0.
    public static let uart0IRQ = 10
    /// PLIC source of the RTC.
    public static let rtcIRQ = 11
    /// PLIC source of virtio-mmio slot 0 (slot i uses i + 1).
    public static let virtioFirstIRQ = 1
    /// Most harts the board supports (QEMU `virt`: 512 in total; we keep one socket).
    public static let maxHarts = 512
}

/// Hands out PLIC sources: fixed ones are reserved by number, dynamic ones (hot-plug) come from
/// the lowest free number. Used on the control thread only.
public struct IRQAllocator: Sendable {
    /// Highest source number.
    public let sourceCount: Int
    private var used: Set<Int> = []

    /// Creates an allocator for sources 1…`sourceCount`.
    public init(sourceCount: Int) { self.sourceCount = sourceCount }

    /// Claims a specific source; throws if it is taken or out of range.
    public mutating func reserve(_ source: Int) throws {
        guard source >= 1 && source <= sourceCount else {
            throw BoardError.invalidConfig("PLIC source \(source) is outside 1...\(sourceCount)")
        }
        guard used.insert(source).inserted else { throw BoardError.invalidConfig("PLIC source \(source) is used twice") }
    }

    /// Claims the lowest free source at or above `from`.
    public mutating func allocate(from: Int = 1) throws -> Int {
        for s in max(1, from)...max(1, sourceCount) where !used.contains(s) {
            used.insert(s)
            return s
        }
        throw BoardError.exhausted("PLIC interrupt source")
    }

    /// Returns a source to the pool (hot-unplug).
    public mutating func release(_ source: Int) { used.remove(source) }

    /// Whether a source is taken.
    public func isUsed(_ source: Int) -> Bool { used.contains(source) }
}

/// A row of equally sized MMIO slots (the virtio-mmio bank), each with its own IRQ.
/// Used on the control thread only.
public struct MMIOSlotBank: Sendable {
    /// Address of slot 0.
    public let base: GuestPhysicalAddress
    /// Distance between slots and size of each window.
    public let stride: UInt64
    /// Number of slots.
    public let count: Int
    /// IRQ of slot 0; slot i has `firstIRQ + i`.
    public let firstIRQ: Int
    private var occupied: [Bool]

    /// Creates an empty bank.
    public init(base: GuestPhysicalAddress, stride: UInt64, count: Int, firstIRQ: Int) {
        self.base = base
        self.stride = stride
        self.count = count
        self.firstIRQ = firstIRQ
        self.occupied = [Bool](repeating: false, count: count)
    }

    /// The window of slot `i`.
    public func region(ofSlot i: Int) -> GuestRegion { GuestRegion(base: base + UInt64(i) * stride, size: stride) }

    /// The IRQ of slot `i`.
    public func irq(ofSlot i: Int) -> Int { firstIRQ + i }

    /// Takes the lowest free slot; throws when all are occupied.
    public mutating func allocate() throws -> Int {
        guard let i = occupied.firstIndex(of: false) else { throw BoardError.exhausted("virtio-mmio slot") }
        occupied[i] = true
        return i
    }

    /// Frees a slot (hot-unplug).
    public mutating func release(_ i: Int) { if i >= 0 && i < count { occupied[i] = false } }

    /// Whether slot `i` holds a device.
    public func isOccupied(_ i: Int) -> Bool { occupied[i] }
}
