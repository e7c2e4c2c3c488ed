/* Random Zfh operations in every rounding mode (dynamic, from frm), with operands that are
 * special values, subnormals, any half, or not NaN-boxed at all; prints per op a hash of every
 * result (the whole 64-bit register) and fflags, then ends through the SiFive test device.
 * tests/integration/test_cpu.py runs it on qemu-system-riscv64 and machine-server and compares. */
#include <stdint.h>
#define UART ((volatile uint8_t *)0x10000000)
static void putch(char c) { while (!(UART[5] & 0x20)) {} UART[0] = c; }
static void puts_(const char *s) { while (*s) putch(*s++); }
static void hex(uint64_t v) { for (int i = 60; i >= 0; i -= 4) putch("0123456789abcdef"[(v >> i) & 15]); }
static uint64_t s = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
static const uint16_t specials[] = {0x0000, 0x8000, 0x3c00, 0xbc00, 0x7c00, 0xfc00, 0x7e00, 0x7c01, 0x7d00, 0x0001,
                                    0x8001, 0x03ff, 0x0400, 0x7bff, 0xfbff, 0x3555, 0x3800, 0x4000, 0x5bff, 0x1400};
static uint64_t operand(void) {
    uint64_t r = rnd();
    switch (r % 10) {
    case 0: return specials[(r >> 8) % 20] | 0xffffffffffff0000ull;
    case 1: return rnd();                                     /* rarely a valid box */
    case 2: return ((r >> 16) & 0x83ff) | 0xffffffffffff0000ull;     /* subnormals and zeros */
    default: return ((r >> 16) & 0xffff) | 0xffffffffffff0000ull;
    }
}
#define R3(name, insn) static uint64_t name(uint64_t a, uint64_t b, uint64_t c) { uint64_t r; \
    __asm__ volatile("fmv.d.x ft0,%1; fmv.d.x ft1,%2; fmv.d.x ft2,%3; " insn "; fmv.x.d %0,ft3" \
                     : "=r"(r) : "r"(a), "r"(b), "r"(c) : "ft0", "ft1", "ft2", "ft3"); return r; }
#define RX(name, insn) static uint64_t name(uint64_t a, uint64_t b, uint64_t c) { uint64_t r; (void)c; \
    __asm__ volatile("fmv.d.x ft0,%1; fmv.d.x ft1,%2; " insn : "=r"(r) : "r"(a), "r"(b) : "ft0", "ft1"); return r; }
#define RI(name, insn) static uint64_t name(uint64_t a, uint64_t b, uint64_t c) { uint64_t r; (void)b; (void)c; \
    __asm__ volatile(insn "; fmv.x.d %0,ft3" : "=r"(r) : "r"(a) : "ft3"); return r; }
