import Machine

/// Standard PCI configuration-header offsets and bits (PCI Local Bus 3.0, PCIe 4.0 §7.5).
public enum PCIConfig {
    public static let vendorID = 0x00, deviceID = 0x02, command = 0x04, status = 0x06
    public static let revision = 0x08, classCode = 0x09, cacheLineSize = 0x0c, latencyTimer = 0x0d
    public static let headerType = 0x0e, bar0 = 0x10, subsystemVendorID = 0x2c, subsystemID = 0x2e
    public static let romAddress = 0x30, capabilitiesPointer = 0x34, interruptLine = 0x3c, interruptPin = 0x3d
    /// Size of a PCIe function's configuration space (one ECAM page).
    public static let size = 4096
    /// Where the capability list starts.
    public static let firstCapability = 0x40

    /// Command register bits.
    public enum Command {
        public static let io: UInt16 = 1 << 0, memory: UInt16 = 1 << 1, busMaster: UInt16 = 1 << 2
        public static let parity: UInt16 = 1 << 6, serr: UInt16 = 1 << 8, interruptDisable: UInt16 = 1 << 10
        /// The bits a driver may change.
        public static let writable: UInt16 = io | memory | busMaster | parity | serr | interruptDisable
    }

    /// Type-1 (bridge) header offsets.
    public enum Bridge {
        public static let primaryBus = 0x18, secondaryBus = 0x19, subordinateBus = 0x1a, ioBase = 0x1c
        public static let memoryBase = 0x20, prefetchableBase = 0x24, prefetchableBaseUpper = 0x28
        public static let prefetchableLimitUpper = 0x2c, control = 0x3e
    }

    /// Status register bits.
    public enum Status {
        public static let interrupt: UInt16 = 1 << 3, capabilityList: UInt16 = 1 << 4
    }
}

/// One base address register as the function declares it; the guest chooses the address.
public struct PCIBarDescriptor: Sendable, Equatable {
    /// The address space a BAR decodes.
    public enum Kind: Sendable, Equatable {
        /// I/O space (the board's PIO window).
        case io
        /// 32-bit memory space.
        case memory32(prefetchable: Bool)
        /// 64-bit memory space (takes two BAR registers).
        case memory64(prefetchable: Bool)
    }
    /// The space decoded.
    public var kind: Kind
    /// Size in bytes: a power of two, at least 16 (memory) or 4 (I/O).
    public var size: UInt64

    /// Creates a BAR; `size` must be a power of two of at least 16 bytes (4 for I/O).
    public init(kind: Kind, size: UInt64) {
        precondition(size.nonzeroBitCount == 1 && size >= (kind == .io ? 4 : 16), "BAR size \(size) is not a power of two >= 16")
        self.kind = kind
        self.size = size
    }

    /// The low type bits read back from the register.
    var typeBits: UInt32 {
        switch kind {
        case .io: return 1
        case .memory32(let p): return p ? 0x8 : 0
        case .memory64(let p): return 0x4 | (p ? 0x8 : 0)
        }
    }

    var is64Bit: Bool { if case .memory64 = kind { true } else { false } }
}

/// The identity of a type-0 PCI function (what `lspci -n` shows).
public struct PCIIdentity: Sendable, Equatable {
    public var vendorID: UInt16, deviceID: UInt16, revision: UInt8
    /// Class, subclass and programming interface (e.g. 0x010000 for SCSI storage).
    public var classCode: UInt32
    public var subsystemVendorID: UInt16, subsystemID: UInt16
    /// INTx pin used: 0 none, 1 INTA … 4 INTD.
    public var interruptPin: UInt8

    public init(vendorID: UInt16, deviceID: UInt16, revision: UInt8, classCode: UInt32,
                subsystemVendorID: UInt16 = 0, subsystemID: UInt16 = 0, interruptPin: UInt8 = 0) {
        self.vendorID = vendorID
        self.deviceID = deviceID
        self.revision = revision
        self.classCode = classCode
        self.subsystemVendorID = subsystemVendorID
        self.subsystemID = subsystemID
        self.interruptPin = interruptPin
    }
}

/// A type-0 function's 4 KiB configuration space: the bytes, a write mask saying which bits a
/// driver may change (as QEMU's `PCIDevice.wmask`), BAR sizing through that mask, and the
/// capability list. A plain value; its owner serializes access.
///
/// BAR sizing works as on hardware: the address bits below the BAR's size are read-only zero, so
/// writing all ones and reading back gives `~(size - 1) | type`.
public struct PCIConfigSpace: Sendable, Equatable {
    /// The raw bytes, little-endian as the guest sees them.
    public private(set) var bytes: [UInt8]
    /// Which bits of each byte a config write may change.
    public private(set) var writeMask: [UInt8]
    /// Which bits of each byte a config write of 1 clears (status bits, "RW1C").
    public private(set) var clearMask: [UInt8]
    /// The BARs declared, by register index (a 64-bit BAR occupies its index and the next).
    public let bars: [Int: PCIBarDescriptor]
    private var nextCapability = PCIConfig.firstCapability
    private var lastCapabilityNext: Int?

