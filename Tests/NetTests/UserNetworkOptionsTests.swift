import Testing
@testable import Net

@Suite struct UserNetworkOptionsTests {
    @Test func qemuDefaults() throws {
        let o = try UserNetworkOptions(net: nil, host: nil, dns: nil, dhcpStart: nil, restrict: false, hostname: nil,
                                       domainName: nil, hostForwards: [], guestForwards: [])
        #expect(o.network.description == "10.0.2.0" && o.prefixLength == 24 && o.mask.description == "255.255.255.0")
        #expect(o.host.description == "10.0.2.2" && o.dns.description == "10.0.2.3" && o.dhcpStart.description == "10.0.2.15")
    }

    @Test func netMovesTheDerivedAddresses() throws {
        let o = try UserNetworkOptions(net: "192.168.7.9/255.255.0.0", host: nil, dns: "192.168.9.9", dhcpStart: nil,
                                       restrict: true, hostname: nil, domainName: nil, hostForwards: [], guestForwards: [])
        #expect(o.network.description == "192.168.0.0" && o.prefixLength == 16)
        #expect(o.host.description == "192.168.0.2" && o.dns.description == "192.168.9.9" && o.dhcpStart.description == "192.168.0.15")
    }

    /// Found by the hostfwd fuzzer's hour-long run: in a /30 the default DHCP start (.15) lies
    /// outside the network and the default DNS (.3) is its broadcast address; in a /28 .15 is
    /// the broadcast address.
    @Test func aNetworkTooSmallForTheDefaultsIsRefusedByName() throws {
        for net in ["10.0.3.0/30", "10.0.3.1/255.255.255.252", "10.0.3.0/29", "10.0.3.0/28"] {
            #expect(throws: NetError.self) {
                try UserNetworkOptions(net: net, host: nil, dns: nil, dhcpStart: nil, restrict: false, hostname: nil,
                                       domainName: nil, hostForwards: [], guestForwards: [])
            }
        }
        do {
            _ = try UserNetworkOptions(net: "10.0.3.0/29", host: nil, dns: nil, dhcpStart: nil, restrict: false, hostname: nil,
                                       domainName: nil, hostForwards: [], guestForwards: [])
        } catch {
            #expect(error.description.contains("'dhcpstart'") && error.description.contains("10.0.3.15"), "\(error)")
        }
        // Given explicitly, addresses inside a small network are fine.
        let o = try UserNetworkOptions(net: "10.0.3.0/29", host: nil, dns: nil, dhcpStart: "10.0.3.4", restrict: false,
                                       hostname: nil, domainName: nil, hostForwards: [], guestForwards: [])
        #expect(o.dhcpStart.description == "10.0.3.4")
        #expect(try UserNetworkOptions(net: "10.0.3.0/27", host: nil, dns: nil, dhcpStart: nil, restrict: false, hostname: nil,
                                       domainName: nil, hostForwards: [], guestForwards: []).dhcpStart.description == "10.0.3.15")
    }

    @Test(arguments: [
        ("net", "10.0.2.0/33", "prefix length"),
        ("net", "10.0.2", "not an IPv4 address"),
        ("net", "10.0.2.0/255.0.255.0", "contiguous netmask"),
        ("host", "10.0.3.2", "not in the guest network"),
        ("dns", "10.0.2.255", "broadcast"),
        ("dhcpstart", "10.0.2.x", "not an IPv4 address"),
    ])
    func badAddressesAreNamed(option: String, value: String, message: String) {
        do {
            _ = try UserNetworkOptions(net: option == "net" ? value : nil, host: option == "host" ? value : nil,
                                       dns: option == "dns" ? value : nil, dhcpStart: option == "dhcpstart" ? value : nil,
                                       restrict: false, hostname: nil, domainName: nil, hostForwards: [], guestForwards: [])
            Issue.record("\(option)=\(value) was accepted")
        } catch {
            #expect(error.description.contains("'\(option)'") && error.description.contains(message), "\(error)")
        }
    }

    @Test func hostForwardRules() throws {
        let f = try HostForward.parse("tcp:127.0.0.1:2222-:22")
        #expect(!f.udp && f.hostAddress.description == "127.0.0.1" && f.hostPort == 2222 && f.guestAddress == nil && f.guestPort == 22)
        let u = try HostForward.parse("udp::5353-10.0.2.16:53")
        #expect(u.udp && u.hostAddress == .any && u.guestAddress?.description == "10.0.2.16")
        #expect(try HostForward.parse("::80-:8080").description == "tcp::80-:8080")
        #expect(throws: NetError.self) { try HostForward.parse(":80-:8080") }   // QEMU wants the protocol's colon
        for (bad, why) in [("tcp:127.0.0.1:2222", "expected"), ("sctp::1-:2", "neither tcp nor udp"), ("tcp::99999-:22", "bad host port"),
                           ("tcp::22-:0", "bad guest port"), ("tcp:1.2.3.4.5:1-:2", "bad host address"), ("tcp::1-x:2", "bad guest address"),
                           ("tcp::1-:2:3", "guest side")] {
            #expect(throws: NetError.self, "\(bad)") { try HostForward.parse(bad) }
            do { _ = try HostForward.parse(bad) } catch { #expect(error.description.contains(why), "\(bad): \(error)") }
        }
        #expect(throws: NetError.self) {
            try UserNetworkOptions(net: nil, host: nil, dns: nil, dhcpStart: nil, restrict: false, hostname: nil, domainName: nil,
                                   hostForwards: ["tcp::2222-:22", "tcp::2222-:23"], guestForwards: [])
        }
    }

    @Test func guestForwardRules() throws {
        let g = try GuestForward.parse("tcp:10.0.2.100:1234-cmd:cat /etc/hostname")
        #expect(g.server.description == "10.0.2.100" && g.port == 1234 && g.command == "cat /etc/hostname")
        #expect(throws: NetError.self) { try GuestForward.parse("tcp:10.0.2.100:1234-chardev0") }
        #expect(throws: NetError.self) { try GuestForward.parse("udp:10.0.2.100:1234-cmd:x") }
        #expect(throws: NetError.self) {
            try UserNetworkOptions(net: nil, host: nil, dns: nil, dhcpStart: nil, restrict: false, hostname: nil, domainName: nil,
                                   hostForwards: [], guestForwards: ["10.9.9.9:1-cmd:x"])
        }
    }
}

