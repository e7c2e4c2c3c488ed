import Foundation
import Dispatch
import Machine
import Schema

/// The migration commands: thin handlers over `MachineMigration`.
extension QMPCommandExecutor {
    private var migration: any MachineMigration {
        get throws {
            guard let m = controlForMigration as? any MachineMigration else {
                throw QMPError(.genericError, "this machine cannot save its state")
            }
            return m
        }
    }

    /// Starts migrating the machine to `uri`.
    public func migrate(_ arguments: MigrateArguments) throws {
        if arguments.resume == true {
            throw QMPError(.genericError, "Parameter 'resume' is not supported: there is no paused migration to resume")
        }
        let m = try migration
        let uri = try resolveDescriptorURI(arguments.uri, numericAllowed: false)
        do {
            try m.startMigration(uri: uri)
        } catch {
            // Refused before it started: the descriptor taken from the table is still ours.
            if uri != arguments.uri, let fd = Int32(uri.dropFirst(3)) { close(fd) }
            if let e = error as? QMPError { throw e }
            throw QMPError(.genericError, "\(error)")
        }
    }

    /// The current or last migration's state, with QEMU's fields.
    public func queryMigrate() throws -> MigrationInfo {
        let p = try migration.migrationProgress()
        guard p.status != .none else { return MigrationInfo() }
        let status = Schema.MigrationStatus(rawValue: p.status.rawValue) ?? .failed
        var info = MigrationInfo(status: status)
        if p.status != .setup {
            let pageSize: UInt64 = 4096
            info.ram = MigrationStats(transferred: Int64(p.transferred), remaining: Int64(p.remaining), total: Int64(p.ramTotal),
                                      duplicate: Int64(p.zeroPages), normal: Int64(p.normalPages),
                                      normalBytes: Int64(p.normalPages * pageSize), mbps: p.mbps,
                                      dirtyPagesRate: Int64(p.dirtyPagesRate), dirtySyncCount: Int64(p.dirtySyncCount),
                                      pagesPerSecond: Int64(p.pagesPerSecond), postcopyRequests: Int64(p.postcopyRequests))
        }
        switch p.status {
        case .active, .cancelling, .postcopyActive:
            info.totalTime = Int64(p.startedAt == 0 ? p.totalTime : (DispatchTime.now().uptimeNanoseconds &- p.startedAt) / 1_000_000)
            info.setupTime = Int64(p.setupTime)
            info.expectedDowntime = Int64(p.expectedDowntime)
        case .completed, .failed, .cancelled, .postcopyPaused:
            info.totalTime = Int64(p.totalTime)
            info.setupTime = Int64(p.setupTime)
        default:
            break
        }
        if p.throttlePercentage > 0 { info.cpuThrottlePercentage = Int64(p.throttlePercentage) }
        if p.status == .completed { info.downtime = Int64(p.downtime) }
        if let e = p.error { info.errorDesc = e }
        return info
    }

    /// Receives a machine state from `uri` into a machine waiting with `--incoming defer`.
    public func migrateIncoming(_ arguments: MigrateIncomingArguments) throws {
        guard controlForMigration.runState == .inmigrate, try migration.migrationProgress().status == .none else {
            throw QMPError(.genericError, "The incoming migration has already been started or the machine was not started with --incoming defer")
        }
        let m = try migration
        let uri = try resolveDescriptorURI(arguments.uri, numericAllowed: true)
        do {
            try m.incomingMigration(uri: uri)
        } catch let e as QMPError {
            throw e
        } catch {
            throw QMPError(.genericError, "\(error)")
        }
    }

    /// Cancels the outgoing migration in progress.
    public func migrateCancel() throws {
        try migration.cancelMigration()
    }

    /// Switches the outgoing migration to post-copy.
    public func migrateStartPostcopy() throws {
        do {
            try migration.startPostcopy()
        } catch let e as QMPError {
            throw e
        } catch {
            throw QMPError(.genericError, "\(error)")
        }
    }

    /// Changes the migration parameters given; each is checked against its range first, so a
    /// refused call changes nothing.
    public func migrateSetParameters(_ a: MigrateSetParametersArguments) throws {
        let m = try migration
        var p = m.migrationParameters()
        func check(_ v: Int64?, _ name: String, _ range: ClosedRange<Int64>) throws -> Int64? {
            guard let v else { return nil }
            guard range.contains(v) else {
                throw QMPError(.genericError, "Parameter '\(name)' expects a value between \(range.lowerBound) and \(range.upperBound)")
            }
            return v
        }
        if let v = try check(a.downtimeLimit, "downtime-limit", 0...2_000_000) { p.downtimeLimit = UInt64(v) }
        // QEMU takes any size_t (libvirt asks for about 8 EiB/s, "unlimited", before a save).
        if let v = try check(a.maxBandwidth, "max-bandwidth", 0...Int64.max) { p.maxBandwidth = UInt64(v) }
        if let v = try check(a.cpuThrottleInitial, "cpu-throttle-initial", 1...99) { p.throttleInitial = Int(v) }
        if let v = try check(a.cpuThrottleIncrement, "cpu-throttle-increment", 1...99) { p.throttleIncrement = Int(v) }
        if let v = try check(a.maxCpuThrottle, "max-cpu-throttle", 1...99) { p.maxThrottle = Int(v) }
        if let v = try check(a.maxPostcopyBandwidth, "max-postcopy-bandwidth", 0...Int64(Int32.max) * 1024) {
            p.maxPostcopyBandwidth = UInt64(v)
        }
        m.setMigrationParameters(p)
    }

    public func queryMigrateParameters() throws -> Schema.MigrationParameters {
        let p = try migration.migrationParameters()
        return Schema.MigrationParameters(downtimeLimit: Int64(p.downtimeLimit), maxBandwidth: Int64(p.maxBandwidth),
                                   cpuThrottleInitial: Int64(p.throttleInitial), cpuThrottleIncrement: Int64(p.throttleIncrement),
                                   maxCpuThrottle: Int64(p.maxThrottle), maxPostcopyBandwidth: Int64(p.maxPostcopyBandwidth))
    }

    public func migrateSetCapabilities(_ a: MigrateSetCapabilitiesArguments) throws {
        let m = try migration
        var c = m.migrationCapabilities()
        for entry in a.capabilities {
            switch entry.capability {
            case .events: c.events = entry.state
            case .autoConverge: c.autoConverge = entry.state
            case .returnPath:
                // The destination always answers on the migration connection (the switch-over
                // is confirmed there), which is what QEMU's return-path switches on.
                // Turning it off (libvirt does after each migration) is accepted and changes
                // nothing: query-migrate-capabilities keeps reporting it on.
                break
            case .postcopyRam: c.postcopyRam = entry.state
            }
        }
        do {
            try m.setMigrationCapabilities(c)
        } catch {
            throw QMPError(.genericError, "\(error)")
        }
    }

    public func queryMigrateCapabilities() throws -> [MigrationCapabilityStatus] {
        // A machine that cannot migrate (machine none, which libvirt probes) has them all off.
        let c = (controlForMigration as? any MachineMigration)?.migrationCapabilities() ?? MigrationCapabilities()
        let canMigrate = controlForMigration is any MachineMigration
        return [MigrationCapabilityStatus(capability: .events, state: c.events),
                MigrationCapabilityStatus(capability: .autoConverge, state: c.autoConverge),
                MigrationCapabilityStatus(capability: .postcopyRam, state: c.postcopyRam),
                MigrationCapabilityStatus(capability: .returnPath, state: canMigrate)]
    }
}
