#include "test.h"
/* Zicntr and Zihpm: instret counts retired instructions, a write to minstret replaces the
 * increment, time advances, the hpm counters read zero, and mcounteren/scounteren gate the
 * user-mode counters. */
    .option norvc
TEST_BEGIN
    la t0, m_trap
    csrw mtvec, t0
    rdinstret a1
    nop
    nop
    rdinstret a2
    sub a3, a2, a1; CHECK(1, a3, 3)
    rdcycle a0
    sltu a0, zero, a0; CHECK(2, a0, 1)
    csrr a0, hpmcounter3;   CHECK(3, a0, 0)
    csrr a0, mhpmcounter31; CHECK(4, a0, 0)
    csrr a0, mhpmevent3;    CHECK(5, a0, 0)
    li t0, 100
    csrw minstret, t0
    csrr a0, minstret; CHECK(6, a0, 100)
    li t0, -1
    csrw minstret, t0
    nop
    csrr a0, minstret; CHECK(7, a0, 0)      /* wraps */
    /* the trigger module: two mcontrol triggers (tinfo: type 2), tselect 2 is out of range */
    li t0, 1
    csrw tselect, t0
    li t0, 2
    csrw tselect, t0
    csrr a0, tselect; CHECK(8, a0, 1)
    csrr a0, tinfo;   CHECK(9, a0, 4)
    csrr a0, tdata1;  CHECK(10, a0, 0)
    csrw tselect, zero
    rdtime a0
1:  rdtime a1
    beq a0, a1, 1b
    /* U-mode: with mcounteren = 0 the counters are illegal */
    csrw mcounteren, zero
    csrw scounteren, zero
    la s4, phase2
    li t0, 0x1800
    csrc mstatus, t0
    la t0, u1_code
    csrw mepc, t0
    mret
u1_code:
    li s3, 0; rdcycle a0;   CHECK(13, s3, 2)
    li s3, 0; rdtime a0;    CHECK(11, s3, 2)
    li s3, 0; rdinstret a0; CHECK(12, s3, 2)
    ecall
phase2:
    li t0, 0x17
    csrw mcounteren, t0
    la s4, phase3
    li t0, 0x1800
    csrc mstatus, t0
    la t0, u2_code
    csrw mepc, t0
    mret
u2_code:
    li s3, 0; rdcycle a0;   CHECK(20, s3, 2)    /* scounteren still 0 */
    ecall
phase3:
    li t0, 0x17
    csrw scounteren, t0
    la s4, phase4
    li t0, 0x1800
    csrc mstatus, t0
    la t0, u3_code
    csrw mepc, t0
    mret
u3_code:
    li s3, 0
    rdcycle a0
    rdtime a0
    rdinstret a0
    csrr a0, hpmcounter4
    CHECK(30, s3, 0)
    li s3, 0; csrr a0, hpmcounter5; CHECK(31, s3, 2)   /* bit 5 clear */
    ecall
phase4:
    j pass
    .align 2
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
