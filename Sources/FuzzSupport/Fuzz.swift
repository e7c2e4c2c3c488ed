import Foundation

/// A seeded, time-bounded mutation fuzzer for the parsers of outside input, run in-process by
/// the test targets (no coverage feedback: inputs are mutations of committed seeds).
///
/// CI runs each target for a few seconds; `FUZZ_LONG=1` runs each for an hour, and
/// `FUZZ_SECONDS=N` for N seconds. `FUZZ_SEED` picks the random sequence (default fixed, so a
/// CI run is reproducible). Before every execution the input is written to
/// `$TMPDIR/fuzz-<target>.current`, so a crash (a trap ends the process) leaves its input
/// behind. Used from tests only; not thread-safe (one target per call).
///
/// Besides crashes, a run watches for two more failures, which its `Report.problems` lists:
/// - **hangs**: an execution that used more than `FUZZ_HANG_SECONDS` (default 1) of the process's
///   CPU time. CPU time, not wall time, so a run on a loaded machine (or at `nice 19`) does not
///   report the scheduler's delays; the input is kept as `fuzz-<target>.hang-N`. An execution
///   that never returns (a deadlock uses no CPU) is caught by a watchdog thread after
///   `FUZZ_STALL_SECONDS` (default 600) of wall time: it prints the target and ends the process,
///   leaving `.current` as the reproducer.
/// - **unbounded memory**: the resident set sampled through the run; the growth from the end of
///   the run's first tenth to its end must stay under `FUZZ_RSS_GROWTH_MB` (default 64).
///
/// Both are measured for the whole process, so they are judged only in a deliberate run
/// (`FUZZ_SECONDS` or `FUZZ_LONG` set), which runs one target per process
/// (`scripts/fuzz`); in the CI run the other tests run in parallel in the same process and
/// would be counted too, so there the report only prints the figures.
public enum Fuzz {
    /// What one run did.
    public struct Report: Sendable, CustomStringConvertible {
        public var target: String
        public var executions: Int
        public var seconds: Double
        public var seed: UInt64
        /// Inputs the body rejected by throwing (expected for most mutations).
        public var rejected: Int
        /// CPU time the whole process used during the run, in seconds (other threads included:
        /// the servers some targets drive over a socket).
        public var cpuSeconds: Double = 0
        /// The most process CPU time one execution used, in seconds.
        public var slowestExecution: Double = 0
        /// Executions over the hang limit (their inputs are kept as `fuzz-<target>.hang-N`).
        public var hangs: Int = 0
        /// Resident set size, in KiB: after the first tenth of the run (the baseline, once
        /// caches and pools have warmed up), at its highest, and at the end.
        public var rssBaselineKiB: Int = 0
        public var rssPeakKiB: Int = 0
        public var rssEndKiB: Int = 0
        /// Allowed growth of the resident set past the baseline, in KiB.
        public var rssGrowthLimitKiB: Int = 64 << 10

        /// Whether hangs and memory growth are judged (a deliberate run: see `Fuzz`).
        public var judged = Fuzz.deliberate

        /// What went wrong besides a crash: hangs and unbounded memory. Empty when clean, and
        /// always empty when the run is not `judged`.
        public var problems: [String] {
            guard judged else { return [] }
            var p: [String] = []
            if hangs > 0 {
                p.append("\(hangs) execution(s) of \(target) used over \(Fuzz.hangLimit) s of CPU (slowest \(String(format: "%.2f", slowestExecution)) s); inputs kept as fuzz-\(target).hang-N in \(FileManager.default.temporaryDirectory.path)")
            }
            if rssBaselineKiB > 0 && rssEndKiB - rssBaselineKiB > rssGrowthLimitKiB {
                p.append("\(target)'s resident set grew from \(rssBaselineKiB / 1024) MiB to \(rssEndKiB / 1024) MiB during the run (limit \(rssGrowthLimitKiB / 1024) MiB of growth)")
            }
            return p
        }

        public var description: String {
            "fuzz \(target): \(executions) executions in \(String(format: "%.1f", seconds)) s, \(String(format: "%.1f", cpuSeconds)) s of CPU (seed \(seed), \(rejected) rejected); slowest execution \(String(format: "%.3f", slowestExecution)) s of CPU, \(hangs) over \(Fuzz.hangLimit) s; RSS \(rssBaselineKiB / 1024) MiB after the first tenth, peak \(rssPeakKiB / 1024) MiB, end \(rssEndKiB / 1024) MiB"
        }
    }

    /// Whether this is a deliberate run (`FUZZ_SECONDS` or `FUZZ_LONG`), not CI's short one.
    public static var deliberate: Bool {
        let env = ProcessInfo.processInfo.environment
        return env["FUZZ_SECONDS"] != nil || env["FUZZ_LONG"] == "1"
    }

