.option norvc
#include "test.h"
/* Self-modifying code: rewrite an instruction of a function that has already run. */
TEST_BEGIN
    call target
    CHECK(1, a0, 1)
    la t0, target
    la t1, replacement
    lw t2, 0(t1)
    sw t2, 0(t0)
    fence.i
    call target
    CHECK(2, a0, 2)
    /* modify the next instruction of the current block, no call in between */
    la t0, patch
    la t1, replacement
    lw t2, 0(t1)
    sw t2, 0(t0)
    fence.i
patch:
    li a0, 7
    CHECK(3, a0, 2)
    /* a device (DMA) rewrites code that has run; fence.i makes the CPU see it */
    call target
    CHECK(5, a0, 2)            /* translated again after the page was patched */
    la t0, target
    la t1, replacement2
    lw t2, 0(t1)
    li t3, TOHOST
    sd t0, 24(t3)
    sd t2, 32(t3)
    fence.i
    call target
    CHECK(4, a0, 3)
TEST_END
    .align 2
target:
    li a0, 1
    ret
replacement:
    li a0, 2
replacement2:
    li a0, 3
