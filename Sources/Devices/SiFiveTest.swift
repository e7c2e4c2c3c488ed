import Machine

/// The SiFive test device ("sifive,test0/1") at 0x10_0000 on `virt`: the guest powers off or
/// resets the machine by writing a 16- or 32-bit value at offset 0 (OpenSBI uses 16-bit
/// stores; QEMU accepts 2- to 4-byte accesses).
///
/// Low 16 bits 0x5555 = pass (shutdown, exit code 0), 0x3333 = fail (shutdown, exit code in bits
/// 31:16), 0x7777 = reset; other values are ignored. Reads return 0. Stateless: any vCPU thread
/// may access it. Linux's syscon-poweroff/-reboot and OpenSBI's reset driver use it.
public final class SiFiveTest: MMIODevice, Sendable {
    /// Size of the register window on `virt`.
    public static let windowSize: UInt64 = 0x1000
    /// Command in the low 16 bits: fail, with an exit code in bits 31:16.
    public static let fail: UInt64 = 0x3333
    /// Command: pass (power off with exit code 0).
    public static let pass: UInt64 = 0x5555
    /// Command: reset.
    public static let reset: UInt64 = 0x7777

    public let name: String
    private let system: any SystemControl

    /// Creates the device; shutdown and reset requests go to `system`.
    public init(name: String = "test", system: any SystemControl) {
        self.name = name
        self.system = system
    }

    public func read(offset: UInt64, size: Int) -> UInt64 { 0 }

    public func write(offset: UInt64, size: Int, value: UInt64) {
        guard offset == 0, size >= 2 else { return }
        switch value & 0xFFFF {
        case Self.pass: system.requestShutdown(cause: .guestShutdown, exitCode: 0)
        case Self.fail:
            system.requestShutdown(cause: .guestShutdown, exitCode: Int32((value >> 16) & 0xFFFF))
        case Self.reset: system.requestReset(cause: .guestReset)
        default: break
        }
    }
}

// MARK: Lifecycle

extension SiFiveTest: StatefulDevice {
    /// The test device keeps no state: each write acts at once.
    public struct State: DeviceState {
        public static let version: UInt32 = 1
        public init() {}
        public func encode(to w: inout StateWriter) {}
        public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {}
    }

    public var stateSection: String { name }
    public func reset() {}
    public func captureState() -> State { State() }
    public func applyState(_ state: State) throws(SavedStateError) {}

    /// The syscon node the poweroff and reboot nodes point at (through `phandle`).
    public func deviceTreeNode(_ c: DeviceTreeContext) -> DeviceTreeNode? {
        var n = c.node("test")
        if let p = c.phandle { n.set("phandle", .u32([p])) }
        n.set("reg", c.reg)
        n.set("compatible", .strings(["sifive,test1", "sifive,test0", "syscon"]))
        return n
    }
}
