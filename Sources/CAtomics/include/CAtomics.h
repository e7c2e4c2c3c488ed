/* Sequentially consistent atomic operations on guest RAM, for RISC-V AMOs and LR/SC on hosts
 * where several vCPU threads share memory. Thin wrappers over the compiler's __atomic builtins
 * (Swift has no atomics on raw pointers). */
#ifndef MACHINE_SERVER_CATOMICS_H
#define MACHINE_SERVER_CATOMICS_H
#include <stdint.h>
#include <stdbool.h>

#define CATOMIC_OPS(T, S)                                                                        \
static inline T catomic_load_##S(T *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }          \
static inline T catomic_swap_##S(T *p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); } \
static inline T catomic_add_##S(T *p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); } \
static inline T catomic_and_##S(T *p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); } \
static inline T catomic_or_##S(T *p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }   \
static inline T catomic_xor_##S(T *p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); } \
static inline bool catomic_cas_##S(T *p, T expected, T desired) {                                \
    return __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
}

CATOMIC_OPS(uint32_t, 32)
CATOMIC_OPS(uint64_t, 64)

#endif
