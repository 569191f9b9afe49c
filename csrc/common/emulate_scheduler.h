// The CUDA emulator's engine (see emulate.h): configuration, the per-block
// scheduler that runs one fiber per GPU thread, __syncthreads, warp
// collectives, fault detection, and grid launch.
#pragma once

#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <source_location>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <cxxabi.h>
#include <dlfcn.h>

#include "emulate_fiber.h"

namespace gk_emu {

// A fault found in an emulated kernel: divergent or deadlocked barriers,
// mismatched warp collectives, invalid launches, misuse of PTX wrappers.
struct EmulationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The order in which the threads of a block run between synchronisation
// points, and in which blocks run. Different orders expose missing barriers.
enum class Order { forward, reverse, random };

namespace detail {

[[gnu::format(printf, 1, 2)]] inline std::string strprintf(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::string out(static_cast<size_t>(std::max(n, 0)), '\0');
  std::vsnprintf(out.data(), out.size() + 1, fmt, args);
  va_end(args);
  return out;
}

// ---------------------------------------------------------------------------
// Configuration

struct Config {
  Order order = Order::forward;
  uint64_t seed = 0;
  size_t stack_size = 256 * 1024;
  unsigned threads = 1;  // OS threads running blocks concurrently
};

inline uint64_t parse_env_number(const char* name, std::string_view text) {
  uint64_t value = 0;
  if (text.empty()) throw EmulationError(strprintf("gk_emu: %s: expected a number", name));
  for (const char c : text) {
    if (c < '0' || c > '9')
      throw EmulationError(strprintf("gk_emu: %s: '%.*s' is not a number", name, int(text.size()), text.data()));
    value = value * 10 + uint64_t(c - '0');
  }
  return value;
}

// GK_EMU_ORDER=forward|reverse|random[:seed], GK_EMU_STACK_KB=n, GK_EMU_THREADS=n.
inline Config config_from_env() {
  Config c;
  if (const char* env = std::getenv("GK_EMU_ORDER"); env != nullptr && *env != '\0') {
    const std::string_view text(env);
    const size_t colon = text.find(':');
    const std::string_view name = text.substr(0, colon);
    if (name == "forward") {
      c.order = Order::forward;
    } else if (name == "reverse") {
      c.order = Order::reverse;
    } else if (name == "random") {
      c.order = Order::random;
    } else {
      throw EmulationError(strprintf("gk_emu: GK_EMU_ORDER='%s': expected forward, reverse or random[:seed]", env));
    }
    if (colon != std::string_view::npos) {
      if (c.order != Order::random)
        throw EmulationError(strprintf("gk_emu: GK_EMU_ORDER='%s': only random takes a seed", env));
      c.seed = parse_env_number("GK_EMU_ORDER seed", text.substr(colon + 1));
    }
  }
  if (const char* env = std::getenv("GK_EMU_STACK_KB"); env != nullptr && *env != '\0')
    c.stack_size = size_t(std::max<uint64_t>(parse_env_number("GK_EMU_STACK_KB", env), 16)) * 1024;
  if (const char* env = std::getenv("GK_EMU_THREADS"); env != nullptr && *env != '\0')
    c.threads = unsigned(std::clamp<uint64_t>(parse_env_number("GK_EMU_THREADS", env), 1, 256));
  return c;
}

// Read from the environment on first use; the setters below override it.
inline Config& config() {
  static Config c = config_from_env();
  return c;
}

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64); }
};

// Fills `out` with 0..n-1 in the given order (a fresh permutation for random).
template <class Index>
void fill_order(std::vector<Index>& out, Index n, Order order, SplitMix64& rng) {
  out.resize(n);
  for (Index i = 0; i < n; ++i) out[i] = order == Order::reverse ? n - 1 - i : i;
  if (order == Order::random)
    for (Index i = n; i > 1; --i) std::swap(out[i - 1], out[rng.below(i)]);
}

}  // namespace detail

