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
TEST_END
    .align 2
target:
    li a0, 1
    ret
replacement:
    li a0, 2
