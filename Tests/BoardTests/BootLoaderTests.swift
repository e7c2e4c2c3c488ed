import Foundation
import Machine
import Testing
@testable import Board

/// Builds a little-endian ELF64 RISC-V executable with the given PT_LOAD segments.
func makeELF(entry: UInt64, segments: [(vaddr: UInt64, paddr: UInt64, data: [UInt8], memsz: UInt64)],
             machine: UInt16 = 243) -> [UInt8] {
    func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    let phoff = 64, phentsize = 56
    var dataOffset = phoff + phentsize * segments.count
    var header: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
    header += le(UInt16(2)) + le(machine) + le(UInt32(1)) + le(entry) + le(UInt64(phoff)) + le(UInt64(0))
    header += le(UInt32(0)) + le(UInt16(64)) + le(UInt16(phentsize)) + le(UInt16(segments.count))
    header += le(UInt16(64)) + le(UInt16(0)) + le(UInt16(0))
    var phdrs: [UInt8] = [], payload: [UInt8] = []
    for s in segments {
        phdrs += le(UInt32(1)) + le(UInt32(7)) + le(UInt64(dataOffset)) + le(s.vaddr) + le(s.paddr)
        phdrs += le(UInt64(s.data.count)) + le(s.memsz) + le(UInt64(0x1000))
        payload += s.data
        dataOffset += s.data.count
    }
    return header + phdrs + payload
}

/// A fake Linux RISC-V Image: header with "RSC\x05" at 0x38 and the given image_size.
func makeLinuxImage(fileSize: Int, imageSize: UInt64) -> [UInt8] {
    var b = [UInt8](repeating: 0x13, count: fileSize)  // nops
    for i in 0..<8 { b[0x10 + i] = UInt8(truncatingIfNeeded: imageSize >> (8 * UInt64(i))) }
    b.replaceSubrange(0x30..<0x38, with: Array("RISCV\0\0\0".utf8))
    b.replaceSubrange(0x38..<0x3C, with: [0x52, 0x53, 0x43, 0x05])
    return b
}

let mib: UInt64 = 1 << 20
func ramRegion(_ size: UInt64) -> GuestRegion { GuestRegion(base: GuestPhysicalAddress(0x8000_0000), size: size) }
let fwDynamicBin = "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin"
let fwDynamicELF = "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.elf"

struct BootLoaderTests {
    @Test func firmwareThenKernelAtTwoMiBAndInitrdAt128MiBAbove() throws {
        let loader = try BootLoader(ram: ramRegion(256 * mib),
                                    firmware: .bytes(name: "fw.bin", [UInt8](repeating: 1, count: 300_000)),
                                    kernel: .bytes(name: "Image", makeLinuxImage(fileSize: 4096, imageSize: 0x10_0000)),
                                    initrd: .bytes(name: "initrd", [UInt8](repeating: 2, count: 1000)))
        #expect(loader.entry == GuestPhysicalAddress(0x8000_0000))
        #expect(loader.kernelEntry == GuestPhysicalAddress(0x8020_0000))
        #expect(loader.initrdRegion == GuestRegion(base: GuestPhysicalAddress(0x8820_0000), size: 1000))
        #expect(try loader.deviceTreeAddress(size: 0x2000) == GuestPhysicalAddress(0x8FE0_0000))
    }

    @Test func smallRAMPutsInitrdHalfwayAndNoFirmwareRunsKernelFirst() throws {
        let loader = try BootLoader(ram: ramRegion(64 * mib), firmware: nil,
                                    kernel: .bytes(name: "k", [0x6F, 0, 0, 0]),
                                    initrd: .bytes(name: "rd", [1, 2, 3]))
        #expect(loader.entry == GuestPhysicalAddress(0x8000_0000))
        #expect(loader.kernelEntry == GuestPhysicalAddress(0x8000_0000))
        #expect(loader.initrdRegion?.base == GuestPhysicalAddress(0x8000_0000 + 32 * mib))
    }

