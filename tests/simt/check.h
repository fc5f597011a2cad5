// A minimal harness for the emulator's test programs: each program holds named tests; run with
// no argument it runs them all, with names only those. It prints PASS/FAIL per test and exits 1
// if any check failed.
#pragma once

#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace check {

inline int& failures() {
  static int n = 0;
  return n;
}
struct Test {
  const char* name;
  void (*fn)();
};
inline std::vector<Test>& registry() {
  static std::vector<Test> r;
  return r;
}
struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};
// Fresh random inputs each run; the seed is printed so a failure can be replayed (CHECK_SEED=n).
inline std::mt19937_64& rng() {
  static std::mt19937_64 g = [] {
    const char* e = std::getenv("CHECK_SEED");
    const unsigned long long seed = e ? std::strtoull(e, nullptr, 10) : std::random_device{}();
    std::printf("seed %llu\n", seed);
    return std::mt19937_64(seed);
  }();
  return g;
}
inline int run(int argc, char** argv) {
  rng();
  for (const Test& t : registry()) {
    bool wanted = argc < 2;
    for (int i = 1; i < argc; ++i) wanted |= std::strcmp(argv[i], t.name) == 0;
    if (!wanted) continue;
    const int before = failures();
    t.fn();
    std::printf("%s %s\n", failures() == before ? "PASS" : "FAIL", t.name);
    std::fflush(stdout);
  }
  return failures() ? 1 : 0;
}

}  // namespace check

#define TEST(name)                                           \
  static void name();                                        \
  static ::check::Register name##_registered(#name, &name); \
  static void name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++::check::failures();                                                          \
    }                                                                                 \
  } while (0)

#define CHECK_MSG(cond, ...)                                                           \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                               \
      std::fprintf(stderr, "\n");                                                      \
      ++::check::failures();                                                           \
    }                                                                                  \
  } while (0)

#define CHECK_OK(expr)                                                                                  \
  do {                                                                                                  \
    const ::simt::Error e_ = (expr);                                                                    \
    if (e_ != ::simt::Error::success) {                                                                 \
      std::fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #expr,                   \
                   ::simt::error_string(e_), ::simt::last_error_message());                             \
      ++::check::failures();                                                                            \
    }                                                                                                   \
  } while (0)

#define TEST_MAIN() \
  int main(int argc, char** argv) { return ::check::run(argc, argv); }
