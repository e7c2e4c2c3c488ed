/// Cuts a byte stream into complete top-level JSON texts without needing separators, with
/// QEMU's JSON lexer and streamer behaviour (qobject/json-lexer.c, json-streamer.c).
///
/// QMP clients write one object after another with no newline in between, sometimes split
/// across reads. A lexer with QEMU's states turns bytes into tokens; the streamer counts
/// braces and brackets and hands each complete top-level value on for parsing (a top-level
/// scalar or a stray closing bracket is a value of its own, so the parser reports it).
///
/// Errors, as QEMU reports them:
/// - a byte no token can start or continue (a control character inside a string, `01`,
///   `%`, `\xFF`) ends the message in progress with `JSON parse error, stray '<token>'`; the
///   lexer then skips input up to the next structural character (`{ } [ ]`), control
///   character or `\xFE`/`\xFF`, and carries on from there, so the next well-formed request
///   is answered;
/// - a message whose tokens exceed `maxMessageSize` bytes or `maxTokens` tokens, or that nests
///   deeper than `maxDepth`, ends with `JSON token size limit exceeded`, `JSON token count
///   limit exceeded` or `JSON nesting depth limit exceeded`; the rest of that message is then
///   skipped until its brackets balance (what current QEMU does; QEMU 7.2 instead re-lexed
///   the rest as new messages and answered each with an error).
///
/// Memory is bounded: at most `maxMessageSize` bytes of tokens (plus one separator byte per
/// token) are kept, and a single token longer than that is not stored while it is skipped.
///
/// A value type owned by one connection; not shared between threads.
public struct JSONStreamSplitter: Sendable {
    /// One result of feeding bytes.
    public enum Output: Sendable, Equatable {
        /// The bytes of one complete top-level JSON text, lexically valid (not yet parsed).
        case message([UInt8])
        /// The input in progress was refused; the text is QEMU's error description.
        case error(String)
    }

    /// The most token bytes one message may have (QEMU: 64 MiB).
    public let maxMessageSize: Int
    /// The deepest accepted nesting of arrays and objects (QEMU: 1024).
    public let maxDepth: Int
    /// The most tokens one message may have (QEMU: 2 Mi).
    public let maxTokens: Int

    /// Lexer states (QEMU's IN_* states for the non-interpolating start state).
    private enum LexState: UInt8, Sendable {
        case start, recovery, whitespace, keyword
        case dqString, dqEscape, sqString, sqEscape
        case zero, sign, digits, mantissa, mantissaDigits, expE, expSign, expDigits
    }

    private enum TokenKind: Sendable { case lcurly, rcurly, lsquare, rsquare, other }

    /// What one byte does in one state.
    private enum Step {
        case to(LexState)
        /// A token ends; `lookahead` means the byte was not part of it.
        case token(TokenKind, lookahead: Bool)
        /// Whitespace ends (the byte is looked at again from `start`).
        case skip
        /// Recovery ends (the byte is looked at again from `start`).
        case resync
        /// No token can continue with this byte; it belongs to the bad token.
        case error
    }

    private var state = LexState.start
    private var token: [UInt8] = []
    private var tokenTooLong = false
    private var message: [UInt8] = []
    private var tokenBytes = 0
    private var tokenCount = 0
    private var braces = 0
    private var brackets = 0
    /// After a limit error: tokens are dropped until the brackets balance.
    private var discarding = false
    /// Whitespace (or skipped input) came after the last token: the message keeps one space
    /// there, so that the parser sees `[1 2]` and not `[12]`.
    private var spaceBefore = false

    /// Creates a splitter with the given limits (defaults: 4 MiB of tokens, depth 1024 and
    /// 2 Mi tokens like QEMU).
    public init(maxMessageSize: Int = 4 << 20, maxDepth: Int = 1024, maxTokens: Int = 2 << 20) {
        self.maxMessageSize = maxMessageSize
        self.maxDepth = maxDepth
        self.maxTokens = maxTokens
    }

    /// True when bytes of an unfinished message are buffered.
    public var hasPartialMessage: Bool {
        !message.isEmpty || !token.isEmpty || (state != .start && state != .recovery && state != .whitespace)
    }

    /// Consumes bytes and returns every text and error completed by them, in order.
    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [Output] {
        var out: [Output] = []
        for b in bytes {
            var consumed = false
            while !consumed {
                switch Self.step(state, b) {
                case .to(let next):
                    consumed = true
                    if next == .recovery {
                        state = .recovery  // skipped input is not kept
                    } else {
                        append(b)
                        state = next
                    }
                case .token(let kind, let lookahead):
                    consumed = !lookahead
                    if consumed { append(b) }
                    endToken(kind, &out)
                    state = .start
                case .skip, .resync:
                    token.removeAll(keepingCapacity: true)
                    spaceBefore = true
                    state = .start
                case .error:
                    consumed = true
                    append(b)
                    lexicalError(&out)
                    state = .recovery
                }
            }
        }
        return out
    }

    private mutating func append(_ b: UInt8) {
        if token.count < maxMessageSize { token.append(b) } else { tokenTooLong = true }
    }

