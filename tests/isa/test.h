/* Shared harness for machine-server's bare-metal ISA tests.
 * Programs run in M-mode from 0x80000000 and report through the HTIF tohost register:
 * 1 = pass, (n << 1) | 1 = test n failed. */
#define TOHOST 0x00102000
    .option nopic

#define TEST_BEGIN          \
    .section .text.init;    \
    .globl _start;          \
_start:                     \
    la t0, trap_unexpected; \
    csrw mtvec, t0;         \
    li t0, 0x6000;          /* mstatus.FS = dirty */ \
    csrs mstatus, t0;

#define TEST_END            \
pass:                       \
    li t0, TOHOST;          \
    li t1, 1;               \
    sd t1, 0(t0);           \
1:  j 1b;                   \
fail:                       \
    bnez t6, 2f;            /* a failure never reports as a pass */ \
    li t6, 1000;            \
2:  li t0, TOHOST;          \
    slli t6, t6, 1;         \
    ori t6, t6, 1;          \
    sd t6, 0(t0);           \
1:  j 1b;                   \
    .align 2;               \
trap_unexpected:            \
    li t6, 999;             \
    j fail;

/* Fails with test number n unless reg == val. Uses t5, t6. */
#define CHECK(n, reg, val) li t6, n; li t5, val; bne reg, t5, fail
/* rd = a OP b for register-register ops. */
#define TEST_RR(n, inst, a, b, expect) li a1, a; li a2, b; inst a0, a1, a2; CHECK(n, a0, expect)
#define TEST_RI(n, inst, a, imm, expect) li a1, a; inst a0, a1, imm; CHECK(n, a0, expect)
