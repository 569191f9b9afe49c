// CPU kernels for Gaussian sampling. Compiled once per instruction set (common/cpu_isa.h).
#include <cstring>

#include "common/cpu_intrinsics.h"
#include "common/cpu_memory.h"
#include "common/parallel.h"
#include "common/philox.h"
#include "sampling/sampling.h"
#include "sampling/sampling_math.h"

namespace gk {
namespace GK_ISA {
namespace {

// Philox words for several counters at once. x86 has no 32-bit high multiply, and the
// compiler's widening of the scalar form costs twice the even/odd 32x32->64 multiplies below.
#if defined(__AVX512F__)
GK_INTRINSICS_BEGIN
constexpr int kLanes = 16;
typedef uint32_t Words __attribute__((vector_size(64)));
struct WordsMulHiLo {
  void operator()(Words a, uint32_t m, Words& hi, Words& lo) const {
    const __m512i av = reinterpret_cast<__m512i>(a), mv = _mm512_set1_epi32(static_cast<int>(m));
    const __m512i even = _mm512_mul_epu32(av, mv), odd = _mm512_mul_epu32(_mm512_srli_epi64(av, 32), mv);
    lo = reinterpret_cast<Words>(_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32)));
    hi = reinterpret_cast<Words>(_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd));
  }
};
GK_INTRINSICS_END
#elif defined(__AVX2__)
constexpr int kLanes = 8;
typedef uint32_t Words __attribute__((vector_size(32)));
struct WordsMulHiLo {
  void operator()(Words a, uint32_t m, Words& hi, Words& lo) const {
    const __m256i av = reinterpret_cast<__m256i>(a), mv = _mm256_set1_epi32(static_cast<int>(m));
    const __m256i even = _mm256_mul_epu32(av, mv), odd = _mm256_mul_epu32(_mm256_srli_epi64(av, 32), mv);
    lo = reinterpret_cast<Words>(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));
    hi = reinterpret_cast<Words>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
  }
};
#else
constexpr int kLanes = 1;
using Words = uint32_t;
using WordsMulHiLo = MulHiLo32;
#endif

Words broadcast(uint32_t x) {
  Words w = Words{} + x;
  return w;
}

Words lane_index() {
  Words w = Words{};
  for (int i = 0; i < kLanes; ++i) reinterpret_cast<uint32_t*>(&w)[i] = static_cast<uint32_t>(i);
  return w;
}

// Counter groups (4 normals each) generated per step, in structure-of-arrays form so that the
// Box-Muller loop vectorises. Blocks start at multiples of kBlockGroups, so the low counter
// word never carries within a block.
constexpr int64_t kBlockGroups = 256;
constexpr int64_t kBlock = 4 * kBlockGroups;
static_assert(kBlockGroups % kLanes == 0, "whole vectors per block");

// eps[0, kBlock) = the normals of groups [first, first + kBlockGroups) of stream (key, offset).
void normal_block(uint64_t key, uint64_t offset, uint64_t first, float* eps) {
  uint32_t words[4][kBlockGroups];
  const Philox4 ctr = philox_counter(first, offset);
  const Words lanes = lane_index();
  for (int64_t g = 0; g < kBlockGroups; g += kLanes) {
    Words c[4] = {broadcast(ctr.v[0] + static_cast<uint32_t>(g)) + lanes, broadcast(ctr.v[1]), broadcast(ctr.v[2]),
                  broadcast(ctr.v[3])};
    philox_rounds(c[0], c[1], c[2], c[3], broadcast(static_cast<uint32_t>(key)), broadcast(static_cast<uint32_t>(key >> 32)),
                  WordsMulHiLo());
    for (int k = 0; k < 4; ++k) std::memcpy(&words[k][g], &c[k], sizeof(Words));
  }
  float z[4][kBlockGroups];
  for (int64_t g = 0; g < kBlockGroups; ++g) {
    box_muller(words[0][g], words[1][g], &z[0][g], &z[1][g]);
    box_muller(words[2][g], words[3][g], &z[2][g], &z[3][g]);
  }
  for (int64_t g = 0; g < kBlockGroups; ++g)
    for (int k = 0; k < 4; ++k) eps[4 * g + k] = z[k][g];
}

