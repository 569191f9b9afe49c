// CUDA kernels for scaled dot-product attention, forward (FlashAttention-2; Dao, 2023).
//
// A block owns some query rows and walks the keys they may attend to in tiles of B_c keys,
// keeping for each row the running maximum m, the running sum l and the unnormalised output o
// (the online softmax of Milakov & Gimelshein, 2018):
//
//   s_j   = scale * q . k_j + bias_j            (-inf where key j is not allowed)
//   m'    = max(m, max_j s_j)
//   p_j   = exp(s_j - m')
//   l     = exp(m - m') * l + sum_j p_j
//   o     = exp(m - m') * o + sum_j p_j v_j
//
// and ends with out = o / l, lse = m + log l. exp(x - m) is computed as exp2((x - m) log2 e),
// the difference first, so that scores in the hundreds lose no more to rounding than the
// scores themselves do. A row that has met no allowed key keeps m = -inf; its exponentials
// subtract 0 in place of m', so nothing becomes NaN, and it ends with l = 0, which gives
// out = 0 and lse = 0.
//
// With dropout, p_j is multiplied by its dropout factor (attention_math.h) after l has summed
// it and before P V, so that lse stays that of the scores.
//
// Rows. The len_q positions of the group = heads_q / heads_kv query heads that read one
// key/value head are numbered r = g * len_q + i, and a block takes a run of consecutive r:
// every key and value tile it stages serves all of its rows, across heads with grouped-query
// attention. A block visits only the keys [key_begin, key_end) that some row of it may see
// (kv_lens, the causal or window band), so whole tiles outside the band are never loaded; a
// tile lying inside the band for all rows, with no mask, skips the per-element checks.
//
// Kernels:
//   attention_tc_kernel       float16, bfloat16 (len_q > kDecodeMaxLen): tensor cores,
//                             mma.m16n8k16 with fp32 accumulation.
//   attention_simt_kernel     float32, float64 (len_q > kDecodeMaxLen): CUDA cores; and every
//                             dtype for decoding (len_q <= kDecodeMaxLen), where the keys are
//                             split into chunks run by separate blocks (flash-decoding) ...
//   attention_combine_kernel  ... whose partial results this merges in a fixed order, so that
//                             results are deterministic.
// Head dims up to 256 are served by three padded buckets (64, 128, 256) for max(dim_qk, dim_v):
// shared-memory tiles are zero beyond the real head dims, and the loops stop at the real dims
// rounded up to their step (16 columns for mma, 16 bytes or 32 lanes on CUDA cores).
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention/attention.h"
#include "attention/attention_math.h"
#include "common/cuda_utils.h"
#include "common/hostdevice.h"
#include "common/ptx.h"

// Unrolls the loop that follows twice on the device (GK_UNROLL unrolls fully), or not at all.
#if defined(__CUDA_ARCH__)
#define GK_UNROLL_TWICE _Pragma("unroll 2")
#define GK_NO_UNROLL _Pragma("unroll 1")
#else
#define GK_UNROLL_TWICE
#define GK_NO_UNROLL
#endif

namespace gk {
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int64_t kDecodeMaxLen = 4;  // len_q up to this takes the split-key decode path
// Split-key sizing: about kDecodeTargetBlocks blocks in all (twice the SMs of an H100), in
// chunks of at least kMinChunk keys so that each block's partial result (dim_v + 1 values)
// stays small beside the chunk's keys and values. The split depends on the sizes only, not on
// the device, so results do not either.
constexpr int64_t kDecodeTargetBlocks = 256;
constexpr int64_t kMinChunk = 64;
constexpr double kLog2e = 1.4426950408889634074;

template <class C>
__host__ __device__ constexpr C neg_inf() {
  return -std::numeric_limits<C>::infinity();
}
template <class C>
__device__ __forceinline__ C larger(C a, C b) {
  return a > b ? a : b;
}
__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
// Fused multiply-add, spelled out so that emulation rounds as the GPU does.
__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }
// exp(x - base); exp(-inf) = 0.
template <class C>
__device__ __forceinline__ C exp_minus(C x, C base) {
  return exp2_((x - base) * C(kLog2e));
}

