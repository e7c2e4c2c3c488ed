import Machine
import Synchronization

/// A PCI function as the host bridge sees it: its configuration space and the BARs it decodes.
///
/// The host calls these on the vCPU thread that made the access (ECAM or a BAR in one of the
/// board's PCI windows); the function serializes its own state. A function sees offsets only:
/// `barRead(index:offset:size:)` gets the offset inside BAR `index`, never a bus address.
public protocol PCIFunction: AnyObject, Sendable {
    /// Name for logs ("virtio-blk-pci 00:01.0").
    var name: String { get }
    /// Reads `size` (1, 2 or 4) bytes of configuration space at `offset` (0..<4096).
    func configRead(offset: Int, size: Int) -> UInt32
    /// Writes configuration space through the function's write mask.
    func configWrite(offset: Int, size: Int, value: UInt32)
    /// The BARs the function declares, by register index.
    var barDescriptors: [Int: PCIBarDescriptor] { get }
    /// Where BAR `index` decodes now (from the driver's assignment and the command register), or nil.
    func barAddress(_ index: Int) -> UInt64?
    /// Reads inside BAR `index` at `offset` (below the BAR's size).
    func barRead(index: Int, offset: UInt64, size: Int) -> UInt64
    /// Writes inside BAR `index` at `offset`.
    func barWrite(index: Int, offset: UInt64, size: Int, value: UInt64)
}

/// The four INTx wires of a host bridge, each driving one PLIC source, shared by every function
/// whose swizzled pin lands on it: a wire is high while any function holds it high.
///
/// Any thread; the levels sit behind a `Mutex`, and the PLIC line is driven under it so two
/// functions never race a wire's level.
public final class PCIIntxRouter: Sendable {
    private let wires: [any InterruptLine]
    private let counts: Mutex<[Int]>

    /// Creates a router over `wires` (INTA…INTD of the host's interrupt map: PLIC 32…35 on `virt`).
    public init(wires: [any InterruptLine]) {
        precondition(wires.count == 4, "a PCI host has four INTx wires")
        self.wires = wires
        counts = Mutex(Array(repeating: 0, count: 4))
    }

    /// The wire a device in `slot` raising `pin` (1 = INTA … 4 = INTD) drives: the standard
    /// swizzle (pin − 1 + slot) mod 4, as QEMU's `virt` interrupt map lists it.
    public static func wire(slot: Int, pin: Int) -> Int { (pin - 1 + slot) % 4 }

    /// A line for one function's INTx output in `slot` on `pin`.
    public func line(slot: Int, pin: Int) -> any InterruptLine {
        PCIIntxLine(router: self, wire: Self.wire(slot: slot, pin: pin))
    }

    fileprivate func adjust(wire: Int, by delta: Int) {
        counts.withLock { c in
            c[wire] += delta
            wires[wire].set(c[wire] > 0)
        }
    }

    /// Whether `wire` is high (tests).
    public func level(wire: Int) -> Bool { counts.withLock { $0[wire] > 0 } }
}

/// One function's INTx output: remembers its own level so that setting it twice counts once.
final class PCIIntxLine: InterruptLine {
    private let router: PCIIntxRouter
    private let wire: Int
    private let high = Mutex(false)

    init(router: PCIIntxRouter, wire: Int) {
        self.router = router
        self.wire = wire
    }

    func set(_ level: Bool) {
        high.withLock { h in
            guard h != level else { return }
            h = level
            router.adjust(wire: wire, by: level ? 1 : -1)
        }
    }
}
