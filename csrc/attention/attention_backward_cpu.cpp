// CPU kernels for scaled dot-product attention, backward (FlashAttention-2; Dao, 2023).
// Compiled once per instruction set (common/cpu_isa.h).
//
// A task is one key/value head (b, hk) with its group of query heads, so the gradients of its
// keys and values (summed over the group) and of its queries belong to one thread: no atomics,
// and results that do not depend on scheduling. (With fewer key/value heads than threads, a
// task is every splits-th key tile of a head instead, and the tasks' dQ are summed in a fixed
// order afterwards: deterministic for a given thread count.)
//
// A task first packs, per query head, c Q^T and dO^T (c = scale log2(e)), Q and dO as rows,
// lse2 = log2(e) lse and D = rowsum(dO * out) - dlse. It then walks its keys in tiles of Bc, and
// for each key tile the query tiles of Br queries that the band lets see it (tiles wholly
// outside the band are never visited; tiles across its edge go in blocks of one vector),
// recomputing the weights from the saved log-sum-exp rather than storing them:
//   S^T = K (c Q^T)                  Bc x Br, base-2 scores, masked as in the forward
//   P^T = 2^(S^T - lse2)             the softmax weights (times dropout factors: Pd^T)
//   dV += Pd^T dO                    dP^T = (V dO^T) * dropout factors
//   dS^T = P^T (dP^T - D)            dK += dS^T Q,   dQ += dS K
// dK and dV of the tile are final after its query tiles (scaled and stored); dQ accumulates over
// the key tiles in the task's buffer. Every product is the forward's micro-kernel, C += A B,
// with A read at any strides. Memory: the task's packed queries, O(group x len_q x dims) per
// thread; the len_q x len_kv matrix never exists.
#include "attention/attention_cpu_tiles.h"
#include "common/cpu_memory.h"

namespace gk {
namespace GK_ISA {
namespace {

constexpr int64_t kBackwardKeyTile = 64;  // Bc

// One query head's packed operands, len_qp = len_q rounded up to whole query tiles.
template <class A>
struct PackedQueries {
  A *qt, *q, *dot, *dout, *lse2, *delta, *dq;
};

template <class T>
class Backward {
 public:
  using A = AccOf<T>;
  static constexpr int W = kLanes<A>;

  Backward(const Attention<T>& at, const AttentionBackwardParams& bp)
      : at_(at), bp_(bp), p_(at.params()), lanes_(clamp64((p_.len_q + W - 1) / W, 1, kNr) * W),
        len_qp_(round_up(p_.len_q, lanes_)), dqk_(round_up(p_.dim_qk, W)), dvp_(round_up(p_.dim_v, W)) {}

  // Elements of A a task needs for one query head's packed operands.
  int64_t head_elements() const { return len_qp_ * (2 * p_.dim_qk + 2 * p_.dim_v + 2) + len_qp_ * (2 * dqk_ + dvp_); }

