/// Saved state: the plain, versioned values that devices and harts turn their live state into,
/// and the binary codec that writes them into sections of the machine-state stream.
///
/// A device's saved state is a value type apart from the live object (a `DeviceState`), with
/// its own version number, so one device can change its layout without breaking snapshots
/// of the others. Loading treats every byte as untrusted input: the reader checks every length
/// and the device validates every value before it touches its live state, and a refusal names
/// the device and the field.

/// Why a saved state was refused: the device (section), the field and what is wrong with it.
public struct SavedStateError: Error, Equatable, CustomStringConvertible {
    /// The section (device) being loaded, e.g. "uart0" or "hart0".
    public var section: String
    /// The field, e.g. "ier" or "queues[0].desc".
    public var field: String
    /// What is wrong, in words a user can act on.
    public var reason: String

    public init(section: String, field: String, reason: String) {
        self.section = section
        self.field = field
        self.reason = reason
    }

    public var description: String { "\(section): \(field): \(reason)" }
}

/// Writes saved-state values little-endian into a growing byte buffer. Not thread-safe.
public struct StateWriter {
    /// The bytes written so far.
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }
    public mutating func u16(_ v: UInt16) { put(v) }
    public mutating func u32(_ v: UInt32) { put(v) }
    public mutating func u64(_ v: UInt64) { put(v) }

    /// A count or length (written as u32; every saved collection is far below 4 Gi entries).
    public mutating func count(_ n: Int) {
        precondition(n >= 0 && n <= Int(UInt32.max), "saved collection too large")
        put(UInt32(n))
    }

    /// A length-prefixed byte string.
    public mutating func bytes(_ b: [UInt8]) {
        count(b.count)
        bytes.append(contentsOf: b)
    }

    /// Raw bytes of a buffer, length-prefixed.
    public mutating func bytes(_ b: UnsafeRawBufferPointer) {
        count(b.count)
        bytes.append(contentsOf: b)
    }

    /// A length-prefixed UTF-8 string.
    public mutating func string(_ s: String) { bytes(Array(s.utf8)) }

    /// An array of u64 values, length-prefixed.
    public mutating func u64s(_ a: [UInt64]) {
        count(a.count)
        for v in a { u64(v) }
    }

    /// An array of u32 values, length-prefixed.
    public mutating func u32s(_ a: [UInt32]) {
        count(a.count)
        for v in a { u32(v) }
    }

    /// An optional value: a presence byte, then the value.
    public mutating func optional<T>(_ v: T?, _ write: (inout StateWriter, T) -> Void) {
        bool(v != nil)
        if let v { write(&self, v) }
    }

    private mutating func put<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

/// Reads what a `StateWriter` wrote, checking every length against what is left. Every read
/// names its field, so a truncated or inconsistent section is refused with the field's name.
public struct StateReader {
    /// The section being read (for errors).
    public let section: String
    private let bytes: [UInt8]
    private var position = 0

    public init(section: String, bytes: [UInt8]) {
        self.section = section
        self.bytes = bytes
    }

    /// Bytes not yet read.
    public var remaining: Int { bytes.count - position }

    /// An error about `field` in this section.
    public func invalid(_ field: String, _ reason: String) -> SavedStateError {
        SavedStateError(section: section, field: field, reason: reason)
    }

    /// Refuses trailing bytes: a section must be consumed exactly.
    public func finish() throws(SavedStateError) {
        guard remaining == 0 else { throw invalid("(end)", "\(remaining) unexpected bytes after the last field") }
    }

    public mutating func u8(_ field: String) throws(SavedStateError) -> UInt8 {
        guard remaining >= 1 else { throw invalid(field, "the section ends before this field") }
        defer { position += 1 }
        return bytes[position]
    }

    public mutating func bool(_ field: String) throws(SavedStateError) -> Bool {
        switch try u8(field) {
        case 0: return false
        case 1: return true
        case let b: throw invalid(field, "\(b) is not a boolean")
        }
    }

