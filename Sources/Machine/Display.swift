import Foundation
import Synchronization

// The meeting point of the guest's screen and input devices (in `Devices`) with the servers that
// show them to people (`VNC`) or drive them by command (`QMP`). Both sides depend only on this file.
//
// Threads: the GPU publishes surfaces and dirty rectangles on the vCPU thread that kicked its
// queue; listeners must return quickly and never block on a socket. Input arrives from server
// threads and is pushed into the input devices' queues by the sinks themselves.

// MARK: - Pixels

/// A 32-bit pixel layout. Names give the byte order in memory, as virtio-gpu's formats do
/// (`b8g8r8x8` stores blue first; it is what Linux calls XRGB8888 on a little-endian guest).
public enum PixelFormat: String, Sendable, CaseIterable {
    case b8g8r8a8, b8g8r8x8, a8r8g8b8, x8r8g8b8, r8g8b8a8, x8b8g8r8, a8b8g8r8, r8g8b8x8

    /// Byte offsets of red, green and blue inside one 4-byte pixel.
    public var channelOffsets: (red: Int, green: Int, blue: Int) {
        switch self {
        case .b8g8r8a8, .b8g8r8x8: return (2, 1, 0)
        case .a8r8g8b8, .x8r8g8b8: return (1, 2, 3)
        case .r8g8b8a8, .r8g8b8x8: return (0, 1, 2)
        case .x8b8g8r8, .a8b8g8r8: return (3, 2, 1)
        }
    }

    /// Bytes per pixel; every supported format has four.
    public static let bytesPerPixel = 4
}

/// A rectangle in display pixels. Width and height are never negative.
public struct DisplayRect: Hashable, Sendable, CustomStringConvertible {
    public var x: Int
    public var y: Int
    public var width: Int
    public var height: Int

    /// Creates a rectangle; negative sizes are treated as empty.
    public init(x: Int, y: Int, width: Int, height: Int) {
        self.x = x
        self.y = y
        self.width = max(0, width)
        self.height = max(0, height)
    }

    /// True when the rectangle covers no pixel.
    public var isEmpty: Bool { width == 0 || height == 0 }

    /// The part of this rectangle inside `[0, width) x [0, height)`; empty when none is.
    public func clipped(width w: Int, height h: Int) -> DisplayRect {
        let x0 = max(0, x), y0 = max(0, y)
        let x1 = min(w, x &+ width), y1 = min(h, y &+ height)
        if x1 <= x0 || y1 <= y0 { return DisplayRect(x: 0, y: 0, width: 0, height: 0) }
        return DisplayRect(x: x0, y: y0, width: x1 - x0, height: y1 - y0)
    }

    /// The smallest rectangle that covers both (an empty operand is ignored).
    public func union(_ o: DisplayRect) -> DisplayRect {
        if isEmpty { return o }
        if o.isEmpty { return self }
        let x0 = min(x, o.x), y0 = min(y, o.y)
        let x1 = max(x + width, o.x + o.width), y1 = max(y + height, o.y + o.height)
        return DisplayRect(x: x0, y: y0, width: x1 - x0, height: y1 - y0)
    }

    public var description: String { "\(width)x\(height)+\(x)+\(y)" }
}

/// Host memory holding pixels, freed when the last reference goes away.
///
/// The GPU writes into it on the vCPU thread while readers (VNC, screendump) copy out of it on
/// their own threads; a reader may see a half-updated frame (like a real scanout) but never
/// freed memory, because it holds a reference for as long as it reads.
public final class PixelBuffer: @unchecked Sendable {  // unchecked: a raw pixel allocation read and written concurrently on purpose (a scanout), freed only by deinit
    /// Start of the pixel memory; valid for the object's life.
    public let bytes: UnsafeMutableRawPointer
    /// Size of the memory in bytes.
    public let count: Int

    /// Allocates `count` zeroed bytes, or returns nil when the host cannot provide them.
    public init?(count: Int) {
        guard count > 0, let p = calloc(count, 1) else { return nil }
        bytes = p
        self.count = count
    }

    deinit { free(bytes) }
}