template <class C>
__device__ __forceinline__ C warp_max(C x) {
  for (int offset = 16; offset > 0; offset /= 2) x = larger<C>(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
template <class C>
__device__ __forceinline__ C warp_sum(C x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sixteen bytes of X, for vector loads from global and shared memory.
template <class X>
struct alignas(16) Vec16 {
  X e[16 / sizeof(X)];
};

// Host-side decisions the kernels share.
struct Plan {
  int64_t group;       // query heads per key/value head
  int64_t rows;        // group * len_q: the query rows that read one key/value head
  int64_t block_rows;  // rows per block
  int64_t row_blocks;  // blocks per key/value head and chunk
  int64_t chunks;      // key chunks (split-key decoding), 1 otherwise
  int64_t chunk_len;   // keys per chunk
  // Whether every row of q, k, v starts on a 16-byte boundary, so that 16-byte pieces of rows
  // move as vectors (cp.async in attention_tc_kernel).
  bool vec_q, vec_k, vec_v;
  // Split-key workspace: per output row and chunk, the chunk's normalised output (dim_v) and
  // its log-sum-exp, in the compute type; null without a split.
  void* partial_out;
  void* partial_lse;
};

// One block's share: key/value head (b, hkv), rows [r0, r0 + nrows) (positions i_min..i_max)
// and the keys [key_begin, key_end) that any of them may see, within its chunk.
struct Block {
  int64_t b, hkv, chunk, r0, nrows, diag, i_min, i_max, key_begin, key_end;
};

__device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ Block locate_block(const AttentionParams& p, const Plan& plan) {
  Block blk;
  int64_t x = blockIdx.x;  // row block fastest: neighbouring blocks share key and value tiles in L2
  const int64_t rb = x % plan.row_blocks;
  x /= plan.row_blocks;
  blk.chunk = x % plan.chunks;
  x /= plan.chunks;
  blk.hkv = x % p.heads_kv;
  blk.b = x / p.heads_kv;
  blk.r0 = rb * plan.block_rows;
  blk.nrows = plan.rows - blk.r0 < plan.block_rows ? plan.rows - blk.r0 : plan.block_rows;
  const int64_t r_last = blk.r0 + blk.nrows - 1;
  const bool one_head = blk.r0 / p.len_q == r_last / p.len_q;
  blk.i_min = one_head ? blk.r0 % p.len_q : 0;
  blk.i_max = one_head ? r_last % p.len_q : p.len_q - 1;

  int64_t kv_len = p.kv_lens != nullptr ? p.kv_lens[blk.b] : p.len_kv;
  kv_len = kv_len < 0 ? 0 : (kv_len > p.len_kv ? p.len_kv : kv_len);  // reads stay inside k and v
  blk.diag = p.bottom_right ? kv_len - p.len_q : 0;
  int64_t begin = blk.chunk * plan.chunk_len, end = begin + plan.chunk_len;
  if (p.window_left >= 0 && blk.i_min + blk.diag - p.window_left > begin) begin = blk.i_min + blk.diag - p.window_left;
  if (p.window_right >= 0 && blk.i_max + blk.diag + p.window_right + 1 < end)
    end = blk.i_max + blk.diag + p.window_right + 1;
  if (kv_len < end) end = kv_len;
  blk.key_begin = begin;
  blk.key_end = end > begin ? end : begin;
  return blk;
}

__device__ __forceinline__ bool in_band(const AttentionParams& p, const Block& blk, int64_t i, int64_t j) {
  const int64_t d = j - (i + blk.diag);
  return (p.window_left < 0 || d >= -p.window_left) && (p.window_right < 0 || d <= p.window_right);
}

// Whether keys [n0, n0 + n) are allowed for every row of the block (and no mask applies).
__device__ __forceinline__ bool tile_is_full(const AttentionParams& p, const Block& blk, int64_t n0, int64_t n) {
  return p.mask == nullptr && n0 + n <= blk.key_end && in_band(p, blk, blk.i_max, n0) &&
         in_band(p, blk, blk.i_min, n0 + n - 1);
}

// A query row: position i, its index in out and lse ((b * heads_q + h) * len_q + i), and the
// element offsets of its q row and mask row.
struct Row {
  int64_t i, index, q, mask;
};

// Row r of the block; rows past the block's end stand in for its last row (their results
// are never stored, and their mask reads stay inside the mask).
__device__ Row row_of(const AttentionParams& p, const Plan& plan, const Block& blk, int64_t r) {
  const int64_t rr = blk.r0 + (r < blk.nrows ? r : blk.nrows - 1);
  const int64_t h = blk.hkv * plan.group + rr / p.len_q, i = rr % p.len_q;
  return {i, (blk.b * p.heads_q + h) * p.len_q + i, blk.b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2],
          blk.b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2]};
}

// The score of key j for `row`, from q . k_j: -inf where j is not allowed.
template <class T, class C>
__device__ C masked_score(const AttentionParams& p, const Block& blk, const Row& row, int64_t j, C dot, C scale) {
  if (j >= blk.key_end || !in_band(p, blk, row.i, j)) return neg_inf<C>();
  const C s = dot * scale;
  if (p.mask == nullptr) return s;
  const int64_t at = row.mask + j * p.mask_stride[3];
  switch (p.mask_dtype) {
    case DType::b8: return static_cast<const uint8_t*>(p.mask)[at] != 0 ? s : neg_inf<C>();
    case DType::f32: return s + C(static_cast<const float*>(p.mask)[at]);
    default: return s + C(static_cast<const T*>(p.mask)[at]);
  }
}

// Stages rows [0, tile_rows) of a shared-memory tile of row stride ld: row r < rows holds
// src(r)[0, cols) converted to S and zeros up to column `padded`, later rows zeros up to
// `padded` (the products read the padding, which must be finite). When `vec`, 16-byte pieces
// inside a row move as one vector: by cp.async when kAsync (then S is the source type, and the
// caller commits and waits), else by one 16-byte load.
template <int kMaxCols, bool kAsync, class S, class RowPtr>
__device__ void stage_tile(S* tile, int ld, int tile_rows, int64_t rows, int64_t cols, int64_t padded, bool vec,
                           RowPtr src) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(src(0))>>;
  constexpr int kPiece = 16 / sizeof(T);
  constexpr int kPieces = kMaxCols / kPiece;
  for (int idx = int(threadIdx.x); idx < tile_rows * kPieces; idx += int(blockDim.x)) {
    const int r = idx / kPieces, c0 = idx % kPieces * kPiece;
    if (c0 >= padded) continue;
    S* dst = tile + r * ld + c0;
    if (r < rows && vec && c0 + kPiece <= cols) {
      if constexpr (kAsync) {
        static_assert(std::is_same_v<S, T>, "cp.async copies without converting");
        cp_async_16(dst, src(r) + c0);
      } else {
        const Vec16<T> x = *reinterpret_cast<const Vec16<T>*>(src(r) + c0);
        for (int e = 0; e < kPiece; ++e) dst[e] = static_cast<S>(x.e[e]);
      }
    } else {
      for (int e = 0; e < kPiece; ++e) dst[e] = r < rows && c0 + e < cols ? static_cast<S>(src(r)[c0 + e]) : S(0.0f);
    }
  }
}

