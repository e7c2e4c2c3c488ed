import Machine
import Synchronization
import Testing
@testable import Devices

// MARK: Test doubles shared by the device tests

/// An interrupt line that records its level and every change.
final class RecordingLine: InterruptLine {
    private let state = Mutex<(level: Bool, changes: Int)>((false, 0))
    func set(_ level: Bool) { state.withLock { $0 = (level, $0.changes + 1) } }
    var level: Bool { state.withLock { $0.level } }
    var changes: Int { state.withLock { $0.changes } }
}

/// A character backend that records output and lets the test inject input.
final class RecordingBackend: CharBackend {
    let id = "test0"
    let filename = "test"
    let isConnected = true
    private let state = Mutex<(out: [UInt8], receiver: (@Sendable ([UInt8]) -> Void)?)>(([], nil))
    func write(_ bytes: UnsafeRawBufferPointer) { state.withLock { $0.out.append(contentsOf: bytes) } }
    func setReceiver(_ receiver: @escaping @Sendable ([UInt8]) -> Void) { state.withLock { $0.receiver = receiver } }
    func close() {}
    var output: [UInt8] { state.withLock { $0.out } }
    func type(_ bytes: [UInt8]) { state.withLock { $0.receiver }?(bytes) }
}

/// Records shutdown and reset requests.
final class RecordingSystem: SystemControl {
    enum Request: Equatable { case shutdown(ShutdownCause, Int32), reset(ShutdownCause) }
    private let state = Mutex<[Request]>([])
    func requestShutdown(cause: ShutdownCause, exitCode: Int32) { state.withLock { $0.append(.shutdown(cause, exitCode)) } }
    func requestReset(cause: ShutdownCause) { state.withLock { $0.append(.reset(cause)) } }
    var requests: [Request] { state.withLock { $0 } }
}

// MARK: UART

struct Uart16550Tests {
    // Register offsets as a driver names them.
    let RBR: UInt64 = 0, THR: UInt64 = 0, DLL: UInt64 = 0, IER: UInt64 = 1, DLM: UInt64 = 1
    let IIR: UInt64 = 2, FCR: UInt64 = 2, LCR: UInt64 = 3, MCR: UInt64 = 4, LSR: UInt64 = 5
    let MSR: UInt64 = 6, SCR: UInt64 = 7

    func make(capacity: Int = Uart16550.defaultInputCapacity) -> (Uart16550, RecordingLine, RecordingBackend) {
        let line = RecordingLine(), backend = RecordingBackend()
        return (Uart16550(irq: line, backend: backend, inputCapacity: capacity), line, backend)
    }

    @Test func transmitGoesToBackendAndLSRShowsEmptyTransmitter() {
        let (uart, _, backend) = make()
        for b in Array("hi\n".utf8) { uart.write(offset: THR, size: 1, value: UInt64(b)) }
        #expect(backend.output == Array("hi\n".utf8))
        #expect(uart.read(offset: LSR, size: 1) == 0x60)  // THRE | TEMT, no data
    }

    @Test func divisorLatchIsReachedThroughDLAB() {
        let (uart, _, backend) = make()
        uart.write(offset: LCR, size: 1, value: 0x83)  // DLAB, 8N1
        uart.write(offset: DLL, size: 1, value: 0x01)
        uart.write(offset: DLM, size: 1, value: 0x02)
        #expect(uart.read(offset: DLL, size: 1) == 0x01)
        #expect(uart.read(offset: DLM, size: 1) == 0x02)
        uart.write(offset: LCR, size: 1, value: 0x03)
        #expect(uart.read(offset: IER, size: 1) == 0)  // IER untouched by the DLM write
        #expect(uart.read(offset: LCR, size: 1) == 0x03)
        #expect(backend.output.isEmpty)  // DLL write did not transmit
    }

    @Test func receivedBytesRaiseRDAAndAreReadInOrder() {
        let (uart, line, backend) = make()
        uart.write(offset: IER, size: 1, value: 0x01)
        #expect(!line.level)
        backend.type([0x41, 0x42])
        #expect(line.level)
        #expect(uart.read(offset: IIR, size: 1) == 0x04)
        #expect(uart.read(offset: LSR, size: 1) & 1 == 1)
        #expect(uart.read(offset: RBR, size: 1) == 0x41)
        #expect(uart.read(offset: RBR, size: 1) == 0x42)
        #expect(uart.read(offset: LSR, size: 1) & 1 == 0)
        #expect(!line.level)
        #expect(uart.read(offset: IIR, size: 1) == 0x01)
    }

