import CSlirp
import Foundation
import Machine

/// `-netdev user`: user-mode NAT on libslirp. The guest reaches the host and the outside through
/// the host's own sockets; DHCP, DNS forwarding, `hostfwd` and `guestfwd` as in QEMU.
///
/// Threading: libslirp is not thread-safe; every call into it happens on this backend's loop
/// thread (the public methods hop there with `perform`).
public final class SlirpNetwork: NetworkLoop, StatefulDevice, @unchecked Sendable {  // unchecked: libslirp and its state are touched on the loop thread only
    /// The options the network was built with (hostfwd rules added later are in `hostForwards`).
    public let options: UserNetworkOptions

    // Loop thread only.
    private nonisolated(unsafe) var slirp: OpaquePointer?
    private let callbacks: UnsafeMutablePointer<SlirpCb>
    private nonisolated(unsafe) var timers: [ObjectIdentifier: SlirpTimer] = [:]
    private nonisolated(unsafe) var pollSet: [pollfd] = []
    private nonisolated(unsafe) var pollBase = 0
    private nonisolated(unsafe) var polled: [pollfd] = []
    private nonisolated(unsafe) var forwards: [HostForward] = []

    final class SlirpTimer {
        let id: SlirpTimerId
        let opaque: UnsafeMutableRawPointer?
        var expire: Int64 = -1
        init(id: SlirpTimerId, opaque: UnsafeMutableRawPointer?) {
            self.id = id
            self.opaque = opaque
        }
    }

    public override var kind: String { "user" }

    /// "netdev:ID": the network's section in saved states.
    public var stateSection: String { "netdev:\(id)" }
    /// A system reset leaves the network as it is (as QEMU's does): connections survive reboots.
    public func reset() {}

    /// Creates the network and sets up its forwards; throws naming the rule that failed (a host
    /// port in use, for instance) after releasing everything.
    public init(id: String, options: UserNetworkOptions) throws(NetError) {
        self.options = options
        callbacks = .allocate(capacity: 1)
        callbacks.initialize(to: SlirpCb())
        super.init(id: id)
        callbacks.pointee.send_packet = { buf, len, opaque in
            let net = Unmanaged<SlirpNetwork>.fromOpaque(opaque!).takeUnretainedValue()
            net.deliver(UnsafeRawBufferPointer(start: buf, count: len))
            return len
        }
        callbacks.pointee.guest_error = { msg, opaque in
            let net = Unmanaged<SlirpNetwork>.fromOpaque(opaque!).takeUnretainedValue()
            FileHandle.standardError.write(Data("machine-server: netdev \(net.id): guest error: \(String(cString: msg!))\n".utf8))
        }
        callbacks.pointee.clock_get_ns = { _ in SlirpNetwork.nowNanoseconds() }
        callbacks.pointee.timer_new_opaque = { id, cbOpaque, opaque in
            let net = Unmanaged<SlirpNetwork>.fromOpaque(opaque!).takeUnretainedValue()
            let t = SlirpTimer(id: id, opaque: cbOpaque)
            net.timers[ObjectIdentifier(t)] = t
            return Unmanaged.passUnretained(t).toOpaque()
        }
        callbacks.pointee.timer_free = { timer, opaque in
            let net = Unmanaged<SlirpNetwork>.fromOpaque(opaque!).takeUnretainedValue()
            let t = Unmanaged<SlirpTimer>.fromOpaque(timer!).takeUnretainedValue()
            net.timers[ObjectIdentifier(t)] = nil
        }
        callbacks.pointee.timer_mod = { timer, expire, _ in
            Unmanaged<SlirpTimer>.fromOpaque(timer!).takeUnretainedValue().expire = expire
        }
        callbacks.pointee.register_poll_fd = { _, _ in }
        callbacks.pointee.unregister_poll_fd = { _, _ in }
        callbacks.pointee.notify = { opaque in
            Unmanaged<SlirpNetwork>.fromOpaque(opaque!).takeUnretainedValue().wake()
        }

        var cfg = SlirpConfig()
        cfg.version = 4
        cfg.restricted = options.restrict ? 1 : 0
        cfg.in_enabled = true
        cfg.vnetwork = options.network.inAddr
        cfg.vnetmask = options.mask.inAddr
        cfg.vhost = options.host.inAddr
        cfg.in6_enabled = false
        cfg.vdhcp_start = options.dhcpStart.inAddr
        cfg.vnameserver = options.dns.inAddr
        cfg.if_mtu = 1500
        cfg.if_mru = 1500
        let hostname = options.hostname.map { strdup($0) } ?? nil
        let domain = options.domainName.map { strdup($0) } ?? nil
        defer { free(hostname); free(domain) }
        cfg.vhostname = UnsafePointer(hostname)
        cfg.vdomainname = UnsafePointer(domain)
        slirp = slirp_new(&cfg, callbacks, Unmanaged.passUnretained(self).toOpaque())
        guard slirp != nil else {
            close()
            throw NetError("netdev '\(id)': libslirp refused the configuration")
        }
        do {
            for f in options.hostForwards { try addForwardOnLoop(f) }
            for g in options.guestForwards {
                var addr = g.server.inAddr
                guard slirp_add_exec(slirp, g.command, &addr, Int32(g.port)) >= 0 else {
                    throw NetError("Invalid guest forwarding rule '\(g)' (conflicting or invalid)")
                }
            }
        } catch {
            close()   // no thread yet: releases libslirp and the wake pipe here
            throw error as! NetError
        }
        start()
    }

