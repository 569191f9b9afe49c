// CPU kernels for Gaussian sampling. Compiled once per instruction set (common/cpu_isa.h).
#include "common/cpu_memory.h"
#include "common/parallel.h"
#include "sampling/normal_cpu.h"
#include "sampling/sampling.h"
#include "sampling/sampling_math.h"

namespace gk {
namespace GK_ISA {
namespace {

template <class T>
void normal_kernel(const NormalParams& p, int threads) {
  T* out = static_cast<T*>(p.out);
  for_each_normal_block(p.n, p.seed, threads, Lookahead(p.n, sizeof(T)), [&](int64_t first, int64_t count, const float* eps) {
    for (int64_t j = 0; j < count; ++j) out[first + j] = static_cast<T>(eps[j]);
  });
}

template <class T>
void reparameterize_kernel(const ReparameterizeParams& p, int threads) {
  const T* mu = static_cast<const T*>(p.mu);
  const T* logvar = static_cast<const T*>(p.logvar);
  T* z = static_cast<T*>(p.z);
  const Lookahead inputs = Lookahead(p.n, sizeof(T)).read(mu).read(logvar);
  for_each_normal_block(p.n, p.seed, threads, inputs, [&](int64_t first, int64_t count, const float* eps) {
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
