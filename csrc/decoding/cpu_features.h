// Runtime CPU feature tests of the decoding kernels, each answered once per process. The extension is compiled for
// baseline x86-64; the wide paths live in target-attributed functions and these tests pick them at run time.
// MMCORE_DISABLE_AVX512BF16=1 / MMCORE_DISABLE_AVX512VNNI=1 turn a feature off: how the tests reach the other path
// on any CPU.
#pragma once

#include <cstdlib>
#include <string>

namespace mmcore::decoding {

// Whether the environment variable `name` is set to "1".
inline bool disabled_by(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::string(value) == "1";
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
inline bool has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// vdpbf16ps (the bfloat16 screen's dot products).
inline bool has_avx512bf16() {
  static const bool has = !disabled_by("MMCORE_DISABLE_AVX512BF16") && __builtin_cpu_supports("avx512bf16") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
}

// vpdpbusd (the int8 screen's dot products).
inline bool has_avx512vnni() {
  static const bool has = !disabled_by("MMCORE_DISABLE_AVX512VNNI") && __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
}
#else
inline bool has_avx512f() { return false; }
inline bool has_avx512bf16() { return false; }
inline bool has_avx512vnni() { return false; }
#endif

}  // namespace mmcore::decoding
