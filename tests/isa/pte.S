#include "test.h"
/* Svpbmt, Svnapot and Svinval under Sv39: PBMT bits fault unless menvcfg.PBMTE is set (and
 * the value 3 always faults); a NAPOT PTE maps 64 KiB with the low PPN bits taken from the
 * address (other N encodings fault); sinval.vma between sfence.w.inval and sfence.inval.ir
 * makes a changed PTE visible; cache-block operations fault as stores. */
    .option norvc
#define TO_S(label) li t0, 0x1800; csrc mstatus, t0; li t0, 0x0800; csrs mstatus, t0; la t0, label; csrw mepc, t0; mret
/* dst = leaf PTE for the page at label with flags */
#define LEAF(dst, label, flags) la dst, label; srli dst, dst, 12; slli dst, dst, 10; ori dst, dst, flags
#define VA 0x40000000
TEST_BEGIN
    la t0, m_trap
    csrw mtvec, t0
    /* Svinval's instructions are illegal in U-mode (checked in Bare mode) */
    la s4, setup
    li t0, 0x1800
    csrc mstatus, t0
    la t0, u_code
    csrw mepc, t0
    mret
u_code:
    li s3, 0; sfence.w.inval;       CHECK(50, s3, 2)
    li s3, 0; sinval.vma zero, zero; CHECK(51, s3, 2)
    li s3, 0; sfence.inval.ir;      CHECK(52, s3, 2)
    ecall
setup:
    la s0, root
    li t0, (0x80000000 >> 12) << 10
    ori t0, t0, 0xcf
    sd t0, 16(s0)                  /* root[2]: identity gigapage, RWX, A, D */
    li t0, 0xc7
    sd t0, 0(s0)                   /* root[0]: identity gigapage RW (TOHOST) */
    la t1, l1
    srli t1, t1, 12
    slli t1, t1, 10
    ori t1, t1, 1
    sd t1, 8(s0)                   /* root[1] -> l1 (VA 0x40000000) */
    la t2, l0
    srli t2, t2, 12
    slli t2, t2, 10
    ori t2, t2, 1
    la t1, l1
    sd t2, 0(t1)                   /* l1[0] -> l0 */
    la s1, l0
    /* l0[0]: data, RW, PBMT = NC (1) */
    LEAF(t0, data, 0xc7)
    li t1, 1
    slli t1, t1, 61
    or t0, t0, t1
    sd t0, 0(s1)
    /* l0[1]: data, RW, PBMT = 3 (reserved) */
    LEAF(t0, data, 0xc7)
    li t1, 3
    slli t1, t1, 61
    or t0, t0, t1
    sd t0, 8(s1)
    /* l0[2]: N set, PPN not ending in 0b1000: reserved */
    LEAF(t0, data, 0xc7)
    li t1, 1
    slli t1, t1, 63
    or t0, t0, t1
    sd t0, 16(s1)
    /* l0[3]: read-only page; l0[4]: execute-only page; l0[5]: pageA */
    LEAF(t0, data, 0x43)
    sd t0, 24(s1)
    LEAF(t0, data, 0x49)
    sd t0, 32(s1)
    LEAF(t0, pageA, 0xc7)
    sd t0, 40(s1)
    /* l0[16..31]: one 64 KiB NAPOT mapping of `napot` (PPN | 0b1000, N) */
    la t0, napot
    srli t0, t0, 12
    ori t0, t0, 8
    slli t0, t0, 10
    ori t0, t0, 0xc7
    li t1, 1
    slli t1, t1, 63
    or t0, t0, t1
    addi t2, s1, 16 * 8
    li t3, 16
1:  sd t0, 0(t2)
    addi t2, t2, 8
    addi t3, t3, -1
    bnez t3, 1b
    /* markers */
    la t0, data;  li t1, 111; sd t1, 0(t0)
    la t0, pageA; li t1, 222; sd t1, 0(t0)
    la t0, pageB; li t1, 333; sd t1, 0(t0)
    la t0, napot
    li t1, 0x3008
    add t0, t0, t1
    li t1, 444
    sd t1, 0(t0)
    la t0, root
    srli t0, t0, 12
    li t1, 8 << 60
    or t0, t0, t1
    csrw satp, t0
    sfence.vma
    /* phase 1: PBMTE = 0, so PBMT = NC faults */
    csrw menvcfg, zero
    la s4, phase2
    TO_S(s1_code)
s1_code:
    li s2, VA
    li s3, 0; ld a0, 0(s2); CHECK(1, s3, 13)
    CHECK(2, s5, VA)
    ecall
phase2:
    li t0, 1
    slli t0, t0, 62
    ori t0, t0, 0xf0               /* and CBIE = 3, CBCFE, CBZE */
    csrw menvcfg, t0
    csrr a0, menvcfg; CHECK(10, a0, 0x40000000000000f0)
    sfence.vma
    la s4, phase3
    TO_S(s2_code)
s2_code:
    li s2, VA
    li s3, 0; ld a0, 0(s2); CHECK(11, s3, 0)
    CHECK(12, a0, 111)
    li t0, VA + 0x1000
    li s3, 0; ld a0, 0(t0); CHECK(13, s3, 13)      /* PBMT = 3 */
    li t0, VA + 0x2000
    li s3, 0; ld a0, 0(t0); CHECK(14, s3, 13)      /* N with a bad PPN */
    /* NAPOT: VA + 0x13008 is napot + 0x3008 */
    li t0, VA + 0x13008
    li s3, 0; ld a0, 0(t0); CHECK(20, s3, 0)
    CHECK(21, a0, 444)
    li t0, VA + 0x1f000
    li t1, 555
    sd t1, 0(t0)
    la t2, napot
    li t3, 0xf000
    add t2, t2, t3
    ld a0, 0(t2); CHECK(22, a0, 555)
    /* cbo.zero on a read-only page and cbo.clean on an execute-only page fault as stores */
    li t0, VA + 0x3000 + 70
    li s3, 0; cbo.zero (t0); CHECK(30, s3, 15)
    CHECK(31, s5, VA + 0x3040)
    li t0, VA + 0x4000
    li s3, 0; cbo.clean (t0); CHECK(32, s3, 15)
    li t0, VA + 0x3000
    li s3, 0; cbo.flush (t0); CHECK(33, s3, 0)           /* readable: allowed */
    /* Svinval: repoint l0[5] from pageA to pageB */
    li t0, VA + 0x5000
    ld a0, 0(t0); CHECK(40, a0, 222)
    LEAF(t1, pageB, 0xc7)
    la t2, l0
    sfence.w.inval
    sd t1, 40(t2)
    sinval.vma t0, zero
    sfence.inval.ir
    ld a0, 0(t0); CHECK(41, a0, 333)
    ecall
phase3:
    j pass
    .align 2
m_trap:
    csrr s3, mcause
    csrr s5, mtval
    li t0, 8; beq s3, t0, 1f
    li t0, 9; beq s3, t0, 1f
    csrr t0, mepc
    addi t0, t0, 4
    csrw mepc, t0
    mret
1:  jr s4
TEST_END
    .data
    .align 12
root:  .space 4096
l1:    .space 4096
l0:    .space 4096
data:  .space 4096
pageA: .space 4096
pageB: .space 4096
    .align 16
napot: .space 65536
