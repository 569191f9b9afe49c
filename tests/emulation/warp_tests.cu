// Self-tests of warp intrinsics: shuffles against a reference written from
// the CUDA programming guide, votes, __syncwarp, and the faults collectives detect.
#include <cstring>
#include <type_traits>
#include <vector>

#include "harness.h"

using gk_test::expect_fault;
using gk_test::for_each_order;
using gk_test::OrderSetting;

namespace {
constexpr unsigned kFull = 0xFFFFFFFFu;
}

// ---------------------------------------------------------------------------
// Shuffles

enum class Mode { idx, up, down, bfly };

struct ShuffleCase {
  Mode mode;
  int arg;  // source lane, delta or lane mask
  int width;
};

template <class T>
__global__ void run_shuffles(const T* in, T* out, const ShuffleCase* cases, int n_cases) {
  const unsigned t = threadIdx.x;
  const T v = in[t];
  for (int c = 0; c < n_cases; ++c) {
    const ShuffleCase s = cases[c];
    T r = v;
    switch (s.mode) {
      case Mode::idx: r = __shfl_sync(kFull, v, s.arg, s.width); break;
      case Mode::up: r = __shfl_up_sync(kFull, v, unsigned(s.arg), s.width); break;
      case Mode::down: r = __shfl_down_sync(kFull, v, unsigned(s.arg), s.width); break;
      case Mode::bfly: r = __shfl_xor_sync(kFull, v, s.arg, s.width); break;
    }
    out[int64_t(c) * blockDim.x + t] = r;
  }
}

// The lane whose value `lane` receives, as the programming guide describes
// each intrinsic for sub-warps of `width` lanes.
int guide_source_lane(Mode mode, int lane, int arg, int width) {
  const int base = lane / width * width;
  switch (mode) {
    case Mode::idx: return base + ((arg % width) + width) % width;
    case Mode::up: return lane - base >= arg ? lane - arg : lane;
    case Mode::down: return lane - base + arg < width ? lane + arg : lane;
    case Mode::bfly: return (lane ^ arg) / width > lane / width ? lane : lane ^ arg;  // later groups: own value
  }
  return -1;
}

std::vector<ShuffleCase> all_shuffle_cases() {
  std::vector<ShuffleCase> cases;
  for (const int width : {1, 2, 4, 8, 16, 32}) {
    for (const int arg : {0, 1, 3, 5, 16, 31, 37, -3}) cases.push_back({Mode::idx, arg, width});
    for (const Mode mode : {Mode::up, Mode::down, Mode::bfly})
      for (const int arg : {0, 1, 3, 5, 16, 31}) cases.push_back({mode, arg, width});
  }
  return cases;
}

template <class T>
void check_shuffles(T (*make)(int), const char* type, const char* order) {
  const int threads = 64;
  const std::vector<ShuffleCase> cases = all_shuffle_cases();
  std::vector<T> in, out(cases.size() * threads);
  for (int i = 0; i < threads; ++i) in.push_back(make(i));
  gk::launch(run_shuffles<T>, dim3(1), dim3(threads), 0, nullptr, in.data(), out.data(), cases.data(),
             int(cases.size()));
  for (size_t c = 0; c < cases.size(); ++c) {
    for (int t = 0; t < threads; ++t) {
      const int source = t / 32 * 32 + guide_source_lane(cases[c].mode, t % 32, cases[c].arg, cases[c].width);
      CHECK(std::memcmp(&out[c * threads + size_t(t)], &in[size_t(source)], sizeof(T)) == 0,
            "%s, %s: mode %d arg %d width %d thread %d expected the value of thread %d", order, type,
            int(cases[c].mode), cases[c].arg, cases[c].width, t, source);
    }
  }
}

GK_TEST(shuffles_match_programming_guide) {
  for_each_order([](const OrderSetting& o) {
    check_shuffles<int>([](int i) { return i * 7 - 100; }, "int", o.name);
    check_shuffles<unsigned>([](int i) { return 0x80000000u + unsigned(i); }, "unsigned", o.name);
    check_shuffles<float>([](int i) { return float(i) * 1.5f + 0.25f; }, "float", o.name);
    check_shuffles<double>([](int i) { return i * 1e10 + 0.5; }, "double", o.name);
    check_shuffles<long long>([](int i) { return (1LL << 40) * i - i; }, "long long", o.name);
    check_shuffles<float2>([](int i) { return make_float2(float(i), -float(i)); }, "float2", o.name);
    check_shuffles<__half>([](int i) { return __float2half(float(i) + 0.5f); }, "__half", o.name);
    check_shuffles<__nv_bfloat16>([](int i) { return __float2bfloat16(float(i) + 0.5f); }, "__nv_bfloat16", o.name);
    check_shuffles<__half2>([](int i) { return __floats2half2_rn(float(i), -float(i)); }, "__half2", o.name);
    check_shuffles<__nv_bfloat162>([](int i) { return __floats2bfloat162_rn(float(i), 1.0f); }, "__nv_bfloat162",
                                   o.name);
  });
}

