// A minimal test registry for the emulator self-tests: GK_TEST(name) defines
// a test, CHECK asserts, expect_fault asserts that a launch is rejected.
// main.cpp runs them; test_emulator.py builds and drives the program.
#pragma once

#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/launch.h"

namespace gk_test {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Case {
  const char* name;
  void (*run)();
  bool manual;  // run only when named: crashes on purpose, prints data, or times things
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(const char* name, void (*run)(), bool manual) { registry().push_back({name, run, manual}); }
};

#define GK_TEST_IMPL(name, manual)                                             \
  static void name();                                                          \
  static const ::gk_test::Register name##_registration(#name, &name, manual); \
  static void name()
#define GK_TEST(name) GK_TEST_IMPL(name, false)
#define GK_MANUAL_TEST(name) GK_TEST_IMPL(name, true)

inline std::string detail_message() { return {}; }
template <class... Args>
std::string detail_message(const char* fmt, Args... args) {
  return ": " + ::gk_emu::detail::strprintf(fmt, args...);
}

[[noreturn]] inline void check_failed(const char* file, int line, const char* condition, const std::string& detail) {
  throw Failure(::gk_emu::detail::strprintf("%s:%d: CHECK(%s) failed", file, line, condition) + detail);
}

// CHECK(condition) or CHECK(condition, printf-format, args...).
#define CHECK(cond, ...)                                                                          \
  do {                                                                                            \
    if (!(cond))                                                                                  \
      ::gk_test::check_failed(__FILE__, __LINE__, #cond, ::gk_test::detail_message(__VA_ARGS__)); \
  } while (0)

// Restores the default emulator settings when a test that changes them ends.
struct DefaultSettingsOnExit {
  ~DefaultSettingsOnExit() {
    gk_emu::set_thread_order(gk_emu::Order::forward);
    gk_emu::set_num_threads(1);
    gk_emu::set_stack_size(256 * 1024);
  }
};

struct OrderSetting {
  gk_emu::Order order;
  uint64_t seed;
  const char* name;
};

// Forward, reverse and a few random seeds.
inline constexpr OrderSetting kOrders[] = {{gk_emu::Order::forward, 0, "forward"},
                                           {gk_emu::Order::reverse, 0, "reverse"},
                                           {gk_emu::Order::random, 1, "random:1"},
                                           {gk_emu::Order::random, 2, "random:2"},
                                           {gk_emu::Order::random, 12345, "random:12345"}};

// Runs body(setting) once under every order in kOrders.
template <class F>
void for_each_order(F&& body) {
  DefaultSettingsOnExit restore;
  for (const OrderSetting& o : kOrders) {
    gk_emu::set_thread_order(o.order, o.seed);
    body(o);
  }
}

// Asserts that fn() throws gk_emu::EmulationError whose message contains every needle.
template <class F>
void expect_fault(F&& fn, std::initializer_list<const char*> needles) {
  try {
    fn();
  } catch (const gk_emu::EmulationError& e) {
    const std::string what = e.what();
    for (const char* needle : needles)
      if (what.find(needle) == std::string::npos)
        throw Failure("fault message lacks '" + std::string(needle) + "': " + what);
    return;
  }
  throw Failure("expected an EmulationError, but the launch succeeded");
}

}  // namespace gk_test
