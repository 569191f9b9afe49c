// CPU attention on Intel AMX (Advanced Matrix Extensions), forward and backward, for bfloat16 and
// for float32 in three bfloat16 parts. Part of the AVX-512 build only (CMakeLists.txt), run where
// cpu_isa() is Isa::amx.
//
// Forward. The algorithm is attention_cpu.cpp's prefill: FlashAttention's online softmax in
// base 2, tile by tile, key tiles outside the band never visited. Here both products of a tile
// run on the tile matrix unit, whose instruction multiplies a 16 x 32 bfloat16 tile A by a
// 32 x 16 one B into a 16 x 16 float32 tile C. B is read in pair-interleaved ("VNNI") form: row r
// holds, for each of the 16 columns n, the two elements B[2r][n], B[2r + 1][n] side by side.
//
// Queries go in tiles of Br = 32 (the rows of two tiles), each walking key tiles of Bc = 64:
//   S = Q K^T          A: the queries as stored; B: K^T, whose pair-interleaved form is K itself
//                      with 32-bit pairs of features transposed (packed per head)
//   u = c S (+ mask)   float32, c = scale log2(e); the online softmax (softmax_row, AVX-512)
//                      turns u into p = 2^(u - m), rescaling O when the maximum m moves
//   O += P V           A: P rounded to bfloat16 (as flash attention does on GPUs), the output
//                      divided by the sum of the rounded weights; B: V with pairs of key rows
//                      interleaved (packed per head)
// O stays in float32 in memory between tiles, as the rescaling needs it there. In float32 the
// softmax of a query tile on a key tile runs between the tile products of the pairs before and
// after it, so that the vector unit works while the tile unit does. A task is a head's
// query tiles (or every few of them when heads are few), and its thread packs the head's keys
// and values as far as the tiles reach: O(len_kv x dims) per thread, never O(len_q x len_kv).
// float32 takes the same path with Q, K, V and P each in three bfloat16 parts and six part
// products in place of each product (see "float32 in three parts"); P is not rounded then, and
// the output is divided by l itself.
//
// Backward. attention_backward_cpu.cpp's algorithm (FlashAttention-2, weights recomputed from the
// saved log-sum-exp) with a task per key/value head and its group, key tiles of 128 outer,
// and every product on the tiles. For a key tile, each query head of the group and each chunk
// of 128 of the queries the band lets see it:
//   for each tile of 32 queries of the chunk:
//     S^T = K Q^T,  dP^T = V dO^T                 (keys x queries, float32)
//     P^T = 2^(c S^T - lse2),  Pd^T = P^T z,  dS^T = P^T (z dP^T - D)   (z: dropout factors)
//                                                 in AVX-512, stored as bfloat16 rows (for dV,
//                                                 dK) and pair-interleaved by keys (for dQ)
//   then, over the chunk's queries at once (a product as deep as the chunk, so the float32
//   accumulators go through memory once per chunk, not once per query tile):
//     dV += Pd^T dO,   dK += dS^T Q,   dQ^T += K^T dS^T
// Q and dO of every query head of the group are packed once per task in both B forms; dQ^T
// accumulates per task and is transposed into dq at its end. Weights and score gradients are
// rounded to bfloat16 for the products (as the forward's P is), or split into three parts for
// float32; accumulation is float32; one writer per gradient element, no atomics.
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

// Element 2n of an interleaved tile row is element n of the even row, 2n + 1 that of the odd row.
__m512i interleave_index() {
  return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
                          19, 3, 18, 2, 17, 1, 16, 0);
}

// Row j of head (b, h) of a (batch, heads, positions, features) tensor of E (bfloat16 bits or
// float).
template <class E = uint16_t>
const E* head_row(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t j) {
  return static_cast<const E*>(base) + b * stride[0] + h * stride[1] + j * stride[2];
}

// The lanes of a vector of 16 that hold elements [e, dim).
__mmask16 lanes_below(int64_t e, int64_t dim) {
  return dim - e >= kRows ? 0xffff : static_cast<__mmask16>((1u << (dim - e)) - 1);
}

// rows[i][0, width) = src row i (ld elements apart) for i < count: zero past dim and from row
// `valid` on.
void gather_rows(const uint16_t* src, int64_t ld, int64_t dim, int64_t valid, int64_t count, int64_t width,
                 uint16_t* rows) {
  for (int64_t i = 0; i < count; ++i) {
    uint16_t* row = rows + i * width;
    const int64_t n = i < valid ? dim : 0;
    if (n) std::memcpy(row, src + i * ld, sizeof(uint16_t) * n);
    std::memset(row + n, 0, sizeof(uint16_t) * (width - n));
  }
}

// ---------------------------------------------------------------- float32 in three parts
// float32 runs on the same tiles split into three bfloat16 parts, x = x1 + x2 + x3 (each part the
// rounding of what the ones before leave: exact for normal numbers), and a product x . y sums the
// six part products down to float32's precision, x1 y1 + x1 y2 + x2 y1 + x1 y3 + x3 y1 + x2 y2
// (the three left out are below 2^-24 |x||y|): the "bf16_6x" scheme of float32 matrix products
// on bfloat16 units. Every part product is exact and accumulates in float32. The products go in
// an order where each shares a part with the one before (14 tile loads for 6 products, not 24).
template <class E>
constexpr int kParts = std::is_same_v<E, float> ? 3 : 1;
// The element type whose Attention (masks, dropout, scale) a kernel of E takes.
template <class E>
using AttentionOf = Attention<std::conditional_t<kParts<E> == 1, Bf16, float>>;

// Which parts of A and B each product of a sum takes, and how far apart the parts lie.
struct Pair {
  int a, b;
};
constexpr Pair kWholePair[1] = {{0, 0}};
constexpr Pair kSixPairs[6] = {{0, 2}, {0, 1}, {1, 1}, {1, 0}, {0, 0}, {2, 0}};
struct Parts {
  const Pair* pairs;
  int count;
  int64_t a_part, b_part;  // elements from one part of A (of B) to the next
};
constexpr Parts kWhole{kWholePair, 1, 0, 0};

template <class E>
Parts parts_of(int64_t a_part, int64_t b_part) {
  if constexpr (kParts<E> == 1) return kWhole;
  return Parts{kSixPairs, 6, a_part, b_part};
}

// 16 bfloat16 values as float32.
__m512 widen(__m256i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)); }

// 16 elements of E from p as float32, lanes outside `lanes` zero.
__m512 load16(const uint16_t* p, __mmask16 lanes) { return widen(_mm256_maskz_loadu_epi16(lanes, p)); }
__m512 load16(const float* p, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, p); }

// part[k * plane, + 16) = the k-th of the three bfloat16 parts of 16 floats x.
void store_parts(__m512 x, uint16_t* part, int64_t plane) {
  for (int k = 0; k < 3; ++k) {
    const __m256i rounded = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(part + k * plane), rounded);
    x = _mm512_sub_ps(x, widen(rounded));
  }
}

