#include "test.h"
TEST_BEGIN
    TEST_RR(1, add, 5, 7, 12)
    TEST_RR(2, sub, 5, 7, -2)
    TEST_RR(3, sll, 1, 65, 2)            /* shift amount uses low 6 bits */
    TEST_RR(4, slt, -1, 1, 1)
    TEST_RR(5, sltu, -1, 1, 0)
    TEST_RR(6, xor, 0xff00, 0x0ff0, 0xf0f0)
    TEST_RR(7, srl, -1, 60, 0xf)
    TEST_RR(8, sra, -256, 4, -16)
    TEST_RR(9, or, 0xf0, 0x0f, 0xff)
    TEST_RR(10, and, 0xf0, 0x3c, 0x30)
    TEST_RR(11, addw, 0x7fffffff, 1, -0x80000000)
    TEST_RR(12, subw, 0, 1, -1)
    TEST_RR(13, sllw, 1, 31, -0x80000000)
    TEST_RR(14, srlw, -1, 28, 0xf)
    TEST_RR(15, sraw, 0x80000000, 31, -1)
    TEST_RI(16, addi, 1, -2, -1)
    TEST_RI(17, slti, -5, -4, 1)
    TEST_RI(18, sltiu, 3, -1, 1)
    TEST_RI(19, xori, 0xff, -1, -256)
    TEST_RI(20, srai, -1024, 3, -128)
    TEST_RI(21, addiw, 0x7fffffff, 1, -0x80000000)
    TEST_RI(22, slliw, 3, 30, -0x40000000)
    TEST_RI(23, sraiw, 0x80000000, 4, -0x8000000)
    TEST_RI(24, srliw, 0x80000000, 4, 0x8000000)
    /* M extension, including the defined corner cases. */
    TEST_RR(30, mul, -3, 7, -21)
    TEST_RR(31, mulh, -1, -1, 0)
    TEST_RR(32, mulhu, -1, -1, -2)
    TEST_RR(33, mulhsu, -1, -1, -1)
    TEST_RR(34, mulh, 0x4000000000000000, 4, 1)
    TEST_RR(35, div, -7, 2, -3)
    TEST_RR(36, div, 5, 0, -1)
    TEST_RR(37, div, 0x8000000000000000, -1, 0x8000000000000000)
    TEST_RR(38, divu, 5, 0, -1)
    TEST_RR(39, rem, -7, 2, -1)
    TEST_RR(40, rem, 5, 0, 5)
    TEST_RR(41, rem, 0x8000000000000000, -1, 0)
    TEST_RR(42, remu, 7, 0, 7)
    TEST_RR(43, mulw, 0x10000, 0x10000, 0)
    TEST_RR(44, divw, -0x80000000, -1, -0x80000000)
    TEST_RR(45, divuw, 0xffffffff, 0, -1)
    TEST_RR(46, remw, 7, 0, 7)
    TEST_RR(47, remuw, -1, 10, 5)          /* 0xffffffff % 10 = 5 */
    TEST_RR(48, mulhsu, -2, 3, -1)
    /* lui/auipc and x0 */
    lui a0, 0x80000
    CHECK(50, a0, -0x80000000)
    li a1, 5
    add x0, a1, a1
    CHECK(51, x0, 0)
3:  auipc a0, 0
    la a1, 3b
    sub a0, a0, a1
    CHECK(52, a0, 0)
    /* Branches and jumps */
    li a1, -1
    li a2, 1
    li t6, 60
    blt a2, a1, fail
    bge a1, a2, fail
    bltu a1, a2, fail
    bgeu a2, a1, fail
    beq a1, a2, fail
    bne a1, a1, fail
    jal ra, 4f
    j fail
4:  /* ra points just after the jal */
    auipc a3, 0
    li t6, 61
    bgeu ra, a3, fail
    la a4, 5f
    jalr a5, 1(a4)            /* low bit of the target is cleared */
    j fail
5:  nop
TEST_END
