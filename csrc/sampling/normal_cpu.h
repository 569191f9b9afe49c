// Standard normals of the Philox stream in blocks, for CPU kernels that draw noise in-kernel.
// Include only from per-instruction-set kernel files: everything here lands in gk::<isa> with
// internal linkage (the ODR rule of common/cpu_isa.h).
#pragma once

#include <cstring>

#include "common/cpu_intrinsics.h"
#include "common/parallel.h"
#include "common/philox.h"

namespace gk {
namespace GK_ISA {
namespace {

// Philox words for several counters at once. x86 has no 32-bit high multiply, and the
// compiler's widening of the scalar form costs twice the even/odd 32x32->64 multiplies below.
// The vector path keeps each counter word in the low half of a 64-bit lane (a Half holds
// kLanes / 2 of them): the even multiply then yields lo in place and hi one shift away, with no
// blends (12 instructions a round for kLanes counters instead of 16). The high halves carry
// junk that no multiply reads and `narrow` drops.
#if defined(__AVX512F__)
GK_INTRINSICS_BEGIN
constexpr int kLanes = 16;
typedef uint32_t Words __attribute__((vector_size(64)));
using Half = __m512i;
Half widen(Words w, int half) {
  const __m512i v = reinterpret_cast<__m512i>(w);
  return _mm512_cvtepu32_epi64(half ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v));
}
Words narrow(Half a, Half b) {
  const __m512i low = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  return reinterpret_cast<Words>(_mm512_permutex2var_epi32(a, low, b));
}
Half mul_even(Half a, uint32_t m) { return _mm512_mul_epu32(a, _mm512_set1_epi64(m)); }
Half high_words(Half p) { return _mm512_srli_epi64(p, 32); }
Half bit_xor(Half a, Half b) { return _mm512_xor_si512(a, b); }
Half add_words(Half a, uint32_t x) { return _mm512_add_epi32(a, _mm512_set1_epi32(static_cast<int>(x))); }
GK_INTRINSICS_END
#elif defined(__AVX2__)
constexpr int kLanes = 8;
typedef uint32_t Words __attribute__((vector_size(32)));
using Half = __m256i;
Half widen(Words w, int half) {
  const __m256i v = reinterpret_cast<__m256i>(w);
  return _mm256_cvtepu32_epi64(half ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v));
}
Words narrow(Half a, Half b) {
  const __m256i interleaved = _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA);  // a0 b0 a1 b1 ...
  return reinterpret_cast<Words>(_mm256_permutevar8x32_epi32(interleaved, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)));
}
Half mul_even(Half a, uint32_t m) { return _mm256_mul_epu32(a, _mm256_set1_epi64x(m)); }
Half high_words(Half p) { return _mm256_srli_epi64(p, 32); }
Half bit_xor(Half a, Half b) { return _mm256_xor_si256(a, b); }
Half add_words(Half a, uint32_t x) { return _mm256_add_epi32(a, _mm256_set1_epi32(static_cast<int>(x))); }
#else
constexpr int kLanes = 1;
using Words = uint32_t;
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
// kLanes counter words as two Halves, the word type of philox_rounds.
struct Wide {
  Half half[2];

  Wide() = default;
  Wide(Half a, Half b) : half{a, b} {}
  explicit Wide(Words w) : half{widen(w, 0), widen(w, 1)} {}

  Words words() const { return narrow(half[0], half[1]); }
  Wide& operator+=(uint32_t x) {
    for (Half& h : half) h = add_words(h, x);
    return *this;
  }
  friend Wide operator^(const Wide& a, const Wide& b) { return Wide(bit_xor(a.half[0], b.half[0]), bit_xor(a.half[1], b.half[1])); }
};
struct WideMulHiLo {
  void operator()(const Wide& a, uint32_t m, Wide& hi, Wide& lo) const {
    for (int i = 0; i < 2; ++i) {
      lo.half[i] = mul_even(a.half[i], m);
      hi.half[i] = high_words(lo.half[i]);
    }
  }
};
// The Philox words of kLanes counters under a key broadcast in k0, k1.
void philox_words(Words (&c)[4], Words k0, Words k1) {
  Wide w[4] = {Wide(c[0]), Wide(c[1]), Wide(c[2]), Wide(c[3])};
  // Every lane of a broadcast key holds it: both halves are the same vector, added to once.
  const Half key0 = reinterpret_cast<Half>(k0), key1 = reinterpret_cast<Half>(k1);
  philox_rounds(w[0], w[1], w[2], w[3], Wide(key0, key0), Wide(key1, key1), WideMulHiLo());
  for (int k = 0; k < 4; ++k) c[k] = w[k].words();
}
#else
void philox_words(Words (&c)[4], Words k0, Words k1) { philox_rounds(c[0], c[1], c[2], c[3], k0, k1); }
#endif

Words broadcast(uint32_t x) {
  Words w = Words{} + x;
  return w;
}