/// What the guest scans out: a `width` x `height` window of a pixel buffer.
///
/// Invariant: `offset + (height - 1) * stride + width * 4 <= buffer.count`, checked by `init`.
public struct DisplaySurface: Sendable {
    /// The memory the pixels live in.
    public let buffer: PixelBuffer
    /// Byte offset of pixel (0, 0) inside `buffer`.
    public let offset: Int
    /// Visible width and height in pixels.
    public let width: Int
    public let height: Int
    /// Bytes from one row to the next.
    public let stride: Int
    /// Layout of each pixel.
    public let format: PixelFormat

    /// Creates a surface, or nil when the window does not fit in the buffer.
    public init?(buffer: PixelBuffer, offset: Int = 0, width: Int, height: Int, stride: Int, format: PixelFormat) {
        guard width > 0, height > 0, offset >= 0, stride >= width * 4 else { return nil }
        let (last, o1) = (height - 1).multipliedReportingOverflow(by: stride)
        guard !o1, offset + last + width * 4 <= buffer.count else { return nil }
        self.buffer = buffer
        self.offset = offset
        self.width = width
        self.height = height
        self.stride = stride
        self.format = format
    }

    /// The red, green and blue values of pixel (x, y); (0, 0, 0) outside the surface.
    public func rgb(x: Int, y: Int) -> (UInt8, UInt8, UInt8) {
        guard x >= 0, y >= 0, x < width, y < height else { return (0, 0, 0) }
        let p = buffer.bytes + offset + y * stride + x * 4
        let o = format.channelOffsets
        return (p.load(fromByteOffset: o.red, as: UInt8.self), p.load(fromByteOffset: o.green, as: UInt8.self),
                p.load(fromByteOffset: o.blue, as: UInt8.self))
    }

    /// Copies the rectangle `rect` (clipped to the surface) into `destination`, whose rows are
    /// `destinationStride` bytes apart, converting every pixel to `destinationFormat`.
    /// `destination` addresses pixel (0, 0) of a buffer at least as large as the surface.
    public func copy(_ rect: DisplayRect, to destination: UnsafeMutableRawPointer, destinationStride: Int,
                     destinationFormat: PixelFormat) {
        let r = rect.clipped(width: width, height: height)
        if r.isEmpty { return }
        for row in r.y..<(r.y + r.height) {
            let src = buffer.bytes + offset + row * stride + r.x * 4
            let dst = destination + row * destinationStride + r.x * 4
            if destinationFormat == format {
                dst.copyMemory(from: src, byteCount: r.width * 4)
                continue
            }
            let s = format.channelOffsets, d = destinationFormat.channelOffsets
            for i in 0..<r.width {
                let sp = src + i * 4, dp = dst + i * 4
                dp.storeBytes(of: 0, as: UInt32.self)
                dp.storeBytes(of: sp.load(fromByteOffset: s.red, as: UInt8.self), toByteOffset: d.red, as: UInt8.self)
                dp.storeBytes(of: sp.load(fromByteOffset: s.green, as: UInt8.self), toByteOffset: d.green, as: UInt8.self)
                dp.storeBytes(of: sp.load(fromByteOffset: s.blue, as: UInt8.self), toByteOffset: d.blue, as: UInt8.self)
            }
        }
    }
}

// MARK: - Input

/// A pointer button, with QEMU's `InputButton` names.
public enum InputButton: String, Sendable, CaseIterable {
    case left, middle, right
    case wheelUp = "wheel-up", wheelDown = "wheel-down", wheelLeft = "wheel-left", wheelRight = "wheel-right"
    case side, extra
}

/// A pointer axis, with QEMU's `InputAxis` names.
public enum InputAxis: String, Sendable, CaseIterable {
    case x, y
}

/// One input event as the guest's input devices understand it. A batch of events given to
/// `InputSink.handle` is one report: the device appends the synchronisation marker itself.
public enum InputEvent: Sendable, Equatable {
    /// A key (Linux `KEY_*` code, see `LinuxKey`) goes down or up.
    case key(code: UInt16, down: Bool)
    /// A pointer button goes down or up. Wheel "buttons" scroll one notch when pressed.
    case button(InputButton, down: Bool)
    /// Absolute pointer position on an axis, from `InputEvent.absoluteMin` to `absoluteMax`
    /// across the whole screen (QEMU's range).
    case absolute(InputAxis, value: Int)
    /// Relative pointer motion on an axis.
    case relative(InputAxis, delta: Int)

    /// Smallest absolute coordinate.
    public static let absoluteMin = 0
    /// Largest absolute coordinate.
    public static let absoluteMax = 0x7fff
}

