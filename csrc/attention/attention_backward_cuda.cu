// CUDA kernels for scaled dot-product attention, backward (the gradients of attention.h;
// FlashAttention-2, Dao 2023, algorithm 2).
//
// The weights are recomputed from the saved log-sum-exp, for each (i, j) of the band:
//   s = scale q_i . k_j (+ bias),  P = exp(s - lse_i),  z its dropout factor (the Philox stream
//   of attention_math.h, the CPU's),  dP = dO_i . v_j,  dS = P (z dP - D_i),
// with D_i = dO_i . out_i - dlse_i, and
//   dQ_i = scale sum_j dS_ij k_j  (and dbias_ij = dS_ij),  dK_j = scale sum_i dS_ij q_i,
//   dV_j = sum_i z P_ij dO_i.
// In the deterministic mode every gradient element is written by exactly one warp, without
// atomics. Otherwise the tensor-core path fuses dQ into the dK, dV kernel, which adds each key
// tile's share of it to a float32 buffer by atomics (in an order that varies from run to run).
// Kernels:
//   attention_backward_delta_kernel    D_i, one warp per query row.
//   attention_backward_dq_tc_kernel    float16, bfloat16, head dims up to 128 (tensor cores,
//   attention_backward_dkdv_tc_kernel  mma.m16n8k16 with fp32 accumulation): see below.
//   attention_backward_dq_cast_kernel  dQ = scale x the float32 sums of the fused path.
//   attention_backward_dq_kernel       every other case: one warp per query row i walks the keys
//   attention_backward_dkdv_kernel     of its band, or one warp per key j the queries of every
//                                      head of its group that may see it; a lane holds the
//                                      feature columns lane + 32 t, a dot product is a warp sum
//                                      (about 1 flop per byte of cache traffic: simple, not fast).
#include "attention/attention_cuda_tiles.cuh"

