// CPU kernels for the diffusion steps. Compiled once per instruction set (common/cpu_isa.h).
//
// Work goes in blocks of kBlock elements aligned with the Philox stream's blocks, so the noise of
// element e is the same normal as randn's e-th; a block is split where it crosses from one
// sample's row to the next, and each piece runs with that sample's coefficients.
#include <algorithm>

#include "common/cpu_memory.h"
#include "common/parallel.h"
#include "diffusion/diffusion.h"
#include "diffusion/diffusion_math.h"
#include "sampling/normal_cpu.h"

namespace gk {
namespace GK_ISA {
namespace {

// Calls piece(sample, begin, end, z) over the pieces of [0, batch * row) in parallel, with z
// the normals of elements [begin, end) when `seed` is given (else null). `ahead` names the
// inputs that piece reads.
template <class Piece>
void for_each_piece(int64_t batch, int64_t row, const int64_t* seed, int threads, const Lookahead& ahead, Piece&& piece) {
  const int64_t n = batch * row;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(blocks, kMinTaskElements / kBlock, threads, [&](int64_t begin, int64_t end) {
    float z[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kBlock;
      const int64_t last = n - first < kBlock ? n : first + kBlock;
      if (seed) normal_block(static_cast<uint64_t>(seed[0]), static_cast<uint64_t>(seed[1]), static_cast<uint64_t>(b) * kBlockGroups, z, ahead);
      for (int64_t i = first; i < last;) {
        const int64_t sample = i / row;
        const int64_t stop = (sample + 1) * row < last ? (sample + 1) * row : last;
        piece(sample, i, stop, seed ? z + (i - first) : nullptr);
        i = stop;
      }
    }
  });
}

template <class T, int K>
void load_coeffs(const double* table, int64_t sample, T (&k)[K]) {
  for (int j = 0; j < K; ++j) k[j] = static_cast<T>(table[sample * K + j]);
}

template <class T>
void q_sample_kernel(const QSampleParams& p, int threads) {
  const T* x0 = static_cast<const T*>(p.x0);
  T* x_t = static_cast<T*>(p.x_t);
  T* noise = static_cast<T*>(p.noise);
  T* v = static_cast<T*>(p.velocity);
  for_each_piece(p.batch, p.row, p.noise_given ? nullptr : p.seed, threads, Lookahead(p.batch * p.row, sizeof(T)).read(x0),
                 [&](int64_t sample, int64_t begin, int64_t end, const float* z) {
                   T k[kQCoeffs];
                   load_coeffs(p.coeffs, sample, k);
                   if (!p.noise_given)
                     for (int64_t i = begin; i < end; ++i) noise[i] = static_cast<T>(z[i - begin]);
                   for (int64_t i = begin; i < end; ++i) x_t[i] = noised(k, x0[i], noise[i]);
                   if (v)
                     for (int64_t i = begin; i < end; ++i) v[i] = velocity(k, x0[i], noise[i]);
                 });
}

template <class T>
void diffusion_step_kernel(const DiffusionStepParams& p, int threads) {
  const T* x = static_cast<const T*>(p.sample);
  const T* m = static_cast<const T*>(p.model);
  // Without guidance the conditional output is the model output and w = 0: e = 1 * (m + 0) = m exactly.
  const T* c = p.model_cond ? static_cast<const T*>(p.model_cond) : m;
  const T* var = static_cast<const T*>(p.variance);
  const T* x0_prev = static_cast<const T*>(p.prev_x0);
  const T* given = static_cast<const T*>(p.noise);
  T* prev = static_cast<T*>(p.prev);
  T* x0_out = static_cast<T*>(p.x0);
  static const T zeros[kBlock] = {};
  const Lookahead inputs = Lookahead(p.batch * p.row, sizeof(T)).read(x).read(m).read(p.model_cond).read(var).read(x0_prev);
  for_each_piece(p.batch, p.row, p.seed, threads, inputs, [&](int64_t sample, int64_t begin, int64_t end, const float* drawn) {
    T k[kStepCoeffs];
    load_coeffs(p.coeffs, sample, k);
    const int64_t count = end - begin;
    if (!prev) {
      for (int64_t i = begin; i < end; ++i) x0_out[i] = predicted_x0(k, x[i], guided(k, m[i], c[i]));
      return;
    }
    // Absent inputs read as zeros, and the per-element terms come as arrays, so that the step's
    // loop has no branch and vectorises.
    T z_buf[kBlock], std[kBlock];
    const T* z = given ? given + begin : zeros;
    if (drawn) {
      for (int64_t j = 0; j < count; ++j) z_buf[j] = static_cast<T>(drawn[j]);
      z = z_buf;
    }
    // Two loops, not one with the choice inside: GCC leaves that one scalar.
    if (var)
      for (int64_t j = 0; j < count; ++j) std[j] = k[kNoiseStd] * predicted_std(k, p.variance_input, var[begin + j]);
    else
      std::fill(std, std + count, k[kNoiseStd]);
    const T* px0 = x0_prev ? x0_prev + begin : zeros;
    // The outputs are fresh tensors that alias no input: without runtime checks for the eight
    // pointers (more than GCC versions a loop for) the loop vectorises.
#pragma GCC ivdep
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = begin + j;
      const T e = guided(k, m[i], c[i]);
      const T x0 = predicted_x0(k, x[i], e);
      x0_out[i] = x0;
      prev[i] = stepped(k, x[i], e, x0, px0[j], std[j], z[j]);
    }
  });
}

}  // namespace

void q_sample(const QSampleParams& p, const CpuExec& exec) {
  if (p.dtype == DType::f64) return q_sample_kernel<double>(p, exec.threads);
  q_sample_kernel<float>(p, exec.threads);
}

void diffusion_step(const DiffusionStepParams& p, const CpuExec& exec) {
  if (p.dtype == DType::f64) return diffusion_step_kernel<double>(p, exec.threads);
  diffusion_step_kernel<float>(p, exec.threads);
}

}  // namespace GK_ISA

#ifdef GK_ISA_baseline
void q_sample(const QSampleParams& p, const CpuExec& exec) {
  p.check();
  require_float_dtype("q_sample", p.dtype, "cpu", false);
  const size_t bytes = p.batch * p.row * dtype_size(p.dtype);
  advise_huge_pages(p.x_t, bytes);
  if (!p.noise_given) advise_huge_pages(p.noise, bytes);
  if (p.velocity) advise_huge_pages(p.velocity, bytes);
  GK_CPU_DISPATCH(q_sample, p, exec);
}

void diffusion_step(const DiffusionStepParams& p, const CpuExec& exec) {
  p.check();
  require_float_dtype("diffusion_step", p.dtype, "cpu", false);
  if (p.prev) advise_huge_pages(p.prev, p.batch * p.row * dtype_size(p.dtype));
  if (p.x0) advise_huge_pages(p.x0, p.batch * p.row * dtype_size(p.dtype));
  GK_CPU_DISPATCH(diffusion_step, p, exec);
}
#endif

}  // namespace gk
