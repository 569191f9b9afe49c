#include "common/cpu_isa.h"

#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace gk {
namespace {

Isa detect() {
  Isa best = Isa::baseline;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#if defined(GK_HAVE_ISA_avx512)
  if (__builtin_cpu_supports("x86-64-v4")) best = Isa::avx512;
  else
#endif
#if defined(GK_HAVE_ISA_avx2)
  if (__builtin_cpu_supports("x86-64-v3")) best = Isa::avx2;
#endif
#endif
  // GENKERNELS_CPU_ISA lowers the choice (to test or compare the builds); it never raises it.
  if (const char* cap = std::getenv("GENKERNELS_CPU_ISA")) {
    for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512})
      if (std::strcmp(cap, isa_name(isa)) == 0 && isa < best) best = isa;
  }
  return best;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

Isa cpu_isa() {
  static const Isa isa = detect();
  return isa;
}

}  // namespace gk
