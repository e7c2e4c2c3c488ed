import Machine
import Synchronization

/// A driver mistake found while walking a virtqueue. Each case names what is wrong, so the
/// transport can log it when it marks the device DEVICE_NEEDS_RESET.
public enum VirtqueueError: Error, Equatable, CustomStringConvertible {
    /// The queue size is 0, larger than 32768, or above the device's maximum.
    case badQueueSize(UInt16)
    /// A ring area is not aligned as the spec requires (descriptor table 16, driver area 2, device area 4).
    case misaligned(area: String, address: GuestPhysicalAddress)
    /// A ring area is not entirely inside guest RAM.
    case areaOutsideRAM(area: String, address: GuestPhysicalAddress, length: UInt64)
    /// The driver moved `avail.idx` further than the queue size since the device last looked.
    case availIndexJump(lastSeen: UInt16, now: UInt16, size: UInt16)
    /// A descriptor index (a chain head or a `next`) is not below the table size.
    case descriptorIndexOutOfRange(index: UInt16, tableSize: UInt16)
    /// A buffer is not entirely inside guest RAM.
    case bufferOutsideRAM(address: GuestPhysicalAddress, length: UInt32)
    /// The chain visits more descriptors than exist (a loop).
    case chainTooLong(head: UInt16)
    /// An indirect table descriptor inside an indirect table, or one that also has NEXT set.
    case badIndirect(reason: String)
    /// A device-readable descriptor follows a device-writable one.
    case readableAfterWritable(head: UInt16)

    public var description: String {
        switch self {
        case .badQueueSize(let n): return "queue size \(n) is not valid"
        case .misaligned(let area, let a): return "\(area) at \(a) is misaligned"
        case .areaOutsideRAM(let area, let a, let n): return "\(area) (\(n) bytes at \(a)) is not inside guest RAM"
        case .availIndexJump(let last, let now, let size):
            return "available index jumped from \(last) to \(now), more than the queue size \(size)"
        case .descriptorIndexOutOfRange(let i, let n): return "descriptor index \(i) is outside a table of \(n)"
        case .bufferOutsideRAM(let a, let n): return "buffer of \(n) bytes at \(a) is not inside guest RAM"
        case .chainTooLong(let h): return "descriptor chain starting at \(h) loops or is longer than the table"
        case .badIndirect(let r): return "invalid indirect descriptor: \(r)"
        case .readableAfterWritable(let h): return "chain \(h) has a device-readable buffer after a writable one"
        }
    }
}

/// A guest buffer referenced by one descriptor; always validated to lie inside guest RAM.
public struct GuestBuffer: Sendable, Equatable {
    /// Guest physical address of the first byte.
    public var address: GuestPhysicalAddress
    /// Length in bytes.
    public var length: UInt32
    /// Creates a buffer description (no validation; `Virtqueue` only hands out validated ones).
    public init(address: GuestPhysicalAddress, length: UInt32) {
        self.address = address
        self.length = length
    }
}

/// One request popped from a virtqueue: its head index, and its device-readable buffers followed
/// by its device-writable buffers, all inside guest RAM.
///
/// A plain value; complete it with `Virtqueue.complete(_:written:)` on the queue's thread.
public struct DescriptorChain: Sendable, Equatable {
    /// Index of the chain's first descriptor; what goes back in the used ring.
    public let head: UInt16
    /// Buffers the device may read, in order.
    public let readable: [GuestBuffer]
    /// Buffers the device may write, in order.
    public let writable: [GuestBuffer]

    /// Creates a chain (tests and queues).
    public init(head: UInt16, readable: [GuestBuffer], writable: [GuestBuffer]) {
        self.head = head
        self.readable = readable
        self.writable = writable
    }

    /// Total bytes the device may read.
    public var readableLength: Int { readable.reduce(0) { $0 + Int($1.length) } }
    /// Total bytes the device may write.
    public var writableLength: Int { writable.reduce(0) { $0 + Int($1.length) } }