__device__ __forceinline__ int64_t pad_to(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (float16, bfloat16): 4 warps, each owning 16 of the block's 64 query rows.
//
// Per key tile of B_c keys: the tile's K and V rows come in by cp.async into one half of a
// double buffer while the other half is in use; each warp forms S = Q K^T for its 16 rows
// (A = Q by ldmatrix, B = K by ldmatrix, both from shared memory), applies scale, masks and
// the online softmax on the accumulator registers (a row's values live on the 4 lanes of a
// quad, reduced by __shfl_xor_sync), rounds P to 16 bits in registers - the accumulator
// layout of S is the A-operand layout of P V - and accumulates O += P V (V by ldmatrix.trans)
// in fp32 registers.
//
// Napkin math (L = S = 4096, D = 128, one head, no mask): 4 L S D = 8.6 GFLOP of mma. DRAM:
// q, k, v and out once, 4 MiB (the 64 query tiles of a head are neighbouring blocks streaming
// the same K and V, so their re-reads, 64 x 2 MiB, hit L2). Each staged K/V byte serves
// B_r = 64 flops, B_r the block's query rows: at A100's 312 TFLOP/s that is ~5 TB/s of L2, so
// about what it has: tensor-core-bound with L2 close behind; an H100 would need ~15 TB/s, so
// there L2 and mma.sync (no wgmma) keep it well below peak. Shared memory: per tile a warp reads
// 16 x D of Q and B_c x D each of K and V by ldmatrix for 4 x 16 x B_c x D flops, 14 flop per
// byte at B_c = 64: A100's 128 B/clk/SM of shared memory feed ~270 of its 312 TFLOP/s. Stores
// of out are 2-byte and few: B_r x Ev per block against S x (E + Ev) of K and V read.
template <int D>
struct TcShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;  // D = 256: 99 KiB of shared memory in all
  // Row stride in elements: 16 bytes of padding put the 8 rows of an ldmatrix in distinct banks.
  static constexpr int kLd = D + 8;
  static constexpr size_t smem_bytes() { return 2 * size_t(kLd) * (kBlockM + 4 * kBlockN); }
};

template <class T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>)
    mma_m16n8k16_f16f32(d, a, b, d);
  else
    mma_m16n8k16_bf16f32(d, a, b, d);
}

// Two floats rounded to T, lo in the low 16 bits, as mma operands hold them.
template <class T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 x = __floats2half2_rn(lo, hi);
    memcpy(&bits, &x, 4);
  } else {
    const __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &x, 4);
  }
  return bits;
}