    /// Process CPU time (seconds) one execution may use before it counts as a hang.
    public static var hangLimit: Double {
        ProcessInfo.processInfo.environment["FUZZ_HANG_SECONDS"].flatMap { Double($0) } ?? 1
    }

    static var stallLimit: Double {
        ProcessInfo.processInfo.environment["FUZZ_STALL_SECONDS"].flatMap { Double($0) } ?? 600
    }

    static var rssGrowthLimitKiB: Int {
        (ProcessInfo.processInfo.environment["FUZZ_RSS_GROWTH_MB"].flatMap { Int($0) } ?? 64) << 10
    }

    /// The process's CPU time (all threads), in seconds.
    static func processCPUTime() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// The resident set size in KiB, from /proc/self/statm (0 where it cannot be read).
    static func residentKiB() -> Int {
        guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
        let fields = text.split(separator: " ")
        guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
        return pages * (Int(sysconf(Int32(_SC_PAGESIZE))) / 1024)
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
        let cpuStart = processCPUTime()
        let tmp = FileManager.default.temporaryDirectory
        let current = tmp.appendingPathComponent("fuzz-\(target).current").path
        let fd = open(current, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { if fd >= 0 { close(fd) } }
        var report = Report(target: target, executions: 0, seconds: 0, seed: seed, rejected: 0)
        report.rssGrowthLimitKiB = rssGrowthLimitKiB
        let limit = hangLimit
        let watchdog = Watchdog(target: target, reproducer: current, stallSeconds: stallLimit)
        defer { watchdog.stop() }
        let pool = seeds.isEmpty ? [[UInt8]()] : seeds
        var nextSample = start
        func execute(_ input: [UInt8]) {
            if fd >= 0 {
                _ = input.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
                _ = ftruncate(fd, off_t(input.count))
            }
            watchdog.begin()
            let before = processCPUTime()
            do { try body(input) } catch { report.rejected += 1 }
            let used = processCPUTime() - before
            watchdog.end()
            report.executions += 1
            report.slowestExecution = max(report.slowestExecution, used)
            if used > limit {
                report.hangs += 1
                if report.hangs <= 10 && report.judged {
                    let kept = tmp.appendingPathComponent("fuzz-\(target).hang-\(report.hangs)")
                    try? Data(input).write(to: kept)
                }
            }
        }
        func sample(final: Bool = false) {
            let now = Date()
            guard final || now >= nextSample else { return }
            nextSample = now.addingTimeInterval(max(0.05, seconds / 200))
            let rss = residentKiB()
            report.rssPeakKiB = max(report.rssPeakKiB, rss)
            if report.rssBaselineKiB == 0 && now.timeIntervalSince(start) >= seconds / 10 { report.rssBaselineKiB = rss }
            if final { report.rssEndKiB = rss }
        }
        for s in pool { execute(s) }
        while Date().timeIntervalSince(start) < seconds {
            var input = pool[Int(rng.next() % UInt64(pool.count))]
            let rounds = 1 + Int(rng.next() % 4)
            for _ in 0..<rounds { mutate(&input, &rng, pool: pool, dictionary: dictionary, maxLength: maxLength) }
            execute(input)
            sample()
        }
        sample(final: true)
        report.seconds = Date().timeIntervalSince(start)
        report.cpuSeconds = processCPUTime() - cpuStart
        return report
    }

    /// Ends the process when one execution has not returned after `stallSeconds` of wall
    /// time: a deadlocked parser uses no CPU, so the hang limit alone would never see it.
    final class Watchdog: @unchecked Sendable {
        // unchecked: `started` and `stopped` are only touched under `lock` (NSLock, a pthread
        // mutex the sanitizer builds see); the watchdog thread reads them, the fuzzing thread
        // writes them.
        private let lock = NSLock()
        private var started: Date?
        private var stopped = false

        init(target: String, reproducer: String, stallSeconds: Double) {
            Thread { [self] in
                while true {
                    Thread.sleep(forTimeInterval: 1)
                    let (since, done) = lock.withLock { (started, stopped) }
                    if done { return }
                    if let since, Date().timeIntervalSince(since) > stallSeconds {
                        FileHandle.standardError.write(Data("fuzz \(target): one execution has not returned after \(Int(stallSeconds)) s; its input is \(reproducer)\n".utf8))
                        abort()
                    }
                }
            }.start()
        }

        func begin() { lock.withLock { started = Date() } }
        func end() { lock.withLock { started = nil } }
        /// The thread ends within a second (it holds the watchdog until then).
        func stop() { lock.withLock { stopped = true } }
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