@Suite struct StreamFrameReaderTests {
    static func framed(_ frames: [[UInt8]]) -> [UInt8] {
        frames.flatMap { f in f.withUnsafeBytes { StreamFrameReader.encode($0) } }
    }

    @Test func framesSurviveAnySplit() throws {
        let frames: [[UInt8]] = [Array(repeating: 1, count: 60), [], Array(0..<200).map { UInt8($0) }, Array(repeating: 9, count: 1514)]
        let bytes = Self.framed(frames)
        for chunk in [1, 2, 3, 5, 64, 1000, bytes.count] {
            var r = StreamFrameReader()
            var got: [[UInt8]] = []
            var i = 0
            while i < bytes.count {
                let n = min(chunk, bytes.count - i)
                try bytes[i..<(i + n)].withUnsafeBytes { try r.consume($0) { got.append(Array($0)) } }
                i += n
            }
            #expect(got == frames.filter { !$0.isEmpty }, "chunk \(chunk)")
            #expect(!r.isMidFrame)
        }
    }

    @Test func anOversizedLengthIsRefused() {
        var r = StreamFrameReader()
        let bytes: [UInt8] = [0, 1, 0x10, 1, 0xaa]
        #expect(throws: StreamFrameReader.Failure.frameTooLarge(0x11001)) {
            try bytes.withUnsafeBytes { try r.consume($0) { _ in } }
        }
    }
}