template <class T, int D>
__launch_bounds__(TcShape<D>::kThreads) __global__ void attention_tc_kernel(const AttentionParams p, const Plan plan) {
  using Shape = TcShape<D>;
  constexpr int kM = Shape::kBlockM, kN = Shape::kBlockN, kLd = Shape::kLd;
  GK_DYNAMIC_SMEM(T, smem);
  T* const sQ = smem;
  T* const sK = sQ + kM * kLd;      // [2][kN][kLd]
  T* const sV = sK + 2 * kN * kLd;  // [2][kN][kLd]

  const Block blk = locate_block(p, plan);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int quad_row = lane / 4, quad_col = 2 * (lane % 4);  // accumulator element (row, col) of lane
  const float scale = float(p.scale);
  const int qk_steps = int(ceil_div(p.dim_qk, 16));  // 16-column steps of Q K^T
  const int v_cols = int(pad_to(p.dim_v, 16));       // V columns that P V multiplies

  const T* const q = static_cast<const T*>(p.q);
  const T* const k = static_cast<const T*>(p.k) + blk.b * p.k_stride[0] + blk.hkv * p.k_stride[1];
  const T* const v = static_cast<const T*>(p.v) + blk.b * p.v_stride[0] + blk.hkv * p.v_stride[1];
  const int64_t n_tiles = ceil_div(blk.key_end - blk.key_begin, kN);
  auto stage_kv = [&](int64_t tile, int buf) {
    const int64_t n0 = blk.key_begin + tile * kN, n = blk.key_end - n0;
    stage_tile<D, true>(sK + buf * kN * kLd, kLd, kN, n, p.dim_qk, pad_to(p.dim_qk, 16), plan.vec_k,
                        [&](int r) { return k + (n0 + r) * p.k_stride[2]; });
    stage_tile<D, true>(sV + buf * kN * kLd, kLd, kN, n, p.dim_v, v_cols, plan.vec_v,
                        [&](int r) { return v + (n0 + r) * p.v_stride[2]; });
  };
  if (n_tiles > 0) {
    stage_tile<D, true>(sQ, kLd, kM, blk.nrows, p.dim_qk, pad_to(p.dim_qk, 16), plan.vec_q,
                        [&](int r) { return q + row_of(p, plan, blk, r).q; });
    stage_kv(0, 0);
  }
  cp_async_commit();

  // This lane's two rows: quad_row and quad_row + 8 of the warp's 16.
  const Row rows[2] = {row_of(p, plan, blk, 16 * warp + quad_row), row_of(p, plan, blk, 16 * warp + quad_row + 8)};
  float m[2] = {neg_inf<float>(), neg_inf<float>()}, l[2] = {0.0f, 0.0f};
  const DropoutStream drop = attention_dropout(p);
  const float keep_scale = float(dropout_scale(p.dropout_p));
  float o[D / 8][4] = {};

  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int buf = int(tile % 2);
    if (tile + 1 < n_tiles) stage_kv(tile + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of `tile` have landed...
    __syncthreads();     // ...and every thread's
    const T* const tK = sK + buf * kN * kLd;
    const T* const tV = sV + buf * kN * kLd;
    const int64_t n0 = blk.key_begin + tile * kN;

    // S = Q K^T for the warp's 16 rows: s[nt] is the 16 x 8 block of keys 8 nt .. 8 nt + 7.
    float s[kN / 8][4] = {};
    GK_UNROLL
    for (int ks = 0; ks < D / 16; ++ks) {
      if (ks == qk_steps) break;
      uint32_t a[4];
      ldmatrix_x4(a, sQ + (16 * warp + lane % 16) * kLd + 16 * ks + lane / 16 * 8);
      GK_UNROLL
      for (int nt = 0; nt < kN / 8; nt += 2) {
        // Matrices: keys nt*8.. at columns +0 and +8, then keys (nt+1)*8.. at +0 and +8.
        uint32_t b[4];
        ldmatrix_x4(b, tK + (8 * nt + lane % 8 + lane / 16 * 8) * kLd + 16 * ks + lane / 8 % 2 * 8);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_16x8x16<T>(s[nt], a, b0);
        mma_16x8x16<T>(s[nt + 1], a, b1);
      }
    }

    // Scale and mask; element e of s[nt] is row quad_row + 8 (e / 2), key 8 nt + quad_col + e % 2.
    const bool full = tile_is_full(p, blk, n0, kN);
    float tile_max[2] = {neg_inf<float>(), neg_inf<float>()};
    GK_UNROLL
    for (int nt = 0; nt < kN / 8; ++nt) {
      GK_UNROLL
      for (int e = 0; e < 4; ++e) {
        float& x = s[nt][e];
        x = full ? x * scale : masked_score<T, float>(p, blk, rows[e / 2], n0 + 8 * nt + quad_col + e % 2, x, scale);
        tile_max[e / 2] = larger(tile_max[e / 2], x);
      }
    }
    // Online softmax. A row's 4 lanes are lanes 4 quad_row .. 4 quad_row + 3.
    GK_UNROLL
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = larger(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = larger(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float m_new = larger(m[h], tile_max[h]);
      const float base = m_new == neg_inf<float>() ? 0.0f : m_new;
      const float correction = exp_minus(m[h], base);
      m[h] = m_new;
      l[h] *= correction;
      GK_UNROLL
      for (int nd = 0; nd < D / 8; ++nd) {
        o[nd][2 * h] *= correction;
        o[nd][2 * h + 1] *= correction;
      }
      GK_UNROLL
      for (int nt = 0; nt < kN / 8; ++nt) {
        s[nt][2 * h] = exp_minus(s[nt][2 * h], base);
        s[nt][2 * h + 1] = exp_minus(s[nt][2 * h + 1], base);
        l[h] += s[nt][2 * h] + s[nt][2 * h + 1];
      }
    }

    // Dropout: after the row sums, so that l (and lse) stay those of the scores. The keep bits
    // of the lane's kN / 2 weights come first, from one rolled loop: 32 inlined Philox blocks
    // would push the kernel into spills.
    if (p.seed != nullptr) {
      static_assert(kN / 2 <= 32, "one keep bit per weight of the lane");
      uint32_t kept = 0;  // bit 4 nt + e: element e of s[nt]
      GK_NO_UNROLL
      for (int x = 0; x < kN / 2; ++x) {
        const int64_t index = x % 4 < 2 ? rows[0].index : rows[1].index;
        const int64_t j = n0 + 8 * (x / 4) + quad_col + x % 2;
        kept |= uint32_t(dropout_keeps(drop, uint64_t(index * p.len_kv + j))) << x;
      }
      GK_UNROLL
      for (int nt = 0; nt < kN / 8; ++nt) {
        GK_UNROLL
        for (int e = 0; e < 4; ++e) s[nt][e] = (kept >> (4 * nt + e)) & 1u ? s[nt][e] * keep_scale : 0.0f;
      }
    }

    // O += P V, 16 keys per step. P's A fragment (rows quad_row and quad_row + 8, keys
    // quad_col.. and quad_col + 8..) is the accumulators of two key blocks.
    GK_UNROLL
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      GK_UNROLL
      for (int nd = 0; nd < D / 8; nd += 2) {
        if (8 * nd == v_cols) break;
        // Matrices (transposed): keys 16 kk + 0..7 and + 8..15 of columns 8 nd.., then of 8 (nd + 1)...
        uint32_t b[4];
        ldmatrix_x4_trans(b, tV + (16 * kk + lane % 16) * kLd + 8 * nd + lane / 16 * 8);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_16x8x16<T>(o[nd], a, b0);
        mma_16x8x16<T>(o[nd + 1], a, b1);
      }
    }
    __syncthreads();  // every warp is done with `buf` before the next iteration refills it
  }

  GK_UNROLL
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    if (16 * warp + quad_row + 8 * h >= blk.nrows) continue;
    const int64_t index = row_of(p, plan, blk, 16 * warp + quad_row + 8 * h).index;
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    T* const out = static_cast<T*>(p.out) + index * p.dim_v;
    GK_UNROLL
    for (int nd = 0; nd < D / 8; ++nd) {
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * nd + quad_col + e;
        if (col < p.dim_v) out[col] = static_cast<T>(o[nd][2 * h + e] * inv);
      }
    }
    if (p.lse != nullptr && quad_col == 0)
      p.lse[index] = l[h] > 0.0f ? m[h] + log_(l[h]) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA-core kernel (float32, float64; any dtype when decoding): 1 to 4 warps of kRows query rows
