import Machine
import Testing
@testable import Devices

extension PCIVirtioDriver {
    /// Posts one device-writable buffer of `length` bytes at `output` and notifies queue 0.
    mutating func postWritable(length: UInt32, output: UInt64) {
        let head = UInt16(availIdx % size)
        let d = desc + 16 * UInt64(head)
        put(output, at: d); put(length, at: d + 8); put(UInt16(2), at: d + 12); put(UInt16(0), at: d + 14)
        put(head, at: avail + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        put(availIdx, at: avail + 2)
        wr(notify, 2, 0)
    }

    func usedLength(_ i: UInt16) -> UInt32 { peek(UInt32.self, at: used + 4 + 8 * UInt64(i % size) + 4) }
}

@Suite struct EntropyDeviceTests {
    let ram = try! GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 1 << 20)

    @Test func fillsEveryWritableBufferWithFreshBytesOverPCI() throws {
        let h = PCIHarness()
        let t = VirtioPCITransport(device: VirtioEntropy(), ram: ram, intx: h.host.intx.line(slot: 2, pin: 1),
                                   name: "virtio-rng-pci", stateSection: "virtio-pci@00:02.0")
        try h.host.plug(t, slot: 2)
        #expect(h.cfg(2, 0) == 0x1044_1af4)                    // 1af4:1044, entropy
        var d = PCIVirtioDriver(h: h, slot: 2, ram: ram)
        #expect(d.bringUp() & UInt8(Virtio.Status.driverOK) != 0)
        d.postWritable(length: 64, output: 0x8006_0000)
        d.postWritable(length: 64, output: 0x8006_0100)
        #expect(d.usedIdx == 2)
        #expect(d.usedLength(0) == 64 && d.usedLength(1) == 64)
        let a = (0..<64).map { d.peek(UInt8.self, at: 0x8006_0000 + UInt64($0)) }
        let b = (0..<64).map { d.peek(UInt8.self, at: 0x8006_0100 + UInt64($0)) }
        // 64 random bytes are all zero, or two draws equal, with probability 2^-512.
        #expect(a != [UInt8](repeating: 0, count: 64))
        #expect(a != b)
        #expect(h.wires[2].isRaised)                            // slot 2, INTA -> wire 2 (PLIC 34 on virt)
    }
}
