/// Why a network backend could not be configured or changed; each message names the option
/// and what is wrong with it, in QEMU's words where QEMU has some.
public struct NetError: Error, Equatable, CustomStringConvertible {
    /// The message shown to the user.
    public var description: String
    /// Creates an error with its message.
    public init(_ description: String) { self.description = description }
}