// each, in the compute type C (float, or double for float64).
//
// Per key tile of kKeys keys (32 for float, 16 for double): the block stages K and V converted
// to C in shared memory; for Q K^T lane l takes key l % kKeys and, of the warp's kRows rows,
// those of its half-warp in the double case, and reads K and Q by 16-byte vectors; scores go
// through the online softmax (row maxima over the warp by shuffles) into a per-warp P tile;
// for P V lane l owns output columns l, l + 32, ... of all kRows rows.
//
// Napkin math: per lane, Q K^T takes one 16-byte K load and kRows / kGroups broadcast Q loads
// per kRows / kGroups x 16 / sizeof(C) FMAs, and P V one V load per kRows FMAs (plus a
// broadcast P load per key): 3 to 4 FMAs per shared-memory load, so float32 runs at a
// fraction of FP32 peak, bound by shared-memory issue (float32 attention is off the hot path),
// and float64 near the FP64 rate of most GPUs. Prefill blocks (16 rows) stage every K and V
// tile again: 2 x 16 (E + Ev) flops per 4 (E + Ev) bytes, 8 flop per L2 byte, ~2.5 TB/s of
// L2 at A100's 19.5 FP32 TFLOP/s, within its L2 bandwidth. Decoding reads each K and V byte
// from DRAM once (the chunks split the keys): 2 (E + Ev) flops per row and key against
// (E + Ev) x sizeof(T) bytes, so with up to ~8 rows per key/value head (len_q x group) and
// 16-bit data it stays under A100's ~10 FP32 flop per DRAM byte: memory-bound, as decoding
// should be, given enough blocks in flight (kDecodeTargetBlocks).
template <class T, int D>
struct SimtShape {
  using C = compute_t<T>;
  static constexpr int kRows = 4;                    // query rows per warp
  static constexpr int kKeys = 128 / sizeof(C);      // keys per tile
  static constexpr int kGroups = 32 / kKeys;         // lanes sharing a key (splitting its rows)
  static constexpr int kLaneRows = kRows / kGroups;  // rows per lane in Q K^T
  static constexpr int kVec = 16 / sizeof(C);
  // K rows padded by 16 bytes: the 8 lanes of a 16-byte load phase read distinct banks.
  static constexpr int kLdK = D + kVec;
  static_assert(kRows % kVec == 0, "P rows are read as whole 16-byte vectors");
  // Shared memory: Q (warps x kRows rows), K, V (kKeys rows), P (warps x kKeys x kRows).
  static size_t smem_bytes(int warps) {
    return sizeof(C) * (size_t(warps) * kRows * D + kKeys * kLdK + kKeys * D + size_t(warps) * kKeys * kRows);
  }
};

