// Self-tests of the emulated PTX wrappers (ptx.h): mma.m16n8k16 against a
// plain matrix product, ldmatrix fragments, cp.async completion rules.
#include <bit>
#include <cmath>
#include <random>
#include <type_traits>
#include <vector>

#include "common/ptx.h"
#include "harness.h"

using gk_test::expect_fault;
using gk_test::for_each_order;
using gk_test::OrderSetting;

namespace {

template <class Elem>
uint32_t pack(Elem lo, Elem hi) {
  return uint32_t(std::bit_cast<uint16_t>(lo)) | uint32_t(std::bit_cast<uint16_t>(hi)) << 16;
}

template <class Elem>
void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  if constexpr (std::is_same_v<Elem, __half>)
    gk::mma_m16n8k16_f16f32(d, a, b, c);
  else
    gk::mma_m16n8k16_bf16f32(d, a, b, c);
}

template <class Elem>
float to_float(Elem x) {
  if constexpr (std::is_same_v<Elem, __half>)
    return __half2float(x);
  else
    return __bfloat162float(x);
}

template <class Elem>
Elem from_float(float x) {
  if constexpr (std::is_same_v<Elem, __half>)
    return __float2half(x);
  else
    return __float2bfloat16(x);
}

}  // namespace

// ---------------------------------------------------------------------------
// mma.m16n8k16: A is 16x16 row-major, B is 16x8 with element (k, n) at
// B[k * 8 + n], C and D are 16x8 row-major.

