import Foundation

/// Linux userfaultfd on a range of anonymous memory (post-copy migration's destination RAM),
/// in MISSING mode: a thread touching a page that is not present blocks in the kernel, a
/// message names the page, and the page is placed atomically with `copy` or `zero`, which
/// wakes whoever waits for it. This catches every access alike: the interpreter, JIT code
/// (which touches host memory directly), device DMA and the QMP thread.
///
/// The constants and structures are those of `<linux/userfaultfd.h>` (x86-64 and arm64 share
/// them); the descriptor comes from `/dev/userfaultfd` (USERFAULTFD_IOC_NEW), which a process
/// that may not use the system call (vm.unprivileged_userfaultfd=0) can still open when the
/// device's permissions allow it. Thread-safe: the kernel serialises the ioctls.
final class UserFault: @unchecked Sendable {  // unchecked: only an immutable descriptor and range
    let fd: Int32
    let start: UnsafeMutableRawPointer
    let length: Int
    private var registered = false
    private let lock = NSLock()

    private static let uffdType: UInt = 0xAA
    private static func iowr(_ nr: UInt, _ size: Int) -> UInt { (3 << 30) | (UInt(size) << 16) | (uffdType << 8) | nr }
    private static func ior(_ nr: UInt, _ size: Int) -> UInt { (2 << 30) | (UInt(size) << 16) | (uffdType << 8) | nr }
    /// USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00) on /dev/userfaultfd.
    private static let iocNew: UInt = uffdType << 8
    private static let api: UInt64 = 0xAA
    private static let ioctlAPI = iowr(0x3F, 24)
    private static let ioctlRegister = iowr(0x00, 32)
    private static let ioctlUnregister = ior(0x01, 16)
    private static let ioctlWake = ior(0x02, 16)
    private static let ioctlCopy = iowr(0x03, 40)
    private static let ioctlZeropage = iowr(0x04, 32)
    private static let registerModeMissing: UInt64 = 1
    static let eventPagefault: UInt8 = 0x12
    static let pageSize = 4096

    private static func errorText(_ e: Int32 = errno) -> String { String(cString: strerror(e)) }

    /// Opens a userfaultfd and does the API handshake; throws a message naming what is missing.
    private static func open() throws -> Int32 {
        let dev = Foundation.open("/dev/userfaultfd", O_RDWR | O_CLOEXEC)
        guard dev >= 0 else {
            throw MachineStateError("userfaultfd is not available: cannot open /dev/userfaultfd: \(errorText())")
        }
        defer { close(dev) }
        let fd = ioctl(dev, iocNew, CInt(O_CLOEXEC | O_NONBLOCK))
        guard fd >= 0 else { throw MachineStateError("userfaultfd is not available: USERFAULTFD_IOC_NEW: \(errorText())") }
        var a: (UInt64, UInt64, UInt64) = (api, 0, 0)
        let r = withUnsafeMutableBytes(of: &a) { ioctl(fd, ioctlAPI, $0.baseAddress!) }
        guard r == 0 else {
            let e = errorText()
            close(fd)
            throw MachineStateError("userfaultfd is not available: UFFDIO_API: \(e)")
        }
        // Anonymous-memory MISSING faults, COPY and ZEROPAGE are in every userfaultfd API.
        return fd
    }

    /// Throws, with the reason, unless this host can run the destination of a post-copy
    /// migration. Any thread.
    static func checkAvailable() throws {
        let fd = try open()
        close(fd)
    }

    /// Opens a userfaultfd for `length` bytes at `start` (page-aligned anonymous memory);
    /// nothing is registered yet.
    init(start: UnsafeMutableRawPointer, length: Int) throws {
        fd = try Self.open()
        self.start = start
        self.length = length
    }

    deinit { close(fd) }

    /// Registers the range in MISSING mode: from now on a not-present page blocks its toucher
    /// until it is placed.
    func register() throws {
        var r: (UInt64, UInt64, UInt64, UInt64) = (UInt64(UInt(bitPattern: start)), UInt64(length), Self.registerModeMissing, 0)
        let ok = withUnsafeMutableBytes(of: &r) { ioctl(fd, Self.ioctlRegister, $0.baseAddress!) }
        guard ok == 0 else { throw MachineStateError("userfaultfd: cannot register guest RAM: \(Self.errorText())") }
        lock.withLock { registered = true }
    }

