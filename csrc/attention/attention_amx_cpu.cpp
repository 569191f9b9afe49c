// CPU attention forward for bfloat16 on Intel AMX (Advanced Matrix Extensions). Part of the
// AVX-512 build only (CMakeLists.txt), run where cpu_isa() is Isa::amx.
//
// The algorithm is attention_cpu.cpp's prefill: FlashAttention's online softmax in base 2, tile
// by tile, key tiles outside the band never visited. Here both products of a tile run on the
// tile matrix unit, whose instruction multiplies a 16 x 32 bfloat16 tile A by a 32 x 16 one B
// into a 16 x 16 float32 tile C. B is read in pair-interleaved ("VNNI") form: row r holds, for
// each of the 16 columns n, the two elements B[2r][n], B[2r + 1][n] side by side.
//
// A task is Br = 32 queries of one head, the rows of two tiles, walking key tiles of Bc = 64:
//   S = Q K^T          A: the task's queries as stored; B: K^T, whose pair-interleaved form is
//                      K itself with 32-bit pairs of features transposed (packed per head)
//   u = c S (+ mask)   float32, c = scale log2(e); the online softmax of attention_cpu_tiles.h
//                      turns u into p = 2^(u - m), rescaling O where the maximum m grew
//   O += P V           A: P rounded to bfloat16 (as PyTorch's CPU kernel does); B: V with pairs
//                      of key rows interleaved (packed per head)
// O stays in float32 in memory between tiles, as the rescaling needs it there. Each thread packs
// the keys and values of the head it works on as far as its tasks reach (a task walks one head's
// tiles, and consecutive tasks share the head): O(len_kv x dims) per thread, never O(len_q x len_kv).
#include "attention/attention_cpu_tiles.h"


GK_INTRINSICS_BEGIN
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512bf16")

namespace gk {
namespace GK_ISA {
namespace {

constexpr int64_t kRows = 16;                 // rows of a tile
constexpr int64_t kDepth = 32;                // bfloat16 elements of a tile row: the depth of a product
constexpr int64_t kTileElems = kRows * kDepth;  // 16 x 64 bytes
constexpr int64_t kBr = 2 * kRows;            // queries per task
constexpr int64_t kBc = 64;                   // keys per tile

// Palette 1 with every tile used as 16 rows of 64 bytes. Tile configuration is per thread.
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

void configure_tiles() {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 2 * kDepth;
    config.rows[t] = kRows;
  }
  _tile_loadconfig(&config);
}

// The keys and values of one key/value head in the tiles' B form, packed on demand up to a key.
//   keys:   tile (16-key block kb, feature chunk f) row r, column n: K[16 kb + n][32 f + 2r + {0, 1}]
//   values: tile (32-key chunk kc, 16-feature block vb) row r, column n: V[32 kc + 2r + {0, 1}][16 vb + n]
// Features beyond the head dims and keys beyond kv_len are zero.
class PackedHead {
 public:
  PackedHead(const AttentionParams& p)
      : p_(p),
        chunks_(round_up(p.dim_qk, kDepth) / kDepth),
        blocks_(round_up(p.dim_v, kDepth) / kRows),
        keys_(round_up(p.len_kv, kBc) * chunks_ * kDepth),
        values_(round_up(p.len_kv, kBc) * blocks_ * kRows),
        rows_(kBc * max64(chunks_ * kDepth, blocks_ * kRows)) {}

  int64_t chunks() const { return chunks_; }  // feature chunks of the keys
  int64_t blocks() const { return blocks_; }  // feature blocks of the values, an even number
  // The tiles of 16 keys from key j (a multiple of 16), feature chunk f; of 32 values from key j
  // (a multiple of 32), feature block vb.
  const uint16_t* keys(int64_t j, int64_t f) const { return keys_.get() + (j / kRows * chunks_ + f) * kTileElems; }
  const uint16_t* values(int64_t j, int64_t vb) const {
    return values_.get() + (j / kDepth * blocks_ + vb) * kTileElems;
  }

  // Makes head (b, hk), whose valid keys are [0, kv_len), packed at least up to key `upto`.
  void ensure(int64_t b, int64_t hk, int64_t kv_len, int64_t upto) {
    if (b != b_ || hk != hk_) {
      b_ = b;
      hk_ = hk;
      packed_ = 0;
    }
    for (; packed_ < upto; packed_ += kBc) pack(kv_len, packed_);
  }

