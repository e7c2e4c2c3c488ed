import Foundation
import Devices
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

    /// Peak resident size of this process in bytes (VmHWM), signed so that differences are too:
    /// the kernel's RSS counters are approximate (per-CPU batches), so with other tests
    /// allocating and freeing in parallel a later reading can be a little lower than an earlier
    /// one. (As UInt64, such a difference trapped and took the whole test process down.)
    func peakRSS() throws -> Int {
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") })
        let kb = try #require(line.split(separator: " ").dropFirst().first.flatMap { Int($0) })
        return kb * 1024
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
        let before = try peakRSS()
        do {
            _ = try BootLoader(ram: ramRegion(64 * mib),
                               firmware: role == "firmware" ? .path(big) : nil,
                               kernel: .path(role == "kernel" ? big : small),
                               initrd: role == "initrd" ? .path(big) : nil)
            Issue.record("a 1 GiB \(role) fitted in 64 MiB of RAM")
        } catch let e as MachineError {
            #expect("\(e)".contains(big) && "\(e)".contains("\(1 << 30) bytes"), "\(e)")
        }
        let grown = try peakRSS() - before
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

/// An interrupt line that ignores its level (the test polls the UART instead).
final class IgnoredLine: InterruptLine {
    func set(_ level: Bool) {}
}

/// Typed input on a socket serial console gets backpressure: the backend reads only as fast as
/// the guest drains the UART, so nothing is dropped. Before, everything was read at once and
/// all but the UART's 64 KiB queue was dropped (99.8% of 50 MB). The same holds for a pipe on
/// the server's standard input.
@Suite struct SerialBackpressureTests {
    /// Drains `uart` byte by byte as a guest would (RBR at offset 0; LSR.DR at 5) until `total`
    /// bytes arrived or none came for 5 s.
    private func drain(_ uart: Uart16550, total: Int) -> [UInt8] {
        var received: [UInt8] = []
        received.reserveCapacity(total)
        var lastProgress = Date()
        while received.count < total && Date().timeIntervalSince(lastProgress) < 5 {
            if uart.read(offset: 5, size: 1) & 1 != 0 {
                received.append(UInt8(uart.read(offset: 0, size: 1)))
                lastProgress = Date()
            } else {
                usleep(200)
            }
        }
        return received
    }

    /// Writes 1 MiB into `fd` on a thread as fast as `fd` takes it, while the guest reads
    /// nothing for 300 ms (the writes must stall short of the total, nothing dropped), then
    /// drains the UART and checks that every byte arrived, in order.
    private func expectBackpressure(_ uart: Uart16550, writingTo fd: Int32,
                                    write: @escaping @Sendable (Int32, UnsafeRawPointer, Int) -> Int) {
        let total = 1 << 20
        let payload = (0..<total).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 8) }
        let sent = Atomic<Int>(0)
        let writer = DispatchSemaphore(value: 0)
        Thread {
            var off = 0
            while off < total {
                let n = payload.withUnsafeBytes { write(fd, $0.baseAddress! + off, total - off) }
                if n <= 0 { break }
                off += n
                sent.store(off, ordering: .relaxed)
            }
            writer.signal()
        }.start()

        usleep(300_000)
        let stalledAt = sent.load(ordering: .relaxed)
        #expect(stalledAt < total, "all \(total) bytes were taken while the guest read none")
        #expect(uart.droppedInputBytes == 0)

        let received = drain(uart, total: total)
        writer.wait()
        #expect(uart.droppedInputBytes == 0, "\(uart.droppedInputBytes) bytes dropped")
        #expect(received.count == total)
        let intact = received == payload  // (not inside #expect: it would print 1 MiB arrays)
        #expect(intact, "input arrived out of order or corrupted")
    }

    @Test func inputOnAStdioPipeWaitsForTheGuestAndIsNeverDropped() throws {
        var input: [Int32] = [0, 0], output: [Int32] = [0, 0]
        try #require(pipe(&input) == 0 && pipe(&output) == 0)
        defer { for fd in input + output { close(fd) } }
        let chardev = try StdioChardev(id: "serial0", inputFD: input[0], outputFD: output[1], onQuitRequest: {})
        defer { chardev.close() }
        let uart = Uart16550(irq: IgnoredLine(), backend: chardev, inputCapacity: 4096)
        expectBackpressure(uart, writingTo: input[1]) { fd, bytes, count in Glibc.write(fd, bytes, count) }
    }

    @Test func inputOnAUnixSocketConsoleWaitsForTheGuestAndIsNeverDropped() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/serial.sock"
        let chardev = try SocketChardev(id: "serial0", unixPath: path)
        defer { chardev.close() }
        let uart = Uart16550(irq: IgnoredLine(), backend: chardev, inputCapacity: 4096)

        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(rc == 0)
        defer { close(fd) }
        #expect(eventually(5) { chardev.isConnected })
        expectBackpressure(uart, writingTo: fd) { fd, bytes, count in send(fd, bytes, count, Int32(MSG_NOSIGNAL)) }
    }
}
