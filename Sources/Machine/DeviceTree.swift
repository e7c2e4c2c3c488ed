/// The value of a device-tree property, with its standard encodings (all big-endian).
public enum DeviceTreeValue: Sendable, Equatable {
    /// A property with no value (a boolean flag such as `interrupt-controller`).
    case empty
    /// 32-bit cells.
    case u32([UInt32])
    /// 64-bit values, each as two cells (high, low).
    case u64([UInt64])
    /// One NUL-terminated string.
    case string(String)
    /// A string list: NUL-terminated strings back to back.
    case strings([String])
    /// Raw bytes, stored as given.
    case bytes([UInt8])

    /// The property's value as it appears in the structure block (before padding).
    public var encoded: [UInt8] {
        switch self {
        case .empty: return []
        case .u32(let cells): return cells.flatMap { DeviceTree.bigEndian($0) }
        case .u64(let values): return values.flatMap { DeviceTree.bigEndian($0) }
        case .string(let s): return Array(s.utf8) + [0]
        case .strings(let list): return list.flatMap { Array($0.utf8) + [0] }
        case .bytes(let b): return b
        }
    }
}

/// One node of a device tree: a name ("cpu@0", "" for the root), ordered properties and
/// ordered children. A plain value, built on one thread and then flattened.
public struct DeviceTreeNode: Sendable, Equatable {
    /// The node name including any unit address.
    public var name: String
    /// Properties in the order they were first set; names are unique.
    public private(set) var properties: [(name: String, value: DeviceTreeValue)] = []
    /// Child nodes in insertion order.
    public var children: [DeviceTreeNode] = []

    /// Creates an empty node.
    public init(_ name: String) { self.name = name }

    /// Sets a property, replacing any earlier value of the same name in place.
    public mutating func set(_ name: String, _ value: DeviceTreeValue) {
        if let i = properties.firstIndex(where: { $0.name == name }) {
            properties[i].value = value
        } else {
            properties.append((name, value))
        }
    }

    /// Removes a property if present.
    public mutating func remove(_ name: String) { properties.removeAll { $0.name == name } }

    /// The value of a property, or nil.
    public func property(_ name: String) -> DeviceTreeValue? {
        properties.first { $0.name == name }?.value
    }

    /// Appends a child node.
    public mutating func add(_ child: DeviceTreeNode) { children.append(child) }

    /// The first child with exactly this name, or nil.
    public func child(_ name: String) -> DeviceTreeNode? { children.first { $0.name == name } }

    /// The node at a slash-separated path below this one ("soc/serial@10000000"), or nil.
    public func node(at path: String) -> DeviceTreeNode? {
        var n = self
        for part in path.split(separator: "/") {
            guard let c = n.child(String(part)) else { return nil }
            n = c
        }
        return n
    }

    /// Applies `body` to the node at `path` below this one, creating missing nodes on the way.
    public mutating func withNode<R>(at path: String, _ body: (inout DeviceTreeNode) throws -> R) rethrows -> R {
        let parts = path.split(separator: "/").map(String.init)
        return try Self.descend(&self, parts[...], body)
    }

    private static func descend<R>(_ n: inout DeviceTreeNode, _ parts: ArraySlice<String>,
                                   _ body: (inout DeviceTreeNode) throws -> R) rethrows -> R {
        guard let first = parts.first else { return try body(&n) }
        let i: Int
        if let found = n.children.firstIndex(where: { $0.name == first }) {
            i = found
        } else {
            n.children.append(DeviceTreeNode(first))
            i = n.children.count - 1
        }
        return try descend(&n.children[i], parts.dropFirst(), body)
    }

    public static func == (a: DeviceTreeNode, b: DeviceTreeNode) -> Bool {
        a.name == b.name && a.children == b.children && a.properties.count == b.properties.count
            && zip(a.properties, b.properties).allSatisfy { $0.name == $1.name && $0.value == $1.value }
    }
}

