// Measures what emulation costs: a __syncthreads and a shuffle per thread,
// and a small tiled matrix multiply (4 blocks x 128 threads). Prints
// "key=value" pairs for test_emulator.py.
#include <chrono>
#include <cmath>
#include <vector>

#include "harness.h"

namespace {

template <class F>
double seconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

__global__ void barrier_loop(int iterations, int* out) {
  int x = 0;
  for (int i = 0; i < iterations; ++i) {
    x += i;
    __syncthreads();
  }
  out[threadIdx.x] = x;
}

__global__ void shuffle_loop(int iterations, float* out) {
  float v = float(threadIdx.x);
  for (int i = 0; i < iterations; ++i) v += __shfl_xor_sync(0xFFFFFFFFu, v, i & 31);
  out[threadIdx.x] = v;
}

// C = A * B for row-major A (M x K) and B (K x N); each 128-thread block
// computes a 64x64 tile of C, 32 outputs per thread, through 64x16 tiles of A and B.
constexpr int kTile = 64, kTileK = 16;

__global__ void __launch_bounds__(128) tiled_matmul(const float* __restrict__ A, const float* __restrict__ B,
                                                    float* __restrict__ C, int N, int K) {
  __shared__ float As[kTileK][kTile];
  __shared__ float Bs[kTileK][kTile];
  const int t = int(threadIdx.x), row0 = int(blockIdx.y) * kTile, col0 = int(blockIdx.x) * kTile;
  const int tx = t % 16, ty = t / 16;  // thread (ty, tx) owns rows ty + 8*i, columns 4*tx .. 4*tx+3
  float acc[8][4] = {};
  for (int k0 = 0; k0 < K; k0 += kTileK) {
    for (int e = t; e < kTile * kTileK; e += 128) {
      const int r = e / kTileK, k = e % kTileK;
      As[k][r] = A[int64_t(row0 + r) * K + k0 + k];
      Bs[e / kTile][e % kTile] = B[int64_t(k0 + e / kTile) * N + col0 + e % kTile];
    }
    __syncthreads();
    for (int k = 0; k < kTileK; ++k)
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += As[k][ty + 8 * i] * Bs[k][4 * tx + j];
    __syncthreads();
  }
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 4; ++j) C[int64_t(row0 + ty + 8 * i) * N + col0 + 4 * tx + j] = acc[i][j];
}

GK_MANUAL_TEST(bench) {
  const int threads = 256, iterations = 2000;
  std::vector<int> ints(threads);
  std::vector<float> floats(threads);
  gk::launch(barrier_loop, dim3(1), dim3(threads), 0, nullptr, 1, ints.data());  // warm up the fiber stacks
  const double barrier_s =
      seconds([&] { gk::launch(barrier_loop, dim3(1), dim3(threads), 0, nullptr, iterations, ints.data()); });
  const double shuffle_s =
      seconds([&] { gk::launch(shuffle_loop, dim3(1), dim3(threads), 0, nullptr, iterations, floats.data()); });

  const int M = 128, N = 128, K = 256;
  std::vector<float> A(size_t(M) * K), B(size_t(K) * N), C(size_t(M) * N);
  for (size_t i = 0; i < A.size(); ++i) A[i] = float(i % 7) - 3.0f;
  for (size_t i = 0; i < B.size(); ++i) B[i] = float(i % 5) - 2.0f;
  const double matmul_s = seconds([&] {
    gk::launch(tiled_matmul, dim3(N / kTile, M / kTile), dim3(128), 0, nullptr, A.data(), B.data(), C.data(), N, K);
  });
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float expected = 0;
      for (int k = 0; k < K; ++k) expected += A[size_t(m) * K + k] * B[size_t(k) * N + n];
      CHECK(C[size_t(m) * N + n] == expected, "C[%d][%d]", m, n);
    }
  std::printf("syncthreads_ns=%.1f shuffle_ns=%.1f matmul_4x128_ms=%.2f\n", barrier_s / (threads * iterations) * 1e9,
              shuffle_s / (threads * iterations) * 1e9, matmul_s * 1e3);
}
