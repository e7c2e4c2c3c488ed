import Devices
import Foundation
import Machine
import Synchronization
import Testing
@testable import Board
import Translator

final class NullSystem: SystemControl {
    let shutdowns = Mutex<[Int32]>([])
    func requestShutdown(cause: ShutdownCause, exitCode: Int32) { shutdowns.withLock { $0.append(exitCode) } }
    func requestReset(cause: ShutdownCause) {}
}

/// A stand-in virtio transport that remembers what the board gave it.
final class FakeTransport: MMIODevice {
    let name: String
    let context: DeviceContext
    init(_ context: DeviceContext) {
        self.context = context
        name = "virtio\(context.irqNumber)"
    }
    func read(offset: UInt64, size: Int) -> UInt64 { offset == 0 ? 0x7472_6976 : 0 }
    func write(offset: UInt64, size: Int, value: UInt64) { if offset == 0x50 { context.irq.set(value != 0) } }
}

let qemuPath: String? = ["/usr/bin/qemu-system-riscv64"].first { FileManager.default.isExecutableFile(atPath: $0) }

struct VirtBoardTests {
    func config(memory: UInt64 = 256 * mib, cpus: Int = 1) -> BoardConfig {
        var c = BoardConfig()
        c.memorySize = memory
        c.cpuCount = cpus
        c.rngSeedBytes = 0
        return c
    }

    @Test func devicesSitAtQEMUAddresses() throws {
        let board = try VirtBoard(config: config(), system: NullSystem())
        let expected: [(UInt64, String)] = [(0x1000, "mrom"), (0x10_0000, "test"), (0x10_1000, "rtc"), (0x10_2000, "htif"),
                                            (0x200_0000, "clint"), (0xC00_0000, "plic"), (0x1000_0000, "uart0")]
        for (address, name) in expected {
            #expect(board.bus.lookup(GuestPhysicalAddress(address))?.device.name == name)
        }
        #expect(board.ram.base == GuestPhysicalAddress(0x8000_0000))
        #expect(board.ram.size == 256 * mib)
        #expect(board.hartInterrupts.count == 1)
    }

