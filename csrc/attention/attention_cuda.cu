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
#include "attention/attention_cuda_tiles.cuh"

namespace gk {
namespace {

constexpr int64_t kDecodeMaxLen = 4;  // len_q up to this takes the split-key decode path
// Split-key sizing: about kDecodeTargetBlocks blocks in all (twice the SMs of an H100), in
// chunks of at least kMinChunk keys so that each block's partial result (dim_v + 1 values)
// stays small beside the chunk's keys and values. The split depends on the sizes only, not on
// the device, so results do not either.
constexpr int64_t kDecodeTargetBlocks = 256;
constexpr int64_t kMinChunk = 64;

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
  // This lane's two rows: quad_row and quad_row + 8 of the warp's 16.
  const Row rows[2] = {row_of(p, plan, blk, 16 * warp + quad_row), row_of(p, plan, blk, 16 * warp + quad_row + 8)};
  float m[2] = {neg_inf<float>(), neg_inf<float>()}, l[2] = {0.0f, 0.0f};
  const DropoutStream drop = attention_dropout(p);
  const float keep_scale = float(dropout_scale(p.dropout_p));
  float o[D / 8][4] = {};

  auto stage_q = [&] {
    stage_tile<D, true>(sQ, kLd, kM, blk.nrows, p.dim_qk, pad_to(p.dim_qk, 16), plan.vec_q,
                        [&](int r) { return q + row_of(p, plan, blk, r).q; });
  };
  for_each_key_tile<D, kN, kLd>(p, plan, blk, sK, sV, stage_q, [&](const T* tK, const T* tV, int64_t n0) {
    // S = Q K^T for the warp's 16 rows: s[nt] is the 16 x 8 block of keys 8 nt .. 8 nt + 7.
    float s[kN / 8][4] = {};
    warp_mma_abt<T, kN, D / 16, kLd>(s, sQ + 16 * warp * kLd, tK, qk_steps, lane);

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

    // Dropout: after the row sums, so that l (and lse) stay those of the scores.
    if (p.seed != nullptr) {
      const uint32_t kept = keep_bits<kN / 8>(drop, [&](int nt, int e) {
        return uint64_t((e < 2 ? rows[0].index : rows[1].index) * p.len_kv + n0 + 8 * nt + quad_col + e % 2);
      });
      GK_UNROLL
      for (int nt = 0; nt < kN / 8; ++nt) {
        GK_UNROLL
        for (int e = 0; e < 4; ++e) s[nt][e] *= kept_factor(kept, 4 * nt + e, keep_scale);
      }
    }

    warp_mma_pb<T, kN, D, kLd>(o, s, tV, v_cols, lane);  // O += P V
  });

  GK_UNROLL
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    if (16 * warp + quad_row + 8 * h >= blk.nrows) continue;
    const int64_t index = row_of(p, plan, blk, 16 * warp + quad_row + 8 * h).index;
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    store_accumulator_row<T, D>(static_cast<T*>(p.out) + index * p.dim_v, o, h, quad_col, p.dim_v, inv);
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
