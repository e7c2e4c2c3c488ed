import Foundation
import Testing
@testable import Board

/// QEMU's migration URIs as `migrate` and `migrate-incoming` take them, `fd:` included
/// (libvirt passes a save file, a pipe or a connected socket).
@Suite struct MigrationURITests {
    @Test func socketSchemesParse() throws {
        #expect(try MigrationURI("tcp:127.0.0.1:4444") == .tcp(host: "127.0.0.1", port: 4444))
        #expect(try MigrationURI("tcp:[::]:49152") == .tcp(host: "::", port: 49152))
        #expect(try MigrationURI("unix:/run/m.sock") == .unix("/run/m.sock"))
        #expect(try MigrationURI("file:/x") == .file("/x"))
        #expect(try MigrationURI("exec:cat") == .exec("cat"))
    }

    @Test func descriptorsByKind() throws {
        var p: [Int32] = [-1, -1]
        #expect(pipe(&p) == 0)
        defer { close(p[0]); close(p[1]) }
        #expect(try MigrationURI("fd:\(p[1])") == .fd(p[1]))
        #expect(try !MigrationURI("fd:\(p[1])").isLive, "a pipe gets the paused save, as file: does")
        var s: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &s) == 0)
        defer { close(s[0]); close(s[1]) }
        _ = fcntl(s[0], F_SETFL, fcntl(s[0], F_GETFL) | O_NONBLOCK)
        #expect(try MigrationURI("fd:\(s[0])") == .socket(s[0]))
        #expect(try MigrationURI("fd:\(s[0])").isLive, "a connected socket carries a live migration")
        #expect(fcntl(s[0], F_GETFL) & O_NONBLOCK == 0, "made blocking for the migration queue")
        func refusal(_ uri: String) -> String? {
            do { _ = try MigrationURI(uri); return nil } catch { return "\(error)" }
        }
        #expect(refusal("fd:migrate")?.contains("descriptor number") == true, "names are resolved by the monitor first")
        #expect(refusal("fd:1000000")?.contains("not an open descriptor") == true)
        #expect(refusal("fd:-1")?.contains("descriptor number") == true)
        #expect(refusal("rdma:1.2.3.4:5")?.contains("not supported") == true)
        let dir = open("/", O_RDONLY | O_DIRECTORY)
        defer { close(dir) }
        #expect(refusal("fd:\(dir)")?.contains("not a file, pipe or socket") == true)
    }
}