    @Test func fifoModeReportsTriggerLevelAndTimeout() {
        let (uart, _, backend) = make()
        uart.write(offset: FCR, size: 1, value: 0x81)  // enable, trigger 8
        uart.write(offset: IER, size: 1, value: 0x01)
        backend.type([1, 2, 3])
        #expect(uart.read(offset: IIR, size: 1) == 0xCC)  // FIFO enabled, character timeout
        backend.type([4, 5, 6, 7, 8])
        #expect(uart.read(offset: IIR, size: 1) == 0xC4)  // trigger level reached
    }

    @Test func fcrClearsOnlyTheFIFOAndLargeInputIsNotLost() {
        let (uart, _, backend) = make()
        uart.write(offset: FCR, size: 1, value: 0x01)
        let input = (0..<3000).map { UInt8(truncatingIfNeeded: $0) }
        backend.type(input)
        uart.write(offset: FCR, size: 1, value: 0x03)  // clear RX: drops the 16 bytes in the FIFO
        var got: [UInt8] = []
        while uart.read(offset: LSR, size: 1) & 1 == 1 { got.append(UInt8(uart.read(offset: RBR, size: 1))) }
        #expect(got == Array(input[16...]))
        #expect(uart.droppedInputBytes == 0)
    }

    @Test func inputBeyondCapacityIsDroppedAndCounted() {
        let (uart, _, backend) = make(capacity: 32)
        backend.type([UInt8](repeating: 7, count: 40))
        #expect(uart.droppedInputBytes == 8)
        #expect(uart.pendingInputBytes == 32)
    }

    @Test func threInterruptFollowsTheLinux8250Rules() {
        let (uart, line, _) = make()
        uart.write(offset: IER, size: 1, value: 0x02)  // ETBEI rising edge with THR empty
        #expect(line.level)
        #expect(uart.read(offset: IIR, size: 1) == 0x02)
        #expect(!line.level)  // the IIR read that reported THRE cleared it
        #expect(uart.read(offset: IIR, size: 1) == 0x01)
        uart.write(offset: THR, size: 1, value: 0x55)  // THR empties again at once
        #expect(line.level)
        #expect(uart.read(offset: IIR, size: 1) == 0x02)
        // Toggling ETBEI off and on re-asserts it (the driver's UART_BUG_THRE probe).
        uart.write(offset: IER, size: 1, value: 0)
        uart.write(offset: IER, size: 1, value: 0x02)
        #expect(uart.read(offset: IIR, size: 1) == 0x02)
    }

    @Test func receiveDataOutranksTHRE() {
        let (uart, _, backend) = make()
        uart.write(offset: IER, size: 1, value: 0x03)
        backend.type([9])
        #expect(uart.read(offset: IIR, size: 1) == 0x04)
        _ = uart.read(offset: RBR, size: 1)
        #expect(uart.read(offset: IIR, size: 1) == 0x02)
    }

    @Test func loopbackFeedsTransmitterIntoReceiverAndMirrorsModemLines() {
        let (uart, _, backend) = make()
        uart.write(offset: MCR, size: 1, value: 0x10)
        #expect(uart.read(offset: MSR, size: 1) & 0xF0 == 0)
        uart.write(offset: THR, size: 1, value: 0x5A)
        #expect(backend.output.isEmpty)
        #expect(uart.read(offset: RBR, size: 1) == 0x5A)
        uart.write(offset: MCR, size: 1, value: 0x1F)  // DTR, RTS, OUT1, OUT2
        let msr = uart.read(offset: MSR, size: 1)
        #expect(msr & 0xF0 == 0xF0)
        #expect(msr & 0x0F == 0x0B)  // DCTS, DDSR and DDCD; no TERI on a rising RI
        #expect(uart.read(offset: MSR, size: 1) & 0x0F == 0)  // deltas clear on read
    }

    @Test func modemStatusInterruptHasLowestPriority() {
        let (uart, line, _) = make()
        uart.write(offset: MCR, size: 1, value: 0x10)
        uart.write(offset: IER, size: 1, value: 0x08)
        uart.write(offset: MCR, size: 1, value: 0x12)  // RTS -> CTS changes
        #expect(line.level)
        #expect(uart.read(offset: IIR, size: 1) == 0x00)
        _ = uart.read(offset: MSR, size: 1)
        #expect(!line.level)
    }

    @Test func scratchRegisterHoldsItsValue() {
        let (uart, _, _) = make()
        uart.write(offset: SCR, size: 1, value: 0xA5)
        #expect(uart.read(offset: SCR, size: 1) == 0xA5)
        uart.reset()
        #expect(uart.read(offset: SCR, size: 1) == 0)
    }
}