R3(fadd, "fadd.h ft3,ft0,ft1")
R3(fsub, "fsub.h ft3,ft0,ft1")
R3(fmul, "fmul.h ft3,ft0,ft1")
R3(fdiv, "fdiv.h ft3,ft0,ft1")
R3(fsqrt, "fsqrt.h ft3,ft0")
R3(fmadd, "fmadd.h ft3,ft0,ft1,ft2")
R3(fmsub, "fmsub.h ft3,ft0,ft1,ft2")
R3(fnmsub, "fnmsub.h ft3,ft0,ft1,ft2")
R3(fnmadd, "fnmadd.h ft3,ft0,ft1,ft2")
R3(fmin, "fmin.h ft3,ft0,ft1")
R3(fmax, "fmax.h ft3,ft0,ft1")
R3(fsgnj, "fsgnj.h ft3,ft0,ft1")
R3(fsgnjn, "fsgnjn.h ft3,ft0,ft1")
R3(fsgnjx, "fsgnjx.h ft3,ft0,ft1")
R3(fcvtsh, "fcvt.s.h ft3,ft0")
R3(fcvtdh, "fcvt.d.h ft3,ft0")
R3(fcvths, "fcvt.h.s ft3,ft1")
R3(fcvthd, "fcvt.h.d ft3,ft2")
RX(feq, "feq.h %0,ft0,ft1")
RX(flt, "flt.h %0,ft0,ft1")
RX(fle, "fle.h %0,ft0,ft1")
RX(fclass, "fclass.h %0,ft0")
RX(fmvxh, "fmv.x.h %0,ft1")
RX(fcvtwh, "fcvt.w.h %0,ft0")
RX(fcvtwuh, "fcvt.wu.h %0,ft0")
RX(fcvtlh, "fcvt.l.h %0,ft0")
RX(fcvtluh, "fcvt.lu.h %0,ft0")
RI(fcvthw, "fcvt.h.w ft3,%1")
RI(fcvthwu, "fcvt.h.wu ft3,%1")
RI(fcvthl, "fcvt.h.l ft3,%1")
RI(fcvthlu, "fcvt.h.lu ft3,%1")
RI(fmvhx, "fmv.h.x ft3,%1")
typedef uint64_t (*opfn)(uint64_t, uint64_t, uint64_t);
static const struct { const char *name; opfn f; int kind; } ops[] = {
    {"fadd", fadd, 0}, {"fsub", fsub, 0}, {"fmul", fmul, 0}, {"fdiv", fdiv, 0}, {"fsqrt", fsqrt, 0},
    {"fmadd", fmadd, 0}, {"fmsub", fmsub, 0}, {"fnmsub", fnmsub, 0}, {"fnmadd", fnmadd, 0},
    {"fmin", fmin, 0}, {"fmax", fmax, 0}, {"fsgnj", fsgnj, 0}, {"fsgnjn", fsgnjn, 0}, {"fsgnjx", fsgnjx, 0},
    {"fcvt.s.h", fcvtsh, 0}, {"fcvt.d.h", fcvtdh, 0}, {"fcvt.h.s", fcvths, 1}, {"fcvt.h.d", fcvthd, 2},
    {"feq", feq, 0}, {"flt", flt, 0}, {"fle", fle, 0}, {"fclass", fclass, 0}, {"fmv.x.h", fmvxh, 0},
    {"fcvt.w.h", fcvtwh, 0}, {"fcvt.wu.h", fcvtwuh, 0}, {"fcvt.l.h", fcvtlh, 0}, {"fcvt.lu.h", fcvtluh, 0},
    {"fcvt.h.w", fcvthw, 3}, {"fcvt.h.wu", fcvthwu, 3}, {"fcvt.h.l", fcvthl, 3}, {"fcvt.h.lu", fcvthlu, 3},
    {"fmv.h.x", fmvhx, 3},
};
int main(void) {
    for (unsigned k = 0; k < sizeof ops / sizeof ops[0]; k++) {
        uint64_t h = 0;
        for (int i = 0; i < ITERATIONS; i++) {
            uint64_t a = operand(), b = operand(), c = operand();
            if (ops[k].kind == 1) {         /* a single: boxed, near the half range */
                uint64_t e = 100 + rnd() % 50;
                b = 0xffffffff00000000ull | (rnd() & 0x807fffff) | (e << 23);
                if (rnd() % 8 == 0) b = 0xffffffff00000000ull | (uint32_t)rnd();
            } else if (ops[k].kind == 2) {  /* a double near the half range */
                uint64_t e = 1023 - 30 + rnd() % 50;
                c = (rnd() & 0x800fffffffffffffull) | (e << 52);
                if (rnd() % 8 == 0) c = rnd();
            } else if (ops[k].kind == 3) {  /* an integer */
                a = rnd() >> (rnd() % 64);
                if (rnd() & 1) a = -a;
            }
            for (uint64_t rm = 0; rm < 5; rm++) {
                uint64_t r, fl;
                __asm__ volatile("csrw frm, %0; csrw fflags, zero" :: "r"(rm));
                r = ops[k].f(a, b, c);
                __asm__ volatile("csrr %0, fflags" : "=r"(fl));
                h = (h ^ r) * 0x100000001b3ull;
                h = (h ^ fl) * 0x100000001b3ull;
            }
        }
        puts_(ops[k].name); putch(' '); hex(h); putch('\n');
    }
    puts_("zfhdiff done\n");
    *(volatile uint32_t *)0x100000 = 0x5555;
    for (;;) {}
}
