// Scaled dot-product attention, forward and backward: parameters and entry points.
//
// For each batch b, query head h and query position i (Dao et al., FlashAttention, 2022):
//   s_ij = scale * q_i . k_j + bias_ij            over the keys j allowed for i
//   out_i = sum_j softmax_j(s_ij) v_j,   lse_i = log sum_j exp(s_ij)
// computed tile by tile with the online softmax, never forming the len_q x len_kv matrix.
// Query head h reads key/value head h / (heads_q / heads_kv) (grouped-query attention).
// A query with no allowed key gets out = 0 and lse = 0 (PyTorch 2.5+ semantics).
// With dropout, out_i = sum_j softmax_j(s_ij) z_ij v_j, z_ij in {0, 1/(1-p)} drawn by
// attention_math.h; lse is that of the scores, without dropout.
//
// Backward (FlashAttention-2), from dO, out and lse, recomputing the weights tile by tile:
//   P_ij = exp(s_ij - lse_i),  dV_j = sum_i P_ij z_ij dO_i,  dP_ij = z_ij dO_i . v_j,
//   D_i = dO_i . out_i - dlse_i,  dS_ij = P_ij (dP_ij - D_i),
//   dQ_i = scale sum_j dS_ij k_j,  dK_j = scale sum_i dS_ij q_i,  dbias_ij = dS_ij,
// with dK and dV of a key/value head summed over its group of query heads.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"
#include "common/exec.h"

namespace gk {

struct AttentionParams {
  const void* q;  // (batch, heads_q, len_q, dim_qk)
  const void* k;  // (batch, heads_kv, len_kv, dim_qk)
  const void* v;  // (batch, heads_kv, len_kv, dim_v)
  void* out;      // (batch, heads_q, len_q, dim_v), contiguous, dtype
  float* lse;     // (batch, heads_q, len_q), contiguous; null when not wanted
  int64_t batch, heads_q, heads_kv, len_q, len_kv, dim_qk, dim_v;
  // Element strides of the batch, head and position dimensions; the feature dimension is contiguous.
  int64_t q_stride[3], k_stride[3], v_stride[3];

  // Optional mask, broadcast to (batch, heads_q, len_q, len_kv) through its element strides (0
  // on broadcast dimensions): bool (true = attend) or an additive float32 / query-dtype bias.
  const void* mask;
  DType mask_dtype;
  int64_t mask_stride[4];

  // Optional number of valid keys per batch element (the key/value cache case): keys at
  // positions >= kv_lens[b] are absent. Null means len_kv for every b.
  const int32_t* kv_lens;

  double scale;
  // Band of allowed keys: key j is allowed for query i when
  //   -window_left <= j - (i + diagonal) <= window_right,
  // a negative bound meaning unbounded on that side. The diagonal is 0 (causal aligned
  // top-left, PyTorch's is_causal) or kv_len(b) - len_q (bottom-right, flash-attention's).
  // is_causal is window_right = 0 with window_left < 0.
  int64_t window_left, window_right;
  bool bottom_right;

  // Dropout of the weights with probability dropout_p, from the Philox stream of seed (two
  // int64: key and offset); no dropout when seed is null.
  double dropout_p;
  const int64_t* seed;

  DType dtype;  // of q, k, v and out

  void check() const;
};

// The backward pass of the attention `fwd` describes. fwd.out and fwd.lse are the forward's
// results (read here); the gradients are written, contiguous.
struct AttentionBackwardParams {
  AttentionParams fwd;
  const void* dout;  // (batch, heads_q, len_q, dim_v), dtype, feature dimension contiguous
  int64_t dout_stride[3];
  const float* dlse;  // (batch, heads_q, len_q) contiguous, or null: the gradient of lse
  void* dq;           // (batch, heads_q, len_q, dim_qk), dtype
  void* dk;           // (batch, heads_kv, len_kv, dim_qk), dtype
  void* dv;           // (batch, heads_kv, len_kv, dim_v), dtype
  float* dbias;       // (batch, heads_q, len_q, len_kv) or null: the gradient of an additive mask
  // CUDA: false lets the tensor-core path sum dQ by float32 atomics in one fused kernel (the
  // rounding then varies from run to run). The CPU kernels are always deterministic.
  bool deterministic;

