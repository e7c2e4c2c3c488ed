#include "test.h"
/* Sdtrig mcontrol triggers: an execute trigger raises a breakpoint exception before the
 * instruction (mtval = its address), load and store triggers before the access (mtval = the
 * address, memory untouched); in M-mode only while mstatus.MIE is set; a U-only trigger does
 * not fire in M-mode but does in U-mode. */
    .option norvc
#define MCONTROL(bits) li t0, (2 << 60) | (bits); csrw tdata1, t0
TEST_BEGIN
    la t0, m_trap
    csrw mtvec, t0
    csrsi mstatus, 8                    /* MIE, so M-mode triggers fire */
    /* execute trigger on `bp` */
    csrw tselect, zero
    la t0, bp
    csrw tdata2, t0
    MCONTROL(0x44)                      /* M, execute */
    csrr a0, tdata1; li t1, (2 << 60) | 0x44; sub a0, a0, t1; CHECK(1, a0, 0)
    li s3, 0
    li s7, 0
bp: li s7, 1                            /* skipped by the handler */
    CHECK(2, s3, 3)
    CHECK(3, s7, 0)
    la t1, bp; sub a0, s5, t1; CHECK(4, a0, 0)
    /* load trigger on `data`, store trigger on `data + 8` (trigger 1) */
    la s0, data
    csrw tdata2, s0
    MCONTROL(0x41)                      /* M, load */
    li t0, 1
    csrw tselect, t0
    addi t1, s0, 8
    csrw tdata2, t1
    MCONTROL(0x42)                      /* M, store */
    li s3, 0; ld a0, 0(s0);  CHECK(10, s3, 3)
    sub a0, s5, s0; CHECK(11, a0, 0)
    li s3, 0; sd s0, 0(s0);  CHECK(12, s3, 0)   /* a store to the load trigger's address */
    li s3, 0; li t1, 77; sd t1, 8(s0); CHECK(13, s3, 3)
    ld a0, 8(s0); CHECK(14, a0, 5)              /* the store did not happen */
    li s3, 0; ld a0, 16(s0); CHECK(15, s3, 0)
    /* MIE clear: nothing fires in M-mode */
    csrci mstatus, 8
    li s3, 0; sd t1, 8(s0); CHECK(16, s3, 0)
    ld a0, 8(s0); CHECK(17, a0, 77)
    /* a U-only execute trigger fires in U-mode only */
    csrw tselect, zero
    la t0, u_bp
    csrw tdata2, t0
    MCONTROL(0x0c)                      /* U, execute */
    csrsi mstatus, 8
    li s3, 0
    li s8, 0
    la s4, done
    li t0, 0x1800
    csrc mstatus, t0
    la t0, u_code
    csrw mepc, t0
    mret
u_code:
    nop
u_bp:
    nop
    ecall
done:
    CHECK(20, s8, 3)                    /* the U-mode trigger fired first */
    j pass
    .align 2
m_trap:
    csrr s3, mcause
    csrr s5, mtval
    li t0, 8; beq s3, t0, 1f
    mv s8, s3
    csrr t0, mepc
    addi t0, t0, 4
    csrw mepc, t0
    mret
1:  jr s4
TEST_END
    .data
    .align 4
data: .dword 1, 5, 9
