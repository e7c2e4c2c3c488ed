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

    /// Starts saving the machine's state to `uri`.
    public func migrate(_ arguments: MigrateArguments) throws {
        if arguments.resume == true {
            throw QMPError(.genericError, "Parameter 'resume' is not supported: there is no paused migration to resume")
        }
        do {
            try migration.startMigration(uri: arguments.uri)
        } catch let e as QMPError {
            throw e
        } catch {
            throw QMPError(.genericError, "\(error)")
        }
    }

    /// The current or last migration's state.
    public func queryMigrate() throws -> MigrationInfo {
        let p = try migration.migrationProgress()
        guard p.status != .none else { return MigrationInfo() }
        let status = Schema.MigrationStatus(rawValue: p.status.rawValue) ?? .failed
        var info = MigrationInfo(status: status)
        if p.status != .setup {
            let pageSize: UInt64 = 4096
            let seconds = Double(max(p.downtime, 1)) / 1000
            info.ram = MigrationStats(transferred: Int64(p.transferred), remaining: 0, total: Int64(p.ramTotal),
                                      duplicate: Int64(p.zeroPages), normal: Int64(p.normalPages),
                                      normalBytes: Int64(p.normalPages * pageSize),
                                      mbps: p.status == .completed ? Double(p.transferred) * 8 / 1_000_000 / seconds : 0)
        }
        if p.status == .completed || p.status == .failed {
            info.totalTime = Int64(p.totalTime)
            info.setupTime = Int64(p.setupTime)
        }
        if p.status == .completed { info.downtime = Int64(p.downtime) }
        if let e = p.error { info.errorDesc = e }
        return info
    }

    /// Loads the machine's state from `uri` into a machine waiting with `--incoming defer`.
    public func migrateIncoming(_ arguments: MigrateIncomingArguments) throws {
        guard controlForMigration.runState == .inmigrate else {
            throw QMPError(.genericError, "The incoming migration has already been started or the machine was not started with --incoming defer")
        }
        do {
            try migration.incomingMigration(uri: arguments.uri)
        } catch let e as QMPError {
            throw e
        } catch {
            throw QMPError(.genericError, "\(error)")
        }
    }
}
