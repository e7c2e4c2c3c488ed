import Foundation

/// An IPv4 address in host byte order, parsed and printed in dotted-quad form.
public struct IPv4Address: Hashable, Sendable, CustomStringConvertible, Comparable {
    /// The address, host byte order (10.0.2.15 is 0x0A00_020F).
    public var value: UInt32
    /// Wraps a host-order value.
    public init(_ value: UInt32) { self.value = value }

    /// Parses "a.b.c.d" (each part 0…255, decimal, no leading junk); nil otherwise.
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var v: UInt32 = 0
        for p in parts {
            guard !p.isEmpty, p.count <= 3, p.allSatisfy({ $0.isASCII && $0.isNumber }), let n = UInt32(p), n <= 255 else {
                return nil
            }
            v = v << 8 | n
        }
        value = v
    }

    public var description: String {
        "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)"
    }
    public static func < (a: Self, b: Self) -> Bool { a.value < b.value }

    /// The address as libslirp's `struct in_addr` (network byte order).
    public var inAddr: in_addr { in_addr(s_addr: value.bigEndian) }
    /// The unspecified address 0.0.0.0.
    public static let any = IPv4Address(0)
}

/// One `hostfwd` rule, QEMU's `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`: host
/// connections to `hostAddress:hostPort` are forwarded to `guestAddress:guestPort` in the guest.
public struct HostForward: Hashable, Sendable, CustomStringConvertible {
    /// UDP instead of TCP.
    public var udp: Bool
    /// The host address to listen on (0.0.0.0 for every address).
    public var hostAddress: IPv4Address
    /// The host port (0 lets the host choose one).
    public var hostPort: UInt16
    /// The guest address; nil means the first DHCP address (10.0.2.15 by default).
    public var guestAddress: IPv4Address?
    /// The guest port.
    public var guestPort: UInt16

    /// Creates a rule.
    public init(udp: Bool, hostAddress: IPv4Address, hostPort: UInt16, guestAddress: IPv4Address?, guestPort: UInt16) {
        self.udp = udp
        self.hostAddress = hostAddress
        self.hostPort = hostPort
        self.guestAddress = guestAddress
        self.guestPort = guestPort
    }

    /// The rule in QEMU's syntax.
    public var description: String {
        "\(udp ? "udp" : "tcp"):\(hostAddress == .any ? "" : hostAddress.description):\(hostPort)-"
            + "\(guestAddress?.description ?? ""):\(guestPort)"
    }

    /// Parses a rule; the error names the part that is wrong.
    public static func parse(_ text: String) throws(NetError) -> HostForward {
        let halves = text.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
        guard halves.count == 2 else {
            throw NetError("Invalid host forwarding rule '\(text)' (expected [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport)")
        }
        let (udp, hostAddress, hostPort) = try parseHostSide(String(halves[0]), rule: text)
        let guest = halves[1].split(separator: ":", omittingEmptySubsequences: false)
        guard guest.count == 2 else {
            throw NetError("Invalid host forwarding rule '\(text)' (the guest side must be [guestaddr]:guestport)")
        }
        var guestAddress: IPv4Address?
        if !guest[0].isEmpty {
            guard let a = IPv4Address(guest[0]) else {
                throw NetError("Invalid host forwarding rule '\(text)' (bad guest address '\(guest[0])')")
            }
            guestAddress = a
        }
        guard let gp = UInt16(guest[1]), gp != 0 else {
            throw NetError("Invalid host forwarding rule '\(text)' (bad guest port '\(guest[1])')")
        }
        return HostForward(udp: udp, hostAddress: hostAddress, hostPort: hostPort, guestAddress: guestAddress, guestPort: gp)
    }

