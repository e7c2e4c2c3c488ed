import CVNCServer
import Foundation
import Machine
import Synchronization
import Testing
@testable import VNC

/// Collects the reports the server sends to the guest's input devices.
final class RecordingSink: InputSink, @unchecked Sendable {
    private let reports = Mutex<[[InputEvent]]>([])
    func handle(_ events: [InputEvent]) { reports.withLock { $0.append(events) } }
    var all: [[InputEvent]] { reports.withLock { $0 } }
}

enum RFBTestError: Error { case closed, protocolError(String) }

/// A deliberately small RFB 3.8 client: raw encoding plus the DesktopSize pseudo-encoding.
final class RFBClient {
    let fd: Int32
    var width = 0, height = 0
    var format = [UInt8]()

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else { close(fd); throw RFBTestError.protocolError("connect failed") }
    }

    deinit { close(fd) }

    func read(_ n: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, n - got, 0) }
            if r <= 0 { throw RFBTestError.closed }
            got += r
        }
        return out
    }

    func send(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, 0) } }

    func u16(_ b: [UInt8], _ i: Int) -> Int { Int(b[i]) << 8 | Int(b[i + 1]) }
    func u32(_ b: [UInt8], _ i: Int) -> UInt32 {
        UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }
    func be16(_ v: Int) -> [UInt8] { [UInt8((v >> 8) & 0xff), UInt8(v & 0xff)] }
    func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 0xff), UInt8((v >> 8) & 0xff), UInt8(v & 0xff)] }

    /// Runs the handshake; `password` selects VNC authentication. Returns the security result.
    @discardableResult
    func handshake(password: String? = nil) throws -> UInt32 {
        let version = try read(12)
        guard String(decoding: version, as: UTF8.self).hasPrefix("RFB 003.") else {
            throw RFBTestError.protocolError("bad version")
        }
        send(Array("RFB 003.008\n".utf8))
        let n = Int(try read(1)[0])
        guard n > 0 else { throw RFBTestError.protocolError("server refused") }
        let types = try read(n)
        if let password {
            guard types.contains(2) else { throw RFBTestError.protocolError("no VNC auth offered: \(types)") }
            send([2])
            var challenge = try read(16)
            var key = Array(password.utf8.prefix(8)).map { CChar(bitPattern: $0) } + [0]
            challenge.withUnsafeMutableBufferPointer { c in
                key.withUnsafeMutableBufferPointer { rfbEncryptBytes(c.baseAddress!, $0.baseAddress!) }
            }
            send(challenge)
        } else {
            guard types.contains(1) else { throw RFBTestError.protocolError("no None auth offered: \(types)") }
            send([1])
        }
        let result = u32(try read(4), 0)
        if result != 0 { return result }
        send([1])  // ClientInit, shared
        let si = try read(24)
        width = u16(si, 0)
        height = u16(si, 2)
        format = Array(si[4..<20])
        _ = try read(Int(u32(si, 20)))
        // SetEncodings: Raw, DesktopSize.
        send([2, 0] + be16(2) + be32(0) + be32(UInt32(bitPattern: -223)))
        return 0
    }

    func requestUpdate(incremental: Bool) {
        send([3, incremental ? 1 : 0] + be16(0) + be16(0) + be16(width) + be16(height))
    }

    struct Rect { var x, y, w, h: Int; var encoding: Int32; var pixels: [UInt8] }

    /// Reads one FramebufferUpdate (skipping other server messages).
    func readUpdate() throws -> [Rect] {
        while true {
            let type = try read(1)[0]
            switch type {
            case 0:
                let hdr = try read(3)
                let n = u16(hdr, 1)
                var rects: [Rect] = []
                for _ in 0..<n {
                    let r = try read(12)
                    let rect = Rect(x: u16(r, 0), y: u16(r, 2), w: u16(r, 4), h: u16(r, 6),
                                    encoding: Int32(bitPattern: u32(r, 8)), pixels: [])
                    if rect.encoding == 0 {
                        var full = rect
                        full.pixels = try read(rect.w * rect.h * 4)
                        rects.append(full)
                    } else if rect.encoding == -223 {
                        width = rect.w
                        height = rect.h
                        rects.append(rect)
                    } else {
                        throw RFBTestError.protocolError("unexpected encoding \(rect.encoding)")
                    }
                }
                return rects
            case 2: continue  // Bell
            case 3: _ = try read(3 + Int(u32(try read(7), 3)))  // ServerCutText (approximate)
            default: throw RFBTestError.protocolError("unexpected message \(type)")
            }
        }
    }

    /// RGB of a raw pixel in the server's pixel format (little-endian 32 bpp true colour).
    func rgb(_ px: ArraySlice<UInt8>) -> (Int, Int, Int) {
        let v = UInt32(px[px.startIndex]) | UInt32(px[px.startIndex + 1]) << 8
            | UInt32(px[px.startIndex + 2]) << 16 | UInt32(px[px.startIndex + 3]) << 24
        let rs = UInt32(format[10]), gs = UInt32(format[11]), bs = UInt32(format[12])
        return (Int((v >> rs) & 0xff), Int((v >> gs) & 0xff), Int((v >> bs) & 0xff))
    }

    func keyEvent(_ keysym: UInt32, down: Bool) { send([4, down ? 1 : 0, 0, 0] + be32(keysym)) }
    func pointerEvent(x: Int, y: Int, mask: UInt8) { send([5, mask] + be16(x) + be16(y)) }
}

