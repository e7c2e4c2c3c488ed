import FuzzSupport
import Testing
@testable import Schema

/// Fuzzes the machine-description parser (JSON via libjansson, then the generated decoder and
/// its checks) with mutations of the committed descriptions (tests/fuzz/corpus/description:
/// the examples and a description using every member). Every input must parse or be refused
/// with an error that names a field or says what is wrong with the JSON; none may crash.
@Suite struct DescriptionFuzzTests {
    @Test func mutatedDescriptionsAreParsedOrRefusedNeverCrash() throws {
        let seeds = Fuzz.corpus("description")
        try #require(seeds.count >= 4, "the description seed corpus is missing")
        let tokens = ["{", "}", "[", "]", ",", ":", "\"", "null", "true", "-1", "1e999", "18446744073709551616",
                      "\"\\u0000\"", "\"1T\"", "\"../../etc/passwd\"", "\"backend\"", "\"devices\"", "\"version\""]
        var unnamed: [String] = []
        let report = Fuzz.run(target: "description", seeds: seeds, seconds: Fuzz.budget(ci: 2),
                              dictionary: tokens.map { Array($0.utf8) }) { input in
            do {
                _ = try MachineDescription.parse(jsonText: String(decoding: input, as: UTF8.self))
            } catch {
                let message = "\(error)"
                if message.isEmpty && unnamed.count < 5 { unnamed.append(String(decoding: input.prefix(200), as: UTF8.self)) }
                throw error
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(unnamed.isEmpty, "refusals without a message: \(unnamed)")
        #expect(report.executions > seeds.count)
    }
}
