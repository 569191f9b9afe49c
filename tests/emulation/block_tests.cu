// Self-tests of block-level emulation: indexing, __syncthreads and the faults
// it detects, atomics, dynamic shared memory, launch checks, fiber stacks.
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "harness.h"

using gk_test::expect_fault;
using gk_test::for_each_order;
using gk_test::OrderSetting;

// ---------------------------------------------------------------------------
// Indexing

// Each in-range thread writes its indices to out[8 * (linear position)].
__global__ void record_indices(uint32_t* out, int width, int height, int depth) {
  const int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t y = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t z = int64_t(blockIdx.z) * blockDim.z + threadIdx.z;
  if (x >= width || y >= height || z >= depth) return;
  uint32_t* o = out + 8 * ((z * height + y) * width + x);
  o[0] = threadIdx.x;
  o[1] = threadIdx.y;
  o[2] = threadIdx.z;
  o[3] = blockIdx.x;
  o[4] = blockIdx.y;
  o[5] = blockIdx.z;
  o[6] = blockDim.x * 10000 + blockDim.y * 100 + blockDim.z;
  o[7] = gridDim.x * 10000 + gridDim.y * 100 + gridDim.z;
}

GK_TEST(grid_indexing_odd_sizes) {
  const int width = 37, height = 23, depth = 3;
  const dim3 block(7, 5, 2);
  const dim3 grid((width + 6) / 7, (height + 4) / 5, (depth + 1) / 2);
  for_each_order([&](const OrderSetting& o) {
    std::vector<uint32_t> out(size_t(8) * width * height * depth, ~0u);
    gk::launch(record_indices, grid, block, 0, nullptr, out.data(), width, height, depth);
    for (int z = 0; z < depth; ++z)
      for (int y = 0; y < height; ++y)
        for (int x = 0; x < width; ++x) {
          const uint32_t* v = &out[size_t(8) * ((size_t(z) * height + y) * width + x)];
          const uint32_t expected[8] = {uint32_t(x) % block.x, uint32_t(y) % block.y, uint32_t(z) % block.z,
                                        uint32_t(x) / block.x, uint32_t(y) / block.y, uint32_t(z) / block.z,
                                        70502,                 60502};
          for (int i = 0; i < 8; ++i)
            CHECK(v[i] == expected[i], "%s: (%d,%d,%d) field %d is %u, expected %u", o.name, x, y, z, i, v[i],
                  expected[i]);
        }
  });
}

// ---------------------------------------------------------------------------
// __syncthreads

