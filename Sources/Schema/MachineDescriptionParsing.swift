/// Why a machine description was refused; `description` names the field and what is wrong.
public enum MachineDescriptionError: Error, Equatable, CustomStringConvertible {
    /// The text is not JSON.
    case notJSON(JSONParseError)
    /// The file declares a format version this server does not know.
    case unsupportedVersion(found: Int64, supported: Int64)
    /// A member is missing, unknown, of the wrong type or out of range.
    case invalid(SchemaDecodingError)

    /// A message naming the problem, e.g. "devices[2].drive.format: expected one of raw, qcow2, got 'vmdk'".
    public var description: String {
        switch self {
        case .notJSON(let e): return "machine description is not valid JSON: \(e)"
        case .unsupportedVersion(let found, let supported):
            return found > supported
                ? "description version \(found) is newer than this server understands (\(supported))"
                : "description version \(found) is older than the oldest this server understands (1)"
        case .invalid(let e): return "machine description: \(e)"
        }
    }
}

extension MachineDescription {
    /// The newest description format version this server understands.
    public static let currentVersion: Int64 = 2

    /// Parses and checks a machine description.
    ///
    /// The version is checked first, so a newer file is refused for its version rather than for
    /// members it adds. Then every member is checked against the schema (unknown members,
    /// missing required members, wrong types, ranges such as cpus 1..8 and memory 16M..16G).
    public static func parse(jsonText: String) throws(MachineDescriptionError) -> MachineDescription {
        let value: JSONValue
        do {
            value = try JSONValue.parse(jsonText)
        } catch {
            throw .notJSON(error)
        }
        if case .int(let v)? = value["version"], v > currentVersion || v < 1 {
            throw .unsupportedVersion(found: v, supported: currentVersion)
        }
        do {
            return try MachineDescription(json: value, at: .root)
        } catch {
            throw .invalid(error)
        }
    }

    /// The guest RAM size in bytes (the `memory` member, already checked when decoded).
    public var memoryBytes: UInt64 {
        SchemaCheck.parseSize(memory) ?? 0
    }
}
