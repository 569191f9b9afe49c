// The building blocks of the attention CPU kernels (forward and backward): vectors of the
// instruction set's width, the register-blocked micro-kernel, storage types, the band of allowed
// keys and the per-problem accessors.
//
// Included only by files compiled once per instruction set (common/cpu_isa.h); everything here
// lives in an anonymous namespace inside gk::<isa>, so each file keeps its own copy and no
// inline function or template is shared across instruction sets.
// Its plain functions are inline only so that a file using some of them compiles without
// unused-function warnings.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

#include "attention/attention.h"
#include "attention/attention_math.h"
#include "common/cpu_intrinsics.h"
#include "common/hostdevice.h"
#include "common/parallel.h"
#include "common/portable_math.h"

#ifndef GK_ISA
#error "attention_cpu_tiles.h is for files compiled per instruction set"
#endif

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
inline Vec<float> vmax(Vec<float> a, Vec<float> b) {
  return reinterpret_cast<Vec<float>>(_mm512_max_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b)));
}
inline Vec<double> vmax(Vec<double> a, Vec<double> b) {
  return reinterpret_cast<Vec<double>>(_mm512_max_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b)));
}
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
  return reinterpret_cast<Vec<float>>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                      reinterpret_cast<__m512>(c)));
}
inline Vec<double> fmadd(Vec<double> a, Vec<double> b, Vec<double> c) {
  return reinterpret_cast<Vec<double>>(_mm512_fmadd_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b),
                                                       reinterpret_cast<__m512d>(c)));
}
GK_INTRINSICS_END
#elif defined(__AVX2__)
inline Vec<float> vmax(Vec<float> a, Vec<float> b) {
  return reinterpret_cast<Vec<float>>(_mm256_max_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b)));
}
inline Vec<double> vmax(Vec<double> a, Vec<double> b) {
  return reinterpret_cast<Vec<double>>(_mm256_max_pd(reinterpret_cast<__m256d>(a), reinterpret_cast<__m256d>(b)));
}
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
  return reinterpret_cast<Vec<float>>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                      reinterpret_cast<__m256>(c)));
}
inline Vec<double> fmadd(Vec<double> a, Vec<double> b, Vec<double> c) {
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

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return min64(max64(x, lo), hi); }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------- storage types
// q, k, v and out are float, double or bfloat16; the arithmetic is float, or double for double.
struct Bf16 {
  uint16_t bits;
};

template <class T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(Bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

// Natural logarithm of a positive normal number (the float one inlines, unlike a libm call).
template <class A>
double log_of(A x) {
  if constexpr (std::is_same_v<A, float>)
    return log_positive(x);
  else
    return ::log(x);
}

inline void store_as(float* p, float x) { *p = x; }
inline void store_as(double* p, double x) { *p = x; }
inline void store_as(Bf16* p, float x) {
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

// ---------------------------------------------------------------- the problem
// Keys a query of one batch element may see: [first(i), end(i)), both nondecreasing in i.
struct Band {
  int64_t kv_len, diagonal, left, right;  // left, right < 0: unbounded

  int64_t first(int64_t i) const { return clamp64(band_first_key(i, diagonal, left), 0, kv_len); }
  int64_t end(int64_t i) const { return clamp64(band_end_key(i, diagonal, right), 0, kv_len); }
  // Whether every query in [i0, i1) may see every key in [j0, j1).
  bool covers(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const { return first(i1 - 1) <= j0 && j1 <= end(i0); }
  // The queries that may see key j < kv_len: [first_query(j), end_query(j)), both nondecreasing.
  int64_t first_query(int64_t j) const { return band_first_query(j, diagonal, right); }
  int64_t end_query(int64_t j) const { return band_end_query(j, diagonal, left); }
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
    if (p.seed) {
      dropout_ = attention_dropout(p);
      keep_scale_ = static_cast<A>(dropout_scale(p.dropout_p));
    }
  }

  bool dropout() const { return p_.seed != nullptr; }

  // Multiplies the weights w[jj * ld] of query (b, h, i) and keys j0 + jj, jj < n, by their
  // dropout factor: 0 or 1 / (1 - p). One Philox block serves four consecutive keys.
  void drop(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, A* w, int64_t ld) const {
    const uint64_t e0 = dropout_element(dropout_, b, h, i, j0), e1 = e0 + static_cast<uint64_t>(n);
    for (uint64_t group = e0 / 4; group * 4 < e1; ++group) {
      const Philox4 words = dropout_words(dropout_, group);
      for (uint64_t r = 0; r < 4; ++r) {
        const uint64_t e = group * 4 + r;
        if (e < e0 || e >= e1) continue;
        A* x = w + static_cast<int64_t>(e - e0) * ld;
        *x = dropout_keeps_word(dropout_, words.v[r]) ? *x * keep_scale_ : A(0);
      }
    }
  }

  const AttentionParams& params() const { return p_; }
  A log2_scale() const { return c_; }  // scale log2(e): the factor of q in base-2 scores
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
  DropoutStream dropout_{};
  A keep_scale_ = 1;
};

}  // namespace
}  // namespace GK_ISA
}  // namespace gk
