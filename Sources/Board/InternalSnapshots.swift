import Foundation
import Machine
import Storage
import Synchronization

/// A disk of the machine as internal snapshots see it: its device id (the name QMP uses) and
/// its image.
public struct SnapshotDisk: Sendable {
    public var id: String
    public var image: any BlockImage
    /// True when the guest cannot write it (such disks are left out of snapshots, as in QEMU).
    public var readOnly: Bool

    public init(id: String, image: any BlockImage, readOnly: Bool) {
        self.id = id
        self.image = image
        self.readOnly = readOnly
    }
}

/// Why a snapshot operation was refused or failed; the message is QEMU's where QEMU has one.
public struct SnapshotError: Error, CustomStringConvertible, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The jobs of a machine (snapshot jobs run one at a time, in order, on their own queue).
final class JobTable: Sendable {
    let jobs = Mutex<[JobInfo]>([])
    let queue = DispatchQueue(label: "machine snapshot jobs")
}

extension VirtualMachine: MachineSnapshots {
    // MARK: Jobs (QMP)

    public func startSnapshotJob(_ kind: SnapshotJobKind, jobID: String, tag: String, vmstate: String?,
                                 devices: [String]) throws {
        try jobTable.jobs.withLock { jobs in
            guard !jobs.contains(where: { $0.id == jobID }) else {
                throw SnapshotError("Job ID '\(jobID)' already in use")
            }
            guard !jobID.isEmpty, jobID.first!.isLetter else { throw SnapshotError("Invalid job ID '\(jobID)'") }
            jobs.append(JobInfo(id: jobID, kind: kind, status: .created))
        }
        emit(.jobStatusChange(id: jobID, status: .created))
        jobTable.queue.async {
            self.setJob(jobID, .running)
            do {
                switch kind {
                case .save: try self.save(tag: tag, vmstate: vmstate ?? "", devices: devices, overwrite: false)
                case .load: try self.load(tag: tag, vmstate: vmstate ?? "", devices: devices)
                case .delete: try self.delete(tag: tag, devices: devices)
                }
                self.setJob(jobID, .waiting, progress: 1)
                self.setJob(jobID, .pending)
            } catch {
                self.setJob(jobID, .aborting, error: "\(error)")
            }
            self.setJob(jobID, .concluded)
        }
    }

    public func jobs() -> [JobInfo] { jobTable.jobs.withLock { $0 } }

    public func dismissJob(id: String) throws {
        try jobTable.jobs.withLock { jobs in
            guard let i = jobs.firstIndex(where: { $0.id == id }) else { throw SnapshotError("Job not found") }
            guard jobs[i].status == .concluded else {
                throw SnapshotError("Job '\(id)' in state '\(jobs[i].status.rawValue)' cannot accept command verb 'dismiss'")
            }
            jobs.remove(at: i)
        }
        emit(.jobStatusChange(id: id, status: .null))
    }

    private func setJob(_ id: String, _ status: JobStatus, progress: Int? = nil, error: String? = nil) {
        jobTable.jobs.withLock { jobs in
            guard let i = jobs.firstIndex(where: { $0.id == id }) else { return }
            jobs[i].status = status
            if let progress { jobs[i].currentProgress = progress }
            if let error { jobs[i].error = error }
        }
        emit(.jobStatusChange(id: id, status: status))
    }

    // MARK: HMP

    public func saveSnapshot(tag: String) throws {
        let (vmstate, devices) = try defaultDisks()
        try save(tag: tag, vmstate: vmstate, devices: devices, overwrite: true)
    }

    public func loadSnapshot(tag: String) throws {
        let (vmstate, devices) = try defaultDisks()
        try load(tag: tag, vmstate: vmstate, devices: devices)
    }

    public func deleteSnapshot(tag: String) throws {
        let (_, devices) = try defaultDisks()
        try delete(tag: tag, devices: devices)
    }

    public func listSnapshots() throws -> [SnapshotListing] {
        let (vmstate, devices) = try defaultDisks()
        let disks = try resolve(devices)
        guard let first = disks.first(where: { $0.0 == vmstate })?.1 else { return [] }
        return first.snapshots.filter { s in
            s.vmStateSize > 0 && disks.allSatisfy { $0.1.findSnapshot(s.name) != nil || $0.1.findSnapshot(s.id) != nil }
        }.map {
            SnapshotListing(id: $0.id, name: $0.name, vmStateSize: $0.vmStateSize, dateSeconds: $0.dateSeconds,
                            dateNanoseconds: $0.dateNanoseconds, vmClockNanoseconds: $0.vmClockNanoseconds, icount: $0.icount)
        }
    }

    // MARK: The operations

    /// The writable disks (which must all support snapshots) and the first of them, which takes
    /// the machine state — QEMU's choice for HMP savevm.
    private func defaultDisks() throws -> (String, [String]) {
        let writable = snapshotDisks().filter { !$0.readOnly }
        for d in writable where !(d.image is Qcow2Image) {
            throw SnapshotError("Device '\(d.id)' is writable but does not support snapshots")
        }
        guard let first = writable.first else { throw SnapshotError("No block device can accept snapshots") }
        return (first.id, writable.map(\.id))
    }