    @Test func deviceTreeDescribesHartsAndInterruptWiring() throws {
        var c = config(cpus: 2)
        c.kernelCommandLine = "console=ttyS0"
        let board = try VirtBoard(config: c, system: NullSystem())
        let root = board.deviceTree.root
        #expect(root.node(at: "cpus")?.property("timebase-frequency") == .u32([10_000_000]))
        let cpu1 = root.node(at: "cpus/cpu@1")
        #expect(cpu1?.property("riscv,isa") == .string(
            "rv64imafdc_zicbom_zicbop_zicboz_zicntr_zicond_zicsr_zifencei_zihintpause_zihpm_zfh_zfhmin_zba_zbb_zbc_zbs_sstc_svinval_svnapot_svpbmt"))
        #expect(cpu1?.property("riscv,isa-base") == .string("rv64i"))
        #expect(cpu1?.property("riscv,isa-extensions") == .strings(ISAExtensions.all.extensionList))
        #expect(cpu1?.property("riscv,cboz-block-size") == .u32([64]))
        #expect(cpu1?.property("mmu-type") == .string("riscv,sv48"))
        guard case .u32(let p0)? = root.node(at: "cpus/cpu@0/interrupt-controller")?.property("phandle"),
              case .u32(let p1)? = root.node(at: "cpus/cpu@1/interrupt-controller")?.property("phandle") else {
            Issue.record("cpu-intc phandles missing")
            return
        }
        #expect(root.node(at: "soc/clint@2000000")?.property("interrupts-extended") == .u32([p0[0], 3, p0[0], 7, p1[0], 3, p1[0], 7]))
        #expect(root.node(at: "soc/plic@c000000")?.property("interrupts-extended") == .u32([p0[0], 11, p0[0], 9, p1[0], 11, p1[0], 9]))
        #expect(root.node(at: "soc/plic@c000000")?.property("riscv,ndev") == .u32([0x60]))
        #expect(root.node(at: "soc/serial@10000000")?.property("interrupts") == .u32([10]))
        #expect(root.node(at: "soc/rtc@101000")?.property("interrupts") == .u32([11]))
        #expect(root.node(at: "chosen")?.property("bootargs") == .string("console=ttyS0"))
        #expect(root.node(at: "chosen")?.property("stdout-path") == .string("/soc/serial@10000000"))
        #expect(root.node(at: "memory@80000000")?.property("reg") == .u64([0x8000_0000, 256 * mib]))
        let virtio = root.node(at: "soc")!.children.filter { $0.name.hasPrefix("virtio_mmio@") }
        #expect(virtio.map(\.name) == (0..<8).reversed().map { "virtio_mmio@\(String(0x1000_1000 + $0 * 0x1000, radix: 16))" })
        #expect(root.node(at: "soc/virtio_mmio@10008000")?.property("interrupts") == .u32([8]))
        #expect(root.node(at: "soc")?.children.contains { $0.name.hasPrefix("htif") } == false)
    }

    @Test(.enabled(if: qemuPath != nil && dtcPath != nil, "qemu-system-riscv64 or dtc is not installed"))
    func deviceTreeMatchesQEMUsForTheDevicesWeBuild() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("virt-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let initrd = [UInt8](repeating: 0x42, count: 100_000)
        try Data(initrd).write(to: dir.appendingPathComponent("initrd"))
        let kernel = makeLinuxImage(fileSize: 8192, imageSize: 0x20_0000)
        try Data(kernel).write(to: dir.appendingPathComponent("Image"))
        let dtb = dir.appendingPathComponent("qemu.dtb").path
        let (status, _) = try runTool(qemuPath!, ["-M", "virt,dumpdtb=\(dtb)", "-m", "256M", "-smp", "1", "-nographic",
                                                  "-kernel", dir.appendingPathComponent("Image").path,
                                                  "-initrd", dir.appendingPathComponent("initrd").path,
                                                  "-append", "console=ttyS0 root=/dev/vda"])
        #expect(status == 0)
        let qemu = try FDTReader.parse([UInt8](try Data(contentsOf: URL(fileURLWithPath: dtb))))

        var c = config()
        c.firmware = .path(fwDynamicBin)
        c.kernel = .bytes(name: "Image", kernel)
        c.initrd = .bytes(name: "initrd", initrd)
        c.kernelCommandLine = "console=ttyS0 root=/dev/vda"
        let board = try VirtBoard(config: c, system: NullSystem())
        let ours = try FDTReader.parse(board.deviceTreeBlob)

        // The ISA differs from QEMU 7.2's rv64 CPU, which also predates riscv,isa-base,
        // riscv,isa-extensions and the cache-block sizes of Zicbop and Zicboz.
        let ignoredProperties: Set = ["riscv,isa", "riscv,isa-base", "riscv,isa-extensions", "riscv,cbom-block-size",
                                      "riscv,cboz-block-size", "riscv,cbop-block-size",
                                      "rng-seed", "linux,initrd-start", "linux,initrd-end"]
        func number(_ v: DeviceTreeValue?) -> UInt64? {
            guard case .bytes(let b)? = v else { return nil }
            return b.reduce(0) { $0 << 8 | UInt64($1) }
        }
        func compare(_ a: DeviceTreeNode, _ q: DeviceTreeNode, _ path: String) {
            for (name, value) in a.properties where !ignoredProperties.contains(name) {
                #expect(q.property(name) == value, "\(path)/\(name)")
            }
            for child in a.children {
                guard let qc = q.child(child.name) else {
                    Issue.record("QEMU has no node \(path)/\(child.name)")
                    continue
                }
                compare(child, qc, "\(path)/\(child.name)")
            }
        }
        compare(ours, qemu, "")
        // The other direction: QEMU nodes we do not build are only those for absent hardware.
        let absent: Set = ["pmu", "fw-cfg@10100000", "flash@20000000", "platform-bus@4000000", "pci@30000000"]
        for child in qemu.children where ours.child(child.name) == nil { #expect(absent.contains(child.name), "\(child.name)") }
        for child in qemu.child("soc")!.children where ours.child("soc")!.child(child.name) == nil {
            #expect(absent.contains(child.name), "soc/\(child.name)")
        }
        for name in ["linux,initrd-start", "linux,initrd-end"] {
            #expect(number(ours.child("chosen")?.property(name)) == number(qemu.child("chosen")?.property(name)), "\(name)")
        }
        #expect(board.deviceTreeAddress == GuestPhysicalAddress(0x8FE0_0000))
    }

    @Test func uartInterruptReachesTheHartThroughThePLIC() throws {
        let board = try VirtBoard(config: config(), system: NullSystem())
        let plic = VirtMemoryMap.plic.base
        board.bus.write(plic + 4 * 10, size: 4, value: 1)          // priority of UART0
        board.bus.write(plic + 0x2080, size: 4, value: 1 << 10)    // enable for hart 0 S-mode
        board.bus.write(VirtMemoryMap.uart0.base + 1, size: 1, value: 1)  // IER: receive data
        board.uart.receive([0x61])
        #expect(board.hartInterrupts[0].lines.load(ordering: .relaxed) & HartInterrupts.seip != 0)
        #expect(board.bus.read(plic + 0x20_1004, size: 4) == 10)   // claim
        #expect(board.bus.read(VirtMemoryMap.uart0.base, size: 1) == 0x61)
        board.bus.write(plic + 0x20_1004, size: 4, value: 10)      // complete
        #expect(board.hartInterrupts[0].lines.load(ordering: .relaxed) == 0)
    }

    @Test func virtioTransportsGetSlotsAndIRQsInOrder() throws {
        var c = config()
        c.virtioTransports = [{ FakeTransport($0) }, { FakeTransport($0) }]
        let board = try VirtBoard(config: c, system: NullSystem())
        let second = board.bus.lookup(GuestPhysicalAddress(0x1000_2000))?.device as? FakeTransport
        #expect(second?.context.irqNumber == 2)
        #expect(second?.context.region == GuestRegion(base: GuestPhysicalAddress(0x1000_2000), size: 0x1000))
        #expect(board.bus.read(GuestPhysicalAddress(0x1000_1000), size: 4) == 0x7472_6976)
        // Its line is PLIC source 2.
        board.bus.write(GuestPhysicalAddress(0x1000_2050), size: 4, value: 1)
        #expect(board.bus.read(VirtMemoryMap.plic.base + 0x1000, size: 4) == 1 << 2)
        // Hot-plug takes the next slot; unplug frees it.
        let slot = try board.attachVirtio { FakeTransport($0) }
        #expect(slot == 2)
        board.detachVirtio(slot: 0)
        #expect(board.bus.lookup(GuestPhysicalAddress(0x1000_1000))?.device is VirtioMMIOTransport)
        #expect(try board.attachVirtio { FakeTransport($0) } == 0)
    }

    @Test func tooManyTransportsOrBadSizesAreRefused() {
        var c = config()
        c.virtioTransports = Array(repeating: { FakeTransport($0) }, count: 9)
        #expect(throws: BoardError.self) { _ = try VirtBoard(config: c, system: NullSystem()) }
        #expect(throws: BoardError.self) { _ = try VirtBoard(config: config(memory: 1 * mib), system: NullSystem()) }
        #expect(throws: BoardError.self) { _ = try VirtBoard(config: config(cpus: 0), system: NullSystem()) }
    }

    @Test func bootLoadsTheDeviceTreeAndFirmwareInfo() throws {
        var c = config()
        c.firmware = .bytes(name: "fw", [0x73, 0, 0x50, 0x10])
        c.kernel = .bytes(name: "k", [1, 2, 3, 4])
        let board = try VirtBoard(config: c, system: NullSystem())
        let state = try board.loadBootImages()
        #expect(state.entry == GuestPhysicalAddress(0x8000_0000))
        #expect(state.deviceTreeAddress == GuestPhysicalAddress(0x8FE0_0000))
        #expect(try board.ram.read(state.deviceTreeAddress, count: 4) == [0xD0, 0x0D, 0xFE, 0xED])
        #expect(board.bus.read(state.firmwareInfoAddress, size: 8) == 0x4942_534F)
        #expect(board.bus.read(state.firmwareInfoAddress + 16, size: 8) == 0x8020_0000)
        #expect(try board.ram.read(GuestPhysicalAddress(0x8020_0000), count: 4) == [1, 2, 3, 4])
        board.bus.write(state.firmwareInfoAddress, size: 8, value: 0)  // ROM ignores writes
        #expect(board.bus.read(state.firmwareInfoAddress, size: 4) == 0x4942_534F)
    }

    @Test func resetRestoresDevicesAndImages() throws {
        var c = config()
        c.kernel = .bytes(name: "k", [9, 9])
        let board = try VirtBoard(config: c, system: NullSystem())
        try board.loadBootImages()
        board.bus.write(VirtMemoryMap.clint.base + 0x4000, size: 8, value: 5)
        try board.ram.write(Data([0, 0]), at: GuestPhysicalAddress(0x8000_0000))
        let state = try board.reset()
        #expect(state.entry == GuestPhysicalAddress(0x8000_0000))
        #expect(board.hartInterrupts[0].mtimecmp.load(ordering: .relaxed) == .max)
        #expect(try board.ram.read(GuestPhysicalAddress(0x8000_0000), count: 2) == [9, 9])
    }

    @Test func guestPowerOffReachesTheSystem() throws {
        let system = NullSystem()
        let board = try VirtBoard(config: config(), system: system)
        board.bus.write(VirtMemoryMap.test.base, size: 4, value: 0x5555)
        board.bus.write(VirtMemoryMap.htif.base, size: 8, value: (3 << 1) | 1)
        #expect(system.shutdowns.withLock { $0 } == [0, 3])
    }
}

