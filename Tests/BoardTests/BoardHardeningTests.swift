import Foundation
import Machine
import Synchronization
import Testing
@testable import Board

/// Reproducers for issue 15 (hardening) in boot loading and the file chardev; each failed
/// (read gigabytes, blocked forever, or lost output silently) before the fix.
@Suite struct BoardHardeningTests {
    /// Runs `body` on another thread; false if it has not returned within `seconds`.
    func finishes(within seconds: Double, _ body: @escaping @Sendable () -> Void) -> Bool {
        let done = DispatchSemaphore(value: 0)
        Thread { body(); done.signal() }.start()
        return done.wait(timeout: .now() + seconds) == .success
    }

    /// Resets this process's peak resident size to its current size (Linux: writing 5 to
    /// /proc/self/clear_refs), so that `peakRSS` measures from here.
    func resetPeakRSS() {
        let fd = open("/proc/self/clear_refs", O_WRONLY)
        guard fd >= 0 else { return }
        _ = write(fd, "5", 1)
        close(fd)
    }

    /// Peak resident size of this process in bytes (VmHWM).
    func peakRSS() -> UInt64 {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        for line in status.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            let kb = line.split(separator: " ").dropFirst().first.flatMap { UInt64($0) } ?? 0
            return kb * 1024
        }
        return 0
    }

    /// A sparse file larger than guest RAM is refused by its size, before any of it is read:
    /// the loader used to read all of it into memory and only then compare.
    @Test(.serialized, arguments: ["firmware", "kernel", "initrd"])
    func aBootImageLargerThanRAMIsRefusedWithoutReadingIt(role: String) throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let big = dir + "/big.img"
        let fd = open(big, O_WRONLY | O_CREAT, 0o644)
        #expect(ftruncate(fd, 1 << 30) == 0)  // 1 GiB, no blocks allocated
        close(fd)
        let small = dir + "/small.img"
        try Data(makeLinuxImage(fileSize: 4096, imageSize: 4096)).write(to: URL(fileURLWithPath: small))
        resetPeakRSS()
        let before = peakRSS()
        do {
            _ = try BootLoader(ram: ramRegion(64 * mib),
                               firmware: role == "firmware" ? .path(big) : nil,
                               kernel: .path(role == "kernel" ? big : small),
                               initrd: role == "initrd" ? .path(big) : nil)
            Issue.record("a 1 GiB \(role) fitted in 64 MiB of RAM")
        } catch let e as MachineError {
            #expect("\(e)".contains(big) && "\(e)".contains("\(1 << 30) bytes"), "\(e)")
        }
        let grown = peakRSS() - before
        #expect(grown < 256 << 20, "loading grew the process by \(grown >> 20) MiB")
    }

    @Test func aFIFOAsABootImageIsRefusedWithoutBlocking() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fifo = dir + "/kernel.fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        let message = Mutex<String?>(nil)
        let ok = finishes(within: 5) {
            do {
                _ = try BootLoader(ram: ramRegion(64 * mib), firmware: nil, kernel: .path(fifo), initrd: nil)
                message.withLock { $0 = "loaded" }
            } catch {
                message.withLock { $0 = "\(error)" }
            }
        }
        if !ok { let fd = open(fifo, O_WRONLY | O_NONBLOCK); if fd >= 0 { close(fd) } }
        #expect(ok, "reading a FIFO kernel blocked")
        #expect(message.withLock { $0 }?.contains("not a regular file") == true, "\(message.withLock { $0 } ?? "")")
    }

    @Test func aFIFOAsTheSerialFileIsRefusedWithoutBlocking() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fifo = dir + "/serial.fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        let message = Mutex<String?>(nil)
        let ok = finishes(within: 5) {
            do {
                let c = try FileChardev(id: "serial0", path: fifo, append: false)
                c.close()
                message.withLock { $0 = "opened" }
            } catch {
                message.withLock { $0 = "\(error)" }
            }
        }
        if !ok { let fd = open(fifo, O_RDONLY | O_NONBLOCK); if fd >= 0 { usleep(100_000); close(fd) } }
        #expect(ok, "opening a FIFO as the serial file blocked")
        #expect(message.withLock { $0 }?.contains("FIFO") == true, "\(message.withLock { $0 } ?? "")")
    }

    /// Output to /dev/full fails with ENOSPC: reported once, counted, and the backend (and
    /// the guest writing to it) carries on.
    @Test func aSerialWriteErrorIsReportedOnce() throws {
        let reports = Mutex<[String]>([])
        let c = try FileChardev(id: "serial0", path: "/dev/full", append: false) { m in reports.withLock { $0.append(m) } }
        defer { c.close() }
        for _ in 0..<3 {
            Array("hello\n".utf8).withUnsafeBytes { c.write($0) }
        }
        let r = reports.withLock { $0 }
        #expect(r.count == 1, "\(r)")
        #expect(r.first?.contains("/dev/full") == true && r.first?.contains("No space left") == true, "\(r)")
        #expect(c.droppedBytes == 18)
    }
}
