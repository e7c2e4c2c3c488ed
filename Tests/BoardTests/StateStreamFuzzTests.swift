import Devices
import Foundation
import FuzzSupport
import Machine
import Testing
@testable import Board

/// The machine-state stream is outside input (a file, a command, a migration peer): mutations
/// of a valid stream are loaded into a fresh board through a file (RAM mapped) and a pipe (RAM
/// read); every outcome must be a clean refusal or a load, never a crash or a hang. Runs for
/// `Fuzz.budget` (3 s in CI, an hour with FUZZ_LONG=1, FUZZ_SECONDS=N).
struct StateStreamFuzzTests {
    @Test func mutatedStreamsNeverCrash() throws {
        let t = SavedStateTests()
        let (a, _) = try t.board()
        t.activateSlot0(a)
        a.uart.receive(Array("fuzz".utf8))
        for i in stride(from: 0, to: 64 << 10, by: 4096) { a.ram.pointer.storeBytes(of: UInt64(i + 1), toByteOffset: i, as: UInt64.self) }
        let seed = try t.save(a)
        let (b, _) = try t.board()
        var round = 0
        let report = Fuzz.run(target: "state-stream", seeds: [seed], seconds: Fuzz.budget(ci: 3),
                              maxLength: seed.count * 2, dictionary: [MachineStateFormat.magic, [1], [2], [0xff]]) { input in
            round += 1
            let load: (StateSource) throws -> Void = { source in
                let read = try MachineStateReader(source: source)
                for s in read.sections {
                    var r = StateReader(section: s.name, bytes: s.payload)
                    try b.deviceManager.device(section: s.name)?.loadState(from: &r, version: s.version)
                }
                try read.loadRAM(into: b.ram)
            }
            if round % 3 == 0 { try t.withPipeSource(input, load) } else { try t.withFileSource(input, load) }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(report.executions > 10)
        #expect(report.rejected > report.executions / 2, "most mutants should be refused: \(report)")
    }
}
