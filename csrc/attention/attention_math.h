// Attention math shared by the CPU and CUDA kernels: the band of allowed keys and dropout of
// the attention weights.
//
// Band: key j is allowed for query i when -left <= j - (i + diagonal) <= right, a negative
// bound meaning unbounded on that side (attention.h). The functions below give the ends of the
// allowed ranges before clamping to the keys or queries that exist; all are nondecreasing.
//
// Weight (b, h, i, j) of an attention with heads_q query heads, len_q queries and len_kv keys is
// element e = ((b * heads_q + h) * len_q + i) * len_kv + j of a Philox4x32-10 stream keyed by
// the seed: word e % 4 of counter (e / 4, offset). It is kept when that word is at least
// threshold = round(p * 2^32), so with probability 1 - p (to 2^-32), and a kept weight is
// scaled by 1 / (1 - p). The forward and the backward pass regenerate the same mask from the
// seed, on any device, and never store it.
#pragma once

#include <cstdint>

#include "attention/attention.h"
#include "common/hostdevice.h"
#include "common/philox.h"

namespace gk {

GK_HD int64_t band_first_key(int64_t i, int64_t diagonal, int64_t left) { return left < 0 ? INT64_MIN / 4 : i + diagonal - left; }
GK_HD int64_t band_end_key(int64_t i, int64_t diagonal, int64_t right) { return right < 0 ? INT64_MAX / 4 : i + diagonal + right + 1; }
GK_HD int64_t band_first_query(int64_t j, int64_t diagonal, int64_t right) { return right < 0 ? INT64_MIN / 4 : j - diagonal - right; }
GK_HD int64_t band_end_query(int64_t j, int64_t diagonal, int64_t left) { return left < 0 ? INT64_MAX / 4 : j - diagonal + left + 1; }

struct DropoutStream {
  uint64_t seed, offset;
  uint64_t threshold;  // keep when the word is >= threshold; 2^32 drops every weight
  int64_t heads_q, len_q, len_kv;
};

// p * 2^32 is exact in double, so this rounds once (as genkernels.reference does).
GK_HD uint64_t dropout_threshold(double p) { return static_cast<uint64_t>(p * 4294967296.0 + 0.5); }

// The factor of a kept weight: 1 / (1 - p); 0 for p = 1, where every weight is dropped.
GK_HD double dropout_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

// seed[0] is the Philox key, seed[1] the stream offset (python/genkernels/_rng.py).
GK_HD DropoutStream dropout_stream(const int64_t* seed, double p, int64_t heads_q, int64_t len_q, int64_t len_kv) {
  return DropoutStream{static_cast<uint64_t>(seed[0]), static_cast<uint64_t>(seed[1]), dropout_threshold(p), heads_q,
                       len_q, len_kv};
}

// The dropout stream of an attention problem (used only when p.seed is set); on a GPU the seed
// is read on the device, so drawing it never synchronises with the host.
GK_HD DropoutStream attention_dropout(const AttentionParams& p) {
  return p.seed != nullptr ? dropout_stream(p.seed, p.dropout_p, p.heads_q, p.len_q, p.len_kv) : DropoutStream{};
}

GK_HD uint64_t dropout_element(const DropoutStream& d, int64_t b, int64_t h, int64_t i, int64_t j) {
  return static_cast<uint64_t>(((b * d.heads_q + h) * d.len_q + i) * d.len_kv + j);
}

// The four words of counter `group`: elements 4 group .. 4 group + 3.
GK_HD Philox4 dropout_words(const DropoutStream& d, uint64_t group) {
  return philox4x32_10(philox_counter(group, d.offset), static_cast<uint32_t>(d.seed),
                       static_cast<uint32_t>(d.seed >> 32));
}

GK_HD bool dropout_keeps_word(const DropoutStream& d, uint32_t word) { return word >= d.threshold; }

// Whether element e is kept (one Philox block per call: for callers that need single elements).
GK_HD bool dropout_keeps(const DropoutStream& d, uint64_t e) {
  const Philox4 w = dropout_words(d, e / 4);
  const uint32_t r = static_cast<uint32_t>(e % 4);  // selects, not an indexed array: no stack frame on the GPU
  return dropout_keeps_word(d, r == 0 ? w.v[0] : r == 1 ? w.v[1] : r == 2 ? w.v[2] : w.v[3]);
}

// The dropout factor of element e: keep_scale = 1 / (1 - p) when kept, else 0.
template <class C>
GK_HD C dropout_factor(const DropoutStream& d, uint64_t e, C keep_scale) {
  return dropout_keeps(d, e) ? keep_scale : C(0);
}

}  // namespace gk
