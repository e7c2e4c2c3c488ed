import Foundation

/// The machine's shape as a saved state records it: what a state can only be loaded into a
/// machine of the same shape for (CPU count, RAM size, and the devices in slot order with their
/// drivers). File paths, listeners and names may differ, as between two hosts of a migration.
enum StateIdentity {
    /// Canonical JSON of the plan's shape.
    static func of(_ plan: LaunchPlan) -> String {
        // virtio-mmio devices keep the form older states recorded; PCI ones add their slot.
        let devices = plan.devices.map { d in
            let addr = d.pciLocation.map { ",\"addr\":\(quote($0))" } ?? ""
            return "{\"driver\":\(quote(d.driver)),\"id\":\(quote(d.id))\(addr)}"
        }
        return "{\"board\":\"virt\",\"cpus\":\(plan.cpuCount),\"memory\":\(plan.memoryBytes),\"devices\":[\(devices.joined(separator: ","))]}"
    }

    private static func quote(_ s: String) -> String {
        let data = try? JSONSerialization.data(withJSONObject: [s], options: [.withoutEscapingSlashes])
        let text = data.flatMap { String(data: $0, encoding: .utf8) } ?? "[\"?\"]"
        return String(text.dropFirst().dropLast())
    }

    /// Names the first difference between a saved identity and this machine's.
    static func describeMismatch(saved: String, current: String) -> String {
        func parse(_ s: String) -> [String: Any]? {
            (try? JSONSerialization.jsonObject(with: Data(s.utf8))) as? [String: Any]
        }
        guard let a = parse(saved), let b = parse(current) else { return "the saved machine description is unreadable" }
        for key in ["board", "cpus", "memory"] where "\(a[key] ?? "none")" != "\(b[key] ?? "none")" {
            return "\(key): saved \(a[key] ?? "none"), this machine \(b[key] ?? "none")"
        }
        let da = (a["devices"] as? [[String: String]]) ?? [], db = (b["devices"] as? [[String: String]]) ?? []
        for i in 0..<max(da.count, db.count) {
            func show(_ d: [String: String]) -> String {
                "\(d["driver"] ?? "?") '\(d["id"] ?? "?")'" + (d["addr"].map { " at \($0)" } ?? "")
            }
            let x = i < da.count ? show(da[i]) : "none"
            let y = i < db.count ? show(db[i]) : "none"
            if x != y { return "devices[\(i)]: saved \(x), this machine \(y)" }
        }
        return "the machine descriptions differ"
    }
}
