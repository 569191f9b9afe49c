// CUDA kernels for scaled dot-product attention, backward (the gradients of attention.h).
//
// Three kernels, each output element written by exactly one warp, so the gradients are
// deterministic without atomics (and this is the only CUDA path):
//   attention_backward_delta_kernel  D_i = dO_i . out_i - dlse_i, one warp per query row.
//   attention_backward_dq_kernel     one warp per query row i: walks the keys of its band,
//                                    dQ_i = scale sum_j dS_ij k_j (and dbias_ij = dS_ij).
//   attention_backward_dkdv_kernel   one warp per key j: walks the queries of every head of its
//                                    group that may see it, dK_j = scale sum_i dS_ij q_i,
//                                    dV_j = sum_i Pd_ij dO_i.
// Both walkers recompute, for each (i, j) of the band, the two dot products s = scale q_i . k_j
// (+ bias) and dP = dO_i . v_j, the weight P = exp(s - lse_i), its dropout factor z (the Philox
// stream of attention_math.h, the CPU's) and dS = P (z dP - D_i), in pair_gradient.
// A lane holds the feature columns lane + 32 t; a dot product is a warp sum.
//
// Napkin math: each kernel reads q, k, v and dO rows once per (i, j) pair, 2 (E + Ev) elements
// for 4 (E + Ev) flops from L1/L2: a correct, simple first version (about 1 flop per byte of
// cache traffic, far from the tensor cores), not a tuned one. Tiling keys and queries through
// shared memory and mma.sync for 16-bit types is the next step.
#include <cstdint>
#include <type_traits>

#include "attention/attention.h"
#include "attention/attention_math.h"
#include "common/cuda_utils.h"
#include "common/hostdevice.h"

