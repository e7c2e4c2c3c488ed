import Machine

/// Turns RFB key events (X11 keysyms) into Linux key reports for a US keyboard layout.
///
/// A viewer sends the *symbol* the user typed, not the key. When the symbol needs a Shift state
/// different from the one the viewer has reported (an `A` or `>` arriving with no Shift held, as
/// on-screen keyboards and non-US clients do, or a `1` arriving with Shift held), the mapper wraps
/// the key press in a synthesized Shift press/release so the guest sees the intended character.
/// Letters take the guest's Caps Lock LED into account. One mapper per viewer; owned by the VNC
/// event thread (a plain value type, no locking).
public struct KeyMapper: Sendable {
    /// Linux codes of the Shift keys the viewer currently holds.
    public private(set) var heldShifts: Set<UInt16> = []
    /// Keys currently down, by the keysym that pressed them.
    public private(set) var pressed: [UInt32: UInt16] = [:]

    /// Creates a mapper with no key held.
    public init() {}

    /// How a keysym maps onto a US keyboard.
    public struct Mapping: Sendable, Equatable {
        /// The Linux key code.
        public var code: UInt16
        /// Whether the symbol needs Shift (true), needs no Shift (false), or does not care (nil,
        /// for modifiers, function and editing keys).
        public var shift: Bool?
        /// True for a-z / A-Z, whose case also depends on Caps Lock.
        public var isLetter: Bool
    }

    /// The mapping of one keysym, or nil when a US keyboard has no key for it.
    public static func mapping(for keysym: UInt32) -> Mapping? {
        switch keysym {
        case 0x61...0x7a: return Mapping(code: letterCodes[Int(keysym - 0x61)], shift: false, isLetter: true)
        case 0x41...0x5a: return Mapping(code: letterCodes[Int(keysym - 0x41)], shift: true, isLetter: true)
        default: break
        }
        if let (code, shift) = printable[keysym] { return Mapping(code: code, shift: shift, isLetter: false) }
        if let code = special[keysym] { return Mapping(code: code, shift: nil, isLetter: false) }
        return nil
    }

    /// The reports (each one guest input report) for a key event. Unknown keysyms give none.
    /// `capsLock` is the guest's Caps Lock LED state.
    public mutating func key(_ keysym: UInt32, down: Bool, capsLock: Bool = false) -> [[InputEvent]] {
        if !down {
            guard let code = pressed.removeValue(forKey: keysym) ?? Self.mapping(for: keysym)?.code else { return [] }
            if code == LinuxKey.leftShift || code == LinuxKey.rightShift { heldShifts.remove(code) }
            return [[.key(code: code, down: false)]]
        }
        guard let m = Self.mapping(for: keysym) else { return [] }
        if m.code == LinuxKey.leftShift || m.code == LinuxKey.rightShift { heldShifts.insert(m.code) }
        pressed[keysym] = m.code
        guard let wantShift = m.shift else { return [[.key(code: m.code, down: true)]] }
        let shiftActive = !heldShifts.isEmpty
        // For letters Caps Lock inverts the case the Shift key gives.
        let producesShifted = m.isLetter ? shiftActive != capsLock : shiftActive
        if producesShifted == wantShift { return [[.key(code: m.code, down: true)]] }
        let toggle: [UInt16] = shiftActive ? heldShifts.sorted() : [LinuxKey.leftShift]
        // Shift is held but must not be: release it around the key, then restore it.
        // Shift is not held but must be: press it around the key.
        let before = toggle.map { InputEvent.key(code: $0, down: !shiftActive) }
        let after = toggle.map { InputEvent.key(code: $0, down: shiftActive) }
        return [before, [.key(code: m.code, down: true)], after]
    }

    /// Key-up reports for every key still down (the viewer went away mid-press).
    public mutating func releaseAll() -> [[InputEvent]] {
        let codes = Set(pressed.values).sorted()
        pressed.removeAll()
        heldShifts.removeAll()
        return codes.isEmpty ? [] : [codes.map { .key(code: $0, down: false) }]
    }

    private static let letterCodes: [UInt16] = [
        30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17, 45, 21, 44,
    ]

    /// Printable ASCII other than letters: (Linux code, needs Shift).
    private static let printable: [UInt32: (UInt16, Bool)] = {
        var m: [UInt32: (UInt16, Bool)] = [:]
        let pairs: [(Character, Character, UInt16)] = [
            ("1", "!", 2), ("2", "@", 3), ("3", "#", 4), ("4", "$", 5), ("5", "%", 6), ("6", "^", 7),
            ("7", "&", 8), ("8", "*", 9), ("9", "(", 10), ("0", ")", 11), ("-", "_", 12), ("=", "+", 13),
            ("[", "{", 26), ("]", "}", 27), (";", ":", 39), ("'", "\"", 40), ("`", "~", 41), ("\\", "|", 43),
            (",", "<", 51), (".", ">", 52), ("/", "?", 53),
        ]
        for (plain, shifted, code) in pairs {
            m[UInt32(plain.asciiValue!)] = (code, false)
            m[UInt32(shifted.asciiValue!)] = (code, true)
        }
        m[0x20] = (LinuxKey.space, false)
        return m
    }()

