import Machine

/// Why a chardev request failed, with QEMU's wording.
public enum ChardevRegistryError: Error, Equatable, CustomStringConvertible {
    /// No chardev has this id.
    case notFound(id: String)
    /// The chardev exists but is not a ring buffer.
    case notARingbuf(id: String)
    /// No device reads the ring buffer, so written input would go nowhere.
    case noReader(id: String)
    /// The guest has not yet taken `waiting` bytes written before, and `bytes` more do not fit
    /// beside them (the write is refused whole; nothing is dropped).
    case inputQueueFull(id: String, bytes: Int, waiting: Int)

    /// QEMU's message text where QEMU has one ("Device 'x' not found", "x is not a ringbuf
    /// device").
    public var description: String {
        switch self {
        case .notFound(let id): return "Device '\(id)' not found"
        case .notARingbuf(let id): return "\(id) is not a ringbuf device"
        case .noReader(let id): return "\(id) has no device reading it"
        case let .inputQueueFull(id, bytes, waiting):
            return "\(id): \(bytes) bytes do not fit: the guest has not yet read \(waiting) bytes written before"
        }
    }
}

/// The machine's character devices as QMP sees them (`query-chardev`, `ringbuf-read`,
/// `ringbuf-write`). Implemented by whoever builds the board (machine-server wires the Board's
/// chardevs behind it).
///
/// Any thread may call any method; QMP calls them on its command thread.
public protocol ChardevRegistry: AnyObject, Sendable {
    /// Every chardev, in creation order.
    func chardevs() -> [any CharBackend]
    /// Removes and returns up to `maxBytes` of guest output buffered in ring-buffer chardev `id`.
    func readRingbuf(id: String, maxBytes: Int) throws(ChardevRegistryError) -> [UInt8]
    /// Delivers `bytes` to the guest through ring-buffer chardev `id`, as if typed on the line.
    func writeRingbuf(id: String, bytes: [UInt8]) throws(ChardevRegistryError)
}
