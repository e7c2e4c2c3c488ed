#include "test.h"
/* Sstc: stimecmp, menvcfg.STCE (STIP follows time >= stimecmp and ignores writes to mip),
 * mcounteren.TM gating S-mode access, and the S-mode timer interrupt waking wfi. */
    .option norvc
#define TO_S(label) li t0, 0x1800; csrc mstatus, t0; li t0, 0x0800; csrs mstatus, t0; la t0, label; csrw mepc, t0; mret
TEST_BEGIN
    la t0, m_trap
    csrw mtvec, t0
    li t0, 0x123456789
    csrw stimecmp, t0
    csrr a0, stimecmp; CHECK(1, a0, 0x123456789)
    /* STCE = 0: STIP is software's; S-mode may not access stimecmp */
    csrw menvcfg, zero
    li t0, -1
    csrw stimecmp, t0
    li t0, 0x20
    csrs mip, t0
    csrr a0, mip; andi a0, a0, 0x20; CHECK(2, a0, 0x20)
    csrc mip, t0
    li t0, 2
    csrw mcounteren, t0
    la s4, phase2
    TO_S(s1_code)
s1_code:
    li s3, 0
    csrr a0, stimecmp
    CHECK(3, s3, 2)
    ecall
phase2:
    /* STCE = 1 */
    li t0, 1
    slli t0, t0, 63
    csrs menvcfg, t0
    csrr a0, menvcfg; srli a0, a0, 63; CHECK(10, a0, 1)
    csrw stimecmp, zero
    csrr a0, mip; andi a0, a0, 0x20; CHECK(11, a0, 0x20)
    li t0, -1
    csrw stimecmp, t0
    csrr a0, mip; andi a0, a0, 0x20; CHECK(12, a0, 0)
    li t0, 0x20
    csrs mip, t0
    csrr a0, mip; andi a0, a0, 0x20; CHECK(13, a0, 0)
    csrc mip, t0
    /* mcounteren.TM = 0: S-mode may not write stimecmp */
    csrw mcounteren, zero
    la s4, phase3
    TO_S(s2_code)
s2_code:
    li s3, 0
    csrw stimecmp, zero
    CHECK(14, s3, 2)
    ecall
phase3:
    /* the S timer interrupt, delegated: S arms stimecmp = time + 1000 and waits in wfi */
    li t0, 2
    csrw mcounteren, t0
    li t0, 0x20
    csrw mideleg, t0
    la t0, s_trap
    csrw stvec, t0
    la s4, phase4
    TO_S(s3_code)
s3_code:
    li s6, 0
    li t0, 0x20
    csrs sie, t0
    csrsi sstatus, 2
    rdtime t1
    addi t1, t1, 1000
    csrw stimecmp, t1
1:  wfi
    beqz s6, 1b
    CHECK(20, s6, 1)
    ecall
    .align 2
s_trap:
    csrr a0, scause
    li t5, 0x8000000000000005
    li t6, 21
    bne a0, t5, fail
    li t0, -1
    csrw stimecmp, t0          /* STIP drops */
    csrr a0, sip; andi a0, a0, 0x20; CHECK(22, a0, 0)
    li s6, 1
    sret
phase4:
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