// The weights and score gradients are split by truncation instead: each part is the top half of
// what the ones before leave, so the parts sum to x exactly, with a quarter of the instructions
// of rounding. peel returns x's bits (the next part in the high half of each lane) and leaves x
// the rest.
__m512i peel(__m512& x) {
  const __m512i bits = _mm512_castps_si512(x);
  x = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))));
  return bits;
}

// w[k * plane, + 32) = the k-th of three parts of 32 weights (x0: the first 16, x1: the next).
void store_weight_parts(__m512 x0, __m512 x1, uint16_t* w, int64_t plane) {
  const __m512i high_halves = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                               27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  for (int k = 0; k < 3; ++k) {
    const __m512i a = peel(x0), b = peel(x1);
    _mm512_storeu_si512(w + k * plane, _mm512_permutex2var_epi16(a, high_halves, b));
  }
}

// The three parts of 16 weights each of two keys, x0 and x1, pair-interleaved (element 2n from
// x0, 2n + 1 from x1): a 32-bit lane holds x1's part over x0's.
void store_interleaved_parts(__m512 x0, __m512 x1, uint16_t* w, int64_t plane) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int k = 0; k < 3; ++k) {
    const __m512i a = peel(x0), b = peel(x1);
    _mm512_storeu_si512(w + k * plane, _mm512_or_si512(_mm512_and_si512(b, top), _mm512_srli_epi32(a, 16)));
  }
}

// The float32 form of gather_rows: the rows in three parts, `plane` elements apart.
void gather_rows(const float* src, int64_t ld, int64_t dim, int64_t valid, int64_t count, int64_t width,
                 uint16_t* rows, int64_t plane) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = i < valid ? dim : 0;
    for (int64_t e = 0; e < width; e += kRows)
      store_parts(_mm512_maskz_loadu_ps(e < n ? lanes_below(e, n) : 0, src + i * ld + e), rows + i * width + e, plane);
  }
}
void gather_rows(const uint16_t* src, int64_t ld, int64_t dim, int64_t valid, int64_t count, int64_t width,
                 uint16_t* rows, int64_t) {
  gather_rows(src, ld, dim, valid, count, width, rows);
}

// The two B forms of `count` rows of `width` features (rows zero-padded, width a multiple of 32):
//   transposed:  for products with the rows' transpose (S = Q K^T's K). Tile (16-row block rb,
//                feature chunk f) at tiles + (rb * width / 32 + f) tiles, row r, column n:
//                row 16 rb + n, features 32 f + 2r, 2r + 1 (pairs as 32-bit words, transposed)
//   interleaved: for products with the rows themselves (O = P V's V). Tile (32-row chunk rc,
//                feature block fb) at tiles + (rc * width / 16 + fb) tiles, row r, column n:
//                rows 32 rc + 2r, 2r + 1, feature 16 fb + n
void pack_transposed(const uint16_t* rows, int64_t width, int64_t count, uint16_t* tiles) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(rows);
  const int64_t chunks = width / kDepth;
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(width / 2)));
  for (int64_t rb = 0; rb < count / kRows; ++rb)
    for (int64_t f = 0; f < chunks; ++f) {
      uint32_t* tile = reinterpret_cast<uint32_t*>(tiles + (rb * chunks + f) * kTileElems);
      const uint32_t* block = words + rb * kRows * (width / 2) + f * kRows;
      for (int64_t r = 0; r < kRows; ++r)
        _mm512_storeu_si512(tile + r * kRows, _mm512_i32gather_epi32(column, block + r, 4));
    }
}

// out[f][i] = rows[i][f] for `count` rows (a multiple of 16) of `width` features (even): pairs of
// features gathered as 32-bit words from 16 rows at once, then parted into two output rows.
void transpose_rows(const uint16_t* rows, int64_t width, int64_t count, uint16_t* out) {
  const int* words = reinterpret_cast<const int*>(rows);
  const __m512i row = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(static_cast<int>(width / 2)));
  for (int64_t i = 0; i < count; i += kRows)
    for (int64_t f = 0; f < width; f += 2) {
      const __m512i pair = _mm512_i32gather_epi32(row, words + (i * width + f) / 2, 4);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + f * count + i), _mm512_cvtepi32_epi16(pair));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (f + 1) * count + i),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(pair, 16)));
    }
}

void pack_interleaved(const uint16_t* rows, int64_t width, int64_t count, uint16_t* tiles) {
  const int64_t blocks = width / kRows;
  const __m512i interleave = interleave_index();
  for (int64_t rc = 0; rc < count / kDepth; ++rc)
    for (int64_t fb = 0; fb < blocks; ++fb) {
      uint16_t* tile = tiles + (rc * blocks + fb) * kTileElems;
      for (int64_t r = 0; r < kRows; ++r) {
        const uint16_t* even = rows + (rc * kDepth + 2 * r) * width + fb * kRows;
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + width));
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        _mm512_storeu_si512(tile + r * kDepth, _mm512_permutexvar_epi16(interleave, both));
      }
    }
}

// The keys and values (of E) of one key/value head in their B forms (keys transposed, values
// interleaved), each of their kParts<E> parts, packed on demand up to a key. Features beyond the
// head dims and keys beyond kv_len are zero.
template <class E>
class PackedHead {
 public:
  PackedHead(const AttentionParams& p)
      : p_(p),
        dk_(round_up(p.dim_qk, kDepth)),
        dv_(round_up(p.dim_v, kDepth)),
        len_(round_up(p.len_kv, kBc)),
        keys_(kParts<E> * key_part()),
        values_(kParts<E> * value_part()),
        rows_(kParts<E> * row_part()) {}

  int64_t key_part() const { return len_ * dk_; }  // elements from one part of the keys to the next
  int64_t value_part() const { return len_ * dv_; }

  int64_t chunks() const { return dk_ / kDepth; }  // feature chunks of the keys
  int64_t blocks() const { return dv_ / kRows; }   // feature blocks of the values, an even number
  // The tile of 16 keys from key j (a multiple of 16), feature chunk f; of 32 values from key j
  // (a multiple of 32), feature block vb.
  const uint16_t* keys(int64_t j, int64_t f) const { return keys_.get() + (j / kRows * chunks() + f) * kTileElems; }
  const uint16_t* values(int64_t j, int64_t vb) const {
    return values_.get() + (j / kDepth * blocks() + vb) * kTileElems;
  }

  // Makes head (b, hk), whose valid keys are [0, kv_len), packed at least up to key `upto`.
  void ensure(int64_t b, int64_t hk, int64_t kv_len, int64_t upto) {
    if (b != b_ || hk != hk_) {
      b_ = b;
      hk_ = hk;
      packed_ = 0;
    }
    const int64_t plane = row_part();
    for (; packed_ < upto; packed_ += kBc) {
      const int64_t j0 = packed_, valid = kv_len - j0;
      gather_rows(head_row<E>(p_.k, p_.k_stride, b, hk, j0), p_.k_stride[2], p_.dim_qk, valid, kBc, dk_, rows_.get(),
                  plane);
      for (int k = 0; k < kParts<E>; ++k)
        pack_transposed(rows_.get() + k * plane, dk_, kBc, keys_.get() + k * key_part() + j0 * dk_);
      gather_rows(head_row<E>(p_.v, p_.v_stride, b, hk, j0), p_.v_stride[2], p_.dim_v, valid, kBc, dv_, rows_.get(),
                  plane);
      for (int k = 0; k < kParts<E>; ++k)
        pack_interleaved(rows_.get() + k * plane, dv_, kBc, values_.get() + k * value_part() + j0 * dv_);
    }
  }

