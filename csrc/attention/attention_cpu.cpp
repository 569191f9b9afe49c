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
// With dropout, each p_ij is multiplied by its dropout factor after l_i has summed it, so that
// lse stays that of the scores.
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
#include "attention/attention_cpu_tiles.h"
#include "common/cpu_memory.h"

namespace gk {
namespace GK_ISA {
namespace {

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
        if (at.dropout()) {
          for (int64_t i = 0; i < count; ++i) at.drop(b, h, i0 + i, j0, n, st.get() + i, lanes);
        }
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
        if (at.dropout()) {
          for (int64_t r = 0; r < rows; ++r)
            at.drop(b, hk * at.group() + r / p.len_q, r % p.len_q, j0, n, st.get() + r * ld, 1);
        }
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
  const int threads = exec.threads > 1 ? exec.threads : 1;
#if defined(__AVX512F__) && defined(GK_HAVE_AMX)
  if (cpu_isa() == Isa::amx && p.len_q > kDecodeMaxLen && amx_pays(p.dtype, p.len_q, p.len_kv))
    return attention_forward_amx(p, threads);
#endif
  const Attention<T> at(p);
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
