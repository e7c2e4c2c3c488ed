#include "test.h"
/* Zfh and Zfhmin: half-precision arithmetic, conversions in every rounding mode, NaN-boxing,
 * exact fflags, fclass, min/max and comparisons, flh/fsh, reserved rounding modes. */
#define FLAGS_CLEAR csrw fflags, zero
#define CHECK_FLAGS(n, val) csrr a5, fflags; CHECK(n, a5, val)
#define NX 1
#define UF 2
#define OF 4
#define DZ 8
#define NV 16
/* freg = the half with bit pattern `bits` (NaN-boxed by fmv.h.x). */
#define LH(freg, bits) li t0, bits; fmv.h.x freg, t0
/* freg must hold the NaN-boxed half `bits`. */
#define CHECKH(n, freg, bits) fmv.x.d a0, freg; CHECK(n, a0, 0xffffffffffff0000 | (bits))
TEST_BEGIN
    /* Arithmetic and its flags */
    LH(f1, 0x3c00)       /* 1.0 */
    LH(f2, 0x4000)       /* 2.0 */
    LH(f3, 0x4200)       /* 3.0 */
    FLAGS_CLEAR
    fadd.h f4, f1, f2
    CHECKH(1, f4, 0x4200)
    CHECK_FLAGS(2, 0)
    fsub.h f4, f1, f3
    CHECKH(3, f4, 0xc000)
    fmul.h f4, f2, f3
    CHECKH(4, f4, 0x4600)
    fdiv.h f4, f1, f3    /* 1/3 */
    CHECKH(5, f4, 0x3555)
    CHECK_FLAGS(6, NX)
    fdiv.h f4, f1, f3, rup
    CHECKH(7, f4, 0x3556)
    fdiv.h f4, f1, f3, rtz
    CHECKH(8, f4, 0x3555)
    fneg.h f5, f1
    fdiv.h f4, f5, f3, rdn
    CHECKH(9, f4, 0xb556)
    fsqrt.h f4, f2       /* sqrt(2) */
    CHECKH(10, f4, 0x3da8)
    fsqrt.h f4, f2, rup
    CHECKH(11, f4, 0x3da9)
    FLAGS_CLEAR
    fsqrt.h f4, f5       /* sqrt(-1): invalid */
    CHECKH(12, f4, 0x7e00)
    CHECK_FLAGS(13, NV)
    FLAGS_CLEAR
    fmv.h.x f6, zero
    fdiv.h f4, f1, f6    /* 1/0 */
    CHECKH(14, f4, 0x7c00)
    CHECK_FLAGS(15, DZ)
    LH(f7, 0x7bff)       /* 65504, the largest half */
    FLAGS_CLEAR
    fmul.h f4, f7, f2
    CHECKH(16, f4, 0x7c00)
    CHECK_FLAGS(17, OF | NX)
    fmul.h f4, f7, f2, rtz
    CHECKH(18, f4, 0x7bff)
    LH(f8, 0x0001)       /* 2^-24, the smallest subnormal */
    LH(f9, 0x3800)       /* 0.5 */
    FLAGS_CLEAR
    fmul.h f4, f8, f9    /* 2^-25: a tie, to even (zero) */
    CHECKH(19, f4, 0x0000)
    CHECK_FLAGS(20, UF | NX)
    fmul.h f4, f8, f9, rup
    CHECKH(21, f4, 0x0001)
    FLAGS_CLEAR
    LH(f10, 0x7c01)      /* signaling NaN */
    fadd.h f4, f10, f1
    CHECKH(22, f4, 0x7e00)
    CHECK_FLAGS(23, NV)
    /* x - x is -0 only when rounding down */
    fsub.h f4, f1, f1
    CHECKH(24, f4, 0x0000)
    fsub.h f4, f1, f1, rdn
    CHECKH(25, f4, 0x8000)

    /* Fused multiply-add: all four, and one rounding of the exact sum */
    fmadd.h f4, f2, f3, f1
    CHECKH(26, f4, 0x4700)
    fmsub.h f4, f2, f3, f1
    CHECKH(27, f4, 0x4500)
    fnmsub.h f4, f2, f3, f1
    CHECKH(28, f4, 0xc500)
    fnmadd.h f4, f2, f3, f1
    CHECKH(29, f4, 0xc700)
    LH(f11, 0x7800)      /* 2^15 */
    FLAGS_CLEAR
    fmadd.h f4, f8, f8, f11, rup   /* 2^15 + 2^-48 */
    CHECKH(30, f4, 0x7801)
    CHECK_FLAGS(31, NX)
    fmadd.h f4, f8, f8, f11
    CHECKH(32, f4, 0x7800)
    LH(f12, 0x7e00)      /* quiet NaN */
    LH(f13, 0x7c00)      /* +inf */
    FLAGS_CLEAR
    fmadd.h f4, f13, f6, f12       /* inf * 0 + qNaN: invalid all the same */
    CHECKH(33, f4, 0x7e00)
    CHECK_FLAGS(34, NV)

    /* Narrowing single -> half in each rounding mode: 1 + 0.75 ulp, the tie 1 + 0.5 ulp,
     * and their negatives. */
    li t0, 0x3f801800; fmv.w.x f14, t0
    li t0, 0x3f801000; fmv.w.x f15, t0
    fneg.s f16, f14
    fneg.s f17, f15
    FLAGS_CLEAR
    fcvt.h.s f4, f14, rne; CHECKH(40, f4, 0x3c01)
    CHECK_FLAGS(41, NX)
    fcvt.h.s f4, f14, rtz; CHECKH(42, f4, 0x3c00)
    fcvt.h.s f4, f14, rdn; CHECKH(43, f4, 0x3c00)
    fcvt.h.s f4, f14, rup; CHECKH(44, f4, 0x3c01)
    fcvt.h.s f4, f14, rmm; CHECKH(45, f4, 0x3c01)
    fcvt.h.s f4, f15, rne; CHECKH(46, f4, 0x3c00)
    fcvt.h.s f4, f15, rtz; CHECKH(47, f4, 0x3c00)
    fcvt.h.s f4, f15, rdn; CHECKH(48, f4, 0x3c00)
    fcvt.h.s f4, f15, rup; CHECKH(49, f4, 0x3c01)
    fcvt.h.s f4, f15, rmm; CHECKH(50, f4, 0x3c01)
    fcvt.h.s f4, f16, rne; CHECKH(51, f4, 0xbc01)
    fcvt.h.s f4, f16, rtz; CHECKH(52, f4, 0xbc00)
    fcvt.h.s f4, f16, rdn; CHECKH(53, f4, 0xbc01)
    fcvt.h.s f4, f16, rup; CHECKH(54, f4, 0xbc00)
    fcvt.h.s f4, f16, rmm; CHECKH(55, f4, 0xbc01)
    fcvt.h.s f4, f17, rne; CHECKH(56, f4, 0xbc00)
    fcvt.h.s f4, f17, rtz; CHECKH(57, f4, 0xbc00)
    fcvt.h.s f4, f17, rdn; CHECKH(58, f4, 0xbc01)
    fcvt.h.s f4, f17, rup; CHECKH(59, f4, 0xbc00)
    fcvt.h.s f4, f17, rmm; CHECKH(60, f4, 0xbc01)
    /* dynamic rounding mode from frm */
    li t0, 3; csrw frm, t0
    fcvt.h.s f4, f15; CHECKH(61, f4, 0x3c01)
    li t0, 4; csrw frm, t0
    fcvt.h.s f4, f17; CHECKH(62, f4, 0xbc01)
    li t0, 1; csrw frm, t0
    fdiv.h f4, f1, f3; CHECKH(63, f4, 0x3555)
    csrw frm, zero
    /* double -> half: just above the tie; overflow */
    li t0, 0x3ff0020000001000; fmv.d.x f18, t0
    fcvt.h.d f4, f18, rne; CHECKH(64, f4, 0x3c01)
    fcvt.h.d f4, f18, rtz; CHECKH(65, f4, 0x3c00)
    li t0, 0x4202a05f20000000; fmv.d.x f18, t0   /* 1e10 */
    FLAGS_CLEAR
    fcvt.h.d f4, f18; CHECKH(66, f4, 0x7c00)
    CHECK_FLAGS(67, OF | NX)
    fcvt.h.d f4, f18, rtz; CHECKH(68, f4, 0x7bff)
    /* integer -> half */
    li a1, 2049
    fcvt.h.w f4, a1, rne; CHECKH(70, f4, 0x6800)
    fcvt.h.w f4, a1, rup; CHECKH(71, f4, 0x6801)
    fcvt.h.w f4, a1, rmm; CHECKH(72, f4, 0x6801)
    fcvt.h.w f4, a1, rtz; CHECKH(73, f4, 0x6800)
    li a1, -2049
    fcvt.h.w f4, a1, rdn; CHECKH(74, f4, 0xe801)
    li a1, -1
    FLAGS_CLEAR
    fcvt.h.wu f4, a1; CHECKH(75, f4, 0x7c00)       /* 2^32 - 1 overflows */
    CHECK_FLAGS(76, OF | NX)
    fcvt.h.l f4, a1; CHECKH(77, f4, 0xbc00)
    fcvt.h.lu f4, a1, rtz; CHECKH(78, f4, 0x7bff)
    /* half -> integer: 2.5 and -2.5 in each mode, saturation and NaN */
    LH(f19, 0x4100)
    LH(f20, 0xc100)
    fcvt.w.h a0, f19, rne; CHECK(80, a0, 2)
    fcvt.w.h a0, f19, rmm; CHECK(81, a0, 3)
    fcvt.w.h a0, f19, rtz; CHECK(82, a0, 2)
    fcvt.w.h a0, f19, rup; CHECK(83, a0, 3)
    fcvt.w.h a0, f19, rdn; CHECK(84, a0, 2)
    fcvt.w.h a0, f20, rdn; CHECK(85, a0, -3)
    fcvt.w.h a0, f20, rmm; CHECK(86, a0, -3)
    fcvt.l.h a0, f20, rtz; CHECK(87, a0, -2)
    FLAGS_CLEAR
    fcvt.wu.h a0, f5; CHECK(88, a0, 0)             /* -1.0 */
    CHECK_FLAGS(89, NV)
    fcvt.l.h a0, f13; CHECK(90, a0, 0x7fffffffffffffff)
    fcvt.lu.h a0, f12; CHECK(91, a0, -1)
    FLAGS_CLEAR
    fcvt.w.h a0, f9, rtz; CHECK(92, a0, 0)         /* 0.5 */
    CHECK_FLAGS(93, NX)
    /* widening is exact */
    LH(f21, 0x3555)
    FLAGS_CLEAR
    fcvt.s.h f4, f21
    fmv.x.d a0, f4; CHECK(94, a0, 0xffffffff3eaaa000)
    fcvt.d.h f4, f21
    fmv.x.d a0, f4; CHECK(95, a0, 0x3fd5540000000000)
    fcvt.d.h f4, f8
    fmv.x.d a0, f4; CHECK(96, a0, 0x3e70000000000000)
    CHECK_FLAGS(97, 0)
    fcvt.s.h f4, f10                               /* signaling NaN */
    fmv.x.d a0, f4; CHECK(98, a0, 0xffffffff7fc00000)
    CHECK_FLAGS(99, NV)

    /* NaN-boxing: a half not boxed in 64 bits reads as the canonical NaN */
    li t0, 0x3c00; fmv.d.x f22, t0
    FLAGS_CLEAR
    fadd.h f4, f22, f22
    CHECKH(100, f4, 0x7e00)
    CHECK_FLAGS(101, 0)
    li t0, 0xfffeffffffff3c00; fmv.d.x f22, t0
    fmul.h f4, f22, f1
    CHECKH(102, f4, 0x7e00)
    fsgnjn.h f4, f22, f1
    CHECKH(103, f4, 0xfe00)
    fclass.h a0, f22; CHECK(104, a0, 0x200)
    li t0, 0x3f800000; fmv.d.x f22, t0             /* an unboxed single */
    fcvt.h.s f4, f22; CHECKH(105, f4, 0x7e00)
    /* fmv.x.h and fsh take bits 15:0 whatever the boxing; fmv.x.h sign-extends */
    li t0, 0x123456789abc8001; fmv.d.x f22, t0
    fmv.x.h a0, f22; CHECK(106, a0, 0xffffffffffff8001)
    fmv.x.h a0, f1; CHECK(107, a0, 0x3c00)
    la s0, buffer
    li t0, -1; sd t0, 0(s0)
    fsh f22, 2(s0)
    ld a0, 0(s0); CHECK(108, a0, 0xffffffff8001ffff)
    fsh f1, 4(s0)
    flh f4, 2(s0)
    CHECKH(109, f4, 0x8001)
    flh f4, 4(s0)
    CHECKH(110, f4, 0x3c00)
    /* sign injection */
    fsgnj.h f4, f1, f5;  CHECKH(111, f4, 0xbc00)
    fsgnjx.h f4, f5, f5; CHECKH(112, f4, 0x3c00)

    /* min/max, comparisons, classification */
    fneg.h f23, f6                                 /* -0 */
    fmin.h f4, f6, f23;  CHECKH(120, f4, 0x8000)
    fmax.h f4, f23, f6;  CHECKH(121, f4, 0x0000)
    FLAGS_CLEAR
    fmin.h f4, f12, f1;  CHECKH(122, f4, 0x3c00)
    CHECK_FLAGS(123, 0)
    fmax.h f4, f10, f1;  CHECKH(124, f4, 0x3c00)
    CHECK_FLAGS(125, NV)
    fmin.h f4, f12, f12; CHECKH(126, f4, 0x7e00)
    FLAGS_CLEAR
    feq.h a0, f12, f1; CHECK(127, a0, 0)
    CHECK_FLAGS(128, 0)
    flt.h a0, f12, f1; CHECK(129, a0, 0)
    CHECK_FLAGS(130, NV)
    FLAGS_CLEAR
    feq.h a0, f10, f1; CHECK(131, a0, 0)
    CHECK_FLAGS(132, NV)
    fle.h a0, f1, f2;  CHECK(133, a0, 1)
    flt.h a0, f2, f1;  CHECK(134, a0, 0)
    feq.h a0, f6, f23; CHECK(135, a0, 1)
    LH(f24, 0xfc00);   fclass.h a0, f24; CHECK(136, a0, 0x001)
    fclass.h a0, f5;   CHECK(137, a0, 0x002)
    LH(f24, 0x8001);   fclass.h a0, f24; CHECK(138, a0, 0x004)
    fclass.h a0, f23;  CHECK(139, a0, 0x008)
    fclass.h a0, f6;   CHECK(140, a0, 0x010)
    fclass.h a0, f8;   CHECK(141, a0, 0x020)
    fclass.h a0, f1;   CHECK(142, a0, 0x040)
    fclass.h a0, f13;  CHECK(143, a0, 0x080)
    fclass.h a0, f10;  CHECK(144, a0, 0x100)
    fclass.h a0, f12;  CHECK(145, a0, 0x200)

    /* Reserved rounding modes are illegal: static rm = 5, and dynamic with frm = 5 */
    la t0, rm_trap
    csrw mtvec, t0
    li s1, 0
    .word 0x0420d0d3      /* fadd.h f1, f1, f2 with rm = 5 */
    li t0, 5; csrw frm, t0
    fadd.h f4, f1, f2     /* dynamic */
    fcvt.h.s f4, f14      /* dynamic */
    csrw frm, zero
    CHECK(150, s1, 3)
    CHECKH(151, f1, 0x3c00)
    /* With the FPU off (mstatus.FS = 0) every Zfh instruction is illegal */
    li t0, 0x6000
    csrc mstatus, t0
    flh f4, 4(s0)
    fsh f1, 4(s0)
    fmv.h.x f4, zero
    fadd.h f4, f1, f1
    li t0, 0x6000
    csrs mstatus, t0
    CHECK(152, s1, 7)
    j pass
    .align 2
rm_trap:
    csrr a0, mcause; CHECK(153, a0, 2)
    csrr t0, mepc
    addi t0, t0, 4
    csrw mepc, t0
    addi s1, s1, 1
    mret
TEST_END
    .data
    .align 3
buffer:
    .dword 0, 0