Words lane_index() {
  Words w = Words{};
  for (int i = 0; i < kLanes; ++i) reinterpret_cast<uint32_t*>(&w)[i] = static_cast<uint32_t>(i);
  return w;
}

// Counter groups (4 normals each) generated per step, in structure-of-arrays form so that the
// Box-Muller loop vectorises. Blocks start at multiples of kBlockGroups, so the low counter
// word never carries within a block. 512 normals a block: the stores of a block's outputs drain
// while the next block's normals are computed (q_sample of 64x4x64x64 float32 on 2 threads
// 0.62 -> 0.58 ms against 1,024; 256 no better).
constexpr int64_t kBlockGroups = 128;
constexpr int64_t kBlock = 4 * kBlockGroups;
static_assert(kBlockGroups % kLanes == 0, "whole vectors per block");

// The inputs a kernel reads beside the noise, element for element. normal_block requests the
// lines of the next block of each while it computes: otherwise a block's arithmetic leaves the
// memory idle and its loads then leave the core idle (reparameterize of 16M float32 elements,
// 2 threads, output in cache: 16.5 -> 15.1 ms).
class Lookahead {
 public:
  Lookahead(int64_t n, int64_t element_bytes) : n_(n), element_bytes_(element_bytes) {}

  // Adds an input; a null pointer (an absent input) is ignored, and so are inputs beyond the
  // sixth (a prefetch is only a hint).
  Lookahead& read(const void* data) {
    if (data && count_ < kMaxStreams) streams_[count_++] = static_cast<const char*>(data);
    return *this;
  }

  // Requests part `part` of `parts` of the lines of elements [first, first + kBlock). Always
  // inlined: GCC deems a function that only prefetches free of effects and drops its calls.
  __attribute__((always_inline)) void fetch(int64_t first, int64_t part, int64_t parts) const {
    if (first >= n_) return;
    const int64_t lines = ((n_ - first < kBlock ? n_ - first : kBlock) * element_bytes_ + 63) / 64;
    const int64_t lo = lines * part / parts, hi = lines * (part + 1) / parts;
    for (int s = 0; s < count_; ++s)
      for (int64_t l = lo; l < hi; ++l) __builtin_prefetch(streams_[s] + first * element_bytes_ + 64 * l, 0, 3);
  }

 private:
  static constexpr int kMaxStreams = 6;
  const char* streams_[kMaxStreams] = {};
  int count_ = 0;
  int64_t n_, element_bytes_;
};

// eps[0, kBlock) = the normals of groups [first, first + kBlockGroups) of stream (key, offset);
// meanwhile `ahead`'s lines of the following block are requested.
void normal_block(uint64_t key, uint64_t offset, uint64_t first, float* eps, const Lookahead& ahead) {
  const int64_t next_block = 4 * static_cast<int64_t>(first) + kBlock;
  uint32_t words[4][kBlockGroups];
  const Philox4 ctr = philox_counter(first, offset);
  const Words lanes = lane_index();
  for (int64_t g = 0; g < kBlockGroups; g += kLanes) {
    Words c[4] = {broadcast(ctr.v[0] + static_cast<uint32_t>(g)) + lanes, broadcast(ctr.v[1]), broadcast(ctr.v[2]),
                  broadcast(ctr.v[3])};
    philox_words(c, broadcast(static_cast<uint32_t>(key)), broadcast(static_cast<uint32_t>(key >> 32)));
    for (int k = 0; k < 4; ++k) std::memcpy(&words[k][g], &c[k], sizeof(Words));
    ahead.fetch(next_block, g / kLanes, kBlockGroups / kLanes);
  }
  float z[4][kBlockGroups];
  for (int64_t g = 0; g < kBlockGroups; ++g) {
    box_muller(words[0][g], words[1][g], &z[0][g], &z[1][g]);
    box_muller(words[2][g], words[3][g], &z[2][g], &z[3][g]);
  }
  for (int64_t g = 0; g < kBlockGroups; ++g)
    for (int k = 0; k < 4; ++k) eps[4 * g + k] = z[k][g];
}

// Calls consume(first, count, eps) over consecutive blocks of the stream's normals covering
// elements [0, n), in parallel; eps[j] is the normal of element first + j. `ahead` names the
// inputs that consume reads.
template <class Consume>
void for_each_normal_block(int64_t n, const int64_t* seed, int threads, const Lookahead& ahead, Consume&& consume) {
  const uint64_t key = static_cast<uint64_t>(seed[0]), offset = static_cast<uint64_t>(seed[1]);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(blocks, kMinTaskElements / kBlock, threads, [&](int64_t begin, int64_t end) {
    float eps[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      normal_block(key, offset, static_cast<uint64_t>(b) * kBlockGroups, eps, ahead);
      const int64_t first = b * kBlock;
      consume(first, n - first < kBlock ? n - first : kBlock, static_cast<const float*>(eps));
    }
  });
}

}  // namespace
}  // namespace GK_ISA
}  // namespace gk
