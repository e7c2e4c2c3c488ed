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
    /// Whether a host peer is connected (always true for stdio and files).
    var isConnected: Bool { get }
    /// Stops the backend's threads and releases its resources (restores the terminal for stdio).
    func close()
}
