// CPU kernels for scaled dot-product attention, forward. Compiled once per instruction set
// (common/cpu_isa.h).
//
// FlashAttention (Dao et al., 2022) in base 2. With c = scale * log2(e), the scores of query i are
//   u_ij = c q_i . k_j + log2(e) bias_ij          (u_ij = -inf for a key the query may not see)
// and the query visits its keys tile by tile, keeping a running maximum m_i, sum l_i and output o_i:
//   m_i' = max(m_i, max_j u_ij),   alpha_i = 2^(m_i - m_i'),   p_ij = 2^(u_ij - m_i'),
//   l_i' = alpha_i l_i + sum_j p_ij,   o_i' = alpha_i o_i + sum_j p_ij v_j,
// finishing with out_i = o_i / l_i and lse_i = ln(2) (m_i + log2 l_i). o_i is rescaled only when
// m_i grows. The len_q x len_kv matrix never exists: each thread holds one tile of scores. Key
// tiles wholly outside the band or beyond kv_len are never visited; only tiles across the band's
// edge mask single scores.
//
// Both products are one register-blocked micro-kernel, C += A B, which broadcasts elements of A
// against whole vectors of B (rows of B are contiguous, those of A may have any stride).
//
// Prefill: a task is one tile of Br queries of one head. The scores are kept transposed, S^T
// (Bc keys x Br queries), so that S^T = K Q^T broadcasts the keys, read in place, against the
// queries packed once per task, and the softmax runs down the columns of S^T with the queries
// along the lanes. O (Br x dim_v) += P V then broadcasts P against rows of V, read in place.
// Tiles across the band's edge go in blocks of one vector of keys or queries, skipping the
// blocks outside the band.
//
// Decode (len_q <= kDecodeMaxLen): memory bound, so a task is one key/value head with all its
// query heads (the rows) over a range of keys, reading K and V once. Scores are dot products
// along the feature dimension, kept row by row so that the softmax runs along the keys. When the
// heads cannot keep every thread busy, the keys are split and the partial results (m_s, l_s, o_s)
// of each row are merged in a fixed order:
//   m = max_s m_s,   l = sum_s 2^(m_s - m) l_s,   o = sum_s 2^(m_s - m) o_s.
#include <math.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

#include "attention/attention.h"
#include "common/cpu_intrinsics.h"
#include "common/cpu_memory.h"
#include "common/hostdevice.h"
#include "common/parallel.h"
#include "common/portable_math.h"

namespace gk {
namespace GK_ISA {
namespace {

// ---------------------------------------------------------------- vectors
// GCC vector extensions of the instruction set's width; kMr x kNr is the micro-kernel's block
// of accumulators (rows of A x vectors of B), sized to the register file.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMr = 6, kNr = 4;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
constexpr int kMr = 6, kNr = 2;
#else
constexpr int kVecBytes = 16;
constexpr int kMr = 6, kNr = 2;
#endif

template <class A, int Bytes>
struct VecOf {
  typedef A type __attribute__((vector_size(Bytes)));
};
template <class A, int Bytes = kVecBytes>
using Vec = typename VecOf<A, Bytes>::type;
// Integers of the same width as A: comparison results and exponent bits.
template <class A>
using Int = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;
template <class A>
constexpr int kLanes = kVecBytes / sizeof(A);

template <class A>
Vec<A> load(const A* p) {
  Vec<A> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class A>
void store(A* p, Vec<A> v) {
  std::memcpy(p, &v, sizeof v);
}

template <class A>
Vec<A> splat(A x) {
  return x - Vec<A>{};  // x - 0 is x, so this folds to a broadcast (x + 0 is not, for x = -0)
}

template <class V>
V vmax(V a, V b) {
  return a > b ? a : b;
}

// a * b + c, rounded once where the instruction set has fused multiply-adds; and the maximum in
// one instruction (GCC compiles the select above with a constant operand to a compare and a blend).
#if defined(__AVX512F__)
GK_INTRINSICS_BEGIN
Vec<float> vmax(Vec<float> a, Vec<float> b) {
  return reinterpret_cast<Vec<float>>(_mm512_max_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b)));
}
Vec<double> vmax(Vec<double> a, Vec<double> b) {
  return reinterpret_cast<Vec<double>>(_mm512_max_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b)));
}
Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
  return reinterpret_cast<Vec<float>>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                      reinterpret_cast<__m512>(c)));
}
Vec<double> fmadd(Vec<double> a, Vec<double> b, Vec<double> c) {
  return reinterpret_cast<Vec<double>>(_mm512_fmadd_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b),
                                                       reinterpret_cast<__m512d>(c)));
}
GK_INTRINSICS_END
#elif defined(__AVX2__)
Vec<float> vmax(Vec<float> a, Vec<float> b) {
  return reinterpret_cast<Vec<float>>(_mm256_max_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b)));
}
Vec<double> vmax(Vec<double> a, Vec<double> b) {
  return reinterpret_cast<Vec<double>>(_mm256_max_pd(reinterpret_cast<__m256d>(a), reinterpret_cast<__m256d>(b)));
}
Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
  return reinterpret_cast<Vec<float>>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                      reinterpret_cast<__m256>(c)));
}
Vec<double> fmadd(Vec<double> a, Vec<double> b, Vec<double> c) {
  return reinterpret_cast<Vec<double>>(_mm256_fmadd_pd(reinterpret_cast<__m256d>(a), reinterpret_cast<__m256d>(b),
                                                       reinterpret_cast<__m256d>(c)));
}
#else
template <class V>
V fmadd(V a, V b, V c) {
  return a * b + c;  // the baseline instruction set has no fused multiply-add
}
#endif

