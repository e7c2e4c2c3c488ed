#include "test.h"
TEST_BEGIN
    la s0, buf
    li a1, 0x8877665544332211
    sd a1, 0(s0)
    lb a0, 7(s0);  CHECK(1, a0, -0x78)
    lbu a0, 7(s0); CHECK(2, a0, 0x88)
    lh a0, 6(s0);  CHECK(3, a0, -0x7789)
    lhu a0, 6(s0); CHECK(4, a0, 0x8877)
    lw a0, 4(s0);  CHECK(5, a0, -0x778899ab)
    lwu a0, 4(s0); CHECK(6, a0, 0x88776655)
    ld a0, 0(s0);  CHECK(7, a0, 0x8877665544332211)
    /* misaligned accesses are handled (not trapped) */
    ld a0, 1(s0);  CHECK(8, a0, 0x0088776655443322)
    li a1, 0x1234
    sh a1, 3(s0)
    lhu a0, 3(s0); CHECK(9, a0, 0x1234)
    sb zero, 8(s0)
    /* page-crossing doubleword */
    la s1, page_end
    li a1, 0x0102030405060708
    sd a1, -4(s1)
    ld a0, -4(s1); CHECK(10, a0, 0x0102030405060708)
    lw a0, -4(s1); CHECK(11, a0, 0x05060708)
    lw a0, 0(s1);  CHECK(12, a0, 0x01020304)
    /* compressed loads and stores */
    la a2, buf
    li a3, 77
    c.sw a3, 8(a2)
    c.lw a4, 8(a2); CHECK(13, a4, 77)
    c.sd a3, 16(a2)
    c.ld a5, 16(a2); CHECK(14, a5, 77)
    c.li a4, -3;    CHECK(15, a4, -3)
    c.addi a4, 5;   CHECK(16, a4, 2)
    c.slli a4, 4;   CHECK(17, a4, 32)
    c.mv a5, a4;    CHECK(18, a5, 32)
    c.add a5, a4;   CHECK(19, a5, 64)
    li a3, 5
    c.sub a5, a3;   CHECK(20, a5, 59)
    c.addiw a5, -31; CHECK(21, a5, 28)
    c.srli a5, 2;   CHECK(22, a5, 7)
    c.andi a5, 6;   CHECK(23, a5, 6)
    addi sp, s0, 256
    c.sdsp a5, 8(sp)
    c.ldsp a0, 8(sp); CHECK(24, a0, 6)
    c.lui a0, 0x1f;  CHECK(25, a0, 0x1f000)
TEST_END
    .data
    .align 12
buf: .space 4096 - 8
    .space 8
page_end: .space 64