    static func nowNanoseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    public override var summary: String {
        var out = "net=\(options.network),restrict=\(options.restrict ? "on" : "off")"
        let rules = hostForwards
        if !rules.isEmpty { out += ",hostfwd=" + rules.map(\.description).joined(separator: "|") }
        return out
    }

    /// The host forwarding rules now in force, in the order they were added.
    public var hostForwards: [HostForward] {
        let box = UnsafeSendableBox(value: [HostForward]())
        perform(wait: true) { box.value = self.forwards }
        return box.value
    }

    private func addForwardOnLoop(_ f: HostForward) throws(NetError) {
        guard let slirp else { throw NetError("netdev '\(id)' is closed") }
        let guest = f.guestAddress ?? options.dhcpStart
        guard guest.value & options.mask.value == options.network.value else {
            throw NetError("Invalid host forwarding rule '\(f)' (guest address \(guest) is not in the guest network)")
        }
        guard slirp_add_hostfwd(slirp, f.udp ? 1 : 0, f.hostAddress.inAddr, Int32(f.hostPort), guest.inAddr, Int32(f.guestPort)) >= 0 else {
            throw NetError("Could not set up host forwarding rule '\(f)': \(f.hostAddress):\(f.hostPort) cannot be bound (in use?)")
        }
        forwards.append(f)
    }

    /// Adds a forwarding rule (HMP `hostfwd_add`); throws when its host port cannot be bound.
    public func addHostForward(_ f: HostForward) throws(NetError) {
        let box = UnsafeSendableBox<NetError?>(value: nil)
        perform(wait: true) {
            do { try self.addForwardOnLoop(f) } catch { box.value = error as? NetError }
        }
        if let e = box.value { throw e }
    }

    /// Removes the rule listening on the host side given (HMP `hostfwd_remove`).
    public func removeHostForward(udp: Bool, address: IPv4Address, port: UInt16) throws(NetError) {
        let box = UnsafeSendableBox<NetError?>(value: nil)
        perform(wait: true) {
            let proto = udp ? "udp" : "tcp"
            guard let slirp = self.slirp, slirp_remove_hostfwd(slirp, udp ? 1 : 0, address.inAddr, Int32(port)) >= 0 else {
                box.value = NetError("host forwarding rule for \(proto):\(address == .any ? "" : address.description):\(port) not found")
                return
            }
            self.forwards.removeAll { $0.udp == udp && $0.hostPort == port && $0.hostAddress == address }
        }
        if let e = box.value { throw e }
    }