// The lanes of v combined by op (a sum or a maximum), by halves.
template <class A, int Bytes = kVecBytes, class Op>
A reduce(Vec<A, Bytes> v, Op op) {
  if constexpr (Bytes == 2 * sizeof(A)) {
    return op(v[0], v[1]);
  } else {
    Vec<A, Bytes / 2> lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return reduce<A, Bytes / 2>(op(lo, hi), op);
  }
}
constexpr auto kPlus = [](auto a, auto b) { return a + b; };
constexpr auto kMax = [](auto a, auto b) { return vmax(a, b); };

template <class A>
bool any_lane(Vec<Int<A>> mask) {
  Int<A> lanes[kLanes<A>];
  std::memcpy(lanes, &mask, sizeof lanes);
  Int<A> any = 0;
  for (int i = 0; i < kLanes<A>; ++i) any |= lanes[i];
  return any != 0;
}

// 2^x for x <= 0 (and -inf): x = n + f with n = rint(x), |f| <= 1/2; 2^f by a polynomial
// (float: a near-minimax fit within one ulp; double: the Taylor series, error < 2^-57), and
// 2^n built in the exponent bits.
template <class A>
struct Exp2Poly;
template <>
struct Exp2Poly<float> {
  static constexpr int kMantissa = 23, kBias = 127;
  static constexpr float kCoef[] = {0x1.41fd0ap-13f, 0x1.5f3e4cp-10f, 0x1.3b2d4cp-7f, 0x1.c6aee8p-5f,
                                    0x1.ebfbdcp-3f,  0x1.62e430p-1f,  1.0f};
};
template <>
struct Exp2Poly<double> {
  static constexpr int kMantissa = 52, kBias = 1023;
  static constexpr double kCoef[] = {0x1.816193166d0f9p-40, 0x1.c3bd650fc2986p-36, 0x1.e8cac7351bb25p-32,
                                     0x1.e4cf5158b8ecap-28, 0x1.b5253d395e7c4p-24, 0x1.62c0223a5c824p-20,
                                     0x1.ffcbfc588b0c7p-17, 0x1.430912f86c787p-13, 0x1.5d87fe78a6731p-10,
                                     0x1.3b2ab6fba4e77p-7,  0x1.c6b08d704a0c0p-5,  0x1.ebfbdff82c58fp-3,
                                     0x1.62e42fefa39efp-1,  1.0};
};

template <class A>
Vec<A> exp2v(Vec<A> x) {
  using Poly = Exp2Poly<A>;
  using IV = Vec<Int<A>>;
  // Below -bias the exponent field built for 2^n is 0: the result is exactly 0 (also for -inf).
  x = vmax(x, splat<A>(-Poly::kBias));
  // Adding 1.5 * 2^mantissa rounds x to an integer held in the low bits of the sum.
  const Vec<A> magic = splat<A>(A(3) * A(Int<A>(1) << (Poly::kMantissa - 1)));
  const Vec<A> shifted = x + magic;
  const Vec<A> f = x - (shifted - magic);
  Vec<A> poly = splat<A>(Poly::kCoef[0]);
  GK_UNROLL
  for (size_t k = 1; k < sizeof Poly::kCoef / sizeof(A); ++k) poly = fmadd(poly, f, splat<A>(Poly::kCoef[k]));
  const IV n = reinterpret_cast<IV>(shifted) - reinterpret_cast<IV>(magic);
  return poly * reinterpret_cast<Vec<A>>((n + Poly::kBias) << Poly::kMantissa);
}