template <bool kSync>
__global__ void block_sum(const float* in, float* out) {
  __shared__ float partial[256];
  const unsigned t = threadIdx.x;
  partial[t] = in[int64_t(blockIdx.x) * blockDim.x + t];
  if constexpr (kSync) __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    if constexpr (kSync) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

// Sums of 256 small integers per block: exact in float, whatever the order.
// Returns the blocks with a wrong sum. Every call uses new inputs, so stale
// shared memory from an earlier call cannot pass for a result.
template <bool kSync>
std::vector<int> wrong_block_sums(int blocks) {
  static int calls = 0;
  ++calls;
  std::vector<float> in(size_t(blocks) * 256), out(size_t(blocks), -1.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = float((i + size_t(calls) * 13) % 97);
  gk::launch(block_sum<kSync>, dim3(blocks), dim3(256), 0, nullptr, in.data(), out.data());
  std::vector<int> wrong;
  for (int b = 0; b < blocks; ++b) {
    float expected = 0;
    for (int i = 0; i < 256; ++i) expected += in[size_t(b) * 256 + i];
    if (out[size_t(b)] != expected) wrong.push_back(b);
  }
  return wrong;
}

GK_TEST(block_reduction_passes_in_every_order) {
  for_each_order([](const OrderSetting& o) { CHECK(wrong_block_sums<true>(5).empty(), "%s", o.name); });
}

// Static __shared__ memory is per OS thread, so blocks may run concurrently.
GK_TEST(blocks_on_several_os_threads) {
  gk_test::DefaultSettingsOnExit restore;
  for (const unsigned workers : {2u, 3u}) {
    gk_emu::set_num_threads(workers);
    CHECK(wrong_block_sums<true>(11).empty(), "%u workers", workers);
  }
}

// Run in reverse, each thread of this tree reduction finds the partial sums
// of higher threads complete, so only the other orders expose the bug.
GK_TEST(block_reduction_without_barrier_fails) {
  for_each_order([](const OrderSetting& o) {
    const bool passes = wrong_block_sums<false>(5).empty();
    CHECK(passes == (o.order == gk_emu::Order::reverse), "%s", o.name);
  });
}

// out[i] = in[i - 1] through shared memory. Without the barrier the forward
// order still happens to work, which is why the reverse and random orders exist.
template <bool kSync>
__global__ void shift_right(const int* in, int* out) {
  __shared__ int s[128];
  const unsigned t = threadIdx.x;
  s[t] = in[t];
  if constexpr (kSync) __syncthreads();
  out[t] = t == 0 ? -1 : s[t - 1];
}

GK_TEST(missing_barrier_needs_reverse_or_random_order) {
  int round = 0;
  for_each_order([&](const OrderSetting& o) {
    std::vector<int> in(128), out(128);
    std::iota(in.begin(), in.end(), 1000 * ++round);
    const auto correct = [&] {
      for (int t = 1; t < 128; ++t)
        if (out[size_t(t)] != in[size_t(t) - 1]) return false;
      return true;
    };
    gk::launch(shift_right<true>, dim3(1), dim3(128), 0, nullptr, in.data(), out.data());
    CHECK(correct(), "%s: with barrier", o.name);
    std::iota(in.begin(), in.end(), 1000 * ++round);  // new values: stale shared memory cannot pass
    gk::launch(shift_right<false>, dim3(1), dim3(128), 0, nullptr, in.data(), out.data());
    CHECK(correct() == (o.order == gk_emu::Order::forward), "%s: without barrier", o.name);
  });
}

__global__ void barrier_reductions(int* out) {
  const unsigned t = threadIdx.x;
  const int count = __syncthreads_count(t % 3 == 0);
  const int all_small = __syncthreads_and(t < 1000);
  const int all_even = __syncthreads_and(t % 2 == 0);
  const int any_last = __syncthreads_or(t == blockDim.x - 1);
  const int any_big = __syncthreads_or(t > 1000);
  out[t] = count * 10000 + all_small * 1000 + all_even * 100 + any_last * 10 + any_big;
}

GK_TEST(syncthreads_count_and_or) {
  for_each_order([](const OrderSetting& o) {
    std::vector<int> out(100);
    gk::launch(barrier_reductions, dim3(2), dim3(100), 0, nullptr, out.data());
    for (const int v : out) CHECK(v == 34 * 10000 + 1000 + 10, "%s: got %d", o.name, v);
  });
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

GK_TEST(divergent_barrier_detected) {
  for_each_order([](const OrderSetting&) {
    std::vector<int> out(64);
    expect_fault([&] { gk::launch(divergent_barrier, dim3(2), dim3(64), 0, nullptr, out.data()); },
                 {"divergent __syncthreads", "divergent_barrier", "block (", "threads 0-31 wait at __syncthreads",
                  "threads 32-63 wait at __syncthreads", "block_tests.cu:"});
  });
}

// A fault abandons the block's fibers; their stacks serve the next launch.
GK_TEST(launch_after_fault_works) {
  static_assert(std::is_base_of_v<std::runtime_error, gk_emu::EmulationError>);
  std::vector<int> out(256);
  expect_fault([&] { gk::launch(divergent_barrier, dim3(3), dim3(256), 0, nullptr, out.data()); }, {"divergent"});
  CHECK(wrong_block_sums<true>(3).empty());
}

__global__ void early_exit_barrier(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

GK_TEST(exited_thread_at_barrier_detected) {
  for_each_order([](const OrderSetting&) {
    std::vector<int> out(64);
    expect_fault([&] { gk::launch(early_exit_barrier, dim3(1), dim3(64), 0, nullptr, out.data()); },
                 {"some threads exited", "threads 5 exited", "threads 0-4, 6-63 wait at __syncthreads"});
  });
}

// Lanes 0-15 wait for lanes 16-31 in __syncwarp, which wait at __syncthreads.
__global__ void warp_block_deadlock() {
  if (threadIdx.x % 32 < 16)
    __syncwarp();
  else
    __syncthreads();
}

GK_TEST(deadlock_detected) {
  for_each_order([](const OrderSetting&) {
    expect_fault([&] { gk::launch(warp_block_deadlock, dim3(1), dim3(64), 0, nullptr); },
                 {"deadlock", "threads 0-15, 32-47 wait in __syncwarp(mask 0xffffffff)",
                  "threads 16-31, 48-63 wait at __syncthreads"});
  });
}

// A 2D block names threads by linear index, and says so.
__global__ void divergent_barrier_2d() {
  if (threadIdx.y == 0) __syncthreads();
}

GK_TEST(fault_message_for_2d_block) {
  expect_fault([] { gk::launch(divergent_barrier_2d, dim3(1), dim3(8, 2), 0, nullptr); },
               {"some threads exited", "threads 0-7 wait at __syncthreads", "threads 8-15 exited",
                "linear thread indices: x + 8*y + 16*z"});
}

__global__ void throwing_kernel() {
  if (threadIdx.x == 3) throw std::runtime_error("boom");
}

GK_TEST(host_exception_in_kernel_reported) {
  expect_fault([] { gk::launch(throwing_kernel, dim3(1), dim3(8), 0, nullptr); },
               {"thread (3,0,0)", "uncaught exception: boom"});
}

// ---------------------------------------------------------------------------
// Atomics

struct AtomicTotals {
  float f = 0;
  double d = 0;
  int i = 0;
  unsigned umax = 0;
  int imin = 0;
  unsigned long long ull = 0;
  int cas = 0;
  unsigned bits = 0;
};

__global__ void atomics(AtomicTotals* totals) {
  const int gid = int(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&totals->f, 0.5f);
  atomicAdd(&totals->d, 0.25);
  atomicAdd(&totals->i, gid);
  atomicMax(&totals->umax, unsigned(gid));
  atomicMin(&totals->imin, -gid);
  atomicAdd(&totals->ull, 1ull << 33);
  atomicOr(&totals->bits, 1u << (gid % 32));
  for (int old = totals->cas, assumed;; old = assumed) {  // increment through atomicCAS
    assumed = atomicCAS(&totals->cas, old, old + 1);
    if (assumed == old) break;
  }
}

GK_TEST(atomics_from_many_blocks) {
  gk_test::DefaultSettingsOnExit restore;
  for (const unsigned workers : {1u, 2u, 3u}) {
    gk_emu::set_num_threads(workers);
    AtomicTotals t;
    const int blocks = 23, threads = 96, n = blocks * threads;
    gk::launch(atomics, dim3(blocks), dim3(threads), 0, nullptr, &t);
    CHECK(t.f == 0.5f * n, "workers %u: float sum %f", workers, double(t.f));
    CHECK(t.d == 0.25 * n, "workers %u: double sum %f", workers, t.d);
    CHECK(t.i == n * (n - 1) / 2, "workers %u: int sum %d", workers, t.i);
    CHECK(t.umax == unsigned(n - 1), "workers %u", workers);
    CHECK(t.imin == -(n - 1), "workers %u", workers);
    CHECK(t.ull == (unsigned long long)n << 33, "workers %u", workers);
    CHECK(t.cas == n, "workers %u: CAS count %d", workers, t.cas);
    CHECK(t.bits == ~0u, "workers %u", workers);
  }
}

__global__ void exchange_and_subtract(int* counter, float* value) {
  atomicSub(counter, 3);
  atomicExch(value, 2.5f);
}

GK_TEST(atomic_exchange_and_sub) {
  int counter = 100;
  float value = 1.5f;
  gk::launch(exchange_and_subtract, dim3(2), dim3(10), 0, nullptr, &counter, &value);
  CHECK(counter == 40 && value == 2.5f);
}

// ---------------------------------------------------------------------------
// Dynamic shared memory

__global__ void read_dynamic_smem(uint32_t* before, float* before_as_float, uint32_t* after) {
  GK_DYNAMIC_SMEM(uint32_t, words);
  GK_DYNAMIC_SMEM(float, floats);
  const unsigned t = threadIdx.x;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + t;
  before[i] = words[t];
  before_as_float[i] = floats[t];
  __syncthreads();
  words[t] = unsigned(i);
  __syncthreads();
  after[i] = words[(t + 1) % blockDim.x];
}

GK_TEST(dynamic_smem_poisoned_in_every_block) {
  const int blocks = 3, threads = 64;
  std::vector<uint32_t> before(blocks * threads), after(blocks * threads);
  std::vector<float> as_float(blocks * threads);
  gk::launch(read_dynamic_smem, dim3(blocks), dim3(threads), threads * sizeof(uint32_t), nullptr, before.data(),
             as_float.data(), after.data());
  for (int i = 0; i < blocks * threads; ++i) {
    CHECK(before[size_t(i)] == 0xFFFFFFFFu, "thread %d read %08x", i, before[size_t(i)]);
    CHECK(std::isnan(as_float[size_t(i)]));
    CHECK(after[size_t(i)] == uint32_t(i / threads * threads + (i + 1) % threads));
  }
}

// Reads the last bytes of a large dynamic shared memory buffer.
__global__ void big_smem_kernel(uint8_t* out, int64_t size) {
  GK_DYNAMIC_SMEM(uint8_t, buf);
  buf[threadIdx.x] = uint8_t(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = buf[size - 1 - threadIdx.x];
}

GK_TEST(dynamic_smem_limit_needs_attribute) {
  std::vector<uint8_t> out(32);
  const size_t bytes = 100 * 1024;
  expect_fault([&] { gk::launch(big_smem_kernel, dim3(1), dim3(32), bytes, nullptr, out.data(), bytes); },
               {"102400 bytes of dynamic shared memory exceed its limit of 49152",
                "cudaFuncAttributeMaxDynamicSharedMemorySize"});
  CHECK(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024) ==
        cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) ==
        cudaSuccess);
  gk::launch(big_smem_kernel, dim3(1), dim3(32), bytes, nullptr, out.data(), bytes);
  for (const uint8_t v : out) CHECK(v == 0xFF);
}

// ---------------------------------------------------------------------------
// Launch checks and the runtime API

__global__ void empty_kernel() {}

GK_TEST(invalid_launch_configurations) {
  expect_fault([] { gk::launch(empty_kernel, dim3(1), dim3(1025), 0, nullptr); }, {"invalid block (1025,1,1)"});
  expect_fault([] { gk::launch(empty_kernel, dim3(1), dim3(2, 2, 65), 0, nullptr); }, {"invalid block"});
  expect_fault([] { gk::launch(empty_kernel, dim3(0), dim3(32), 0, nullptr); }, {"invalid grid (0,1,1)"});
  expect_fault([] { gk::launch(empty_kernel, dim3(1, 70000), dim3(32), 0, nullptr); }, {"invalid grid"});
}

GK_TEST(runtime_api) {
  int count = 0, device = -1;
  CHECK(cudaGetDeviceCount(&count) == cudaSuccess && count == 1);
  CHECK(cudaSetDevice(0) == cudaSuccess);
  CHECK(cudaGetDevice(&device) == cudaSuccess && device == 0);
  CHECK(cudaSetDevice(1) == cudaErrorInvalidDevice);
  CHECK(cudaPeekAtLastError() == cudaErrorInvalidDevice);
  CHECK(std::string(cudaGetErrorString(cudaGetLastError())) == "invalid device ordinal");
  CHECK(cudaGetLastError() == cudaSuccess);
  int a[4] = {1, 2, 3, 4}, b[4] = {};
  cudaStream_t stream = nullptr;
  CHECK(cudaMemcpyAsync(b, a, sizeof(a), cudaMemcpyHostToDevice, stream) == cudaSuccess);
  CHECK(cudaMemsetAsync(a, 0, sizeof(a), stream) == cudaSuccess);
  CHECK(cudaStreamSynchronize(stream) == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess);
  CHECK(b[3] == 4 && a[3] == 0);
}

// ---------------------------------------------------------------------------
// Fiber stacks

__global__ void large_frame(int* out) {
  volatile char buffer[512 * 1024];
  for (size_t i = 0; i < sizeof(buffer); i += 4096) buffer[i] = char(i / 4096);
  out[threadIdx.x] = buffer[4096 * 7];
}

GK_TEST(stack_size_configurable) {
  gk_test::DefaultSettingsOnExit restore;
  gk_emu::set_stack_size(1024 * 1024);
  std::vector<int> out(4);
  gk::launch(large_frame, dim3(2), dim3(4), 0, nullptr, out.data());
  for (const int v : out) CHECK(v == 7);
}

__device__ int recurse(volatile int* depth) {
  volatile char frame[1024];
  frame[0] = char(*depth);
  *depth = *depth + 1;
  if (*depth < 0) return 0;  // never: the depth only grows until the stack overflows
  return recurse(depth) + frame[0];
}

__global__ void overflow_stack(int* out) {
  volatile int depth = 0;
  out[threadIdx.x] = recurse(&depth);
}

// Dies with SIGSEGV on the guard page below the fiber stack.
GK_MANUAL_TEST(stack_overflow) {
  std::vector<int> out(2);
  gk::launch(overflow_stack, dim3(1), dim3(2), 0, nullptr, out.data());
}

// ---------------------------------------------------------------------------
// Orders chosen through GK_EMU_ORDER: prints the order in which the threads
// of each block first ran, blocks in the order they ran.

__global__ void record_first_run(int* sequence, int* counter) {
  const int position = atomicAdd(counter, 1);
  sequence[position] = int(blockIdx.x * blockDim.x + threadIdx.x);
}

GK_MANUAL_TEST(report_order) {
  std::vector<int> sequence(3 * 8);
  int counter = 0;
  gk::launch(record_first_run, dim3(3), dim3(8), 0, nullptr, sequence.data(), &counter);
  std::printf("order:");
  for (const int v : sequence) std::printf(" %d", v);
  std::printf("\n");
}