    private mutating func endToken(_ kind: TokenKind, _ out: inout [Output]) {
        defer {
            token.removeAll(keepingCapacity: true)
            tokenTooLong = false
            spaceBefore = false
        }
        switch kind {
        case .lcurly: braces += 1
        case .rcurly: braces -= 1
        case .lsquare: brackets += 1
        case .rsquare: brackets -= 1
        case .other: break
        }
        if discarding {
            if braces <= 0 && brackets <= 0 { endMessage() }
            return
        }
        let limit: String?
        if tokenTooLong || tokenBytes + token.count + 1 > maxMessageSize {
            limit = "JSON token size limit exceeded"
        } else if tokenCount + 1 > maxTokens {
            limit = "JSON token count limit exceeded"
        } else if braces + brackets > maxDepth {
            limit = "JSON nesting depth limit exceeded"
        } else {
            limit = nil
        }
        if let limit {
            out.append(.error(limit))
            if braces <= 0 && brackets <= 0 {
                endMessage()
            } else {
                // Skip the rest of this message: keep counting brackets, keep nothing else.
                message.removeAll()
                tokenBytes = 0
                tokenCount = 0
                discarding = true
            }
            return
        }
        if spaceBefore && !message.isEmpty { message.append(0x20) }  // keeps adjacent scalars apart
        message += token
        tokenBytes += token.count
        tokenCount += 1
        if (braces > 0 || brackets > 0) && braces >= 0 && brackets >= 0 { return }
        out.append(.message(message))
        endMessage()
    }

    private mutating func lexicalError(_ out: inout [Output]) {
        if !discarding {
            out.append(.error("JSON parse error, stray '\(String(decoding: token, as: UTF8.self))'"))
        }
        token.removeAll(keepingCapacity: true)
        tokenTooLong = false
        endMessage()
    }

    /// Forgets the message in progress (not the lexer state).
    private mutating func endMessage() {
        message.removeAll(keepingCapacity: message.count <= 64 << 10)
        tokenBytes = 0
        tokenCount = 0
        braces = 0
        brackets = 0
        discarding = false
    }

    private static func isDigit(_ b: UInt8) -> Bool { b >= 0x30 && b <= 0x39 }

    /// QEMU's lexer table, one state at a time.
    private static func step(_ s: LexState, _ b: UInt8) -> Step {
        switch s {
        case .start:
            switch b {
            case UInt8(ascii: "\""): return .to(.dqString)
            case UInt8(ascii: "'"): return .to(.sqString)
            case UInt8(ascii: "0"): return .to(.zero)
            case UInt8(ascii: "1")...UInt8(ascii: "9"): return .to(.digits)
            case UInt8(ascii: "-"): return .to(.sign)
            case UInt8(ascii: "{"): return .token(.lcurly, lookahead: false)
            case UInt8(ascii: "}"): return .token(.rcurly, lookahead: false)
            case UInt8(ascii: "["): return .token(.lsquare, lookahead: false)
            case UInt8(ascii: "]"): return .token(.rsquare, lookahead: false)
            case UInt8(ascii: ","), UInt8(ascii: ":"): return .token(.other, lookahead: false)
            case UInt8(ascii: "a")...UInt8(ascii: "z"): return .to(.keyword)
            case 0x20, 0x09, 0x0D, 0x0A: return .to(.whitespace)
            default: return .error
            }
        case .recovery:
            switch b {
            case 0x09: return .to(.recovery)
            case 0x00...0x1F, 0xFE, 0xFF: return .resync
            case UInt8(ascii: "{"), UInt8(ascii: "}"), UInt8(ascii: "["), UInt8(ascii: "]"): return .resync
            default: return .to(.recovery)
            }
        case .whitespace:
            switch b {
            case 0x20, 0x09, 0x0D, 0x0A: return .to(.whitespace)
            default: return .skip
            }
        case .keyword:
            return b >= UInt8(ascii: "a") && b <= UInt8(ascii: "z") ? .to(.keyword) : .token(.other, lookahead: true)
        case .dqString, .sqString:
            guard b >= 0x20 && b <= 0xFD else { return .error }
            let quote = s == .dqString ? UInt8(ascii: "\"") : UInt8(ascii: "'")
            if b == UInt8(ascii: "\\") { return .to(s == .dqString ? .dqEscape : .sqEscape) }
            if b == quote { return .token(.other, lookahead: false) }
            return .to(s)
        case .dqEscape, .sqEscape:
            guard b >= 0x20 && b <= 0xFD else { return .error }
            return .to(s == .dqEscape ? .dqString : .sqString)
        case .zero:
            if isDigit(b) { return .error }
            if b == UInt8(ascii: ".") { return .to(.mantissa) }
            return .token(.other, lookahead: true)
        case .sign:
            if b == UInt8(ascii: "0") { return .to(.zero) }
            if isDigit(b) { return .to(.digits) }
            return .error
        case .digits:
            if isDigit(b) { return .to(.digits) }
            if b == UInt8(ascii: "e") || b == UInt8(ascii: "E") { return .to(.expE) }
            if b == UInt8(ascii: ".") { return .to(.mantissa) }
            return .token(.other, lookahead: true)
        case .mantissa:
            return isDigit(b) ? .to(.mantissaDigits) : .error
        case .mantissaDigits:
            if isDigit(b) { return .to(.mantissaDigits) }
            if b == UInt8(ascii: "e") || b == UInt8(ascii: "E") { return .to(.expE) }
            return .token(.other, lookahead: true)
        case .expE:
            if b == UInt8(ascii: "-") || b == UInt8(ascii: "+") { return .to(.expSign) }
            return isDigit(b) ? .to(.expDigits) : .error
        case .expSign:
            return isDigit(b) ? .to(.expDigits) : .error
        case .expDigits:
            return isDigit(b) ? .to(.expDigits) : .token(.other, lookahead: true)
        }
    }
}
