/// The host side of a character device (a serial line): where guest output goes and where
/// guest input comes from. QEMU calls these chardevs.
///
/// Implementations live in `Board` (stdio, unix socket, TCP, file, ring buffer). `write` is
/// called on the vCPU thread and must not block on the network: a backend buffers or drops
/// (counting the drops) rather than stall the guest. Input is delivered on the backend's own
/// thread through the receiver installed with `setReceiver`.
public protocol CharBackend: AnyObject, Sendable {
    /// The chardev id, as `query-chardev` lists it ("serial0").
    var id: String { get }
    /// A QEMU-style filename for `query-chardev` ("stdio", "unix:/path,server=on", ...).
    var filename: String { get }
    /// Sends guest output to the host side.
    func write(_ bytes: UnsafeRawBufferPointer)
    /// Installs the function that receives host input bytes; replaces any earlier receiver.
    func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void)
    /// Installs the function a backend asks, before it reads more host input, how many bytes
    /// the receiver can take now (QEMU's `can_read`). A backend that supports it reads no more
    /// than that, and nothing while it is 0, so input waits in the host (socket buffers, then
    /// the peer) instead of being dropped. Called on the backend's thread; must not block.
    func setInputGate(_ room: @escaping @Sendable () -> Int)
    /// Tells the backend the receiver has room again after the gate said 0 (QEMU's
    /// `qemu_chr_fe_accept_input`). Any thread; must not block.
    func inputRoomAvailable()
    /// Whether a host peer is connected (always true for stdio and files).
    var isConnected: Bool { get }
    /// Stops the backend's threads and releases its resources (restores the terminal for stdio).
    func close()
}

extension CharBackend {
    /// Backends without flow control (files, stdio, ring buffers) ignore the gate.
    public func setInputGate(_ room: @escaping @Sendable () -> Int) {}
    /// Backends without flow control have nothing to resume.
    public func inputRoomAvailable() {}
}
