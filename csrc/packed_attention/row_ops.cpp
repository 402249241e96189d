// float32 row loops of packed attention (see row_ops.h), vectorised by the compiler.
//
// Why not at::vec::Vectorized: setup.py compiles the extension for baseline x86-64 (no -mavx2), so
// Vectorized<float> here is the generic fallback whose exp() is a scalar std::exp per element; measured in
// the whole forward (4,096 causal tokens in segments of 512, 8 heads x 64, 2 threads, AVX-512 Zen 4), that
// fallback made the forward about 1.6x slower than these loops. Instead the loops below are plain C++ written
// so that GCC vectorises them (lane-wise partial max/sum, a branch-free polynomial exp), and target_clones
// compiles each for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the baseline, picked once at load time; the
// AVX-512 clone is about 2x faster than the baseline (SSE2) one on the exp-bound rows.
#include "packed_attention/row_ops.h"

#include <bit>
#include <cstring>

// The vector-extension helpers below pass 32-byte vectors between inline functions of this file only; GCC's
// note that such arguments have another ABI without AVX is about calls across translation units.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMCORE_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMCORE_ROW_CLONES
#endif

namespace mmcore::packed_attention::row_ops {
namespace {

// 8 floats: one AVX2 register, two SSE registers. One source serves every clone: the compiler lowers the
// vector extension to the clone's ISA. NOTE: 16-float vectors were tried: the AVX2 and SSE clones then
// lowered the vector selects (?:) to scalar code, while 8 floats keep every clone vectorised; on Zen 4,
// AVX-512 executes as two 256-bit halves anyway.
constexpr int kWidth = 8;
using VecF = float __attribute__((vector_size(kWidth * sizeof(float))));
using VecI = int32_t __attribute__((vector_size(kWidth * sizeof(float))));

inline VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

inline VecF broadcast(float x) { return VecF{} + x; }

template <typename T>
inline T select_max(T a, T b) {
  return a > b ? a : b;
}

// exp(x) in about 1 ulp for float32 (Cephes' expf polynomial after a Cody-Waite reduction by ln 2), for F =
// float (row tails) or VecF, branch-free. NOTE: results below exp(-87) (about 1.6e-38, the bottom of the
// normal range) are flushed to 0: attention only takes exp(s - max) <= 1 and exp(s - lse), where such values
// vanish in the row sum's rounding. NaN propagates (the comparisons are written so that NaN falls through).
template <typename F, typename I>
inline F exp_approx(F x) {
  constexpr float kLo = -87.0f, kHi = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: t = y + kRound holds round(y) in its low mantissa bits
  F xc = x < kLo ? F{} + kLo : x;
  xc = xc > kHi ? F{} + kHi : xc;
  const F t = xc * kLog2e + kRound;
  const F n = t - kRound;  // round(x / ln 2), in [-126, 127]
  F r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;  // |r| <= ln(2) / 2
  F y = F{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const I e = std::bit_cast<I>(t) - std::bit_cast<int32_t>(kRound);  // == n
  const F pow2n = std::bit_cast<F>((e + 127) << 23);
  return x < kLo ? F{} : y * pow2n;
}

inline float exp_approx(float x) { return exp_approx<float, int32_t>(x); }
inline VecF exp_approx(VecF x) { return exp_approx<VecF, VecI>(x); }

inline float reduce_max(VecF v) {
  float m = v[0];
  for (int l = 1; l < kWidth; ++l) m = select_max(v[l], m);
  return m;
}

inline float reduce_sum(VecF v) {
  float s = 0.0f;
  for (int l = 0; l < kWidth; ++l) s += v[l];
  return s;
}

}  // namespace

MMCORE_ROW_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= kWidth) {
    VecF acc = load(x);
    for (j = kWidth; j + kWidth <= n; j += kWidth) acc = select_max(load(x + j), acc);
    m = reduce_max(acc);
  }
  for (; j < n; ++j) m = select_max(x[j], m);
  return m;
}

MMCORE_ROW_CLONES float exp_sub_sum(float* x, int64_t n, float sub) {
  VecF acc{};
  const VecF vsub = broadcast(sub);
  int64_t j = 0;
  for (; j + kWidth <= n; j += kWidth) {
    const VecF e = exp_approx(load(x + j) - vsub);
    store(x + j, e);
    acc += e;
  }
  float sum = reduce_sum(acc);
  for (; j < n; ++j) {
    x[j] = exp_approx(x[j] - sub);
    sum += x[j];
  }
  return sum;
}

MMCORE_ROW_CLONES void scale(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

MMCORE_ROW_CLONES void dropout(float* z, const float* p, int64_t n, uint64_t seed, uint64_t counter,
                               uint64_t threshold, float keep_scale) {
  for (int64_t j = 0; j < n; ++j) {
    z[j] = philox_randint(seed, counter + static_cast<uint64_t>(j)) >= threshold ? p[j] * keep_scale : 0.0f;
  }
}

MMCORE_ROW_CLONES void softmax_grad(float* ds, const float* p, const float* z, int64_t n, float d) {
  for (int64_t j = 0; j < n; ++j) ds[j] = z[j] * ds[j] - p[j] * d;
}

MMCORE_ROW_CLONES void convert(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

MMCORE_ROW_CLONES void convert(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

MMCORE_ROW_CLONES void convert(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

MMCORE_ROW_CLONES void convert(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<c10::BFloat16>(src[j]);
}

namespace {

template <typename T>
inline float dot_impl(const T* a, const T* b, int64_t n) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += static_cast<float>(a[j]) * static_cast<float>(b[j]);
  return sum;
}

}  // namespace

float dot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
float dot(const c10::Half* a, const c10::Half* b, int64_t n) { return dot_impl(a, b, n); }
float dot(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) { return dot_impl(a, b, n); }

}  // namespace mmcore::packed_attention::row_ops
