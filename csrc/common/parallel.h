// Parallel loops for the CPU kernels, on OpenMP threads sized by the caller's thread count
// (torch.get_num_threads()), so genkernels and PyTorch share one notion of parallelism.
//
// The extension links libgomp by its soname, so in a process where PyTorch has loaded its own
// copy, the kernels run on the very threads that PyTorch's CPU ops use. A pool of our own would
// compete for the cores with PyTorch's workers, which spin for a while after every op: on two
// cores an attention call of 90 us took 200 us right after any parallel torch op, and takes
// 100 us on the shared threads.
#pragma once

#include <cstdint>
#include <type_traits>

namespace gk {

// Elements of a streaming kernel worth waking another thread for: some 50-150 us of work on one
// core. A sleeping worker takes tens of microseconds to wake (more on virtual machines), so
// smaller jobs run on fewer threads.
constexpr int64_t kMinTaskElements = int64_t{1} << 16;

// Runs fn(ctx, begin, end) over disjoint ranges covering [0, n), each of at least `grain`
// items (except the last), on up to `threads` threads including the caller. Runs inline when
// the work is too small to share, inside another parallel region, or in a build without OpenMP.
// An exception thrown by fn stops the handing out of ranges and is rethrown to the caller once
// every thread has finished.
void parallel_for_impl(int64_t n, int64_t grain, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx);

template <class F>
void parallel_for(int64_t n, int64_t grain, int threads, F&& body) {
  using Body = std::remove_reference_t<F>;
  parallel_for_impl(
      n, grain, threads, [](void* ctx, int64_t begin, int64_t end) { (*static_cast<Body*>(ctx))(begin, end); },
      &body);
}

}  // namespace gk