/// Something that feeds input events to the guest: a virtio-input device.
///
/// `handle` is called on any thread (VNC's event thread, QMP's) and must not block; a device
/// whose queue has no free buffers drops the report and counts it.
public protocol InputSink: AnyObject, Sendable {
    /// Delivers one report. Events the device has no use for (a key to a tablet) are ignored.
    func handle(_ events: [InputEvent])
}

/// Keyboard LED state as the guest last set it (through the input device's status queue).
public struct KeyboardLEDs: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let numLock = KeyboardLEDs(rawValue: 1 << 0)
    public static let capsLock = KeyboardLEDs(rawValue: 1 << 1)
    public static let scrollLock = KeyboardLEDs(rawValue: 1 << 2)
}

// MARK: - The display hub

/// Receives what the guest shows. Called on the publishing (vCPU) thread: must return quickly
/// and never block on I/O; servers queue the work for their own thread.
public protocol DisplayListener: AnyObject, Sendable {
    /// The scanout changed: new mode, new buffer, or nil when the guest disabled it.
    func displaySurfaceChanged(_ surface: DisplaySurface?)
    /// Pixels inside `rect` (in surface coordinates, clipped to it) changed.
    func displayRegionUpdated(_ rect: DisplayRect)
}

/// One guest display (a scanout) and the input devices that belong with it.
///
/// The GPU publishes with `setSurface` / `update`; servers subscribe with `addListener` and send
/// input with `sendInput`. All methods are thread-safe; listeners run outside the internal lock.
public final class Display: Sendable {
    /// A name for logs and QMP (`"video0"`, like QEMU's console ids).
    public let id: String
    /// The mode the display starts in before the guest sets one (QEMU's default for virtio-gpu).
    public let preferredWidth: Int
    public let preferredHeight: Int

    private struct State {
        var surface: DisplaySurface?
        var listeners: [ObjectIdentifier: any DisplayListener] = [:]
        var sinks: [ObjectIdentifier: any InputSink] = [:]
        var leds = KeyboardLEDs()
        var updates: UInt64 = 0
    }
    private let state = Mutex(State())

    /// Creates a display with no surface yet.
    public init(id: String = "video0", preferredWidth: Int = 1280, preferredHeight: Int = 800) {
        self.id = id
        self.preferredWidth = preferredWidth
        self.preferredHeight = preferredHeight
    }

    /// The surface currently scanned out, if the guest enabled one.
    public var surface: DisplaySurface? { state.withLock { $0.surface } }

    /// Number of `update` calls so far (dirty rectangles published), for tests and statistics.
    public var updateCount: UInt64 { state.withLock { $0.updates } }

    /// Publishes a new scanout (or nil to disable it); listeners are told at once.
    public func setSurface(_ surface: DisplaySurface?) {
        let ls = state.withLock { s in
            s.surface = surface
            return Array(s.listeners.values)
        }
        for l in ls { l.displaySurfaceChanged(surface) }
    }

    /// Publishes a changed rectangle of the current surface; dropped when it misses the surface.
    public func update(_ rect: DisplayRect) {
        let (ls, r): ([any DisplayListener], DisplayRect) = state.withLock { s in
            guard let surf = s.surface else { return ([], rect) }
            s.updates &+= 1
            return (Array(s.listeners.values), rect.clipped(width: surf.width, height: surf.height))
        }
        if r.isEmpty { return }
        for l in ls { l.displayRegionUpdated(r) }
    }

    /// Subscribes a listener (held strongly until removed).
    public func addListener(_ l: any DisplayListener) {
        state.withLock { $0.listeners[ObjectIdentifier(l)] = l }
    }

    /// Unsubscribes a listener.
    public func removeListener(_ l: any DisplayListener) {
        _ = state.withLock { $0.listeners.removeValue(forKey: ObjectIdentifier(l)) }
    }

    /// Attaches an input device; every `sendInput` reaches every attached sink.
    public func addInputSink(_ s: any InputSink) {
        state.withLock { $0.sinks[ObjectIdentifier(s)] = s }
    }

    /// Detaches an input device (hot-unplug).
    public func removeInputSink(_ s: any InputSink) {
        _ = state.withLock { $0.sinks.removeValue(forKey: ObjectIdentifier(s)) }
    }

    /// True when at least one input device is attached.
    public var hasInput: Bool { state.withLock { !$0.sinks.isEmpty } }

