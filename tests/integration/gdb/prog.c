/* A bare-metal program for the GDB stub test: runs from 0x80000000 in M-mode and powers the
 * machine off through the HTIF tohost register. */
#define TOHOST ((volatile unsigned long *)0x00102000)
volatile unsigned long counter;
volatile unsigned long watched;

__attribute__((noinline)) void bump(unsigned long i) { counter += i; }

__attribute__((noreturn)) void finish(void) {
    *TOHOST = 1;
    for (;;) {}
}

void main_loop(void) {
    for (unsigned long i = 0; i < 10; i++) bump(i);
    watched = 42;
    counter += 1000;
    finish();
}

char stack[4096] __attribute__((aligned(16)));
__asm__(".pushsection .text.init, \"ax\"\n.globl _start\n_start:\n la sp, stack + 4096\n call main_loop\n.popsection\n");
