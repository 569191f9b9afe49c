// Self-tests of the numeric device API in emulation: fp16 / bf16 conversions
// from the CUDA headers, the device-only extras, and the math intrinsics.
#include <bit>
#include <cmath>
#include <vector>

#include "harness.h"

struct Converted {
  uint16_t half_bits;
  uint16_t bf16_bits;
  float half_back;
  float bf16_back;
  float pair_low;
  float pair_high;
};

__global__ void convert(const float* in, Converted* out) {
  const float x = in[threadIdx.x];
  const __half h = __float2half(x);
  const __nv_bfloat16 b = __float2bfloat16(x);
  const __half2 pair = __floats2half2_rn(x, -2.0f * x);
  const float2 unpacked = __half22float2(pair);
  out[threadIdx.x] = {__half_as_ushort(h), __bfloat16_as_ushort(b), __half2float(h), __bfloat162float(b),
                      unpacked.x,          unpacked.y};
}

// bf16 round-to-nearest-even, from the float bit pattern.
uint16_t bf16_reference(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  return uint16_t((bits + 0x7FFFu + (bits >> 16 & 1u)) >> 16);
}

GK_TEST(half_and_bfloat16_conversions) {
  struct Case {
    float x;
    uint16_t half_bits;  // IEEE binary16, round to nearest even
  };
  const Case cases[] = {{1.0f, 0x3C00},       {1.0f / 3, 0x3555},  {-2.5f, 0xC100},   {65504.0f, 0x7BFF},
                        {65520.0f, 0x7C00},   {1e-8f, 0x0000},     {6e-8f, 0x0001},   {0.1f, 0x2E66},
                        {3.14159265f, 0x4248}, {-0.0f, 0x8000},    {2049.0f, 0x6800}, {2051.0f, 0x6802}};
  const int n = int(std::size(cases));
  std::vector<float> in;
  for (const Case& c : cases) in.push_back(c.x);
  std::vector<Converted> out(size_t(n), Converted{});
  gk::launch(convert, dim3(1), dim3(n), 0, nullptr, in.data(), out.data());
  for (int i = 0; i < n; ++i) {
    const Case& c = cases[i];
    const Converted& r = out[size_t(i)];
    CHECK(r.half_bits == c.half_bits, "half(%g) = %04x, expected %04x", double(c.x), r.half_bits, c.half_bits);
    CHECK(r.bf16_bits == bf16_reference(c.x), "bf16(%g) = %04x", double(c.x), r.bf16_bits);
    if (c.half_bits != 0x7C00) CHECK(std::fabs(r.half_back - c.x) <= std::fabs(c.x) * 0x1p-11f + 0x1p-25f);
    CHECK(r.bf16_back == std::bit_cast<float>(uint32_t(r.bf16_bits) << 16));
    CHECK(r.pair_low == r.half_back && r.pair_high == __half2float(__float2half(-2.0f * c.x)));
  }
}

GK_TEST(device_only_half_functions) {
  const __half a = __float2half(1.5f), b = __float2half(2.0f), c = __float2half(0.25f);
  CHECK(__half2float(__hfma(a, b, c)) == 3.25f);
  const __half2 r = __hfma2(__halves2half2(a, b), __halves2half2(b, b), __halves2half2(c, c));
  CHECK(__low2float(r) == 3.25f && __high2float(r) == 4.25f);
  const __nv_bfloat16 x = __float2bfloat16(4.0f);
  CHECK(__bfloat162float(hsqrt(x)) == 2.0f && __bfloat162float(hrsqrt(x)) == 0.5f);
  CHECK(__half2float(hexp(__float2half(0.0f))) == 1.0f && __half2float(hlog(__float2half(1.0f))) == 0.0f);
}

GK_TEST(math_intrinsics) {
  CHECK(__popc(0xF0F0u) == 8 && __popcll(~0ull) == 64);
  CHECK(__clz(0) == 32 && __clz(1) == 31 && __clz(-1) == 0 && __clzll(1) == 63);
  CHECK(__ffs(0) == 0 && __ffs(8) == 4 && __ffsll(1ll << 40) == 41);
  CHECK(__brev(1u) == 0x80000000u && __brev(0x12345678u) == 0x1E6A2C48u);
  CHECK(__umulhi(0xFFFFFFFFu, 2u) == 1u && __mulhi(-2, 0x40000000) == -1);
  CHECK(__umul64hi(~0ull, 4ull) == 3ull && __mul64hi(-1ll, 5ll) == -1ll);
  CHECK(__mul24(-3, 5) == -15 && __mul24(0x01000001, 2) == 2 && __umul24(0x01000002u, 3u) == 6u);
  CHECK(__float_as_uint(1.0f) == 0x3F800000u && __uint_as_float(0x40000000u) == 2.0f);
  CHECK(__float_as_int(-0.0f) == int(0x80000000u) && __int_as_float(0) == 0.0f);
  CHECK(__double_as_longlong(1.0) == 0x3FF0000000000000ll && __longlong_as_double(0) == 0.0);
  CHECK(rsqrtf(4.0f) == 0.5f && __fdividef(1.0f, 4.0f) == 0.25f && __saturatef(1.5f) == 1.0f);
  CHECK(__saturatef(std::nanf("")) == 0.0f && __expf(0.0f) == 1.0f && __logf(1.0f) == 0.0f);
  float s = 1, c = 0;
  __sincosf(0.0f, &s, &c);
  CHECK(s == 0.0f && c == 1.0f);
  sincosf(0.0f, &s, &c);
  CHECK(s == 0.0f && c == 1.0f && exp2f(3.0f) == 8.0f && fmaf(2.0f, 3.0f, 1.0f) == 7.0f);
  CHECK(min(3, 5u) == 3u && max(-1, 2) == 2 && min(2.0f, 1.5) == 1.5 && max(std::nanf(""), 1.0f) == 1.0f);
}