    /// Sends one input report to every attached device.
    public func sendInput(_ events: [InputEvent]) {
        if events.isEmpty { return }
        let sinks = state.withLock { Array($0.sinks.values) }
        for s in sinks { s.handle(events) }
    }

    /// The keyboard LEDs as the guest last set them.
    public var keyboardLEDs: KeyboardLEDs {
        get { state.withLock { $0.leds } }
        set { state.withLock { $0.leds = newValue } }
    }

    /// An image of the current screen in `format` (what QMP `screendump` writes).
    /// Throws `DisplayError.noSurface` when the guest has not enabled a scanout.
    public func screendump(format: ScreendumpFormat) throws -> Data {
        guard let s = surface else { throw DisplayError.noSurface(display: id) }
        return ImageEncoder.encode(s, as: format)
    }

    /// Writes `screendump(format:)` to a file, replacing it.
    public func screendump(to path: String, format: ScreendumpFormat) throws {
        let data = try screendump(format: format)
        do {
            try data.write(to: URL(fileURLWithPath: path))
        } catch {
            throw DisplayError.cannotWrite(path: path, reason: error.localizedDescription)
        }
    }
}

/// Image formats `screendump` produces, with QEMU's `ImageFormat` names.
public enum ScreendumpFormat: String, Sendable, CaseIterable {
    /// Binary PPM (P6), 8 bits per channel.
    case ppm
    /// PNG, 8-bit RGB, zlib stream of stored (uncompressed) deflate blocks.
    case png
}

/// Errors from the display layer, with messages a user can act on.
public enum DisplayError: Error, CustomStringConvertible, Equatable {
    case noSurface(display: String)
    case cannotWrite(path: String, reason: String)

    public var description: String {
        switch self {
        case .noSurface(let d): return "display '\(d)' has no surface: the guest has not set a video mode yet"
        case .cannotWrite(let p, let r): return "cannot write screendump to '\(p)': \(r)"
        }
    }
}

/// The remote-display server as QMP sees it (query-vnc, set_password, expire_password), so that
/// QMP does not depend on the VNC module. Implemented by `VNC.VNCServer`; thread-safe.
public protocol RemoteDisplayServer: AnyObject, Sendable {
    /// What `query-vnc` reports.
    func info() -> RemoteDisplayInfo
    /// Sets the password (VNC uses the first 8 bytes). Throws when password authentication is
    /// not enabled on this server (QEMU refuses the same way).
    func setPassword(_ password: String) throws
    /// Makes the password invalid from `date` on (nil: never expires). Throws like `setPassword`.
    func expirePassword(at date: Date?) throws
}

/// `query-vnc`'s answer.
public struct RemoteDisplayInfo: Sendable, Equatable {
    /// One connected viewer.
    public struct Client: Sendable, Equatable {
        public var host: String
        public var service: String
        public var family: String
        public var websocket: Bool
        public init(host: String, service: String, family: String, websocket: Bool) {
            self.host = host
            self.service = service
            self.family = family
            self.websocket = websocket
        }
    }
    public var enabled: Bool
    /// Listening address, port (as a string) and family ("ipv4", "ipv6").
    public var host: String
    public var service: String
    public var family: String
    /// "none" or "vnc".
    public var auth: String
    public var clients: [Client]
    public init(enabled: Bool, host: String, service: String, family: String, auth: String, clients: [Client]) {
        self.enabled = enabled
        self.host = host
        self.service = service
        self.family = family
        self.auth = auth
        self.clients = clients
    }
}

// MARK: - Image encoding

/// PPM and PNG writers for `screendump`. PNG uses stored deflate blocks (no compression), so it
/// needs no zlib: a 1280x800 screen is about 3 MB, the price of having no dependency here.
public enum ImageEncoder {
    /// Encodes the visible part of `surface`.
    public static func encode(_ surface: DisplaySurface, as format: ScreendumpFormat) -> Data {
        let w = surface.width, h = surface.height
        var rgb = [UInt8](repeating: 0, count: w * h * 3)
        let o = surface.format.channelOffsets
        for y in 0..<h {
            let row = surface.buffer.bytes + surface.offset + y * surface.stride
            for x in 0..<w {
                let p = row + x * 4, i = (y * w + x) * 3
                rgb[i] = p.load(fromByteOffset: o.red, as: UInt8.self)
                rgb[i + 1] = p.load(fromByteOffset: o.green, as: UInt8.self)
                rgb[i + 2] = p.load(fromByteOffset: o.blue, as: UInt8.self)
            }
        }
        switch format {
        case .ppm:
            var d = Data("P6\n\(w) \(h)\n255\n".utf8)
            d.append(contentsOf: rgb)
            return d
        case .png:
            return png(width: w, height: h, rgb: rgb)
        }
    }