    public mutating func u16(_ field: String) throws(SavedStateError) -> UInt16 { try get(field) }
    public mutating func u32(_ field: String) throws(SavedStateError) -> UInt32 { try get(field) }
    public mutating func u64(_ field: String) throws(SavedStateError) -> UInt64 { try get(field) }

    /// A count written by `StateWriter.count`, refused above `limit` (and above what the
    /// section could still hold at `minimumElementSize` bytes an element).
    public mutating func count(_ field: String, limit: Int, minimumElementSize: Int = 1) throws(SavedStateError) -> Int {
        let n = Int(try u32(field))
        guard n <= limit else { throw invalid(field, "count \(n) exceeds the limit \(limit)") }
        guard n * max(minimumElementSize, 0) <= remaining else {
            throw invalid(field, "count \(n) does not fit in the \(remaining) bytes left")
        }
        return n
    }

    public mutating func bytes(_ field: String, limit: Int) throws(SavedStateError) -> [UInt8] {
        let n = try count(field, limit: limit)
        defer { position += n }
        return Array(bytes[position..<position + n])
    }

    public mutating func string(_ field: String, limit: Int = 4096) throws(SavedStateError) -> String {
        let b = try bytes(field, limit: limit)
        guard let s = String(validating: b, as: UTF8.self) else { throw invalid(field, "not valid UTF-8") }
        return s
    }

    public mutating func u64s(_ field: String, limit: Int) throws(SavedStateError) -> [UInt64] {
        let n = try count(field, limit: limit, minimumElementSize: 8)
        var out = [UInt64]()
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try u64(field)) }
        return out
    }

    public mutating func u32s(_ field: String, limit: Int) throws(SavedStateError) -> [UInt32] {
        let n = try count(field, limit: limit, minimumElementSize: 4)
        var out = [UInt32]()
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try u32(field)) }
        return out
    }

    /// An array of exactly `expected` u64 values (a fixed-size register file).
    public mutating func u64s(_ field: String, exactly expected: Int) throws(SavedStateError) -> [UInt64] {
        let a = try u64s(field, limit: expected)
        guard a.count == expected else { throw invalid(field, "\(a.count) entries, expected \(expected)") }
        return a
    }

    public mutating func optional<T>(_ field: String, _ read: (inout StateReader) throws(SavedStateError) -> T)
        throws(SavedStateError) -> T? {
        try bool(field) ? try read(&self) : nil
    }

    private mutating func get<T: FixedWidthInteger>(_ field: String) throws(SavedStateError) -> T {
        let n = MemoryLayout<T>.size
        guard remaining >= n else { throw invalid(field, "the section ends before this field") }
        var v: T = 0
        withUnsafeMutableBytes(of: &v) { dst in
            bytes.withUnsafeBytes { src in dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[position..<position + n])) }
        }
        position += n
        return T(littleEndian: v)
    }
}

/// A device's saved state: a plain value with its own layout version.
///
/// `encode` writes the current version's layout; `init(from:version:)` reads any version the
/// type still understands (refusing others by name) and validates ranges that the live device
/// relies on. Values are compared in tests (a save, load, save round trip must be equal).
public protocol DeviceState: Equatable, Sendable {
    /// The layout version `encode` writes.
    static var version: UInt32 { get }
    /// Writes the state.
    func encode(to w: inout StateWriter)
    /// Reads a state written by `encode` of layout `version`.
    init(from r: inout StateReader, version: UInt32) throws(SavedStateError)
}

extension DeviceState {
    /// Refuses a layout version this build does not read.
    public static func check(version: UInt32, in r: StateReader) throws(SavedStateError) {
        guard version >= 1 && version <= Self.version else {
            throw r.invalid("(version)", "layout version \(version) is not supported (this build reads 1...\(Self.version))")
        }
    }
}