    /// Copies readable bytes starting at `offset` (counted across all readable buffers) into
    /// `destination`; returns how many bytes were copied (fewer when the chain is shorter).
    @discardableResult
    public func read(from ram: GuestRAM, offset: Int, into destination: UnsafeMutableRawBufferPointer) -> Int {
        Self.copy(buffers: readable, ram: ram, offset: offset, count: destination.count) { host, done, n in
            destination.baseAddress!.advanced(by: done).copyMemory(from: host, byteCount: n)
        }
    }

    /// Returns up to `count` readable bytes starting at `offset`.
    public func readBytes(from ram: GuestRAM, offset: Int = 0, count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: max(0, count))
        let n = out.withUnsafeMutableBytes { read(from: ram, offset: offset, into: $0) }
        out.removeLast(out.count - n)
        return out
    }

    /// Copies `source` into the writable buffers starting at `offset` (counted across all
    /// writable buffers); returns how many bytes fitted.
    @discardableResult
    public func write(_ source: UnsafeRawBufferPointer, to ram: GuestRAM, offset: Int) -> Int {
        Self.copy(buffers: writable, ram: ram, offset: offset, count: source.count) { host, done, n in
            host.copyMemory(from: source.baseAddress!.advanced(by: done), byteCount: n)
        }
    }

    /// Copies `bytes` into the writable buffers at `offset`; returns how many fitted.
    @discardableResult
    public func write(_ bytes: [UInt8], to ram: GuestRAM, offset: Int) -> Int {
        bytes.withUnsafeBytes { write($0, to: ram, offset: offset) }
    }

    private static func copy(buffers: [GuestBuffer], ram: GuestRAM, offset: Int, count: Int,
                             _ body: (UnsafeMutableRawPointer, Int, Int) -> Void) -> Int {
        guard count > 0, offset >= 0 else { return 0 }
        var skip = offset, done = 0
        for b in buffers where done < count {
            let len = Int(b.length)
            if skip >= len { skip -= len; continue }
            let n = min(len - skip, count - done)
            // Validated when the chain was built; RAM never moves, so this cannot fail.
            guard let host = ram.hostPointer(b.address + UInt64(skip), length: UInt64(n)) else { break }
            body(host, done, n)
            ram.noteExternalWrite(b.address + UInt64(skip), length: UInt64(n))
            done += n
            skip = 0
        }
        return done
    }
}

/// A split virtqueue (virtio 1.2 section 2.7): descriptor table, available ring, used ring.
///
/// The ring areas are validated against guest RAM when the queue is created, and every
/// descriptor when it is read, so a hostile driver produces a `VirtqueueError`, never a host
/// crash. Not thread-safe: after activation exactly one thread at a time (the device's I/O
/// thread) pops and completes chains.
public final class Virtqueue: @unchecked Sendable {  // unchecked: driven by one thread at a time (the device's I/O thread), as the transport hands it over
    /// Position of this queue in its device.
    public let index: Int
    /// Number of descriptors (and ring entries).
    public let size: UInt16
    /// Whether VIRTIO_F_RING_EVENT_IDX was negotiated.
    public let eventIndex: Bool

    private let descriptors: UnsafeMutableRawPointer
    private let avail: UnsafeMutableRawPointer
    private let used: UnsafeMutableRawPointer
    private let ram: GuestRAM
    private var lastAvail: UInt16 = 0
    private var usedIndex: UInt16 = 0
    /// `usedIndex` when the driver was last notified (for event-idx suppression).
    private var signalledUsed: UInt16 = 0
    private var pendingSignal = false

    private static let flagNext: UInt16 = 1, flagWrite: UInt16 = 2, flagIndirect: UInt16 = 4
    private static let availNoInterrupt: UInt16 = 1

    /// Creates a queue over the driver's ring areas, validating size, alignment and that each
    /// area lies in `ram`.
    /// The device's position in the rings: what a saved state keeps of a live queue (its
    /// addresses are the transport's registers).
    public struct RingIndices: Sendable, Equatable {
        /// The next available-ring entry the device will take.
        public var lastAvail: UInt16 = 0
        /// The device's used index.
        public var usedIndex: UInt16 = 0
        /// The used index as of the last notification decision.
        public var signalledUsed: UInt16 = 0
        /// Whether used buffers were added since that decision.
        public var pendingSignal = false