 private:
  // Packs keys [j0, j0 + Bc): their rows are first gathered zero-padded (rows_), then rearranged.
  void pack(int64_t kv_len, int64_t j0) {
    const int64_t dk = chunks_ * kDepth, dv = blocks_ * kRows;
    gather(static_cast<const uint16_t*>(p_.k), p_.k_stride, p_.dim_qk, dk, kv_len, j0);
    // A pair of features is one 32-bit word: a key tile is the 16 x 16 transpose of such words.
    const uint32_t* kw = reinterpret_cast<const uint32_t*>(rows_.get());
    const __m512i key_words = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32(static_cast<int>(dk / 2)));
    for (int64_t kb = 0; kb < kBc / kRows; ++kb)
      for (int64_t f = 0; f < chunks_; ++f) {
        uint32_t* tile = reinterpret_cast<uint32_t*>(keys_.get() + ((j0 / kRows + kb) * chunks_ + f) * kTileElems);
        const uint32_t* block = kw + kb * kRows * (dk / 2) + f * kRows;
        for (int64_t r = 0; r < kRows; ++r)
          _mm512_storeu_si512(tile + r * kRows, _mm512_i32gather_epi32(key_words, block + r, 4));
      }
    gather(static_cast<const uint16_t*>(p_.v), p_.v_stride, p_.dim_v, dv, kv_len, j0);
    const uint16_t* vr = rows_.get();
    // Element 2n of a tile row is element n of the even key's row, 2n + 1 that of the odd key's.
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                                21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t kc = 0; kc < kBc / kDepth; ++kc)
      for (int64_t vb = 0; vb < blocks_; ++vb) {
        uint16_t* tile = values_.get() + ((j0 / kDepth + kc) * blocks_ + vb) * kTileElems;
        for (int64_t r = 0; r < kRows; ++r) {
          const uint16_t* even = vr + (kc * kDepth + 2 * r) * dv + vb * kRows;
          const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even))),
                                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + dv)), 1);
          _mm512_storeu_si512(tile + r * kDepth, _mm512_permutexvar_epi16(interleave, both));
        }
      }
  }

  // rows_[jj][0, width) = row j0 + jj of head (b_, hk_) of base, zero past dim and past kv_len.
  void gather(const uint16_t* base, const int64_t* stride, int64_t dim, int64_t width, int64_t kv_len, int64_t j0) {
    const uint16_t* src = base + b_ * stride[0] + hk_ * stride[1];
    for (int64_t jj = 0; jj < kBc; ++jj) {
      uint16_t* row = rows_.get() + jj * width;
      const int64_t n = j0 + jj < kv_len ? dim : 0;
      if (n) std::memcpy(row, src + (j0 + jj) * stride[2], sizeof(uint16_t) * n);
      std::memset(row + n, 0, sizeof(uint16_t) * (width - n));
    }
  }

  const AttentionParams& p_;
  int64_t chunks_, blocks_;
  Buffer<uint16_t> keys_, values_, rows_;
  int64_t b_ = -1, hk_ = -1, packed_ = 0;
};

// s[i][jj] = q_i . k_(j0 + jj) for the 32 queries of q (ldq elements apart) and `count` keys
// from j0 (a multiple of 32), count <= Bc; s's rows are Bc apart.
void tile_scores(const uint16_t* q, int64_t ldq, const PackedHead& kv, int64_t j0, int64_t count, float* s) {
  for (int64_t jc = 0; jc < count; jc += kDepth) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t f = 0; f < kv.chunks(); ++f) {
      _tile_loadd(4, q + f * kDepth, 2 * ldq);
      _tile_loadd(5, q + kRows * ldq + f * kDepth, 2 * ldq);
      _tile_loadd(6, kv.keys(j0 + jc, f), 2 * kDepth);
      _tile_loadd(7, kv.keys(j0 + jc + kRows, f), 2 * kDepth);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* c = s + jc;
    _tile_stored(0, c, 4 * kBc);
    _tile_stored(1, c + kRows, 4 * kBc);
    _tile_stored(2, c + kRows * kBc, 4 * kBc);
    _tile_stored(3, c + kRows * kBc + kRows, 4 * kBc);
  }
}

// o[i] += sum_jj p[i][jj] v_(j0 + jj) for the 32 rows of p (bfloat16, Bc apart) over `count` keys
// from j0, count a multiple of 32 up to Bc; o's rows are ldo apart. Two feature blocks at a time,
// so that the four products of a step are independent (tiles are not renamed: a product waits
// for the last one into its tile).
void tile_values(const uint16_t* p, const PackedHead& kv, int64_t j0, int64_t count, float* o, int64_t ldo) {
  for (int64_t vb = 0; vb < kv.blocks(); vb += 2) {
    float* c = o + vb * kRows;
    _tile_loadd(0, c, 4 * ldo);
    _tile_loadd(1, c + kRows, 4 * ldo);
    _tile_loadd(2, c + kRows * ldo, 4 * ldo);
    _tile_loadd(3, c + kRows * ldo + kRows, 4 * ldo);
    for (int64_t jc = 0; jc < count; jc += kDepth) {
      _tile_loadd(4, p + jc, 2 * kBc);
      _tile_loadd(5, p + kRows * kBc + jc, 2 * kBc);
      _tile_loadd(6, kv.values(j0 + jc, vb), 2 * kDepth);
      _tile_loadd(7, kv.values(j0 + jc, vb + 1), 2 * kDepth);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, 4 * ldo);
    _tile_stored(1, c + kRows, 4 * ldo);
    _tile_stored(2, c + kRows * ldo, 4 * ldo);
    _tile_stored(3, c + kRows * ldo + kRows, 4 * ldo);
  }
}

