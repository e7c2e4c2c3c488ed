#include "test.h"
/* sfence.vma with an address drops exactly what depends on that page: a remapped 4 KiB data
 * page, a remapped code page reached through the jump cache and through a direct jump from
 * another page, and a remapped 2 MiB megapage flushed by an address in another of its 4 KiB
 * pages. Code runs in S-mode on an identity gigapage; VA 0x40000000 is mapped by l0. A failed
 * check faults on tohost (unmapped) and is reported by the M-mode handler. */
#define PTE_DATA 0xc7   /* V R W A D */
#define PTE_CODE 0x4b   /* V R X A */
#define PPN(reg) srli reg, reg, 12; slli reg, reg, 10
TEST_BEGIN
    la t0, m_trap
    csrw mtvec, t0
    /* root[2] = identity gigapage 0x80000000 RWX */
    la s0, root
    li t0, (0x80000000 >> 12) << 10
    ori t0, t0, 0xcf
    sd t0, 16(s0)
    /* root[1] -> l1; l1[0] -> l0 */
    la t1, l1
    PPN(t1)
    ori t1, t1, 1
    sd t1, 8(s0)
    la t2, l0
    PPN(t2)
    ori t2, t2, 1
    la t1, l1
    sd t2, 0(t1)
    /* l1[1]: megapage VA 0x40200000 -> PA 0x80400000 */
    li t2, (0x80400000 >> 12) << 10
    ori t2, t2, PTE_DATA
    sd t2, 8(t1)
    li t3, 0x80401000
    li t4, 333
    sd t4, 0(t3)
    li t3, 0x80601000
    li t4, 444
    sd t4, 0(t3)
    /* l0[0] -> data_a, l0[1] -> code_a, l0[3] -> code_t (a trampoline into VA 0x40001000) */
    la t2, l0
    la t3, data_a
    PPN(t3)
    ori t3, t3, PTE_DATA
    sd t3, 0(t2)
    la t3, code_a
    PPN(t3)
    ori t3, t3, PTE_CODE
    sd t3, 8(t2)
    la t3, code_t
    PPN(t3)
    ori t3, t3, PTE_CODE
    sd t3, 24(t2)
    /* satp = Sv39 | root, then S-mode */
    la t0, root
    srli t0, t0, 12
    li t1, 8 << 60
    or t0, t0, t1
    csrw satp, t0
    sfence.vma
    li t0, 0x1800
    csrc mstatus, t0
    li t0, 0x0800
    csrs mstatus, t0
    la t0, s_code
    csrw mepc, t0
    mret
s_code:
    /* 1: data page */
    li s1, 0x40000000
    ld a0, 0(s1); CHECK(1, a0, 111)
    la t2, l0
    la t3, data_b
    PPN(t3)
    ori t3, t3, PTE_DATA
    sd t3, 0(t2)
    sfence.vma s1
    ld a0, 0(s1); CHECK(2, a0, 222)
    /* 2: code page, called through the jump cache and through the trampoline's direct jump */
    li s2, 0x40001000
    li s3, 0x40003000
    li s4, 3
1:  jalr ra, 0(s2); CHECK(3, a0, 1)
    jalr ra, 0(s3); CHECK(4, a0, 1)
    addi s4, s4, -1
    bnez s4, 1b
    la t2, l0
    la t3, code_b
    PPN(t3)
    ori t3, t3, PTE_CODE
    sd t3, 8(t2)
    sfence.vma s2
    jalr ra, 0(s2); CHECK(5, a0, 2)
    jalr ra, 0(s3); CHECK(6, a0, 2)
    /* 3: megapage remapped, flushed through another of its 4 KiB pages */
    li s5, 0x40201000
    ld a0, 0(s5); CHECK(7, a0, 333)
    la t1, l1
    li t2, (0x80600000 >> 12) << 10
    ori t2, t2, PTE_DATA
    sd t2, 8(t1)
    li s6, 0x40200000
    sfence.vma s6
    ld a0, 0(s5); CHECK(8, a0, 444)
    /* an unrelated page's sfence.vma leaves working translations working */
    sfence.vma s3
    jalr ra, 0(s2); CHECK(9, a0, 2)
    ecall                   /* back to M-mode (tohost is not mapped) */
    .align 2
m_trap:
    /* A failed check in S-mode faults on tohost and lands here with t6 = its number,
     * already encoded by `fail` (n << 1 | 1): undo that and report it from M-mode. */
    csrr t5, mcause
    li t4, 9
    beq t5, t4, pass
    srli t6, t6, 1
    j fail
TEST_END
    .data
    .align 12
root: .space 4096
l1:   .space 4096
l0:   .space 4096
data_a: .dword 111
    .align 12
data_b: .dword 222
    .align 12
code_a:
    li a0, 1
    j 1f
1:  ret
    .align 12
code_b:
    li a0, 2
    ret
    .align 12
code_t:
    j . - 0x2000
    .align 12
