// CUDA kernels for sinusoidal encodings.
//
// One thread per (pair i, position): it computes w_i once and walks positions with a grid
// stride, so each warp writes consecutive columns. Bytes: n * dim * sizeof(T) written (plus the
// input for the addition); a few dozen flops an element, far below the memory time on any GPU.
#include "common/cuda_utils.h"
#include "posenc/posenc.h"

namespace gk {
namespace {

constexpr int kThreads = 128;

template <class T>
__global__ void sinusoidal_kernel(T* __restrict__ out, const compute_t<T>* __restrict__ positions, int64_t n,
                                  SinusoidalSpec spec) {
  using C = compute_t<T>;
  const int64_t pairs = spec.pairs();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool pad = spec.dim % 2 != 0 && i == pairs;  // the zero column of an odd dim
  if (i >= pairs && !pad) return;
  const C freq = pad ? C(0) : spec.frequency<C>(i);
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    T* row = out + r * spec.dim;
    if (pad) {
      row[spec.dim - 1] = T(0.0f);
      continue;
    }
    C s, c;
    spec.sin_cos(positions[r], freq, &s, &c);
    row[spec.stride() * i + spec.sin_offset()] = static_cast<T>(s);
    row[spec.stride() * i + spec.cos_offset()] = static_cast<T>(c);
  }
}

template <class T>
__global__ void add_positional_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t rows, int64_t len,
                                      int64_t offset, compute_t<T> x_scale, SinusoidalSpec spec) {
  using C = compute_t<T>;
  const int64_t pairs = spec.pairs();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool pad = spec.dim % 2 != 0 && i == pairs;
  if (i >= pairs && !pad) return;
  const C freq = pad ? C(0) : spec.frequency<C>(i);
  const int64_t sin_col = pad ? spec.dim - 1 : spec.stride() * i + spec.sin_offset();
  const int64_t cos_col = spec.stride() * i + spec.cos_offset();
  for (int64_t l = blockIdx.y; l < len; l += gridDim.y) {
    C s = C(0), c = C(0);
    if (!pad) spec.sin_cos(static_cast<C>(offset + l), freq, &s, &c);
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t base = (b * len + l) * spec.dim;
      out[base + sin_col] = static_cast<T>(static_cast<C>(x[base + sin_col]) * x_scale + s);
      if (!pad) out[base + cos_col] = static_cast<T>(static_cast<C>(x[base + cos_col]) * x_scale + c);
    }
  }
}

dim3 pair_grid(const SinusoidalSpec& spec, int64_t rows) {
  return dim3(blocks_for(spec.pairs() + 1, kThreads), blocks_for(rows, 1));
}

}  // namespace

void sinusoidal_encoding(const SinusoidalParams& p, const CudaExec& exec) {
  p.check();
  if (p.n == 0) return;
  dispatch_float(p.dtype, "sinusoidal_encoding", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(sinusoidal_kernel<T>, pair_grid(p.spec, p.n), dim3(kThreads), 0, static_cast<cudaStream_t>(exec.stream),
           static_cast<T*>(p.out), static_cast<const compute_t<T>*>(p.positions), p.n, p.spec);
  });
}

void add_positional_encoding(const AddPositionalParams& p, const CudaExec& exec) {
  p.check();
  if (p.rows * p.len == 0) return;
  dispatch_float(p.dtype, "add_positional_encoding", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch(add_positional_kernel<T>, pair_grid(p.spec, p.len), dim3(kThreads), 0,
           static_cast<cudaStream_t>(exec.stream), static_cast<T*>(p.out), static_cast<const T*>(p.x), p.rows, p.len,
           p.offset, static_cast<compute_t<T>>(p.x_scale), p.spec);
  });
}

}  // namespace gk
