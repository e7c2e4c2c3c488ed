import Board
import Devices
import Foundation
import Machine
import Net
import QMP
import Schema
import Synchronization

/// Builds network backends from QEMU's `Netdev` (the one schema type for the description's
/// `netdevs` and QMP's `netdev_add`). Errors name the option at fault.
enum NetdevBuilder {
    static func build(_ n: Netdev) throws(NetError) -> NetworkLoop {
        switch n.variant {
        case .user(let o):
            let options = try UserNetworkOptions(net: o.net, host: o.host, dns: o.dns, dhcpStart: o.dhcpstart,
                                                 restrict: o.restrict ?? false, hostname: o.hostname,
                                                 domainName: o.domainname,
                                                 hostForwards: (o.hostfwd ?? []).map(\.str),
                                                 guestForwards: (o.guestfwd ?? []).map(\.str))
            return try SlirpNetwork(id: n.id, options: options)
        case .stream(let o):
            let address: StreamAddress
            switch o.addr.variant {
            case .inet(let a):
                guard let port = UInt16(a.port) else { throw NetError("Parameter 'addr.port': '\(a.port)' is not a port number") }
                address = .inet(host: a.host, port: port)
            case .unix(let u):
                address = .unix(path: u.path)
            }
            return try StreamNetwork(id: n.id, address: address, server: o.server ?? false, reconnect: Int(o.reconnect ?? 0))
        }
    }
}

/// The machine's netdevs and NICs: built at launch from the plan, changed at run time by
/// `netdev_add` / `netdev_del` / `hostfwd_*`, and reported to QMP. Any thread (its lists sit
/// behind a mutex; each backend serialises its own work on its loop thread).
final class MachineNetwork: NetworkRegistry, @unchecked Sendable {  // unchecked: its lists sit behind a Mutex
    /// One NIC: its id (explicit or generated), the device, and the netdev it uses.
    struct NIC {
        let id: String
        /// "virtio-net-device" or "virtio-net-pci".
        let driver: String
        let device: VirtioNet
        let netdev: String?
    }

    private struct Lists {
        var netdevs: [NetworkLoop] = []
        var nics: [NIC] = []
    }
    private let lists = Mutex(Lists())
    /// Registers netdevs added at run time with the machine's device manager (saved state).
    private let machineBox = Mutex<VirtualMachine?>(nil)

    /// Builds every netdev of the description; throws naming `netdevs[i]` after closing those built.
    init(_ netdevs: [Netdev]) throws {
        var built: [NetworkLoop] = []
        for (i, n) in netdevs.enumerated() {
            do {
                built.append(try NetdevBuilder.build(n))
            } catch {
                for b in built { b.close() }
                throw LaunchError("netdevs[\(i)] ('\(n.id)'): \(error.description)")
            }
        }
        lists.withLock { $0.netdevs = built }
    }

    /// The netdev with this id.
    func netdev(_ id: String) -> NetworkLoop? { lists.withLock { $0.netdevs.first { $0.id == id } } }

    /// Adds a NIC (at launch, while the devices are built).
    func addNIC(_ nic: NIC) { lists.withLock { $0.nics.append(nic) } }

    /// The NICs.
    var nics: [NIC] { lists.withLock { $0.nics } }

    /// The backends whose state goes into saved states (user networks), in description order.
    var statefulBackends: [any ManagedDevice] {
        lists.withLock { $0.netdevs.compactMap { $0 as? SlirpNetwork } }
    }

    /// Hands over the machine, registering the launch-time user networks with its device manager.
    func attach(to machine: VirtualMachine) throws {
        machineBox.withLock { $0 = machine }
        for b in statefulBackends { try machine.addManagedDevice(b) }
    }

    /// Closes every netdev (after the machine stopped).
    func close() {
        for n in lists.withLock({ $0.netdevs }) { n.close() }
    }

    // MARK: NetworkRegistry

    func addNetdev(_ netdev: Netdev) throws {
        if self.netdev(netdev.id) != nil { throw QMPError(.genericError, "Duplicate ID '\(netdev.id)' for netdev") }
        guard !netdev.id.isEmpty else { throw QMPError(.genericError, "Parameter 'id' must not be empty") }
        let n: NetworkLoop
        do {
            n = try NetdevBuilder.build(netdev)
        } catch {
            throw QMPError(.genericError, error.description)
        }
        if let slirp = n as? SlirpNetwork, let machine = machineBox.withLock({ $0 }) {
            do {
                try machine.addManagedDevice(slirp)
            } catch {
                n.close()
                throw QMPError(.genericError, "\(error)")
            }
        }
        let duplicate = lists.withLock { l -> Bool in
            if l.netdevs.contains(where: { $0.id == netdev.id }) { return true }
            l.netdevs.append(n)
            return false
        }
        if duplicate {
            if let slirp = n as? SlirpNetwork { machineBox.withLock { $0 }?.removeManagedDevice(slirp) }
            n.close()
            throw QMPError(.genericError, "Duplicate ID '\(netdev.id)' for netdev")
        }
    }

