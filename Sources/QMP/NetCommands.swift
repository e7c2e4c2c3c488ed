import Schema

/// The machine's network as QMP sees it: netdevs (added and removed at run time, forwarding
/// rules), NICs (link state, receive filter) and the HMP `info network` text. Implemented by
/// whoever builds the machine (machine-server); every member may be called from any thread.
/// Failures are `QMPError`s with QEMU's classes and messages.
public protocol NetworkRegistry: AnyObject, Sendable {
    /// Builds and adds a netdev (`netdev_add`).
    func addNetdev(_ netdev: Netdev) throws
    /// Closes and removes a netdev no NIC uses (`netdev_del`).
    func removeNetdev(id: String) throws
    /// Sets the link of a NIC, or of the NIC on a netdev, up or down (`set_link`).
    func setLink(name: String, up: Bool) throws
    /// The receive filters of every NIC or of the one named (`query-rx-filter`).
    func rxFilters(name: String?) throws -> [RxFilterInfo]
    /// HMP `info network`.
    func infoNetwork() -> String
    /// HMP `info usernet`: the connections of every user netdev.
    func infoUsernet() -> String
    /// HMP `hostfwd_add [netdev] rule`; the only user netdev when `netdev` is nil.
    func addHostForward(netdev: String?, rule: String) throws
    /// HMP `hostfwd_remove [netdev] [tcp|udp]:[hostaddr]:hostport`.
    func removeHostForward(netdev: String?, rule: String) throws
}

extension QMPCommandExecutor {
    private var network: any NetworkRegistry {
        get throws {
            guard let n = devices?.network else { throw QMPError(.genericError, "The machine has no network support") }
            return n
        }
    }

    /// Adds a netdev.
    public func netdevAdd(_ arguments: Netdev) throws { try network.addNetdev(arguments) }

    /// Removes a netdev.
    public func netdevDel(_ arguments: NetdevDelArguments) throws { try network.removeNetdev(id: arguments.id) }

    /// Sets a link up or down.
    public func setLink(_ arguments: SetLinkArguments) throws { try network.setLink(name: arguments.name, up: arguments.up) }

    /// The NICs' receive filters.
    public func queryRxFilter(_ arguments: QueryRxFilterArguments) throws -> [RxFilterInfo] {
        try network.rxFilters(name: arguments.name)
    }

    /// The network HMP commands: `info network`, `info usernet`, `hostfwd_add`, `hostfwd_remove`;
    /// nil for any other command line.
    func networkHMP(_ words: [String]) -> String? {
        func run(_ body: () throws -> Void) -> String {
            do {
                try body()
                return ""
            } catch {
                return QMPError.from(error).desc + "\r\n"
            }
        }
        switch (words.first, words.count) {
        case ("info", 2) where words[1] == "network":
            return (try? network.infoNetwork()) ?? "The machine has no network support\r\n"
        case ("info", 2) where words[1] == "usernet":
            return (try? network.infoUsernet()) ?? "The machine has no network support\r\n"
        case ("hostfwd_add", 2), ("hostfwd_add", 3):
            return run { try network.addHostForward(netdev: words.count == 3 ? words[1] : nil, rule: words[words.count - 1]) }
        case ("hostfwd_remove", 2), ("hostfwd_remove", 3):
            return run { try network.removeHostForward(netdev: words.count == 3 ? words[1] : nil, rule: words[words.count - 1]) }
        case ("hostfwd_add", _), ("hostfwd_remove", _):
            return "usage: \(words[0]) [netdev_id] \(words[0] == "hostfwd_add" ? "[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport" : "[tcp|udp]:[hostaddr]:hostport")\r\n"
        default:
            return nil
        }
    }
}
