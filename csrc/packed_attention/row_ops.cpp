// float32 row loops of packed attention (see row_ops.h).
//
// Why not at::vec::Vectorized: setup.py compiles the extension for baseline x86-64 (no -mavx2), so
// Vectorized<float> here is the generic fallback, whose exp() is a scalar std::exp per element. Instead the
// two exp-bound loops (row max, exp and sum) are written with GCC/Clang vector extensions and a branch-free
// polynomial exp, compiled once per ISA (function multiversioning, picked at load time); the simpler loops
// are plain C++ that target_clones hands to the auto-vectoriser per ISA. Measured on this project's Zen 4
// test machine (one thread, row max + exp + sum over a 64 x 512 float32 score tile, ns per element):
//   at::vec fallback 3.9, scalar std::exp 3.9, SSE2 version 1.57, AVX2 version 0.76, AVX-512 version 0.55.
// The forward of 8 causal segments of 512 tokens, 8 heads x 64 takes 8.4M exps: about 16 ms (at::vec) against
// 2.3 ms (AVX-512) on 2 threads, next to about 25 ms of GEMM.
#include "packed_attention/row_ops.h"

#include <bit>
#include <cstring>

// The vector-extension helpers below return 32-byte vectors from inline functions of this file only; GCC's
// warning that such returns have another ABI without AVX concerns calls across translation units.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMCORE_X86_VERSIONS 1
// Loops left to the auto-vectoriser: one source, compiled per ISA, picked at load time.
#define MMCORE_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMCORE_ROW_CLONES
#endif

namespace mmcore::packed_attention::row_ops {
namespace {

// W floats in one GCC/Clang vector extension: the compiler lowers it to the caller's ISA. The hand-written
// loops below take W per ISA (4 for SSE2, 8 for AVX2, 16 for AVX-512): with a vector wider than the ISA's
// registers, GCC lowers the selects (?:) to scalar code and spills, and the SSE2 loop was then 2x slower
// than scalar std::exp.
// (vector_size with a dependent size is ignored inside templates, hence one alias per width.)
using F4 = float __attribute__((vector_size(16)));
using I4 = int32_t __attribute__((vector_size(16)));
using F8 = float __attribute__((vector_size(32)));
using I8 = int32_t __attribute__((vector_size(32)));
using F16 = float __attribute__((vector_size(64)));
using I16 = int32_t __attribute__((vector_size(64)));

template <int W>
struct VecTypes;
template <>
struct VecTypes<4> {
  using F = F4;
  using I = I4;
};
template <>
struct VecTypes<8> {
  using F = F8;
  using I = I8;
};
template <>
struct VecTypes<16> {
  using F = F16;
  using I = I16;
};

template <int W>
struct Vec : VecTypes<W> {
  using F = typename VecTypes<W>::F;

  static F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }

  static void store(float* p, const F& v) { std::memcpy(p, &v, sizeof(v)); }
};

template <typename T>
inline T select_max(const T& a, const T& b) {
  return a > b ? a : b;
}

// exp(x) in about 1 ulp for float32 (Cephes' expf polynomial after a Cody-Waite reduction by ln 2), for F =
// float (row tails) or a vector, branch-free. NOTE: results below exp(-87) (about 1.6e-38, the bottom of the
// normal range) are flushed to 0: attention only takes exp(s - max) <= 1 and exp(s - lse), where such values
// vanish in the row sum's rounding. NaN propagates (the comparisons are written so that NaN falls through).
template <typename F, typename I>
inline F exp_approx(const F& x) {
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

template <int W>
[[gnu::always_inline]] inline float row_max_impl(const float* x, int64_t n) {
  using V = Vec<W>;
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= W) {
    typename V::F acc = V::load(x);
    for (j = W; j + W <= n; j += W) acc = select_max(V::load(x + j), acc);
    for (int l = 0; l < W; ++l) m = select_max(acc[l], m);
  }
  for (; j < n; ++j) m = select_max(x[j], m);
  return m;
}

template <int W>
[[gnu::always_inline]] inline float exp_sub_sum_impl(float* x, int64_t n, float sub) {
  using V = Vec<W>;
  typename V::F acc{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const typename V::F e = exp_approx<typename V::F, typename V::I>(V::load(x + j) - sub);
    V::store(x + j, e);
    acc += e;
  }
  float sum = 0.0f;
  for (int l = 0; l < W; ++l) sum += acc[l];
  for (; j < n; ++j) {
    x[j] = exp_approx<float, int32_t>(x[j] - sub);
    sum += x[j];
  }
  return sum;
}

// One version per ISA (GCC/Clang function multiversioning; the call below, in this file, goes through the
// load-time dispatcher).
#ifdef MMCORE_X86_VERSIONS
[[gnu::target("default")]] float row_max_mv(const float* x, int64_t n) { return row_max_impl<4>(x, n); }
[[gnu::target("arch=x86-64-v3")]] float row_max_mv(const float* x, int64_t n) { return row_max_impl<8>(x, n); }
[[gnu::target("arch=x86-64-v4")]] float row_max_mv(const float* x, int64_t n) { return row_max_impl<16>(x, n); }
[[gnu::target("default")]] float exp_sub_sum_mv(float* x, int64_t n, float sub) {
  return exp_sub_sum_impl<4>(x, n, sub);
}
[[gnu::target("arch=x86-64-v3")]] float exp_sub_sum_mv(float* x, int64_t n, float sub) {
  return exp_sub_sum_impl<8>(x, n, sub);
}
[[gnu::target("arch=x86-64-v4")]] float exp_sub_sum_mv(float* x, int64_t n, float sub) {
  return exp_sub_sum_impl<16>(x, n, sub);
}
#else
float row_max_mv(const float* x, int64_t n) { return row_max_impl<4>(x, n); }
float exp_sub_sum_mv(float* x, int64_t n, float sub) { return exp_sub_sum_impl<4>(x, n, sub); }
#endif

}  // namespace