 private:
  int64_t row_part() const { return kBc * max64(dk_, dv_); }

  const AttentionParams& p_;
  int64_t dk_, dv_, len_;
  Buffer<uint16_t> keys_, values_, rows_;
  int64_t b_ = -1, hk_ = -1, packed_ = 0;
};

// ---------------------------------------------------------------- the micro-kernel
// Nothing to run between tile products.
struct Idle {
  void operator()() const {}
};

// A 32 x 32 block of C (float32, ldc apart: tiles at c, c + 16, c + 16 ldc, c + 16 ldc + 16)
// (+)= sum over `steps` of A (rows 0-15 at a, 16-31 at a + 16 lda; a_step apart) times the B
// tiles b0 (columns 0-15) and b1 (16-31), b_step apart; for each pair of parts of `parts`. Four
// independent products a step: tiles are not renamed, so a product waits for the last one into
// its tile. between() runs after each pair's products: vector work placed there runs while the
// tile unit multiplies.
template <class Between = Idle>
void quad(float* c, int64_t ldc, bool accumulate, int64_t steps, const uint16_t* a, int64_t lda, int64_t a_step,
          const uint16_t* b0, const uint16_t* b1, int64_t b_step, const Parts& parts = kWhole,
          Between&& between = Between{}) {
  float* c1 = c + kRows * ldc;
  if (accumulate) {
    _tile_loadd(0, c, 4 * ldc);
    _tile_loadd(1, c + kRows, 4 * ldc);
    _tile_loadd(2, c1, 4 * ldc);
    _tile_loadd(3, c1 + kRows, 4 * ldc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t t = 0; t < steps; ++t) {
    // A load waits for the products still reading its tile (tiles are not renamed): a part
    // already in the tiles is not loaded again.
    int a_in = -1, b_in = -1;
    for (int k = 0; k < parts.count; ++k) {
      const Pair pair = parts.pairs[k];
      if (pair.a != a_in) {
        const uint16_t* ak = a + pair.a * parts.a_part + t * a_step;
        _tile_loadd(4, ak, 2 * lda);
        _tile_loadd(5, ak + kRows * lda, 2 * lda);
        a_in = pair.a;
      }
      if (pair.b != b_in) {
        const int64_t bk = pair.b * parts.b_part + t * b_step;
        _tile_loadd(6, b0 + bk, 2 * kDepth);
        _tile_loadd(7, b1 + bk, 2 * kDepth);
        b_in = pair.b;
      }
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
      between();
    }
  }
  _tile_stored(0, c, 4 * ldc);
  _tile_stored(1, c + kRows, 4 * ldc);
  _tile_stored(2, c1, 4 * ldc);
  _tile_stored(3, c1 + kRows, 4 * ldc);
}

// s[i][jj] = q_i . k_(j0 + jj) for the 32 queries of q (ldq elements apart, parts 32 ldq apart)
// and `count` keys from j0 (a multiple of 32), count <= Bc; s's rows are Bc apart.
template <class E, class Between>
void tile_scores(const uint16_t* q, int64_t ldq, const PackedHead<E>& kv, int64_t j0, int64_t count, float* s,
                 Between&& between) {
  const Parts parts = parts_of<E>(kBr * ldq, kv.key_part());
  for (int64_t jc = 0; jc < count; jc += kDepth)
    quad(s + jc, kBc, false, kv.chunks(), q, ldq, kDepth, kv.keys(j0 + jc, 0), kv.keys(j0 + jc + kRows, 0), kTileElems,
         parts, between);
}

// o[i] += sum_jj p[i][jj] v_(j0 + jj) for the 32 rows of p (bfloat16, Bc apart, parts 32 Bc
// apart) over `count` keys from j0, count a multiple of 32 up to Bc; o's rows are ldo apart.
template <class E, class Between>
void tile_values(const uint16_t* p, const PackedHead<E>& kv, int64_t j0, int64_t count, float* o, int64_t ldo,
                 Between&& between) {
  const Parts parts = parts_of<E>(kBr * kBc, kv.value_part());
  for (int64_t vb = 0; vb < kv.blocks(); vb += 2)
    quad(o + vb * kRows, ldo, true, count / kDepth, p, kBc, kDepth, kv.values(j0, vb), kv.values(j0, vb + 1),
         kv.blocks() * kTileElems, parts, between);
}

// The number of times tile_scores (tile_values) runs `between` for `count` keys.
template <class E>
int64_t score_pairs(const PackedHead<E>& kv, int64_t count) {
  return count / kDepth * kv.chunks() * parts_of<E>(0, 0).count;
}
template <class E>
int64_t value_pairs(const PackedHead<E>& kv, int64_t count) {
  return kv.blocks() / 2 * (count / kDepth) * parts_of<E>(0, 0).count;
}

// Runs step(i) for the rows i of [0, rows) in order, spread evenly over `calls` calls (the rest
// at finish()): a softmax spread between the products of a tile stream.
template <class Step>
struct RowFeed {
  Step step;
  int64_t rows, calls, called = 0, next = 0;
  void operator()() {
    for (const int64_t upto = ++called * rows / calls; next < upto;) step(next++);
  }
  void finish() {
    while (next < rows) step(next++);
  }
};

// ---------------------------------------------------------------- softmax
// The running maximum m of a query may lag its scores by up to kSlack (base 2): the weights
// 2^(u - m) then reach 2^kSlack at most, harmless in float32, and m, with the rescaling of O and
// l it brings, changes only when a score exceeds it by more. Most tiles of a row skip the
// horizontal maximum and the rescaling altogether (FlashAttention's result does not depend on m).
constexpr float kSlack = 8;

__m512 splat16(float x) { return _mm512_set1_ps(x); }

// 2^x for x <= kSlack (and -inf): x = n + f, n = rint(x), 2^f by attention_cpu_tiles.h's
// polynomial, scaled by 2^n in one instruction. Below -126 the result is 0, as in exp2v: a
// subnormal result would cost a microcode assist (masked keys, at -inf, made causal tiles 1.5x
// slower).
__m512 exp2_16(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, splat16(-126.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, splat16(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 poly = splat16(Exp2Poly<float>::kCoef[0]);
  for (size_t k = 1; k < sizeof Exp2Poly<float>::kCoef / sizeof(float); ++k)
    poly = _mm512_fmadd_ps(poly, f, splat16(Exp2Poly<float>::kCoef[k]));
  return _mm512_maskz_scalef_ps(normal, poly, n);
}

// row[j] = c row[j] for lo <= j < hi and -inf elsewhere, j < width (a multiple of 16): a row of
// scores made base 2 and cut to the band, a vector at a time.
void scale_in_range(float* row, int64_t width, float c, int64_t lo, int64_t hi) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i first = _mm512_set1_epi32(static_cast<int>(clamp64(lo, 0, width)));
  const __m512i end = _mm512_set1_epi32(static_cast<int>(clamp64(hi, 0, width)));
  for (int64_t j = 0; j < width; j += kRows) {
    const __m512i index = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j)));
    const __mmask16 keep = _mm512_cmpge_epi32_mask(index, first) & _mm512_cmplt_epi32_mask(index, end);
    const __m512 scaled = _mm512_mask_mul_ps(splat16(kMinusInf<float>), keep, _mm512_loadu_ps(row + j), splat16(c));
    _mm512_storeu_ps(row + j, scaled);
  }
}

