import Synchronization

/// A device register window on the memory bus.
///
/// A device sees only offsets inside its own window, never the bus. Accesses are 1, 2, 4 or 8
/// bytes wide and naturally aligned within the window (the CPU splits anything else).
/// Called on the vCPU thread that made the access; a device that is also touched from other
/// threads (an I/O backend, the control thread) protects its state itself.
public protocol MMIODevice: AnyObject {
    /// A short name for logs and error messages ("uart0", "plic").
    var name: String { get }
    /// Reads `size` bytes at `offset`; the value is zero-extended.
    func read(offset: UInt64, size: Int) -> UInt64
    /// Writes the low `size` bytes of `value` at `offset`.
    func write(offset: UInt64, size: Int, value: UInt64)
}

/// The guest physical address map outside RAM: a sorted, non-overlapping set of device windows.
///
/// Policy for unmapped accesses: reads return 0 and writes are dropped, and both are counted so
/// that a confused guest is visible in `unmappedAccesses` (QEMU's `virt` behaves the same way
/// for most of its holes). Mapping happens at board assembly or hot-plug, on the control thread
/// while the vCPUs are paused; lookups happen on vCPU threads.
public final class MemoryBus: @unchecked Sendable {  // unchecked: `mappings` changes only on the control thread while every vCPU is stopped
    public struct Mapping {
        public let region: GuestRegion
        public let device: any MMIODevice
    }

    /// Mappings sorted by base address.
    public private(set) var mappings: [Mapping] = []
    /// Count of accesses that hit no device.
    public let unmappedAccesses = Atomic<UInt64>(0)
    /// Called with (address, isWrite) for the first few unmapped accesses, for logging.
    public var onUnmapped: ((GuestPhysicalAddress, Bool) -> Void)?

    public init() {}

    /// Maps a device window; refuses empty windows and overlaps with anything already mapped.
    public func map(_ device: any MMIODevice, at region: GuestRegion) throws {
        guard region.size > 0 else { throw MachineError.emptyRegion(name: device.name) }
        if let clash = mappings.first(where: { $0.region.overlaps(region) }) {
            throw MachineError.overlappingRegion(name: device.name, region: region, existing: clash.device.name)
        }
        mappings.append(Mapping(region: region, device: device))
        mappings.sort { $0.region.base < $1.region.base }
    }

    /// Removes a device's window(s); used by hot-unplug.
    public func unmap(_ device: any MMIODevice) {
        mappings.removeAll { $0.device === device }
    }

    /// Finds the mapping that contains `address` (binary search).
    @inlinable public func lookup(_ address: GuestPhysicalAddress) -> Mapping? {
        var lo = 0, hi = mappings.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let m = mappings[mid]
            if address < m.region.base { hi = mid } else if address >= m.region.end { lo = mid + 1 } else { return m }
        }
        return nil
    }

    /// Reads from whatever device decodes `address`; 0 when nothing does.
    public func read(_ address: GuestPhysicalAddress, size: Int) -> UInt64 {
        guard let m = lookup(address) else {
            noteUnmapped(address, write: false)
            return 0
        }
        return m.device.read(offset: address - m.region.base, size: size)
    }

    /// Writes to whatever device decodes `address`; dropped when nothing does.
    public func write(_ address: GuestPhysicalAddress, size: Int, value: UInt64) {
        guard let m = lookup(address) else {
            noteUnmapped(address, write: true)
            return
        }
        m.device.write(offset: address - m.region.base, size: size, value: value)
    }

    private func noteUnmapped(_ a: GuestPhysicalAddress, write: Bool) {
        let n = unmappedAccesses.add(1, ordering: .relaxed).newValue
        if n <= 16 { onUnmapped?(a, write) }
    }
}
