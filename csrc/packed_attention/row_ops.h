// The elementwise loops of packed attention over one row of a score tile (n <= block_k elements): max,
// exp and sum, rescale, dropout, the softmax gradient, and half <-> float conversion.
//
// The float32 versions (row_ops.cpp) are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and baseline
// x86-64 and picked at load time (GCC/Clang function multiversioning), because the extension itself is built
// for the baseline ISA; the float64 versions (the exact, slow path used for testing) are plain inline loops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "packed_attention/packed_attention.h"

namespace mmcore::packed_attention::row_ops {

// max(x[0:n]); n >= 1.
float row_max(const float* x, int64_t n);
// x[j] = exp(x[j] - sub) for j < n; returns the sum of the new x. sub must be finite.
float exp_sub_sum(float* x, int64_t n, float sub);
// x[j] *= a.
void scale(float* x, int64_t n, float a);
// z[j] = p[j] * keep_scale where philox_randint(seed, counter + j) >= threshold, else 0 (z may alias p).
void dropout(float* z, const float* p, int64_t n, uint64_t seed, uint64_t counter, uint64_t threshold,
             float keep_scale);
// The softmax gradient of one row: ds[j] = z[j] * ds[j] - p[j] * d, with ds holding dP = dO V^T on entry
// and z = P with dropout applied (z == p without dropout).
void softmax_grad(float* ds, const float* p, const float* z, int64_t n, float d);
// Conversions between the half types and float32.
void convert(const c10::Half* src, float* dst, int64_t n);
void convert(const c10::BFloat16* src, float* dst, int64_t n);
void convert(const float* src, c10::Half* dst, int64_t n);
void convert(const float* src, c10::BFloat16* dst, int64_t n);
// Dot product of two rows in float32: sum(a * b), upcasting half inputs (the float32 one vectorised: its
// summation order is not the sequential one).
float dot(const float* a, const float* b, int64_t n);
float dot(const c10::Half* a, const c10::Half* b, int64_t n);
float dot(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n);
// The decode path's per-key loops over `heads` query heads (head h reads kv head h / group of k or v, d floats
// each): out[h * stride] = scale * dot(q + h * d, k + (h / group) * d), and
// acc[h * d + x] += w[h * stride] * v[(h / group) * d + x].
void dot_heads(const float* q, const float* k, int64_t heads, int64_t group, int64_t d, float scale, float* out,
               int64_t stride);
void axpy_heads(float* acc, const float* w, int64_t stride, const float* v, int64_t heads, int64_t group,
                int64_t d);

inline double row_max(const double* x, int64_t n) { return *std::max_element(x, x + n); }

inline double exp_sub_sum(double* x, int64_t n, double sub) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - sub);
    sum += x[j];
  }
  return sum;
}

inline void scale(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

inline void dropout(double* z, const double* p, int64_t n, uint64_t seed, uint64_t counter, uint64_t threshold,
                    double keep_scale) {
  for (int64_t j = 0; j < n; ++j) z[j] = philox_randint(seed, counter + j) >= threshold ? p[j] * keep_scale : 0.0;
}

inline void softmax_grad(double* ds, const double* p, const double* z, int64_t n, double d) {
  for (int64_t j = 0; j < n; ++j) ds[j] = z[j] * ds[j] - p[j] * d;
}

inline double dot(const double* a, const double* b, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

inline void dot_heads(const double* q, const double* k, int64_t heads, int64_t group, int64_t d, double scale,
                      double* out, int64_t stride) {
  for (int64_t h = 0; h < heads; ++h) out[h * stride] = scale * dot(q + h * d, k + (h / group) * d, d);
}

inline void axpy_heads(double* acc, const double* w, int64_t stride, const double* v, int64_t heads, int64_t group,
                       int64_t d) {
  for (int64_t h = 0; h < heads; ++h) {
    const double a = w[h * stride];
    const double* x = v + (h / group) * d;
    for (int64_t j = 0; j < d; ++j) acc[h * d + j] += a * x[j];
  }
}

// Same-type "conversions" for the float32/float64 output paths.
template <typename T>
inline void convert(const T* src, T* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

}  // namespace mmcore::packed_attention::row_ops
