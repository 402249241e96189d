// Internals shared by the packed attention CPU kernels (packed_attention_fwd.cpp, packed_attention_bwd.cpp):
// the parameter block, the mask as a per-row key count, the mode switch, row-major GEMM, tile loads and the
// work scheduler. The vectorised row loops are in row_ops.h, the tile GEMM in blas.cpp.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "packed_attention/packed_attention.h"
#include "packed_attention/row_ops.h"

namespace mmcore::packed_attention {

// Everything a kernel needs; built by the entry points in packed_attention.cpp after the input checks. All
// tensors are contiguous: q/out/dout/dq (total_q, heads, head_dim), k/v/dk/dv (total_k, heads_kv, head_dim),
// lse (heads, total_q) float32.
struct Params {
  int64_t total_q, total_k, heads, heads_kv, head_dim, num_segments, max_seqlen_q, max_seqlen_k;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const int32_t* prefix_lens;  // (segments,), only for Mode::kPrefix, else nullptr
  double softmax_scale;
  // Dropout: element kept when philox_randint(seed, offset + (h * total_q + i) * max_seqlen_k + j) >=
  // threshold; kept values are scaled by 1 / (1 - p).
  bool dropout;
  uint64_t seed, offset, threshold;
  double keep_scale;
  // Forward: q, k, v in; out, lse out. Backward: also dout, out, lse in; dq, dk, dv out.
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const void* out_in;
  const float* lse_in;
  void* out;
  float* lse;
  void* dq;
  void* dk;
  void* dv;
};

void run_fwd_kernel(const Params& p, at::ScalarType dtype, Mode mode);
void run_bwd_kernel(const Params& p, at::ScalarType dtype, Mode mode);

// Runtime mask mode -> compile-time constant, as FlashAttention's BOOL_SWITCH.
#define MMCORE_MODE_SWITCH(MODE, CONST_NAME, ...)          \
  [&] {                                                    \
    switch (MODE) {                                        \
      case ::mmcore::packed_attention::Mode::kFull: {      \
        constexpr auto CONST_NAME = Mode::kFull;           \
        return __VA_ARGS__();                              \
      }                                                    \
      case ::mmcore::packed_attention::Mode::kCausal: {    \
        constexpr auto CONST_NAME = Mode::kCausal;         \
        return __VA_ARGS__();                              \
      }                                                    \
      default: {                                           \
        constexpr auto CONST_NAME = Mode::kPrefix;         \
        return __VA_ARGS__();                              \
      }                                                    \
    }                                                      \
  }()

// One segment as the kernels see it: packed offsets, lengths and the mask's per-row key count.
struct Segment {
  int64_t q0, k0, lq, lk, prefix;

  static Segment at(const Params& p, int64_t s) {
    const int64_t q0 = p.cu_seqlens_q[s], k0 = p.cu_seqlens_k[s];
    return {q0, k0, p.cu_seqlens_q[s + 1] - q0, p.cu_seqlens_k[s + 1] - k0, p.prefix_lens ? p.prefix_lens[s] : 0};
  }

  // Number of keys query row i (0 <= i < lq, counted within the segment) sees: they are keys [0, n).
  template <Mode kMode>
  int64_t visible(int64_t i) const {
    if constexpr (kMode == Mode::kFull) {
      return lk;
    } else {
      int64_t n = i + 1 + (lk - lq);
      if constexpr (kMode == Mode::kPrefix) n = std::max(n, prefix);
      return std::clamp<int64_t>(n, 0, lk);
    }
  }

  // The first query row that sees key j (lq when none does); visible(i) is non-decreasing in i.
  template <Mode kMode>
  int64_t first_row_seeing(int64_t j) const {
    if constexpr (kMode == Mode::kFull) {
      return lk > j ? 0 : lq;
    } else {
      if (j >= lk) return lq;
      if (kMode == Mode::kPrefix && j < prefix) return 0;
      return std::clamp<int64_t>(j - (lk - lq), 0, lq);  // i + 1 + lk - lq > j
    }
  }
};

// Row-major C (m x n, ldc) = alpha * op(A) * op(B) + beta * C with op(A) (m x k) and op(B) (k x n); A is
// stored (k x m) when trans_a, B is stored (n x k) when trans_b. beta = 0 ignores C's contents (blas.cpp).
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
             int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
             int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// Rows [0, rows) x cols of a row-major matrix with leading dimension src_ld, in the accumulation type:
// float32/float64 data is used in place (ld = src_ld), half types are converted into buf (ld = cols).
template <typename acc_t, typename scalar_t>
inline const acc_t* load_rows(const scalar_t* src, int64_t rows, int64_t src_ld, int64_t cols, acc_t* buf,
                              int64_t& ld) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    ld = src_ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) row_ops::convert(src + r * src_ld, buf + r * cols, cols);
    ld = cols;
    return buf;
  }
}

// Work items run largest first, taken one at a time from a shared counter by one task per thread, so that a
// long segment among short ones does not leave threads idle at the end. Each item's outputs are written by
// the thread that runs it only.
template <typename Item, typename Setup, typename Body>
void run_work_items(std::vector<Item>& items, const Setup& make_workspace, const Body& body) {
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  // NOTE: at least two tasks even for one item: at::parallel_for runs a single task inline, outside any
  // OpenMP parallel region, where MKL may thread each small tile GEMM itself; inside a region it does not.
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n, 2));
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    auto ws = make_workspace();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      body(items[i], ws);
    }
  });
}

}  // namespace mmcore::packed_attention
