import Machine
import Testing
@testable import Devices

struct SiFiveTestTests {
    @Test func passFailAndResetBecomeSystemRequests() {
        let system = RecordingSystem()
        let dev = SiFiveTest(system: system)
        dev.write(offset: 0, size: 2, value: 0x5555)  // OpenSBI's writew
        dev.write(offset: 0, size: 1, value: 0x55)    // byte writes are not accepted
        dev.write(offset: 0, size: 4, value: (3 << 16) | 0x3333)
        dev.write(offset: 0, size: 4, value: 0x7777)
        dev.write(offset: 0, size: 4, value: 0x1234)  // unknown: ignored
        dev.write(offset: 8, size: 4, value: 0x5555)  // other offsets: ignored
        #expect(system.requests == [.shutdown(.guestShutdown, 0), .shutdown(.guestShutdown, 3), .reset(.guestReset)])
        #expect(dev.read(offset: 0, size: 4) == 0)
    }
}
