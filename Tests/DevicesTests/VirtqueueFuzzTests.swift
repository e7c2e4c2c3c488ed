import Foundation
import FuzzSupport
import Machine
import Testing
@testable import Devices

/// Fuzzes the split-virtqueue walker with hostile driver memory: the first 8 KiB of a 64 KiB
/// guest RAM hold the descriptor table (0x0), the driver area (0x400), the device area (0x800)
/// and room for indirect tables and data (0x1000), all taken from the input. Seeds are the
/// committed ring images in tests/fuzz/corpus/virtqueue (direct, chained, indirect and
/// mixed read/write chains). Every chain the queue hands out must lie inside RAM and be no
/// longer than the table allows; copying through it must stay inside its buffers; nothing may
/// crash or loop.
@Suite struct VirtqueueFuzzTests {
    static let ramBase: UInt64 = 0x8000_0000
    static let ramSize: UInt64 = 64 << 10

    @Test func hostileRingsNeverEscapeGuestRAM() throws {
        let seeds = Fuzz.corpus("virtqueue")
        try #require(seeds.count >= 3, "the virtqueue seed corpus is missing")
        let ram = try GuestRAM(base: GuestPhysicalAddress(Self.ramBase), size: Self.ramSize)
        var escapes: [String] = []
        let report = Fuzz.run(target: "virtqueue", seeds: seeds, seconds: Fuzz.budget(ci: 2), maxLength: 8192) { input in
            var image = input
            image += [UInt8](repeating: 0, count: max(0, 8192 - image.count))
            try image.withUnsafeBytes { try ram.write($0, at: GuestPhysicalAddress(Self.ramBase)) }
            let q = try Virtqueue(index: 0, size: 16, descriptorTable: GuestPhysicalAddress(Self.ramBase),
                                  driverArea: GuestPhysicalAddress(Self.ramBase + 0x400),
                                  deviceArea: GuestPhysicalAddress(Self.ramBase + 0x800), ram: ram,
                                  eventIndex: image[0x1fff] & 1 != 0)
            for _ in 0..<64 {
                guard let chain = try q.nextChain() else { break }
                for b in chain.readable + chain.writable where !ram.contains(b.address, length: UInt64(b.length)) {
                    escapes.append("buffer \(b) outside RAM")
                }
                if chain.readable.count + chain.writable.count > 16 + 32768 { escapes.append("chain of \(chain.readable.count + chain.writable.count)") }
                let data = chain.readBytes(from: ram, count: min(chain.readableLength, 4096))
                if data.count > chain.readableLength { escapes.append("read \(data.count) > \(chain.readableLength)") }
                let wrote = chain.write([UInt8](repeating: 0xEE, count: min(chain.writableLength, 4096)), to: ram, offset: 0)
                if wrote > chain.writableLength { escapes.append("wrote \(wrote) > \(chain.writableLength)") }
                q.complete(chain, written: UInt32(wrote))
                _ = q.needsNotification()
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(escapes.isEmpty, "\(escapes.prefix(5))")
    }
}