    @Test func deviceTreeStaysBelowThreeGiB() throws {
        let loader = try BootLoader(ram: ramRegion(4096 * mib), firmware: nil, kernel: nil, initrd: nil)
        #expect(try loader.deviceTreeAddress(size: 0x1800) == GuestPhysicalAddress(0xBFE0_0000))
        #expect(loader.entry == GuestPhysicalAddress(0x8000_0000))
    }

    @Test func fwDynamicInfoHasMagicVersionNextAddressAndSMode() throws {
        let loader = try BootLoader(ram: ramRegion(128 * mib), firmware: .bytes(name: "fw", [0, 0, 0, 0]),
                                    kernel: .bytes(name: "k", [1, 2, 3, 4]), initrd: nil)
        let info = loader.firmwareInfo
        func word(_ i: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(info[i * 8 + $1]) << (8 * UInt64($1)) } }
        #expect(info.count == 48)
        #expect(word(0) == 0x4942_534F)
        #expect(word(1) == 2)
        #expect(word(2) == 0x8020_0000)
        #expect(word(3) == 1)
        #expect(word(4) == 0 && word(5) == 0)
    }

    @Test func elfIsLoadedByProgramHeadersWithZeroedBSS() throws {
        let elf = makeELF(entry: 0xFFFF_FFFF_8000_0008, segments: [
            (0xFFFF_FFFF_8000_0000, 0x8020_0000, [1, 2, 3, 4], 0x10),
            (0xFFFF_FFFF_8010_0000, 0x8030_0000, [9, 9], 2),
        ])
        let loader = try BootLoader(ram: ramRegion(128 * mib), firmware: .bytes(name: "fw", [7]),
                                    kernel: .bytes(name: "vmlinux", elf), initrd: nil)
        // The virtual entry is translated through its segment.
        #expect(loader.kernelEntry == GuestPhysicalAddress(0x8020_0008))
        let ram = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 128 * mib)
        try ram.write(Data([UInt8](repeating: 0xEE, count: 32)), at: GuestPhysicalAddress(0x8020_0000))
        try loader.load(into: ram, deviceTree: [0xD0], at: GuestPhysicalAddress(0x87E0_0000))
        #expect(try ram.read(GuestPhysicalAddress(0x8020_0000), count: 17) == [1, 2, 3, 4] + [UInt8](repeating: 0, count: 12) + [0xEE])
        #expect(try ram.read(GuestPhysicalAddress(0x8030_0000), count: 2) == [9, 9])
        #expect(try ram.read(GuestPhysicalAddress(0x8000_0000), count: 1) == [7])
        #expect(try ram.read(GuestPhysicalAddress(0x87E0_0000), count: 1) == [0xD0])
    }

    @Test func loadingIsRepeatable() throws {
        let loader = try BootLoader(ram: ramRegion(32 * mib), firmware: nil, kernel: .bytes(name: "k", [5, 6, 7]),
                                    initrd: nil)
        let ram = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 32 * mib)
        try loader.load(into: ram, deviceTree: [1], at: GuestPhysicalAddress(0x81E0_0000))
        try ram.write(Data([0, 0, 0]), at: GuestPhysicalAddress(0x8000_0000))
        try loader.load(into: ram, deviceTree: [1], at: GuestPhysicalAddress(0x81E0_0000))
        #expect(try ram.read(GuestPhysicalAddress(0x8000_0000), count: 3) == [5, 6, 7])
    }

    @Test func linuxImageLargerThanRAMIsRefusedByName() {
        #expect {
            _ = try BootLoader(ram: ramRegion(32 * mib), firmware: .bytes(name: "fw", [1]),
                               kernel: .bytes(name: "Image-big", makeLinuxImage(fileSize: 128, imageSize: 64 * mib)),
                               initrd: nil)
        } throws: { e in
            guard case MachineError.imageTooLarge(let what, let size, _) = e else { return false }
            return what.contains("Image-big") && size == 64 * mib
        }
    }

    @Test func initrdTooLargeIsRefused() {
        #expect(throws: MachineError.self) {
            _ = try BootLoader(ram: ramRegion(16 * mib), firmware: nil, kernel: .bytes(name: "k", [1]),
                               initrd: .bytes(name: "rd", [UInt8](repeating: 0, count: Int(9 * mib))))
        }
    }

    @Test func initrdOverlappingTheDeviceTreeIsRefused() throws {
        let loader = try BootLoader(ram: ramRegion(16 * mib), firmware: nil, kernel: .bytes(name: "k", [1]),
                                    initrd: .bytes(name: "rd", [UInt8](repeating: 0, count: Int(7 * mib))))
        #expect(throws: BoardError.self) { _ = try loader.deviceTreeAddress(size: 0x1000) }
    }

    @Test func overlappingImagesAreRefusedNamingBoth() {
        let elf = makeELF(entry: 0x8000_0000, segments: [(0x8000_0000, 0x8000_0000, [1, 2], 2)])
        #expect {
            _ = try BootLoader(ram: ramRegion(64 * mib), firmware: .bytes(name: "fw.bin", [1, 2, 3]),
                               kernel: .bytes(name: "kernel.elf", elf), initrd: nil)
        } throws: { e in
            "\(e)".contains("fw.bin") && "\(e)".contains("kernel.elf")
        }
    }

    @Test func malformedELFsAreRefusedWithReasons() {
        let good = makeELF(entry: 0x8000_0000, segments: [(0x8000_0000, 0x8000_0000, [1], 1)])
        var truncated = good
        truncated.removeLast(30)  // program header cut short
        let wrongMachine = makeELF(entry: 0x8000_0000, segments: [(0x8000_0000, 0x8000_0000, [1], 1)], machine: 62)
        let outside = makeELF(entry: 0x1000, segments: [(0x1000, 0x1000, [1], 1)])
        let badEntry = makeELF(entry: 0x1234, segments: [(0x8000_0000, 0x8000_0000, [1], 1)])
        for (name, bytes, fragment) in [("trunc.elf", truncated, "outside the file"), ("x86.elf", wrongMachine, "not RISC-V"),
                                        ("low.elf", outside, "low.elf"), ("entry.elf", badEntry, "entry point"),
                                        ("tiny.elf", Array(good[0..<20]), "truncated")] {
            #expect(throws: MachineError.self) {
                _ = try BootLoader(ram: ramRegion(32 * mib), firmware: nil, kernel: .bytes(name: name, bytes), initrd: nil)
            }
            do {
                _ = try BootLoader(ram: ramRegion(32 * mib), firmware: nil, kernel: .bytes(name: name, bytes), initrd: nil)
            } catch {
                #expect("\(error)".contains(fragment), "\(name): \(error)")
                #expect("\(error)".contains(name), "\(name): \(error)")
            }
        }
    }

    @Test func unreadableFileIsNamed() {
        #expect(throws: BoardError.self) {
            _ = try BootLoader(ram: ramRegion(32 * mib), firmware: .path("/nonexistent/fw.bin"), kernel: nil, initrd: nil)
        }
        do {
            _ = try BootLoader(ram: ramRegion(32 * mib), firmware: .path("/nonexistent/fw.bin"), kernel: nil, initrd: nil)
        } catch {
            #expect("\(error)".contains("/nonexistent/fw.bin"))
        }
    }

    @Test(.enabled(if: FileManager.default.fileExists(atPath: fwDynamicELF), "OpenSBI is not installed"))
    func debiansOpenSBIELFLoadsAtDRAMBase() throws {
        let loader = try BootLoader(ram: ramRegion(128 * mib), firmware: .path(fwDynamicELF),
                                    kernel: .bytes(name: "k", [1]), initrd: nil)
        #expect(loader.entry == GuestPhysicalAddress(0x8000_0000))
        #expect(loader.kernelEntry == GuestPhysicalAddress(0x8020_0000))
        let ram = try GuestRAM(base: GuestPhysicalAddress(0x8000_0000), size: 128 * mib)
        try loader.load(into: ram, deviceTree: [0], at: GuestPhysicalAddress(0x87E0_0000))
        let raw = [UInt8](try Data(contentsOf: URL(fileURLWithPath: fwDynamicBin)))
        #expect(try ram.read(GuestPhysicalAddress(0x8000_0000), count: 256) == Array(raw[0..<256]))
    }
}
