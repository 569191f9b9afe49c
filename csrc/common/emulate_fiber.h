// Fibers for the CUDA emulator (see emulate.h): stacks mapped above a guard
// region, and a context switch between a scheduler and the fibers it runs.
//
// On x86-64 the switch is a few hand-written instructions (the System V ABI
// callee-saved registers plus the SSE/x87 control words); elsewhere, or with
// GK_EMU_USE_UCONTEXT defined, it falls back to <ucontext.h>.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <system_error>
#include <utility>

#if !defined(__x86_64__) || defined(GK_EMU_USE_UCONTEXT)
#define GK_EMU_UCONTEXT 1
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define GK_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GK_EMU_ASAN 1
#endif
#endif
#ifdef GK_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace gk_emu::detail {

// A fiber stack: an inaccessible guard region below `size` usable bytes, so
// an overflow faults instead of overwriting a neighbouring stack.
class Stack {
 public:
  static constexpr size_t kGuardBytes = 64 * 1024;  // address space only

  Stack() = default;
  explicit Stack(size_t size) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t guard = (kGuardBytes + page - 1) / page * page;
    size_ = (size + page - 1) / page * page;
    mapped_ = size_ + guard;
    void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "gk_emu: mmap fiber stack");
    base_ = static_cast<std::byte*>(p);
    if (mprotect(base_, guard, PROT_NONE) != 0) {
      const int err = errno;
      munmap(base_, mapped_);
      throw std::system_error(err, std::generic_category(), "gk_emu: mprotect stack guard region");
    }
  }
  Stack(Stack&& o) noexcept : base_(std::exchange(o.base_, nullptr)), mapped_(o.mapped_), size_(o.size_) {}
  Stack& operator=(Stack&& o) noexcept {
    std::swap(base_, o.base_);
    std::swap(mapped_, o.mapped_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~Stack() {
    if (base_ == nullptr) return;
    reset_sanitizer_state();
    munmap(base_, mapped_);
  }

  std::byte* lo() const { return base_ + (mapped_ - size_); }
  std::byte* hi() const { return base_ + mapped_; }
  size_t size() const { return size_; }

  // Fibers end by switching away, never returning, so AddressSanitizer's
  // redzones of their last frames stay behind; they must be cleared before
  // the memory is reused or unmapped.
  void reset_sanitizer_state() const {
#ifdef GK_EMU_ASAN
    __asan_unpoison_memory_region(lo(), size_);
#endif
  }

 private:
  std::byte* base_ = nullptr;
  size_t mapped_ = 0;
  size_t size_ = 0;
};

using FiberEntry = void (*)(void*);

#ifndef GK_EMU_UCONTEXT

// Pushes the callee-saved registers and the MXCSR / x87 control words, saves
// the stack pointer in *from, loads `to` and pops the same frame from there.
[[gnu::naked, gnu::noinline]] inline void switch_stack(void** /*from*/, void* /*to*/) {
  asm(R"(
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
  )");
}

// First code a fresh fiber runs: entry(arg), with both preloaded into r12 and
// rbx by Context::init. The entry never returns; unwinding stops here.
[[gnu::naked, gnu::noinline]] inline void fiber_start() {
  asm(R"(
    .cfi_undefined rip
    movq %rbx, %rdi
    callq *%r12
    ud2
  )");
}

struct Context {
  void* sp = nullptr;

  void init(const Stack& stack, FiberEntry entry, void* arg) {
    // The frame switch_stack pops: control words, r15..r12, rbx, rbp, return
    // address. sp stays 16-byte aligned so fiber_start calls with an aligned stack.
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.hi()) & ~uintptr_t{15});
    uint64_t* frame = top - 10;
    frame[0] = 0x037F'0000'1F80ull;  // default x87 control word : MXCSR
    frame[1] = 0;                    // r15
    frame[2] = 0;                    // r14
    frame[3] = 0;                    // r13
    frame[4] = reinterpret_cast<uint64_t>(entry);  // r12
    frame[5] = reinterpret_cast<uint64_t>(arg);    // rbx
    frame[6] = 0;                                  // rbp
    frame[7] = reinterpret_cast<uint64_t>(&fiber_start);
    sp = frame;
  }
};

inline void switch_context(Context& from, Context& to) { switch_stack(&from.sp, to.sp); }

#else  // GK_EMU_UCONTEXT

struct Context {
  ucontext_t uc;

  void init(const Stack& stack, FiberEntry entry, void* arg) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack.lo();
    uc.uc_stack.ss_size = stack.size();
    uc.uc_link = nullptr;
    // makecontext passes int arguments only, so the two pointers travel in halves.
    const auto e = reinterpret_cast<uintptr_t>(entry);
    const auto a = reinterpret_cast<uintptr_t>(arg);
    makecontext(&uc, reinterpret_cast<void (*)()>(&trampoline), 4, unsigned(e >> 32), unsigned(e),
                unsigned(a >> 32), unsigned(a));
  }

 private:
  static void trampoline(unsigned e_hi, unsigned e_lo, unsigned a_hi, unsigned a_lo) {
    const auto entry = reinterpret_cast<FiberEntry>((uintptr_t{e_hi} << 32) | e_lo);
    entry(reinterpret_cast<void*>((uintptr_t{a_hi} << 32) | a_lo));
  }
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif  // GK_EMU_UCONTEXT

// AddressSanitizer must be told about every stack switch, or it reports the
// fiber stacks as stack-buffer overflows. Without ASan these are no-ops.
struct SanitizerFiber {
#ifdef GK_EMU_ASAN
  void* fake_stack = nullptr;
  void start_switch(const void* bottom, size_t size) { __sanitizer_start_switch_fiber(&fake_stack, bottom, size); }
  static void start_final_switch(const void* bottom, size_t size) {
    __sanitizer_start_switch_fiber(nullptr, bottom, size);
  }
  void finish_switch() { __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr); }
  static void finish_first_switch(const void** from_bottom, size_t* from_size) {
    __sanitizer_finish_switch_fiber(nullptr, from_bottom, from_size);
  }
#else
  void start_switch(const void*, size_t) {}
  static void start_final_switch(const void*, size_t) {}
  void finish_switch() {}
  static void finish_first_switch(const void**, size_t*) {}
#endif
};

}  // namespace gk_emu::detail
