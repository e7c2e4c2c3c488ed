import Devices
import Foundation
import Machine
import Testing
@testable import Board

/// A mutation fuzzer for the machine-state stream (outside input: a file or a peer). Each
/// round mutates a valid stream (bit flips, byte runs, truncations, splices, length fields set
/// to extremes) and loads it into a fresh board through a file (RAM mapped) and a pipe (RAM
/// read); every outcome must be a clean refusal or a load, never a crash or a hang.
/// `STATE_FUZZ_SECONDS` sets the time (default 3 s; the long mode runs it for an hour).
struct StateStreamFuzzTests {
    @Test func mutatedStreamsNeverCrash() throws {
        let seconds = Double(ProcessInfo.processInfo.environment["STATE_FUZZ_SECONDS"] ?? "") ?? 3
        let t = SavedStateTests()
        let (a, _) = try t.board()
        t.activateSlot0(a)
        a.uart.receive(Array("fuzz".utf8))
        for i in stride(from: 0, to: 64 << 10, by: 4096) { a.ram.pointer.storeBytes(of: UInt64(i + 1), toByteOffset: i, as: UInt64.self) }
        let seed = try t.save(a)
        var rng = SplitMix(seed: UInt64(ProcessInfo.processInfo.environment["STATE_FUZZ_SEED"] ?? "") ?? 0xf022)
        let deadline = Date().addingTimeInterval(seconds)
        var rounds = 0, refused = 0
        let (b, _) = try t.board()
        while Date() < deadline {
            var m = seed
            for _ in 0..<(1 + Int(rng.next() % 4)) { mutate(&m, &rng) }
            let viaPipe = rounds % 3 == 0
            do {
                let load: (StateSource) throws -> Void = { source in
                    let read = try MachineStateReader(source: source)
                    for s in read.sections {
                        var r = StateReader(section: s.name, bytes: s.payload)
                        try b.deviceManager.device(section: s.name)?.loadState(from: &r, version: s.version)
                    }
                    try read.loadRAM(into: b.ram)
                }
                if viaPipe { try t.withPipeSource(m, load) } else { try t.withFileSource(m, load) }
            } catch is MachineStateError {
                refused += 1
            } catch is SavedStateError {
                refused += 1
            }
            rounds += 1
        }
        print("state stream fuzz: \(rounds) rounds in \(seconds) s, \(refused) refused")
        #expect(rounds > 10)
        #expect(refused > rounds / 2, "most mutants should be refused (\(refused) of \(rounds))")
    }

    private func mutate(_ m: inout [UInt8], _ rng: inout SplitMix) {
        guard !m.isEmpty else { return }
        let at = Int(rng.next() % UInt64(m.count))
        switch rng.next() % 6 {
        case 0: m[at] ^= UInt8(1 << (rng.next() % 8))
        case 1: m[at] = UInt8(truncatingIfNeeded: rng.next())
        case 2: m.removeLast(Int(rng.next() % UInt64(m.count)))
        case 3:  // a length or count field set to an extreme
            let v: UInt32 = [0, 1, 0x7fff_ffff, 0xffff_ffff][Int(rng.next() % 4)]
            for k in 0..<4 where at + k < m.count { m[at + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) }
        case 4:  // duplicate a run of bytes
            let n = min(Int(rng.next() % 64) + 1, m.count - at)
            m.insert(contentsOf: m[at..<at + n], at: at)
        default:  // zero a run
            let n = min(Int(rng.next() % 256) + 1, m.count - at)
            for k in at..<at + n { m[k] = 0 }
        }
    }
}
