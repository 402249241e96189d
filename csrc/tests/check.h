// A minimal check framework for the ctest executable (no gtest, so CI needs nothing beyond libtorch).
//
//   TEST_CASE(name) { EXPECT(cond); EXPECT_EQ(actual, expected); EXPECT_THROWS(stmt, Type, "substring"); }
//
// (Not CHECK/CHECK_EQ: c10/util/Logging.h, reached from ATen/ATen.h, already defines those, glog-style.)
// A failed check records file:line, the expression and the values, and the test goes on; an exception that
// escapes a test fails that test. run_all() (called by main.cpp) runs every registered test, or those whose
// name contains argv[1], prints "N passed, M failed" and returns nonzero when a test failed.
#pragma once

#include <cstdint>
#include <cstdio>
#include <exception>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

namespace mmcore::testing {

struct TestCase {
  const char* name;
  void (*fn)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

// Failures of the test now running.
inline int& current_failures() {
  static int n = 0;
  return n;
}

inline void fail(const char* file, int line, const std::string& what) {
  ++current_failures();
  std::fprintf(stderr, "%s:%d: %s\n", file, line, what.c_str());
}

// Printable form of a checked value. Doubles get all 17 significant digits and their hex form, since the
// grounding tests compare floats for exact equality.
template <typename T>
std::string show(const T& v) {
  if constexpr (requires(std::ostream& os) { os << v; }) {
    std::ostringstream os;
    os << v;
    return os.str();
  } else {
    return "<value without operator<<>";
  }
}

inline std::string show(double v) {
  std::ostringstream os;
  os << std::setprecision(17) << v << " (" << std::hexfloat << v << ")";
  return os.str();
}

inline std::string show(bool v) { return v ? "true" : "false"; }

inline std::string show(const std::string& v) { return "\"" + v + "\""; }

inline std::string show(const char* v) { return show(std::string(v)); }

// Code points: ASCII as is, others as U+XXXX, so the output does not depend on the terminal's encoding.
inline std::string show(const std::u32string& v) {
  std::ostringstream os;
  os << "U\"";
  for (char32_t c : v) {
    if (c >= 0x20 && c < 0x7F) {
      os << static_cast<char>(c);
    } else {
      os << "{U+" << std::uppercase << std::hex << std::setw(4) << std::setfill('0') << static_cast<uint32_t>(c)
         << std::dec << "}";
    }
  }
  os << "\"";
  return os.str();
}

template <typename T>
std::string show(const std::vector<T>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + show(v[i]);
  return s + "]";
}

template <typename A, typename B>
void check_eq(const A& a, const B& b, const char* a_expr, const char* b_expr, const char* file, int line) {
  if (a == b) return;
  fail(file, line,
       std::string("EXPECT_EQ(") + a_expr + ", " + b_expr + ") failed\n    left:  " + show(a) +
           "\n    right: " + show(b));
}

inline int run_all(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int passed = 0, failed = 0;
  for (const TestCase& t : registry()) {
    if (!filter.empty() && std::string(t.name).find(filter) == std::string::npos) continue;
    current_failures() = 0;
    try {
      t.fn();
    } catch (const std::exception& e) {
      fail(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      fail(__FILE__, __LINE__, "uncaught exception of a type not derived from std::exception");
    }
    const bool ok = current_failures() == 0;
    std::printf("[%s] %s\n", ok ? "  OK  " : " FAIL ", t.name);
    std::fflush(stdout);
    (ok ? passed : failed) += 1;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  if (passed + failed == 0) {
    std::fprintf(stderr, "no test matched '%s'\n", filter.c_str());
    return 1;
  }
  return failed == 0 ? 0 : 1;
}

}  // namespace mmcore::testing

#define MMCORE_CHECK_CONCAT_(a, b) a##b
#define MMCORE_CHECK_CONCAT(a, b) MMCORE_CHECK_CONCAT_(a, b)

#define TEST_CASE(name)                                                                           \
  static void name();                                                                             \
  static const ::mmcore::testing::Registrar MMCORE_CHECK_CONCAT(name, _registrar_)(#name, &name); \
  static void name()

#define EXPECT(cond)                                                                      \
  do {                                                                                    \
    if (!(cond)) ::mmcore::testing::fail(__FILE__, __LINE__, "EXPECT(" #cond ") failed"); \
  } while (0)

#define EXPECT_EQ(a, b) ::mmcore::testing::check_eq((a), (b), #a, #b, __FILE__, __LINE__)

// stmt must throw an exception of type `type` whose what() contains `substring`.
#define EXPECT_THROWS(stmt, type, substring)                                                                         \
  do {                                                                                                               \
    try {                                                                                                            \
      stmt;                                                                                                          \
      ::mmcore::testing::fail(__FILE__, __LINE__, "EXPECT_THROWS(" #stmt ", " #type "): nothing thrown");            \
    } catch (const type& e_) {                                                                                       \
      const std::string what_ = e_.what();                                                                           \
      if (what_.find(substring) == std::string::npos) {                                                              \
        ::mmcore::testing::fail(__FILE__, __LINE__,                                                                  \
                                std::string("EXPECT_THROWS(" #stmt ", " #type "): message lacks \"") + (substring) + \
                                    "\"\n    what() = " + what_);                                                    \
      }                                                                                                              \
    } catch (const std::exception& e_) {                                                                             \
      ::mmcore::testing::fail(__FILE__, __LINE__,                                                                    \
                              std::string("EXPECT_THROWS(" #stmt ", " #type "): threw another type: ") + e_.what()); \
    }                                                                                                                \
  } while (0)