    /// Unregisters the range: later touches of not-present pages get zero pages as usual, and
    /// anyone still waiting is woken.
    func unregister() {
        let was = lock.withLock { () -> Bool in defer { registered = false }; return registered }
        guard was else { return }
        var r: (UInt64, UInt64) = (UInt64(UInt(bitPattern: start)), UInt64(length))
        _ = withUnsafeMutableBytes(of: &r) { ioctl(fd, Self.ioctlUnregister, $0.baseAddress!) }
    }

    /// Places one page (index from `start`) with the 4 KiB at `data` and wakes its waiters.
    /// Returns false when the page was already present (EEXIST: placed before, which is fine).
    @discardableResult
    func copy(page: UInt64, from data: UnsafeRawPointer) throws -> Bool {
        let dst = UInt64(UInt(bitPattern: start)) + page * UInt64(Self.pageSize)
        while true {
            var c: (UInt64, UInt64, UInt64, UInt64, Int64) = (dst, UInt64(UInt(bitPattern: data)), UInt64(Self.pageSize), 0, 0)
            let r = withUnsafeMutableBytes(of: &c) { ioctl(fd, Self.ioctlCopy, $0.baseAddress!) }
            if r == 0 { return true }
            let e = errno
            if e == EEXIST || c.4 == -Int64(EEXIST) { return false }
            if e == EAGAIN || e == EINTR { continue }
            throw MachineStateError("userfaultfd: cannot place page \(page): \(Self.errorText(e))")
        }
    }

    /// Places a zero page and wakes its waiters; false when it was already present.
    @discardableResult
    func zero(page: UInt64) throws -> Bool {
        let dst = UInt64(UInt(bitPattern: start)) + page * UInt64(Self.pageSize)
        while true {
            var z: (UInt64, UInt64, UInt64, Int64) = (dst, UInt64(Self.pageSize), 0, 0)
            let r = withUnsafeMutableBytes(of: &z) { ioctl(fd, Self.ioctlZeropage, $0.baseAddress!) }
            if r == 0 { return true }
            let e = errno
            if e == EEXIST || z.3 == -Int64(EEXIST) { return false }
            if e == EAGAIN || e == EINTR { continue }
            throw MachineStateError("userfaultfd: cannot zero page \(page): \(Self.errorText(e))")
        }
    }

    /// Wakes the threads waiting for `page` (they retry their access).
    func wake(page: UInt64) {
        var r: (UInt64, UInt64) = (UInt64(UInt(bitPattern: start)) + page * UInt64(Self.pageSize), UInt64(Self.pageSize))
        _ = withUnsafeMutableBytes(of: &r) { ioctl(fd, Self.ioctlWake, $0.baseAddress!) }
    }

    /// Waits up to `timeoutMs` for fault messages and returns the pages that faulted (indices
    /// from `start`); empty on a timeout.
    func waitForFaults(timeoutMs: Int32) throws -> [UInt64] {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let n = poll(&p, 1, timeoutMs)
        if n < 0 {
            if errno == EINTR { return [] }
            throw MachineStateError("userfaultfd: poll failed: \(Self.errorText())")
        }
        if n == 0 { return [] }
        var out: [UInt64] = []
        var buffer = [UInt8](repeating: 0, count: 32 * 64)
        while true {
            let r = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if r < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK { break }
                if errno == EINTR { continue }
                throw MachineStateError("userfaultfd: read failed: \(Self.errorText())")
            }
            if r == 0 { break }
            buffer.withUnsafeBytes { b in
                for i in stride(from: 0, to: r - 31, by: 32) where b[i] == Self.eventPagefault {
                    let address = b.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self)
                    let offset = address &- UInt64(UInt(bitPattern: start))
                    if offset < UInt64(length) { out.append(offset / UInt64(Self.pageSize)) }
                }
            }
            if r < buffer.count { break }
        }
        return out
    }
}
