import Testing
@testable import Translator

/// The ISA string grammar of `"cpu": {"isa": ...}` and the decoder's narrowing.
@Suite struct ExtensionTests {
    @Test func isaStringsParse() throws {
        #expect(try ISAExtensions.parse("rv64gc").get() == [])
        #expect(try ISAExtensions.parse("RV64IMAFDC_zicsr_zifencei").get() == [])
        #expect(try ISAExtensions.parse("rv64gc_zba_zbb_sstc").get() == [.zba, .zbb, .sstc])
        #expect(try ISAExtensions.parse(ISAExtensions.all.isaString).get() == .all)
    }

    @Test(arguments: [("rv32gc", "rv64"), ("rv64imac", "d, f"), ("rv64gcv", "v"), ("rv64gc_zfoo", "zfoo"), ("rv64gc__zba", "''")])
    func badISAStringsNameTheProblem(_ text: String, _ word: String) {
        guard case .failure(let e) = ISAExtensions.parse(text) else {
            Issue.record("\(text) was accepted")
            return
        }
        #expect(e.message.contains(word), "\(e.message)")
    }

    @Test func narrowedDecoderRefusesLeftOutExtensions() {
        let sh1add: UInt32 = 0x20c5_a533, clmul: UInt32 = 0x0ac5_9533, cboZero: UInt32 = 0x0045_200f
        let sinval: UInt32 = 0x16b5_0073, czero: UInt32 = 0x0ec5_d533
        #expect(Decoder.decode(sh1add, extensions: .all).kind == .sh1add)
        #expect(Decoder.decode(sh1add, extensions: [.zbb]).kind == .illegal)
        #expect(Decoder.decode(clmul, extensions: [.zbc]).kind == .clmul)
        #expect(Decoder.decode(clmul, extensions: [.zba, .zbb, .zbs]).kind == .illegal)
        #expect(Decoder.decode(cboZero, extensions: [.zicbom]).kind == .illegal)
        #expect(Decoder.decode(cboZero, extensions: [.zicboz]).kind == .cbo)
        #expect(Decoder.decode(sinval, extensions: []).kind == .illegal)
        #expect(Decoder.decode(sinval, extensions: [.svinval]).kind == .sfenceVma)
        #expect(Decoder.decode(czero, extensions: [.zicond]).kind == .czeroEqz)
        #expect(Decoder.decode(czero, extensions: []).kind == .illegal)
    }
}