  void run(int threads) const {
    const int64_t group = at_.group(), tile = kBackwardKeyTile, heads = p_.batch * p_.heads_kv;
    // With fewer key/value heads than threads (batch 1, multi-query attention) the key tiles of a
    // head are dealt round-robin to `splits` tasks (balanced under a causal band); each task sums
    // its own dQ, and the parts are merged in task order.
    const int64_t key_tiles = (p_.len_kv + tile - 1) / tile;
    const int64_t splits = heads < threads ? clamp64((threads + heads - 1) / heads, 1, max64(key_tiles, 1)) : 1;
    const int64_t part = group * len_qp_ * dqk_;  // one task's dQ
    Buffer<A> dq_parts(splits > 1 ? heads * splits * part : 0);
    for_each_task(heads * splits, threads, [&](auto&& next) {
      Buffer<A> packs(group * head_elements()), kbuf(tile * dqk_), vbuf(tile * p_.dim_v);
      Buffer<A> st(tile * lanes_), dst(tile * lanes_), pd(tile * lanes_), dk(tile * dqk_), dv(tile * dvp_);
      // Scores an edge tile leaves out are masked, and must be finite before that.
      std::memset(st.get(), 0, sizeof(A) * tile * lanes_);
      std::memset(dst.get(), 0, sizeof(A) * tile * lanes_);
      for (int64_t item; next(&item);) {
        const int64_t bh = item / splits, split = item % splits, b = bh / p_.heads_kv, hk = bh % p_.heads_kv;
        auto queries = [&](int64_t g) {
          PackedQueries<A> pq = packed(packs.get(), g);
          if (splits > 1) pq.dq = dq_parts.get() + item * part + g * len_qp_ * dqk_;
          return pq;
        };
        for (int64_t g = 0; g < group; ++g) pack(b, hk * group + g, queries(g));
        for (int64_t j0 = split * tile; j0 < p_.len_kv; j0 += splits * tile) {
          const int64_t n = min64(tile, p_.len_kv - j0);
          std::memset(dk.get(), 0, sizeof(A) * n * dqk_);
          std::memset(dv.get(), 0, sizeof(A) * n * dvp_);
          int64_t ldk, ldv;
          const A* k = at_.keys(b, hk, j0, n, true, kbuf.get(), &ldk);
          const A* v = at_.values(b, hk, j0, n, false, vbuf.get(), &ldv);
          for (int64_t g = 0; g < group; ++g) {
            key_tile(b, hk * group + g, j0, n, k, ldk, v, ldv, queries(g), st.get(), dst.get(), pd.get(), dk.get(),
                     dv.get());
          }
          const int64_t rows = bh * p_.len_kv + j0;
          store_rows(static_cast<T*>(bp_.dk), rows, n, p_.dim_qk, dk.get(), dqk_, static_cast<A>(p_.scale));
          store_rows(static_cast<T*>(bp_.dv), rows, n, p_.dim_v, dv.get(), dvp_, A(1));
        }
        if (splits > 1) continue;
        for (int64_t g = 0; g < group; ++g) {
          store_rows(static_cast<T*>(bp_.dq), (b * p_.heads_q + hk * group + g) * p_.len_q, p_.len_q, p_.dim_qk,
                     queries(g).dq, dqk_, static_cast<A>(p_.scale));
        }
      }
    });
    if (splits == 1) return;
    // dQ row r of key/value head bh's group: the sum of the tasks' rows, in task order.
    parallel_for(heads * group * p_.len_q, 64, threads, [&](int64_t begin, int64_t end) {
      Buffer<A> sum(dqk_);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bh = row / (group * p_.len_q), r = row % (group * p_.len_q);
        const int64_t g = r / p_.len_q, i = r % p_.len_q;
        std::memset(sum.get(), 0, sizeof(A) * dqk_);
        for (int64_t split = 0; split < splits; ++split) {
          const A* x = dq_parts.get() + (bh * splits + split) * part + (g * len_qp_ + i) * dqk_;
          for (int64_t e = 0; e < dqk_; e += W) store(sum.get() + e, load(sum.get() + e) + load(x + e));
        }
        const int64_t out_row = (bh / p_.heads_kv * p_.heads_q + bh % p_.heads_kv * group + g) * p_.len_q + i;
        store_rows(static_cast<T*>(bp_.dq), out_row, 1, p_.dim_qk, sum.get(), dqk_, static_cast<A>(p_.scale));
      }
    });
  }

 private:
  PackedQueries<A> packed(A* base, int64_t g) const {
    A* x = base + g * head_elements();
    PackedQueries<A> pq;
    pq.qt = x;
    pq.dot = pq.qt + p_.dim_qk * len_qp_;
    pq.lse2 = pq.dot + p_.dim_v * len_qp_;
    pq.delta = pq.lse2 + len_qp_;
    pq.q = pq.delta + len_qp_;
    pq.dout = pq.q + len_qp_ * dqk_;
    pq.dq = pq.dout + len_qp_ * dvp_;
    return pq;
  }

  // Packs query head (b, h): c Q^T, Q rows, dO^T, dO rows, lse2 and D; zeroes dq. Padding
  // queries get lse2 = +inf (weights 0) and D = 0; padding features are 0.
  void pack(int64_t b, int64_t h, const PackedQueries<A>& pq) const {
    constexpr A kLog2e = static_cast<A>(1.4426950408889634074);
    const int64_t len_q = p_.len_q, row0 = (b * p_.heads_q + h) * len_q;
    const T* q = static_cast<const T*>(p_.q) + b * p_.q_stride[0] + h * p_.q_stride[1];
    const T* dout = static_cast<const T*>(bp_.dout) + b * bp_.dout_stride[0] + h * bp_.dout_stride[1];
    const T* out = static_cast<const T*>(p_.out) + row0 * p_.dim_v;
    std::memset(pq.q, 0, sizeof(A) * len_qp_ * dqk_);
    std::memset(pq.dout, 0, sizeof(A) * len_qp_ * dvp_);
    for (int64_t i = 0; i < len_q; ++i) {
      A* qrow = pq.q + i * dqk_;
      A* drow = pq.dout + i * dvp_;
      const T* qi = q + i * p_.q_stride[2];
      const T* di = dout + i * bp_.dout_stride[2];
      const T* oi = out + i * p_.dim_v;
      for (int64_t e = 0; e < p_.dim_qk; ++e) qrow[e] = to_acc(qi[e]);
      A delta = 0;
      for (int64_t e = 0; e < p_.dim_v; ++e) {
        drow[e] = to_acc(di[e]);
        delta += drow[e] * to_acc(oi[e]);
      }
      pq.lse2[i] = kLog2e * static_cast<A>(p_.lse[row0 + i]);
      pq.delta[i] = delta - (bp_.dlse ? static_cast<A>(bp_.dlse[row0 + i]) : A(0));
    }
    for (int64_t i = len_q; i < len_qp_; ++i) {
      pq.lse2[i] = static_cast<A>(__builtin_inf());
      pq.delta[i] = 0;
    }
    transpose(pq.q, dqk_, p_.dim_qk, at_.log2_scale(), pq.qt);
    transpose(pq.dout, dvp_, p_.dim_v, A(1), pq.dot);
    std::memset(pq.dq, 0, sizeof(A) * len_qp_ * dqk_);
  }

