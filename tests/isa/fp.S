#include "test.h"
/* F and D: arithmetic, exact fflags, rounding modes, NaN-boxing, conversions. */
#define FLAGS_CLEAR csrw fflags, zero
#define CHECK_FLAGS(n, val) csrr a5, fflags; CHECK(n, a5, val)
#define NX 1
#define UF 2
#define OF 4
#define DZ 8
#define NV 16
TEST_BEGIN
    la s0, consts
    fld f1, 0(s0)        /* 1.0 */
    fld f2, 8(s0)        /* 3.0 */
    FLAGS_CLEAR
    fdiv.d f3, f1, f2    /* 1/3: inexact */
    CHECK_FLAGS(1, NX)
    fmul.d f4, f3, f2
    fmv.x.d a0, f4; CHECK(2, a0, 0x3ff0000000000000)
    FLAGS_CLEAR
    fadd.d f4, f1, f2    /* exact */
    CHECK_FLAGS(3, 0)
    fmv.x.d a0, f4; CHECK(4, a0, 0x4010000000000000)
    /* divide by zero */
    fmv.d.x f5, zero
    fdiv.d f6, f1, f5
    CHECK_FLAGS(5, DZ)
    fmv.x.d a0, f6; CHECK(6, a0, 0x7ff0000000000000)
    /* 0/0: invalid, canonical NaN */
    FLAGS_CLEAR
    fdiv.d f6, f5, f5
    CHECK_FLAGS(7, NV)
    fmv.x.d a0, f6; CHECK(8, a0, 0x7ff8000000000000)
    /* overflow */
    fld f7, 16(s0)       /* DBL_MAX */
    FLAGS_CLEAR
    fmul.d f8, f7, f2
    CHECK_FLAGS(9, OF | NX)
    /* rounding modes on conversion: 2.5 and -2.5 */
    fld f9, 24(s0)       /* 2.5 */
    fcvt.w.d a0, f9, rne; CHECK(10, a0, 2)
    fcvt.w.d a0, f9, rmm; CHECK(11, a0, 3)
    fcvt.w.d a0, f9, rtz; CHECK(12, a0, 2)
    fcvt.w.d a0, f9, rup; CHECK(13, a0, 3)
    fcvt.w.d a0, f9, rdn; CHECK(14, a0, 2)
    fneg.d f10, f9
    fcvt.w.d a0, f10, rdn; CHECK(15, a0, -3)
    fcvt.w.d a0, f10, rmm; CHECK(16, a0, -3)
    /* dynamic rounding mode from frm */
    li t0, 3
    csrw frm, t0
    fcvt.w.d a0, f9; CHECK(17, a0, 3)
    csrw frm, zero
    /* saturation: NaN and out of range raise NV */
    FLAGS_CLEAR
    fcvt.w.d a0, f6; CHECK(18, a0, 0x7fffffff)
    CHECK_FLAGS(19, NV)
    fcvt.wu.d a0, f10, rtz; CHECK(20, a0, 0)
    fcvt.l.d a0, f7; CHECK(21, a0, 0x7fffffffffffffff)
    fcvt.lu.d a0, f7; CHECK(22, a0, -1)
    /* fcvt.wu results are sign-extended from 32 bits */
    fld f11, 32(s0)      /* 4294967295.0 */
    fcvt.wu.d a0, f11; CHECK(23, a0, -1)
    /* NaN-boxing: a single in a non-boxed register reads as canonical NaN */
    fmv.d.x f12, zero
    FLAGS_CLEAR
    fadd.s f13, f12, f12
    fmv.x.w a0, f13; CHECK(24, a0, 0x7fc00000)
    flw f14, 40(s0)      /* 1.5f */
    fmv.x.d a0, f14; CHECK(25, a0, 0xffffffff3fc00000)
    fadd.s f15, f14, f14
    fmv.x.w a0, f15; CHECK(26, a0, 0x40400000)
    /* min/max with NaN and signed zeros */
    fmin.d f16, f6, f1
    fmv.x.d a0, f16; CHECK(27, a0, 0x3ff0000000000000)
    fmv.d.x f17, zero
    fneg.d f18, f17
    fmin.d f16, f17, f18
    fmv.x.d a0, f16; CHECK(28, a0, 0x8000000000000000)
    fmax.d f16, f18, f17
    fmv.x.d a0, f16; CHECK(29, a0, 0)
    /* comparisons: flt with a quiet NaN is invalid, feq is not */
    FLAGS_CLEAR
    feq.d a0, f6, f1; CHECK(30, a0, 0)
    CHECK_FLAGS(31, 0)
    flt.d a0, f6, f1; CHECK(32, a0, 0)
    CHECK_FLAGS(33, NV)
    fle.d a0, f1, f2; CHECK(34, a0, 1)
    /* fclass */
    fclass.d a0, f6;  CHECK(35, a0, 0x200)
    fclass.d a0, f18; CHECK(36, a0, 0x8)
    fclass.d a0, f1;  CHECK(37, a0, 0x40)
    /* fused multiply-add is fused: (1/3)*3 - 1 is not zero */
    fnmsub.d f19, f3, f2, f1
    fmv.x.d a0, f19; CHECK(38, a0, 0x3c90000000000000)  /* 1 - 3*(1/3) = 2^-54 */
    /* sign injection */
    fsgnjn.d f20, f1, f1
    fmv.x.d a0, f20; CHECK(39, a0, 0xbff0000000000000)
    /* int -> float with rounding */
    li a1, 0x20000001    /* 536870913: not representable in single */
    fcvt.s.w f21, a1, rtz
    fmv.x.w a0, f21; CHECK(40, a0, 0x4e000000)
    fcvt.s.w f21, a1, rup
    fmv.x.w a0, f21; CHECK(41, a0, 0x4e000001)
    li a1, -1
    fcvt.d.lu f22, a1
    fmv.x.d a0, f22; CHECK(42, a0, 0x43f0000000000000)
    /* double -> single narrowing, inexact */
    FLAGS_CLEAR
    fcvt.s.d f23, f3
    CHECK_FLAGS(43, NX)
    /* RMM arithmetic tie: 1 + 2^-53 rounds away to 1 + 2^-52 */
    fld f24, 48(s0)      /* 2^-53 */
    fadd.d f25, f1, f24, rmm
    fmv.x.d a0, f25; CHECK(44, a0, 0x3ff0000000000001)
    fadd.d f25, f1, f24, rne
    fmv.x.d a0, f25; CHECK(45, a0, 0x3ff0000000000000)
    /* fsqrt of negative: NV */
    FLAGS_CLEAR
    fsqrt.d f26, f10
    CHECK_FLAGS(46, NV)
    /* an invalid rounding mode (5) is an illegal instruction */
    la t0, rm_trap
    csrw mtvec, t0
    .word 0x0220d0d3      /* fadd.d f1, f1, f2 with rm = 5 */
    li t6, 47
    j fail
    .align 2
rm_trap:
    csrr a0, mcause; CHECK(48, a0, 2)
    /* fcsr combines frm and fflags */
    li t0, 0x45
    csrw fcsr, t0
    csrr a0, frm;    CHECK(49, a0, 2)
    csrr a0, fflags; CHECK(50, a0, 5)
TEST_END
    .data
    .align 3
consts:
    .double 1.0, 3.0
    .dword 0x7fefffffffffffff
    .double 2.5, 4294967295.0
    .float 1.5, 0.0
    .dword 0x3ca0000000000000
