#include "common/cpu_isa.h"

#include <cstdlib>
#include <cstring>
#include <initializer_list>

#if defined(GK_HAVE_AMX)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace gk {
namespace {

#if defined(GK_HAVE_AMX)
// AMX tiles with bfloat16 products and the AVX-512 bfloat16 conversions, enabled by the OS: the
// tile state must be on in XCR0, and Linux hands it to a process only on request.
bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG, XTILEDATA
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

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
  bool capped = false;
  if (const char* cap = std::getenv("GENKERNELS_CPU_ISA")) {
    for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512}) {
      if (std::strcmp(cap, isa_name(isa)) != 0) continue;
      capped = true;
      if (isa < best) best = isa;
    }
  }
#if defined(GK_HAVE_AMX)
  // Asked of the OS only when the kernels may use it.
  if (best == Isa::avx512 && !capped && amx_usable()) best = Isa::amx;
#endif
  return best;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::amx: return "amx";
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