template <class A>
A exp2s(A x) {
  return exp2v<A>(splat<A>(x))[0];
}

template <class A>
constexpr A kMinusInf = -__builtin_inf();

int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return min64(max64(x, lo), hi); }
int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------- storage types
// q, k, v and out are float, double or bfloat16; the arithmetic is float, or double for double.
struct Bf16 {
  uint16_t bits;
};

template <class T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

float to_acc(float x) { return x; }
double to_acc(double x) { return x; }
float to_acc(Bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

// Natural logarithm of a positive normal number (the float one inlines, unlike a libm call).
double log_of(float x) { return log_positive(x); }
double log_of(double x) { return ::log(x); }

void store_as(float* p, float x) { *p = x; }
void store_as(double* p, double x) { *p = x; }
void store_as(Bf16* p, float x) {
  const uint32_t u = float_bits(x);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  // Round to nearest even; a NaN stays a (quiet) NaN.
  p->bits = static_cast<uint16_t>(nan ? (u >> 16) | 0x40u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// A 64-byte aligned array, owned for the duration of one call.
template <class A>
class Buffer {
 public:
  explicit Buffer(int64_t count)
      : data_(static_cast<A*>(::operator new(sizeof(A) * static_cast<size_t>(max64(count, 1)), std::align_val_t(64)))) {}
  ~Buffer() { ::operator delete(data_, std::align_val_t(64)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  A* get() const { return data_; }

 private:
  A* data_;
};

// Runs body(next) on up to `threads` threads, where next(&item) hands out the items [0, count)
// one at a time, in order, to whichever thread asks, and returns false when none is left. Finer
// than parallel_for's chunks: tasks of uneven cost (causal tiles) balance to within one task.
template <class Body>
void for_each_task(int64_t count, int threads, Body&& body) {
  int64_t next = 0;
  parallel_for(min64(threads, count), 1, threads, [&](int64_t, int64_t) {
    body([&next, count](int64_t* item) {
      *item = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
      return *item < count;
    });
  });
}

// ---------------------------------------------------------------- micro-kernel
// C[MR][NR vectors] = (accumulate ? C : 0) + A[MR][depth] B[depth][NR vectors]: A's element
// (m, k) at a[m * am + k * ak] is broadcast against row k of B (ldb apart); C's rows are ldc
// apart. The accumulators stay in registers over the whole depth.
template <class A, int MR, int NR>
void micro_tile(int64_t depth, const A* a, int64_t am, int64_t ak, const A* b, int64_t ldb, A* c, int64_t ldc,
                bool accumulate) {
  constexpr int W = kLanes<A>;
  Vec<A> acc[MR][NR];
  GK_UNROLL
  for (int m = 0; m < MR; ++m) {
    GK_UNROLL
    for (int n = 0; n < NR; ++n) acc[m][n] = accumulate ? load(c + m * ldc + n * W) : Vec<A>{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec<A> bk[NR];
    GK_UNROLL
    for (int n = 0; n < NR; ++n) bk[n] = load(b + k * ldb + n * W);
    GK_UNROLL
    for (int m = 0; m < MR; ++m) {
      const Vec<A> amk = splat(a[m * am + k * ak]);
      GK_UNROLL
      for (int n = 0; n < NR; ++n) acc[m][n] = fmadd(amk, bk[n], acc[m][n]);
    }
  }
  GK_UNROLL
  for (int m = 0; m < MR; ++m) {
    GK_UNROLL
    for (int n = 0; n < NR; ++n) store(c + m * ldc + n * W, acc[m][n]);
  }
}

template <class A>
using MicroTile = void (*)(int64_t, const A*, int64_t, int64_t, const A*, int64_t, A*, int64_t, bool);

// The micro-kernel for a block of mr <= MR rows and nr <= NR vectors.
template <class A, int MR = kMr, int NR = kNr>
MicroTile<A> micro_tile_for(int mr, int nr) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_tile_for<A, MR - 1, NR>(mr, nr);
  }
  if constexpr (NR > 1) {
    if (nr < NR) return micro_tile_for<A, MR, NR - 1>(mr, nr);
  }
  return &micro_tile<A, MR, NR>;
}

// C[rows][vectors] (+)= A[rows][depth] B[depth][vectors] in micro-kernel blocks.
template <class A>
void gemm(int64_t rows, int64_t vectors, int64_t depth, const A* a, int64_t am, int64_t ak, const A* b, int64_t ldb,
          A* c, int64_t ldc, bool accumulate) {
  constexpr int W = kLanes<A>;
  for (int64_t n0 = 0; n0 < vectors; n0 += kNr) {
    const int nr = static_cast<int>(min64(kNr, vectors - n0));
    const MicroTile<A> full = micro_tile_for<A>(kMr, nr);
    for (int64_t m0 = 0; m0 < rows; m0 += kMr) {
      const int mr = static_cast<int>(min64(kMr, rows - m0));
      (mr == kMr ? full : micro_tile_for<A>(mr, nr))(depth, a + m0 * am, am, ak, b + n0 * W, ldb, c + m0 * ldc + n0 * W,
                                                     ldc, accumulate);
    }
  }
}

// ---------------------------------------------------------------- online softmax
// o[0, n) *= a, n a whole number of vectors.
template <class A>
void scale_row(A* o, int64_t n, A a) {
  for (int64_t e = 0; e < n; e += kLanes<A>) store(o + e, load(o + e) * a);
}

// Folds n keys into the running state of `rows` queries. s holds their base-2 scores key by key
// (row j of s: `lanes` >= rows queries, a whole number of vectors) and is left holding p_ij; m and
// l advance, and the output rows o (dim_v apart, a whole number of vectors) are rescaled where the
// maximum grew, ready to gain P V.
template <class A>
void online_softmax_columns(A* s, int64_t n, int64_t rows, int64_t lanes, int64_t dim_v, A* o, A* m, A* l, A* alpha) {
  constexpr int W = kLanes<A>;
  Vec<Int<A>> grew{};
  for (int64_t q = 0; q < lanes; q += W) {
    // Four running maxima hide the latency of the comparisons.
    const Vec<A> m_old = load(m + q);
    Vec<A> mx[4] = {m_old, m_old, m_old, m_old};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      GK_UNROLL
      for (int u = 0; u < 4; ++u) mx[u] = vmax(mx[u], load(s + (j + u) * lanes + q));
    }
    for (; j < n; ++j) mx[0] = vmax(mx[0], load(s + j * lanes + q));
    const Vec<A> m_new = vmax(vmax(mx[0], mx[1]), vmax(mx[2], mx[3]));
    // A query with no allowed key so far keeps m = -inf; measuring from 0 then gives p = 0.
    const Vec<A> ref = m_new == kMinusInf<A> ? Vec<A>{} : m_new;
    Vec<A> sum{};
    for (j = 0; j < n; ++j) {
      const Vec<A> p = exp2v<A>(load(s + j * lanes + q) - ref);
      store(s + j * lanes + q, p);
      sum += p;
    }
    const Vec<A> a = exp2v<A>(m_old - ref);
    store(l + q, fmadd(a, load(l + q), sum));
    store(m + q, m_new);
    store(alpha + q, a);
    grew |= m_new > m_old;
  }
  // Rescaling only where some maximum grew.
  if (any_lane<A>(grew)) {
    for (int64_t r = 0; r < rows; ++r)
      if (alpha[r] != 1) scale_row(o + r * dim_v, dim_v, alpha[r]);
  }
}

// The same step with the scores laid out query by query, for few queries and many keys: row r of
// s (ld apart) holds the n keys of query r, padded with -inf to a whole number of vectors.
template <class A>
void online_softmax_rows(A* s, int64_t n, int64_t ld, int64_t rows, int64_t dim_v, A* o, A* m, A* l) {
  constexpr int W = kLanes<A>;
  for (int64_t r = 0; r < rows; ++r) {
    A* row = s + r * ld;
    Vec<A> mx = splat(m[r]);
    for (int64_t j = 0; j < n; j += W) mx = vmax(mx, load(row + j));
    const A m_new = reduce<A>(mx, kMax);
    const A ref = m_new == kMinusInf<A> ? 0 : m_new;
    Vec<A> sum{};
    for (int64_t j = 0; j < n; j += W) {
      const Vec<A> p = exp2v<A>(load(row + j) - ref);
      store(row + j, p);
      sum += p;
    }
    const A a = exp2s(m[r] - ref);
    l[r] = a * l[r] + reduce<A>(sum, kPlus);
    m[r] = m_new;
    if (a != 1) scale_row(o + r * dim_v, dim_v, a);
  }
}

// ---------------------------------------------------------------- the problem
// Keys a query of one batch element may see: [first(i), end(i)), both nondecreasing in i.
struct Band {
  int64_t kv_len, diagonal, left, right;  // left, right < 0: unbounded

  int64_t first(int64_t i) const { return left < 0 ? 0 : clamp64(i + diagonal - left, 0, kv_len); }
  int64_t end(int64_t i) const { return right < 0 ? kv_len : clamp64(i + diagonal + right + 1, 0, kv_len); }
  // Whether every query in [i0, i1) may see every key in [j0, j1).
  bool covers(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const { return first(i1 - 1) <= j0 && j1 <= end(i0); }
  // The queries that may see key j < kv_len: [first_query(j), end_query(j)), both nondecreasing.
  static constexpr int64_t kFar = int64_t(1) << 62;
  int64_t first_query(int64_t j) const { return right < 0 ? -kFar : j - diagonal - right; }
  int64_t end_query(int64_t j) const { return left < 0 ? kFar : j - diagonal + left + 1; }
};

// Adds log2(e) * bias to the scores s[jj * ld] of a row of n keys, or removes the keys a bool
// mask excludes.
template <class M, class A>
void add_mask(const M* mask, int64_t stride, int64_t n, A* s, int64_t ld) {
  constexpr A kLog2e = static_cast<A>(1.4426950408889634074);
  for (int64_t jj = 0; jj < n; ++jj) {
    if constexpr (std::is_same_v<M, uint8_t>) {
      if (!mask[jj * stride]) s[jj * ld] = kMinusInf<A>;
    } else {
      s[jj * ld] += kLog2e * static_cast<A>(to_acc(mask[jj * stride]));
    }
  }
}

template <class T>
class Attention {
 public:
  using A = AccOf<T>;

  Attention(const AttentionParams& p)
      : p_(p), c_(static_cast<A>(p.scale * 1.4426950408889634074)), group_(p.heads_q / p.heads_kv) {
    // Windows wider than any distance between a query and a key are unbounded.
    const int64_t far = 2 * (p.len_q + p.len_kv) + 1;
    left_ = p.window_left > far ? -1 : p.window_left;
    right_ = p.window_right > far ? -1 : p.window_right;
  }

  const AttentionParams& params() const { return p_; }
  int64_t group() const { return group_; }

  Band band(int64_t b) const {
    const int64_t kv_len = p_.kv_lens ? clamp64(p_.kv_lens[b], 0, p_.len_kv) : p_.len_kv;
    return Band{kv_len, p_.bottom_right ? kv_len - p_.len_q : 0, left_, right_};
  }

  // Query (b, h, i) times c, into dst[0, dim_qk).
  void load_query(int64_t b, int64_t h, int64_t i, A* dst) const {
    const T* q = static_cast<const T*>(p_.q) + b * p_.q_stride[0] + h * p_.q_stride[1] + i * p_.q_stride[2];
    const A c = c_;  // a local: stores to dst cannot change it
    for (int64_t e = 0, dim = p_.dim_qk; e < dim; ++e) dst[e] = c * to_acc(q[e]);
  }

  // Queries [i0, i0 + count) of head (b, h) times c, transposed: qt[e * lanes + i], the lanes
  // from count on zero.
  void load_queries_transposed(int64_t b, int64_t h, int64_t i0, int64_t count, int64_t lanes, A* qt) const {
    const int64_t stride = p_.q_stride[2];
    const T* q = static_cast<const T*>(p_.q) + b * p_.q_stride[0] + h * p_.q_stride[1] + i0 * stride;
    const A c = c_;
    for (int64_t e = 0, dim = p_.dim_qk; e < dim; ++e) {
      A* row = qt + e * lanes;
      for (int64_t i = 0; i < count; ++i) row[i] = c * to_acc(q[i * stride + e]);
      for (int64_t i = count; i < lanes; ++i) row[i] = 0;
    }
  }

  // Rows [j0, j0 + n) of the keys (or values) of head (b, hk) as A, *ld apart: in place when
  // stored as A (and, with whole_vectors, when a row is a whole number of vectors), otherwise
  // converted into buf, with rows zero-padded to whole vectors if asked.
  const A* keys(int64_t b, int64_t hk, int64_t j0, int64_t n, bool whole_vectors, A* buf, int64_t* ld) const {
    return rows(static_cast<const T*>(p_.k), p_.k_stride, b, hk, j0, n, p_.dim_qk, whole_vectors, buf, ld);
  }
  const A* values(int64_t b, int64_t hk, int64_t j0, int64_t n, bool whole_vectors, A* buf, int64_t* ld) const {
    return rows(static_cast<const T*>(p_.v), p_.v_stride, b, hk, j0, n, p_.dim_v, whole_vectors, buf, ld);
  }

  // Applies the band and the mask to the scores s[jj * ld] of query (b, h, i) and keys j0 + jj.
  void mask_scores(const Band& band, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, A* s, int64_t ld) const {
    const int64_t first = band.first(i), end = band.end(i);
    for (int64_t j = j0; j < min64(first, j0 + n); ++j) s[(j - j0) * ld] = kMinusInf<A>;
    for (int64_t j = max64(end, j0); j < j0 + n; ++j) s[(j - j0) * ld] = kMinusInf<A>;
    if (!p_.mask) return;
    const int64_t* ms = p_.mask_stride;
    const int64_t offset = b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
    switch (p_.mask_dtype) {
      case DType::b8: return add_mask(static_cast<const uint8_t*>(p_.mask) + offset, ms[3], n, s, ld);
      case DType::f32: return add_mask(static_cast<const float*>(p_.mask) + offset, ms[3], n, s, ld);
      default: return add_mask(static_cast<const T*>(p_.mask) + offset, ms[3], n, s, ld);
    }
  }

  // out(b, h, i) = o / l and its log-sum-exp; zeros for a query with no key.
  void write_row(int64_t b, int64_t h, int64_t i, const A* o, A m, A l) const {
    const int64_t row = (b * p_.heads_q + h) * p_.len_q + i;
    T* out = static_cast<T*>(p_.out) + row * p_.dim_v;
    const A inv = l > 0 ? 1 / l : 0;
    for (int64_t e = 0; e < p_.dim_v; ++e) store_as(out + e, o[e] * inv);
    if (p_.lse) p_.lse[row] = l > 0 ? static_cast<float>(0.69314718055994531 * m + log_of(l)) : 0.0f;
  }

 private:
  const A* rows(const T* base, const int64_t* stride, int64_t b, int64_t hk, int64_t j0, int64_t n, int64_t dim,
                bool whole_vectors, A* buf, int64_t* ld) const {
    const T* src = base + b * stride[0] + hk * stride[1] + j0 * stride[2];
    if constexpr (std::is_same_v<T, A>) {
      if (!whole_vectors || dim % kLanes<A> == 0) {
        *ld = stride[2];
        return src;
      }
    }
    *ld = whole_vectors ? round_up(dim, kLanes<A>) : dim;
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t e = 0; e < dim; ++e) buf[j * *ld + e] = to_acc(src[j * stride[2] + e]);
      for (int64_t e = dim; e < *ld; ++e) buf[j * *ld + e] = 0;
    }
    return buf;
  }

  const AttentionParams& p_;
  A c_;
  int64_t group_, left_, right_;
};

// ---------------------------------------------------------------- prefill
constexpr int64_t kKeyTile = 64;  // Bc

template <class T>
void prefill(const Attention<T>& at, int threads) {
  using A = AccOf<T>;
  constexpr int W = kLanes<A>;
  const AttentionParams& p = at.params();
  // Br: one micro-kernel's width of queries, less for short sequences.
  const int64_t vectors = min64(kNr, (p.len_q + W - 1) / W), lanes = vectors * W;
  const int64_t tiles = (p.len_q + lanes - 1) / lanes, heads = p.batch * p.heads_q;
  const int64_t dim_v = round_up(p.dim_v, W);
  for_each_task(heads * tiles, threads, [&](auto&& next) {
    Buffer<A> qt(p.dim_qk * lanes), st(kKeyTile * lanes), o(lanes * dim_v), state(3 * lanes);
    Buffer<A> kbuf(kKeyTile * p.dim_qk), vbuf(kKeyTile * dim_v);
    A *m = state.get(), *l = m + lanes, *alpha = l + lanes;
    std::memset(st.get(), 0, sizeof(A) * kKeyTile * lanes);  // scores never computed stay finite
    for (int64_t item; next(&item);) {
      // Head by head, so that its keys and values stay in cache; the last tiles of a head first,
      // as under a causal band they are the longest, leaving short tasks to balance the end.
      const int64_t t = tiles - 1 - item % tiles, b = item / tiles / p.heads_q, h = item / tiles % p.heads_q;
      const int64_t hk = h / at.group(), i0 = t * lanes, count = min64(lanes, p.len_q - i0);
      const Band band = at.band(b);

      at.load_queries_transposed(b, h, i0, count, lanes, qt.get());
      std::memset(o.get(), 0, sizeof(A) * count * dim_v);
      for (int64_t i = 0; i < lanes; ++i) {
        m[i] = kMinusInf<A>;
        l[i] = 0;
      }

      const int64_t j_end = band.end(i0 + count - 1);
      for (int64_t j0 = band.first(i0); j0 < j_end; j0 += kKeyTile) {
        const int64_t n = min64(kKeyTile, j_end - j0);
        // A tile across the band's edge goes in blocks of one vector of keys (for S^T) and of
        // queries (for O), each with only the queries or keys of the band.
        const bool edge = !band.covers(i0, i0 + count, j0, j0 + n);
        int64_t ldk, ldv;
        const A* k = at.keys(b, hk, j0, n, false, kbuf.get(), &ldk);
        for (int64_t j = j0; j < j0 + n; j += edge ? W : n) {
          const int64_t nj = min64(edge ? W : n, j0 + n - j);
          const int64_t v0 = clamp64(band.first_query(j) - i0, 0, count) / W;
          const int64_t v1 = (clamp64(band.end_query(j + nj - 1) - i0, 0, count) + W - 1) / W;
          if (v0 < v1)
            gemm(nj, v1 - v0, p.dim_qk, k + (j - j0) * ldk, ldk, 1, qt.get() + v0 * W, lanes,
                 st.get() + (j - j0) * lanes + v0 * W, lanes, false);
        }
        if (p.mask || edge) {
          for (int64_t i = 0; i < count; ++i) at.mask_scores(band, b, h, i0 + i, j0, n, st.get() + i, lanes);
        }
        online_softmax_columns(st.get(), n, count, lanes, dim_v, o.get(), m, l, alpha);
        const A* v = at.values(b, hk, j0, n, true, vbuf.get(), &ldv);
        for (int64_t i = 0; i < count; i += edge ? W : count) {
          const int64_t ni = min64(edge ? W : count, count - i);
          const int64_t ja = max64(j0, band.first(i0 + i)), jb = min64(j0 + n, band.end(i0 + i + ni - 1));
          if (ja < jb)
            gemm(ni, dim_v / W, jb - ja, st.get() + (ja - j0) * lanes + i, 1, lanes, v + (ja - j0) * ldv, ldv,
                 o.get() + i * dim_v, dim_v, true);
        }
      }
      for (int64_t i = 0; i < count; ++i) at.write_row(b, h, i0 + i, o.get() + i * dim_v, m[i], l[i]);
    }
  });
}

// ---------------------------------------------------------------- decode
constexpr int64_t kDecodeMaxLen = 4;    // longest len_q taking the decode path
constexpr int64_t kDecodeKeys = 128;    // keys per step
constexpr int64_t kMinSplitKeys = 512;  // fewest keys worth a separate task

template <class A>
A dot(const A* x, const A* y, int64_t n) {
  constexpr int W = kLanes<A>;
  Vec<A> acc{};
  int64_t e = 0;
  for (; e + W <= n; e += W) acc = fmadd(load(x + e), load(y + e), acc);
  A sum = reduce<A>(acc, kPlus);
  for (; e < n; ++e) sum += x[e] * y[e];
  return sum;
}

template <class T>
void decode(const Attention<T>& at, int threads) {
  using A = AccOf<T>;
  constexpr int W = kLanes<A>;
  const AttentionParams& p = at.params();
  // Rows: the group's query heads times the queries, r = g * len_q + i.
  const int64_t rows = at.group() * p.len_q, dim_v = round_up(p.dim_v, W);
  const int64_t heads = p.batch * p.heads_kv;
  int64_t splits = 1;
  if (heads < 4 * threads) splits = clamp64((4 * threads + heads - 1) / heads, 1, max64(1, p.len_kv / kMinSplitKeys));
  const int64_t chunk = round_up(max64(1, (p.len_kv + splits - 1) / splits), kDecodeKeys);
  splits = max64(1, (p.len_kv + chunk - 1) / chunk);

  // Partial results of every (b, hk, split): o (rows x dim_v), then m and l (rows each).
  const int64_t tasks = heads * splits, ld = kDecodeKeys;
  Buffer<A> part_o(tasks * rows * dim_v), part_ml(tasks * 2 * rows);
  for_each_task(tasks, threads, [&](auto&& next) {
    Buffer<A> qs(rows * p.dim_qk), st(rows * ld), kbuf(kDecodeKeys * p.dim_qk), vbuf(kDecodeKeys * dim_v);
    for (int64_t item; next(&item);) {
      const int64_t bh = item / splits, s = item % splits, b = bh / p.heads_kv, hk = bh % p.heads_kv;
      A* o = part_o.get() + item * rows * dim_v;
      A* m = part_ml.get() + item * 2 * rows;
      A* l = m + rows;
      const Band band = at.band(b);
      for (int64_t r = 0; r < rows; ++r)
        at.load_query(b, hk * at.group() + r / p.len_q, r % p.len_q, qs.get() + r * p.dim_qk);
      std::memset(o, 0, sizeof(A) * rows * dim_v);
      for (int64_t r = 0; r < rows; ++r) {
        m[r] = kMinusInf<A>;
        l[r] = 0;
      }

      const int64_t j_end = min64(band.end(p.len_q - 1), (s + 1) * chunk);
      for (int64_t j0 = max64(band.first(0), s * chunk); j0 < j_end; j0 += kDecodeKeys) {
        const int64_t n = min64(kDecodeKeys, j_end - j0);
        int64_t ldk, ldv;
        const A* k = at.keys(b, hk, j0, n, false, kbuf.get(), &ldk);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t r = 0; r < rows; ++r) st.get()[r * ld + j] = dot(qs.get() + r * p.dim_qk, k + j * ldk, p.dim_qk);
        for (int64_t r = 0; r < rows; ++r) {
          A* row = st.get() + r * ld;
          for (int64_t j = n; j < round_up(n, W); ++j) row[j] = kMinusInf<A>;
          if (p.mask || !band.covers(0, p.len_q, j0, j0 + n))
            at.mask_scores(band, b, hk * at.group() + r / p.len_q, r % p.len_q, j0, n, row, 1);
        }
        online_softmax_rows(st.get(), n, ld, rows, dim_v, o, m, l);
        const A* v = at.values(b, hk, j0, n, true, vbuf.get(), &ldv);
        gemm(rows, dim_v / W, n, st.get(), ld, 1, v, ldv, o, dim_v, true);
      }
    }
  });

  // Merge the splits of every row in split order.
  parallel_for(heads * rows, 1 + 4096 / (dim_v * splits), threads, [&](int64_t begin, int64_t end) {
    Buffer<A> merged(dim_v);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / rows, r = row % rows;
      const A* ml = part_ml.get() + bh * splits * 2 * rows + r;  // m of split s at ml[2 s rows], l after it
      A m = kMinusInf<A>, l = 0;
      for (int64_t s = 0; s < splits; ++s) m = vmax(m, ml[2 * s * rows]);
      std::memset(merged.get(), 0, sizeof(A) * dim_v);
      for (int64_t s = 0; s < splits && m != kMinusInf<A>; ++s) {
        const A w = exp2s(ml[2 * s * rows] - m);
        l += w * ml[(2 * s + 1) * rows];
        const A* o = part_o.get() + ((bh * splits + s) * rows + r) * dim_v;
        for (int64_t e = 0; e < dim_v; e += W) store(merged.get() + e, fmadd(splat(w), load(o + e), load(merged.get() + e)));
      }
      at.write_row(bh / p.heads_kv, bh % p.heads_kv * at.group() + r / p.len_q, r % p.len_q, merged.get(), m, l);
    }
  });
}