        public init(lastAvail: UInt16 = 0, usedIndex: UInt16 = 0, signalledUsed: UInt16 = 0, pendingSignal: Bool = false) {
            self.lastAvail = lastAvail
            self.usedIndex = usedIndex
            self.signalledUsed = signalledUsed
            self.pendingSignal = pendingSignal
        }
    }

    /// The ring indices now. Only by the thread that drives the queue, or while it is quiesced.
    public var indices: RingIndices {
        RingIndices(lastAvail: lastAvail, usedIndex: usedIndex, signalledUsed: signalledUsed, pendingSignal: pendingSignal)
    }

    public init(index: Int, size: UInt16, descriptorTable: GuestPhysicalAddress, driverArea: GuestPhysicalAddress,
                deviceArea: GuestPhysicalAddress, ram: GuestRAM, eventIndex: Bool,
                indices: RingIndices = RingIndices()) throws(VirtqueueError) {
        guard size > 0, size <= 32768 else { throw .badQueueSize(size) }
        let n = UInt64(size)
        func area(_ name: String, _ a: GuestPhysicalAddress, _ align: UInt64, _ len: UInt64) throws(VirtqueueError)
            -> UnsafeMutableRawPointer {
            guard a.raw % align == 0 else { throw .misaligned(area: name, address: a) }
            guard let p = ram.hostPointer(a, length: len) else { throw .areaOutsideRAM(area: name, address: a, length: len) }
            return p
        }
        descriptors = try area("descriptor table", descriptorTable, 16, 16 * n)
        avail = try area("driver area", driverArea, 2, 6 + 2 * n)
        used = try area("device area", deviceArea, 4, 6 + 8 * n)
        self.index = index
        self.size = size
        self.eventIndex = eventIndex
        self.ram = ram
        lastAvail = indices.lastAvail
        usedIndex = indices.usedIndex
        signalledUsed = indices.signalledUsed
        pendingSignal = indices.pendingSignal
    }

    private func load16(_ p: UnsafeMutableRawPointer, _ off: Int) -> UInt16 {
        UInt16(littleEndian: p.loadUnaligned(fromByteOffset: off, as: UInt16.self))
    }
    private func store16(_ p: UnsafeMutableRawPointer, _ off: Int, _ v: UInt16) {
        p.storeBytes(of: v.littleEndian, toByteOffset: off, as: UInt16.self)
        noteUsedWrite(p + off, 2)
    }
    private func store32(_ p: UnsafeMutableRawPointer, _ off: Int, _ v: UInt32) {
        p.storeBytes(of: v.littleEndian, toByteOffset: off, as: UInt32.self)
        noteUsedWrite(p + off, 4)
    }
    /// Marks a write into the used ring dirty for a live migration (nothing unless logging).
    @inline(__always) private func noteUsedWrite(_ p: UnsafeMutableRawPointer, _ n: Int) {
        guard ram.dirtyLogging else { return }
        ram.markDirty(ram.base + UInt64(p - ram.pointer), length: UInt64(n))
    }

    /// True when the driver has made chains available that have not been popped yet.
    public var hasAvailable: Bool {
        load16(avail, 2) != lastAvail
    }

    /// Pops the next available chain, or nil when the ring is empty. Throws when the driver's
    /// ring or descriptors are invalid; the queue is then unusable until reset.
    public func nextChain() throws(VirtqueueError) -> DescriptorChain? {
        let availIdx = load16(avail, 2)
        if availIdx == lastAvail { return nil }
        guard availIdx &- lastAvail <= size else {
            throw .availIndexJump(lastSeen: lastAvail, now: availIdx, size: size)
        }
        atomicMemoryFence(ordering: .acquiring)  // ring entries after the index
        let head = load16(avail, 4 + 2 * Int(lastAvail % size))
        lastAvail &+= 1
        if eventIndex {
            store16(used, 4 + 8 * Int(size), lastAvail)  // avail_event
        }
        return try walk(head: head)
    }

