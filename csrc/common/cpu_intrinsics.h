// x86 intrinsics for the CPU kernels compiled per instruction set (common/cpu_isa.h).
#pragma once

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Code between these uses AVX-512 intrinsics: GCC 12 warns inside its own intrinsics (their
// undefined pass-through operands), so those warnings are off there and nowhere else.
#define GK_INTRINSICS_BEGIN                                   \
  _Pragma("GCC diagnostic push")                              \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")       \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define GK_INTRINSICS_END _Pragma("GCC diagnostic pop")