    /// libslirp's description of its connections (HMP `info usernet`).
    public var connectionInfo: String {
        let box = UnsafeSendableBox(value: "")
        perform(wait: true) {
            guard let slirp = self.slirp, let s = slirp_connection_info(slirp) else { return }
            box.value = String(cString: s)
            free(s)
        }
        return box.value
    }

    public override func send(_ frame: UnsafeRawBufferPointer) {
        guard linkUp, let slirp, let base = frame.baseAddress else {
            droppedFrames += 1
            return
        }
        slirp_input(slirp, base.assumingMemoryBound(to: UInt8.self), Int32(frame.count))
    }

    public override func fillPoll(_ fds: inout [pollfd]) -> Int32 {
        guard let slirp else { return -1 }
        var timeout: UInt32 = UInt32.max
        pollSet.removeAll(keepingCapacity: true)
        slirp_pollfds_fill(slirp, &timeout, { fd, events, opaque in
            let net = Unmanaged<SlirpNetwork>.fromOpaque(opaque!).takeUnretainedValue()
            var e: Int16 = 0
            if events & Int32(SLIRP_POLL_IN) != 0 { e |= Int16(POLLIN) }
            if events & Int32(SLIRP_POLL_OUT) != 0 { e |= Int16(POLLOUT) }
            if events & Int32(SLIRP_POLL_PRI) != 0 { e |= Int16(POLLPRI) }
            net.pollSet.append(pollfd(fd: fd, events: e, revents: 0))
            return Int32(net.pollSet.count - 1)
        }, Unmanaged.passUnretained(self).toOpaque())
        pollBase = fds.count
        fds.append(contentsOf: pollSet)
        let nowMs = Self.nowNanoseconds() / 1_000_000
        var wait = Int64(timeout == UInt32.max ? 1000 : timeout)
        for t in timers.values where t.expire >= 0 { wait = min(wait, max(0, t.expire - nowMs)) }
        return Int32(wait)
    }

    public override func handlePoll(_ fds: [pollfd], error: Bool) {
        guard let slirp else { return }
        polled = fds
        slirp_pollfds_poll(slirp, error ? 1 : 0, { idx, opaque in
            let net = Unmanaged<SlirpNetwork>.fromOpaque(opaque!).takeUnretainedValue()
            let i = net.pollBase + Int(idx)
            guard idx >= 0, i < net.polled.count else { return 0 }
            let r = Int32(net.polled[i].revents)
            var out: Int32 = 0
            if r & Int32(POLLIN) != 0 { out |= Int32(SLIRP_POLL_IN) }
            if r & Int32(POLLOUT) != 0 { out |= Int32(SLIRP_POLL_OUT) }
            if r & Int32(POLLPRI) != 0 { out |= Int32(SLIRP_POLL_PRI) }
            if r & Int32(POLLERR) != 0 { out |= Int32(SLIRP_POLL_ERR) }
            if r & Int32(POLLHUP) != 0 { out |= Int32(SLIRP_POLL_HUP) }
            return out
        }, Unmanaged.passUnretained(self).toOpaque())
        let nowMs = Self.nowNanoseconds() / 1_000_000
        for t in Array(timers.values) where t.expire >= 0 && t.expire <= nowMs {
            t.expire = -1
            slirp_handle_timer(slirp, t.id, t.opaque)
        }
    }

    public override func closeResources() {
        if let slirp { slirp_cleanup(slirp) }
        slirp = nil
        timers = [:]
    }

    deinit { callbacks.deallocate() }

    // MARK: Saved state

    /// libslirp's own state (its TCP connections and their buffers) with the forwarding rules,
    /// so a restored machine forwards the same ports. Loop thread (through `perform`).
    public func captureState() -> SlirpState {
        let box = UnsafeSendableBox(value: SlirpState(slirpVersion: 0, slirpState: [], forwards: []))
        perform(wait: true) {
            guard let slirp = self.slirp else { return }
            let sink = ByteSink()
            let opaque = Unmanaged.passUnretained(sink).toOpaque()
            slirp_state_save(slirp, { buf, len, opaque in
                let sink = Unmanaged<ByteSink>.fromOpaque(opaque!).takeUnretainedValue()
                sink.bytes.append(contentsOf: UnsafeRawBufferPointer(start: buf, count: len))
                return len
            }, opaque)
            box.value = SlirpState(slirpVersion: UInt32(slirp_state_version()), slirpState: sink.bytes,
                                   forwards: self.forwards.map(\.description))
        }
        return box.value
    }

