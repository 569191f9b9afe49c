// Transcendental functions computed the same way on the CPU and the GPU.
//
// The float versions use only IEEE-exact operations (+, *, fma, /, sqrt, rint, bit moves), so a
// CPU kernel and a CUDA kernel that call them produce identical bits, the CPU loops vectorise
// (no libm calls), and noise drawn on either device is the same. Double versions defer to the
// platform's libm, which is accurate to an ulp on both.
#pragma once

#include <cmath>

#include "common/hostdevice.h"

namespace gk {

namespace detail {
// pi/2 split so that k * kPio2Hi is exact for |k| < 2^20 and the three parts carry ~72 bits.
constexpr float kPio2Hi = 0x1.921fb6p+0f;
constexpr float kPio2Mid = -0x1.777a5cp-25f;
constexpr float kPio2Lo = -0x1.ee59dap-50f;
constexpr float kTwoOverPi = 0x1.45f306p-1f;
// ln 2 split so that n * kLn2Hi is exact for |n| < 256.
constexpr float kLn2Hi = 0x1.62e4p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kLog2e = 0x1.715476p+0f;

// sin and cos of r in [-pi/4, pi/4]: sin r = r + r^3 S(r^2), cos r = 1 - r^2/2 + r^4 C(r^2), with S
// and C fitted for relative errors of 3.8e-9 and 1.2e-10 there (Taylor's needs a term more each).
GK_HD void sincos_reduced(float r, float* s, float* c) {
  const float r2 = r * r;
  float ps = fmaf(r2, -0x1.9943e0p-13f, 0x1.11073ap-7f);
  ps = fmaf(r2, ps, -0x1.555546p-3f);
  *s = fmaf(r * r2, ps, r);
  float pc = fmaf(r2, 0x1.99eb9ap-16f, -0x1.6c0c34p-10f);
  pc = fmaf(r2, pc, 0x1.55554ap-5f);
  pc = fmaf(r2, pc, -0.5f);
  *c = fmaf(r2, pc, 1.0f);
}

// Rotates (sin r, cos r) by `quarter` quarter turns (mod 4) with bit operations, exactly: an odd
// count swaps the pair, and the sign bits of sin and cos flip where quarter & 2 and
// (quarter + 1) & 2 are set. Selects, not branches, so that loops over it vectorise.
GK_HD void rotate_quarters(uint32_t quarter, float s, float c, float* sin_out, float* cos_out) {
  const bool swap = (quarter & 1u) != 0;
  *sin_out = bits_float(float_bits(swap ? c : s) ^ ((quarter & 2u) << 30));
  *cos_out = bits_float(float_bits(swap ? s : c) ^ (((quarter + 1u) & 2u) << 30));
}

// k mod 4 as a count of quarter turns, for an integral float k of any size; rint of (k - 1.5) / 4
// never meets a tie, and unlike floor it vectorises. A NaN k (x infinite or NaN, whose sine is
// NaN whatever the rotation) counts 0.
GK_HD uint32_t quarter_turns(float k) {
  const float q = k - 4.0f * rintf((k - 1.5f) * 0.25f);  // small and integral when k is finite
  return q == q ? static_cast<uint32_t>(static_cast<int32_t>(q)) : 0u;
}
}  // namespace detail

// sin(x) and cos(x) to about an ulp for |x| < 2^20 (Cody-Waite reduction with fused
// multiply-adds); larger arguments lose accuracy gradually.
GK_HD void sincos(float x, float* s, float* c) {
  using namespace detail;
  const float k = rintf(x * kTwoOverPi);
  float r = fmaf(-k, kPio2Hi, x);
  r = fmaf(-k, kPio2Mid, r);
  r = fmaf(-k, kPio2Lo, r);
  float sr, cr;
  sincos_reduced(r, &sr, &cr);
  rotate_quarters(quarter_turns(k), sr, cr, s, c);
}

GK_HD void sincos(double x, double* s, double* c) {
  *s = sin(x);
  *c = cos(x);
}

// Natural logarithm of a positive normal float: x = m 2^e with m in [sqrt(1/2), sqrt(2)), found
// by subtracting the bits of sqrt(1/2) (the borrow into the exponent field decides the half),
// f = m - 1 (exact), log m = f - f^2/2 + f^3 Q(f) with Q fitted for relative error 3.1e-8 over
// that range: integer and multiply-add operations only, no division or select.
GK_HD float log_positive(float x) {
  using namespace detail;
  constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;
  const uint32_t shifted = float_bits(x) - kSqrtHalfBits;
  const float e = static_cast<float>(static_cast<int32_t>(shifted) >> 23);
  const float m = bits_float((shifted & 0x007fffffu) + kSqrtHalfBits);
  const float f = m - 1.0f;
  const float f2 = f * f;
  float q = fmaf(f, 0x1.645de2p-4f, -0x1.2432b6p-3f);
  q = fmaf(f, q, 0x1.317474p-3f);
  q = fmaf(f, q, -0x1.53824ap-3f);
  q = fmaf(f, q, 0x1.98d7f0p-3f);
  q = fmaf(f, q, -0x1.000382p-2f);
  q = fmaf(f, q, 0x1.5556d8p-2f);
  const float log_m = f + fmaf(f2 * f, q, -0.5f * f2);
  return fmaf(e, kLn2Hi, fmaf(e, kLn2Lo, log_m));
}

// e^x to about an ulp: x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor series to r^7, then
// scaled by 2^n in two steps so that results near the overflow and underflow limits round once.
GK_HD float exp(float x) {
  using namespace detail;
  float xc = x > -104.0f ? x : -104.0f;  // also maps NaN to a finite value (restored below)
  xc = xc < 89.0f ? xc : 89.0f;
  const float n = rintf(xc * kLog2e);
  float r = fmaf(-n, kLn2Hi, xc);
  r = fmaf(-n, kLn2Lo, r);
  float p = fmaf(r, 1.0f / 5040.0f, 1.0f / 720.0f);
  p = fmaf(r, p, 1.0f / 120.0f);
  p = fmaf(r, p, 1.0f / 24.0f);
  p = fmaf(r, p, 1.0f / 6.0f);
  p = fmaf(r, p, 0.5f);
  p = fmaf(r, p, 1.0f);
  p = fmaf(r, p, 1.0f);
  const int ni = static_cast<int>(n);
  const int n1 = ni >> 1;
  const float scale1 = bits_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float scale2 = bits_float(static_cast<uint32_t>(ni - n1 + 127) << 23);
  const float y = p * scale1 * scale2;
  return x != x ? x : y;
}

GK_HD double exp(double x) { return ::exp(x); }

// Fused multiply-add under one name for both precisions, so templates can call fma(a, b, c).
GK_HD float fma(float a, float b, float c) { return fmaf(a, b, c); }
GK_HD double fma(double a, double b, double c) { return ::fma(a, b, c); }

}  // namespace gk
