/// The host side of a network link (QEMU's netdev): user-mode NAT, a socket to another
/// machine, or nothing. Frames travel between it and one NIC (its `NetworkFrontend`).
///
/// Threading: every backend owns one thread (its event loop). Frames for the guest are handed
/// to the frontend on that thread, `send` must be called on it, and `perform` runs work there,
/// so a NIC drives its queues from the backend's thread and never from a vCPU thread waiting on
/// a socket. Every other member may be called from any thread.
public protocol NetworkBackend: AnyObject, Sendable {
    /// The netdev id ("n0").
    var id: String { get }
    /// QEMU's `info network` description of the backend ("user", "stream").
    var kind: String { get }
    /// One line describing the backend's current state for `info network`.
    var summary: String { get }
    /// Connects the NIC: frames for the guest now go to `frontend.receive`. Replaces any earlier one.
    func attach(_ frontend: any NetworkFrontend)
    /// Disconnects the NIC; frames for the guest are dropped until another one attaches.
    func detach()
    /// Runs `body` on the backend's thread; with `wait`, returns after it ran.
    func perform(wait: Bool, _ body: @escaping @Sendable () -> Void)
    /// Sends one Ethernet frame from the guest to the network. Backend thread only.
    func send(_ frame: UnsafeRawBufferPointer)
    /// The NIC has new receive buffers: frames held back for lack of room are offered again.
    /// Backend thread only.
    func receiveRoomAvailable()
    /// Whether the link is up (`set_link`); a backend whose link is down drops frames both ways.
    var linkUp: Bool { get set }
    /// Stops the thread and releases sockets. The backend is unusable afterwards.
    func close()
}

/// The guest side of a network link: a NIC receiving frames from its backend.
public protocol NetworkFrontend: AnyObject, Sendable {
    /// Offers one Ethernet frame to the guest, on the backend's thread. Returns false when the
    /// guest has no room for it now; the backend keeps the frame and offers it again after
    /// `NetworkBackend.receiveRoomAvailable()` (or drops it when its own queue is full).
    func receive(_ frame: UnsafeRawBufferPointer) -> Bool
}

/// A NIC's Ethernet address, written as QEMU writes it ("52:54:00:12:34:56"). The one parser
/// of MAC addresses: the description's `mac`, device_add's `mac` and the NIC itself use it.
public struct MACAddress: Sendable, Hashable, CustomStringConvertible {
    /// The six bytes, first on the wire first.
    public let bytes: [UInt8]

    /// Wraps six bytes.
    public init?(bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self.bytes = bytes
    }

    /// Parses six two-digit hex bytes separated by ':'; nil for anything else.
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var out: [UInt8] = []
        for p in parts {
            guard p.utf8.count == 2, p.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x66) }),
                  let b = UInt8(p, radix: 16) else { return nil }
            out.append(b)
        }
        bytes = out
    }

    /// Whether it is a group (multicast or broadcast) address, which a NIC cannot have.
    public var isMulticast: Bool { bytes[0] & 1 != 0 }

    /// QEMU's default for the NIC numbered `index`: 52:54:00:12:34:56 counting up in the last byte.
    public static func qemuDefault(index: Int) -> MACAddress {
        MACAddress(bytes: [0x52, 0x54, 0x00, 0x12, 0x34, UInt8(truncatingIfNeeded: 0x56 + index)])!
    }

    /// "52:54:00:12:34:56" (lower case).
    public var description: String {
        bytes.map { b in let s = String(b, radix: 16); return s.count == 1 ? "0" + s : s }.joined(separator: ":")
    }
}