    /// Loads a state `captureState` made: adds the saved forwarding rules this network lacks,
    /// then hands libslirp its state. Throws naming the part libslirp or a rule refused.
    public func applyState(_ s: SlirpState) throws(SavedStateError) {
        let section = stateSection
        var parsed: [HostForward] = []
        for (i, r) in s.forwards.enumerated() {
            do {
                parsed.append(try HostForward.parse(r))
            } catch {
                throw SavedStateError(section: section, field: "forwards[\(i)]", reason: error.description)
            }
        }
        guard s.slirpVersion <= UInt32(slirp_state_version()) else {
            throw SavedStateError(section: section, field: "slirp-version",
                                  reason: "libslirp state version \(s.slirpVersion) is newer than this libslirp's \(slirp_state_version())")
        }
        let box = UnsafeSendableBox<SavedStateError?>(value: nil)
        let rules = parsed
        perform(wait: true) {
            guard let slirp = self.slirp else { return }
            for f in rules where !self.forwards.contains(f) {
                do { try self.addForwardOnLoop(f) } catch {
                    FileHandle.standardError.write(Data("machine-server: netdev \(self.id): restoring forward: \(error)\n".utf8))
                }
            }
            guard !s.slirpState.isEmpty else { return }
            let source = ByteSource(bytes: s.slirpState)
            let rc = slirp_state_load(slirp, Int32(s.slirpVersion), { buf, len, opaque in
                let src = Unmanaged<ByteSource>.fromOpaque(opaque!).takeUnretainedValue()
                let n = min(len, src.bytes.count - src.position)
                guard n > 0 else { return 0 }
                src.bytes.withUnsafeBytes { buf!.copyMemory(from: $0.baseAddress! + src.position, byteCount: n) }
                src.position += n
                return n
            }, Unmanaged.passUnretained(source).toOpaque())
            if rc < 0 {
                box.value = SavedStateError(section: section, field: "slirp-state", reason: "libslirp refused its saved state (error \(rc))")
            }
        }
        if let e = box.value { throw e }
    }
}

private final class ByteSink { var bytes: [UInt8] = [] }
private final class ByteSource {
    let bytes: [UInt8]
    var position = 0
    init(bytes: [UInt8]) { self.bytes = bytes }
}

/// A value carried out of a `perform` closure; the wait in `perform` orders the accesses.
final class UnsafeSendableBox<T>: @unchecked Sendable {  // unchecked: written before and read after the wait in `perform`
    var value: T
    init(value: T) { self.value = value }
}

/// The saved state of a user network: libslirp's own bytes and version, and the rules forwarding
/// host ports in force when it was saved.
public struct SlirpState: DeviceState {
    public static let version: UInt32 = 1
    /// `slirp_state_version()` of the libslirp that wrote `slirpState`.
    public var slirpVersion: UInt32
    /// What `slirp_state_save` wrote.
    public var slirpState: [UInt8]
    /// The host forwarding rules, in QEMU's syntax.
    public var forwards: [String]

    public init(slirpVersion: UInt32, slirpState: [UInt8], forwards: [String]) {
        self.slirpVersion = slirpVersion
        self.slirpState = slirpState
        self.forwards = forwards
    }

    public func encode(to w: inout StateWriter) {
        w.u32(slirpVersion)
        w.bytes(slirpState)
        w.count(forwards.count)
        for f in forwards { w.string(f) }
    }

    public init(from r: inout StateReader, version: UInt32) throws(SavedStateError) {
        slirpVersion = try r.u32("slirp-version")
        slirpState = try r.bytes("slirp-state", limit: 256 << 20)
        let n = try r.count("forwards", limit: 4096, minimumElementSize: 4)
        var f: [String] = []
        for i in 0..<n { f.append(try r.string("forwards[\(i)]", limit: 256)) }
        forwards = f
    }
}