// The running state of a task's queries: reference maximum m and per-lane sums of the weights,
// as computed (l, for the log-sum-exp) and as rounded to bfloat16 for P V (used, to normalise
// the output: the weights P V takes then sum to one, and the rounding errors of the weights
// largely cancel in out = P V / used). In three parts the weights are exact: used is l.
struct RowState {
  float m[kBr];
  __m512 l[kBr], used[kBr];
};

// Folds the scores of query r in one key tile, u_j = c row[j] for j < width (a multiple of 32),
// into its state, rescaling its output row o (ldo floats, a multiple of 16) when m moves. The
// weights p_j = 2^(u_j - m) go to w in P bfloat16 parts (plane elements apart), or, with `keep`,
// over row in float32.
template <int P>
void softmax_row(float* row, int64_t width, float c, RowState& st, int64_t r, float* o, int64_t ldo, uint16_t* w,
                 int64_t plane, bool keep) {
  __m512 mx = _mm512_loadu_ps(row);
  for (int64_t j = kRows; j < width; j += kRows) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + j));
  const __m512 u = _mm512_mul_ps(mx, splat16(c));
  if (_mm512_cmp_ps_mask(u, splat16(st.m[r] + kSlack), _CMP_GT_OQ)) {
    const float m_new = _mm512_reduce_max_ps(u);
    // While m is -inf, l, used and o are still zero: nothing to rescale (reading o back from the
    // tiles' stores would stall).
    if (st.m[r] != kMinusInf<float>) {
      const __m512 a = exp2_16(splat16(st.m[r] - m_new));
      st.l[r] = _mm512_mul_ps(st.l[r], a);
      st.used[r] = _mm512_mul_ps(st.used[r], a);
      for (int64_t e = 0; e < ldo; e += kRows) _mm512_storeu_ps(o + e, _mm512_mul_ps(_mm512_loadu_ps(o + e), a));
    }
    st.m[r] = m_new;
  }
  // A query with no allowed key so far keeps m = -inf; measuring from 0 then gives p = 0.
  const __m512 scale = splat16(c), shift = splat16(st.m[r] == kMinusInf<float> ? 0.0f : -st.m[r]);
  __m512 sum = _mm512_setzero_ps(), used = _mm512_setzero_ps();
  const __m512bh ones = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3f80));
  for (int64_t j = 0; j < width; j += kDepth) {
    const __m512 p0 = exp2_16(_mm512_fmadd_ps(_mm512_loadu_ps(row + j), scale, shift));
    const __m512 p1 = exp2_16(_mm512_fmadd_ps(_mm512_loadu_ps(row + j + kRows), scale, shift));
    sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
    if constexpr (P == 1) {
      const __m512i rounded = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0));
      used = _mm512_dpbf16_ps(used, reinterpret_cast<__m512bh>(rounded), ones);  // pairs of them, times one
      if (!keep) _mm512_storeu_si512(w + j, rounded);
    } else if (!keep) {
      store_weight_parts(p0, p1, w + j, plane);
    }
    if (keep) {
      _mm512_storeu_ps(row + j, p0);
      _mm512_storeu_ps(row + j + kRows, p1);
    }
  }
  st.l[r] = _mm512_add_ps(st.l[r], sum);
  st.used[r] = _mm512_add_ps(st.used[r], used);
}

// w[0, width) = row[0, width) in P bfloat16 parts (plane elements apart), width a multiple of
// 32.
template <int P>
void round_weights(const float* row, int64_t width, uint16_t* w, int64_t plane) {
  for (int64_t j = 0; j < width; j += kDepth) {
    if constexpr (P == 1) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + j + kRows), _mm512_loadu_ps(row + j));
      _mm512_storeu_si512(w + j, reinterpret_cast<__m512i>(pair));
    } else {
      store_weight_parts(_mm512_loadu_ps(row + j), _mm512_loadu_ps(row + j + kRows), w + j, plane);
    }
  }
}

// out[0, dim) = factor * src, as E. Rounded to bfloat16 to nearest even, like store_as, but with
// subnormals flushed to zero (the conversion instruction's rule).
void store_row(uint16_t* out, const float* src, int64_t dim, float factor) {
  for (int64_t e = 0; e < dim; e += kRows) {
    const __mmask16 part = lanes_below(e, dim);
    const __m256bh x = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(part, src + e), splat16(factor)));
    _mm256_mask_storeu_epi16(out + e, part, reinterpret_cast<__m256i>(x));
  }
}
void store_row(float* out, const float* src, int64_t dim, float factor) {
  for (int64_t e = 0; e < dim; e += kRows) {
    const __mmask16 part = lanes_below(e, dim);
    _mm512_mask_storeu_ps(out + e, part, _mm512_mul_ps(_mm512_maskz_loadu_ps(part, src + e), splat16(factor)));
  }
}

// out(row) = o / used (out of E) and the log-sum-exp of m and l; zeros for a query with no key.
template <class E>
void write_row(const AttentionParams& p, int64_t row, const float* o, float m, __m512 l_lanes, __m512 used_lanes) {
  const float l = _mm512_reduce_add_ps(l_lanes), used = kParts<E> == 1 ? _mm512_reduce_add_ps(used_lanes) : l;
  const float factor = used > 0 ? 1 / used : 0;
  store_row(static_cast<E*>(p.out) + row * p.dim_v, o, p.dim_v, factor);
  if (p.lse) p.lse[row] = l > 0 ? static_cast<float>(0.69314718055994531 * m + log_of(l)) : 0.0f;
}

// ---------------------------------------------------------------- forward
// One query tile's pass over one key tile: member g of the group (queries [qi, + rows)), keys
// [j0, + n) of a tile, their scores `width` wide; masked: some scores need masking.
struct Visit {
  int64_t g, j0, qi, rows, n, width;
  bool masked;
};

// Query tiles a task takes at once: a key tile comes from memory for the first and is still in
// the cache for the others. Eight where a head's packed keys and values outgrow a megabyte (half
// a second-level cache here): float32 B1 H16 L4096 causal 85.7 -> 82.0 ms, B2 H8 L4096 168.7 ->
// 158.9 ms against four. Else four: eight left a single head of 512 queries two tasks, and it
// took 0.15 ms instead of 0.12.
constexpr int64_t kMaxGroup = 8;
constexpr int64_t kGroupCacheBytes = int64_t(1) << 20;

