import Foundation

/// A seeded, time-bounded mutation fuzzer for the parsers of outside input, run in-process by
/// the test targets (no coverage feedback: inputs are mutations of committed seeds).
///
/// CI runs each target for a few seconds; `FUZZ_LONG=1` runs each for an hour, and
/// `FUZZ_SECONDS=N` for N seconds. `FUZZ_SEED` picks the random sequence (default fixed, so a
/// CI run is reproducible). Before every execution the input is written to
/// `$TMPDIR/fuzz-<target>.current`, so a crash (a trap ends the process) leaves its input
/// behind. Used from tests only; not thread-safe (one target per call).
public enum Fuzz {
    /// What one run did.
    public struct Report: Sendable, CustomStringConvertible {
        public var target: String
        public var executions: Int
        public var seconds: Double
        public var seed: UInt64
        /// Inputs the body rejected by throwing (expected for most mutations).
        public var rejected: Int

        public var description: String {
            "fuzz \(target): \(executions) executions in \(String(format: "%.1f", seconds)) s (seed \(seed), \(rejected) rejected)"
        }
    }

    /// Seconds per target: `FUZZ_SECONDS`, else 3600 with `FUZZ_LONG=1`, else `ci`.
    public static func budget(ci: Double = 2) -> Double {
        let env = ProcessInfo.processInfo.environment
        if let s = env["FUZZ_SECONDS"], let v = Double(s) { return v }
        if env["FUZZ_LONG"] == "1" { return 3600 }
        return ci
    }

    /// The random sequence's seed: `FUZZ_SEED`, else a fixed one.
    public static var seed: UInt64 {
        ProcessInfo.processInfo.environment["FUZZ_SEED"].flatMap { UInt64($0) } ?? 0x5eed_15
    }

    /// The committed seed corpus of `target`: every file in `tests/fuzz/corpus/<target>/` of
    /// the repository (found from this source file's path), sorted by name.
    public static func corpus(_ target: String, file: String = #filePath) -> [[UInt8]] {
        var dir = URL(fileURLWithPath: file)
        while dir.path != "/" && !FileManager.default.fileExists(atPath: dir.appendingPathComponent("Package.swift").path) {
            dir.deleteLastPathComponent()
        }
        let d = dir.appendingPathComponent("tests/fuzz/corpus/\(target)")
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: d.path)) ?? []).sorted()
        return names.compactMap { try? [UInt8](Data(contentsOf: d.appendingPathComponent($0))) }
    }

    /// Runs `body` on mutations of `seeds` for `seconds` (at least once per seed, unmutated
    /// first). `dictionary` holds tokens worth inserting (JSON punctuation, magic numbers).
    /// `body` may throw (a rejected input); anything else it must check itself.
    @discardableResult
    public static func run(target: String, seeds: [[UInt8]], seconds: Double, maxLength: Int = 1 << 16,
                           dictionary: [[UInt8]] = [], body: ([UInt8]) throws -> Void) -> Report {
        var rng = SplitMix64(seed: seed)
        let start = Date()
        let current = FileManager.default.temporaryDirectory.appendingPathComponent("fuzz-\(target).current").path
        let fd = open(current, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { if fd >= 0 { close(fd) } }
        var report = Report(target: target, executions: 0, seconds: 0, seed: seed, rejected: 0)
        let pool = seeds.isEmpty ? [[UInt8]()] : seeds
        func execute(_ input: [UInt8]) {
            if fd >= 0 {
                _ = input.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
                _ = ftruncate(fd, off_t(input.count))
            }
            do { try body(input) } catch { report.rejected += 1 }
            report.executions += 1
        }
        for s in pool { execute(s) }
        while Date().timeIntervalSince(start) < seconds {
            var input = pool[Int(rng.next() % UInt64(pool.count))]
            let rounds = 1 + Int(rng.next() % 4)
            for _ in 0..<rounds { mutate(&input, &rng, pool: pool, dictionary: dictionary, maxLength: maxLength) }
            execute(input)
        }
        report.seconds = Date().timeIntervalSince(start)
        return report
    }

    /// One random edit: bit flip, random byte, interesting integer, insertion, deletion,
    /// duplication, dictionary token, or a splice with another seed.
    static func mutate(_ b: inout [UInt8], _ rng: inout SplitMix64, pool: [[UInt8]], dictionary: [[UInt8]], maxLength: Int) {
        func pos(_ extra: Int = 0) -> Int { Int(rng.next() % UInt64(max(1, b.count + extra))) }
        switch rng.next() % 9 {
        case 0 where !b.isEmpty:
            let i = pos(); b[i] ^= UInt8(1) << (rng.next() % 8)
        case 1 where !b.isEmpty:
            b[pos()] = UInt8(truncatingIfNeeded: rng.next())
        case 2 where b.count >= 8:
            // A big-endian interesting value (image formats are big-endian) at an aligned offset.
            let values: [UInt64] = [0, 1, 0x7f, 0x80, 0xff, 0x200, 0xffff, 0x7fff_ffff, 0xffff_ffff,
                                    0x8000_0000_0000_0000, 0xffff_ffff_ffff_ffff, 0x00ff_ffff_ffff_fe00,
                                    0x7fff_ffff_ffff_ffff, 0x1_0000_0000]
            let v = values[Int(rng.next() % UInt64(values.count))]
            let width = [1, 2, 4, 8][Int(rng.next() % 4)]
            let i = (pos() / width) * width
            if i + width <= b.count {
                for k in 0..<width { b[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(width - 1 - k))) }
            }
        case 3 where b.count < maxLength:
            let n = 1 + Int(rng.next() % 16)
            b.insert(contentsOf: (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: pos(1))
        case 4 where !b.isEmpty:
            let i = pos(), n = 1 + Int(rng.next() % UInt64(min(64, b.count - i)))
            b.removeSubrange(i..<min(b.count, i + n))
        case 5 where !b.isEmpty && b.count < maxLength:
            let i = pos(), n = 1 + Int(rng.next() % UInt64(min(64, b.count - i)))
            b.insert(contentsOf: b[i..<min(b.count, i + n)], at: pos(1))
        case 6 where !dictionary.isEmpty && b.count < maxLength:
            b.insert(contentsOf: dictionary[Int(rng.next() % UInt64(dictionary.count))], at: pos(1))
        case 7 where pool.count > 1:
            let other = pool[Int(rng.next() % UInt64(pool.count))]
            let cut = pos(1), from = Int(rng.next() % UInt64(other.count + 1))
            b = Array(b[..<cut]) + other[from...]
        default:
            if !b.isEmpty { b[pos()] = UInt8(truncatingIfNeeded: rng.next()) }
        }
        if b.count > maxLength { b.removeLast(b.count - maxLength) }
    }
}

/// A small, fast, seedable generator (SplitMix64).
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