  // dst[e * len_qp + i] = factor * src[i * ld + e] for e < dim and all len_qp rows, a block of
  // kLanes rows at a time so that the rows read stay in the first-level cache across e.
  void transpose(const A* src, int64_t ld, int64_t dim, A factor, A* dst) const {
    for (int64_t i0 = 0; i0 < len_qp_; i0 += W) {
      for (int64_t e = 0; e < dim; ++e) {
        A* row = dst + e * len_qp_ + i0;
        for (int64_t i = 0; i < W; ++i) row[i] = factor * src[(i0 + i) * ld + e];
      }
    }
  }

  // The contribution of query head (b, h) to key tile [j0, j0 + n): into dk and dv (n rows) and
  // the head's dq.
  void key_tile(int64_t b, int64_t h, int64_t j0, int64_t n, const A* k, int64_t ldk, const A* v, int64_t ldv,
                const PackedQueries<A>& pq, A* st, A* dst, A* pd, A* dk, A* dv) const {
    const Band band = at_.band(b);
    if (j0 >= band.kv_len) return;
    const int64_t lanes = lanes_;
    const int64_t ia = clamp64(band.first_query(j0), 0, p_.len_q);
    const int64_t ib = clamp64(band.end_query(min64(j0 + n, band.kv_len) - 1), 0, p_.len_q);
    for (int64_t i0 = ia / lanes * lanes; i0 < ib; i0 += lanes) {
      const int64_t count = min64(lanes, p_.len_q - i0);
      // A tile across the band's edge goes in blocks of one vector of keys (S^T, dP^T, dV, dK)
      // or of queries (dQ), each over only the queries or keys of the band; the scores left
      // out are masked to -inf below, so their weights and score gradients are 0.
      const bool edge = !band.covers(i0, i0 + count, j0, j0 + n);
      const int64_t key_block = edge ? W : n, query_block = edge ? W : count;
      for (int64_t j = j0; j < j0 + n; j += key_block) {
        const int64_t nj = min64(key_block, j0 + n - j), row = (j - j0) * lanes;
        const int64_t v0 = clamp64(band.first_query(j) - i0, 0, count) / W;
        const int64_t v1 = (clamp64(band.end_query(j + nj - 1) - i0, 0, count) + W - 1) / W;
        if (v0 >= v1) continue;
        gemm(nj, v1 - v0, p_.dim_qk, k + (j - j0) * ldk, ldk, 1, pq.qt + i0 + v0 * W, len_qp_, st + row + v0 * W, lanes,
             false);
        gemm(nj, v1 - v0, p_.dim_v, v + (j - j0) * ldv, ldv, 1, pq.dot + i0 + v0 * W, len_qp_, dst + row + v0 * W,
             lanes, false);
      }
      if (p_.mask || edge) {
        for (int64_t i = 0; i < count; ++i) at_.mask_scores(band, b, h, i0 + i, j0, n, st + i, lanes);
      }
      for (int64_t jj = 0; jj < n; ++jj) {
        for (int64_t x = 0; x < lanes; x += W) {
          A* s = st + jj * lanes + x;
          store(s, exp2v<A>(load(s) - load(pq.lse2 + i0 + x)));
        }
      }
      const A* weights = st;  // Pd^T: P^T with dropout factors
      if (at_.dropout()) {
        for (int64_t x = 0; x < n * lanes; ++x) pd[x] = 1;
        for (int64_t i = 0; i < count; ++i) at_.drop(b, h, i0 + i, j0, n, pd + i, lanes);
        for (int64_t x = 0; x < n * lanes; x += W) {
          const Vec<A> z = load(pd + x);
          store(dst + x, load(dst + x) * z);
          store(pd + x, load(st + x) * z);
        }
        weights = pd;
      }
      for (int64_t jj = 0; jj < n; ++jj) {
        for (int64_t x = 0; x < lanes; x += W) {
          A* ds = dst + jj * lanes + x;
          store(ds, load(st + jj * lanes + x) * (load(ds) - load(pq.delta + i0 + x)));
        }
      }
      if (bp_.dbias) {
        float* db = bp_.dbias + ((b * p_.heads_q + h) * p_.len_q + i0) * p_.len_kv + j0;
        for (int64_t i = 0; i < count; ++i)
          for (int64_t jj = 0; jj < n; ++jj) db[i * p_.len_kv + jj] = static_cast<float>(dst[jj * lanes + i]);
      }
      for (int64_t j = j0; j < j0 + n; j += key_block) {
        const int64_t nj = min64(key_block, j0 + n - j), row = (j - j0) * lanes;
        const int64_t qa = clamp64(band.first_query(j) - i0, 0, count);
        const int64_t qb = clamp64(band.end_query(j + nj - 1) - i0, 0, count);
        if (qa >= qb) continue;
        gemm(nj, dvp_ / W, qb - qa, weights + row + qa, lanes, 1, pq.dout + (i0 + qa) * dvp_, dvp_, dv + (j - j0) * dvp_,
             dvp_, true);
        gemm(nj, dqk_ / W, qb - qa, dst + row + qa, lanes, 1, pq.q + (i0 + qa) * dqk_, dqk_, dk + (j - j0) * dqk_, dqk_,
             true);
      }
      for (int64_t i = 0; i < count; i += query_block) {
        const int64_t ni = min64(query_block, count - i);
        const int64_t ja = max64(j0, band.first(i0 + i)), jb = min64(j0 + n, band.end(i0 + i + ni - 1));
        if (ja < jb)
          gemm(ni, dqk_ / W, jb - ja, dst + (ja - j0) * lanes + i, 1, lanes, k + (ja - j0) * ldk, ldk,
               pq.dq + (i0 + i) * dqk_, dqk_, true);
      }
    }
  }