    /// Builds the header for `identity` with the given BARs (index 0…5; a 64-bit BAR must not be at 5).
    /// A `bridge` gets a type-1 header instead: bus numbers, I/O, memory and prefetchable windows
    /// and bridge control writable, and no BARs.
    public init(identity: PCIIdentity, bars: [Int: PCIBarDescriptor] = [:], multiFunction: Bool = false,
                bridge: Bool = false) {
        bytes = Array(repeating: 0, count: PCIConfig.size)
        writeMask = Array(repeating: 0, count: PCIConfig.size)
        clearMask = Array(repeating: 0, count: PCIConfig.size)
        precondition(!bridge || bars.isEmpty, "a bridge header here has no BARs")
        self.bars = bars
        put16(PCIConfig.vendorID, identity.vendorID)
        put16(PCIConfig.deviceID, identity.deviceID)
        bytes[PCIConfig.revision] = identity.revision
        bytes[PCIConfig.classCode] = UInt8(truncatingIfNeeded: identity.classCode)
        bytes[PCIConfig.classCode + 1] = UInt8(truncatingIfNeeded: identity.classCode >> 8)
        bytes[PCIConfig.classCode + 2] = UInt8(truncatingIfNeeded: identity.classCode >> 16)
        bytes[PCIConfig.headerType] = (multiFunction ? 0x80 : 0) | (bridge ? 1 : 0)
        if bridge {
            // Primary, secondary, subordinate bus; latency; I/O base/limit (16-bit I/O);
            // memory base/limit; prefetchable base/limit (64-bit) and upper halves; bridge control.
            for o in [PCIConfig.Bridge.primaryBus, PCIConfig.Bridge.secondaryBus, PCIConfig.Bridge.subordinateBus,
                      0x1b] { writeMask[o] = 0xff }
            writeMask[PCIConfig.Bridge.ioBase] = 0xf0
            writeMask[PCIConfig.Bridge.ioBase + 1] = 0xf0
            setMask32(PCIConfig.Bridge.memoryBase, 0xfff0_fff0)
            setMask32(PCIConfig.Bridge.prefetchableBase, 0xfff0_fff0)
            put16(PCIConfig.Bridge.prefetchableBase, 1)
            put16(PCIConfig.Bridge.prefetchableBase + 2, 1)
            setMask32(PCIConfig.Bridge.prefetchableBaseUpper, ~0)
            setMask32(PCIConfig.Bridge.prefetchableLimitUpper, ~0)
            setMask16(PCIConfig.Bridge.control, 0x0fff)
        } else {
            put16(PCIConfig.subsystemVendorID, identity.subsystemVendorID)
            put16(PCIConfig.subsystemID, identity.subsystemID)
        }
        bytes[PCIConfig.interruptPin] = identity.interruptPin
        setMask16(PCIConfig.command, PCIConfig.Command.writable)
        writeMask[PCIConfig.cacheLineSize] = 0xff
        writeMask[PCIConfig.latencyTimer] = 0xff
        writeMask[PCIConfig.interruptLine] = 0xff
        for (index, bar) in bars {
            precondition(index >= 0 && index < (bar.is64Bit ? 5 : 6), "BAR index \(index) out of range")
            let reg = PCIConfig.bar0 + 4 * index
            put32(reg, bar.typeBits)
            let mask = ~(bar.size - 1)
            setMask32(reg, UInt32(truncatingIfNeeded: mask) & (bar.kind == .io ? ~3 : ~0xf))
            if bar.is64Bit { setMask32(reg + 4, UInt32(truncatingIfNeeded: mask >> 32)) }
        }
    }

    /// Reads `size` (1, 2 or 4) bytes at `offset`, little-endian; outside the space reads all ones.
    public func read(offset: Int, size: Int) -> UInt32 {
        guard offset >= 0, offset + size <= PCIConfig.size else { return size == 4 ? ~0 : (1 << (8 * size)) - 1 }
        var v: UInt32 = 0
        for i in 0..<size { v |= UInt32(bytes[offset + i]) << (8 * i) }
        return v
    }

    /// Writes `size` bytes at `offset` through the write mask; read-only bits keep their value.
    public mutating func write(offset: Int, size: Int, value: UInt32) {
        guard offset >= 0, offset + size <= PCIConfig.size else { return }
        for i in 0..<size {
            let b = UInt8(truncatingIfNeeded: value >> (8 * i)), m = writeMask[offset + i]
            bytes[offset + i] = ((bytes[offset + i] & ~m) | (b & m)) & ~(b & clearMask[offset + i])
        }
    }