namespace gk {
namespace {

constexpr int kWarps = 4;  // warps per block; each warp is independent
constexpr int kMaxHeadDim = 256;
constexpr double kLog2e = 1.4426950408889634074;

template <class C>
__device__ __forceinline__ C warp_sum(C x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }

// This lane's columns lane + 32 t of row[0, dim) as C, zero beyond dim.
template <class C, int N, class T>
__device__ __forceinline__ void load_row(const T* row, int64_t dim, int lane, C (&x)[N]) {
  GK_UNROLL
  for (int t = 0; t < N; ++t) {
    const int64_t c = lane + 32 * t;
    x[t] = c < dim ? static_cast<C>(row[c]) : C(0);
  }
}

template <class C, int N, class T>
__device__ __forceinline__ void store_row(T* row, int64_t dim, int lane, const C (&x)[N], C factor) {
  GK_UNROLL
  for (int t = 0; t < N; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < dim) row[c] = static_cast<T>(factor * x[t]);
  }
}

template <class C, int N>
__device__ __forceinline__ C dot(const C (&a)[N], const C (&b)[N]) {
  C sum = C(0);
  GK_UNROLL
  for (int t = 0; t < N; ++t) sum = fma_(a[t], b[t], sum);
  return warp_sum(sum);
}

template <class C, int N>
__device__ __forceinline__ void axpy(C a, const C (&x)[N], C (&y)[N]) {
  GK_UNROLL
  for (int t = 0; t < N; ++t) y[t] = fma_(a, x[t], y[t]);
}

// What every kernel needs of the problem besides the params.
struct Shared {
  int64_t group;     // query heads per key/value head
  int64_t diagonal;  // of the band
  double keep_scale;  // 1 / (1 - p)
  const void* delta;  // D, (batch, heads_q, len_q), compute type
};


// The weight of key j for query row `row` = (b * heads_q + h) * len_q + i with its dropout factor
// (Pd) and the gradient of its score (dS), from qk = q_i . k_j and dp = dO_i . v_j; j lies in
// the band.
template <class T, class C>
__device__ __forceinline__ void pair_gradient(const AttentionParams& p, const Shared& sh, const DropoutStream& drop,
                                              int64_t row, int64_t mask_row, int64_t j, C qk, C dp, C lse, C delta,
                                              C* weight, C* dscore) {
  C s = qk * C(p.scale);
  bool allowed = true;
  if (p.mask != nullptr) {
    const int64_t at = mask_row + j * p.mask_stride[3];
    switch (p.mask_dtype) {
      case DType::b8: allowed = static_cast<const uint8_t*>(p.mask)[at] != 0; break;
      case DType::f32: s += C(static_cast<const float*>(p.mask)[at]); break;
      default: s += C(static_cast<const T*>(p.mask)[at]); break;
    }
  }
  const C prob = allowed ? exp2_((s - lse) * C(kLog2e)) : C(0);  // exp(-inf) = 0 for a -inf bias
  const C z = p.seed != nullptr ? dropout_factor(drop, static_cast<uint64_t>(row * p.len_kv + j), C(sh.keep_scale)) : C(1);
  *weight = prob * z;
  *dscore = prob * (dp * z - delta);
}

__device__ __forceinline__ int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

template <class T>
__launch_bounds__(32 * kWarps) __global__ void attention_backward_delta_kernel(const AttentionBackwardParams bp,
                                                                               const Shared sh) {
  using C = compute_t<T>;
  const AttentionParams& p = bp.fwd;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = int(threadIdx.x % 32);
  if (row >= p.batch * p.heads_q * p.len_q) return;  // whole warps
  const int64_t i = row % p.len_q, bh = row / p.len_q;
  const T* dout = static_cast<const T*>(bp.dout) + bh / p.heads_q * bp.dout_stride[0] +
                  bh % p.heads_q * bp.dout_stride[1] + i * bp.dout_stride[2];
  const T* out = static_cast<const T*>(p.out) + row * p.dim_v;
  C sum = C(0);
  for (int64_t c = lane; c < p.dim_v; c += 32) sum = fma_(C(dout[c]), C(out[c]), sum);
  sum = warp_sum(sum);
  if (lane == 0) static_cast<C*>(const_cast<void*>(sh.delta))[row] = sum - (bp.dlse ? C(bp.dlse[row]) : C(0));
}

template <class T, int D>
__launch_bounds__(32 * kWarps) __global__ void attention_backward_dq_kernel(const AttentionBackwardParams bp,
                                                                            const Shared sh) {
  using C = compute_t<T>;
  constexpr int N = D / 32;
  const AttentionParams& p = bp.fwd;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;  // (b * heads_q + h) * len_q + i
  const int lane = int(threadIdx.x % 32);
  if (row >= p.batch * p.heads_q * p.len_q) return;  // whole warps
  const int64_t i = row % p.len_q, h = row / p.len_q % p.heads_q, b = row / p.len_q / p.heads_q;
  const int64_t hk = h / sh.group;
  const DropoutStream drop = attention_dropout(p);
  C q[N], dout[N], dq[N] = {};
  load_row(static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2], p.dim_qk, lane, q);
  load_row(static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] + i * bp.dout_stride[2],
           p.dim_v, lane, dout);
  const C lse = C(p.lse[row]), delta = static_cast<const C*>(sh.delta)[row];
  const int64_t mask_row = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const int64_t j_end = clamp(band_end_key(i, sh.diagonal, p.window_right), 0, p.len_kv);
  for (int64_t j = clamp(band_first_key(i, sh.diagonal, p.window_left), 0, p.len_kv); j < j_end; ++j) {
    C kj[N], vj[N];
    load_row(k + j * p.k_stride[2], p.dim_qk, lane, kj);
    load_row(v + j * p.v_stride[2], p.dim_v, lane, vj);
    C weight, ds;
    pair_gradient<T>(p, sh, drop, row, mask_row, j, dot(q, kj), dot(dout, vj), lse, delta, &weight, &ds);
    axpy(ds, kj, dq);
    if (bp.dbias != nullptr && lane == 0) bp.dbias[row * p.len_kv + j] = float(ds);
  }
  store_row(static_cast<T*>(bp.dq) + row * p.dim_qk, p.dim_qk, lane, dq, C(p.scale));
}

