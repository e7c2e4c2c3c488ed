import Foundation

/// The snapshot table as QEMU prints it (qemu-img snapshot -l, qemu-img info, HMP info
/// snapshots): written once for machine-img and the monitor.
public enum SnapshotTable {
    /// QEMU's size_to_str: "512 B", "14.5 MiB".
    public static func humanSize(_ n: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var v = Double(n), i = 0
        while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
        if i == 0 { return "\(n) B" }
        return String(format: "%.3g", v) + " " + units[i]
    }

    /// The header and one line per snapshot. `idColumn` replaces each snapshot's ID (HMP's
    /// info snapshots prints "--" for snapshots present on all disks).
    public static func lines(_ snaps: [SnapshotListing], idColumn: String? = nil) -> [String] {
        func pad(_ s: String, _ n: Int, right: Bool = false) -> String {
            s.count >= n ? s : (right ? String(repeating: " ", count: n - s.count) + s : s + String(repeating: " ", count: n - s.count))
        }
        var lines = [pad("ID", 10) + pad("TAG", 17) + pad("VM SIZE", 8, right: true) + pad("DATE", 20, right: true)
                     + pad("VM CLOCK", 13, right: true) + pad("ICOUNT", 11, right: true)]
        let df = DateFormatter()
        df.dateFormat = "yyyy-MM-dd HH:mm:ss"
        for s in snaps {
            let date = df.string(from: Date(timeIntervalSince1970: TimeInterval(s.dateSeconds)))
            let ns = s.vmClockNanoseconds
            let clock = String(format: "%02llu:%02llu:%02llu.%03llu", ns / 3_600_000_000_000, ns / 60_000_000_000 % 60,
                               ns / 1_000_000_000 % 60, ns / 1_000_000 % 1000)
            lines.append(pad(idColumn ?? s.id, 9) + " " + pad(s.name, 16) + " " + pad(humanSize(s.vmStateSize), 8, right: true)
                         + pad(date, 20, right: true) + pad(clock, 13, right: true)
                         + pad(s.icount.map(String.init) ?? "", 11, right: true))
        }
        return lines
    }
}
