#include "test.h"
/* Traps, privilege changes, delegation and CSR rules. */
TEST_BEGIN
    /* ecall from M: cause 11, mepc at the ecall */
    la t0, h1
    csrw mtvec, t0
e1: ecall
    li t6, 1
    j fail
    .align 2
h1: csrr a0, mcause; CHECK(2, a0, 11)
    csrr a0, mepc; la a1, e1; sub a0, a0, a1; CHECK(3, a0, 0)
    /* illegal instruction: mtval holds the instruction bits */
    la t0, h2
    csrw mtvec, t0
e2: .word 0xffffffff
    li t6, 4
    j fail
    .align 2
h2: csrr a0, mcause; CHECK(5, a0, 2)
    csrr a0, mtval;  li a1, 0xffffffff; sub a0, a0, a1; CHECK(6, a0, 0)
    /* a non-existent CSR is illegal */
    la t0, h3
    csrw mtvec, t0
    csrr a0, 0x7c0
    li t6, 7
    j fail
    .align 2
h3: csrr a0, mcause; CHECK(8, a0, 2)
    /* misa says RV64 with IMAFDC, S and U */
    csrr a0, misa
    srli a1, a0, 62; CHECK(9, a1, 2)
    li a2, 0x14112d
    and a1, a0, a2; CHECK(10, a1, 0x14112d)
    /* mret into S-mode; ecall from S is delegated to S when medeleg says so */
    la t0, s_trap
    csrw stvec, t0
    li t0, 1 << 9
    csrw medeleg, t0
    li t0, 0x1800
    csrc mstatus, t0
    li t0, 0x0800             /* MPP = S */
    csrs mstatus, t0
    la t0, s_code
    csrw mepc, t0
    la t0, m_trap
    csrw mtvec, t0
    mret
s_code:
    /* in S-mode, M CSRs are illegal: goes to M (illegal instr not delegated) */
    li s3, 0
    csrr a0, mstatus
    /* m_trap returns here with s3 = 1 */
    li t6, 11
    li t5, 1
    bne s3, t5, fail
    ecall                      /* delegated: goes to s_trap */
    li t6, 12
    j fail
    .align 2
s_trap:
    csrr a0, scause; CHECK(13, a0, 9)
    csrr a0, sstatus
    andi a1, a0, 0x100; CHECK(14, a1, 0x100)   /* SPP = S */
    /* sret to U-mode */
    li t0, 0x100
    csrc sstatus, t0
    la t0, u_code
    csrw sepc, t0
    sret
u_code:
    li s3, 0
    csrr a0, sstatus           /* illegal in U -> M (not delegated) */
    li t6, 15
    li t5, 1
    bne s3, t5, fail
    ecall                      /* ecall from U: not delegated, goes to M with cause 8 */
    li t6, 16
    j fail
    .align 2
m_trap:
    csrr a0, mcause
    li t5, 2
    beq a0, t5, m_illegal
    CHECK(17, a0, 8)
    /* MPP says U */
    csrr a0, mstatus
    srli a0, a0, 11
    andi a0, a0, 3
    CHECK(18, a0, 0)
    j pass
m_illegal:
    li s3, 1
    csrr a0, mepc
    addi a0, a0, 4
    csrw mepc, a0
    mret
TEST_END
