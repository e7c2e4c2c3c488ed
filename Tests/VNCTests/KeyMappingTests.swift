import Machine
import Testing
@testable import VNC

private let shiftL = LinuxKey.leftShift
private let keyA: UInt16 = 30, key1: UInt16 = 2, keyDot: UInt16 = 52

@Test func lowercaseLetterIsPlainKey() {
    var m = KeyMapper()
    #expect(m.key(0x61, down: true) == [[.key(code: keyA, down: true)]])
    #expect(m.key(0x61, down: false) == [[.key(code: keyA, down: false)]])
}

@Test func uppercaseWithoutShiftSynthesizesShift() {
    var m = KeyMapper()
    #expect(m.key(0x41, down: true) == [[.key(code: shiftL, down: true)], [.key(code: keyA, down: true)],
                                        [.key(code: shiftL, down: false)]])
    #expect(m.key(0x41, down: false) == [[.key(code: keyA, down: false)]])
}

@Test func shiftedPunctuationWithoutShiftSynthesizesShift() {
    var m = KeyMapper()
    // '>' is Shift+'.' on a US keyboard.
    #expect(m.key(0x3e, down: true) == [[.key(code: shiftL, down: true)], [.key(code: keyDot, down: true)],
                                        [.key(code: shiftL, down: false)]])
}

@Test func uppercaseWithShiftHeldIsPlain() {
    var m = KeyMapper()
    #expect(m.key(0xffe1, down: true) == [[.key(code: shiftL, down: true)]])
    #expect(m.key(0x41, down: true) == [[.key(code: keyA, down: true)]])
    #expect(m.key(0x41, down: false) == [[.key(code: keyA, down: false)]])
    #expect(m.key(0xffe1, down: false) == [[.key(code: shiftL, down: false)]])
    #expect(m.heldShifts.isEmpty)
}

@Test func unshiftedSymbolWithShiftHeldReleasesShiftAroundIt() {
    var m = KeyMapper()
    _ = m.key(0xffe2, down: true)  // right Shift held by the viewer
    #expect(m.key(0x31, down: true) == [[.key(code: LinuxKey.rightShift, down: false)], [.key(code: key1, down: true)],
                                        [.key(code: LinuxKey.rightShift, down: true)]])
}

@Test func capsLockInvertsLetterCase() {
    var m = KeyMapper()
    // Caps Lock on: 'A' needs no Shift, 'a' does.
    #expect(m.key(0x41, down: true, capsLock: true) == [[.key(code: keyA, down: true)]])
    _ = m.key(0x41, down: false, capsLock: true)
    #expect(m.key(0x61, down: true, capsLock: true).count == 3)
    // Caps Lock does not affect digits.
    #expect(m.key(0x31, down: true, capsLock: true) == [[.key(code: key1, down: true)]])
}

@Test func specialKeysAndUnknownKeysyms() {
    #expect(KeyMapper.mapping(for: 0xff0d)?.code == LinuxKey.enter)
    #expect(KeyMapper.mapping(for: 0xffbe)?.code == 59)  // F1
    #expect(KeyMapper.mapping(for: 0xffc9)?.code == 88)  // F12
    #expect(KeyMapper.mapping(for: 0xff52)?.code == 103)  // Up
    #expect(KeyMapper.mapping(for: 0x20)?.code == LinuxKey.space)
    #expect(KeyMapper.mapping(for: 0x7e) == KeyMapper.Mapping(code: 41, shift: true, isLetter: false))  // ~
    #expect(KeyMapper.mapping(for: 0x5a)?.code == 44)  // Z
    var m = KeyMapper()
    #expect(m.key(0x20ac, down: true).isEmpty)  // EuroSign: no US key
}

@Test func releaseAllLiftsHeldKeys() {
    var m = KeyMapper()
    _ = m.key(0xffe3, down: true)
    _ = m.key(0x63, down: true)
    #expect(m.releaseAll() == [[.key(code: 29, down: false), .key(code: 46, down: false)]])
    #expect(m.releaseAll().isEmpty)
}

@Test func pointerScalingAndButtons() {
    var p = PointerMapper()
    #expect(PointerMapper.scale(0, size: 1280) == 0)
    #expect(PointerMapper.scale(1279, size: 1280) == 0x7fff)
    #expect(PointerMapper.scale(5000, size: 1280) == 0x7fff)
    let first = p.pointer(x: 639, y: 399, buttonMask: 0b001, width: 1280, height: 800)
    #expect(first == [.absolute(.x, value: 639 * 0x7fff / 1279), .absolute(.y, value: 399 * 0x7fff / 799),
                      .button(.left, down: true)])
    // Same place, left released, wheel up pressed.
    #expect(p.pointer(x: 639, y: 399, buttonMask: 0b1000, width: 1280, height: 800)
            == [.button(.left, down: false), .button(.wheelUp, down: true)])
    #expect(p.releaseAll() == [.button(.wheelUp, down: false)])
}

@Test func qcodeTable() {
    #expect(LinuxKey.code(forQCode: "ctrl") == 29)
    #expect(LinuxKey.code(forQCode: "alt") == 56)
    #expect(LinuxKey.code(forQCode: "delete") == 111)
    #expect(LinuxKey.code(forQCode: "a") == 30)
    #expect(LinuxKey.code(forQCode: "ret") == 28)
    #expect(LinuxKey.code(forQCode: "f12") == 88)
    #expect(LinuxKey.code(forQCode: "nonsense") == nil)
    #expect(LinuxKey.code(forQNumber: 0x1d) == 29)
    #expect(LinuxKey.code(forQNumber: 0xd3) == 111)
}