// Settings for the following launches; not synchronised with launches running
// on other threads.

// Thread and block order; `seed` matters for random.
inline void set_thread_order(Order order, uint64_t seed = 0) {
  detail::config().order = order;
  detail::config().seed = seed;
}
// Usable stack bytes of each emulated GPU thread (default 256 KiB).
inline void set_stack_size(size_t bytes) { detail::config().stack_size = std::max<size_t>(bytes, 16 * 1024); }
// OS threads that run blocks of one launch concurrently (default 1: deterministic).
inline void set_num_threads(unsigned n) { detail::config().threads = std::max(n, 1u); }

namespace detail {

// ---------------------------------------------------------------------------
// Kernel attributes (cudaFuncSetAttribute)

inline constexpr size_t kDefaultDynamicSmem = 48 * 1024;
inline constexpr size_t kMaxDynamicSmem = 227 * 1024;  // per block, as on sm_90

struct KernelAttributes {
  std::mutex mutex;
  std::unordered_map<const void*, size_t> max_dynamic_smem;
};
inline KernelAttributes& kernel_attributes() {
  static KernelAttributes a;
  return a;
}
inline size_t max_dynamic_smem(const void* kernel) {
  auto& a = kernel_attributes();
  const std::lock_guard lock(a.mutex);
  const auto it = a.max_dynamic_smem.find(kernel);
  return it == a.max_dynamic_smem.end() ? kDefaultDynamicSmem : it->second;
}

// ---------------------------------------------------------------------------
// Emulated GPU threads

// A launch with its kernel type-erased: body(params) runs the kernel once.
struct Launch {
  const void* kernel;
  void (*body)(const void* params);
  const void* params;
  dim3 grid;
  dim3 block;
  size_t smem;
};

// The symbol name of a kernel where the dynamic symbol table has it (default
// visibility in shared objects; executables linked with -rdynamic), else its
// address and file. Looked up for fault messages only: dladdr is slow.
inline std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) == 0) return strprintf("at %p", kernel);
  if (info.dli_sname == nullptr || info.dli_saddr != kernel) return strprintf("at %p in %s", kernel, info.dli_fname);
  int status = 0;
  const std::unique_ptr<char, decltype(&std::free)> demangled(
      abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status), &std::free);
  return status == 0 ? demangled.get() : info.dli_sname;
}

// Deferred cp.async copies of one thread, grouped by commit: the data moves
// only when a wait allows it, so reading the destination too early is visible.
class AsyncCopies {
 public:
  void add(void* dst, const void* src, uint32_t bytes) { pending_.push_back({dst, src, bytes}); }
  void commit() { group_ends_.push_back(pending_.size()); }
  // Completes all committed groups except the newest `keep`.
  void wait(size_t keep) {
    if (group_ends_.size() <= keep) return;
    const size_t groups = group_ends_.size() - keep;
    const size_t copies = group_ends_[groups - 1];
    for (size_t i = 0; i < copies; ++i) std::memcpy(pending_[i].dst, pending_[i].src, pending_[i].bytes);
    pending_.erase(pending_.begin(), pending_.begin() + ptrdiff_t(copies));
    group_ends_.erase(group_ends_.begin(), group_ends_.begin() + ptrdiff_t(groups));
    for (size_t& end : group_ends_) end -= copies;
  }
  void clear() {
    pending_.clear();
    group_ends_.clear();
  }

 private:
  struct Copy {
    void* dst;
    const void* src;
    uint32_t bytes;
  };
  std::vector<Copy> pending_;
  std::vector<size_t> group_ends_;  // pending_[0, group_ends_[g]) holds groups 0..g
};

class Worker;

// Unwinds a faulting fiber. Device code cannot catch it: CUDA kernels have no exceptions.
struct FiberFault {};

enum class ThreadState : uint8_t { runnable, at_barrier, at_warp_sync, exited };