namespace gk {
namespace {

constexpr int kWarps = 4;  // warps per block of the warp-per-row kernels; each warp is independent

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
  bool vec_dout;      // whether dO rows move as 16-byte vectors (as Plan's vec_q for q)
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


// ---------------------------------------------------------------------------------------------
// Tensor-core kernels (float16, bfloat16; head dims up to 128), 4 warps of 16 rows each.
//
// dQ: a block is the forward's block of 64 query rows of one key/value head's group, walking
// the key tiles of their band as the forward does (K and V tiles double-buffered by cp.async):
// per tile each warp forms S = Q K^T and dP = dO V^T for its 16 rows (warp_mma_abt), turns them
// into dS on the accumulator registers and accumulates dQ += dS K (warp_mma_pb, K by
// ldmatrix.trans). dK, dV: a block holds 64 keys of one key/value head, and walks the query
// tiles (Q and dO double-buffered, with their lse and D) of every head of the group that the
// band lets see them: S^T = K Q^T, dP^T = V dO^T, dV += Pd^T dO, dK += dS^T Q. P and dS are
// rounded to 16 bits as operands of the second products (as FlashAttention does); every sum is
// fp32.
//
// Fused (kFusedDq, not deterministic): the dK, dV kernel also stores dS of its tile to shared
// memory, query-major, and its warps form dQ += dS K for the tile's queries (each warp 16 rows,
// 32 columns at a time) and add it to the float32 sums by atomics.
//
// Napkin math (L = S = 4096, D = 128, one head, no mask): the two kernels do 6 + 8 = 14 L S D
// flops of mma (S and dP are formed twice), the fused kernel 10 L S D and an atomic add of
// L x D floats per key tile (128 MiB of them here); the forward does 4 L S D. A staged
// byte serves as many flops per tile as in the forward (64 rows against B_c = 32 or 64
// columns), so, like the forward, they are tensor-core-bound with L2 close behind.
template <int D>
struct TcBackwardShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;          // dQ: query rows of a block; dK, dV: keys
  static constexpr int kCols = D <= 64 ? 64 : 32;  // dQ: keys of a tile; dK, dV: queries of a tile
  static constexpr int kLd = D + 8;                  // 16 bytes of padding, as in the forward
  // 16-bit tiles: two of kRows rows and two double-buffered pairs of kCols rows; then the
  // double-buffered lse and D of the query tiles (dK, dV).
  static constexpr size_t smem_bytes() { return 2 * size_t(kLd) * (2 * kRows + 4 * kCols) + 4 * kCols * sizeof(float); }
  // Fused dQ: dS of a tile, kCols queries by kRows keys.
  static constexpr int kLdS = kRows + 8;
  static constexpr size_t fused_smem_bytes() { return smem_bytes() + 2 * size_t(kCols) * kLdS; }
};

// Offset of dO's row for query row `index` = (b * heads_q + h) * len_q + i.
__device__ __forceinline__ int64_t dout_offset(const AttentionBackwardParams& bp, int64_t index) {
  const AttentionParams& p = bp.fwd;
  const int64_t i = index % p.len_q, bh = index / p.len_q;
  return bh / p.heads_q * bp.dout_stride[0] + bh % p.heads_q * bp.dout_stride[1] + i * bp.dout_stride[2];
}

template <class T, int D>
__launch_bounds__(TcBackwardShape<D>::kThreads) __global__
    void attention_backward_dq_tc_kernel(const AttentionBackwardParams bp, const Plan plan, const Shared sh) {
  using Shape = TcBackwardShape<D>;
  constexpr int kM = Shape::kRows, kN = Shape::kCols, kLd = Shape::kLd;
  const AttentionParams& p = bp.fwd;
  GK_DYNAMIC_SMEM(T, smem);
  T* const sQ = smem;
  T* const sdO = sQ + kM * kLd;
  T* const sK = sdO + kM * kLd;     // [2][kN][kLd]
  T* const sV = sK + 2 * kN * kLd;  // [2][kN][kLd]

  const Block blk = locate_block(p, plan);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int quad_row = lane / 4, quad_col = 2 * (lane % 4);  // accumulator element (row, col) of lane
  const float scale = float(p.scale);
  const int qk_cols = int(pad_to(p.dim_qk, 16)), v_cols = int(pad_to(p.dim_v, 16));

  const T* const q = static_cast<const T*>(p.q);
  const T* const dout = static_cast<const T*>(bp.dout);
  // This lane's two rows: quad_row and quad_row + 8 of the warp's 16.
  const int r0 = 16 * warp + quad_row;
  const Row rows[2] = {row_of(p, plan, blk, r0), row_of(p, plan, blk, r0 + 8)};
  const float* const delta = static_cast<const float*>(sh.delta);
  const float lse[2] = {p.lse[rows[0].index], p.lse[rows[1].index]};
  const float dsum[2] = {delta[rows[0].index], delta[rows[1].index]};
  const DropoutStream drop = attention_dropout(p);
  const float keep_scale = float(sh.keep_scale);
  float dq[D / 8][4] = {};

  auto stage_rows = [&] {
    stage_tile<D, true>(sQ, kLd, kM, blk.nrows, p.dim_qk, qk_cols, plan.vec_q,
                        [&](int r) { return q + row_of(p, plan, blk, r).q; });
    stage_tile<D, true>(sdO, kLd, kM, blk.nrows, p.dim_v, v_cols, sh.vec_dout,
                        [&](int r) { return dout + dout_offset(bp, row_of(p, plan, blk, r).index); });
  };
  for_each_key_tile<D, kN, kLd>(p, plan, blk, sK, sV, stage_rows, [&](const T* tK, const T* tV, int64_t n0) {
    float s[kN / 8][4] = {}, dp[kN / 8][4] = {};
    warp_mma_abt<T, kN, D / 16, kLd>(s, sQ + 16 * warp * kLd, tK, qk_cols / 16, lane);
    warp_mma_abt<T, kN, D / 16, kLd>(dp, sdO + 16 * warp * kLd, tV, v_cols / 16, lane);
    const uint32_t kept = p.seed == nullptr ? ~0u : keep_bits<kN / 8>(drop, [&](int nt, int e) {
      return uint64_t((e < 2 ? rows[0].index : rows[1].index) * p.len_kv + n0 + 8 * nt + quad_col + e % 2);
    });
    const bool full = tile_is_full(p, blk, n0, kN);
    // dS in place of S; element e of s[nt] is row r0 + 8 (e / 2), key n0 + 8 nt + quad_col + e % 2.
    GK_UNROLL
    for (int nt = 0; nt < kN / 8; ++nt) {
      GK_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const int64_t j = n0 + 8 * nt + quad_col + e % 2;
        const float x = full ? s[nt][e] * scale : masked_score<T, float>(p, blk, rows[h], j, s[nt][e], scale);
        const float z = p.seed == nullptr ? 1.0f : kept_factor(kept, 4 * nt + e, keep_scale);
        const float prob = exp_minus(x, lse[h]);
        s[nt][e] = prob * (z * dp[nt][e] - dsum[h]);
        if (bp.dbias != nullptr && j < blk.key_end && r0 + 8 * h < blk.nrows) bp.dbias[rows[h].index * p.len_kv + j] = s[nt][e];
      }
    }
    warp_mma_pb<T, kN, D, kLd>(dq, s, tK, qk_cols, lane);  // dQ += dS K
  });