// bool and short promote to int, as they do for CUDA's overloads.
__global__ void narrow_integer_shuffles(int* out) {
  const unsigned lane = threadIdx.x;
  const auto flag = __shfl_xor_sync(kFull, lane % 4 == 1, 1);
  const auto small = __shfl_sync(kFull, short(-int(lane)), 3);
  static_assert(std::is_same_v<decltype(flag), const int> && std::is_same_v<decltype(small), const int>);
  out[lane] = flag * 1000 + small;
}

GK_TEST(narrow_integers_shuffle_as_int) {
  std::vector<int> out(32);
  gk::launch(narrow_integer_shuffles, dim3(1), dim3(32), 0, nullptr, out.data());
  for (int lane = 0; lane < 32; ++lane) CHECK(out[size_t(lane)] == ((lane ^ 1) % 4 == 1) * 1000 - 3);
}

// Lanes 0-15 and 16-31 shuffle among themselves at different call sites.
__global__ void half_warp_shuffles(int* out) {
  const unsigned lane = threadIdx.x % 32;
  int v = int(threadIdx.x);
  if (lane < 16)
    v = __shfl_down_sync(0x0000FFFFu, v, 1, 16);
  else
    v = __shfl_up_sync(0xFFFF0000u, v, 2, 16);
  out[threadIdx.x] = v;
}

GK_TEST(disjoint_masks_run_concurrently) {
  for_each_order([](const OrderSetting& o) {
    std::vector<int> out(64);
    gk::launch(half_warp_shuffles, dim3(1), dim3(64), 0, nullptr, out.data());
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32;
      const int expected = lane < 16 ? (lane < 15 ? t + 1 : t) : (lane >= 18 ? t - 2 : t);
      CHECK(out[size_t(t)] == expected, "%s: thread %d got %d", o.name, t, out[size_t(t)]);
    }
  });
}

__global__ void shuffle_outside_mask(int* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane < 16) out[threadIdx.x] = __shfl_down_sync(0x0000FFFFu, int(lane), 1);  // lane 15 reads lane 16
}

GK_TEST(shuffle_from_lane_outside_mask_detected) {
  std::vector<int> out(32);
  expect_fault([&] { gk::launch(shuffle_outside_mask, dim3(1), dim3(32), 0, nullptr, out.data()); },
               {"warp 0, lane 15", "__shfl_down_sync at", "reads lane 16, which is not in mask 0x0000ffff"});
}

__global__ void mismatched_collectives(int* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane < 16)
    out[threadIdx.x] = __shfl_sync(kFull, int(lane), 0);
  else
    out[threadIdx.x] = int(__ballot_sync(kFull, 1));
}

GK_TEST(mismatched_collectives_detected) {
  for_each_order([](const OrderSetting&) {
    std::vector<int> out(32);
    expect_fault([&] { gk::launch(mismatched_collectives, dim3(1), dim3(32), 0, nullptr, out.data()); },
                 {"warp 0: lane", "(mask 0xffffffff)", "while lanes", "__shfl_sync", "__ballot_sync"});
  });
}

__global__ void mask_without_caller() { __syncwarp(1u); }

GK_TEST(mask_must_include_caller) {
  expect_fault([] { gk::launch(mask_without_caller, dim3(1), dim3(32), 0, nullptr); },
               {"lane 1 called __syncwarp", "mask 0x00000001, which does not include the lane"});
}

// Lanes 0-7 meet in a collective of their own, then all lanes in a
// full-warp one that lanes 8-31 reach first: both masks are pending at once.
__global__ void nested_masks(int* out) {
  const unsigned lane = threadIdx.x % 32;
  int v = int(lane);
  if (lane < 8) v = __shfl_xor_sync(0x000000FFu, v, 1);
  out[threadIdx.x] = __shfl_sync(kFull, v, 31 - int(lane));
}

GK_TEST(overlapping_masks_in_sequence) {
  for_each_order([](const OrderSetting& o) {
    std::vector<int> out(32);
    gk::launch(nested_masks, dim3(1), dim3(32), 0, nullptr, out.data());
    for (int lane = 0; lane < 32; ++lane) {
      const int source = 31 - lane;
      CHECK(out[size_t(lane)] == (source < 8 ? source ^ 1 : source), "%s: lane %d", o.name, lane);
    }
  });
}

__global__ void bad_width(int* out) { out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1, 3); }

GK_TEST(invalid_width_detected) {
  std::vector<int> out(32);
  expect_fault([&] { gk::launch(bad_width, dim3(1), dim3(32), 0, nullptr, out.data()); },
               {"width 3 is not a power of two"});
}

__global__ void exit_before_shuffle(int* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, int(threadIdx.x), 1);
}