struct VirtBoardMachineBoardTests {
    @Test func resetForBootGivesEveryHartItsIDAndTheSharedPointers() throws {
        var c = BoardConfig()
        c.memorySize = 128 * mib
        c.cpuCount = 2
        c.firmware = .bytes(name: "fw", [1, 2, 3, 4])
        let board = try VirtBoard(config: c, system: NullSystem())
        let vectors = try board.resetForBoot()
        #expect(vectors == [
            HartResetVector(entry: GuestPhysicalAddress(0x8000_0000), a0: 0, a1: 0x87E0_0000, a2: 0x1000),
            HartResetVector(entry: GuestPhysicalAddress(0x8000_0000), a0: 1, a1: 0x87E0_0000, a2: 0x1000),
        ])
        #expect(board.pressPowerButton() == false)
    }
}

/// Collects console output and stops the hart when the guest powers off.
final class GuestConsole: CharBackend, SystemControl {
    let id = "serial0", filename = "test", isConnected = true
    let output = Mutex<[UInt8]>([])
    let exitCode = Mutex<Int32?>(nil)
    let interrupts = Mutex<HartInterrupts?>(nil)
    func write(_ bytes: UnsafeRawBufferPointer) { output.withLock { $0.append(contentsOf: bytes) } }
    func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) {}
    func close() {}
    func requestShutdown(cause: ShutdownCause, exitCode code: Int32) {
        exitCode.withLock { $0 = code }
        interrupts.withLock { $0 }?.requestExit()
    }
    func requestReset(cause: ShutdownCause) { interrupts.withLock { $0 }?.requestExit() }
    var text: String { String(decoding: output.withLock { $0 }, as: UTF8.self) }
}