  void check() const;
};

GK_DECLARE_PER_ISA(void attention_forward(const AttentionParams&, const CpuExec&))
void attention_forward(const AttentionParams&, const CpuExec&);
void attention_forward(const AttentionParams&, const CudaExec&);
#if defined(GK_HAVE_AMX)
namespace avx512 {
// AMX tiles (attention_amx_cpu.cpp), for cpu_isa() == Isa::amx: the prefill forward and the
// backward where amx_pays says so.
void attention_forward_amx(const AttentionParams&, int threads);
void attention_backward_amx(const AttentionBackwardParams&, int threads);

// Whether attention of this dtype with len_q queries and len_kv keys is worth the tiles: bfloat16
// always, float32 with at least 256 keys and 128 queries. float32 pays six tile products a
// product and the splitting and packing of its operands; below that the AVX-512 kernels win
// (2 threads, E64, L queries and S keys; on the tiles against AVX-512):
//   B4, L = S, 50 GFLOP:  S 128: forward 117 ms against 92; backward 178 against 180, causal 181
//                         against 159.  S 256: forward 58 against 70; backward 127 against 143,
//                         causal 108 against 106.
//   B4 H16 S4096:         L 64: forward 28 against 23, backward 65 against 67.  L 128: forward
//                         37 against 43, backward 86 against 97.
constexpr bool amx_pays(DType dtype, int64_t len_q, int64_t len_kv) {
  return dtype == DType::bf16 || (dtype == DType::f32 && len_kv >= 256 && len_q >= 128);
}
}  // namespace avx512
#endif
GK_DECLARE_PER_ISA(void attention_backward(const AttentionBackwardParams&, const CpuExec&))
void attention_backward(const AttentionBackwardParams&, const CpuExec&);
void attention_backward(const AttentionBackwardParams&, const CudaExec&);

inline void AttentionParams::check() const {
  require(batch >= 0 && heads_q >= 0 && heads_kv >= 0 && len_q >= 0 && len_kv >= 0 && dim_qk >= 0 && dim_v >= 0,
          "attention: negative size");
  require(heads_kv > 0 ? heads_q % heads_kv == 0 : heads_q == 0, "attention: heads_q must be a multiple of heads_kv");
  const bool empty_out = batch * heads_q * len_q * dim_v == 0;
  require(empty_out || out != nullptr, "attention: null output");
  require(len_kv == 0 || batch * heads_kv == 0 || (k != nullptr && v != nullptr), "attention: null key or value");
  require(batch * heads_q * len_q == 0 || q != nullptr, "attention: null query");
  require(mask == nullptr || mask_dtype == DType::b8 || mask_dtype == DType::f32 || mask_dtype == dtype,
          "attention: mask must be bool, float32 or the query dtype");
  for (int d = 0; d < 3; ++d)
    require(q_stride[d] >= 0 && k_stride[d] >= 0 && v_stride[d] >= 0, "attention: negative stride");
  for (int d = 0; d < 4; ++d) require(mask == nullptr || mask_stride[d] >= 0, "attention: negative mask stride");
  require(seed == nullptr || (dropout_p >= 0 && dropout_p <= 1), "attention: dropout_p must lie in [0, 1]");
}

inline void AttentionBackwardParams::check() const {
  fwd.check();
  require(fwd.kv_lens == nullptr, "attention_backward: kv_lens is forward-only");
  const bool empty_q = fwd.batch * fwd.heads_q * fwd.len_q == 0;
  require(empty_q || (fwd.lse != nullptr && fwd.out != nullptr && dout != nullptr), "attention_backward: null lse, out or dout");
  require(empty_q || fwd.dim_qk == 0 || dq != nullptr, "attention_backward: null dq");
  const bool empty_kv = fwd.batch * fwd.heads_kv * fwd.len_kv == 0;
  require(empty_kv || ((fwd.dim_qk == 0 || dk != nullptr) && (fwd.dim_v == 0 || dv != nullptr)),
          "attention_backward: null dk or dv");
  require(dbias == nullptr || (fwd.mask != nullptr && fwd.mask_dtype != DType::b8),
          "attention_backward: dbias needs an additive mask");
  for (int d = 0; d < 3; ++d) require(dout_stride[d] >= 0, "attention_backward: negative stride");
}

}  // namespace gk