    /// The command register.
    public var command: UInt16 { UInt16(read(offset: PCIConfig.command, size: 2)) }

    /// Sets or clears the Interrupt Status bit (read-only to the driver).
    public mutating func setInterruptStatus(_ on: Bool) {
        let s = UInt16(read(offset: PCIConfig.status, size: 2))
        put16(PCIConfig.status, on ? s | PCIConfig.Status.interrupt : s & ~PCIConfig.Status.interrupt)
    }

    /// The address BAR `index` decodes at, or nil when its space is disabled in the command
    /// register or it is unassigned (0) or does not fit the address width.
    public func barAddress(_ index: Int) -> UInt64? {
        guard let bar = bars[index] else { return nil }
        let enable = bar.kind == .io ? PCIConfig.Command.io : PCIConfig.Command.memory
        guard command & enable != 0 else { return nil }
        let reg = PCIConfig.bar0 + 4 * index
        var address = UInt64(read(offset: reg, size: 4) & (bar.kind == .io ? ~3 : ~0xf))
        if bar.is64Bit { address |= UInt64(read(offset: reg + 4, size: 4)) << 32 }
        guard address != 0 else { return nil }
        return address
    }

    /// Appends a capability with `id` and `body` (the bytes after the ID and next pointer) to the
    /// list, read-only to the driver except the byte ranges in `writable` (offsets into `body`).
    /// Returns the capability's offset in configuration space.
    @discardableResult
    public mutating func addCapability(id: UInt8, body: [UInt8], writable: [Range<Int>] = [],
                                       writeMasks: [Int: UInt16] = [:], clearMasks: [Int: UInt16] = [:]) -> Int {
        let at = nextCapability
        precondition(at + 2 + body.count <= 256, "capabilities overflow the PCI configuration header")
        bytes[at] = id
        bytes[at + 1] = 0
        for (i, b) in body.enumerated() { bytes[at + 2 + i] = b }
        for r in writable { for i in r { writeMask[at + 2 + i] = 0xff } }
        for (o, m) in writeMasks { setMask16(at + 2 + o, m) }
        for (o, m) in clearMasks {
            clearMask[at + 2 + o] = UInt8(truncatingIfNeeded: m)
            clearMask[at + 2 + o + 1] = UInt8(m >> 8)
        }
        if let prev = lastCapabilityNext { bytes[prev] = UInt8(at) } else { bytes[PCIConfig.capabilitiesPointer] = UInt8(at) }
        lastCapabilityNext = at + 1
        let s = UInt16(read(offset: PCIConfig.status, size: 2))
        put16(PCIConfig.status, s | PCIConfig.Status.capabilityList)
        nextCapability = (at + 2 + body.count + 3) & ~3
        return at
    }

    /// Replaces the bytes with saved ones (the mask and layout stay those of this function).
    /// Throws when the read-only identity differs, so a state is never loaded into another kind of function.
    /// `deviceOwned` lists further read-only bytes the function itself changes (slot status, link
    /// status), which may differ.
    public mutating func restore(_ saved: [UInt8], section: String, deviceOwned: Set<Int> = []) throws(SavedStateError) {
        guard saved.count == PCIConfig.size else {
            throw SavedStateError(section: section, field: "config", reason: "\(saved.count) bytes, expected \(PCIConfig.size)")
        }
        for i in 0..<PCIConfig.size where (saved[i] ^ bytes[i]) & ~writeMask[i] != 0 && !Self.volatileReadOnly(i) && !deviceOwned.contains(i) {
            throw SavedStateError(section: section, field: "config[0x\(String(i, radix: 16))]",
                                  reason: "read-only byte differs (saved 0x\(String(saved[i], radix: 16)), this function 0x\(String(bytes[i], radix: 16)))")
        }
        bytes = saved
    }

    /// Read-only bytes the function itself changes (the status register's interrupt bit).
    private static func volatileReadOnly(_ i: Int) -> Bool { i == PCIConfig.status }

    /// Writes a read-only field (the function's own registers, such as capability contents).
    public mutating func setReadOnly(offset: Int, bytes b: [UInt8]) {
        for (i, v) in b.enumerated() { bytes[offset + i] = v }
    }

    private mutating func put16(_ o: Int, _ v: UInt16) {
        bytes[o] = UInt8(truncatingIfNeeded: v)
        bytes[o + 1] = UInt8(v >> 8)
    }

    private mutating func put32(_ o: Int, _ v: UInt32) {
        for i in 0..<4 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }

    private mutating func setMask16(_ o: Int, _ v: UInt16) {
        writeMask[o] = UInt8(truncatingIfNeeded: v)
        writeMask[o + 1] = UInt8(v >> 8)
    }

    private mutating func setMask32(_ o: Int, _ v: UInt32) {
        for i in 0..<4 { writeMask[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
}
