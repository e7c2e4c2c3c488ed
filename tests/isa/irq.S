#include "test.h"
/* Interrupts: an external SEIP line is not latched by csrrs/csrrc on mip, and the machine
 * timer wakes wfi and is taken when enabled. The harness drives SEIP at TOHOST+8 and
 * mtimecmp at TOHOST+16. */
TEST_BEGIN
    li s0, TOHOST
    /* raise the external line, do a read-modify-write of mip, lower the line */
    li t0, 1
    sd t0, 8(s0)
    csrr a0, mip
    andi a0, a0, 0x200; CHECK(1, a0, 0x200)
    li t0, 0x20
    csrs mip, t0               /* set STIP: RMW */
    csrc mip, t0               /* clear STIP: RMW */
    sd zero, 8(s0)
    csrr a0, mip
    andi a0, a0, 0x220; CHECK(2, a0, 0)
    /* software SEIP is separate and writable */
    li t0, 0x200
    csrs mip, t0
    csrr a0, mip
    andi a0, a0, 0x200; CHECK(3, a0, 0x200)
    csrc mip, t0
    csrr a0, mip
    andi a0, a0, 0x200; CHECK(4, a0, 0)
    /* timer: mtimecmp = now + 1000 ticks (100 us), MTIE on, MIE off: wfi wakes, no trap */
    la t0, timer_trap
    csrw mtvec, t0
    li s1, 0
    rdtime t1
    addi t1, t1, 1000
    sd t1, 16(s0)
    li t0, 0x80
    csrs mie, t0
    wfi
1:  csrr a0, mip
    andi a0, a0, 0x80
    beqz a0, 1b                /* wfi may return early; MTIP must come */
    CHECK(5, s1, 0)            /* not taken while mstatus.MIE = 0 */
    /* now enable globally: the trap is taken at once */
    csrsi mstatus, 8
    nop
    CHECK(6, s1, 1)
    j pass
    .align 2
timer_trap:
    csrr a0, mcause
    li t5, 0x8000000000000007
    li t6, 7
    bne a0, t5, fail
    li s1, 1
    li t0, -1
    sd t0, 16(s0)              /* mtimecmp = max: MTIP drops */
    csrci mstatus, 8
    li t0, 0x80
    csrc mie, t0
    mret
TEST_END