// E: the elements of q, k, v and out, bfloat16 bits or float.
template <class E>
void prefill(const AttentionParams& p, int threads) {
  constexpr int P = kParts<E>;
  const AttentionOf<E> at(p);
  const int64_t ldq = round_up(p.dim_qk, kDepth), ldo = round_up(p.dim_v, kDepth);
  const int64_t packed_bytes = 2 * P * round_up(p.len_kv, kBc) * (ldq + ldo);
  const int64_t group_tiles = packed_bytes > kGroupCacheBytes ? kMaxGroup : kMaxGroup / 2;
  const int64_t tiles = (p.len_q + kBr - 1) / kBr, groups = (tiles + group_tiles - 1) / group_tiles;
  const int64_t heads = p.batch * p.heads_q;
  // A task is every parts-th group of query tiles of a head (from the last, the longest under a
  // causal band): whole heads when there are enough to balance the threads, so that each head's
  // keys and values are packed once.
  const int64_t parts = clamp64((4 * threads + heads - 1) / heads, 1, groups);
  const float c = at.log2_scale();
  for_each_task(heads * parts, threads, [&](auto&& next) {
    configure_tiles();
    PackedHead<E> kv(p);
    const int64_t q_part = kBr * ldq, w_part = kBr * kBc;
    Buffer<uint16_t> q(group_tiles * P * q_part), w(2 * P * w_part);  // two buffers each of weights
    Buffer<float> s(2 * kBr * kBc), o(group_tiles * kBr * ldo);         // and scores
    RowState st[kMaxGroup];
    for (int64_t item; next(&item);) {
      const int64_t b = item / parts / p.heads_q, h = item / parts % p.heads_q, hk = h / at.group();
      const Band band = at.band(b);
      for (int64_t group = groups - 1 - item % parts; group >= 0; group -= parts) {
        const int64_t t0 = group * group_tiles, members = min64(group_tiles, tiles - t0);
        // Tile g: queries [i0(g), + count(g)), output rows at o + g 32 ldo, keys from first(g)
        // (a multiple of Bc, where the packing's tiles start) to end(g).
        auto i0 = [&](int64_t g) { return (t0 + g) * kBr; };
        auto count = [&](int64_t g) { return min64(kBr, p.len_q - i0(g)); };
        auto first = [&](int64_t g) { return band.first(i0(g)) / kBc * kBc; };
        auto end = [&](int64_t g) { return band.end(i0(g) + count(g) - 1); };
        int64_t j_first = first(0), j_end = end(0);
        for (int64_t g = 0; g < members; ++g) {
          gather_rows(head_row<E>(p.q, p.q_stride, b, h, i0(g)), p.q_stride[2], p.dim_qk, count(g), kBr, ldq,
                      q.get() + g * P * q_part, q_part);
          std::memset(o.get() + g * kBr * ldo, 0, sizeof(float) * kBr * ldo);
          for (int64_t i = 0; i < kBr; ++i) {
            st[g].m[i] = kMinusInf<float>;
            st[g].l[i] = st[g].used[i] = _mm512_setzero_ps();
          }
          j_first = min64(j_first, first(g));
          j_end = max64(j_end, end(g));
        }
        if (j_first < j_end) kv.ensure(b, hk, band.kv_len, round_up(j_end, kBc));
        // The sweep visits the members' key tiles key tile by key tile, each visit in three
        // stages: scores (tile unit), softmax (vector unit), values (tile unit). In float32 round
        // r runs the softmax of visit r - 1 spread between the products of visit r - 2's values
        // and visit r's scores, so that both units work at once (scores and weights alternate
        // between two buffers); the softmax rescales its member's O rows, so it waits for the
        // values of visit r - 2 when both are of the same member. bfloat16, whose softmax
        // outweighs its products, runs the stages of a visit in turn (measured faster).
        constexpr int64_t lag = P > 1 ? 1 : 0;
        auto visit = [&](int64_t g, int64_t j0) {
          const int64_t qi = i0(g), rows = count(g), n = min64(kBc, end(g) - j0), width = round_up(n, kDepth);
          // Scores past the band's edge, past n or under a mask are made base 2 and masked first.
          const bool masked = p.mask || n < width || !band.covers(qi, qi + rows, j0, j0 + n);
          return Visit{g, j0, qi, rows, n, width, masked};
        };
        auto in_band = [&](int64_t g, int64_t j0) { return j0 >= first(g) && j0 < end(g); };
        auto after = [&](const Visit& v) {  // the sweep's next visit; its j0 is j_end past the last
          int64_t g = v.g, j0 = v.j0;
          do {
            if (++g == members) g = 0, j0 += kBc;
          } while (j0 < j_end && !in_band(g, j0));
          return visit(g, j0);
        };
        auto scores_of = [&](int64_t r) { return s.get() + (r & 1) * kBr * kBc; };
        auto weights_of = [&](int64_t r) { return w.get() + (r & 1) * P * w_part; };
        auto output_of = [&](const Visit& v) { return o.get() + v.g * kBr * ldo; };
        auto values = [&](const Visit& v, int64_t r, auto&& between) {
          tile_values(weights_of(r), kv, v.j0, v.width, output_of(v), ldo, between);
        };
        // Visits r, r - 1 and r - 2 of round r, where they exist.
        Visit ahead = visit(0, j_first), last = ahead, before_last = ahead;
        if (!in_band(0, j_first)) ahead = after(ahead);
        bool has_last = false, has_before_last = false;
        for (int64_t r = 0; ahead.j0 < j_end || has_last || has_before_last; ++r) {
          const bool has_ahead = ahead.j0 < j_end;
          const Visit& v = lag ? last : ahead;  // the softmax's visit
          const bool has_softmax = lag ? has_last : has_ahead;
          const bool apart = !(has_softmax && has_before_last && v.g == before_last.g);
          float* sv = scores_of(r - lag);
          uint16_t* wv = weights_of(r - lag);
          auto softmax = [&](int64_t i) {
            float* row = sv + i * kBc;
            if (v.masked) {
              scale_in_range(row, v.width, c, band.first(v.qi + i) - v.j0, min64(band.end(v.qi + i) - v.j0, v.n));
              if (p.mask) at.mask_scores(band, b, h, v.qi + i, v.j0, v.n, row, 1);
            }
            softmax_row<P>(row, v.width, v.masked ? 1.0f : c, st[v.g], i, output_of(v) + i * ldo, ldo, wv + i * kBc,
                           w_part, at.dropout());
            if (at.dropout()) {
              at.drop(b, h, v.qi + i, v.j0, v.n, row, 1);
              round_weights<P>(row, v.width, wv + i * kBc, w_part);
            }
          };
          const int64_t calls = (has_before_last && apart ? value_pairs(kv, before_last.width) : 0) +
                                (lag && has_ahead ? score_pairs(kv, ahead.width) : 0);
          RowFeed<decltype(softmax)> feed{softmax, has_softmax ? v.rows : 0, max64(calls, 1)};
          // Rows past count take no weights (zero), so their outputs stay finite.
          for (int k = 0; k < P && has_softmax && v.rows < kBr; ++k)
            std::memset(wv + k * w_part + v.rows * kBc, 0, sizeof(uint16_t) * (kBr - v.rows) * kBc);
          if (has_before_last) {
            if (apart)
              values(before_last, r - 2, feed);
            else
              values(before_last, r - 2, Idle{});
          }
          if (has_ahead) {
            const uint16_t* qa = q.get() + ahead.g * P * q_part;
            if (lag)
              tile_scores(qa, ldq, kv, ahead.j0, ahead.width, scores_of(r), feed);
            else
              tile_scores(qa, ldq, kv, ahead.j0, ahead.width, scores_of(r), Idle{});
          }
          feed.finish();
          if (!lag && has_ahead) values(ahead, r, Idle{});
          before_last = last;
          has_before_last = lag && has_last;
          last = ahead;
          has_last = has_ahead;
          if (has_ahead) ahead = after(ahead);
        }
        for (int64_t g = 0; g < members; ++g)
          for (int64_t i = 0; i < count(g); ++i)
            write_row<E>(p, (b * p.heads_q + h) * p.len_q + i0(g) + i, o.get() + (g * kBr + i) * ldo, st[g].m[i],
                         st[g].l[i], st[g].used[i]);
      }
    }
    _tile_release();
  });
}

