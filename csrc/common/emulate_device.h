// Device-side CUDA API for the emulator (see emulate.h): built-in index
// variables, barriers, warp intrinsics, atomics and the math intrinsics that
// the host headers do not provide.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#include "emulate_scheduler.h"

namespace gk_emu::detail {

inline Worker& current_worker() { return *current_thread().worker; }

inline const uint3& thread_index() { return current_thread().index; }
inline const uint3& block_index() { return current_worker().block_index(); }
inline const dim3& block_dim() { return current_worker().block_dim(); }
inline const dim3& grid_dim() { return current_worker().grid_dim(); }
inline std::byte* dynamic_smem() { return current_worker().dynamic_smem(); }

[[noreturn]] inline void fail(std::string message) { current_worker().fail(std::move(message)); }

// Who faulted, for messages: "thread (3,0,0)"; "warp 1, lane 3" in a collective,
// which the last lane to arrive runs for all.
inline std::string thread_name() {
  const uint3 i = current_thread().index;
  return strprintf("thread (%u,%u,%u)", i.x, i.y, i.z);
}
inline std::string lane_name(uint32_t lane) { return strprintf("warp %u, lane %u", current_thread().rank / 32, lane); }

inline uint32_t block_barrier(const char* name, int predicate, const std::source_location& site) {
  return current_worker().block_barrier(name, predicate, site);
}

template <class Args>
void warp_collective(const char* name, uint32_t mask, Args& mine, void (*run)(Args* const (&)[32], uint32_t),
                     const std::source_location& site) {
  current_worker().warp_collective(name, mask, mine, run, site);
}

// --- shuffles: PTX shfl.sync semantics, with the clamp value CUDA derives from `width`

enum class Shfl { idx, up, down, bfly };

struct ShflArgs {
  uint64_t value;
  uint64_t result;
  uint32_t b;  // source lane, delta or lane mask
  int32_t width;
  const char* name;
  std::source_location site;
};

template <Shfl Mode>
void shfl_run(ShflArgs* const (&lanes)[32], uint32_t mask) {
  for (uint32_t lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1)) continue;
    ShflArgs& a = *lanes[lane];
    // CUDA passes c = ((32 - width) << 8) | clamp, clamp = 0 for up and 31 otherwise.
    const uint32_t segmask = uint32_t(32 - a.width) & 31;
    const uint32_t clamp = Mode == Shfl::up ? 0 : 31;
    const int32_t max_lane = int32_t((lane & segmask) | (clamp & ~segmask));
    const int32_t min_lane = int32_t(lane & segmask);
    const int32_t b = int32_t(a.b & 31);
    int32_t j = 0;
    bool in_range = false;
    switch (Mode) {
      case Shfl::up: j = int32_t(lane) - b; in_range = j >= max_lane; break;
      case Shfl::down: j = int32_t(lane) + b; in_range = j <= max_lane; break;
      case Shfl::bfly: j = int32_t(lane) ^ b; in_range = j <= max_lane; break;
      case Shfl::idx: j = min_lane | (b & ~int32_t(segmask)); in_range = j <= max_lane; break;
    }
    if (!in_range) j = int32_t(lane);
    if (!(mask >> j & 1))
      fail(strprintf("%s: %s at %s reads lane %d, which is not in mask 0x%08x", lane_name(lane).c_str(), a.name,
                     where(a.site).c_str(), j, mask));
    a.result = lanes[j]->value;
  }
}

template <class T, class... Allowed>
concept OneOf = (std::is_same_v<T, Allowed> || ...);

// What CUDA shuffles: 4- and 8-byte values, and the 16-bit float types
// (their pairs are not trivially copyable, but are plain bits all the same).
template <class T>
concept Shuffleable = (std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8)) ||
                      OneOf<T, __half, __nv_bfloat16, __half2, __nv_bfloat162>;

// Integers narrower than int shuffle as int, as CUDA's overloads promote them.
template <class T>
using shuffled_t = std::conditional_t<std::is_integral_v<T> && sizeof(T) < sizeof(int), int, T>;