  // Rows [row0, row0 + n) of a contiguous gradient of `dim` features: factor * src.
  static void store_rows(T* dst, int64_t row0, int64_t n, int64_t dim, const A* src, int64_t ld, A factor) {
    T* out = dst + row0 * dim;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t e = 0; e < dim; ++e) store_as(out + j * dim + e, factor * src[j * ld + e]);
  }

  const Attention<T>& at_;
  const AttentionBackwardParams& bp_;
  const AttentionParams& p_;
  int64_t lanes_, len_qp_, dqk_, dvp_;
};

template <class T>
void run(const AttentionBackwardParams& bp, const CpuExec& exec) {
  const AttentionParams& p = bp.fwd;
  if (p.batch * (p.heads_q * p.len_q + p.heads_kv * p.len_kv) == 0 || p.dim_qk * p.dim_v == 0) return;
  const int threads = exec.threads > 1 ? exec.threads : 1;
#if defined(__AVX512F__) && defined(GK_HAVE_AMX)
  if (cpu_isa() == Isa::amx && amx_pays(p.dtype, p.len_q, p.len_kv)) return attention_backward_amx(bp, threads);
#endif
  const Attention<T> at(p);
  Backward<T>(at, bp).run(threads);
}

}  // namespace

void attention_backward(const AttentionBackwardParams& bp, const CpuExec& exec) {
  switch (bp.fwd.dtype) {
    case DType::f32: return run<float>(bp, exec);
    case DType::f64: return run<double>(bp, exec);
    case DType::bf16: return run<Bf16>(bp, exec);
    default: return;  // rejected by the dispatcher's check
  }
}

}  // namespace GK_ISA

#ifdef GK_ISA_baseline
// Entry point: check once, then run the build for the best instruction set of this CPU.
void attention_backward(const AttentionBackwardParams& bp, const CpuExec& exec) {
  bp.check();
  require(bp.fwd.dtype == DType::f32 || bp.fwd.dtype == DType::f64 || bp.fwd.dtype == DType::bf16,
          std::string("attention_backward does not support ") + dtype_name(bp.fwd.dtype) + " on cpu");
  const AttentionParams& p = bp.fwd;
  const size_t size = dtype_size(p.dtype);
  advise_huge_pages(bp.dq, static_cast<size_t>(p.batch * p.heads_q * p.len_q * p.dim_qk) * size);
  advise_huge_pages(bp.dk, static_cast<size_t>(p.batch * p.heads_kv * p.len_kv * p.dim_qk) * size);
  advise_huge_pages(bp.dv, static_cast<size_t>(p.batch * p.heads_kv * p.len_kv * p.dim_v) * size);
  GK_CPU_DISPATCH(attention_backward, bp, exec);
}
#endif

}  // namespace gk
