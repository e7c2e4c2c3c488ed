import Schema

/// The QMP protocol for one connection, as a pure state machine: bytes in, actions out.
///
/// It splits the byte stream into messages, parses them, checks the request envelope and the
/// command arguments against the schema, enforces capability negotiation, and decides what to
/// send. Running a command is left to the caller (`Action.execute`), which must then send
/// `QMPSession.reply(id:result:)`. No sockets, threads or clocks: tested in memory.
///
/// A value type owned by one connection's I/O thread.
public struct QMPSession: Sendable {
    /// Something the connection must do, in order.
    public enum Action: Sendable, Equatable {
        /// Send this message (the transport appends CRLF).
        case send(JSONValue)
        /// Run this checked command, then send `reply(id:result:)` with this id.
        case execute(id: JSONValue?, command: QMPCommand)
        /// Close the connection after everything before this action was sent.
        case close
    }

    /// True once `qmp_capabilities` has succeeded; only then are events sent.
    public private(set) var negotiated = false
    private var splitter: JSONStreamSplitter

    /// Creates the session for a new connection; send `greeting` first.
    public init(maxMessageSize: Int = 4 << 20) {
        splitter = JSONStreamSplitter(maxMessageSize: maxMessageSize)
    }

    /// The greeting message: `{"QMP": {"version": ..., "capabilities": []}}`. No capability is
    /// advertised (out-of-band execution is not implemented).
    public static func greeting(version: VersionInfo) -> JSONValue {
        ["QMP": ["version": version.json, "capabilities": []]]
    }

    /// A reply: `{"return": value}` or `{"error": {...}}`, with `id` copied when present.
    public static func reply(id: JSONValue?, result: Result<JSONValue, QMPError>) -> JSONValue {
        var o = JSONObject()
        switch result {
        case .success(let v): o["return"] = v
        case .failure(let e): o["error"] = e.json
        }
        if let id { o["id"] = id }
        return .object(o)
    }

    /// An event message with the given wall-clock time.
    public static func eventMessage(_ event: QMPEvent, seconds: Int64, microseconds: Int64) -> JSONValue {
        var o = JSONObject()
        o["event"] = .string(event.name)
        if let d = event.data { o["data"] = d }
        o["timestamp"] = ["seconds": .int(seconds), "microseconds": .int(microseconds)]
        return .object(o)
    }

    /// Consumes bytes from the client and returns what to do, in order.
    public mutating func receive(_ bytes: some Sequence<UInt8>) -> [Action] {
        var actions: [Action] = []
        for out in splitter.feed(bytes) {
            switch out {
            case .message(let text):
                actions.append(handle(text))
            case .error(let description):
                // As QEMU: answer the bad input and keep reading (the splitter has resynchronized).
                actions.append(.send(QMPSession.reply(id: nil, result: .failure(QMPError(.genericError, description)))))
            }
        }
        return actions
    }

    private mutating func handle(_ text: [UInt8]) -> Action {
        let value: JSONValue
        do {
            value = try JSONValue.parse(text)
        } catch {
            return fail(nil, QMPError(.genericError, "JSON parse error, \(error.message)"))
        }
        guard case .object(let request) = value else {
            return fail(nil, QMPError(.genericError, "QMP input must be a JSON object"))
        }
        let id = request["id"]
        var command: String?
        var arguments = JSONObject()
        for m in request {
            switch m.key {
            case "id": continue
            case "execute":
                guard case .string(let s) = m.value else {
                    return fail(id, QMPError(.genericError, "QMP input member 'execute' must be a string"))
                }
                command = s
            case "arguments":
                guard case .object(let a) = m.value else {
                    return fail(id, QMPError(.genericError, "QMP input member 'arguments' must be an object"))
                }
                arguments = a
            default:
                return fail(id, QMPError(.genericError, "QMP input member '\(m.key)' is unexpected"))
            }
        }
        guard let command else { return fail(id, QMPError(.genericError, "QMP input lacks member 'execute'")) }

        if command == "qmp_capabilities" {
            if negotiated {
                return fail(id, QMPError(.commandNotFound, "Capabilities negotiation is already complete, command ignored"))
            }
            let args: QmpCapabilitiesArguments
            do {
                args = try QmpCapabilitiesArguments(json: .object(arguments), at: .root)
            } catch {
                return fail(id, QMPError.from(error))
            }
            if let cap = args.enable?.first {
                return fail(id, QMPError(.genericError, "Capability '\(cap.rawValue)' not available"))
            }
            negotiated = true
            return .send(QMPSession.reply(id: id, result: .success(.object(JSONObject()))))
        }
        guard negotiated else {
            return fail(id, QMPError(.commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'"))
        }
        do {
            guard let decoded = try QMPCommand.decode(name: command, arguments: arguments) else {
                return fail(id, QMPError(.commandNotFound, "The command \(command) has not been found"))
            }
            return .execute(id: id, command: decoded)
        } catch {
            return fail(id, QMPError.from(error))
        }
    }

    private func fail(_ id: JSONValue?, _ error: QMPError) -> Action {
        .send(QMPSession.reply(id: id, result: .failure(error)))
    }
}