    /// Parses the host side `[tcp|udp]:[hostaddr]:hostport` (also `hostfwd_remove`'s argument).
    public static func parseHostSide(_ text: String, rule: String? = nil) throws(NetError) -> (udp: Bool, address: IPv4Address, port: UInt16) {
        let whole = rule ?? text
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 3 else {
            throw NetError("Invalid host forwarding rule '\(whole)' (the host side must be [tcp|udp]:[hostaddr]:hostport)")
        }
        let udp: Bool
        switch parts[0] {
        case "", "tcp": udp = false
        case "udp": udp = true
        default: throw NetError("Invalid host forwarding rule '\(whole)' (protocol '\(parts[0])' is neither tcp nor udp)")
        }
        var address = IPv4Address.any
        if !parts[1].isEmpty {
            guard let a = IPv4Address(parts[1]) else {
                throw NetError("Invalid host forwarding rule '\(whole)' (bad host address '\(parts[1])')")
            }
            address = a
        }
        guard let port = UInt16(parts[2]) else {
            throw NetError("Invalid host forwarding rule '\(whole)' (bad host port '\(parts[2])')")
        }
        return (udp, address, port)
    }
}

/// One `guestfwd` rule, QEMU's `[tcp]:server:port-cmd:command`: the guest's TCP connections to
/// `server:port` (an address inside the user network) are served by a host command's stdin/stdout.
public struct GuestForward: Hashable, Sendable, CustomStringConvertible {
    /// The address in the guest network the guest connects to.
    public var server: IPv4Address
    /// Its port.
    public var port: UInt16
    /// The host command line run for each connection.
    public var command: String

    public var description: String { "tcp:\(server):\(port)-cmd:\(command)" }

    /// Parses a rule; the error names the part that is wrong.
    public static func parse(_ text: String) throws(NetError) -> GuestForward {
        let halves = text.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
        guard halves.count == 2 else {
            throw NetError("Invalid guest forwarding rule '\(text)' (expected [tcp]:server:port-cmd:command)")
        }
        var parts = halves[0].split(separator: ":", omittingEmptySubsequences: false)
        if parts.count == 3 {
            guard parts[0] == "tcp" || parts[0].isEmpty else {
                throw NetError("Invalid guest forwarding rule '\(text)' (only tcp is supported, not '\(parts[0])')")
            }
            parts.removeFirst()
        }
        guard parts.count == 2, let server = IPv4Address(parts[0]) else {
            throw NetError("Invalid guest forwarding rule '\(text)' (the server must be an IPv4 address in the guest network)")
        }
        guard let port = UInt16(parts[1]), port != 0 else {
            throw NetError("Invalid guest forwarding rule '\(text)' (bad port '\(parts[1])')")
        }
        guard halves[1].hasPrefix("cmd:"), halves[1].count > 4 else {
            throw NetError("Invalid guest forwarding rule '\(text)' (the target must be cmd:COMMAND; chardev targets are not supported)")
        }
        return GuestForward(server: server, port: port, command: String(halves[1].dropFirst(4)))
    }
}

/// The configuration of a user-mode (libslirp) network, checked: QEMU's `-netdev user` options
/// with QEMU's defaults (network 10.0.2.0/24, gateway and host 10.0.2.2, DNS 10.0.2.3, DHCP from
/// 10.0.2.15).
public struct UserNetworkOptions: Sendable, Equatable {
    /// The guest network's address (its host bits zero).
    public var network = IPv4Address(0x0A00_0200)
    /// The network's prefix length (1...30).
    public var prefixLength = 24
    /// The host's (and gateway's) address in the guest network.
    public var host = IPv4Address(0x0A00_0202)
    /// The DNS server's address in the guest network.
    public var dns = IPv4Address(0x0A00_0203)
    /// The first address DHCP hands out.
    public var dhcpStart = IPv4Address(0x0A00_020F)
    /// Isolate the guest from the host and outside (only forwards reach it).
    public var restrict = false
    /// The client host name DHCP hands out.
    public var hostname: String?
    /// The DNS search domain DHCP hands out.
    public var domainName: String?
    /// Host ports forwarded into the guest.
    public var hostForwards: [HostForward] = []
    /// Guest connections served by host commands.
    public var guestForwards: [GuestForward] = []