/// Where the board put a device and how it is wired, for the device's device-tree node.
public struct DeviceTreeContext: Sendable {
    /// The device's MMIO window.
    public var window: GuestRegion
    /// Its interrupt source number at the interrupt controller, if it has one.
    public var irq: Int?
    /// The interrupt controller's (the PLIC's) phandle.
    public var interruptParent: UInt32
    /// Each hart's `riscv,cpu-intc` phandle, in hart order.
    public var hartInterruptControllers: [UInt32]
    /// The phandle the board gave this device because other nodes refer to it, if any.
    public var phandle: UInt32?

    public init(window: GuestRegion, irq: Int?, interruptParent: UInt32, hartInterruptControllers: [UInt32],
                phandle: UInt32?) {
        self.window = window
        self.irq = irq
        self.interruptParent = interruptParent
        self.hartInterruptControllers = hartInterruptControllers
        self.phandle = phandle
    }

    /// A node named "BASE@ADDRESS" for this device's window.
    public func node(_ base: String) -> DeviceTreeNode {
        DeviceTreeNode("\(base)@\(String(window.base.raw, radix: 16))")
    }

    /// The `reg` property of the window (two address and two size cells).
    public var reg: DeviceTreeValue { .u64([window.base.raw, window.size]) }

    /// `interrupts` and `interrupt-parent` for the device's source, as QEMU writes them.
    public func setInterrupt(on node: inout DeviceTreeNode) {
        if let irq { node.set("interrupts", .u32([UInt32(irq)])) }
        node.set("interrupt-parent", .u32([interruptParent]))
    }
}

/// The lifecycle every device of a machine shares, driven by the board's device manager on the
/// machine's control thread while no hart is in guest code.
///
/// `quiesce` stops the device from touching guest RAM or raising interrupts on its own (in-flight
/// work is finished first); `resume` lets it go on, picking up work the guest queued meanwhile.
/// `saveState` and `loadState` are called only while quiesced.
public protocol ManagedDevice: AnyObject {
    /// The device's saved-state section name; unique within a machine and stable across builds
    /// (e.g. "uart0", "plic", "virtio-mmio@10008000").
    var stateSection: String { get }
    /// The layout version `saveState` writes.
    var stateVersion: UInt32 { get }
    /// Puts the device in its power-on state (system reset).
    func reset()
    /// Stops the device touching guest RAM; returns once in-flight work is done.
    func quiesce()
    /// Undoes `quiesce`.
    func resume()
    /// Writes the device's saved state.
    func saveState(to w: inout StateWriter)
    /// Replaces the live state with a saved one of layout `version`, validating it first;
    /// throws without changing anything when it is refused.
    func loadState(from r: inout StateReader, version: UInt32) throws(SavedStateError)
    /// The device's node for the guest's device tree, or nil for a device the guest does not
    /// find through it (HTIF). Called while the board builds the tree.
    func deviceTreeNode(_ context: DeviceTreeContext) -> DeviceTreeNode?
}

extension ManagedDevice {
    /// The error refusing `field` of this device's saved state.
    public func refusal(_ field: String, _ reason: String) -> SavedStateError {
        SavedStateError(section: stateSection, field: field, reason: reason)
    }

    /// Devices the guest finds otherwise have no node.
    public func deviceTreeNode(_ context: DeviceTreeContext) -> DeviceTreeNode? { nil }
}

/// A device whose saved state is one `DeviceState` value: it only captures and applies that
/// value; encoding, decoding and version checks come from here.
public protocol StatefulDevice: ManagedDevice {
    associatedtype State: DeviceState
    /// The current state as a value.
    func captureState() -> State
    /// Validates `state` against this device and applies it, or throws without changing anything.
    func applyState(_ state: State) throws(SavedStateError)
}

extension StatefulDevice {
    public var stateVersion: UInt32 { State.version }

    public func saveState(to w: inout StateWriter) { captureState().encode(to: &w) }

    public func loadState(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
        try State.check(version: version, in: r)
        let s = try State(from: &r, version: version)
        try r.finish()
        try applyState(s)
    }

    /// Devices without background work have nothing to quiesce.
    public func quiesce() {}
    public func resume() {}
}