  GK_UNROLL
  for (int h = 0; h < 2; ++h) {
    if (r0 + 8 * h >= blk.nrows) continue;
    store_accumulator_row<T, D>(static_cast<T*>(bp.dq) + rows[h].index * p.dim_qk, dq, h, quad_col, p.dim_qk, scale);
  }
}

template <class T, int D, bool kFusedDq>
__launch_bounds__(TcBackwardShape<D>::kThreads) __global__
    void attention_backward_dkdv_tc_kernel(const AttentionBackwardParams bp, const Plan plan, const Shared sh,
                                           int64_t key_tiles, float* dq_sum) {
  using Shape = TcBackwardShape<D>;
  constexpr int kN = Shape::kRows, kM = Shape::kCols, kLd = Shape::kLd, kLdS = Shape::kLdS;
  const AttentionParams& p = bp.fwd;
  GK_DYNAMIC_SMEM(T, smem);
  T* const sK = smem;
  T* const sV = sK + kN * kLd;
  T* const sQ = sV + kN * kLd;        // [2][kM][kLd]
  T* const sdO = sQ + 2 * kM * kLd;   // [2][kM][kLd]
  float* const sLse = reinterpret_cast<float*>(sdO + 2 * kM * kLd);  // [2][kM]
  float* const sD = sLse + 2 * kM;                                     // [2][kM]
  T* const sdS = reinterpret_cast<T*>(sD + 2 * kM);                   // [kM][kLdS], kFusedDq only

  const int64_t bh = blockIdx.x / key_tiles, j0 = blockIdx.x % key_tiles * kN;
  const int64_t b = bh / p.heads_kv, hk = bh % p.heads_kv, n = p.len_kv - j0 < kN ? p.len_kv - j0 : kN;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int quad_row = lane / 4, quad_col = 2 * (lane % 4);
  const float scale = float(p.scale);
  const int qk_cols = int(pad_to(p.dim_qk, 16)), v_cols = int(pad_to(p.dim_v, 16));
  // The band as masked_score sees it: keys up to len_kv (the backward has no kv_lens).
  Block blk{};
  blk.diag = sh.diagonal;
  blk.key_end = p.len_kv;

  // Queries [i_begin, i_end) of each head see some key of the tile: q_tiles tiles per head.
  const int64_t i_begin = clamp(band_first_query(j0, sh.diagonal, p.window_right), 0, p.len_q);
  const int64_t i_end = clamp(band_end_query(j0 + n - 1, sh.diagonal, p.window_left), 0, p.len_q);
  const int64_t q_tiles = i_end > i_begin ? ceil_div(i_end - i_begin, kM) : 0, items = sh.group * q_tiles;
  const T* const q = static_cast<const T*>(p.q) + b * p.q_stride[0];
  const T* const dout = static_cast<const T*>(bp.dout) + b * bp.dout_stride[0];
  const float* const delta = static_cast<const float*>(sh.delta);
  auto stage_queries = [&](int64_t item, int buf) {
    const int64_t h = hk * sh.group + item / q_tiles, i0 = i_begin + item % q_tiles * kM;
    const int64_t m = i_end - i0, row0 = (b * p.heads_q + h) * p.len_q + i0;
    stage_tile<D, true>(sQ + buf * kM * kLd, kLd, kM, m, p.dim_qk, qk_cols, plan.vec_q,
                        [&](int r) { return q + h * p.q_stride[1] + (i0 + r) * p.q_stride[2]; });
    stage_tile<D, true>(sdO + buf * kM * kLd, kLd, kM, m, p.dim_v, v_cols, sh.vec_dout,
                        [&](int r) { return dout + h * bp.dout_stride[1] + (i0 + r) * bp.dout_stride[2]; });
    for (int r = int(threadIdx.x); r < kM; r += int(blockDim.x)) {
      sLse[buf * kM + r] = r < m ? p.lse[row0 + r] : 0.0f;
      sD[buf * kM + r] = r < m ? delta[row0 + r] : 0.0f;
    }
  };
  const T* const k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* const v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  if (items > 0) {
    stage_tile<D, true>(sK, kLd, kN, n, p.dim_qk, qk_cols, plan.vec_k, [&](int r) { return k + (j0 + r) * p.k_stride[2]; });
    stage_tile<D, true>(sV, kLd, kN, n, p.dim_v, v_cols, plan.vec_v, [&](int r) { return v + (j0 + r) * p.v_stride[2]; });
    stage_queries(0, 0);
  }
  cp_async_commit();

  const DropoutStream drop = attention_dropout(p);
  const float keep_scale = float(sh.keep_scale);
  const int64_t key0 = j0 + 16 * warp + quad_row;  // this lane's keys: key0 and key0 + 8
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};

  for (int64_t item = 0; item < items; ++item) {
    const int buf = int(item % 2);
    if (item + 1 < items) stage_queries(item + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* const tQ = sQ + buf * kM * kLd;
    const T* const tdO = sdO + buf * kM * kLd;
    const float* const tLse = sLse + buf * kM;
    const float* const tD = sD + buf * kM;
    const int64_t h = hk * sh.group + item / q_tiles, i0 = i_begin + item % q_tiles * kM;
    const int64_t m = i_end - i0, row0 = (b * p.heads_q + h) * p.len_q + i0;

    // Element e of s[nt] is key key0 + 8 (e / 2) and query i0 + 8 nt + quad_col + e % 2.
    float s[kM / 8][4] = {}, dp[kM / 8][4] = {};
    warp_mma_abt<T, kM, D / 16, kLd>(s, sK + 16 * warp * kLd, tQ, qk_cols / 16, lane);   // S^T = K Q^T
    warp_mma_abt<T, kM, D / 16, kLd>(dp, sV + 16 * warp * kLd, tdO, v_cols / 16, lane);  // dP^T = V dO^T
    const uint32_t kept = p.seed == nullptr ? ~0u : keep_bits<kM / 8>(drop, [&](int nt, int e) {
      return uint64_t((row0 + 8 * nt + quad_col + e % 2) * p.len_kv + key0 + 8 * (e / 2));
    });
    // Whole tile inside the band (its extreme corners are), no mask: no per-element checks.
    const bool full = p.mask == nullptr && m >= kM && n >= kN && in_band(p, blk, i0 + kM - 1, j0) &&
                      in_band(p, blk, i0, j0 + kN - 1);
    GK_UNROLL
    for (int nt = 0; nt < kM / 8; ++nt) {
      GK_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * nt + quad_col + e % 2;
        const int64_t i = i0 + col, j = key0 + 8 * (e / 2);
        float x = s[nt][e] * scale;
        if (!full) {
          const Row row{i, 0, 0, b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2]};
          x = col < m ? masked_score<T, float>(p, blk, row, j, s[nt][e], scale) : neg_inf<float>();
        }
        const float z = p.seed == nullptr ? 1.0f : kept_factor(kept, 4 * nt + e, keep_scale);
        const float prob = exp_minus(x, tLse[col]);
        s[nt][e] = z * prob;                           // Pd^T
        dp[nt][e] = prob * (z * dp[nt][e] - tD[col]);  // dS^T
        if (kFusedDq && bp.dbias != nullptr && col < m && j < p.len_kv) bp.dbias[(row0 + col) * p.len_kv + j] = dp[nt][e];
      }
    }
    warp_mma_pb<T, kM, D, kLd>(dv, s, tdO, v_cols, lane);   // dV += Pd^T dO
    warp_mma_pb<T, kM, D, kLd>(dk, dp, tQ, qk_cols, lane);  // dK += dS^T Q
    if constexpr (kFusedDq) {
      // dS of the warp's 16 keys into sdS, query-major (the A operand of dQ += dS K).
      GK_UNROLL
      for (int nt = 0; nt < kM / 8; ++nt) {
        GK_UNROLL
        for (int e = 0; e < 4; ++e) sdS[(8 * nt + quad_col + e % 2) * kLdS + 16 * warp + quad_row + 8 * (e / 2)] = static_cast<T>(dp[nt][e]);
      }
      __syncthreads();  // dS of the whole tile is in sdS
      // dQ += dS K: this warp's rows 16 rg.. of the tile, in chunks of 32 columns dealt out
      // among the warps of those rows.
      constexpr int kChunk = 32, kRowGroups = kM / 16, kColGroups = Shape::kWarps / kRowGroups;
      const int rg = warp % kRowGroups;
      for (int c0 = warp / kRowGroups * kChunk; c0 < qk_cols; c0 += kColGroups * kChunk) {
        float dq[kChunk / 8][4] = {};
        warp_mma_ab<T, kN, kChunk, kLdS, kLd>(dq, sdS + 16 * rg * kLdS, sK + c0, qk_cols - c0 < kChunk ? qk_cols - c0 : kChunk,
                                              lane);
        GK_UNROLL
        for (int nd = 0; nd < kChunk / 8; ++nd) {
          GK_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int r = 16 * rg + quad_row + 8 * (e / 2), c = c0 + 8 * nd + quad_col + e % 2;
            if (r < m && c < p.dim_qk) atomicAdd(dq_sum + (row0 + r) * p.dim_qk + c, dq[nd][e]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with `buf` (and sdS) before the next iteration refills it
  }

  GK_UNROLL
  for (int h = 0; h < 2; ++h) {
    const int64_t j = key0 + 8 * h;
    if (j >= p.len_kv) continue;
    const int64_t key = (b * p.heads_kv + hk) * p.len_kv + j;
    store_accumulator_row<T, D>(static_cast<T*>(bp.dk) + key * p.dim_qk, dk, h, quad_col, p.dim_qk, scale);
    store_accumulator_row<T, D>(static_cast<T*>(bp.dv) + key * p.dim_v, dv, h, quad_col, p.dim_v, 1.0f);
  }
}

// dq = scale x dq_sum, as T (the fused path).
template <class T>
__launch_bounds__(256) __global__ void attention_backward_dq_cast_kernel(const float* dq_sum, T* dq, int64_t n, float scale) {
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < n; x += int64_t(gridDim.x) * blockDim.x)
    dq[x] = static_cast<T>(scale * dq_sum[x]);
}

template <class T, int D>
void run_tc(const AttentionBackwardParams& bp, Shared sh, cudaStream_t stream) {
  using Shape = TcBackwardShape<D>;
  const AttentionParams& p = bp.fwd;
  Plan plan{};
  plan.group = sh.group;
  plan.rows = sh.group * p.len_q;
  plan.block_rows = Shape::kRows;
  plan.row_blocks = (plan.rows + Shape::kRows - 1) / Shape::kRows;
  plan.chunks = 1;
  plan.chunk_len = p.len_kv;
  plan.vec_q = rows_aligned(p.q, p.q_stride, sizeof(T));
  plan.vec_k = rows_aligned(p.k, p.k_stride, sizeof(T));
  plan.vec_v = rows_aligned(p.v, p.v_stride, sizeof(T));
  sh.vec_dout = rows_aligned(bp.dout, bp.dout_stride, sizeof(T));
  const int64_t heads = p.batch * p.heads_kv;
  const int64_t key_tiles = (p.len_kv + Shape::kRows - 1) / Shape::kRows;
  require(heads * plan.row_blocks <= int64_t(INT32_MAX) && heads * key_tiles <= int64_t(INT32_MAX),
          "attention_backward: too many blocks for one launch");
  // The dK, dV kernel; with dq_sum, fused (it also sums dQ there).
  auto launch_dkdv = [&](auto kernel, size_t smem, float* dq_sum) {
    if (p.len_kv == 0) return;
    allow_smem(kernel, smem);
    launch(kernel, dim3(unsigned(heads * key_tiles)), dim3(Shape::kThreads), smem, stream, bp, plan, sh, key_tiles, dq_sum);
  };
  if (bp.deterministic) {
    if (p.len_q > 0) {
      allow_smem(attention_backward_dq_tc_kernel<T, D>, Shape::smem_bytes());
      launch(attention_backward_dq_tc_kernel<T, D>, dim3(unsigned(heads * plan.row_blocks)), dim3(Shape::kThreads),
             Shape::smem_bytes(), stream, bp, plan, sh);
    }
    return launch_dkdv(attention_backward_dkdv_tc_kernel<T, D, false>, Shape::smem_bytes(), nullptr);
  }
  const int64_t dq_elements = p.batch * p.heads_q * p.len_q * p.dim_qk;
  const Workspace dq_sum(sizeof(float) * size_t(dq_elements > 0 ? dq_elements : 1), stream);
  check_cuda(cudaMemsetAsync(dq_sum.ptr, 0, sizeof(float) * size_t(dq_elements), stream), "cudaMemsetAsync");
  launch_dkdv(attention_backward_dkdv_tc_kernel<T, D, true>, Shape::fused_smem_bytes(), static_cast<float*>(dq_sum.ptr));
  if (dq_elements > 0)
    launch(attention_backward_dq_cast_kernel<T>, dim3(blocks_for(dq_elements, 256, 4096)), dim3(256), 0, stream,
           static_cast<const float*>(dq_sum.ptr), static_cast<T*>(bp.dq), dq_elements, float(p.scale));
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
      if constexpr ((std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) && D <= 128) {
        run_tc<T, D>(bp, sh, stream);
      } else {
        if (rows > 0)
          launch(attention_backward_dq_kernel<T, D>, dim3(blocks_for(rows, kWarps, INT32_MAX)), block, 0, stream, bp, sh);
        if (keys > 0)
          launch(attention_backward_dkdv_kernel<T, D>, dim3(blocks_for(keys, kWarps, INT32_MAX)), block, 0, stream, bp, sh);
      }
    });
  });
}

}  // namespace gk