template <class T, int D>
__launch_bounds__(32 * kWarps) __global__ void attention_backward_dkdv_kernel(const AttentionBackwardParams bp,
                                                                              const Shared sh) {
  using C = compute_t<T>;
  constexpr int N = D / 32;
  const AttentionParams& p = bp.fwd;
  const int64_t key = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;  // (b * heads_kv + hk) * len_kv + j
  const int lane = int(threadIdx.x % 32);
  if (key >= p.batch * p.heads_kv * p.len_kv) return;  // whole warps
  const int64_t j = key % p.len_kv, hk = key / p.len_kv % p.heads_kv, b = key / p.len_kv / p.heads_kv;
  const DropoutStream drop = attention_dropout(p);
  C kj[N], vj[N], dk[N] = {}, dv[N] = {};
  load_row(static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j * p.k_stride[2], p.dim_qk, lane, kj);
  load_row(static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j * p.v_stride[2], p.dim_v, lane, vj);
  const int64_t i_begin = clamp(band_first_query(j, sh.diagonal, p.window_right), 0, p.len_q);
  const int64_t i_end = clamp(band_end_query(j, sh.diagonal, p.window_left), 0, p.len_q);
  for (int64_t g = 0; g < sh.group; ++g) {
    const int64_t h = hk * sh.group + g;
    for (int64_t i = i_begin; i < i_end; ++i) {
      const int64_t row = (b * p.heads_q + h) * p.len_q + i;
      C q[N], dout[N];
      load_row(static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2], p.dim_qk, lane, q);
      load_row(static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] + i * bp.dout_stride[2],
               p.dim_v, lane, dout);
      const int64_t mask_row = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2];
      C weight, ds;
      pair_gradient<T>(p, sh, drop, row, mask_row, j, dot(q, kj), dot(dout, vj), C(p.lse[row]),
                       static_cast<const C*>(sh.delta)[row], &weight, &ds);
      axpy(ds, q, dk);
      axpy(weight, dout, dv);
    }
  }
  store_row(static_cast<T*>(bp.dk) + key * p.dim_qk, p.dim_qk, lane, dk, C(p.scale));
  store_row(static_cast<T*>(bp.dv) + key * p.dim_v, p.dim_v, lane, dv, C(1));
}

template <class F>
void dispatch_head_dim(int64_t dim, F&& f) {
  if (dim <= 64) return f(std::integral_constant<int, 64>{});
  if (dim <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, kMaxHeadDim>{});
}

}  // namespace

void attention_backward(const AttentionBackwardParams& params, const CudaExec& exec) {
  params.check();
  AttentionBackwardParams bp = params;
  AttentionParams& p = bp.fwd;
  if (p.batch * (p.heads_q * p.len_q + p.heads_kv * p.len_kv) == 0 || p.dim_qk * p.dim_v == 0) return;
  const int64_t head_dim = p.dim_qk > p.dim_v ? p.dim_qk : p.dim_v;
  require(head_dim <= kMaxHeadDim, "attention_backward: head dims above 256 are not supported on CUDA");
  // As in the forward: a window wider than every |j - i - diagonal| bounds nothing.
  const int64_t widest = 2 * (p.len_q + p.len_kv) + 1;
  if (p.window_left > widest) p.window_left = -1;
  if (p.window_right > widest) p.window_right = -1;

  Shared sh{};
  sh.group = p.heads_q / p.heads_kv;
  sh.diagonal = p.bottom_right ? p.len_kv - p.len_q : 0;
  sh.keep_scale = dropout_scale(p.dropout_p);
  const auto stream = static_cast<cudaStream_t>(exec.stream);
  const int64_t rows = p.batch * p.heads_q * p.len_q, keys = p.batch * p.heads_kv * p.len_kv;
  dispatch_float(p.dtype, "scaled_dot_product_attention backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const Workspace delta(sizeof(C) * size_t(rows > 0 ? rows : 1), stream);
    sh.delta = delta.ptr;
    const dim3 block(32 * kWarps);
    if (rows > 0) launch(attention_backward_delta_kernel<T>, dim3(blocks_for(rows, kWarps, INT32_MAX)), block, 0, stream, bp, sh);
    dispatch_head_dim(head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (rows > 0)
        launch(attention_backward_dq_kernel<T, D>, dim3(blocks_for(rows, kWarps, INT32_MAX)), block, 0, stream, bp, sh);
      if (keys > 0)
        launch(attention_backward_dkdv_kernel<T, D>, dim3(blocks_for(keys, kWarps, INT32_MAX)), block, 0, stream, bp, sh);
    });
  });
}

}  // namespace gk
