// Runs the emulator self-tests: all automatic ones without arguments, the
// named ones otherwise; --list prints the names. One line per test, then the
// exit status says whether all passed.
#include <algorithm>
#include <chrono>
#include <cstring>

#include "harness.h"

namespace {

bool run(const gk_test::Case& c) {
  const auto start = std::chrono::steady_clock::now();
  try {
    c.run();
  } catch (const std::exception& e) {
    std::printf("FAIL %s: %s\n", c.name, e.what());
    return false;
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf("PASS %s (%.1f ms)\n", c.name, ms);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const auto& cases = gk_test::registry();
  if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
    for (const auto& c : cases) std::printf("%s%s\n", c.name, c.manual ? " (manual)" : "");
    return 0;
  }
  int failures = 0;
  if (argc == 1) {
    for (const auto& c : cases)
      if (!c.manual) failures += !run(c);
  }
  for (int i = 1; i < argc; ++i) {
    const auto it =
        std::find_if(cases.begin(), cases.end(), [&](const auto& c) { return std::strcmp(c.name, argv[i]) == 0; });
    if (it == cases.end()) {
      std::printf("FAIL %s: no such test\n", argv[i]);
      ++failures;
    } else {
      failures += !run(*it);
    }
    std::fflush(stdout);
  }
  return failures == 0 ? 0 : 1;
}
