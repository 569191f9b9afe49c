// CUDA kernels for Gaussian sampling.
//
// One thread per Philox counter group (4 consecutive elements), grid-stride over groups: the
// noise of element e is the same function of (seed, offset, e) as on the CPU. Bytes: 4 B (or the
// element size) written per normal, plus mu and logvar read for reparameterize; Philox and
// Box-Muller are ~100 integer and float operations per 4 elements, under the memory time.
#include "common/cuda_utils.h"
#include "common/philox.h"
#include "sampling/sampling.h"
#include "sampling/sampling_math.h"

namespace gk {
namespace {

constexpr int kThreads = 256;

// Calls f(e, eps) for the elements e of this thread's groups, with eps the element's normal.
template <class F>
__device__ __forceinline__ void for_each_normal(int64_t n, const int64_t* seed, F&& f) {
  const uint64_t key = static_cast<uint64_t>(seed[0]), offset = static_cast<uint64_t>(seed[1]);
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4];
    normal4(philox_counter(static_cast<uint64_t>(g), offset), key, z);
    for (int k = 0; k < 4; ++k)
      if (4 * g + k < n) f(4 * g + k, z[k]);
  }
}

template <class T>
__global__ void normal_kernel(T* __restrict__ out, int64_t n, const int64_t* __restrict__ seed) {
  for_each_normal(n, seed, [&](int64_t e, float eps) { out[e] = static_cast<T>(eps); });
}

template <class T>
__global__ void reparameterize_kernel(T* __restrict__ z, const T* __restrict__ mu, const T* __restrict__ logvar,
                                      int64_t n, const int64_t* __restrict__ seed) {
  using C = compute_t<T>;
  for_each_normal(n, seed, [&](int64_t e, float eps) {
    z[e] = static_cast<T>(reparameterized<C>(static_cast<C>(mu[e]), static_cast<C>(logvar[e]), static_cast<C>(eps)));
  });
}

template <class T>
__global__ void gaussian_kl_kernel(T* __restrict__ out, const T* __restrict__ mu, const T* __restrict__ logvar,
                                   int64_t n) {
  using C = compute_t<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[e] = static_cast<T>(gaussian_kl_term<C>(static_cast<C>(mu[e]), static_cast<C>(logvar[e])));
}

// One block per chunk of kKlChunk elements: each thread sums a strided share in double, then
// the block adds the threads' sums in a fixed order (a shared-memory tree down to one warp,
// then warp shuffles), so the result is deterministic.
template <class T>
__global__ void gaussian_kl_sum_kernel(double* __restrict__ partials, const T* __restrict__ mu,
                                       const T* __restrict__ logvar, int64_t n) {
  using C = compute_t<T>;
  __shared__ double sums[kThreads];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kKlChunk;
  const int64_t last = n < first + kKlChunk ? n : first + kKlChunk;
  double sum = 0.0;
  for (int64_t e = first + threadIdx.x; e < last; e += blockDim.x)
    sum += static_cast<double>(gaussian_kl_term<C>(static_cast<C>(mu[e]), static_cast<C>(logvar[e])));
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width >= 32; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x < 32) {
    sum = sums[threadIdx.x];
    for (int lane_offset = 16; lane_offset > 0; lane_offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, lane_offset);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
  }
}

}  // namespace

void normal(const NormalParams& p, const CudaExec& exec) {
  p.check();
  if (p.n == 0) return;
  dispatch_float(p.dtype, "normal", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(normal_kernel<T>, dim3(blocks_for((p.n + 3) / 4, kThreads)), dim3(kThreads), 0,
           static_cast<cudaStream_t>(exec.stream), static_cast<T*>(p.out), p.n, p.seed);
  });
}

void reparameterize(const ReparameterizeParams& p, const CudaExec& exec) {
  p.check();
  if (p.n == 0) return;
  dispatch_float(p.dtype, "reparameterize", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(reparameterize_kernel<T>, dim3(blocks_for((p.n + 3) / 4, kThreads)), dim3(kThreads), 0,
           static_cast<cudaStream_t>(exec.stream), static_cast<T*>(p.z), static_cast<const T*>(p.mu),
           static_cast<const T*>(p.logvar), p.n, p.seed);
  });
}

void gaussian_kl(const GaussianKlParams& p, const CudaExec& exec) {
  p.check();
  if (p.n == 0) return;
  dispatch_float(p.dtype, "gaussian_kl", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto stream = static_cast<cudaStream_t>(exec.stream);
    const T* mu = static_cast<const T*>(p.mu);
    const T* logvar = static_cast<const T*>(p.logvar);
    if (p.partial_sums) {
      const int64_t chunks = (p.n + kKlChunk - 1) / kKlChunk;
      launch(gaussian_kl_sum_kernel<T>, dim3(blocks_for(chunks, 1, INT32_MAX)), dim3(kThreads), 0, stream,
             static_cast<double*>(p.out), mu, logvar, p.n);
    } else {
      launch(gaussian_kl_kernel<T>, dim3(blocks_for(p.n, kThreads)), dim3(kThreads), 0, stream,
             static_cast<T*>(p.out), mu, logvar, p.n);
    }
  });
}

}  // namespace gk