// At least one block per SM is all the launch bounds promise: shared memory (35 KiB for a
// one-warp decoding block at D = 128) rather than registers bounds the blocks per SM, so ptxas
// may keep the unrolled loops in registers instead of trading them for spills.
template <class T, int D>
__launch_bounds__(128, 1) __global__ void attention_simt_kernel(const AttentionParams p, const Plan plan) {
  using Shape = SimtShape<T, D>;
  using C = typename Shape::C;
  constexpr int kRows = Shape::kRows, kKeys = Shape::kKeys, kGroups = Shape::kGroups;
  constexpr int kLaneRows = Shape::kLaneRows, kVec = Shape::kVec, kLdK = Shape::kLdK;
  const int warps = int(blockDim.x) / 32, warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  GK_DYNAMIC_SMEM(C, smem);
  C* const sQ = smem;                                   // [warps * kRows][D]
  C* const sK = sQ + warps * kRows * D;                 // [kKeys][kLdK]
  C* const sV = sK + kKeys * kLdK;                      // [kKeys][D]
  C* const sP = sV + kKeys * D + warp * kKeys * kRows;  // this warp's [kKeys][kRows]

  const Block blk = locate_block(p, plan);
  const C scale = C(p.scale);
  const int key = lane % kKeys, group = lane / kKeys;  // Q K^T: lane's key and rows group + kGroups * rr
  const int64_t qk_cols = pad_to(p.dim_qk, kVec);

  const T* const q = static_cast<const T*>(p.q);
  const T* const k = static_cast<const T*>(p.k) + blk.b * p.k_stride[0] + blk.hkv * p.k_stride[1];
  const T* const v = static_cast<const T*>(p.v) + blk.b * p.v_stride[0] + blk.hkv * p.v_stride[1];
  stage_tile<D, false>(sQ, D, warps * kRows, blk.nrows, p.dim_qk, qk_cols, plan.vec_q,
                       [&](int r) { return q + row_of(p, plan, blk, r).q; });

  Row rows[kLaneRows];
  GK_UNROLL
  for (int rr = 0; rr < kLaneRows; ++rr) rows[rr] = row_of(p, plan, blk, kRows * warp + group + kGroups * rr);
  const DropoutStream drop = attention_dropout(p);
  const C keep_scale = C(dropout_scale(p.dropout_p));
  C m[kRows], l[kRows], o[kRows][D / 32] = {};  // l: this lane's share of the row sums
  GK_UNROLL
  for (int r = 0; r < kRows; ++r) {
    m[r] = neg_inf<C>();
    l[r] = C(0);
  }

  for (int64_t n0 = blk.key_begin; n0 < blk.key_end; n0 += kKeys) {
    const int64_t n = blk.key_end - n0 < kKeys ? blk.key_end - n0 : kKeys;
    __syncthreads();  // the previous tile is no longer read
    stage_tile<D, false>(sK, kLdK, kKeys, n, p.dim_qk, qk_cols, plan.vec_k,
                         [&](int r) { return k + (n0 + r) * p.k_stride[2]; });
    stage_tile<D, false>(sV, D, kKeys, n, p.dim_v, pad_to(p.dim_v, 32), plan.vec_v,
                         [&](int r) { return v + (n0 + r) * p.v_stride[2]; });
    __syncthreads();

    C s[kLaneRows] = {};
    const C* const k_row = sK + key * kLdK;
    // Unrolled twice: unrolling further only holds more hoisted loads in registers.
    GK_UNROLL_TWICE
    for (int64_t e = 0; e < qk_cols; e += kVec) {
      const Vec16<C> kv = *reinterpret_cast<const Vec16<C>*>(k_row + e);
      GK_UNROLL
      for (int rr = 0; rr < kLaneRows; ++rr) {
        const Vec16<C> qv = *reinterpret_cast<const Vec16<C>*>(sQ + (kRows * warp + group + kGroups * rr) * D + e);
        GK_UNROLL
        for (int x = 0; x < kVec; ++x) s[rr] = fma_(qv.e[x], kv.e[x], s[rr]);
      }
    }
    const bool full = tile_is_full(p, blk, n0, kKeys);
    GK_UNROLL
    for (int rr = 0; rr < kLaneRows; ++rr)
      s[rr] = full ? s[rr] * scale : masked_score<T, C>(p, blk, rows[rr], n0 + key, s[rr], scale);

    // Online softmax for each of the warp's rows; lanes of other row groups contribute -inf.
    GK_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const bool mine = r % kGroups == group;
      const C m_new = larger(m[r], warp_max(mine ? s[r / kGroups] : neg_inf<C>()));
      const C base = m_new == neg_inf<C>() ? C(0) : m_new;
      const C correction = exp_minus(m[r], base);
      m[r] = m_new;
      l[r] *= correction;
      GK_UNROLL
      for (int c = 0; c < D / 32; ++c) o[r][c] *= correction;
      if (mine) {
        const C prob = exp_minus(s[r / kGroups], base);
        l[r] += prob;  // before dropout: l (and lse) are those of the scores
        sP[key * kRows + r] =
            p.seed != nullptr
                ? prob * dropout_factor(drop, uint64_t(rows[r / kGroups].index * p.len_kv + n0 + key), keep_scale)
                : prob;
      }
    }
    __syncwarp();

    GK_UNROLL_TWICE
    for (int j = 0; j < n; ++j) {
      C prob[kRows];
      GK_UNROLL
      for (int x = 0; x < kRows; x += kVec) {
        const Vec16<C> pv = *reinterpret_cast<const Vec16<C>*>(sP + j * kRows + x);
        GK_UNROLL
        for (int y = 0; y < kVec; ++y) prob[x + y] = pv.e[y];
      }
      GK_UNROLL
      for (int c = 0; c < D / 32; ++c) {
        if (32 * c >= p.dim_v) break;
        const C vj = sV[j * D + 32 * c + lane];
        GK_UNROLL
        for (int r = 0; r < kRows; ++r) o[r][c] = fma_(prob[r], vj, o[r][c]);
      }
    }
  }

  C* const partial_out = static_cast<C*>(plan.partial_out);
  C* const partial_lse = static_cast<C*>(plan.partial_lse);
  GK_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const C sum = warp_sum(l[r]);
    if (kRows * warp + r >= blk.nrows) continue;
    const Row row = row_of(p, plan, blk, kRows * warp + r);
    const C inv = sum > C(0) ? C(1) / sum : C(0);
    const C lse = sum > C(0) ? m[r] + log_(sum) : neg_inf<C>();
    if (partial_out != nullptr) {  // one chunk of a split: the combine kernel finishes the row
      const int64_t at = row.index * plan.chunks + blk.chunk;
      GK_UNROLL
      for (int c = 0; c < D / 32; ++c)
        if (32 * c + lane < p.dim_v) partial_out[at * p.dim_v + 32 * c + lane] = o[r][c] * inv;
      if (lane == 0) partial_lse[at] = lse;
    } else {
      T* const out = static_cast<T*>(p.out) + row.index * p.dim_v;
      GK_UNROLL
      for (int c = 0; c < D / 32; ++c)
        if (32 * c + lane < p.dim_v) out[32 * c + lane] = static_cast<T>(o[r][c] * inv);
      if (p.lse != nullptr && lane == 0) p.lse[row.index] = sum > C(0) ? float(lse) : 0.0f;
    }
  }
}

