// Device pieces shared by the attention kernels of attention_cuda.cu (forward) and
// attention_backward_cuda.cu (backward): blocks of query rows and their band of keys, masked
// scores, shared-memory tile staging, and the warp-level tensor-core products. Include only from
// those .cu files: everything lands in an anonymous namespace.
#pragma once

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

// Bit 4 nt + e: whether the weight of accumulator element e of s[nt] is kept, element(nt, e)
// giving its index in the dropout stream. One rolled loop: an inlined Philox block for every
// element would push the kernels into spills.
template <int kTiles, class Element>
__device__ __forceinline__ uint32_t keep_bits(const DropoutStream& drop, Element element) {
  static_assert(4 * kTiles <= 32, "one keep bit per element of the lane");
  uint32_t kept = 0;
  GK_NO_UNROLL
  for (int x = 0; x < 4 * kTiles; ++x) kept |= uint32_t(dropout_keeps(drop, element(x / 4, x % 4))) << x;
  return kept;
}

// The dropout factor of accumulator element `bit` under keep_bits' mask: keep_scale or 0.
__device__ __forceinline__ float kept_factor(uint32_t kept, int bit, float keep_scale) {
  return (kept >> bit) & 1u ? keep_scale : 0.0f;
}

// Stores the lane's half h (accumulator row quad_row + 8 h) of a 16 x D accumulator `acc`,
// times factor, into out[0, dim) as T.
template <class T, int D>
__device__ __forceinline__ void store_accumulator_row(T* out, const float (&acc)[D / 8][4], int h, int quad_col,
                                                      int64_t dim, float factor) {
  GK_UNROLL
  for (int nd = 0; nd < D / 8; ++nd) {
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * nd + quad_col + e;
      if (col < dim) out[col] = static_cast<T>(acc[nd][2 * h + e] * factor);
    }
  }
}

// S (16 x kCols) += A B^T for one warp, from shared memory by ldmatrix: A the warp's 16 rows at
// `a`, B the kCols rows at `b` (both of row stride kLd), over their first 16 * steps columns.
// Element e of s[nt] is row quad_row + 8 (e / 2), column 8 nt + quad_col + e % 2 of S, where
// quad_row = lane / 4 and quad_col = 2 (lane % 4).
template <class T, int kCols, int kMaxSteps, int kLd>
__device__ __forceinline__ void warp_mma_abt(float (&s)[kCols / 8][4], const T* a, const T* b, int steps, int lane) {
  GK_UNROLL
  for (int ks = 0; ks < kMaxSteps; ++ks) {
    if (ks == steps) break;
    uint32_t fa[4];
    ldmatrix_x4(fa, a + (lane % 16) * kLd + 16 * ks + lane / 16 * 8);
    GK_UNROLL
    for (int nt = 0; nt < kCols / 8; nt += 2) {
      // Matrices: rows nt*8.. of B at columns +0 and +8, then rows (nt+1)*8.. at +0 and +8.
      uint32_t fb[4];
      ldmatrix_x4(fb, b + (8 * nt + lane % 8 + lane / 16 * 8) * kLd + 16 * ks + lane / 8 % 2 * 8);
      const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
      mma_16x8x16<T>(s[nt], fa, b0);
      mma_16x8x16<T>(s[nt + 1], fa, b1);
    }
  }
}

// O (16 x cols) += A B for one warp, A's 16 x 16 piece kk given as its mma fragment a (the
// rows 16 kk.. of B at `b`, row stride kLd, by ldmatrix.trans), over B's first `cols` columns
// (a multiple of 16).
template <class T, int kMaxCols, int kLd>
__device__ __forceinline__ void warp_mma_fragment_b(float (&o)[kMaxCols / 8][4], const uint32_t (&a)[4], const T* b,
                                                    int kk, int cols, int lane) {
  GK_UNROLL
  for (int nd = 0; nd < kMaxCols / 8; nd += 2) {
    if (8 * nd == cols) break;
    // Matrices (transposed): rows 16 kk + 0..7 and + 8..15 of columns 8 nd.., then of 8 (nd + 1)...
    uint32_t fb[4];
    ldmatrix_x4_trans(fb, b + (16 * kk + lane % 16) * kLd + 8 * nd + lane / 16 * 8);
    const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
    mma_16x8x16<T>(o[nd], a, b0);
    mma_16x8x16<T>(o[nd + 1], a, b1);
  }
}