    /// Gives back the last `count` chains popped and not completed (virtio-net takes buffers for a
    /// frame, finds too few, and leaves them for the next frame). `avail_event` is left where
    /// `nextChain` put it, so the driver's next addition is still announced.
    public func unpop(_ count: Int) {
        lastAvail &-= UInt16(truncatingIfNeeded: count)
    }

    private func walk(head: UInt16) throws(VirtqueueError) -> DescriptorChain {
        var readable: [GuestBuffer] = [], writable: [GuestBuffer] = []
        var table = descriptors, tableSize = size, i = head
        var inIndirect = false, visited = 0
        while true {
            guard i < tableSize else { throw .descriptorIndexOutOfRange(index: i, tableSize: tableSize) }
            visited += 1
            guard visited <= Int(size) + (inIndirect ? Int(tableSize) : 0) else { throw .chainTooLong(head: head) }
            let d = table + 16 * Int(i)
            let addr = UInt64(littleEndian: d.loadUnaligned(as: UInt64.self))
            let len = UInt32(littleEndian: d.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let flags = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
            let next = UInt16(littleEndian: d.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
            if flags & Self.flagIndirect != 0 {
                guard !inIndirect else { throw .badIndirect(reason: "an indirect table inside an indirect table") }
                guard flags & Self.flagNext == 0 else { throw .badIndirect(reason: "indirect descriptor with NEXT set") }
                guard len > 0, len % 16 == 0, len / 16 <= 32768 else {
                    throw .badIndirect(reason: "table length \(len) is not a non-zero multiple of 16")
                }
                let a = GuestPhysicalAddress(addr)
                guard let p = ram.hostPointer(a, length: UInt64(len)) else {
                    throw .bufferOutsideRAM(address: a, length: len)
                }
                table = p
                tableSize = UInt16(len / 16)
                inIndirect = true
                visited = 0
                i = 0
                continue
            }
            let buffer = GuestBuffer(address: GuestPhysicalAddress(addr), length: len)
            guard ram.contains(buffer.address, length: UInt64(len)) else {
                throw .bufferOutsideRAM(address: buffer.address, length: len)
            }
            if flags & Self.flagWrite != 0 {
                writable.append(buffer)
            } else {
                guard writable.isEmpty else { throw .readableAfterWritable(head: head) }
                readable.append(buffer)
            }
            guard flags & Self.flagNext != 0 else { break }
            i = next
        }
        return DescriptorChain(head: head, readable: readable, writable: writable)
    }

    /// Puts a chain on the used ring, recording that the device wrote `written` bytes into its
    /// writable buffers. Call `needsNotification()` afterwards (once per batch).
    public func complete(_ chain: DescriptorChain, written: UInt32) {
        complete(head: chain.head, written: written)
    }

    /// Puts the chain whose head is `head` on the used ring.
    public func complete(head: UInt16, written: UInt32) {
        let slot = 4 + 8 * Int(usedIndex % size)
        store32(used, slot, UInt32(head))
        store32(used, slot + 4, written)
        atomicMemoryFence(ordering: .releasing)  // the entry before the index
        usedIndex &+= 1
        store16(used, 2, usedIndex)
        pendingSignal = true
    }

    /// Whether the driver wants an interrupt for the chains completed since the last call
    /// (honouring VIRTQ_AVAIL_F_NO_INTERRUPT or `used_event`). Resets the batch.
    public func needsNotification() -> Bool {
        guard pendingSignal else { return false }
        pendingSignal = false
        atomicMemoryFence(ordering: .sequentiallyConsistent)  // used idx visible before reading the driver's wish
        let old = signalledUsed, new = usedIndex
        signalledUsed = new
        if eventIndex {
            let event = load16(avail, 4 + 2 * Int(size))
            return new &- event &- 1 < new &- old
        }
        return load16(avail, 0) & Self.availNoInterrupt == 0
    }
}