/// A synthetic guest framebuffer: B8G8R8X8 (what Linux uses), filled with a gradient.
func makeSurface(width: Int, height: Int, seed: Int = 0) -> DisplaySurface {
    let buf = PixelBuffer(count: width * height * 4)!
    for y in 0..<height {
        for x in 0..<width {
            let p = buf.bytes + (y * width + x) * 4
            p.storeBytes(of: UInt8(truncatingIfNeeded: x + seed), toByteOffset: 2, as: UInt8.self)  // red
            p.storeBytes(of: UInt8(truncatingIfNeeded: y), toByteOffset: 1, as: UInt8.self)  // green
            p.storeBytes(of: UInt8(truncatingIfNeeded: x ^ y), toByteOffset: 0, as: UInt8.self)  // blue
        }
    }
    return DisplaySurface(buffer: buf, width: width, height: height, stride: width * 4, format: .b8g8r8x8)!
}

func waitUntil(_ what: () -> Bool) {
    for _ in 0..<300 where !what() { usleep(10_000) }
}

@Suite(.serialized) struct VNCServerTests {
    @Test func viewerSeesPixelsDirtyRectsAndResizes() throws {
        let display = Display(preferredWidth: 64, preferredHeight: 48)
        display.setSurface(makeSurface(width: 64, height: 48))
        let server = try VNCServer(display: display, configuration: VNCConfiguration(listen: "127.0.0.1:0"))
        try server.start()
        defer { server.stop() }
        #expect(server.port > 0)

        let client = try RFBClient(port: server.port)
        try client.handshake()
        #expect(client.width == 64 && client.height == 48)
        client.requestUpdate(incremental: false)
        let rects = try client.readUpdate()
        let full = try #require(rects.first { $0.encoding == 0 && $0.w == 64 && $0.h == 48 })
        for (x, y) in [(0, 0), (10, 5), (63, 47)] {
            let i = (y * 64 + x) * 4
            let (r, g, b) = client.rgb(full.pixels[i..<(i + 4)])
            #expect(r == x && g == y && b == x ^ y, "pixel (\(x),\(y))")
        }

        // The guest redraws a small rectangle: only that rectangle is sent.
        let surface = try #require(display.surface)
        for y in 20..<24 { for x in 30..<38 { (surface.buffer.bytes + (y * 64 + x) * 4).storeBytes(of: 0x00ff_ffff as UInt32, as: UInt32.self) } }
        client.requestUpdate(incremental: true)
        display.update(DisplayRect(x: 30, y: 20, width: 8, height: 4))
        let delta = try client.readUpdate()
        #expect(!delta.isEmpty)
        for r in delta {
            #expect(r.x >= 30 && r.y >= 20 && r.x + r.w <= 38 && r.y + r.h <= 24, "rect \(r.x),\(r.y) \(r.w)x\(r.h)")
            let (cr, cg, cb) = client.rgb(r.pixels[0..<4])
            #expect(cr == 255 && cg == 255 && cb == 255)
        }

        // Mode change: the viewer's desktop is resized and repainted.
        display.setSurface(makeSurface(width: 80, height: 60, seed: 7))
        client.requestUpdate(incremental: true)
        var sawResize = false, sawPixels = false
        for _ in 0..<4 where !(sawResize && sawPixels) {
            for r in try client.readUpdate() {
                if r.encoding == -223 { sawResize = true; #expect(r.w == 80 && r.h == 60) }
                if r.encoding == 0, r.x == 0, r.y == 0, r.w > 0 {
                    sawPixels = true
                    #expect(client.rgb(r.pixels[0..<4]) == (7, 0, 0))
                }
            }
            client.requestUpdate(incremental: true)
        }
        #expect(sawResize && sawPixels)
        #expect(server.info().clients.count == 1)
    }

    @Test func keysAndPointerReachInputDevices() throws {
        let display = Display(preferredWidth: 100, preferredHeight: 50)
        display.setSurface(makeSurface(width: 100, height: 50))
        let sink = RecordingSink()
        display.addInputSink(sink)
        let server = try VNCServer(display: display, configuration: VNCConfiguration(listen: "127.0.0.1:0"))
        try server.start()
        defer { server.stop() }
        var client: RFBClient? = try RFBClient(port: server.port)
        try client!.handshake()
        let c = client!
        c.keyEvent(0x41, down: true)  // 'A' with no Shift pressed
        c.keyEvent(0x41, down: false)
        c.pointerEvent(x: 99, y: 0, mask: 1)
        waitUntil { sink.all.count >= 5 }
        #expect(sink.all.prefix(4) == [[.key(code: 42, down: true)], [.key(code: 30, down: true)],
                                       [.key(code: 42, down: false)], [.key(code: 30, down: false)]])
        #expect(sink.all.dropFirst(4).first == [.absolute(.x, value: 0x7fff), .absolute(.y, value: 0), .button(.left, down: true)])
        // A viewer that leaves with a button down releases it.
        let before = sink.all.count
        client = nil
        _ = consume c
        waitUntil { sink.all.count > before }
        #expect(sink.all.last == [.button(.left, down: false)])
    }

    @Test func passwordAuthentication() throws {
        let display = Display(preferredWidth: 32, preferredHeight: 32)
        let server = try VNCServer(display: display,
                                   configuration: VNCConfiguration(listen: "127.0.0.1:0", passwordRequired: true))
        try server.start()
        defer { server.stop() }
        #expect(server.info().auth == "vnc")
        // No password set yet: nobody gets in.
        #expect(try RFBClient(port: server.port).handshake(password: "") != 0)
        try server.setPassword("secret")
        #expect(try RFBClient(port: server.port).handshake(password: "wrong") != 0)
        #expect(try RFBClient(port: server.port).handshake(password: "secret") == 0)
        try server.expirePassword(at: Date(timeIntervalSinceNow: -1))
        #expect(try RFBClient(port: server.port).handshake(password: "secret") != 0)

        let open = try VNCServer(display: display, configuration: VNCConfiguration(listen: "127.0.0.1:0"))
        #expect(throws: VNCError.passwordAuthDisabled) { try open.setPassword("x") }
    }

    @Test func addressParsing() throws {
        #expect(try VNCServer.parseAddress("127.0.0.1:5901") == ("127.0.0.1", 5901))
        #expect(try VNCServer.parseAddress("[::1]:0") == ("::1", 0))
        #expect(try VNCServer.parseAddress(":5900") == ("", 5900))
        #expect(throws: VNCError.self) { try VNCServer.parseAddress("localhost") }
        #expect(throws: VNCError.self) { try VNCServer.parseAddress("host:99999") }
        #expect(throws: VNCError.self) { try VNCServer(display: Display(), configuration: VNCConfiguration(listen: "256.1.1.1:1")) }
        #expect(VNCServer.parseExpiry("never") == .some(nil))
        #expect(VNCServer.parseExpiry("+10", now: Date(timeIntervalSince1970: 100)) == .some(Date(timeIntervalSince1970: 110)))
        #expect(VNCServer.parseExpiry("soon") == nil)
    }

    @Test func screendumpFormats() throws {
        let display = Display()
        #expect(throws: DisplayError.self) { try display.screendump(format: .ppm) }
        display.setSurface(makeSurface(width: 3, height: 2))
        let ppm = try display.screendump(format: .ppm)
        #expect(ppm.starts(with: Array("P6\n3 2\n255\n".utf8)))
        #expect(Array(ppm.suffix(3)) == [2, 1, 3])  // pixel (2,1): r=2 g=1 b=2^1
        let png = try display.screendump(format: .png)
        #expect(png.starts(with: [0x89, 0x50, 0x4e, 0x47]))
        #expect(ImageEncoder.adler32(Array("Wikipedia".utf8)) == 0x11e6_0398)
        #expect(ImageEncoder.crc32(Array("123456789".utf8)) == 0xcbf4_3926)
    }
}
