#include "test.h"
/* Zicbom, Zicboz, Zicbop, Zihintpause: cbo.zero clears the 64-byte block holding rs1; clean,
 * flush and inval are accepted; below M-mode menvcfg (and in U-mode senvcfg) must enable them,
 * else they are illegal; the prefetch hints and pause do nothing. */
    .option norvc
#define TO_S(label) li t0, 0x1800; csrc mstatus, t0; li t0, 0x0800; csrs mstatus, t0; la t0, label; csrw mepc, t0; mret
#define TO_U(label) li t0, 0x1800; csrc mstatus, t0; la t0, label; csrw mepc, t0; mret
/* Fills buf[0..192) with all ones. */
#define FILL la t0, buf; li t1, -1; li t2, 24; 9: sd t1, 0(t0); addi t0, t0, 8; addi t2, t2, -1; bnez t2, 9b
TEST_BEGIN
    la t0, m_trap
    csrw mtvec, t0
    la s0, buf
    addi a1, s0, 64 + 13          /* an unaligned address inside the second block */
    FILL
    cbo.zero (a1)
    ld a0, 56(s0);  CHECK(1, a0, -1)   /* the block before is untouched */
    ld a0, 64(s0);  CHECK(2, a0, 0)
    ld a0, 120(s0); CHECK(3, a0, 0)
    ld a0, 128(s0); CHECK(4, a0, -1)   /* the block after too */
    li s3, 0
    cbo.clean (a1)
    cbo.flush (a1)
    cbo.inval (a1)
    prefetch.r 0(s0)
    prefetch.w 64(s0)
    prefetch.i 0(s0)
    pause
    CHECK(5, s3, 0)
    ld a0, 0(s0);  CHECK(6, a0, -1)
    /* menvcfg: CBIE, CBCFE and CBZE are writable; the reserved CBIE value 2 keeps the field */
    li t0, 0xf0
    csrw menvcfg, t0
    csrr a0, menvcfg; andi a0, a0, 0xf0; CHECK(7, a0, 0xf0)
    li t0, 0x20
    csrw menvcfg, t0
    csrr a0, menvcfg; andi a0, a0, 0xf0; CHECK(8, a0, 0x30)
    /* phase 1: menvcfg = 0, every cbo in S-mode is an illegal instruction */
    csrw menvcfg, zero
    FILL
    la s4, phase2
    TO_S(s1_code)
s1_code:
    li s3, 0; cbo.zero (a1);  CHECK(10, s3, 2)
    li s3, 0; cbo.clean (a1); CHECK(11, s3, 2)
    li s3, 0; cbo.flush (a1); CHECK(12, s3, 2)
    li s3, 0; cbo.inval (a1); CHECK(13, s3, 2)
    ld a0, 64(s0); CHECK(14, a0, -1)   /* nothing was zeroed */
    ecall
phase2:
    /* menvcfg: CBIE = 01 (inval as flush), CBCFE, CBZE; senvcfg = 0 */
    li t0, 0xd0
    csrw menvcfg, t0
    csrw senvcfg, zero
    la s4, phase3
    TO_S(s2_code)
s2_code:
    li s3, 0
    cbo.zero (a1)
    cbo.clean (a1)
    cbo.flush (a1)
    cbo.inval (a1)
    CHECK(20, s3, 0)
    ld a0, 64(s0);  CHECK(21, a0, 0)
    ld a0, 128(s0); CHECK(22, a0, -1)
    /* to U-mode, where senvcfg = 0 forbids them all */
    li t0, 0x100
    csrc sstatus, t0
    la t0, u1_code
    csrw sepc, t0
    sret
u1_code:
    li s3, 0; cbo.zero (s0);  CHECK(30, s3, 2)
    li s3, 0; cbo.clean (s0); CHECK(31, s3, 2)
    li s3, 0; cbo.inval (s0); CHECK(32, s3, 2)
    ecall
phase3:
    /* senvcfg enables them in U-mode too */
    li t0, 0xd0
    csrw senvcfg, t0
    csrr a0, senvcfg; CHECK(40, a0, 0xd0)
    la s4, done
    TO_U(u2_code)
u2_code:
    li s3, 0
    cbo.zero (s0)
    cbo.clean (s0)
    cbo.inval (s0)
    CHECK(41, s3, 0)
    ld a0, 0(s0);  CHECK(42, a0, 0)
    ld a0, 56(s0); CHECK(43, a0, 0)
    ecall
done:
    j pass
    .align 2
/* Records the cause; skips the instruction and returns, except for ecall (goes to s4 in M). */
m_trap:
    csrr s3, mcause
    li t0, 8; beq s3, t0, 1f
    li t0, 9; beq s3, t0, 1f
    csrr t0, mepc
    addi t0, t0, 4
    csrw mepc, t0
    mret
1:  jr s4
TEST_END
    .data
    .align 6
buf: .space 192