    /// A PNG of 8-bit RGB pixels, rows top to bottom.
    static func png(width: Int, height: Int, rgb: [UInt8]) -> Data {
        var raw = [UInt8]()
        raw.reserveCapacity((width * 3 + 1) * height)
        for y in 0..<height {
            raw.append(0)  // filter type None
            raw.append(contentsOf: rgb[(y * width * 3)..<((y + 1) * width * 3)])
        }
        // zlib stream: header, stored blocks of at most 65535 bytes, Adler-32.
        var z: [UInt8] = [0x78, 0x01]
        var pos = 0
        repeat {
            let n = min(65535, raw.count - pos)
            let final: UInt8 = pos + n == raw.count ? 1 : 0
            z.append(final)
            z.append(UInt8(n & 0xff)); z.append(UInt8(n >> 8))
            z.append(UInt8(~n & 0xff)); z.append(UInt8((~n >> 8) & 0xff))
            z.append(contentsOf: raw[pos..<(pos + n)])
            pos += n
        } while pos < raw.count
        z.append(contentsOf: bigEndian(adler32(raw)))

        var ihdr = bigEndian(UInt32(width)) + bigEndian(UInt32(height))
        ihdr += [8, 2, 0, 0, 0]  // depth 8, colour type RGB, deflate, adaptive filter, no interlace
        var out = Data([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])
        for (type, body) in [("IHDR", ihdr), ("IDAT", z), ("IEND", [])] {
            let t = Array(type.utf8)
            out.append(contentsOf: bigEndian(UInt32(body.count)))
            out.append(contentsOf: t)
            out.append(contentsOf: body)
            out.append(contentsOf: bigEndian(crc32(t + body)))
        }
        return out
    }

    private static func bigEndian(_ v: UInt32) -> [UInt8] {
        [UInt8(v >> 24), UInt8((v >> 16) & 0xff), UInt8((v >> 8) & 0xff), UInt8(v & 0xff)]
    }

    /// Adler-32 as zlib defines it.
    public static func adler32(_ data: [UInt8]) -> UInt32 {
        var a: UInt32 = 1, b: UInt32 = 0
        var i = 0
        while i < data.count {
            let end = min(data.count, i + 5552)
            while i < end {
                a &+= UInt32(data[i])
                b &+= a
                i += 1
            }
            a %= 65521
            b %= 65521
        }
        return (b << 16) | a
    }

    private static let crcTable: [UInt32] = (0..<256).map { n in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xedb8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    /// CRC-32 (ISO-HDLC, as PNG chunks use).
    public static func crc32(_ data: [UInt8]) -> UInt32 {
        var c: UInt32 = 0xffff_ffff
        for byte in data { c = crcTable[Int((c ^ UInt32(byte)) & 0xff)] ^ (c >> 8) }
        return c ^ 0xffff_ffff
    }
}

// MARK: - Key codes

/// Linux input key codes (`KEY_*`, `BTN_*` from linux/input-event-codes.h) and the QEMU `QKeyCode`
/// names that map to them, for QMP `send-key` and `input-send-event`.
public enum LinuxKey {
    public static let esc: UInt16 = 1
    public static let backspace: UInt16 = 14
    public static let tab: UInt16 = 15
    public static let enter: UInt16 = 28
    public static let leftCtrl: UInt16 = 29
    public static let leftShift: UInt16 = 42
    public static let rightShift: UInt16 = 54
    public static let leftAlt: UInt16 = 56
    public static let space: UInt16 = 57
    public static let capsLock: UInt16 = 58
    public static let rightCtrl: UInt16 = 97
    public static let rightAlt: UInt16 = 100
    public static let power: UInt16 = 116
    public static let btnLeft: UInt16 = 0x110
    public static let btnRight: UInt16 = 0x111
    public static let btnMiddle: UInt16 = 0x112
    public static let btnSide: UInt16 = 0x113
    public static let btnExtra: UInt16 = 0x114

