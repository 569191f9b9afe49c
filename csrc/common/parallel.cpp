#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gk {

void parallel_for_impl(int64_t n, int64_t grain, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t used = std::min<int64_t>(std::max(threads, 1), max_chunks);
#ifdef _OPENMP
  if (used > 1 && !omp_in_parallel()) {
    // Four chunks a thread balance uneven work; never smaller than the grain. Chunks are taken
    // from a counter, so any team size the runtime grants covers the range.
    const int64_t chunk = std::max(grain, (n + 4 * used - 1) / (4 * used));
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
#pragma omp parallel num_threads(static_cast<int>(used))
    {
      try {
        for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < n;)
          fn(ctx, begin, std::min(n, begin + chunk));
      } catch (...) {  // an exception may not leave the region
        next.store(n, std::memory_order_relaxed);
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  fn(ctx, 0, n);
}

}  // namespace gk
