#include "test.h"
TEST_BEGIN
    la s0, word
    li a1, 10
    sd a1, 0(s0)
    lr.d a0, (s0);      CHECK(1, a0, 10)
    li a2, 20
    sc.d a3, a2, (s0);  CHECK(2, a3, 0)
    ld a0, 0(s0);       CHECK(3, a0, 20)
    sc.d a3, a2, (s0);  CHECK(4, a3, 1)      /* no reservation any more */
    li a2, 5
    amoadd.d a0, a2, (s0); CHECK(5, a0, 20)
    ld a0, 0(s0);          CHECK(6, a0, 25)
    li a2, -1
    amomin.d a0, a2, (s0); ld a0, 0(s0); CHECK(7, a0, -1)
    li a2, 3
    amominu.d a0, a2, (s0); ld a0, 0(s0); CHECK(8, a0, 3)
    amomax.d a0, a2, (s0);  ld a0, 0(s0); CHECK(9, a0, 3)
    li a2, 0xf0
    amoor.d a0, a2, (s0); ld a0, 0(s0); CHECK(10, a0, 0xf3)
    li a2, 0x3c
    amoand.d a0, a2, (s0); ld a0, 0(s0); CHECK(11, a0, 0x30)
    amoxor.d a0, a2, (s0); ld a0, 0(s0); CHECK(12, a0, 0x0c)
    li a2, 99
    amoswap.d a0, a2, (s0); CHECK(13, a0, 0x0c)
    /* 32-bit forms sign-extend */
    li a1, 0x7fffffff
    sw a1, 8(s0)
    addi s1, s0, 8
    li a2, 1
    amoadd.w a0, a2, (s1); CHECK(14, a0, 0x7fffffff)
    lw a0, 0(s1);          CHECK(15, a0, -0x80000000)
    lr.w a0, (s1);         CHECK(16, a0, -0x80000000)
    sc.w a3, zero, (s1);   CHECK(17, a3, 0)
    lw a0, 0(s1);          CHECK(18, a0, 0)
    /* a misaligned AMO traps with cause 6 */
    la t0, misaligned_handler
    csrw mtvec, t0
    addi s2, s0, 1
    amoadd.d a0, a2, (s2)
    li t6, 19
    j fail
    .align 2
misaligned_handler:
    csrr a0, mcause;  CHECK(20, a0, 6)
    csrr a0, mtval;   sub a0, a0, s2; CHECK(21, a0, 0)
TEST_END
    .data
    .align 3
word: .dword 0, 0