/// An entry of the memory reservation block: RAM the OS must not use.
public struct MemoryReservation: Sendable, Equatable {
    public var address: UInt64
    public var size: UInt64
    public init(address: UInt64, size: UInt64) {
        self.address = address
        self.size = size
    }
}

/// A device tree and its writer to the flattened (FDT/DTB) format, version 17, last compatible
/// version 16: a 40-byte header, the memory reservation block (8-byte aligned), the structure
/// block (4-byte aligned tokens) and the strings block (property names, de-duplicated).
/// A plain value; `flattened()` is pure.
public struct DeviceTree: Sendable, Equatable {
    /// FDT header magic.
    public static let magic: UInt32 = 0xD00D_FEED
    /// Format version written.
    public static let version: UInt32 = 17
    /// Oldest version a reader must understand to read the blob.
    public static let lastCompatibleVersion: UInt32 = 16
    static let headerSize = 40
    static let tokenBeginNode: UInt32 = 1, tokenEndNode: UInt32 = 2, tokenProp: UInt32 = 3, tokenEnd: UInt32 = 9

    /// The root node (its name is empty).
    public var root = DeviceTreeNode("")
    /// Memory reservation entries.
    public var reservations: [MemoryReservation] = []
    /// `boot_cpuid_phys` in the header.
    public var bootCPU: UInt32 = 0

    /// Creates an empty tree.
    public init() {}

    /// The tree in flattened form, ready to be copied into guest memory.
    public func flattened() -> [UInt8] {
        var strings: [UInt8] = []
        var stringOffsets: [String: UInt32] = [:]
        func nameOffset(_ name: String) -> UInt32 {
            if let off = stringOffsets[name] { return off }
            let off = UInt32(strings.count)
            strings += Array(name.utf8) + [0]
            stringOffsets[name] = off
            return off
        }

        var structure: [UInt8] = []
        func pad4() { while structure.count % 4 != 0 { structure.append(0) } }
        func emit(_ node: DeviceTreeNode) {
            structure += Self.bigEndian(Self.tokenBeginNode)
            structure += Array(node.name.utf8) + [0]
            pad4()
            for (name, value) in node.properties {
                let bytes = value.encoded
                structure += Self.bigEndian(Self.tokenProp)
                structure += Self.bigEndian(UInt32(bytes.count))
                structure += Self.bigEndian(nameOffset(name))
                structure += bytes
                pad4()
            }
            for child in node.children { emit(child) }
            structure += Self.bigEndian(Self.tokenEndNode)
        }
        emit(root)
        structure += Self.bigEndian(Self.tokenEnd)

        var reservationBlock: [UInt8] = []
        for r in reservations { reservationBlock += Self.bigEndian(r.address) + Self.bigEndian(r.size) }
        reservationBlock += [UInt8](repeating: 0, count: 16)

        let offReservations = Self.headerSize  // 40: already 8-byte aligned
        let offStructure = offReservations + reservationBlock.count
        let offStrings = offStructure + structure.count
        let total = offStrings + strings.count

        var blob: [UInt8] = []
        blob.reserveCapacity(total)
        for field in [Self.magic, UInt32(total), UInt32(offStructure), UInt32(offStrings), UInt32(offReservations),
                      Self.version, Self.lastCompatibleVersion, bootCPU, UInt32(strings.count), UInt32(structure.count)] {
            blob += Self.bigEndian(field)
        }
        blob += reservationBlock
        blob += structure
        blob += strings
        return blob
    }

    public static func bigEndian(_ v: UInt32) -> [UInt8] {
        [UInt8(v >> 24), UInt8(truncatingIfNeeded: v >> 16), UInt8(truncatingIfNeeded: v >> 8), UInt8(truncatingIfNeeded: v)]
    }

    public static func bigEndian(_ v: UInt64) -> [UInt8] {
        bigEndian(UInt32(v >> 32)) + bigEndian(UInt32(truncatingIfNeeded: v))
    }
}