// Merges the chunks of each row, one warp per row, in chunk order:
//   lse = log sum_c exp(lse_c),   out = sum_c exp(lse_c - lse) out_c.
// Napkin math: reads chunks x (dim_v + 1) values per row and writes dim_v, a few percent of
// the chunks' key and value reads.
constexpr int kCombineWarps = 4;

template <class T>
__launch_bounds__(32 * kCombineWarps) __global__ void attention_combine_kernel(const AttentionParams p,
                                                                                const Plan plan) {
  using C = compute_t<T>;
  const int64_t row = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  const int lane = int(threadIdx.x) % 32;
  if (row >= p.batch * p.heads_q * p.len_q) return;  // whole warps
  const C* const part_lse = static_cast<const C*>(plan.partial_lse) + row * plan.chunks;
  const C* const part_out = static_cast<const C*>(plan.partial_out) + row * plan.chunks * p.dim_v;
  C top = neg_inf<C>();
  for (int64_t c = lane; c < plan.chunks; c += 32) top = larger(top, part_lse[c]);
  top = warp_max(top);
  const C base = top == neg_inf<C>() ? C(0) : top;
  C sum = C(0);
  for (int64_t c = lane; c < plan.chunks; c += 32) sum += exp_minus(part_lse[c], base);
  sum = warp_sum(sum);
  const C lse = sum > C(0) ? base + log_(sum) : C(0);
  T* const out = static_cast<T*>(p.out) + row * p.dim_v;
  for (int64_t d = lane; d < p.dim_v; d += 32) {
    C acc = C(0);
    for (int64_t c = 0; c < plan.chunks; ++c) acc += exp_minus(part_lse[c], lse) * part_out[c * p.dim_v + d];
    out[d] = static_cast<T>(acc);
  }
  if (p.lse != nullptr && lane == 0) p.lse[row] = float(lse);
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <class F>
void dispatch_head_dim(int64_t dim, F&& f) {
  if (dim <= 64) return f(std::integral_constant<int, 64>{});
  if (dim <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, kMaxHeadDim>{});
}

bool rows_aligned(const void* base, const int64_t (&stride)[3], size_t elem) {
  const int64_t per16 = int64_t(16 / elem);
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride[0] % per16 == 0 && stride[1] % per16 == 0 &&
         stride[2] % per16 == 0;
}

template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
               "attention: cudaFuncSetAttribute");
}

