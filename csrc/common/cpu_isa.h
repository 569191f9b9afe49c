// Every CPU kernel file is compiled once per instruction set (CMakeLists.txt: baseline x86-64,
// x86-64-v3 "avx2", x86-64-v4 "avx512"), each into namespace gk::<isa>, and the best one the
// running CPU supports is chosen at run time; GENKERNELS_CPU_ISA=baseline|avx2|avx512|amx caps
// it. "amx" is the AVX-512 build on a CPU whose AMX tiles (bfloat16) the OS lets us use: the
// AVX-512 kernels, some of which then run their bfloat16 products on the tiles.
//
// Code compiled per instruction set must not share inline functions or templates with other
// files (the linker keeps one copy, maybe the AVX-512 one): kernel files call only the
// always-inlined GK_HD math and gk::parallel_for with their own lambdas.
#pragma once

namespace gk {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2, amx = 3 };

Isa cpu_isa();            // the instruction set the kernels use on this CPU
const char* isa_name(Isa);

}  // namespace gk

// Declares `decl` in every instruction-set namespace.
#define GK_DECLARE_PER_ISA(decl) \
  namespace baseline {           \
  decl;                          \
  }                              \
  namespace avx2 {               \
  decl;                          \
  }                              \
  namespace avx512 {             \
  decl;                          \
  }

#if defined(GK_HAVE_ISA_avx512)
#define GK_ISA_CASE_avx512(fn) \
  case ::gk::Isa::amx:         \
  case ::gk::Isa::avx512: return ::gk::avx512::fn;
#else
#define GK_ISA_CASE_avx512(fn)
#endif
#if defined(GK_HAVE_ISA_avx2)
#define GK_ISA_CASE_avx2(fn) \
  case ::gk::Isa::avx2: return ::gk::avx2::fn;
#else
#define GK_ISA_CASE_avx2(fn)
#endif

// The entry point for `fn` on the running CPU: gk::<isa>::fn(args...).
#define GK_CPU_DISPATCH(fn, ...)                    \
  do {                                              \
    switch (::gk::cpu_isa()) {                      \
      GK_ISA_CASE_avx512(fn(__VA_ARGS__))           \
      GK_ISA_CASE_avx2(fn(__VA_ARGS__))             \
      default: return ::gk::baseline::fn(__VA_ARGS__); \
    }                                               \
  } while (0)