    /// The highest key code a keyboard reports (KEY_MICMUTE is 248; 0x2ff is KEY_MAX).
    public static let maxKeyboardCode: UInt16 = 255

    /// Linux code of a QEMU `QKeyCode` name ("ctrl", "alt", "delete", "a", "ret"), or nil.
    public static func code(forQCode name: String) -> UInt16? { qcodes[name] }

    /// Linux code of a QEMU key number (a PC XT scancode, 0x80 bit for the E0-prefixed ones),
    /// as QMP `send-key` accepts with `{"type":"number"}`, or nil when unknown.
    public static func code(forQNumber n: Int) -> UInt16? {
        if n >= 1 && n <= 0x58 && n != 0x54 && n != 0x55 { return UInt16(n) }
        return extendedQNumbers[n]
    }

    private static let extendedQNumbers: [Int: UInt16] = [
        0x9c: 96, 0x9d: 97, 0xb5: 98, 0xb7: 99, 0xb8: 100, 0xc6: 119, 0xc7: 102, 0xc8: 103, 0xc9: 104,
        0xcb: 105, 0xcd: 106, 0xcf: 107, 0xd0: 108, 0xd1: 109, 0xd2: 110, 0xd3: 111, 0xdb: 125, 0xdc: 126,
        0xdd: 127, 0xde: 116, 0xdf: 142, 0xe3: 143, 0xa0: 113, 0xae: 114, 0xb0: 115,
    ]

    private static let qcodes: [String: UInt16] = {
        var m: [String: UInt16] = [
            "esc": 1, "minus": 12, "equal": 13, "backspace": 14, "tab": 15, "bracket_left": 26,
            "bracket_right": 27, "ret": 28, "ctrl": 29, "semicolon": 39, "apostrophe": 40, "grave_accent": 41,
            "shift": 42, "backslash": 43, "comma": 51, "dot": 52, "slash": 53, "shift_r": 54, "asterisk": 55,
            "kp_multiply": 55, "alt": 56, "spc": 57, "caps_lock": 58, "num_lock": 69, "scroll_lock": 70,
            "kp_7": 71, "kp_8": 72, "kp_9": 73, "kp_subtract": 74, "kp_4": 75, "kp_5": 76, "kp_6": 77,
            "kp_add": 78, "kp_1": 79, "kp_2": 80, "kp_3": 81, "kp_0": 82, "kp_decimal": 83, "less": 86,
            "f11": 87, "f12": 88, "ro": 89, "katakanahiragana": 93, "hiragana": 91, "henkan": 92,
            "muhenkan": 94, "kp_enter": 96, "ctrl_r": 97, "kp_divide": 98, "sysrq": 99, "print": 99,
            "alt_r": 100, "lf": 101, "home": 102, "up": 103, "pgup": 104, "left": 105, "right": 106,
            "end": 107, "down": 108, "pgdn": 109, "insert": 110, "delete": 111, "audiomute": 113,
            "volumedown": 114, "volumeup": 115, "power": 116, "kp_equals": 117, "pause": 119,
            "kp_comma": 121, "lang1": 122, "lang2": 123, "yen": 124, "meta_l": 125, "meta_r": 126,
            "compose": 127, "stop": 128, "again": 129, "props": 130, "undo": 131, "front": 132, "copy": 133,
            "open": 134, "paste": 135, "find": 136, "cut": 137, "help": 138, "menu": 139, "calculator": 140,
            "sleep": 142, "wake": 143, "mail": 155, "ac_bookmarks": 156, "computer": 157, "ac_back": 158,
            "ac_forward": 159, "audionext": 163, "audioplay": 164, "audioprev": 165, "audiostop": 166,
            "ac_home": 172, "ac_refresh": 173, "mediaselect": 226,
        ]
        for (i, c) in "1234567890".enumerated() { m[String(c)] = UInt16(2 + i) }
        for (row, start) in [("qwertyuiop", 16), ("asdfghjkl", 30), ("zxcvbnm", 44)] as [(String, UInt16)] {
            for (i, c) in row.enumerated() { m[String(c)] = start + UInt16(i) }
        }
        for i in 1...10 { m["f\(i)"] = UInt16(58 + i) }
        for i in 13...24 { m["f\(i)"] = UInt16(183 + i - 13) }
        return m
    }()
}