unsigned grid_size(const AttentionParams& p, const Plan& plan) {
  const int64_t blocks = plan.row_blocks * plan.chunks * p.heads_kv * p.batch;
  require(blocks <= int64_t(INT32_MAX), "attention: too many blocks for one launch");
  return static_cast<unsigned>(blocks);
}

template <class T, int D>
void run_tc(const AttentionParams& p, Plan plan, cudaStream_t stream) {
  using Shape = TcShape<D>;
  plan.block_rows = Shape::kBlockM;
  plan.row_blocks = (plan.rows + plan.block_rows - 1) / plan.block_rows;
  allow_smem(attention_tc_kernel<T, D>, Shape::smem_bytes());
  launch(attention_tc_kernel<T, D>, dim3(grid_size(p, plan)), dim3(Shape::kThreads), Shape::smem_bytes(), stream, p,
         plan);
}

// Prefill: 4 warps. Decoding: as many warps as the rows need, and the keys split into chunks
// until there are kDecodeTargetBlocks blocks.
template <class T, int D>
void run_simt(const AttentionParams& p, Plan plan, cudaStream_t stream, bool decode) {
  using Shape = SimtShape<T, D>;
  using C = compute_t<T>;
  const int64_t warps = decode ? (plan.rows + Shape::kRows - 1) / Shape::kRows : 4;
  plan.block_rows = Shape::kRows * (warps < 4 ? warps : 4);
  plan.row_blocks = (plan.rows + plan.block_rows - 1) / plan.block_rows;
  if (decode) {
    const int64_t blocks = plan.row_blocks * p.heads_kv * p.batch;
    const int64_t by_blocks = (kDecodeTargetBlocks + blocks - 1) / blocks;
    const int64_t by_keys = (p.len_kv + kMinChunk - 1) / kMinChunk;
    const int64_t chunks = by_blocks < by_keys ? by_blocks : by_keys;
    if (chunks > 1) {
      plan.chunk_len = (p.len_kv + chunks - 1) / chunks;
      plan.chunk_len = (plan.chunk_len + Shape::kKeys - 1) / Shape::kKeys * Shape::kKeys;
      plan.chunks = (p.len_kv + plan.chunk_len - 1) / plan.chunk_len;
    }
  }
  const int threads = int(plan.block_rows / Shape::kRows) * 32;
  const size_t smem = Shape::smem_bytes(threads / 32);
  allow_smem(attention_simt_kernel<T, D>, smem);
  if (plan.chunks == 1) {
    launch(attention_simt_kernel<T, D>, dim3(grid_size(p, plan)), dim3(threads), smem, stream, p, plan);
    return;
  }
  const int64_t partials = p.batch * p.heads_q * p.len_q * plan.chunks;
  const Workspace workspace(sizeof(C) * size_t(partials * (p.dim_v + 1)), stream);  // the split-key partials
  plan.partial_lse = workspace.ptr;
  plan.partial_out = static_cast<C*>(workspace.ptr) + partials;
  launch(attention_simt_kernel<T, D>, dim3(grid_size(p, plan)), dim3(threads), smem, stream, p, plan);
  launch(attention_combine_kernel<T>, dim3(blocks_for(p.batch * p.heads_q * p.len_q, kCombineWarps, INT32_MAX)),
         dim3(32 * kCombineWarps), 0, stream, p, plan);
}

}  // namespace

void attention_forward(const AttentionParams& params, const CudaExec& exec) {
  params.check();
  if (params.batch * params.heads_q * params.len_q == 0) return;
  const int64_t head_dim = params.dim_qk > params.dim_v ? params.dim_qk : params.dim_v;
  require(head_dim <= kMaxHeadDim, "attention: head dims above 256 are not supported on CUDA");
  // A window wider than every |j - i - diagonal| bounds nothing; capping it keeps the kernels'
  // band arithmetic far from overflow.
  AttentionParams p = params;
  const int64_t widest = 2 * (p.len_q + p.len_kv) + 1;
  if (p.window_left > widest) p.window_left = widest;
  if (p.window_right > widest) p.window_right = widest;

  Plan plan{};
  plan.group = p.heads_q / p.heads_kv;
  plan.rows = plan.group * p.len_q;
  plan.chunks = 1;
  plan.chunk_len = p.len_kv;
  const auto stream = static_cast<cudaStream_t>(exec.stream);
  dispatch_float(p.dtype, "scaled_dot_product_attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    plan.vec_q = rows_aligned(p.q, p.q_stride, sizeof(T));
    plan.vec_k = rows_aligned(p.k, p.k_stride, sizeof(T));
    plan.vec_v = rows_aligned(p.v, p.v_stride, sizeof(T));
    dispatch_head_dim(head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (p.len_q <= kDecodeMaxLen)
        run_simt<T, D>(p, plan, stream, true);
      else if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>)
        run_tc<T, D>(p, plan, stream);
      else
        run_simt<T, D>(p, plan, stream, false);
    });
  });
}

}  // namespace gk
