import Foundation
import Machine
import Schema

/// Internal snapshots and jobs: thin handlers over `MachineSnapshots`, and the HMP words
/// savevm, loadvm, delvm and info snapshots written over the same calls.
extension QMPCommandExecutor {
    private var snapshots: any MachineSnapshots {
        get throws {
            guard let m = controlForMigration as? any MachineSnapshots else {
                throw QMPError(.genericError, "this machine has no snapshot support")
            }
            return m
        }
    }

    /// Runs `body`, turning its error into a GenericError with the error's own words.
    private func generic<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as QMPError {
            throw e
        } catch {
            throw QMPError(.genericError, "\(error)")
        }
    }

    public func queryJobs() throws -> [Schema.JobInfo] {
        try snapshots.jobs().map { j in
            Schema.JobInfo(id: j.id, type: Schema.JobType(rawValue: j.kind.rawValue) ?? .snapshotSave,
                           status: Schema.JobStatus(rawValue: j.status.rawValue) ?? .undefined,
                           currentProgress: Int64(j.currentProgress), totalProgress: Int64(j.totalProgress), error: j.error)
        }
    }

    public func jobDismiss(_ arguments: JobDismissArguments) throws {
        let s = try snapshots
        try generic { try s.dismissJob(id: arguments.id) }
    }

    public func snapshotSave(_ arguments: SnapshotSaveArguments) throws {
        let s = try snapshots
        try generic {
            try s.startSnapshotJob(.save, jobID: arguments.jobId, tag: arguments.tag, vmstate: arguments.vmstate,
                                   devices: arguments.devices)
        }
    }

    public func snapshotLoad(_ arguments: SnapshotLoadArguments) throws {
        let s = try snapshots
        try generic {
            try s.startSnapshotJob(.load, jobID: arguments.jobId, tag: arguments.tag, vmstate: arguments.vmstate,
                                   devices: arguments.devices)
        }
    }

    public func snapshotDelete(_ arguments: SnapshotDeleteArguments) throws {
        let s = try snapshots
        try generic {
            try s.startSnapshotJob(.delete, jobID: arguments.jobId, tag: arguments.tag, vmstate: nil,
                                   devices: arguments.devices)
        }
    }

    /// HMP savevm/loadvm/delvm/info snapshots; nil for other command lines. Errors are printed
    /// as HMP prints them ("Error: ..."), not raised.
    func snapshotHMP(_ words: [String]) -> String? {
        let s: any MachineSnapshots
        do {
            s = try snapshots
        } catch {
            return "Error: \((error as? QMPError)?.desc ?? "\(error)")\r\n"
        }
        func run(_ body: () throws -> Void) -> String {
            do {
                try body()
                return ""
            } catch {
                return "Error: \(error)\r\n"
            }
        }
        switch (words[0], words.count) {
        case ("savevm", 1):
            let formatter = DateFormatter()
            formatter.dateFormat = "yyyyMMddHHmmss"
            let tag = "vm-" + formatter.string(from: Date())
            return run { try s.saveSnapshot(tag: tag) }
        case ("savevm", 2): return run { try s.saveSnapshot(tag: words[1]) }
        case ("loadvm", 2): return run { try s.loadSnapshot(tag: words[1]) }
        case ("delvm", 2): return run { try s.deleteSnapshot(tag: words[1]) }
        case ("info", 2) where words[1] == "snapshots":
            let list: [SnapshotListing]
            do {
                list = try s.listSnapshots()
            } catch {
                return "Error: \(error)\r\n"
            }
            if list.isEmpty { return "There is no snapshot available.\r\n" }
            return "List of snapshots present on all disks:\r\n"
                + SnapshotTable.lines(list, idColumn: "--").map { $0 + "\r\n" }.joined()
        default:
            return nil
        }
    }
}
