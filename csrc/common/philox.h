// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11) and standard normals from it by the Box-Muller transform.
//
// A draw is addressed by (seed, offset, index): the key is the 64-bit seed, the counter is
// (index / 4, offset), and element `index` takes normal `index % 4` of that counter's four.
// Any element can be regenerated alone, and the CPU and CUDA kernels give the same bits.
#pragma once

#include "common/hostdevice.h"
#include "common/portable_math.h"

namespace gk {

struct Philox4 {
  uint32_t v[4];
};

// The high and low words of a * m: the one wide multiply of a Philox round.
struct MulHiLo32 {
  GK_HD void operator()(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) const {
#ifdef __CUDA_ARCH__
    hi = __umulhi(a, m);
#else
    hi = static_cast<uint32_t>((static_cast<uint64_t>(a) * m) >> 32);
#endif
    lo = a * m;
  }
};

// Ten rounds of the Philox S-box and key schedule (constants from the paper) on counter words
// c0..c3 under key (k0, k1). W is uint32_t, or a vector of them on the CPU with a matching
// mulhilo, so that the CPU can run several counters per instruction with the same rounds.
template <class W, class MulHiLo = MulHiLo32>
GK_HD void philox_rounds(W& c0, W& c1, W& c2, W& c3, W k0, W k1, MulHiLo mulhilo = MulHiLo()) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  GK_UNROLL
  for (int round = 0; round < 10; ++round) {
    W hi0, lo0, hi1, lo1;
    mulhilo(c0, kM0, hi0, lo0);
    mulhilo(c2, kM1, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
}

GK_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  philox_rounds(ctr.v[0], ctr.v[1], ctr.v[2], ctr.v[3], k0, k1);
  return ctr;
}

// Two standard normals from two 32-bit words by the Box-Muller transform,
// z = sqrt(-2 ln u1) (cos theta, sin theta):
// - u1 in (0, 1] from the top 24 bits of a, so that log u1 is finite and |z| <= 5.77;
// - theta a point r of the arc [-pi/4, pi/4) from the top 24 bits of b, carried by one of the
//   eight symmetries of the square that b's three low bits pick (swap the coordinates, negate
//   either): each quarter of the circle is the image of the arc under two of them, so theta is
//   uniform on the circle, with no range reduction.
GK_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  // Signed conversions: exact below 2^24, and they vectorise where unsigned ones do not (AVX2).
  const float u1 = static_cast<float>(static_cast<int32_t>(a >> 8) + 1) * 0x1p-24f;
  const float r = fmaf(static_cast<float>(static_cast<int32_t>(b >> 8)), detail::kPio2Hi * 0x1p-24f, -0.5f * detail::kPio2Hi);
  const float radius = sqrtf(-2.0f * log_positive(u1));
  float s, c;
  detail::sincos_reduced(r, &s, &c);
  const bool swap = (b & 4u) != 0;
  *z0 = bits_float(float_bits(radius * (swap ? s : c)) ^ (b << 31));
  *z1 = bits_float(float_bits(radius * (swap ? c : s)) ^ ((b << 30) & 0x80000000u));
}

// The counter of group `group` in stream `offset`.
GK_HD Philox4 philox_counter(uint64_t group, uint64_t offset) {
  return Philox4{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), static_cast<uint32_t>(offset),
                  static_cast<uint32_t>(offset >> 32)}};
}

// The four standard normals of counter `ctr` under key `seed`.
GK_HD void normal4(Philox4 ctr, uint64_t seed, float z[4]) {
  const Philox4 r = philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(r.v[0], r.v[1], &z[0], &z[1]);
  box_muller(r.v[2], r.v[3], &z[2], &z[3]);
}

}  // namespace gk
