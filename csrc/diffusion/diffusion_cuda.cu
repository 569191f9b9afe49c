// CUDA kernels for the diffusion steps.
//
// One thread per Philox counter group (4 consecutive elements), grid-stride over groups, so the
// noise of element e is randn's e-th normal, as on the CPU. The per-sample coefficients are read
// once per group (again only where a group crosses into the next sample). Memory-bound: a DDPM
// step reads the sample and the model output and writes prev and x0, 16 B per float element.
#include "common/cuda_utils.h"
#include "common/philox.h"
#include "diffusion/diffusion.h"
#include "diffusion/diffusion_math.h"

namespace gk {
namespace {

constexpr int kThreads = 256;

// Calls f(e, k, z) for the elements e of this thread's groups, with k the coefficients of e's
// sample (K of them, as C) and z the element's normal (0 without a seed).
template <class C, int K, class F>
__device__ __forceinline__ void for_each_element(int64_t batch, int64_t row, const double* table,
                                                 const int64_t* seed, F&& f) {
  const int64_t n = batch * row, groups = (n + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (seed)
      normal4(philox_counter(static_cast<uint64_t>(g), static_cast<uint64_t>(seed[1])), static_cast<uint64_t>(seed[0]), z);
    C k[K];
    int64_t loaded = -1;
    for (int j = 0; j < 4 && 4 * g + j < n; ++j) {
      const int64_t e = 4 * g + j, sample = e / row;
      if (sample != loaded) {
        for (int c = 0; c < K; ++c) k[c] = static_cast<C>(table[sample * K + c]);
        loaded = sample;
      }
      f(e, static_cast<const C*>(k), z[j]);
    }
  }
}

template <class T>
__global__ void q_sample_kernel(QSampleParams p) {
  using C = compute_t<T>;
  const T* x0 = static_cast<const T*>(p.x0);
  T* noise = static_cast<T*>(p.noise);
  for_each_element<C, kQCoeffs>(p.batch, p.row, p.coeffs, p.noise_given ? nullptr : p.seed,
                                [&](int64_t e, const C* k, float z) {
                                  C eps;
                                  if (p.noise_given) {
                                    eps = static_cast<C>(noise[e]);
                                  } else {
                                    noise[e] = static_cast<T>(z);
                                    eps = static_cast<C>(static_cast<T>(z));
                                  }
                                  const C x = static_cast<C>(x0[e]);
                                  static_cast<T*>(p.x_t)[e] = static_cast<T>(noised(k, x, eps));
                                  if (p.velocity) static_cast<T*>(p.velocity)[e] = static_cast<T>(velocity(k, x, eps));
                                });
}

template <class T>
__global__ void diffusion_step_kernel(DiffusionStepParams p) {
  using C = compute_t<T>;
  const T* x = static_cast<const T*>(p.sample);
  const T* m = static_cast<const T*>(p.model);
  const T* c = p.model_cond ? static_cast<const T*>(p.model_cond) : m;  // w = 0 without guidance
  for_each_element<C, kStepCoeffs>(p.batch, p.row, p.coeffs, p.seed, [&](int64_t e, const C* k, float drawn) {
    const C xe = static_cast<C>(x[e]);
    const C guide = guided(k, static_cast<C>(m[e]), static_cast<C>(c[e]));
    const C x0 = predicted_x0(k, xe, guide);
    if (p.x0) static_cast<T*>(p.x0)[e] = static_cast<T>(x0);
    if (!p.prev) return;
    const C z = p.noise ? static_cast<C>(static_cast<const T*>(p.noise)[e]) : static_cast<C>(drawn);
    const C v = p.variance ? static_cast<C>(static_cast<const T*>(p.variance)[e]) : C(0);
    const C std = p.variance ? k[kNoiseStd] * predicted_std(k, p.variance_input, v) : k[kNoiseStd];
    const C px0 = p.prev_x0 ? static_cast<C>(static_cast<const T*>(p.prev_x0)[e]) : C(0);
    static_cast<T*>(p.prev)[e] = static_cast<T>(stepped(k, xe, guide, x0, px0, std, z));
  });
}

}  // namespace

void q_sample(const QSampleParams& p, const CudaExec& exec) {
  p.check();
  if (p.batch == 0 || p.row == 0) return;
  dispatch_float(p.dtype, "q_sample", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(q_sample_kernel<T>, dim3(blocks_for((p.batch * p.row + 3) / 4, kThreads)), dim3(kThreads), 0,
           static_cast<cudaStream_t>(exec.stream), p);
  });
}

void diffusion_step(const DiffusionStepParams& p, const CudaExec& exec) {
  p.check();
  if (p.batch == 0 || p.row == 0) return;
  dispatch_float(p.dtype, "diffusion_step", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(diffusion_step_kernel<T>, dim3(blocks_for((p.batch * p.row + 3) / 4, kThreads)), dim3(kThreads), 0,
           static_cast<cudaStream_t>(exec.stream), p);
  });
}

}  // namespace gk