template <Shfl Mode, class T>
shuffled_t<T> shuffle(const char* name, uint32_t mask, T var, uint32_t b, int width,
                      const std::source_location& site) {
  using S = shuffled_t<T>;
  static_assert(Shuffleable<S>, "shuffles take 4- or 8-byte values, or __half, __nv_bfloat16 and their pairs");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(strprintf("%s: %s at %s: width %d is not a power of two in [1, 32]", thread_name().c_str(), name,
                   where(site).c_str(), width));
  S out = var;
  ShflArgs args{0, 0, b, width, name, site};
  std::memcpy(&args.value, &out, sizeof(S));
  warp_collective(name, mask, args, &shfl_run<Mode>, site);
  std::memcpy(static_cast<void*>(&out), &args.result, sizeof(S));
  return out;
}

// --- votes

enum class Vote { ballot, any, all };

struct VoteArgs {
  int predicate;
  uint32_t result;
};

template <Vote V>
void vote_run(VoteArgs* const (&lanes)[32], uint32_t mask) {
  uint32_t ballot = 0;
  for (uint32_t lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1) && lanes[lane]->predicate != 0) ballot |= 1u << lane;
  const uint32_t result = V == Vote::ballot ? ballot : V == Vote::any ? ballot != 0 : ballot == mask;
  for (uint32_t lane = 0; lane < 32; ++lane)
    if (mask >> lane & 1) lanes[lane]->result = result;
}

template <Vote V>
uint32_t vote(const char* name, uint32_t mask, int predicate, const std::source_location& site) {
  VoteArgs args{predicate, 0};
  warp_collective(name, mask, args, &vote_run<V>, site);
  return args.result;
}

struct NoArgs {};
inline void no_op_run(NoArgs* const (&)[32], uint32_t) {}

// --- atomics: relaxed read-modify-writes, atomic also across worker OS threads

template <class T>
std::atomic_ref<T> atomic_at(T* address) {
  if (reinterpret_cast<uintptr_t>(address) % std::atomic_ref<T>::required_alignment != 0)
    fail(strprintf("%s: atomic operation on misaligned address %p", thread_name().c_str(),
                   static_cast<void*>(address)));
  return std::atomic_ref<T>(*address);
}

// Applies `update(old)` atomically; returns the old value.
template <class T, class F>
T atomic_update(T* address, F update) {
  auto ref = atomic_at(address);
  T old = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(old, update(old), std::memory_order_relaxed)) {
  }
  return old;
}

template <class T>
float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(x);
  else
    return __bfloat162float(x);
}
template <class T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(x);
  else
    return __float2bfloat16_rn(x);
}

template <class T>
concept Half = OneOf<T, __half, __nv_bfloat16>;
template <class T>
concept Half2 = OneOf<T, __half2, __nv_bfloat162>;

}  // namespace gk_emu::detail

// ---------------------------------------------------------------------------
// Built-in variables

#define threadIdx (::gk_emu::detail::thread_index())
#define blockIdx (::gk_emu::detail::block_index())
#define blockDim (::gk_emu::detail::block_dim())
#define gridDim (::gk_emu::detail::grid_dim())
inline constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Barriers and warp intrinsics. The trailing source_location identifies the
// call site: divergent barriers are threads waiting at different sites.

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  gk_emu::detail::block_barrier("__syncthreads", 0, site);
}
inline int __syncthreads_count(int predicate, std::source_location site = std::source_location::current()) {
  return int(gk_emu::detail::block_barrier("__syncthreads_count", predicate, site));
}
inline int __syncthreads_and(int predicate, std::source_location site = std::source_location::current()) {
  return gk_emu::detail::block_barrier("__syncthreads_and", predicate, site) ==
         gk_emu::detail::current_worker().block_size();
}
inline int __syncthreads_or(int predicate, std::source_location site = std::source_location::current()) {
  return gk_emu::detail::block_barrier("__syncthreads_or", predicate, site) != 0;
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, std::source_location site = std::source_location::current()) {
  gk_emu::detail::NoArgs args;
  gk_emu::detail::warp_collective("__syncwarp", mask, args, &gk_emu::detail::no_op_run, site);
}

