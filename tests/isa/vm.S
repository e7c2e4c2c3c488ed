#include "test.h"
/* Sv39: identity gigapage for code, a 4 KiB mapping of `data` at VA 0x40000000,
 * an unmapped page fault, and hardware A/D updates. */
TEST_BEGIN
    la t0, m_trap
    csrw mtvec, t0
    /* root[2] = identity gigapage 0x80000000 RWX, A/D set, not user */
    la s0, root
    li t0, (0x80000000 >> 12) << 10
    ori t0, t0, 0xcf
    sd t0, 16(s0)
    /* root[1] -> l1 (VA 0x40000000) */
    la t1, l1
    srli t1, t1, 12
    slli t1, t1, 10
    ori t1, t1, 1
    sd t1, 8(s0)
    la t2, l0
    srli t2, t2, 12
    slli t2, t2, 10
    ori t2, t2, 1
    la t1, l1
    sd t2, 0(t1)
    /* l0[0] -> data page, R/W, A and D clear */
    la t3, data
    srli t3, t3, 12
    slli t3, t3, 10
    ori t3, t3, 0x07
    la t2, l0
    sd t3, 0(t2)
    /* satp = Sv39 | root */
    la t0, root
    srli t0, t0, 12
    li t1, 8 << 60
    or t0, t0, t1
    csrw satp, t0
    sfence.vma
    /* go to S-mode */
    li t0, 0x1800
    csrc mstatus, t0
    li t0, 0x0800
    csrs mstatus, t0
    la t0, s_code
    csrw mepc, t0
    mret
s_code:
    li s1, 0x40000000
    li a1, 1234
    sd a1, 8(s1)
    la a2, data
    ld a0, 8(a2); CHECK(1, a0, 1234)
    /* A and D now set in the PTE */
    la a3, l0
    ld a0, 0(a3)
    andi a0, a0, 0xc0; CHECK(2, a0, 0xc0)
    /* unmapped access: load page fault, stval = address */
    li s2, 0x40001000
    ld a0, 0(s2)
    li t6, 3
    j fail
    .align 2
m_trap:
    csrr a0, mcause; CHECK(4, a0, 13)
    csrr a0, mtval;  sub a0, a0, s2; CHECK(5, a0, 0)
    j pass
TEST_END
    .data
    .align 12
root: .space 4096
l1:   .space 4096
l0:   .space 4096
data: .space 4096
