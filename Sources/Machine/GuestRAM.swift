import Foundation
import Synchronization

/// The guest's DRAM: one host allocation mapped at a fixed guest physical base.
///
/// Owned by the machine; the pointer stays valid for the machine's life. Any thread may read or
/// write through it (guest memory has no host-side lock, like real DRAM); ordering between
/// vCPU and device threads follows the guest's own fences plus the host's memory model.
public final class GuestRAM: @unchecked Sendable {  // unchecked: raw guest memory, shared by design like DRAM; the bookkeeping vars sit behind Mutexes
    /// Where the RAM starts in guest physical space.
    public let base: GuestPhysicalAddress
    /// Size in bytes (a multiple of 4 KiB).
    public let size: UInt64
    /// Host address of guest physical `base`.
    public let pointer: UnsafeMutableRawPointer

    /// RAM mapped from a file (QEMU's memory-backend-file): the descriptor (at least `size`
    /// bytes long; closed by the caller after `init`) and whether guest writes reach the file.
    public struct BackingFile: Sendable {
        public var fileDescriptor: Int32
        public var shared: Bool
        public init(fileDescriptor: Int32, shared: Bool) {
            self.fileDescriptor = fileDescriptor
            self.shared = shared
        }
    }

    /// Whether RAM is mapped from a file (then saved states cannot be loaded into it).
    public let isFileBacked: Bool