template <class T>
auto __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
                 std::source_location site = std::source_location::current()) {
  using gk_emu::detail::Shfl;
  return gk_emu::detail::shuffle<Shfl::idx>("__shfl_sync", mask, var, uint32_t(srcLane), width, site);
}
template <class T>
auto __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                    std::source_location site = std::source_location::current()) {
  using gk_emu::detail::Shfl;
  return gk_emu::detail::shuffle<Shfl::up>("__shfl_up_sync", mask, var, delta, width, site);
}
template <class T>
auto __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                      std::source_location site = std::source_location::current()) {
  using gk_emu::detail::Shfl;
  return gk_emu::detail::shuffle<Shfl::down>("__shfl_down_sync", mask, var, delta, width, site);
}
template <class T>
auto __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                     std::source_location site = std::source_location::current()) {
  using gk_emu::detail::Shfl;
  return gk_emu::detail::shuffle<Shfl::bfly>("__shfl_xor_sync", mask, var, uint32_t(laneMask), width, site);
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location site = std::source_location::current()) {
  using gk_emu::detail::Vote;
  return gk_emu::detail::vote<Vote::ballot>("__ballot_sync", mask, predicate, site);
}
inline int __any_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  using gk_emu::detail::Vote;
  return int(gk_emu::detail::vote<Vote::any>("__any_sync", mask, predicate, site));
}
inline int __all_sync(unsigned mask, int predicate, std::source_location site = std::source_location::current()) {
  using gk_emu::detail::Vote;
  return int(gk_emu::detail::vote<Vote::all>("__all_sync", mask, predicate, site));
}
// Lanes of the warp that have not exited. Fibers have no notion of
// convergence, so this may name lanes that a GPU would report inactive.
inline unsigned __activemask() {
  const auto& t = gk_emu::detail::current_thread();
  return t.worker->active_mask(t);
}

// Fibers of a block never run concurrently; blocks on other worker threads
// only share global memory.
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __ldg(const T* address) {
  return *address;
}

// ---------------------------------------------------------------------------
// Atomics, with the overload sets CUDA provides. The value parameter does not
// take part in deduction, so atomicAdd(float*, 1.0) converts like CUDA's.

template <gk_emu::detail::OneOf<int, unsigned, unsigned long long, float, double> T>
T atomicAdd(T* address, std::type_identity_t<T> val) {
  return gk_emu::detail::atomic_at(address).fetch_add(val, std::memory_order_relaxed);
}
template <gk_emu::detail::OneOf<int, unsigned> T>
T atomicSub(T* address, std::type_identity_t<T> val) {
  return gk_emu::detail::atomic_at(address).fetch_sub(val, std::memory_order_relaxed);
}
template <gk_emu::detail::OneOf<int, unsigned, unsigned long long, float> T>
T atomicExch(T* address, std::type_identity_t<T> val) {
  return gk_emu::detail::atomic_at(address).exchange(val, std::memory_order_relaxed);
}
template <gk_emu::detail::OneOf<int, unsigned, long long, unsigned long long> T>
T atomicMax(T* address, std::type_identity_t<T> val) {
  return gk_emu::detail::atomic_update(address, [val](T old) { return old < val ? val : old; });
}
template <gk_emu::detail::OneOf<int, unsigned, long long, unsigned long long> T>
T atomicMin(T* address, std::type_identity_t<T> val) {
  return gk_emu::detail::atomic_update(address, [val](T old) { return val < old ? val : old; });
}
template <gk_emu::detail::OneOf<int, unsigned, unsigned long long> T>
T atomicAnd(T* address, std::type_identity_t<T> val) {
  return gk_emu::detail::atomic_at(address).fetch_and(val, std::memory_order_relaxed);
}
template <gk_emu::detail::OneOf<int, unsigned, unsigned long long> T>
T atomicOr(T* address, std::type_identity_t<T> val) {
  return gk_emu::detail::atomic_at(address).fetch_or(val, std::memory_order_relaxed);
}
template <gk_emu::detail::OneOf<int, unsigned, unsigned long long> T>
T atomicXor(T* address, std::type_identity_t<T> val) {
  return gk_emu::detail::atomic_at(address).fetch_xor(val, std::memory_order_relaxed);
}
template <gk_emu::detail::OneOf<int, unsigned, unsigned long long, unsigned short> T>
T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val) {
  gk_emu::detail::atomic_at(address).compare_exchange_strong(compare, val, std::memory_order_relaxed);
  return compare;  // the old value, whether or not it was replaced
}