GK_TEST(exited_lane_in_mask_detected) {
  for_each_order([](const OrderSetting&) {
    std::vector<int> out(32);
    expect_fault([&] { gk::launch(exit_before_shuffle, dim3(1), dim3(32), 0, nullptr, out.data()); },
                 {"deadlock", "threads 7 exited", "wait in __shfl_xor_sync(mask 0xffffffff)"});
  });
}

// ---------------------------------------------------------------------------
// Partial warps: lanes past the end of the block do not exist.

__global__ void partial_warp(unsigned* active, int* swapped) {
  active[threadIdx.x] = __activemask();
  swapped[threadIdx.x] = __shfl_xor_sync(kFull, int(threadIdx.x), 1);
}

GK_TEST(partial_last_warp) {
  std::vector<unsigned> active(48);
  std::vector<int> swapped(48);
  gk::launch(partial_warp, dim3(1), dim3(48), 0, nullptr, active.data(), swapped.data());
  for (int t = 0; t < 48; ++t) {
    CHECK(active[size_t(t)] == (t < 32 ? kFull : 0x0000FFFFu), "thread %d: %08x", t, active[size_t(t)]);
    CHECK(swapped[size_t(t)] == (t ^ 1));
  }
}

__global__ void read_missing_lane(int* out) { out[threadIdx.x] = __shfl_xor_sync(kFull, int(threadIdx.x), 16); }

GK_TEST(partial_warp_missing_lane_detected) {
  std::vector<int> out(48);
  expect_fault([&] { gk::launch(read_missing_lane, dim3(1), dim3(48), 0, nullptr, out.data()); },
               {"warp 1, lane 0", "reads lane 16, which is not in mask 0x0000ffff"});
}

// ---------------------------------------------------------------------------
// Votes and __syncwarp

__device__ int vote_predicate(unsigned t) { return (t * 7 + 3) % 5 < 2; }

__global__ void votes(unsigned* out) {
  const unsigned t = threadIdx.x, lane = t % 32;
  const int pred = vote_predicate(t);
  const unsigned group = lane % 2 == 0 ? 0x55555555u : 0xAAAAAAAAu;  // two disjoint groups
  out[4 * t + 0] = __ballot_sync(kFull, pred);
  out[4 * t + 1] = __ballot_sync(group, pred);
  out[4 * t + 2] = unsigned(__any_sync(group, pred)) | unsigned(__all_sync(group, pred)) << 1;
  out[4 * t + 3] = unsigned(__all_sync(kFull, 1)) | unsigned(__any_sync(kFull, 0)) << 1 |
                   unsigned(__any_sync(kFull, lane == 31)) << 2 | unsigned(__all_sync(kFull, lane != 0)) << 3;
}

GK_TEST(ballot_any_all) {
  for_each_order([](const OrderSetting& o) {
    const int threads = 64;
    std::vector<unsigned> out(4 * threads);
    gk::launch(votes, dim3(1), dim3(threads), 0, nullptr, out.data());
    for (int t = 0; t < threads; ++t) {
      const int lane = t % 32, warp = t / 32;
      const unsigned group = lane % 2 == 0 ? 0x55555555u : 0xAAAAAAAAu;
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l) ballot |= unsigned(vote_predicate(unsigned(warp * 32 + l))) << l;
      const unsigned* v = &out[4 * size_t(t)];
      CHECK(v[0] == ballot, "%s: thread %d", o.name, t);
      CHECK(v[1] == (ballot & group), "%s: thread %d", o.name, t);
      CHECK(v[2] == (unsigned((ballot & group) != 0) | unsigned((ballot & group) == group) << 1), "%s", o.name);
      CHECK(v[3] == (1u | 0u << 1 | 1u << 2 | 0u << 3), "%s", o.name);
    }
  });
}

// Each lane reads its right neighbour's shared-memory slot.
template <bool kSync>
__global__ void rotate_in_warp(const int* in, int* out) {
  __shared__ int s[64];
  const unsigned t = threadIdx.x, lane = t % 32;
  s[t] = in[t];
  if constexpr (kSync) __syncwarp();
  out[t] = s[t - lane + (lane + 1) % 32];
}

// Returns whether rotate_in_warp<kSync> got every value right. Each call uses
// new inputs, so stale shared memory from an earlier call cannot pass.
template <bool kSync>
bool rotation_correct() {
  static int calls = 0;
  ++calls;
  std::vector<int> in(64), out(64);
  for (int t = 0; t < 64; ++t) in[size_t(t)] = t * 3 + calls * 1000;
  gk::launch(rotate_in_warp<kSync>, dim3(1), dim3(64), 0, nullptr, in.data(), out.data());
  for (int t = 0; t < 64; ++t)
    if (out[size_t(t)] != in[size_t(t - t % 32 + (t % 32 + 1) % 32)]) return false;
  return true;
}

GK_TEST(syncwarp_orders_shared_memory) {
  for_each_order([](const OrderSetting& o) {
    CHECK(rotation_correct<true>(), "%s: with __syncwarp", o.name);
    CHECK(!rotation_correct<false>(), "%s: without __syncwarp", o.name);
  });
}
