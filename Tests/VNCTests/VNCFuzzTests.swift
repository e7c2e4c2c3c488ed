import Foundation
import FuzzSupport
import Machine
import Testing
@testable import VNC

/// Fuzzes the VNC server's handling of client messages: each input follows a complete RFB 3.8
/// handshake (sent at once, so no 150 ms silence is needed), then the client stops sending and
/// reads until the server closes. Seeds (tests/fuzz/corpus/vnc): pixel format, encodings,
/// update requests, key and pointer events, cut text, SetDesktopSize, continuous updates.
/// The server must neither crash nor stall: afterwards a real viewer completes its handshake
/// within 5 s and `stop()` returns.
///
/// Part of the serialized `VNCServerTests` suite: libvncserver keeps its security-type
/// handlers in a global list that each new client rewrites for its own server, so two servers
/// with different authentication in one process must not take clients at the same time.
extension VNCServerTests {
    @Test func fuzzedClientMessagesNeverCrashOrStallTheServer() throws {
        let seeds = Fuzz.corpus("vnc")
        try #require(seeds.count >= 3, "the VNC seed corpus is missing")
        let display = Display(preferredWidth: 64, preferredHeight: 48)
        let server = try VNCServer(display: display, configuration: VNCConfiguration(listen: "127.0.0.1:0"))
        try server.start()
        let handshake = Array("RFB 003.008\n".utf8) + [1, 1]  // version, security None, ClientInit shared
        let report = Fuzz.run(target: "vnc", seeds: seeds, seconds: Fuzz.budget(ci: 3), maxLength: 4096) { input in
            let client = try RFBClient(port: server.port)
            var tv = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(client.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            client.send(handshake + input)
            shutdown(client.fd, Int32(SHUT_WR))
            var buf = [UInt8](repeating: 0, count: 65536)
            while buf.withUnsafeMutableBytes({ recv(client.fd, $0.baseAddress, $0.count, 0) }) > 0 {}
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        let viewer = try RFBClient(port: server.port)
        let start = Date()
        #expect(try viewer.handshake() == 0)
        #expect(Date().timeIntervalSince(start) < 5)
        server.stop()
    }
}
