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
        /// The thread behind a hot-plugged NIC without a netdev, closed when it goes.
        var unconnected: DisconnectedNetwork? = nil
        /// Whether device_add plugged it (device_del removes it with `unplugNIC`).
        var hotPlugged = false
    }

    private struct Lists {
        var netdevs: [NetworkLoop] = []
        /// What each netdev was built from, in the same order (for query-description).
        var specs: [Netdev] = []
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
        lists.withLock { l in
            l.netdevs = built
            l.specs = netdevs
        }
    }

    /// The netdevs as they are now (the launch ones not deleted, then those netdev_add added),
    /// as description entries.
    var specs: [Netdev] { lists.withLock { $0.specs } }

    /// The netdev with this id.
    func netdev(_ id: String) -> NetworkLoop? { lists.withLock { $0.netdevs.first { $0.id == id } } }

    /// Adds a NIC (at launch, while the devices are built).
    func addNIC(_ nic: NIC) { lists.withLock { $0.nics.append(nic) } }

    /// The NICs.
    var nics: [NIC] { lists.withLock { $0.nics } }

    // MARK: Hot-plug

    /// Builds a hot-plugged NIC (`device_add virtio-net-pci`) and connects it to `netdev`,
    /// which it then holds until `unplugNIC`: a second NIC and netdev_del are refused meanwhile.
    /// Without a netdev the NIC gets a thread of its own that drops what it sends. `mac` nil
    /// takes QEMU's default, the first 52:54:00:12:34:56 + n no NIC has. `id` nil names the NIC
    /// `DRIVER.N` (as QEMU names an anonymous one). Throws `HotPlugError` and changes nothing.
    /// Control queue (with the harts out of guest code).
    func plugNIC(id: String?, driver: String, netdev: String?, mac: MACAddress?, name: String) throws(HotPlugError) -> NIC {
        try lists.withLock { l throws(HotPlugError) -> NIC in
            let backend: NetworkLoop
            var unconnected: DisconnectedNetwork?
            let nicID = id ?? (0...).lazy.map { "\(driver).\($0)" }.first { n in !l.nics.contains { $0.id == n } }!
            // The hot-plug side checked the QOM ids; a launch NIC without one has a generated id.
            if let id, l.nics.contains(where: { $0.id == id }) { throw .duplicateID(id) }
            if let netdev {
                guard let n = l.netdevs.first(where: { $0.id == netdev }) else {
                    throw .netdevNotFound(driver: driver, netdev: netdev)
                }
                if let user = l.nics.first(where: { $0.netdev == netdev }) {
                    throw .netdevInUse(driver: driver, netdev: netdev, user: user.id)
                }
                backend = n
            } else {
                let u = DisconnectedNetwork(id: "\(nicID)-unconnected")
                unconnected = u
                backend = u
            }
            let address = mac ?? (0..<256).lazy.map { MACAddress.qemuDefault(index: $0) }
                .first { m in !l.nics.contains { $0.device.mac == m.bytes } } ?? MACAddress.qemuDefault(index: l.nics.count)
            let device = VirtioNet(mac: address.bytes, backend: backend, name: name, logger: MachineDevices.logger("machine.virtio-net"))
            let nic = NIC(id: nicID, driver: driver, device: device, netdev: netdev, unconnected: unconnected, hotPlugged: true)
            l.nics.append(nic)
            return nic
        }
    }

    /// Removes a hot-plugged NIC once its function left the bus: the NIC stops on its backend's
    /// thread (no frame reaches it, it touches no guest RAM afterwards), the netdev lets go of
    /// it (free for another NIC or netdev_del, its link up again: `set_link` on the NIC had set
    /// both), and a NIC without a netdev has its thread stopped. Control queue.
    func unplugNIC(id: String) {
        lists.withLock { l in
            guard let i = l.nics.firstIndex(where: { $0.id == id && $0.hotPlugged }) else { return }
            let nic = l.nics.remove(at: i)
            // Under the lock, so that no device_add claims the netdev before it is free.
            nic.device.reset()            // on the backend's thread: the NIC forgets its queues
            nic.device.backend.detach()   // on the backend's thread: no frame is offered to it again
            nic.device.backend.linkUp = true
            nic.unconnected?.close()
        }
    }

    /// The backends whose state goes into saved states (user networks), in description order.
    var statefulBackends: [any ManagedDevice] {
        lists.withLock { $0.netdevs.compactMap { $0 as? SlirpNetwork } }
    }

    /// Hands over the machine, registering the launch-time user networks with its device manager.
    func attach(to machine: VirtualMachine) throws {
        machineBox.withLock { $0 = machine }
        for b in statefulBackends { try machine.addManagedDevice(b) }
    }

    /// Closes every netdev and the threads of hot-plugged NICs without one (after the machine stopped).
    func close() {
        let (netdevs, unconnected) = lists.withLock { l in (l.netdevs, l.nics.compactMap(\.unconnected)) }
        for n in netdevs { n.close() }
        for u in unconnected { u.close() }
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
            l.specs.append(netdev)
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
            l.specs.removeAll { $0.id == id }
            return l.netdevs.remove(at: i)
        }
        if let slirp = removed as? SlirpNetwork { machineBox.withLock { $0 }?.removeManagedDevice(slirp) }
        removed.close()
    }

    func setLink(name: String, up: Bool) throws {
        // Under the lock, so that a NIC's unplug (which sets its netdev's link up again) does not
        // interleave with it.
        try lists.withLock { l in
            let nic = l.nics.first { $0.id == name } ?? l.nics.first { $0.netdev == name }
            let netdev = l.netdevs.first { $0.id == name }
            guard nic != nil || netdev != nil else { throw QMPError(.deviceNotFound, "Device '\(name)' not found") }
            if let nic { nic.device.setLink(up: up) } else { netdev?.linkUp = up }
        }
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