// ---------------------------------------------------------------- backward
// One query head's operands, packed once per task (len_qp = len_q rounded up to 32 queries):
// Q and dO in both B forms (each in its parts, a part's size apart), log2(e) lse (+inf past
// len_q, so weights vanish), D (0 past len_q) and the float32 accumulator of dQ^T (dk rows).
struct QueryPack {
  uint16_t *q_t, *q_i, *do_t, *do_i;
  float *lse2, *delta, *dqt;
};

// Keys per backward tile: the dQ^T accumulators of the query range pass through memory once per
// key tile. Queries per chunk of a key tile: the weights and score gradients of a chunk, and the
// chunk's packed queries, stay in the second-level cache between the products that make and take
// them; the dK and dV accumulators pass through memory once per chunk.
constexpr int64_t kKeys = 128;
constexpr int64_t kChunk = 128;

// E: the elements of q, k, v, out, dout and the gradients, bfloat16 bits or float; float32 goes
// in three parts, as in the forward.
template <class E>
class Backward {
  static constexpr int P = kParts<E>;

 public:
  Backward(const AttentionBackwardParams& bp)
      : bp_(bp),
        p_(bp.fwd),
        at_(bp.fwd),
        group_(at_.group()),
        len_qp_(round_up(p_.len_q, kBr)),
        ldw_(kChunk + kDepth),
        lddq_(len_qp_ + kRows),
        dk_(round_up(p_.dim_qk, kDepth)),
        dv_(round_up(p_.dim_v, kDepth)) {}