// ---------------------------------------------------------------- softmax
// The running maximum m of a query may lag its scores by up to kSlack (base 2): the weights
// 2^(u - m) then reach 2^kSlack at most, harmless in float32, and m, with the rescaling of O and
// l it brings, changes only when a score exceeds it by more. Most tiles of a row skip the
// horizontal maximum and the rescaling altogether (FlashAttention's result does not depend on m).
constexpr float kSlack = 8;

__m512 splat16(float x) { return _mm512_set1_ps(x); }

// 2^x for x <= kSlack (and -inf): x = n + f, n = rint(x), 2^f by attention_cpu_tiles.h's
// polynomial, scaled by 2^n in one instruction. Below -150 the result rounds to exactly 0.
__m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, splat16(-150.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 poly = splat16(Exp2Poly<float>::kCoef[0]);
  for (size_t k = 1; k < sizeof Exp2Poly<float>::kCoef / sizeof(float); ++k)
    poly = _mm512_fmadd_ps(poly, f, splat16(Exp2Poly<float>::kCoef[k]));
  return _mm512_scalef_ps(poly, n);
}

// The running state of a task's queries: reference maximum m and per-lane sums of the weights.
struct RowState {
  float m[kBr];
  __m512 l[kBr];
};

// Folds the scores of query r in one key tile, u_j = c row[j] for j < width (a multiple of 32),
// into its state, rescaling its output row o (ldo floats, a multiple of 16) when m moves. The
// weights p_j = 2^(u_j - m) go to w rounded to bfloat16, or, with `keep`, over row in float32.
void softmax_row(float* row, int64_t width, float c, RowState& st, int64_t r, float* o, int64_t ldo, uint16_t* w,
                 bool keep) {
  __m512 mx = _mm512_loadu_ps(row);
  for (int64_t j = kRows; j < width; j += kRows) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + j));
  const __m512 u = _mm512_mul_ps(mx, splat16(c));
  if (_mm512_cmp_ps_mask(u, splat16(st.m[r] + kSlack), _CMP_GT_OQ)) {
    const float m_new = _mm512_reduce_max_ps(u);
    const __m512 a = exp2_16(splat16(st.m[r] - m_new));  // 0 while m is -inf
    st.l[r] = _mm512_mul_ps(st.l[r], a);
    for (int64_t e = 0; e < ldo; e += kRows) _mm512_storeu_ps(o + e, _mm512_mul_ps(_mm512_loadu_ps(o + e), a));
    st.m[r] = m_new;
  }
  // A query with no allowed key so far keeps m = -inf; measuring from 0 then gives p = 0.
  const __m512 scale = splat16(c), shift = splat16(st.m[r] == kMinusInf<float> ? 0.0f : -st.m[r]);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += kDepth) {
    const __m512 p0 = exp2_16(_mm512_fmadd_ps(_mm512_loadu_ps(row + j), scale, shift));
    const __m512 p1 = exp2_16(_mm512_fmadd_ps(_mm512_loadu_ps(row + j + kRows), scale, shift));
    sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
    if (keep) {
      _mm512_storeu_ps(row + j, p0);
      _mm512_storeu_ps(row + j + kRows, p1);
    } else {
      _mm512_storeu_si512(w + j, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0)));
    }
  }
  st.l[r] = _mm512_add_ps(st.l[r], sum);
}

// w[0, width) = row[0, width) rounded to bfloat16, width a multiple of 32.
void round_weights(const float* row, int64_t width, uint16_t* w) {
  for (int64_t j = 0; j < width; j += kDepth) {
    const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + j + kRows), _mm512_loadu_ps(row + j));
    _mm512_storeu_si512(w + j, reinterpret_cast<__m512i>(pair));
  }
}