struct VirtBoardGuestTests {
    /// An S-mode "kernel": SBI system reset (SRST, shutdown), then spin.
    static let sbiShutdown: [UInt8] = [0xB7, 0x58, 0x52, 0x53, 0x9B, 0x88, 0x48, 0x35, 0x01, 0x48, 0x01, 0x45,
                                       0x81, 0x45, 0x73, 0x00, 0x00, 0x00, 0x01, 0xA0]

    @Test(.enabled(if: FileManager.default.fileExists(atPath: fwDynamicBin), "OpenSBI is not installed"))
    func openSBIBootsOnTheBoardAndPowersOffThroughTheTestDevice() throws {
        let console = GuestConsole()
        var c = BoardConfig()
        c.memorySize = 128 * mib
        c.firmware = .path(fwDynamicBin)
        c.kernel = .bytes(name: "sbi-shutdown", Self.sbiShutdown)
        c.serial = console
        let board = try VirtBoard(config: c, system: console)
        let hart = Hart(hartID: 0, ram: board.ram, bus: board.bus, interrupts: board.hartInterrupts[0], clock: board.clock)
        console.interrupts.withLock { $0 = board.hartInterrupts[0] }
        try board.resetForBoot()[0].apply(to: hart)
        let interrupts = board.hartInterrupts[0]
        let watchdog = Thread {
            Thread.sleep(forTimeInterval: 30)
            interrupts.requestExit()
        }
        watchdog.start()
        hart.run()
        watchdog.cancel()
        let text = console.text
        #expect(console.exitCode.withLock { $0 } == 0, "guest did not power off; console:\n\(text)")
        #expect(text.contains("Platform Console Device   : uart8250"))
        #expect(text.contains("Platform Timer Device     : aclint-mtimer @ 10000000Hz"))
        #expect(text.contains("Platform Shutdown Device  : sifive_test"))
        #expect(text.contains("Domain0 Next Address      : 0x0000000080200000"))
        #expect(text.contains("Domain0 Next Arg1         : 0x0000000087e00000"))
        #expect(text.contains("Domain0 Next Mode         : S-mode"))
    }
}

extension HartResetVector {
    /// Resets `cpu` to this vector.
    func apply(to cpu: any VirtualCPU) { cpu.reset(entry: entry, a0: a0, a1: a1, a2: a2) }
}