struct Thread {
  Context context;
  SanitizerFiber sanitizer;
  Worker* worker = nullptr;
  uint3 index{};
  uint32_t rank = 0;  // linear index in the block, x fastest
  ThreadState state = ThreadState::runnable;
  // Where the thread waits, for fault messages.
  const char* op = nullptr;
  uint32_t op_mask = 0;
  std::source_location site;
  void* collective_args = nullptr;  // its record while in a warp collective
  AsyncCopies async_copies;
};

// The running emulated thread of this OS thread; null outside kernels.
inline thread_local Thread* tl_thread = nullptr;

// A warp collective that some lanes of its mask have reached.
struct PendingCollective {
  const char* name;
  uint32_t mask;
  uint32_t arrived;
  std::source_location site;
  uint8_t arrival_order[32];
  uint8_t arrivals;
};

struct Warp {
  uint32_t existing = 0;  // lanes that exist (the last warp of a block may be partial)
  uint32_t exited = 0;
  std::vector<PendingCollective> pending;
};

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

inline std::string where(const std::source_location& s) {
  return strprintf("%s:%u", s.file_name(), unsigned(s.line()));
}

// "0-15, 32, 40-47"
inline std::string ranges(const std::vector<uint32_t>& sorted) {
  std::string out;
  for (size_t i = 0; i < sorted.size();) {
    size_t j = i;
    while (j + 1 < sorted.size() && sorted[j + 1] == sorted[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j == i ? strprintf("%u", sorted[i]) : strprintf("%u-%u", sorted[i], sorted[j]);
    i = j + 1;
  }
  return out;
}

inline std::vector<uint32_t> lanes_of(uint32_t mask) {
  std::vector<uint32_t> out;
  for (uint32_t l = 0; l < 32; ++l)
    if (mask >> l & 1) out.push_back(l);
  return out;
}

// Runs the blocks of a launch on one OS thread, one fiber per GPU thread.
// Fibers run one at a time until they reach a barrier or collective; the
// scheduler then picks the next runnable one in the configured order.
class Worker {
 public:
  void begin_launch(const Launch& launch) {
    launch_ = &launch;
    // Sized exactly, so AddressSanitizer sees overruns of dynamic shared memory.
    if (smem_size_ != launch.smem || !smem_) {
      smem_.reset(new (std::align_val_t{128}) std::byte[std::max<size_t>(launch.smem, 1)]);
      smem_size_ = launch.smem;
    }
  }

  void run_block(uint64_t linear_block) {
    const Launch& l = *launch_;
    block_index_ = uint3{unsigned(linear_block % l.grid.x), unsigned(linear_block / l.grid.x % l.grid.y),
                         unsigned(linear_block / (uint64_t(l.grid.x) * l.grid.y))};
    const Config& cfg = config();
    order_ = cfg.order;
    rng_ = SplitMix64{cfg.seed ^ (linear_block * 0xD1B54A32D192ED03ull)};
    prepare_threads();
    std::memset(smem_.get(), 0xFF, l.smem);  // NaN in every float type
    schedule();
  }

  // --- called on fibers, by the device API ---

  // __syncthreads and its reducing variants; returns how many threads passed
  // a non-zero predicate.
  uint32_t block_barrier(const char* name, int predicate, const std::source_location& site) {
    Thread& t = *tl_thread;
    if (barrier_arrivals_ == 0)
      barrier_site_ = site;
    else if (!same_site(site, barrier_site_))
      barrier_divergent_ = true;
    ++barrier_arrivals_;
    barrier_true_ += predicate != 0;
    t.state = ThreadState::at_barrier;
    t.op = name;
    t.site = site;
    suspend(t);
    return barrier_result_;
  }

  // All lanes of `mask` call this with the same name and mask; each passes its
  // own record. The last to arrive calls run(lanes, mask) with every lane's
  // record (lanes outside the mask are null), then all continue.
  template <class Args>
  void warp_collective(const char* name, uint32_t mask, Args& mine, void (*run)(Args* const (&)[32], uint32_t),
                       const std::source_location& site) {
    Thread& t = *tl_thread;
    t.collective_args = &mine;
    PendingCollective* c = arrive(t, name, mask, site);
    if (c == nullptr) return;  // resumed after the last lane ran it
    Args* lanes[32] = {};
    const uint32_t first = t.rank & ~31u;
    for (uint32_t l = 0; l < 32; ++l)
      if (c->mask >> l & 1) lanes[l] = static_cast<Args*>(threads_[first + l].collective_args);
    run(lanes, c->mask);
    release(t, c);
  }

  uint32_t active_mask(const Thread& t) const {
    const Warp& w = warps_[t.rank / 32];
    return w.existing & ~w.exited;
  }

  // Reports a fault from a fiber: the fiber unwinds (freeing its temporaries),
  // the rest of the block is abandoned and launch throws.
  [[noreturn]] void fail(std::string message) {
    fault_ = std::move(message);
    throw FiberFault{};
  }

  std::byte* dynamic_smem() const { return smem_.get(); }
  const uint3& block_index() const { return block_index_; }
  const dim3& block_dim() const { return launch_->block; }
  const dim3& grid_dim() const { return launch_->grid; }
  uint32_t block_size() const { return threads_in_block_; }

 private:
  void prepare_threads() {
    const dim3 b = launch_->block;
    const uint32_t n = b.x * b.y * b.z;
    threads_in_block_ = n;
    const size_t stack_size = config().stack_size;
    if (stack_size != stack_size_) {
      stacks_.clear();
      stack_size_ = stack_size;
    }
    while (stacks_.size() < n) stacks_.emplace_back(stack_size_);
    if (threads_.size() < n) threads_.resize(n);
    for (uint32_t i = 0; i < n; ++i) {
      Thread& t = threads_[i];
      t.worker = this;
      t.index = uint3{i % b.x, i / b.x % b.y, i / (b.x * b.y)};
      t.rank = i;
      t.state = ThreadState::runnable;
      t.async_copies.clear();
      stacks_[i].reset_sanitizer_state();
      t.context.init(stacks_[i], &thread_main, &t);
    }
    warps_.resize((n + 31) / 32);
    for (size_t w = 0; w < warps_.size(); ++w) {
      const uint32_t lanes = std::min<uint32_t>(32, n - uint32_t(w) * 32);
      warps_[w].existing = lanes == 32 ? ~0u : (1u << lanes) - 1;
      warps_[w].exited = 0;
      warps_[w].pending.clear();
    }
    live_ = n;
    barrier_arrivals_ = 0;
    barrier_true_ = 0;
    barrier_divergent_ = false;
    fault_.clear();
    ready_.resize(n);
    ready_head_ = ready_size_ = 0;
  }

  void schedule() {
    start_round();
    for (;;) {
      while (ready_size_ > 0) {
        Thread& t = threads_[ready_[ready_head_]];
        ready_head_ = ready_head_ + 1 == ready_.size() ? 0 : ready_head_ + 1;
        --ready_size_;
        resume(t);
        if (!fault_.empty()) throw EmulationError(prefix() + fault_);
      }
      if (live_ == 0) return;
      settle();
    }
  }

  // Queues every thread in a fresh order; runs at block start and after each barrier.
  void start_round() {
    fill_order(round_, threads_in_block_, order_, rng_);
    for (const uint32_t r : round_) push_ready(r);
  }

  void push_ready(uint32_t rank) {
    size_t slot = ready_head_ + ready_size_;
    if (slot >= ready_.size()) slot -= ready_.size();
    ready_[slot] = rank;
    ++ready_size_;
  }

  // No fiber can run: either every live thread waits at the same barrier, or
  // the block is stuck.
  void settle() {
    const bool all_at_barrier = barrier_arrivals_ == threads_in_block_;
    if (all_at_barrier && !barrier_divergent_) {
      barrier_result_ = barrier_true_;
      barrier_arrivals_ = 0;
      barrier_true_ = 0;
      for (uint32_t i = 0; i < threads_in_block_; ++i) threads_[i].state = ThreadState::runnable;
      start_round();
      return;
    }
    const char* what = "deadlock, no thread can continue";
    if (barrier_arrivals_ == live_) {
      what = barrier_divergent_ ? "divergent __syncthreads, threads wait at different barriers"
                                : "__syncthreads cannot complete because some threads exited";
    }
    throw EmulationError(prefix() + what + ": " + describe_threads());
  }

  // Groups threads by what they are doing: "threads 0-31 wait at __syncthreads (a.cu:7); threads 32-63 exited".
  std::string describe_threads() const {
    std::vector<std::pair<std::string, std::vector<uint32_t>>> groups;
    for (uint32_t i = 0; i < threads_in_block_; ++i) {
      const Thread& t = threads_[i];
      std::string key;
      switch (t.state) {
        case ThreadState::exited: key = "exited"; break;
        case ThreadState::runnable: key = "are runnable"; break;
        case ThreadState::at_barrier: key = strprintf("wait at %s (%s)", t.op, where(t.site).c_str()); break;
        case ThreadState::at_warp_sync:
          key = strprintf("wait in %s(mask 0x%08x) at %s", t.op, t.op_mask, where(t.site).c_str());
          break;
      }
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
      if (it == groups.end()) it = groups.insert(groups.end(), {key, {}});
      it->second.push_back(i);
    }
    std::string out;
    for (const auto& [key, ranks] : groups) {
      if (!out.empty()) out += "; ";
      out += "threads " + ranges(ranks) + " " + key;
    }
    const dim3 b = launch_->block;
    if (b.y * b.z > 1) out += strprintf(" (linear thread indices: x + %u*y + %u*z)", b.x, b.x * b.y);
    return out;
  }

  std::string prefix() const {
    return strprintf("gk_emu: kernel %s, block (%u,%u,%u): ", kernel_name(launch_->kernel).c_str(), block_index_.x,
                     block_index_.y, block_index_.z);
  }

  // Registers lane t at a collective; returns it if t is the last lane to
  // arrive, otherwise suspends t until the last lane has run it and returns null.
  //
  // Lanes join the pending collective of the same name and mask. Collectives
  // with other masks may be pending at the same time (for example, two half
  // warps, one of which goes on to a full-warp collective). Arriving here is a
  // certain deadlock if another pending collective needs this lane while lanes
  // it holds are needed here; every other stuck state is found by settle().
  PendingCollective* arrive(Thread& t, const char* name, uint32_t mask, const std::source_location& site) {
    const uint32_t lane = t.rank & 31;
    Warp& w = warps_[t.rank / 32];
    if (!(mask >> lane & 1))
      fail(strprintf("warp %u: lane %u called %s at %s with mask 0x%08x, which does not include the lane", t.rank / 32,
                     lane, name, where(site).c_str(), mask));
    const uint32_t need = mask & w.existing;
    auto it = std::find_if(w.pending.begin(), w.pending.end(),
                           [&](const auto& c) { return c.mask == need && std::strcmp(c.name, name) == 0; });
    const PendingCollective* joined = it == w.pending.end() ? nullptr : &*it;
    for (const PendingCollective& other : w.pending) {
      if (&other == joined || !(other.mask >> lane & 1) || (other.arrived & need) == 0) continue;
      fail(strprintf("warp %u: lane %u reached %s(mask 0x%08x) at %s while lanes %s wait in %s(mask 0x%08x) at %s",
                     t.rank / 32, lane, name, mask, where(site).c_str(), ranges(lanes_of(other.arrived & need)).c_str(),
                     other.name, other.mask, where(other.site).c_str()));
    }
    if (it == w.pending.end()) it = w.pending.insert(w.pending.end(), PendingCollective{name, need, 0, site, {}, 0});
    it->arrived |= 1u << lane;
    it->arrival_order[it->arrivals++] = uint8_t(lane);
    if (it->arrived == it->mask) return &*it;
    t.state = ThreadState::at_warp_sync;
    t.op = name;
    t.op_mask = mask;
    t.site = site;
    suspend(t);
    return nullptr;
  }

  // After the last lane ran collective c: wakes the others in arrival order.
  void release(Thread& t, PendingCollective* c) {
    const uint32_t first = t.rank & ~31u;
    for (uint8_t i = 0; i + 1 < c->arrivals; ++i) {
      Thread& other = threads_[first + c->arrival_order[i]];
      other.state = ThreadState::runnable;
      push_ready(other.rank);
    }
    auto& pending = warps_[t.rank / 32].pending;
    pending.erase(pending.begin() + (c - pending.data()));
  }

  // --- fiber switching ---

  void resume(Thread& t) {
    tl_thread = &t;
    const Stack& s = stacks_[t.rank];
    scheduler_sanitizer_.start_switch(s.lo(), s.size());
    switch_context(scheduler_, t.context);
    scheduler_sanitizer_.finish_switch();
    tl_thread = nullptr;
  }

  void suspend(Thread& t) {
    t.sanitizer.start_switch(scheduler_stack_bottom_, scheduler_stack_size_);
    switch_context(t.context, scheduler_);
    t.sanitizer.finish_switch();
  }

  static void thread_main(void* arg) {
    Thread& t = *static_cast<Thread*>(arg);
    Worker& w = *t.worker;
    SanitizerFiber::finish_first_switch(&w.scheduler_stack_bottom_, &w.scheduler_stack_size_);
    try {
      w.launch_->body(w.launch_->params);
    } catch (const FiberFault&) {
      // fault_ holds the message
    } catch (const std::exception& e) {
      w.fault_ = strprintf("thread (%u,%u,%u): uncaught exception: %s", t.index.x, t.index.y, t.index.z, e.what());
    } catch (...) {
      w.fault_ = strprintf("thread (%u,%u,%u): uncaught exception", t.index.x, t.index.y, t.index.z);
    }
    t.state = ThreadState::exited;
    --w.live_;
    w.warps_[t.rank / 32].exited |= 1u << (t.rank & 31);
    SanitizerFiber::start_final_switch(w.scheduler_stack_bottom_, w.scheduler_stack_size_);
    switch_context(t.context, w.scheduler_);
    std::abort();  // an exited fiber is never resumed
  }

  const Launch* launch_ = nullptr;
  uint3 block_index_{};
  uint32_t threads_in_block_ = 0;
  uint32_t live_ = 0;
  Order order_ = Order::forward;
  SplitMix64 rng_{0};

  std::vector<Stack> stacks_;
  size_t stack_size_ = 0;
  std::vector<Thread> threads_;
  std::vector<Warp> warps_;
  std::vector<uint32_t> round_;
  std::vector<uint32_t> ready_;  // ring buffer of runnable ranks
  size_t ready_head_ = 0;
  size_t ready_size_ = 0;

  struct AlignedDelete {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{128}); }
  };
  std::unique_ptr<std::byte[], AlignedDelete> smem_;
  size_t smem_size_ = 0;

  uint32_t barrier_arrivals_ = 0;
  uint32_t barrier_true_ = 0;
  uint32_t barrier_result_ = 0;
  bool barrier_divergent_ = false;
  std::source_location barrier_site_;

  std::string fault_;

  Context scheduler_;
  SanitizerFiber scheduler_sanitizer_;
  const void* scheduler_stack_bottom_ = nullptr;
  size_t scheduler_stack_size_ = 0;
};

// Each OS thread keeps its worker, and so its fiber stacks, across launches.
inline Worker& this_worker() {
  thread_local Worker worker;
  return worker;
}

inline Thread& current_thread() {
  Thread* t = tl_thread;
  if (t == nullptr) [[unlikely]]
    throw std::logic_error("gk_emu: device code called outside an emulated kernel");
  return *t;
}

// ---------------------------------------------------------------------------
// Grid launch

inline void validate(const Launch& l) {
  const dim3 g = l.grid, b = l.block;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || uint64_t(b.x) * b.y * b.z > 1024)
    throw EmulationError(strprintf("gk_emu: kernel %s: invalid block (%u,%u,%u); at most 1024 threads, z <= 64",
                                   kernel_name(l.kernel).c_str(), b.x, b.y, b.z));
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7FFFFFFFu || g.y > 65535 || g.z > 65535)
    throw EmulationError(
        strprintf("gk_emu: kernel %s: invalid grid (%u,%u,%u)", kernel_name(l.kernel).c_str(), g.x, g.y, g.z));
  const size_t limit = max_dynamic_smem(l.kernel);
  if (l.smem > limit)
    throw EmulationError(strprintf("gk_emu: kernel %s: %zu bytes of dynamic shared memory exceed its limit of %zu; "
                                   "raise it with cudaFuncSetAttribute(kernel, "
                                   "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)",
                                   kernel_name(l.kernel).c_str(), l.smem, limit));
}

inline void run_grid(const Launch& launch) {
  if (tl_thread != nullptr) throw EmulationError("gk_emu: launching kernels from device code is not supported");
  validate(launch);
  const Config cfg = config();
  const uint64_t blocks = uint64_t(launch.grid.x) * launch.grid.y * launch.grid.z;
  std::vector<uint64_t> order;
  SplitMix64 rng{cfg.seed};
  fill_order(order, blocks, cfg.order, rng);

  const unsigned workers = unsigned(std::min<uint64_t>(cfg.threads, blocks));
  if (workers <= 1) {
    Worker& w = this_worker();
    w.begin_launch(launch);
    for (const uint64_t b : order) w.run_block(b);
    return;
  }
  // Several OS threads take whole blocks from a shared counter; the first
  // fault stops them all and is rethrown here.
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mutex;
  std::exception_ptr fault;
  const auto work = [&] {
    try {
      Worker& w = this_worker();
      w.begin_launch(launch);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t i = next.fetch_add(1);
        if (i >= blocks) break;
        w.run_block(order[i]);
      }
    } catch (...) {
      const std::lock_guard lock(mutex);
      if (!fault) fault = std::current_exception();
      stop = true;
    }
  };
  {
    std::vector<std::jthread> pool;
    for (unsigned i = 1; i < workers; ++i) pool.emplace_back(work);
    work();
  }
  if (fault) std::rethrow_exception(fault);
}

}  // namespace detail

// Runs kernel(args...) on grid x block with `smem` bytes of dynamic shared
// memory; arguments convert to the kernel's parameter types as in a CUDA
// launch. Throws EmulationError on a detected fault.
template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "gk_emu::launch: wrong number of kernel arguments");
  static_assert((!std::is_reference_v<KArgs> && ...), "kernel parameters must be passed by value");
  struct Bound {
    void (*kernel)(KArgs...);
    std::tuple<KArgs...> params;
  };
  const Bound bound{kernel, std::tuple<KArgs...>(std::forward<Args>(args)...)};
  const detail::Launch l{reinterpret_cast<const void*>(kernel),
                         [](const void* p) {
                           const Bound& b = *static_cast<const Bound*>(p);
                           std::apply(b.kernel, b.params);  // each thread gets its own copy of the parameters
                         },
                         &bound, grid, block, smem};
  detail::run_grid(l);
}

}  // namespace gk_emu