// out(row) = o / l rounded to bfloat16 and its log-sum-exp; zeros for a query with no key.
// (The conversion instruction rounds to nearest even, like store_as, flushing subnormals.)
void write_row(const AttentionParams& p, int64_t row, const float* o, float m, __m512 lanes) {
  const float l = _mm512_reduce_add_ps(lanes);
  uint16_t* out = static_cast<uint16_t*>(p.out) + row * p.dim_v;
  const __m512 inv = splat16(l > 0 ? 1 / l : 0);
  for (int64_t e = 0; e < p.dim_v; e += kRows) {
    const __mmask16 part = p.dim_v - e >= kRows ? 0xffff : static_cast<__mmask16>((1u << (p.dim_v - e)) - 1);
    const __m256bh x = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + e), inv));
    _mm256_mask_storeu_epi16(out + e, part, reinterpret_cast<__m256i>(x));
  }
  if (p.lse) p.lse[row] = l > 0 ? static_cast<float>(0.69314718055994531 * m + log_of(l)) : 0.0f;
}

// ---------------------------------------------------------------- tasks
void prefill(const AttentionParams& p, int threads) {
  const Attention<Bf16> at(p);
  const int64_t ldq = round_up(p.dim_qk, kDepth), ldo = round_up(p.dim_v, kDepth);
  const int64_t tiles = (p.len_q + kBr - 1) / kBr, heads = p.batch * p.heads_q;
  // A task is every parts-th query tile of a head (from the last, the longest under a causal
  // band): whole heads when there are enough to balance the threads, so that each head's keys
  // and values are packed once.
  const int64_t parts = clamp64((4 * threads + heads - 1) / heads, 1, tiles);
  const float c = at.log2_scale();
  for_each_task(heads * parts, threads, [&](auto&& next) {
    configure_tiles();
    PackedHead kv(p);
    Buffer<uint16_t> q(kBr * ldq), w(kBr * kBc);
    Buffer<float> s(kBr * kBc), o(kBr * ldo);
    RowState st;
    std::memset(q.get(), 0, sizeof(uint16_t) * kBr * ldq);
    for (int64_t item; next(&item);) {
      const int64_t b = item / parts / p.heads_q, h = item / parts % p.heads_q, hk = h / at.group();
      const Band band = at.band(b);
      for (int64_t t = tiles - 1 - item % parts; t >= 0; t -= parts) {
        const int64_t i0 = t * kBr, count = min64(kBr, p.len_q - i0);
        const uint16_t* src =
            static_cast<const uint16_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
        for (int64_t i = 0; i < kBr; ++i) {
          if (i < count)
            std::memcpy(q.get() + i * ldq, src + i * p.q_stride[2], sizeof(uint16_t) * p.dim_qk);
          else
            std::memset(q.get() + i * ldq, 0, sizeof(uint16_t) * ldq);
        }
        // Rows past count take no weights (zero), so their outputs stay finite.
        std::memset(w.get() + count * kBc, 0, sizeof(uint16_t) * (kBr - count) * kBc);
        std::memset(o.get(), 0, sizeof(float) * kBr * ldo);
        for (int64_t i = 0; i < kBr; ++i) {
          st.m[i] = kMinusInf<float>;
          st.l[i] = _mm512_setzero_ps();
        }

        // Key tiles start at multiples of Bc, where the packing's tiles do.
        const int64_t j_end = band.end(i0 + count - 1);
        const int64_t j_first = band.first(i0) / kBc * kBc;
        if (j_first < j_end) kv.ensure(b, hk, band.kv_len, round_up(j_end, kBc));
        for (int64_t j0 = j_first; j0 < j_end; j0 += kBc) {
          const int64_t n = min64(kBc, j_end - j0), width = round_up(n, kDepth);
          tile_scores(q.get(), ldq, kv, j0, width, s.get());
          // Scores past the band's edge, past n or under a mask are made base 2 and masked first.
          const bool masked = p.mask || n < width || !band.covers(i0, i0 + count, j0, j0 + n);
          for (int64_t i = 0; i < count; ++i) {
            float* row = s.get() + i * kBc;
            if (masked) {
              for (int64_t jj = 0; jj < n; ++jj) row[jj] *= c;
              for (int64_t jj = n; jj < width; ++jj) row[jj] = kMinusInf<float>;
              at.mask_scores(band, b, h, i0 + i, j0, n, row, 1);
            }
            softmax_row(row, width, masked ? 1.0f : c, st, i, o.get() + i * ldo, ldo, w.get() + i * kBc, at.dropout());
            if (at.dropout()) {
              at.drop(b, h, i0 + i, j0, n, row, 1);
              round_weights(row, width, w.get() + i * kBc);
            }
          }
          tile_values(w.get(), kv, j0, width, o.get(), ldo);
        }
        for (int64_t i = 0; i < count; ++i)
          write_row(p, (b * p.heads_q + h) * p.len_q + i0 + i, o.get() + i * ldo, st.m[i], st.l[i]);
      }
    }
    _tile_release();
  });
}

}  // namespace

void attention_forward_amx(const AttentionParams& p, int threads) { prefill(p, threads); }

}  // namespace GK_ISA
}  // namespace gk

#pragma GCC pop_options
GK_INTRINSICS_END