float row_max(const float* x, int64_t n) { return row_max_mv(x, n); }

float exp_sub_sum(float* x, int64_t n, float sub) { return exp_sub_sum_mv(x, n, sub); }

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

// float32 dot product in W lanes (two accumulators), then the lanes' sum: the auto-vectoriser leaves a float
// reduction sequential (it may not reorder the additions), and the decode path of the forward calls this once per
// (query, key, head).
template <int W>
[[gnu::always_inline]] inline float dot_vec_impl(const float* a, const float* b, int64_t n) {
  using V = Vec<W>;
  typename V::F acc0{}, acc1{};
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    acc0 += V::load(a + j) * V::load(b + j);
    acc1 += V::load(a + j + W) * V::load(b + j + W);
  }
  for (; j + W <= n; j += W) acc0 += V::load(a + j) * V::load(b + j);
  acc0 += acc1;
  float sum = 0.0f;
  for (int l = 0; l < W; ++l) sum += acc0[l];
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

template <int W>
[[gnu::always_inline]] inline void dot_heads_impl(const float* q, const float* k, int64_t heads, int64_t group,
                                                  int64_t d, float scale, float* out, int64_t stride) {
  for (int64_t h = 0; h < heads; ++h) out[h * stride] = scale * dot_vec_impl<W>(q + h * d, k + (h / group) * d, d);
}

template <int W>
[[gnu::always_inline]] inline void axpy_heads_impl(float* acc, const float* w, int64_t stride, const float* v,
                                                   int64_t heads, int64_t group, int64_t d) {
  using V = Vec<W>;
  for (int64_t h = 0; h < heads; ++h) {
    const float a = w[h * stride];
    if (a == 0.0f) continue;  // a masked key (or an exp that underflowed): nothing to add
    const float* x = v + (h / group) * d;
    float* y = acc + h * d;
    int64_t j = 0;
    for (; j + W <= d; j += W) V::store(y + j, V::load(y + j) + a * V::load(x + j));
    for (; j < d; ++j) y[j] += a * x[j];
  }
}

#ifdef MMCORE_X86_VERSIONS
#define MMCORE_ROW_VERSIONS(W, TARGET)                                                                          \
  [[gnu::target(TARGET)]] float dot_mv(const float* a, const float* b, int64_t n) {                              \
    return dot_vec_impl<W>(a, b, n);                                                                            \
  }                                                                                                              \
  [[gnu::target(TARGET)]] void dot_heads_mv(const float* q, const float* k, int64_t heads, int64_t group,        \
                                            int64_t d, float scale, float* out, int64_t stride) {               \
    dot_heads_impl<W>(q, k, heads, group, d, scale, out, stride);                                               \
  }                                                                                                              \
  [[gnu::target(TARGET)]] void axpy_heads_mv(float* acc, const float* w, int64_t stride, const float* v,         \
                                             int64_t heads, int64_t group, int64_t d) {                         \
    axpy_heads_impl<W>(acc, w, stride, v, heads, group, d);                                                     \
  }
MMCORE_ROW_VERSIONS(4, "default")
MMCORE_ROW_VERSIONS(8, "arch=x86-64-v3")
MMCORE_ROW_VERSIONS(16, "arch=x86-64-v4")
#undef MMCORE_ROW_VERSIONS
#else
float dot_mv(const float* a, const float* b, int64_t n) { return dot_vec_impl<4>(a, b, n); }
void dot_heads_mv(const float* q, const float* k, int64_t heads, int64_t group, int64_t d, float scale, float* out,
                  int64_t stride) {
  dot_heads_impl<4>(q, k, heads, group, d, scale, out, stride);
}
void axpy_heads_mv(float* acc, const float* w, int64_t stride, const float* v, int64_t heads, int64_t group,
                   int64_t d) {
  axpy_heads_impl<4>(acc, w, stride, v, heads, group, d);
}
#endif

}  // namespace

float dot(const float* a, const float* b, int64_t n) { return dot_mv(a, b, n); }
float dot(const c10::Half* a, const c10::Half* b, int64_t n) { return dot_impl(a, b, n); }
float dot(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) { return dot_impl(a, b, n); }

void dot_heads(const float* q, const float* k, int64_t heads, int64_t group, int64_t d, float scale, float* out,
               int64_t stride) {
  dot_heads_mv(q, k, heads, group, d, scale, out, stride);
}

void axpy_heads(float* acc, const float* w, int64_t stride, const float* v, int64_t heads, int64_t group,
                int64_t d) {
  axpy_heads_mv(acc, w, stride, v, heads, group, d);
}

}  // namespace mmcore::packed_attention::row_ops