    func removeNetdev(id: String) throws {
        let removed = try lists.withLock { l -> NetworkLoop in
            guard let i = l.netdevs.firstIndex(where: { $0.id == id }) else {
                throw QMPError(.deviceNotFound, "Device '\(id)' not found")
            }
            if let nic = l.nics.first(where: { $0.netdev == id }) {
                throw QMPError(.genericError, "netdev '\(id)' is in use by NIC '\(nic.id)'; a NIC's netdev cannot be removed while the NIC exists")
            }
            return l.netdevs.remove(at: i)
        }
        if let slirp = removed as? SlirpNetwork { machineBox.withLock { $0 }?.removeManagedDevice(slirp) }
        removed.close()
    }

    func setLink(name: String, up: Bool) throws {
        let (nic, netdev) = lists.withLock { l in
            (l.nics.first { $0.id == name } ?? l.nics.first { $0.netdev == name }, l.netdevs.first { $0.id == name })
        }
        guard nic != nil || netdev != nil else { throw QMPError(.deviceNotFound, "Device '\(name)' not found") }
        if let nic { nic.device.setLink(up: up) } else { netdev?.linkUp = up }
    }

    func rxFilters(name: String?) throws -> [RxFilterInfo] {
        let all = nics
        if let name, !all.contains(where: { $0.id == name }) {
            if netdev(name) != nil { throw QMPError(.genericError, "net client(\(name)) isn't a NIC") }
            throw QMPError(.genericError, "invalid net client name: \(name)")
        }
        return all.filter { name == nil || $0.id == name }.map { n in
            RxFilterInfo(name: n.id, promiscuous: true, multicast: .normal, unicast: .normal, vlan: .all,
                         broadcastAllowed: true, multicastOverflow: false, unicastOverflow: false,
                         mainMac: VirtioNet.format(n.device.mac), vlanTable: [], unicastTable: [], multicastTable: [])
        }
    }

    func infoNetwork() -> String {
        let (netdevs, nics) = lists.withLock { ($0.netdevs, $0.nics) }
        var out = ""
        for n in nics {
            let s = n.device.statistics
            out += "\(n.id): index=0,type=nic,model=\(n.driver),macaddr=\(VirtioNet.format(n.device.mac))"
                + (n.device.linkUp ? "" : " [link=down]") + "\r\n"
            out += " frames rx=\(s.rxFrames) tx=\(s.txFrames) dropped rx=\(s.rxDropped) tx=\(s.txDropped)\r\n"
            if let id = n.netdev, let b = netdevs.first(where: { $0.id == id }) {
                out += " \\ \(b.id): index=0,type=\(b.kind),\(b.summary)\r\n"
            }
        }
        for b in netdevs where !nics.contains(where: { $0.netdev == b.id }) {
            out += "\(b.id): index=0,type=\(b.kind),\(b.summary)" + (b.linkUp ? "" : " [link=down]") + "\r\n"
        }
        return out
    }

    func infoUsernet() -> String {
        lists.withLock { $0.netdevs }.compactMap { $0 as? SlirpNetwork }.map { s in
            "Hub -1 (\(s.id)):\r\n" + s.connectionInfo.replacingOccurrences(of: "\n", with: "\r\n")
        }.joined()
    }

    /// The user netdev a hostfwd command means: the named one, or the only one.
    private func userNetdev(_ id: String?) throws -> SlirpNetwork {
        let users = lists.withLock { $0.netdevs }.compactMap { $0 as? SlirpNetwork }
        if let id {
            guard let n = netdev(id) else { throw QMPError(.genericError, "netdev '\(id)' not found") }
            guard let s = n as? SlirpNetwork else { throw QMPError(.genericError, "netdev '\(id)' is not a user netdev") }
            return s
        }
        guard let only = users.first else { throw QMPError(.genericError, "there is no user netdev") }
        guard users.count == 1 else {
            throw QMPError(.genericError, "there are \(users.count) user netdevs; name one: hostfwd_add NETDEV_ID RULE")
        }
        return only
    }

    func addHostForward(netdev: String?, rule: String) throws {
        let s = try userNetdev(netdev)
        do {
            try s.addHostForward(HostForward.parse(rule))
        } catch {
            throw QMPError(.genericError, error.description)
        }
    }

    func removeHostForward(netdev: String?, rule: String) throws {
        let s = try userNetdev(netdev)
        do {
            let (udp, address, port) = try HostForward.parseHostSide(rule)
            try s.removeHostForward(udp: udp, address: address, port: port)
        } catch {
            throw QMPError(.genericError, error.description)
        }
    }
}
