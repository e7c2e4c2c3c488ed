/// A guest physical address: what the CPU emits after translation and what the bus decodes.
///
/// A distinct type so that offsets, host pointers and guest addresses cannot be mixed up at an
/// API boundary. The hot path may unwrap `.raw` internally.
public struct GuestPhysicalAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    public var rawValue: UInt64 { raw }
    @inlinable public init(_ raw: UInt64) { self.raw = raw }
    @inlinable public init(rawValue: UInt64) { self.raw = rawValue }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.raw < b.raw }
    @inlinable public static func + (a: Self, b: UInt64) -> Self { Self(a.raw &+ b) }
    @inlinable public static func - (a: Self, b: Self) -> UInt64 { a.raw &- b.raw }
    public var description: String { "0x" + String(raw, radix: 16) }
}

/// A half-open range of guest physical addresses `[base, base + size)`.
public struct GuestRegion: Hashable, Sendable, CustomStringConvertible {
    public var base: GuestPhysicalAddress
    public var size: UInt64
    public init(base: GuestPhysicalAddress, size: UInt64) {
        self.base = base
        self.size = size
    }
    /// The first address past the region.
    public var end: GuestPhysicalAddress { base + size }
    public func contains(_ a: GuestPhysicalAddress) -> Bool { a.raw &- base.raw < size }
    public func overlaps(_ o: GuestRegion) -> Bool { base < o.end && o.base < end }
    public var description: String { "[\(base), \(end))" }
}
