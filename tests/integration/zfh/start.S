    .section .text.init
    .globl _start
_start:
    la sp, stack_top
    li t0, 0x6000
    csrs mstatus, t0
    call main
1:  j 1b
    .bss
    .align 4
    .space 16384
stack_top:
