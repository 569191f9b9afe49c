#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace gk {
namespace {

// Workers sleep on a condition variable between jobs, after spinning briefly so that a run of
// back-to-back kernel calls does not pay a wake-up each time.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // Returns false (and runs nothing) when another job holds the pool.
  bool try_run(int64_t n, int64_t chunk, int workers, void (*fn)(void*, int64_t, int64_t), void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(workers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      chunk_ = chunk;
      next_.store(0, std::memory_order_relaxed);
      active_.store(workers, std::memory_order_relaxed);
      participants_ = workers;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work();
    while (active_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    return true;
  }

 private:
  void grow(int workers) {
    while (static_cast<int>(workers_.size()) < workers) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void work() {
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
      if (begin >= n_) return;
      fn_(ctx_, begin, std::min(n_, begin + chunk_));
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until) {
      }
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        if (stopping_) return;
        if (id >= participants_) continue;
      }
      work();
      active_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex busy_;   // held by the caller whose job is running
  std::mutex mutex_;  // guards the job description
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  bool stopping_ = false;
  int participants_ = 0;
  void (*fn_)(void*, int64_t, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, chunk_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static destruction order
  return *p;
}

}  // namespace

void parallel_for_impl(int64_t n, int64_t grain, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t used = std::min<int64_t>(std::max(threads, 1), max_chunks);
  if (used <= 1) {
    fn(ctx, 0, n);
    return;
  }
  // Four chunks a thread balance uneven work; never smaller than the grain.
  const int64_t chunk = std::max(grain, (n + 4 * used - 1) / (4 * used));
  if (!pool().try_run(n, chunk, static_cast<int>(used - 1), fn, ctx)) fn(ctx, 0, n);
}

}  // namespace gk
