import Machine
import Testing
@testable import Devices

struct HtifTests {
    @Test func exitCodeComesFromTohostShiftedRight() {
        let system = RecordingSystem()
        let htif = Htif(system: system, console: nil)
        htif.write(offset: 0, size: 8, value: 1)            // pass
        htif.write(offset: 0, size: 8, value: (42 << 1) | 1) // fail 42
        #expect(system.requests == [.shutdown(.guestShutdown, 0), .shutdown(.guestShutdown, 42)])
    }

    @Test func consolePutcharPrintsAndAcknowledges() {
        let system = RecordingSystem(), console = RecordingBackend()
        let htif = Htif(system: system, console: console)
        htif.write(offset: 0, size: 8, value: 1 << 56 | 1 << 48 | 0x41)
        #expect(console.output == [0x41])
        #expect(htif.read(offset: 0, size: 8) == 0)  // the host took the request
        #expect(htif.read(offset: 8, size: 8) == 1 << 56 | 1 << 48)
        htif.write(offset: 8, size: 8, value: 0)       // guest acknowledges
        #expect(htif.read(offset: 8, size: 8) == 0)
        #expect(system.requests.isEmpty)
    }

    @Test func halfWritesActOnlyWhenTheHighHalfArrives() {
        let system = RecordingSystem(), console = RecordingBackend()
        let htif = Htif(system: system, console: console)
        htif.write(offset: 0, size: 4, value: 0x42)
        #expect(console.output.isEmpty)
        #expect(htif.read(offset: 0, size: 4) == 0x42)
        htif.write(offset: 4, size: 4, value: 0x0101_0000)
        #expect(console.output == [0x42])
        htif.write(offset: 0, size: 4, value: 7)  // exit code 3
        htif.write(offset: 4, size: 4, value: 0)
        #expect(system.requests == [.shutdown(.guestShutdown, 3)])
    }

    @Test func putcharWithoutConsoleIsDiscarded() {
        let system = RecordingSystem()
        let htif = Htif(system: system, console: nil)
        htif.write(offset: 0, size: 8, value: 1 << 56 | 1 << 48 | 0x41)
        #expect(system.requests.isEmpty)
        #expect(htif.read(offset: 8, size: 8) == 1 << 56 | 1 << 48)
    }
}