template <class T>
void run(const AttentionParams& p, const CpuExec& exec) {
  if (p.batch * p.heads_q * p.len_q == 0) return;
  const Attention<T> at(p);
  const int threads = exec.threads > 1 ? exec.threads : 1;
  if (p.len_q <= kDecodeMaxLen)
    decode(at, threads);
  else
    prefill(at, threads);
}

}  // namespace

void attention_forward(const AttentionParams& p, const CpuExec& exec) {
  switch (p.dtype) {
    case DType::f32: return run<float>(p, exec);
    case DType::f64: return run<double>(p, exec);
    case DType::bf16: return run<Bf16>(p, exec);
    default: return;  // rejected by the dispatcher's check
  }
}

}  // namespace GK_ISA

#ifdef GK_ISA_baseline
// Entry point: check once, then run the build for the best instruction set of this CPU.
void attention_forward(const AttentionParams& p, const CpuExec& exec) {
  p.check();
  require(p.dtype == DType::f32 || p.dtype == DType::f64 || p.dtype == DType::bf16,
          std::string("attention_forward does not support ") + dtype_name(p.dtype) + " on cpu");
  advise_huge_pages(p.out, static_cast<size_t>(p.batch * p.heads_q * p.len_q * p.dim_v) * dtype_size(p.dtype));
  GK_CPU_DISPATCH(attention_forward, p, exec);
}
#endif

}  // namespace gk