    /// Keysyms whose key does not depend on Shift: modifiers, editing, function and keypad keys.
    private static let special: [UInt32: UInt16] = {
        var m: [UInt32: UInt16] = [
            0xff08: 14, 0xff09: 15, 0xfe20: 15, 0xff0d: 28, 0xff1b: 1, 0xffff: 111,  // BackSpace Tab ISO_Left_Tab Return Escape Delete
            0xff50: 102, 0xff51: 105, 0xff52: 103, 0xff53: 106, 0xff54: 108, 0xff55: 104, 0xff56: 109,
            0xff57: 107, 0xff63: 110, 0xff61: 99, 0xff15: 99, 0xff14: 70, 0xff13: 119, 0xff6b: 119, 0xff67: 127,
            0xff7f: 69, 0xffe1: 42, 0xffe2: 54, 0xffe3: 29, 0xffe4: 97, 0xffe5: 58, 0xffe7: 125, 0xffe8: 126,
            0xffe9: 56, 0xffea: 100, 0xffeb: 125, 0xffec: 126, 0xfe03: 100, 0xff7e: 100,
            // Keypad.
            0xffb0: 82, 0xffb1: 79, 0xffb2: 80, 0xffb3: 81, 0xffb4: 75, 0xffb5: 76, 0xffb6: 77, 0xffb7: 71,
            0xffb8: 72, 0xffb9: 73, 0xffae: 83, 0xffab: 78, 0xffad: 74, 0xffaa: 55, 0xffaf: 98, 0xff8d: 96,
            0xffbd: 117, 0xffac: 121, 0xff95: 71, 0xff96: 75, 0xff97: 72, 0xff98: 77, 0xff99: 80, 0xff9a: 73,
            0xff9b: 81, 0xff9c: 79, 0xff9d: 76, 0xff9e: 82, 0xff9f: 83,
            // XF86 media and power keys.
            0x1008ff2a: 116, 0x1008ff10: 142, 0x1008ff2b: 143, 0x1008ff12: 113, 0x1008ff11: 114, 0x1008ff13: 115,
        ]
        for i in 0..<10 { m[0xffbe + UInt32(i)] = 59 + UInt16(i) }  // F1-F10
        m[0xffc8] = 87  // F11
        m[0xffc9] = 88  // F12
        for i in 0..<12 { m[0xffca + UInt32(i)] = 183 + UInt16(i) }  // F13-F24
        return m
    }()
}

/// Turns RFB pointer events (pixel position plus button mask) into absolute-tablet reports.
///
/// Positions are scaled from `[0, width - 1]` to `[0, 0x7fff]`; the RFB mask bits are left (0),
/// middle (1), right (2), wheel up (3), wheel down (4), wheel left (5), wheel right (6). Owned by
/// the VNC event thread.
public struct PointerMapper: Sendable {
    /// The mask of the previous event.
    public private(set) var buttons: UInt8 = 0
    private var lastPosition: (Int, Int)? = nil

    /// Creates a mapper with no button down.
    public init() {}

    private static let order: [InputButton] = [.left, .middle, .right, .wheelUp, .wheelDown, .wheelLeft, .wheelRight]

    /// Scales a pixel coordinate on an axis `size` pixels long to the absolute range.
    public static func scale(_ v: Int, size: Int) -> Int {
        guard size > 1 else { return 0 }
        let c = min(max(v, 0), size - 1)
        return c * InputEvent.absoluteMax / (size - 1)
    }

    /// The report for one pointer event on a `width` x `height` screen; empty when nothing changed.
    public mutating func pointer(x: Int, y: Int, buttonMask: UInt8, width: Int, height: Int) -> [InputEvent] {
        var out: [InputEvent] = []
        let ax = Self.scale(x, size: width), ay = Self.scale(y, size: height)
        if lastPosition.map({ $0 != (ax, ay) }) ?? true {
            out.append(.absolute(.x, value: ax))
            out.append(.absolute(.y, value: ay))
            lastPosition = (ax, ay)
        }
        let changed = buttons ^ buttonMask
        for (bit, b) in Self.order.enumerated() where changed & (1 << bit) != 0 {
            out.append(.button(b, down: buttonMask & (1 << bit) != 0))
        }
        buttons = buttonMask
        return out
    }

    /// Releases every button still down (the viewer went away).
    public mutating func releaseAll() -> [InputEvent] {
        var out: [InputEvent] = []
        for (bit, b) in Self.order.enumerated() where buttons & (1 << bit) != 0 { out.append(.button(b, down: false)) }
        buttons = 0
        return out
    }
}