// Calls consume(first, count, eps) over consecutive blocks of the stream's normals covering
// elements [0, n), in parallel; eps[j] is the normal of element first + j.
template <class Consume>
void for_each_normal_block(int64_t n, const int64_t* seed, int threads, Consume&& consume) {
  const uint64_t key = static_cast<uint64_t>(seed[0]), offset = static_cast<uint64_t>(seed[1]);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(blocks, 4, threads, [&](int64_t begin, int64_t end) {
    float eps[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      normal_block(key, offset, static_cast<uint64_t>(b) * kBlockGroups, eps);
      const int64_t first = b * kBlock;
      consume(first, n - first < kBlock ? n - first : kBlock, static_cast<const float*>(eps));
    }
  });
}

template <class T>
void normal_kernel(const NormalParams& p, int threads) {
  T* out = static_cast<T*>(p.out);
  for_each_normal_block(p.n, p.seed, threads, [&](int64_t first, int64_t count, const float* eps) {
    for (int64_t j = 0; j < count; ++j) out[first + j] = static_cast<T>(eps[j]);
  });
}

template <class T>
void reparameterize_kernel(const ReparameterizeParams& p, int threads) {
  const T* mu = static_cast<const T*>(p.mu);
  const T* logvar = static_cast<const T*>(p.logvar);
  T* z = static_cast<T*>(p.z);
  for_each_normal_block(p.n, p.seed, threads, [&](int64_t first, int64_t count, const float* eps) {
    for (int64_t j = 0; j < count; ++j)
      z[first + j] = reparameterized<T>(mu[first + j], logvar[first + j], static_cast<T>(eps[j]));
  });
}

template <class T>
void gaussian_kl_kernel(const GaussianKlParams& p, int threads) {
  const T* mu = static_cast<const T*>(p.mu);
  const T* logvar = static_cast<const T*>(p.logvar);
  const int64_t chunks = (p.n + kKlChunk - 1) / kKlChunk;
  parallel_for(chunks, 16, threads, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kKlChunk;
      const int64_t last = p.n < first + kKlChunk ? p.n : first + kKlChunk;
      if (p.partial_sums) {
        // kSumLanes running sums, added in a fixed order at the end: the loop vectorises and
        // the result is the same on every instruction set.
        constexpr int kSumLanes = 16;
        double lanes[kSumLanes] = {};
        int64_t i = first;
        for (; i + kSumLanes <= last; i += kSumLanes)
          for (int k = 0; k < kSumLanes; ++k) lanes[k] += static_cast<double>(gaussian_kl_term<T>(mu[i + k], logvar[i + k]));
        for (int k = 0; i < last; ++i, ++k) lanes[k] += static_cast<double>(gaussian_kl_term<T>(mu[i], logvar[i]));
        double sum = 0.0;
        for (int k = 0; k < kSumLanes; ++k) sum += lanes[k];
        static_cast<double*>(p.out)[c] = sum;
      } else {
        T* out = static_cast<T*>(p.out);
        for (int64_t i = first; i < last; ++i) out[i] = gaussian_kl_term<T>(mu[i], logvar[i]);
      }
    }
  });
}

}  // namespace

void normal(const NormalParams& p, const CpuExec& exec) {
  if (p.dtype == DType::f64) return normal_kernel<double>(p, exec.threads);
  normal_kernel<float>(p, exec.threads);
}

void reparameterize(const ReparameterizeParams& p, const CpuExec& exec) {
  if (p.dtype == DType::f64) return reparameterize_kernel<double>(p, exec.threads);
  reparameterize_kernel<float>(p, exec.threads);
}

void gaussian_kl(const GaussianKlParams& p, const CpuExec& exec) {
  if (p.dtype == DType::f64) return gaussian_kl_kernel<double>(p, exec.threads);
  gaussian_kl_kernel<float>(p, exec.threads);
}

}  // namespace GK_ISA

#ifdef GK_ISA_baseline
void normal(const NormalParams& p, const CpuExec& exec) {
  p.check();
  require_float_dtype("normal", p.dtype, "cpu", false);
  advise_huge_pages(p.out, p.n * dtype_size(p.dtype));
  GK_CPU_DISPATCH(normal, p, exec);
}

void reparameterize(const ReparameterizeParams& p, const CpuExec& exec) {
  p.check();
  require_float_dtype("reparameterize", p.dtype, "cpu", false);
  advise_huge_pages(p.z, p.n * dtype_size(p.dtype));
  GK_CPU_DISPATCH(reparameterize, p, exec);
}

void gaussian_kl(const GaussianKlParams& p, const CpuExec& exec) {
  p.check();
  require_float_dtype("gaussian_kl", p.dtype, "cpu", false);
  if (!p.partial_sums) advise_huge_pages(p.out, p.n * dtype_size(p.dtype));
  GK_CPU_DISPATCH(gaussian_kl, p, exec);
}
#endif

}  // namespace gk
