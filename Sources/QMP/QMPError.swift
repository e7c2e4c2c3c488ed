import Machine
import Schema

/// A QMP error class and message: the `error` member of a reply.
public struct QMPError: Error, Equatable, CustomStringConvertible {
    /// QEMU's error classes.
    public enum ErrorClass: String, Sendable {
        /// Every error without a more specific class.
        case genericError = "GenericError"
        /// The command does not exist (or is not allowed before negotiation).
        case commandNotFound = "CommandNotFound"
        /// A device exists but is not active.
        case deviceNotActive = "DeviceNotActive"
        /// A device does not exist.
        case deviceNotFound = "DeviceNotFound"
    }

    /// The class.
    public var errorClass: ErrorClass
    /// The human-readable description.
    public var desc: String

    /// Creates an error.
    public init(_ errorClass: ErrorClass, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    /// "Class: desc".
    public var description: String { "\(errorClass.rawValue): \(desc)" }

    /// The `{"class": ..., "desc": ...}` object.
    public var json: JSONValue { ["class": .string(errorClass.rawValue), "desc": .string(desc)] }

    /// Maps any error a command raised to its QMP class and message. This is the one place
    /// where module errors become wire errors.
    public static func from(_ error: any Error) -> QMPError {
        switch error {
        case let e as QMPError: return e
        case let e as SchemaDecodingError: return QMPError(.genericError, e.qmpDescription)
        case let e as ChardevRegistryError: return QMPError(.genericError, e.description)
        case let e as DeviceRegistryError: return QMPError(.deviceNotFound, e.description)
        case let e as HotPlugError: return QMPError(e.errorClass, e.description)
        case let e as DisplayError: return QMPError(.genericError, e.description)
        case let e as JSONParseError: return QMPError(.genericError, "JSON parse error, \(e)")
        default: return QMPError(.genericError, String(describing: error))
        }
    }
}