// ---------------------------------------------------------------------------
// Math intrinsics. The fast-math variants compute the accurate result.

// glibc declares these names itself (with C linkage), so they are defined to match.
extern "C" {
inline float __expf(float x) noexcept { return expf(x); }
inline float __logf(float x) noexcept { return logf(x); }
inline float __log2f(float x) noexcept { return log2f(x); }
inline float __log10f(float x) noexcept { return log10f(x); }
inline float __exp10f(float x) noexcept { return powf(10.0f, x); }
inline float __sinf(float x) noexcept { return sinf(x); }
inline float __cosf(float x) noexcept { return cosf(x); }
inline float __tanf(float x) noexcept { return tanf(x); }
inline float __powf(float x, float y) noexcept { return powf(x, y); }
inline void __sincosf(float x, float* s, float* c) noexcept { sincosf(x, s, c); }
}

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }

inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(unsigned(x)); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(unsigned(x)) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero((unsigned long long)x) + 1; }
inline unsigned __brev(unsigned x) {
  x = (x >> 1 & 0x55555555u) | (x & 0x55555555u) << 1;
  x = (x >> 2 & 0x33333333u) | (x & 0x33333333u) << 2;
  x = (x >> 4 & 0x0F0F0F0Fu) | (x & 0x0F0F0F0Fu) << 4;
  return __builtin_bswap32(x);
}
inline unsigned __umulhi(unsigned x, unsigned y) { return unsigned((uint64_t(x) * y) >> 32); }
inline int __mulhi(int x, int y) { return int((int64_t(x) * y) >> 32); }
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
  return (unsigned long long)((unsigned __int128)x * y >> 64);
}
inline long long __mul64hi(long long x, long long y) { return (long long)((__int128)x * y >> 64); }
// 24-bit multiplies use the low 24 bits of each operand (sign-extended for __mul24).
inline int __mul24(int x, int y) {
  const auto low24 = [](int v) { return int32_t(uint32_t(v) << 8) >> 8; };
  return int(uint32_t(int64_t(low24(x)) * low24(y)));
}
inline unsigned __umul24(unsigned x, unsigned y) { return (x & 0xFFFFFFu) * (y & 0xFFFFFFu); }

// CUDA's min/max: integer overloads follow the usual arithmetic conversions,
// floating-point ones return the non-NaN operand like fminf/fmaxf.
template <class A, class B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>)
    return std::fmin(C(a), C(b));
  else
    return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>)
    return std::fmax(C(a), C(b));
  else
    return C(a) < C(b) ? C(b) : C(a);
}

// ---------------------------------------------------------------------------
// fp16 / bf16 functions that cuda_fp16.h and cuda_bf16.h declare for device
// code only: computed in float (products of 16-bit values are exact there).

template <gk_emu::detail::Half T>
T __hfma(T a, T b, T c) {
  using namespace gk_emu::detail;
  return from_float<T>(float(double(to_float(a)) * to_float(b) + to_float(c)));
}
template <gk_emu::detail::Half2 T>
T __hfma2(T a, T b, T c) {
  return T(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
template <gk_emu::detail::Half T>
T hexp(T x) {
  return gk_emu::detail::from_float<T>(expf(gk_emu::detail::to_float(x)));
}
template <gk_emu::detail::Half T>
T hlog(T x) {
  return gk_emu::detail::from_float<T>(logf(gk_emu::detail::to_float(x)));
}
template <gk_emu::detail::Half T>
T hsqrt(T x) {
  return gk_emu::detail::from_float<T>(sqrtf(gk_emu::detail::to_float(x)));
}
template <gk_emu::detail::Half T>
T hrsqrt(T x) {
  return gk_emu::detail::from_float<T>(1.0f / sqrtf(gk_emu::detail::to_float(x)));
}
