import Foundation
import FuzzSupport
import Machine
import Testing
@testable import VNC

/// Fuzzes the WebSocket path noVNC takes: each input is an upgrade request followed by masked
/// client frames carrying the RFB handshake and client messages (seeds in
/// tests/fuzz/corpus/vnc-websocket, written by tests/fuzz/make-websocket-seeds.py), sent at once
/// to the WebSocket listener; the client then stops sending and reads until the server closes.
/// Mutations reach the request parser, libvncserver's frame decoder (lengths, masks,
/// fragments, control frames, base64 text frames) and our own frame-length check that keeps
/// incomplete frames away from libvncserver's blocking reads. The server must neither crash nor
/// stall: afterwards a plain viewer completes its handshake within 5 s and `stop()` returns.
///
/// Part of the serialized `VNCServerTests` suite (see `VNCFuzzTests.swift`).
extension VNCServerTests {
    /// Sends `input` on a new connection to `port` and returns what the server sent until it
    /// closed, 2 s of silence, or (with `until`) that many bytes. Without `until` the client
    /// half-closes after sending, so the server reads to the end and closes.
    private func exchange(_ input: [UInt8], port: Int, until wanted: Int? = nil) throws -> [UInt8] {
        let client = try RFBClient(port: port)
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(client.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        client.send(input)
        if wanted == nil { shutdown(client.fd, Int32(SHUT_WR)) }
        var received: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while received.count < wanted ?? Int.max {
            let n = buf.withUnsafeMutableBytes { recv(client.fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            received += buf[0..<n]
        }
        return received
    }

    @Test func fuzzedWebSocketStreamsNeverCrashOrStallTheServer() throws {
        let seeds = Fuzz.corpus("vnc-websocket")
        try #require(seeds.count >= 5, "the vnc-websocket seed corpus is missing")
        let display = Display(preferredWidth: 64, preferredHeight: 48)
        let server = try VNCServer(display: display,
                                   configuration: VNCConfiguration(listen: "127.0.0.1:0", websocket: "127.0.0.1:0"))
        try server.start()
        let wsPort = try #require(server.websocketPort)

        // The seeds reach the RFB session, not only the upgrade: the first one asks for a full
        // update of the 64x48 screen, which cannot arrive in fewer than 64*48*4 bytes.
        let answer = try exchange(seeds[0], port: wsPort, until: 64 * 48 * 4 + 1)
        #expect(answer.starts(with: Array("HTTP/1.1 101".utf8)), "\(String(decoding: answer.prefix(40), as: UTF8.self))")
        #expect(answer.count > 64 * 48 * 4, "the server answered \(answer.count) bytes")

        let report = Fuzz.run(target: "vnc-websocket", seeds: seeds, seconds: Fuzz.budget(ci: 3), maxLength: 4096) { input in
            _ = try exchange(input, port: wsPort)
        }
        print(report)
        let viewer = try RFBClient(port: server.port)
        let start = Date()
        #expect(try viewer.handshake() == 0)
        #expect(Date().timeIntervalSince(start) < 5)
        server.stop()
    }
}
