/// Errors raised by the machine core, each with a message a user can act on.
public enum MachineError: Error, CustomStringConvertible, Equatable {
    case outOfHostMemory(requested: UInt64)
    case outsideRAM(address: GuestPhysicalAddress, length: UInt64)
    case overlappingRegion(name: String, region: GuestRegion, existing: String)
    case emptyRegion(name: String)
    case imageTooLarge(what: String, size: UInt64, room: UInt64)
    case invalidImage(what: String, reason: String)

    public var description: String {
        switch self {
        case .outOfHostMemory(let n): return "cannot allocate \(n) bytes of guest RAM on the host"
        case .outsideRAM(let a, let n): return "\(n) bytes at \(a) are not inside guest RAM"
        case .overlappingRegion(let name, let r, let other): return "device '\(name)' at \(r) overlaps '\(other)'"
        case .emptyRegion(let name): return "device '\(name)' has an empty MMIO region"
        case .imageTooLarge(let what, let size, let room):
            return "\(what) is \(size) bytes but only \(room) bytes of RAM are free for it"
        case .invalidImage(let what, let reason): return "\(what): \(reason)"
        }
    }
}