// Fragments assembled by hand from the PTX ISA's layout tables; kSwapA
// exchanges two A registers, as a kernel with a wrong layout would.
template <class Elem, bool kSwapA>
__global__ void mma_from_fragments(const Elem* A, const Elem* B, const float* C, float* D) {
  const int lane = int(threadIdx.x), g = lane / 4, t = lane % 4;
  uint32_t a[4] = {pack(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                   pack(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                   pack(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                   pack(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
  if constexpr (kSwapA) std::swap(a[1], a[2]);
  const uint32_t b[2] = {pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
                         pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g])};
  float d[4];
  const float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  mma<Elem>(d, a, b, c);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// The usual way to feed mma: ldmatrix.x4 for A, ldmatrix.x2.trans for the
// k-major B, both from shared memory; accumulates into D in place.
template <class Elem>
__global__ void mma_from_ldmatrix(const Elem* A, const Elem* B, float* D) {
  alignas(16) __shared__ Elem sA[16 * 16];
  __shared__ __align__(16) Elem sB[16 * 8];
  const int lane = int(threadIdx.x), g = lane / 4, t = lane % 4;
  for (int i = lane; i < 16 * 16; i += 32) sA[i] = A[i];
  for (int i = lane; i < 16 * 8; i += 32) sB[i] = B[i];
  __syncwarp();
  uint32_t a[4], b[2];
  gk::ldmatrix_x4(a, &sA[(lane % 16) * 16 + (lane / 16) * 8]);
  gk::ldmatrix_x2_trans(b, &sB[(lane % 16) * 8]);
  float d[4] = {D[g * 8 + 2 * t], D[g * 8 + 2 * t + 1], D[(g + 8) * 8 + 2 * t], D[(g + 8) * 8 + 2 * t + 1]};
  mma<Elem>(d, a, b, d);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

template <class Elem>
struct MmaProblem {
  std::vector<Elem> a = std::vector<Elem>(16 * 16), b = std::vector<Elem>(16 * 8);
  std::vector<float> c = std::vector<float>(16 * 8);

  explicit MmaProblem(unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    for (Elem& x : a) x = from_float<Elem>(dist(rng));
    for (Elem& x : b) x = from_float<Elem>(dist(rng));
    for (float& x : c) x = dist(rng);
  }

  // Largest |D - (A*B + C)|, each error relative to sum |a*b| + |c|.
  double relative_error(const std::vector<float>& d) const {
    double worst = 0;
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        double exact = c[size_t(m * 8 + n)], magnitude = std::fabs(exact);
        for (int k = 0; k < 16; ++k) {
          const double p = double(to_float(a[size_t(m * 16 + k)])) * to_float(b[size_t(k * 8 + n)]);
          exact += p;
          magnitude += std::fabs(p);
        }
        worst = std::max(worst, std::fabs(d[size_t(m * 8 + n)] - exact) / magnitude);
      }
    return worst;
  }
};

template <class Elem>
void check_mma(const char* order) {
  for (unsigned seed = 1; seed <= 3; ++seed) {
    const MmaProblem<Elem> p(seed);
    std::vector<float> d(16 * 8, -1.0f);
    gk::launch(mma_from_fragments<Elem, false>, dim3(1), dim3(32), 0, nullptr, p.a.data(), p.b.data(), p.c.data(),
               d.data());
    CHECK(p.relative_error(d) < 1e-6, "%s: fragments, seed %u: error %g", order, seed, p.relative_error(d));
    d = p.c;
    gk::launch(mma_from_ldmatrix<Elem>, dim3(1), dim3(32), 0, nullptr, p.a.data(), p.b.data(), d.data());
    CHECK(p.relative_error(d) < 1e-6, "%s: ldmatrix, seed %u: error %g", order, seed, p.relative_error(d));
    gk::launch(mma_from_fragments<Elem, true>, dim3(1), dim3(32), 0, nullptr, p.a.data(), p.b.data(), p.c.data(),
               d.data());
    CHECK(p.relative_error(d) > 0.05, "%s: a wrong A layout went unnoticed, seed %u", order, seed);
  }
}

GK_TEST(mma_f16_matches_matrix_product) {
  for_each_order([](const OrderSetting& o) { check_mma<__half>(o.name); });
}

GK_TEST(mma_bf16_matches_matrix_product) {
  for_each_order([](const OrderSetting& o) { check_mma<__nv_bfloat16>(o.name); });
}

__global__ void mma_in_half_warp() {
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {}, d[4];
  gk::mma_m16n8k16_f16f32(d, a, b, c);
}

GK_TEST(mma_needs_full_warp) {
  expect_fault([] { gk::launch(mma_in_half_warp, dim3(1), dim3(16), 0, nullptr); },
               {"mma.m16n8k16.f16", "needs all 32 lanes"});
}

// ---------------------------------------------------------------------------
// ldmatrix: matrix i holds value i*64 + row*8 + col at (row, col). Rows are
// stored in reverse, so only per-lane row addresses find them; lanes whose
// address the instruction ignores pass null.

template <int N, bool kTrans>
void load(uint32_t (&r)[N], const void* row) {
  if constexpr (N == 1)
    kTrans ? gk::ldmatrix_x1_trans(r, row) : gk::ldmatrix_x1(r, row);
  else if constexpr (N == 2)
    kTrans ? gk::ldmatrix_x2_trans(r, row) : gk::ldmatrix_x2(r, row);
  else
    kTrans ? gk::ldmatrix_x4_trans(r, row) : gk::ldmatrix_x4(r, row);
}

template <int N, bool kTrans>
__global__ void load_matrices(uint32_t* out, int misaligned_lane) {
  alignas(16) __shared__ uint16_t stored[4][8][8];
  const int lane = int(threadIdx.x);
  for (int e = lane; e < 4 * 64; e += 32) {
    const int matrix = e / 64, stored_row = e / 8 % 8, col = e % 8;
    stored[matrix][stored_row][col] = uint16_t(matrix * 64 + (7 - stored_row) * 8 + col);
  }
  __syncwarp();
  const uint16_t* row = lane < 8 * N ? stored[lane / 8][7 - lane % 8] : nullptr;
  if (lane == misaligned_lane) ++row;
  uint32_t r[N];
  load<N, kTrans>(r, row);
  for (int i = 0; i < N; ++i) out[lane * N + i] = r[i];
}

template <int N, bool kTrans>
void check_ldmatrix() {
  std::vector<uint32_t> out(32 * N);
  gk::launch(load_matrices<N, kTrans>, dim3(1), dim3(32), 0, nullptr, out.data(), -1);
  const auto value = [](int i, int row, int col) { return uint32_t(i * 64 + row * 8 + col); };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, c = 2 * (lane % 4);
    for (int i = 0; i < N; ++i) {
      const uint32_t lo = kTrans ? value(i, c, g) : value(i, g, c);
      const uint32_t hi = kTrans ? value(i, c + 1, g) : value(i, g, c + 1);
      CHECK(out[size_t(lane * N + i)] == (lo | hi << 16), "x%d%s lane %d matrix %d: %08x, expected %08x", N,
            kTrans ? ".trans" : "", lane, i, out[size_t(lane * N + i)], lo | hi << 16);
    }
  }
}

GK_TEST(ldmatrix_fragments) {
  check_ldmatrix<1, false>();
  check_ldmatrix<2, false>();
  check_ldmatrix<4, false>();
  check_ldmatrix<1, true>();
  check_ldmatrix<2, true>();
  check_ldmatrix<4, true>();
}

GK_TEST(ldmatrix_misaligned_row_detected) {
  std::vector<uint32_t> out(32 * 2);
  expect_fault([&] { gk::launch(load_matrices<2, false>, dim3(1), dim3(32), 0, nullptr, out.data(), 11); },
               {"lane 11", "ldmatrix.x2", "is not 16-byte aligned"});
}

// ---------------------------------------------------------------------------
// cp.async

// Each thread copies one float4 and reads its neighbour's after the barrier.
template <bool kWaitBeforeRead>
__global__ void copy_through_smem(const float4* in, float4* out) {
  GK_DYNAMIC_SMEM(float4, buf);
  const unsigned t = threadIdx.x;
  gk::cp_async_16(&buf[t], &in[t]);
  gk::cp_async_commit();
  if constexpr (kWaitBeforeRead) gk::cp_async_wait<0>();
  __syncthreads();
  out[t] = buf[(t + 1) % blockDim.x];
  __syncthreads();  // all reads happen before any thread waits below
  gk::cp_async_wait<0>();
}

GK_TEST(cp_async_data_visible_only_after_wait) {
  for_each_order([](const OrderSetting& o) {
    const int n = 64;
    std::vector<float4> in(n), out(n);
    for (int i = 0; i < n; ++i) in[size_t(i)] = make_float4(float(i), 1.0f, 2.0f, float(-i));
    gk::launch(copy_through_smem<true>, dim3(1), dim3(n), n * sizeof(float4), nullptr, in.data(), out.data());
    for (int i = 0; i < n; ++i) CHECK(out[size_t(i)].x == float((i + 1) % n) && out[size_t(i)].w == -out[size_t(i)].x);
    gk::launch(copy_through_smem<false>, dim3(1), dim3(n), n * sizeof(float4), nullptr, in.data(), out.data());
    for (int i = 0; i < n; ++i) CHECK(std::isnan(out[size_t(i)].x), "%s: read before wait saw data", o.name);
  });
}

__global__ void cp_async_groups(const int4* in, int4* out) {
  GK_DYNAMIC_SMEM(int4, buf);
  const unsigned t = threadIdx.x, n = blockDim.x;
  gk::cp_async_16(&buf[t], &in[t]);
  gk::cp_async_commit();
  gk::cp_async_16(&buf[n + t], &in[n + t]);
  gk::cp_async_commit();
  gk::cp_async_wait<1>();  // the first group completes, the newest may not
  out[t] = buf[t];
  out[n + t] = buf[n + t];
  gk::cp_async_wait<0>();
  out[2 * n + t] = buf[n + t];
}

GK_TEST(cp_async_wait_group_keeps_newest_groups) {
  const int n = 32;
  std::vector<int4> in(2 * n), out(3 * n);
  for (int i = 0; i < 2 * n; ++i) in[size_t(i)] = make_int4(i, i + 1, i + 2, i + 3);
  gk::launch(cp_async_groups, dim3(1), dim3(n), 2 * n * sizeof(int4), nullptr, in.data(), out.data());
  for (int t = 0; t < n; ++t) {
    CHECK(out[size_t(t)].x == t && out[size_t(t)].w == t + 3);
    CHECK(out[size_t(n + t)].x == -1 && out[size_t(n + t)].w == -1, "thread %d saw an incomplete group", t);
    CHECK(out[size_t(2 * n + t)].x == n + t);
  }
}

__global__ void cp_async_sizes(const uint32_t* in, uint32_t* out) {
  GK_DYNAMIC_SMEM(uint32_t, buf);
  const unsigned t = threadIdx.x;
  gk::cp_async_ca<4>(&buf[t], &in[t]);
  gk::cp_async_ca<8>(&buf[32 + 2 * t], &in[32 + 2 * t]);
  gk::cp_async_ca<16>(&buf[96 + 4 * t], &in[96 + 4 * t]);
  gk::cp_async_wait_all();
  __syncthreads();
  for (unsigned i = t; i < 224; i += blockDim.x) out[i] = buf[i];
}

GK_TEST(cp_async_ca_sizes) {
  std::vector<uint32_t> in(224), out(224);
  for (uint32_t i = 0; i < 224; ++i) in[i] = i * 3 + 1;
  gk::launch(cp_async_sizes, dim3(1), dim3(32), 224 * sizeof(uint32_t), nullptr, in.data(), out.data());
  CHECK(in == out);
}

__global__ void cp_async_misaligned(const float* in) {
  GK_DYNAMIC_SMEM(float, buf);
  gk::cp_async_16(buf + 4 * threadIdx.x, in + 1);
}

GK_TEST(cp_async_misaligned_detected) {
  std::vector<float> in(8);
  expect_fault([&] { gk::launch(cp_async_misaligned, dim3(1), dim3(4), 64, nullptr, in.data()); },
               {"cp.async.cg", "not 16-byte aligned"});
}

// ---------------------------------------------------------------------------
// The kernel that nvcc compiles to check the inline PTX (nvcc_wrappers.cu).

void launch_every_wrapper(const float4* in, float* out, cudaStream_t stream);

GK_TEST(every_wrapper_runs) {
  std::vector<float4> in(32);
  for (int i = 0; i < 32; ++i) in[size_t(i)] = make_float4(float(i % 4), 1.0f, 0.5f, -2.0f);
  std::vector<float> out(32, std::nanf(""));
  launch_every_wrapper(in.data(), out.data(), nullptr);
  for (const float v : out) CHECK(std::isfinite(v));
}
