import Foundation
import Machine
import Synchronization
import Testing
@testable import Net

/// A NIC stand-in that collects what its backend delivers.
final class CollectingFrontend: NetworkFrontend, @unchecked Sendable {
    let frames = Mutex<[[UInt8]]>([])
    let arrived = DispatchSemaphore(value: 0)
    func receive(_ frame: UnsafeRawBufferPointer) -> Bool {
        frames.withLock { $0.append(Array(frame)) }
        arrived.signal()
        return true
    }
}

@Suite struct BackendTests {
    static let guestMAC: [UInt8] = [0x52, 0x54, 0, 0x12, 0x34, 0x56]

    /// An ARP request from 10.0.2.15 for 10.0.2.2.
    static func arpRequest() -> [UInt8] {
        [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] + guestMAC + [0x08, 0x06,
         0, 1, 0x08, 0, 6, 4, 0, 1] + guestMAC + [10, 0, 2, 15] + [0, 0, 0, 0, 0, 0] + [10, 0, 2, 2]
            + [UInt8](repeating: 0, count: 18)
    }

    @Test func slirpAnswersARPForTheGateway() throws {
        let net = try SlirpNetwork(id: "n0", options: UserNetworkOptions())
        defer { net.close() }
        let nic = CollectingFrontend()
        net.attach(nic)
        let frame = Self.arpRequest()
        net.perform(wait: true) { frame.withUnsafeBytes { net.send($0) } }
        #expect(nic.arrived.wait(timeout: .now() + 10) == .success)
        let reply = try #require(nic.frames.withLock { $0.first })
        #expect(Array(reply[0..<6]) == Self.guestMAC)                 // to the guest
        #expect(reply[12] == 0x08 && reply[13] == 0x06 && reply[21] == 2)   // an ARP reply
        #expect(Array(reply[28..<32]) == [10, 0, 2, 2])               // for the gateway's address
    }

    /// A loopback TCP port nothing listens on now.
    static func freePort() -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return UInt16(bigEndian: a.sin_port)
    }

    @Test func hostForwardsAreAddedListedAndRemoved() throws {
        let net = try SlirpNetwork(id: "n0", options: UserNetworkOptions())
        defer { net.close() }
        let port = Self.freePort()
        let f = try HostForward.parse("tcp:127.0.0.1:\(port)-:22")
        try net.addHostForward(f)
        #expect(net.hostForwards == [f])
        #expect(net.summary.contains("hostfwd=tcp:127.0.0.1:\(port)-:22"))
        #expect(throws: NetError.self) { try net.removeHostForward(udp: true, address: .any, port: 9) }
        try net.removeHostForward(udp: false, address: f.hostAddress, port: port)
        #expect(net.hostForwards.isEmpty)
        // The state carries the rules; a network loading it gets them back.
        try net.addHostForward(f)
        let state = net.captureState()
        #expect(state.forwards == ["tcp:127.0.0.1:\(port)-:22"])
        var w = StateWriter()
        state.encode(to: &w)
        var r = StateReader(section: "netdev:n0", bytes: w.bytes)
        #expect(try SlirpState(from: &r, version: 1) == state)
        net.close()   // its port is free again for the network the state is loaded into
        let other = try SlirpNetwork(id: "n0", options: UserNetworkOptions())
        defer { other.close() }
        try other.applyState(state)
        #expect(other.hostForwards == [f])
    }

    @Test func aHostPortInUseIsRefusedByName() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        listen(fd, 1)
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        let port = UInt16(bigEndian: a.sin_port)
        var o = UserNetworkOptions()
        o.hostForwards = [try HostForward.parse("tcp:127.0.0.1:\(port)-:22")]
        do {
            _ = try SlirpNetwork(id: "n0", options: o)
            Issue.record("a forward on a busy port was accepted")
        } catch {
            #expect(error.description.contains("Could not set up host forwarding rule 'tcp:127.0.0.1:\(port)-:22'"))
        }
    }

    @Test func twoStreamBackendsCarryFramesBothWays() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("net-\(UUID().uuidString.prefix(8)).sock").path
        let server = try StreamNetwork(id: "s", address: .unix(path: path), server: true)
        defer { server.close() }
        let client = try StreamNetwork(id: "c", address: .unix(path: path), server: false)
        defer { client.close() }
        let a = CollectingFrontend(), b = CollectingFrontend()
        server.attach(a)
        client.attach(b)
        let frame = Self.arpRequest()
        // The server may not have accepted yet: frames sent before are dropped, so retry.
        var delivered = false
        for _ in 0..<100 where !delivered {
            client.perform(wait: true) { frame.withUnsafeBytes { client.send($0) } }
            delivered = a.arrived.wait(timeout: .now() + 0.1) == .success
        }
        #expect(delivered)
        #expect(a.frames.withLock { $0.first } == frame)
        let big = [UInt8](repeating: 0x5a, count: 9000)
        server.perform(wait: true) { big.withUnsafeBytes { server.send($0) } }
        #expect(b.arrived.wait(timeout: .now() + 10) == .success)
        #expect(b.frames.withLock { $0.first } == big)
        #expect(server.summary.contains("connected"))
    }

    @Test func aReconnectingClientFindsAServerThatStartsLater() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("net-\(UUID().uuidString.prefix(8)).sock").path
        let client = try StreamNetwork(id: "c", address: .unix(path: path), server: false, reconnect: 1)
        defer { client.close() }
        #expect(client.summary.hasPrefix("connecting to"))
        let server = try StreamNetwork(id: "s", address: .unix(path: path), server: true)
        defer { server.close() }
        let a = CollectingFrontend()
        server.attach(a)
        let frame = Self.arpRequest()
        var delivered = false
        for _ in 0..<100 where !delivered {
            client.perform(wait: true) { frame.withUnsafeBytes { client.send($0) } }
            delivered = a.arrived.wait(timeout: .now() + 0.1) == .success
        }
        #expect(delivered)
        #expect(client.summary.hasPrefix("connected to"))
    }

    @Test func aClientWithNoPeerFailsClearly() {
        #expect(throws: NetError.self) {
            _ = try StreamNetwork(id: "c", address: .unix(path: "/nonexistent/dir/x.sock"), server: false)
        }
        #expect(throws: NetError.self) {
            _ = try StreamNetwork(id: "s", address: .inet(host: "256.1.1.1", port: 1), server: true)
        }
    }
}