    /// Allocates zeroed RAM, or maps `backing`. The memory is obtained with `mmap`, so untouched
    /// pages cost nothing.
    public init(base: GuestPhysicalAddress, size: UInt64, backing: BackingFile? = nil) throws {
        precondition(size > 0 && size % 4096 == 0, "RAM size must be a positive multiple of 4 KiB")
        let p: UnsafeMutableRawPointer?
        if let backing {
            p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, backing.shared ? MAP_SHARED : MAP_PRIVATE | MAP_NORESERVE,
                     backing.fileDescriptor, 0)
        } else {
            p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        }
        guard let p, p != MAP_FAILED else {
            if backing != nil {
                throw MachineError.invalidImage(what: "memory-backend file", reason: String(cString: strerror(errno)))
            }
            throw MachineError.outOfHostMemory(requested: size)
        }
        isFileBacked = backing != nil
        self.base = base
        self.size = size
        self.pointer = p
        codePages = .allocate(capacity: Int(size / 4096))
        codePages.initialize(repeating: 0, count: Int(size / 4096))
        cpuDirty = .allocate(capacity: Int(size / 4096) + 1)
        cpuDirty.initialize(repeating: 0, count: Int(size / 4096) + 1)
        deviceDirty = Mutex([UInt64](repeating: 0, count: Int((size / 4096 + 63) / 64)))
    }

    /// One byte per RAM page, nonzero while some CPU may hold code translated from the page;
    /// CPUs send stores to such pages down their slow path. Shared by every vCPU thread: a
    /// byte store or load is atomic on the hosts we run on, and a stale read only delays an
    /// invalidation until the next `codeEpoch` check or `fence.i`, which the guest must issue
    /// anyway before running modified code.
    public let codePages: UnsafeMutablePointer<UInt8>
    /// Bumped whenever a page becomes a code page, so every CPU drops write-TLB entries that
    /// would let stores to it bypass the slow path.
    public let codeEpoch = Atomic<UInt64>(0)

    deinit {
        munmap(pointer, Int(size))
        codePages.deallocate()
        cpuDirty.deallocate()
    }

    // MARK: Dirty-page logging (live migration)

    /// One byte per RAM page, set by a CPU's store slow path while `dirtyLogging` is on; the
    /// byte after the last page is the logging flag itself (`dirtyLogging`). While logging, a
    /// CPU installs a write-TLB entry for a page only once its byte is set, so the first store
    /// to a page in each pass takes the slow path and marks it, and later stores run at full
    /// speed; with logging off nothing changes on any path. Written by vCPU threads (a byte
    /// store is atomic on the hosts we run on); read and cleared by `harvestDirtyPages` only
    /// while no hart is in guest code.
    public let cpuDirty: UnsafeMutablePointer<UInt8>
    /// Pages written by devices (virtio DMA, used rings) while logging: one bit per page.
    private let deviceDirty: Mutex<[UInt64]>
    /// Whether dirty logging is on (read by CPUs in their TLB fill, by devices on each write).
    @inline(__always) public var dirtyLogging: Bool { cpuDirty[Int(size >> 12)] != 0 }

    /// Turns dirty logging on with every page clean, and makes every CPU drop its write-TLB
    /// entries at its next turn of the run loop. Control thread, no hart in guest code.
    public func startDirtyLogging() {
        let pages = Int(size >> 12)
        cpuDirty.update(repeating: 0, count: pages)
        deviceDirty.withLock { $0 = [UInt64](repeating: 0, count: $0.count) }
        cpuDirty[pages] = 1
        codeEpoch.add(1, ordering: .sequentiallyConsistent)
    }

    /// Turns dirty logging off. Control thread, no hart in guest code.
    public func stopDirtyLogging() {
        cpuDirty[Int(size >> 12)] = 0
    }

    /// Returns the pages written since logging started or since the last harvest (ascending
    /// page indices relative to `base`), clears them, and makes every CPU drop its write-TLB
    /// entries so that the next store to each page is logged again. Control thread, no hart in
    /// guest code (devices may be running: their marks are taken under a lock).
    public func harvestDirtyPages() -> [UInt64] {
        let pages = Int(size >> 12)
        let devices = deviceDirty.withLock { d -> [UInt64] in
            let out = d
            for i in d.indices where d[i] != 0 { d[i] = 0 }
            return out
        }
        var out: [UInt64] = []
        let words = UnsafeRawPointer(cpuDirty)
        // Groups of eight pages (one 64-bit load of the byte map, one byte of the bit map).
        var group = 0
        while group < pages {
            let end = min(group + 8, pages)
            let clean = end - group == 8 && words.loadUnaligned(fromByteOffset: group, as: UInt64.self) == 0
                && devices[group >> 6] & (0xff << UInt64(group & 63)) == 0
            if !clean {
                for i in group..<end where cpuDirty[i] != 0 || devices[i >> 6] & (1 << UInt64(i & 63)) != 0 {
                    out.append(UInt64(i))
                    cpuDirty[i] = 0
                }
            }
            group = end
        }
        codeEpoch.add(1, ordering: .sequentiallyConsistent)
        return out
    }

    /// Marks `[address, address + length)` dirty for a live migration when a device wrote it
    /// (a no-op unless logging). Any thread; call after writing.
    @inline(__always) public func markDirty(_ address: GuestPhysicalAddress, length: UInt64) {
        guard dirtyLogging, length > 0, contains(address, length: length) else { return }
        let first = (address.raw &- base.raw) >> 12
        let last = (address.raw &- base.raw &+ length &- 1) >> 12
        deviceDirty.withLock { d in
            for page in first...last { d[Int(page >> 6)] |= 1 << (page & 63) }
        }
    }

    /// Logs of RAM pages written by someone other than a CPU (device DMA), one per CPU that
    /// caches translated code. Registered at machine assembly, before any device runs.
    private let writeLogs = Mutex<[ExternalWriteLog]>([])

    /// Registers a log that will receive every page devices write from now on.
    public func addExternalWriteLog() -> ExternalWriteLog {
        let log = ExternalWriteLog()
        writeLogs.withLock { $0.append(log) }
        return log
    }

    /// Records that a device wrote `[address, address + length)` behind the CPUs' backs, so
    /// CPUs drop code translated from those pages at their next `fence.i`. Any thread.
    public func noteExternalWrite(_ address: GuestPhysicalAddress, length: UInt64) {
        guard length > 0, contains(address, length: length) else { return }
        let first = (address.raw &- base.raw) >> 12
        let last = (address.raw &- base.raw &+ length &- 1) >> 12
        let logs = writeLogs.withLock { $0 }
        for log in logs { log.add(pages: first...last) }
        markDirty(address, length: length)
    }

    /// The guest region that this RAM occupies.
    public var region: GuestRegion { GuestRegion(base: base, size: size) }

    /// True when `[address, address + length)` lies entirely in RAM.
    @inlinable public func contains(_ address: GuestPhysicalAddress, length: UInt64 = 1) -> Bool {
        let off = address.raw &- base.raw
        return off < size && length <= size - off
    }

    /// Host pointer for a guest physical address, or nil when the range is not all RAM.
    @inlinable public func hostPointer(_ address: GuestPhysicalAddress, length: UInt64 = 1) -> UnsafeMutableRawPointer? {
        guard contains(address, length: length) else { return nil }
        return pointer + Int(address.raw &- base.raw)
    }

    /// Copies bytes into guest RAM; throws when the destination is not entirely RAM.
    /// Replaces all of RAM with zero pages (one remap; pages mapped from a file are dropped).
    /// Control thread, no hart in guest code, no device touching RAM.
    public func zeroAll() throws {
        guard !isFileBacked else {
            throw MachineError.invalidImage(what: "RAM", reason: "it is mapped from a memory-backend file; loading a saved state into it is not supported")
        }
        let p = mmap(pointer, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
        guard p == pointer else { throw MachineError.outOfHostMemory(requested: size) }
        codePages.update(repeating: 0, count: Int(size / 4096))
        codeEpoch.add(1, ordering: .sequentiallyConsistent)
        fileBacked.withLock { $0.removeAll() }
    }

    /// Page ranges mapped from a file by `mapPrivate` (their untouched pages hold the file's
    /// bytes, not zeros). Control thread.
    private let fileBacked = Mutex<[Range<UInt64>]>([])

    /// For each page, whether it may hold something other than zeros: false only for an
    /// anonymous page the host never materialised (neither present nor swapped, per
    /// /proc/self/pagemap), which reads as zero without being touched. Reading such a page to
    /// find out would fault it in (a 512 MiB guest has ~100,000 of them after boot). Nil when
    /// pagemap cannot be read (then every page must be read). Control thread, RAM quiescent.
    public func possiblyNonZeroPages() -> [Bool]? {
        if isFileBacked { return nil }  // file pages read as the file's bytes, present or not
        let pages = Int(size / 4096)
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var entries = [UInt64](repeating: 0, count: pages)
        let wanted = pages * 8
        let got = entries.withUnsafeMutableBytes { b -> Int in
            var done = 0
            let start = off_t(UInt(bitPattern: pointer) / 4096 * 8)
            while done < wanted {
                let n = pread(fd, b.baseAddress! + done, wanted - done, start + off_t(done))
                if n <= 0 { return done }
                done += n
            }
            return done
        }
        guard got == wanted else { return nil }
        var out = entries.map { $0 & (3 << 62) != 0 }  // bit 63 present, bit 62 swapped
        for r in fileBacked.withLock({ $0 }) {
            for i in r where i < UInt64(pages) { out[Int(i)] = true }
        }
        return out
    }

    /// Maps `pageCount` pages of a file at `fileOffset` (page-aligned) copy-on-write over RAM
    /// from page `firstPage`: the guest sees the file's bytes, and its writes stay private.
    /// Control thread, as `zeroAll`.
    public func mapPrivate(fileDescriptor fd: Int32, fileOffset: UInt64, firstPage: UInt64, pageCount: UInt64) throws {
        let pages = size / 4096
        guard fileOffset % 4096 == 0, firstPage <= pages, pageCount <= pages - firstPage else {
            throw MachineError.outsideRAM(address: base + firstPage * 4096, length: pageCount * 4096)
        }
        let at = pointer + Int(firstPage * 4096)
        let p = mmap(at, Int(pageCount * 4096), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, off_t(fileOffset))
        guard p == at else {
            throw MachineError.invalidImage(what: "RAM mapping", reason: String(cString: strerror(errno)))
        }
        fileBacked.withLock { $0.append(firstPage..<(firstPage + pageCount)) }
    }

    /// Copies bytes into guest RAM (marked dirty while a migration logs: the boot loader
    /// writes through here on a reset); throws when the destination is not entirely RAM.
    public func write(_ bytes: UnsafeRawBufferPointer, at address: GuestPhysicalAddress) throws {
        guard let dst = hostPointer(address, length: UInt64(bytes.count)) else {
            throw MachineError.outsideRAM(address: address, length: UInt64(bytes.count))
        }
        if let src = bytes.baseAddress { dst.copyMemory(from: src, byteCount: bytes.count) }
        markDirty(address, length: UInt64(bytes.count))
    }

    /// Copies `data` into guest RAM.
    public func write(_ data: Data, at address: GuestPhysicalAddress) throws {
        try data.withUnsafeBytes { try write($0, at: address) }
    }

    /// Reads bytes out of guest RAM; throws when the source is not entirely RAM.
    public func read(_ address: GuestPhysicalAddress, count: Int) throws -> [UInt8] {
        guard let src = hostPointer(address, length: UInt64(count)) else {
            throw MachineError.outsideRAM(address: address, length: UInt64(count))
        }
        return Array(UnsafeRawBufferPointer(start: src, count: count))
    }
}

/// Pages of guest RAM written by devices since the owner last drained the log.
///
/// Written from device threads, drained by one vCPU thread.
public final class ExternalWriteLog: Sendable {
    private let pages = Mutex<Set<UInt64>>([])
    /// True when pages are waiting (a cheap check before taking the lock).
    public let isEmpty = Atomic<Bool>(true)

    func add(pages range: ClosedRange<UInt64>) {
        pages.withLock { p in for page in range { p.insert(page) } }
        isEmpty.store(false, ordering: .releasing)
    }

    /// Returns and forgets the logged page indices (relative to the RAM base).
    public func drain() -> Set<UInt64> {
        isEmpty.store(true, ordering: .relaxed)
        return pages.withLock { p in
            let out = p
            p.removeAll()
            return out
        }
    }
}