// O (16 x cols) += P B for one warp: P (16 x kK) the accumulators of a warp_mma_abt, rounded to
// T in registers (the accumulator layout is the A-operand layout), B the kK rows at `b` (row
// stride kLd) by ldmatrix.trans, over its first `cols` columns (a multiple of 16).
template <class T, int kK, int kMaxCols, int kLd>
__device__ __forceinline__ void warp_mma_pb(float (&o)[kMaxCols / 8][4], const float (&p)[kK / 8][4], const T* b, int cols,
                                            int lane) {
  GK_UNROLL
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    a[0] = pack<T>(p[2 * kk][0], p[2 * kk][1]);
    a[1] = pack<T>(p[2 * kk][2], p[2 * kk][3]);
    a[2] = pack<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = pack<T>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
    warp_mma_fragment_b<T, kMaxCols, kLd>(o, a, b, kk, cols, lane);
  }
}

// O (16 x cols) += A B for one warp, both from shared memory: A the warp's 16 rows of kK
// columns at `a` (row stride kLdA) by ldmatrix, B as in warp_mma_pb.
template <class T, int kK, int kMaxCols, int kLdA, int kLd>
__device__ __forceinline__ void warp_mma_ab(float (&o)[kMaxCols / 8][4], const T* a, const T* b, int cols, int lane) {
  GK_UNROLL
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t fa[4];
    ldmatrix_x4(fa, a + (lane % 16) * kLdA + 16 * kk + lane / 16 * 8);
    warp_mma_fragment_b<T, kMaxCols, kLd>(o, fa, b, kk, cols, lane);
  }
}

// Walks the key tiles of a block of query rows (the tensor-core kernels): kN keys a tile, K and
// V staged by cp.async into halves sK, sV ([2][kN][kLd]) of a double buffer, the next tile in
// flight while the block works on one. stage_rows() stages the block's own tiles (Q, and dO in
// the backward) with the first; tile(tK, tV, n0) runs for each tile, n0 its first key, once
// every thread's copies of it have landed and before any thread refills its half.
template <int D, int kN, int kLd, class T, class StageRows, class Tile>
__device__ __forceinline__ void for_each_key_tile(const AttentionParams& p, const Plan& plan, const Block& blk, T* sK,
                                                  T* sV, StageRows&& stage_rows, Tile&& tile) {
  const T* const k = static_cast<const T*>(p.k) + blk.b * p.k_stride[0] + blk.hkv * p.k_stride[1];
  const T* const v = static_cast<const T*>(p.v) + blk.b * p.v_stride[0] + blk.hkv * p.v_stride[1];
  const int64_t n_tiles = ceil_div(blk.key_end - blk.key_begin, kN);
  auto stage_kv = [&](int64_t t, int buf) {
    const int64_t n0 = blk.key_begin + t * kN, n = blk.key_end - n0;
    stage_tile<D, true>(sK + buf * kN * kLd, kLd, kN, n, p.dim_qk, pad_to(p.dim_qk, 16), plan.vec_k,
                        [&](int r) { return k + (n0 + r) * p.k_stride[2]; });
    stage_tile<D, true>(sV + buf * kN * kLd, kLd, kN, n, p.dim_v, pad_to(p.dim_v, 16), plan.vec_v,
                        [&](int r) { return v + (n0 + r) * p.v_stride[2]; });
  };
  if (n_tiles > 0) {
    stage_rows();
    stage_kv(0, 0);
  }
  cp_async_commit();
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int buf = int(t % 2);
    if (t + 1 < n_tiles) stage_kv(t + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile t have landed...
    __syncthreads();     // ...and every thread's
    tile(static_cast<const T*>(sK + buf * kN * kLd), static_cast<const T*>(sV + buf * kN * kLd), blk.key_begin + t * kN);
    __syncthreads();  // every warp is done with `buf` before the next iteration refills it
  }
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

}  // namespace
}  // namespace gk