  void run(int threads) const {
    const int64_t heads = p_.batch * p_.heads_kv, key_tiles = (p_.len_kv + kKeys - 1) / kKeys;
    // As in attention_backward_cpu.cpp: with fewer key/value heads than threads, the key tiles of a
    // head are dealt round-robin to `splits` tasks, whose dQ parts are summed in task order.
    const int64_t splits = heads < threads ? clamp64((threads + heads - 1) / heads, 1, max64(key_tiles, 1)) : 1;
    const int64_t part = group_ * p_.len_q * p_.dim_qk;
    Buffer<float> dq_parts(splits > 1 ? heads * splits * part : 0);
    const int64_t pack_u16 = 2 * P * len_qp_ * (dk_ + dv_), pack_f32 = 2 * len_qp_ + dk_ * lddq_;
    const float scale = static_cast<float>(p_.scale);
    for_each_task(heads * splits, threads, [&](auto&& next) {
      configure_tiles();
      Buffer<uint16_t> packs_u16(group_ * pack_u16), rows(P * len_qp_ * max64(dk_, dv_));
      Buffer<float> packs_f32(group_ * pack_f32);
      Buffer<uint16_t> k(P * kKeys * dk_), v(P * kKeys * dv_), kt(P * dk_ * kKeys), pt(P * kKeys * ldw_),
          dst(P * kKeys * ldw_), dsv(P * kKeys * kChunk);
      Buffer<float> s(kKeys * kBr), dp(kKeys * kBr), drop(kKeys * kBr), dk(kKeys * dk_), dv(kKeys * dv_), dq_row(dk_);
      for (int64_t item; next(&item);) {
        const int64_t bh = item / splits, split = item % splits, b = bh / p_.heads_kv, hk = bh % p_.heads_kv;
        auto pack_of = [&](int64_t g) {
          uint16_t* x = packs_u16.get() + g * pack_u16;
          float* y = packs_f32.get() + g * pack_f32;
          return QueryPack{x, x + P * len_qp_ * dk_, x + 2 * P * len_qp_ * dk_, x + P * len_qp_ * (2 * dk_ + dv_),
                           y, y + len_qp_, y + 2 * len_qp_};
        };
        for (int64_t g = 0; g < group_; ++g) pack(b, hk * group_ + g, pack_of(g), rows.get());
        for (int64_t j0 = split * kKeys; j0 < p_.len_kv; j0 += splits * kKeys) {
          const int64_t n = min64(kKeys, p_.len_kv - j0);
          gather_rows(head_row<E>(p_.k, p_.k_stride, b, hk, j0), p_.k_stride[2], p_.dim_qk, n, kKeys, dk_, k.get(),
                      kKeys * dk_);
          gather_rows(head_row<E>(p_.v, p_.v_stride, b, hk, j0), p_.v_stride[2], p_.dim_v, n, kKeys, dv_, v.get(),
                      kKeys * dv_);
          for (int kp = 0; kp < P; ++kp)
            transpose_rows(k.get() + kp * kKeys * dk_, dk_, kKeys, kt.get() + kp * dk_ * kKeys);
          std::memset(dk.get(), 0, sizeof(float) * kKeys * dk_);
          std::memset(dv.get(), 0, sizeof(float) * kKeys * dv_);
          for (int64_t g = 0; g < group_; ++g) {
            const Tile tile{b, hk * group_ + g, j0, n, k.get(), v.get(), kt.get()};
            const Scratch scratch{s.get(), dp.get(), drop.get(), pt.get(), dst.get(), dsv.get(), dk.get(), dv.get()};
            key_tile(tile, pack_of(g), scratch);
          }
          const int64_t row0 = bh * p_.len_kv + j0;
          for (int64_t jj = 0; jj < n; ++jj) {
            store_row(static_cast<E*>(bp_.dk) + (row0 + jj) * p_.dim_qk, dk.get() + jj * dk_, p_.dim_qk, scale);
            store_row(static_cast<E*>(bp_.dv) + (row0 + jj) * p_.dim_v, dv.get() + jj * dv_, p_.dim_v, 1.0f);
          }
        }
        // dQ = scale (dQ^T)^T: into dq, or into this task's part.
        for (int64_t g = 0; g < group_; ++g) {
          const float* dqt = pack_of(g).dqt;
          const int64_t row0 = (b * p_.heads_q + hk * group_ + g) * p_.len_q;
          for (int64_t i = 0; i < p_.len_q; ++i) {
            float* row = splits > 1 ? dq_parts.get() + item * part + (g * p_.len_q + i) * p_.dim_qk : dq_row.get();
            for (int64_t e = 0; e < p_.dim_qk; ++e) row[e] = dqt[e * lddq_ + i];
            if (splits == 1) store_row(static_cast<E*>(bp_.dq) + (row0 + i) * p_.dim_qk, row, p_.dim_qk, scale);
          }
        }
      }
      _tile_release();
    });
    if (splits == 1) return;
    parallel_for(heads * group_ * p_.len_q, 64, threads, [&](int64_t begin, int64_t end) {
      Buffer<float> sum(p_.dim_qk);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bh = row / (group_ * p_.len_q), r = row % (group_ * p_.len_q);
        std::memset(sum.get(), 0, sizeof(float) * p_.dim_qk);
        for (int64_t split = 0; split < splits; ++split) {
          const float* x = dq_parts.get() + (bh * splits + split) * part + r * p_.dim_qk;
          for (int64_t e = 0; e < p_.dim_qk; ++e) sum.get()[e] += x[e];
        }
        const int64_t out_row = (bh / p_.heads_kv * p_.heads_q + bh % p_.heads_kv * group_) * p_.len_q + r;
        store_row(static_cast<E*>(bp_.dq) + out_row * p_.dim_qk, sum.get(), p_.dim_qk, scale);
      }
    });
  }

 private:
  // A key tile of head (b, hk) seen from query head h: keys [j0, j0 + n) as rows of k and v
  // (kKeys x dk, kKeys x dv, zero-padded) and kt = k^T (dk x kKeys), each in its parts.
  struct Tile {
    int64_t b, h, j0, n;
    const uint16_t *k, *v, *kt;
  };
  // Per-thread buffers: s, dp, drop (kKeys x 32 float32: S^T, dP^T, dropout factors of a query
  // tile); pt, dst (kKeys rows of bfloat16, ldw_ apart: Pd^T, dS^T of a chunk's queries) and dsv
  // (the chunk's dS^T interleaved by key pairs), each in its parts; the key tile's dk and dv
  // accumulators.
  struct Scratch {
    float *s, *dp, *drop;
    uint16_t *pt, *dst, *dsv;
    float *dk, *dv;
  };

  // Packs query head (b, h); zeroes its dQ^T.
  void pack(int64_t b, int64_t h, const QueryPack& pq, uint16_t* rows) const {
    constexpr float kLog2e = 1.4426950408889634074f;
    const int64_t row0 = (b * p_.heads_q + h) * p_.len_q, plane = len_qp_ * max64(dk_, dv_);
    gather_rows(head_row<E>(p_.q, p_.q_stride, b, h, 0), p_.q_stride[2], p_.dim_qk, p_.len_q, len_qp_, dk_, rows, plane);
    for (int k = 0; k < P; ++k) {
      pack_transposed(rows + k * plane, dk_, len_qp_, pq.q_t + k * len_qp_ * dk_);
      pack_interleaved(rows + k * plane, dk_, len_qp_, pq.q_i + k * len_qp_ * dk_);
    }
    const E* dout = head_row<E>(bp_.dout, bp_.dout_stride, b, h, 0);
    gather_rows(dout, bp_.dout_stride[2], p_.dim_v, p_.len_q, len_qp_, dv_, rows, plane);
    for (int k = 0; k < P; ++k) {
      pack_transposed(rows + k * plane, dv_, len_qp_, pq.do_t + k * len_qp_ * dv_);
      pack_interleaved(rows + k * plane, dv_, len_qp_, pq.do_i + k * len_qp_ * dv_);
    }
    const E* out = static_cast<const E*>(p_.out) + row0 * p_.dim_v;
    for (int64_t i = 0; i < len_qp_; ++i) {
      if (i >= p_.len_q) {
        pq.lse2[i] = __builtin_inff();
        pq.delta[i] = 0;
        continue;
      }
      __m512 dot = _mm512_setzero_ps();
      for (int64_t e = 0; e < p_.dim_v; e += kRows) {
        const __mmask16 part = lanes_below(e, p_.dim_v);
        dot = _mm512_fmadd_ps(load16(dout + i * bp_.dout_stride[2] + e, part), load16(out + i * p_.dim_v + e, part), dot);
      }
      const float delta = _mm512_reduce_add_ps(dot);
      pq.lse2[i] = kLog2e * p_.lse[row0 + i];
      pq.delta[i] = delta - (bp_.dlse ? bp_.dlse[row0 + i] : 0.0f);
    }
    std::memset(pq.dqt, 0, sizeof(float) * dk_ * lddq_);
  }

  // The contributions of query head t.h to key tile t: into the dk, dv accumulators and the
  // head's dQ^T.
  void key_tile(const Tile& t, const QueryPack& pq, const Scratch& x) const {
    const Band band = at_.band(t.b);
    const int64_t ia = clamp64(band.first_query(t.j0), 0, p_.len_q);
    const int64_t ib = clamp64(band.end_query(t.j0 + t.n - 1), 0, p_.len_q);
    if (ia >= ib) return;
    const int64_t qa = ia / kBr * kBr, qb = round_up(ib, kBr), width = round_up(t.n, kDepth);
    const int64_t vblocks = dv_ / kRows, kblocks = dk_ / kRows, cblocks = kChunk / kRows;
    const Parts pd_do = parts_of<E>(kKeys * ldw_, len_qp_ * dv_), ds_q = parts_of<E>(kKeys * ldw_, len_qp_ * dk_);
    const Parts k_ds = parts_of<E>(dk_ * kKeys, kKeys * kChunk);
    for (int64_t c0 = qa; c0 < qb; c0 += kChunk) {
      const int64_t c1 = min64(qb, c0 + kChunk), steps = (c1 - c0) / kDepth;
      for (int64_t i0 = c0; i0 < c1; i0 += kBr) query_tile(t, pq, x, band, i0, c0);
      for (int64_t kb = 0; kb < width; kb += kDepth) {
        for (int64_t vb = 0; vb < vblocks; vb += 2) {
          const uint16_t* b0 = pq.do_i + (c0 / kDepth * vblocks + vb) * kTileElems;
          quad(x.dv + kb * dv_ + vb * kRows, dv_, true, steps, x.pt + kb * ldw_, ldw_, kDepth, b0, b0 + kTileElems,
               vblocks * kTileElems, pd_do);
        }
        for (int64_t fb = 0; fb < kblocks; fb += 2) {
          const uint16_t* b0 = pq.q_i + (c0 / kDepth * kblocks + fb) * kTileElems;
          quad(x.dk + kb * dk_ + fb * kRows, dk_, true, steps, x.dst + kb * ldw_, ldw_, kDepth, b0, b0 + kTileElems,
               kblocks * kTileElems, ds_q);
        }
      }
      for (int64_t fb = 0; fb < kblocks; fb += 2) {
        for (int64_t i = c0 / kRows; i < c1 / kRows; i += 2) {
          const uint16_t* b0 = x.dsv + (i - c0 / kRows) * kTileElems;
          quad(pq.dqt + fb * kRows * lddq_ + i * kRows, lddq_, true, width / kDepth, t.kt + fb * kRows * kKeys, kKeys,
               kDepth, b0, b0 + kTileElems, cblocks * kTileElems, k_ds);
        }
      }
    }
  }

  // Queries [i0, i0 + 32) against key tile t: their columns of Pd^T, dS^T and its interleaved
  // form (within the chunk from query c0), and of dbias.
  void query_tile(const Tile& t, const QueryPack& pq, const Scratch& x, const Band& band, int64_t i0, int64_t c0) const {
    const int64_t count = min64(kBr, p_.len_q - i0), width = round_up(t.n, kDepth);
    const Parts k_q = parts_of<E>(kKeys * dk_, len_qp_ * dk_), v_do = parts_of<E>(kKeys * dv_, len_qp_ * dv_);
    for (int64_t kc = 0; kc < width; kc += kDepth) {
      const uint16_t* qt = pq.q_t + i0 / kRows * (dk_ / kDepth) * kTileElems;
      quad(x.s + kc * kBr, kBr, false, dk_ / kDepth, t.k + kc * dk_, dk_, kDepth, qt, qt + dk_ / kDepth * kTileElems,
           kTileElems, k_q);
      const uint16_t* dot = pq.do_t + i0 / kRows * (dv_ / kDepth) * kTileElems;
      quad(x.dp + kc * kBr, kBr, false, dv_ / kDepth, t.v + kc * dv_, dv_, kDepth, dot, dot + dv_ / kDepth * kTileElems,
           kTileElems, v_do);
    }
    // Scores past the band's edge, past n or under a mask are made base 2 and masked first.
    const float c = at_.log2_scale();
    const bool masked = p_.mask || t.n < width || !band.covers(i0, i0 + count, t.j0, t.j0 + t.n);
    if (masked) {
      for (int64_t jj = 0; jj < width; ++jj) {
        const int64_t j = t.j0 + jj;
        scale_in_range(x.s + jj * kBr, kBr, c, jj < t.n ? band.first_query(j) - i0 : 0,
                       jj < t.n ? band.end_query(j) - i0 : 0);
      }
      if (p_.mask) {
        for (int64_t i = 0; i < count; ++i) at_.mask_scores(band, t.b, t.h, i0 + i, t.j0, t.n, x.s + i, kBr);
      }
    }
    const bool dropout = at_.dropout(), dbias = bp_.dbias != nullptr;
    if (dropout) {
      for (int64_t e = 0; e < width * kBr; ++e) x.drop[e] = 1;
      for (int64_t i = 0; i < count; ++i) at_.drop(t.b, t.h, i0 + i, t.j0, t.n, x.drop + i, kBr);
    }
    const __m512 scale = splat16(masked ? 1.0f : c);
    const __m512i interleave = interleave_index();
    const __m512 lse2[2] = {_mm512_loadu_ps(pq.lse2 + i0), _mm512_loadu_ps(pq.lse2 + i0 + kRows)};
    const __m512 delta[2] = {_mm512_loadu_ps(pq.delta + i0), _mm512_loadu_ps(pq.delta + i0 + kRows)};
    const int64_t row_part = kKeys * ldw_, pair_part = kKeys * kChunk;
    for (int64_t jj = 0; jj < width; jj += 2) {
      __m512 ds[2][2];  // [key jj + r][query half]
      for (int64_t r = 0; r < 2; ++r) {
        __m512 w[2];
        for (int64_t half = 0; half < 2; ++half) {
          const int64_t e = (jj + r) * kBr + half * kRows;
          const __m512 p = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(x.s + e), scale, lse2[half]));
          __m512 dpv = _mm512_loadu_ps(x.dp + e);
          w[half] = p;
          if (dropout) {
            const __m512 z = _mm512_loadu_ps(x.drop + e);
            dpv = _mm512_mul_ps(dpv, z);
            w[half] = _mm512_mul_ps(p, z);
          }
          ds[r][half] = _mm512_mul_ps(p, _mm512_sub_ps(dpv, delta[half]));
          if (dbias) _mm512_storeu_ps(x.dp + e, ds[r][half]);
        }
        const int64_t row = (jj + r) * ldw_ + i0 - c0;
        if constexpr (P == 1) {
          _mm512_storeu_si512(x.pt + row, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w[1], w[0])));
          _mm512_storeu_si512(x.dst + row, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(ds[r][1], ds[r][0])));
        } else {
          store_weight_parts(w[0], w[1], x.pt + row, row_part);
          store_weight_parts(ds[r][0], ds[r][1], x.dst + row, row_part);
        }
      }
      // Key pair (jj, jj + 1) is row (jj mod 32) / 2 of the tiles of key chunk jj / 32.
      for (int64_t half = 0; half < 2; ++half) {
        uint16_t* tile = x.dsv + (jj / kDepth * (kChunk / kRows) + (i0 - c0) / kRows + half) * kTileElems +
                         jj % kDepth / 2 * kDepth;
        if constexpr (P == 1) {
          const __m512i pair = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(ds[1][half], ds[0][half]));
          _mm512_storeu_si512(tile, _mm512_permutexvar_epi16(interleave, pair));
        } else {
          store_interleaved_parts(ds[0][half], ds[1][half], tile, pair_part);
        }
      }
    }
    if (dbias) {
      float* db = bp_.dbias + ((t.b * p_.heads_q + t.h) * p_.len_q + i0) * p_.len_kv + t.j0;
      for (int64_t i = 0; i < count; ++i)
        for (int64_t jj = 0; jj < t.n; ++jj) db[i * p_.len_kv + jj] = x.dp[jj * kBr + i];
    }
  }

  const AttentionBackwardParams& bp_;
  const AttentionParams& p_;
  const AttentionOf<E> at_;
  // Rows of the weights (ldw_, bfloat16) and of dQ^T (lddq_, float32) are padded by a cache line:
  // rows 4 KiB apart would share the first-level cache's sets.
  int64_t group_, len_qp_, ldw_, lddq_, dk_, dv_;
};

}  // namespace

void attention_forward_amx(const AttentionParams& p, int threads) {
  if (p.dtype == DType::f32) return prefill<float>(p, threads);
  prefill<uint16_t>(p, threads);
}
void attention_backward_amx(const AttentionBackwardParams& bp, int threads) {
  if (bp.fwd.dtype == DType::f32) return Backward<float>(bp).run(threads);
  Backward<uint16_t>(bp).run(threads);
}

}  // namespace GK_ISA
}  // namespace gk

#pragma GCC pop_options
GK_INTRINSICS_END
