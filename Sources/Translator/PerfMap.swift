#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Linux `perf`'s map of JIT code (`/tmp/perf-PID.map`: one `START SIZE NAME` line per block,
/// the name giving the block's physical and virtual PC), so samples in generated code can be
/// put down to the guest block they came from; `/tmp/perf-PID.code` gets `START HEXBYTES` lines
/// with the host code itself, to be disassembled.
/// Written only when the environment sets `MACHINE_SERVER_PERF_MAP=1`; a profiling aid, off in
/// normal runs.
///
/// Threading: one process-wide file, appended to under a lock by every hart's vCPU thread.
final class PerfMap: @unchecked Sendable {
    /// The process's map, or nil when profiling support is off.
    static let shared: PerfMap? = {
        guard let v = getenv("MACHINE_SERVER_PERF_MAP"), String(cString: v) == "1" else { return nil }
        guard let f = fopen("/tmp/perf-\(getpid()).map", "a") else { return nil }
        return PerfMap(file: f)
    }()

    private let file: UnsafeMutablePointer<FILE>
    private let code: UnsafeMutablePointer<FILE>?
    private var lock = pthread_mutex_t()

    private init(file: UnsafeMutablePointer<FILE>) {
        self.file = file
        code = fopen("/tmp/perf-\(getpid()).code", "a")
        pthread_mutex_init(&lock, nil)
    }

    /// Records the `size` bytes of code at `address` (readable at `bytes`) as the block at
    /// guest physical `pc`, entered first at virtual `virtualPC`.
    func record(address: UnsafeRawPointer, bytes: UnsafePointer<UInt8>, size: Int, pc: UInt64, virtualPC: UInt64,
                privilege: UInt8) {
        let start = String(UInt(bitPattern: address), radix: 16)
        let line = "\(start) \(String(size, radix: 16)) tb_\(String(pc, radix: 16))_v\(String(virtualPC, radix: 16))_p\(privilege)\n"
        var hex = ""
        hex.reserveCapacity(2 * size)
        for i in 0..<size {
            let b = bytes[i]
            hex += b < 16 ? "0" + String(b, radix: 16) : String(b, radix: 16)
        }
        pthread_mutex_lock(&lock)
        fputs(line, file)
        fflush(file)
        if let code {
            fputs("\(start) \(hex)\n", code)
            fflush(code)
        }
        pthread_mutex_unlock(&lock)
    }
}