    /// The named disks' qcow2 images, refusing unknown, read-only and non-qcow2 ones.
    private func resolve(_ ids: [String]) throws -> [(String, Qcow2Image)] {
        let all = snapshotDisks()
        var out: [(String, Qcow2Image)] = []
        for id in ids {
            guard let d = all.first(where: { $0.id == id }) else { throw SnapshotError("Cannot find device='\(id)' nor node-name='\(id)'") }
            guard let q = d.image as? Qcow2Image else { throw SnapshotError("Device '\(id)' is writable but does not support snapshots") }
            guard !d.readOnly else { throw SnapshotError("Device '\(id)' is read-only") }
            guard !out.contains(where: { $0.0 == id }) else { throw SnapshotError("Device '\(id)' is listed twice") }
            out.append((id, q))
        }
        return out
    }

    /// Every writable disk must take part, as QEMU requires.
    private func checkAllWritableListed(_ ids: [String]) throws {
        for d in snapshotDisks() where !d.readOnly && !ids.contains(d.id) {
            throw SnapshotError("Device '\(d.id)' is writable but is not in the list of devices to snapshot")
        }
    }

    private func save(tag: String, vmstate: String, devices: [String], overwrite: Bool) throws {
        guard !tag.isEmpty, tag.utf8.count <= Qcow2Image.maxSnapshotNameBytes else {
            throw SnapshotError("Snapshot name '\(tag)' is empty or longer than \(Qcow2Image.maxSnapshotNameBytes) bytes")
        }
        guard devices.contains(vmstate) else { throw SnapshotError("Device '\(vmstate)' (vmstate) is not in the list of devices") }
        let disks = try resolve(devices)
        try checkAllWritableListed(devices)
        try onControl {
            guard isLive, hasStarted else { throw SnapshotError("the machine is not running") }
            try checkNoHotPluggedDevices()
            try whilePaused(during: .saveVM) {
                let existing = disks.filter { d in d.1.snapshots.contains { $0.name == tag } }
                if !existing.isEmpty {
                    guard overwrite else { throw SnapshotError("Snapshot '\(tag)' already exists in one or more devices") }
                    // By ID: a lookup by tag finds an ID first, which may be another snapshot's.
                    for (_, image) in existing {
                        for old in image.snapshots where old.name == tag { try image.deleteSnapshot(old.id) }
                    }
                }
                let clock = board.clock.nanoseconds
                var done: [Qcow2Image] = []
                do {
                    for (id, image) in disks {
                        if id == vmstate {
                            try image.createSnapshot(name: tag, vmClockNanoseconds: clock) { writer in
                                let sink = StateSink(write: { try writer.write($0) })
                                try MachineStateWriter.write(identity: stateIdentity, sections: collectSections(),
                                                             ram: board.ram, to: sink)
                                try sink.finish()
                            }
                        } else {
                            try image.createSnapshot(name: tag, vmClockNanoseconds: clock)
                        }
                        done.append(image)
                    }
                } catch {
                    // All or nothing: drop what was created on the other disks.
                    for image in done { _ = try? image.deleteSnapshot(tag) }
                    throw error
                }
                return nil
            }
        }
    }

    private func load(tag: String, vmstate: String, devices: [String]) throws {
        guard devices.contains(vmstate) else { throw SnapshotError("Device '\(vmstate)' (vmstate) is not in the list of devices") }
        let disks = try resolve(devices)
        try checkAllWritableListed(devices)
        for (id, image) in disks where image.findSnapshot(tag) == nil {
            throw SnapshotError("Snapshot '\(tag)' does not exist in device '\(id)'")
        }
        let stateImage = disks.first { $0.0 == vmstate }!.1
        guard let snap = stateImage.findSnapshot(tag), snap.vmStateSize > 0 else {
            throw SnapshotError("This is a disk-only snapshot. Revert to it offline using qemu-img")
        }
        try onControl {
            guard isLive, hasStarted else { throw SnapshotError("the machine is not running") }
            try checkNoHotPluggedDevices()
            var loadError: (any Error)? = nil
            try whilePaused(during: .restoreVM) {
                let vmReader = try stateImage.vmStateReader(snapshot: tag)
                let source = StateSource(read: { p, n in try vmReader.read(into: UnsafeMutableRawBufferPointer(start: p, count: n)) })
                let reader = try MachineStateReader(source: source)
                guard reader.identity == stateIdentity else {
                    throw MachineStateError("the snapshot was saved from a different machine: "
                                            + describeIdentityMismatch(reader.identity, stateIdentity))
                }
                try checkSectionsPresent(reader.sections)
                let backup = collectSections()
                do {
                    try applySections(reader.sections)
                    for (_, image) in disks { try image.applySnapshot(tag) }
                } catch {
                    try? applySections(backup)
                    throw error
                }
                do {
                    try reader.loadRAM(into: board.ram)
                    for (_, image) in disks { try image.discardVMState() }
                } catch {
                    loadError = error
                    return .internalError
                }
                return nil
            }
            if let loadError { throw SnapshotError("\(loadError); the machine is stopped (internal-error)") }
        }
    }

    private func delete(tag: String, devices: [String]) throws {
        let disks = try resolve(devices)
        let having = disks.filter { $0.1.findSnapshot(tag) != nil }
        guard !having.isEmpty else { throw SnapshotError("Snapshot '\(tag)' not found") }
        try onControl {
            // Quiesced, so no guest request touches an image while its tables change.
            try whilePaused(during: runState == .running ? .saveVM : runState) {
                for (_, image) in having { try image.deleteSnapshot(tag) }
                return nil
            }
        }
    }
}