    /// The network mask.
    public var mask: IPv4Address { IPv4Address(prefixLength == 0 ? 0 : UInt32.max << UInt32(32 - prefixLength)) }

    /// The defaults.
    public init() {}

    /// Checks QEMU's options (each given as its text) and fills in the defaults derived from `net`.
    public init(net: String?, host: String?, dns: String?, dhcpStart: String?, restrict: Bool,
                hostname: String?, domainName: String?, hostForwards: [String], guestForwards: [String]) throws(NetError) {
        if let net {
            let parts = net.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
            guard let addr = IPv4Address(parts[0]) else { throw NetError("Parameter 'net': '\(net)' is not an IPv4 address[/mask]") }
            if parts.count == 2 {
                if let bits = Int(parts[1]), (1...30).contains(bits) {
                    prefixLength = bits
                } else if let m = IPv4Address(parts[1]), m.value != 0, (~m.value &+ 1) & ~m.value == 0, m.value.nonzeroBitCount <= 30 {
                    prefixLength = m.value.nonzeroBitCount
                } else {
                    throw NetError("Parameter 'net': '\(parts[1])' is not a prefix length (1-30) or a contiguous netmask")
                }
            }
            network = IPv4Address(addr.value & mask.value)
            self.host = IPv4Address(network.value | 2)
            self.dns = IPv4Address(network.value | 3)
            self.dhcpStart = IPv4Address(network.value | 15)
        }
        let network = self.network, mask = self.mask, prefixLength = self.prefixLength
        func inside(_ name: String, _ text: String?, _ value: inout IPv4Address) throws(NetError) {
            guard let text else { return }
            guard let a = IPv4Address(text) else { throw NetError("Parameter '\(name)': '\(text)' is not an IPv4 address") }
            guard a.value & mask.value == network.value else {
                throw NetError("Parameter '\(name)': \(a) is not in the guest network \(network)/\(prefixLength)")
            }
            guard a != network, a.value | mask.value != UInt32.max else {
                throw NetError("Parameter '\(name)': \(a) is the network or broadcast address")
            }
            value = a
        }
        try inside("host", host, &self.host)
        try inside("dns", dns, &self.dns)
        try inside("dhcpstart", dhcpStart, &self.dhcpStart)
        // The defaults (.2, .3, .15 of the network) need a network of at least 32 addresses;
        // in a smaller one they fall outside it or on its broadcast address (QEMU refuses
        // those outside too: "DHCP doesn't belong to network").
        for (name, a) in [("host", self.host), ("dns", self.dns), ("dhcpstart", self.dhcpStart)]
        where a.value & mask.value != network.value || a == network || a.value | mask.value == UInt32.max {
            throw NetError("Parameter '\(name)': its default \(a) is not a usable address of the guest network \(network)/\(prefixLength); give '\(name)' or a network of /27 or larger")
        }
        guard self.host != self.dns else { throw NetError("Parameter 'dns': \(self.dns) is also the host address") }
        self.restrict = restrict
        self.hostname = hostname
        self.domainName = domainName
        var seen = Set<String>()
        for r in hostForwards {
            let f = try HostForward.parse(r)
            let key = "\(f.udp):\(f.hostAddress):\(f.hostPort)"
            if f.hostPort != 0, !seen.insert(key).inserted {
                throw NetError("Invalid host forwarding rule '\(r)' (host port \(f.hostPort) is forwarded twice)")
            }
            self.hostForwards.append(f)
        }
        for r in guestForwards {
            let g = try GuestForward.parse(r)
            guard g.server.value & mask.value == network.value else {
                throw NetError("Invalid guest forwarding rule '\(r)' (\(g.server) is not in the guest network \(network)/\(prefixLength))")
            }
            self.guestForwards.append(g)
        }
    }
}
