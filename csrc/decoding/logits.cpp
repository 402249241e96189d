// Decoding-step logits, CPU: out[b, r] = sum_d hidden[b, d] * weight[row_start + r, d] (+ bias[row_start + r]),
// for a small batch of hidden states (b < B, the rows being generated) against the tied output head. Semantics
// and the Python entry point: mmcore/ops/logits.py.
//
// Why not at::linear: at batch 1-8 the product is bound by reading the weight (65,037 x 2048 float32 = 533 MB for
// Kosmos-2), and ATen's GEMV/GEMM reads it well below the memory bandwidth: on this project's Zen 4 test machine,
// one thread, 11-19 GB/s at batch 1 and 5 GB/s at batch 8, where weight.sum() reads 25-28 GB/s. This kernel
// streams every weight row once per call and dots it with all B hidden states while it is in registers/L1: a
// register tile of MR weight rows x NB hidden rows, MR * NB vector accumulators, so each loaded weight vector
// serves NB products and each hidden vector MR. Measured there (thread CPU time, one thread, V = 65,037):
// batch 1 at 17-26 GB/s (D = 512 / 2048), 1.4-1.6x F.linear; batch 8 at 16-18 GB/s, 3.2-3.5x F.linear.
//
// As in packed_attention/row_ops.cpp, the extension is built for baseline x86-64, so the float32 tile is written
// with GCC/Clang vector extensions and compiled once per ISA (x86-64-v4 AVX-512, x86-64-v3 AVX2, baseline SSE2),
// picked at load time. float64 (the exact path for tests) is a plain loop.
//
// bfloat16 hidden states and weights (greedy decoding's screened head, mmcore/ops/logits.py ScreenedHead): AVX512-BF16
// dot products where the CPU has them (below); elsewhere the float32 kernel with each bfloat16 weight vector
// widened exactly as it is loaded (a bfloat16 is a float32's high half), on the hidden states widened once.
//
// NOTE: the summation order differs from BLAS (W interleaved partial sums per product, reduced at the end, then
// the scalar tail), so results differ from at::linear in the last bits; the tests bound the error against a
// float64 reference.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "decoding/cpu_features.h"
#include "decoding/logits.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

// The vector helpers below pass 32/64-byte vectors between inline functions of this file only; GCC's warning
// that such arguments have another ABI without AVX concerns calls across translation units.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mmcore::decoding {
namespace {

// Everything the kernel reads and writes; built by decode_logits_cpu after the checks. hidden (B, D) and out
// (B, R) are contiguous; weight rows have unit stride along D and ldw between rows; bias has R entries or is
// null. All pointers already point at row_start. WT, the weight's element type, is T, or at::BFloat16 with
// T = float (the bfloat16 path on CPUs without AVX512-BF16: each weight widened exactly as it is loaded).
template <typename T, typename WT = T>
struct Problem {
  const T* hidden;
  const WT* weight;
  const T* bias;
  T* out;
  int64_t batch, dim, rows, ldw;
};

// W floats in one GCC/Clang vector extension (one alias per width: vector_size with a dependent size is
// ignored inside templates).
using F4 = float __attribute__((vector_size(16)));
using F8 = float __attribute__((vector_size(32)));
using F16 = float __attribute__((vector_size(64)));
using H4 = uint16_t __attribute__((vector_size(8)));
using H8 = uint16_t __attribute__((vector_size(16)));
using H16 = uint16_t __attribute__((vector_size(32)));
using U4 = uint32_t __attribute__((vector_size(16)));
using U8 = uint32_t __attribute__((vector_size(32)));
using U16 = uint32_t __attribute__((vector_size(64)));

template <int W>
struct VecOf;
template <>
struct VecOf<4> {
  using F = F4;
  using Half = H4;  // W bfloat16 bit patterns
  using Bits = U4;  // W float32 bit patterns
};
template <>
struct VecOf<8> {
  using F = F8;
  using Half = H8;  // W bfloat16 bit patterns
  using Bits = U8;  // W float32 bit patterns
};
template <>
struct VecOf<16> {
  using F = F16;
  using Half = H16;  // W bfloat16 bit patterns
  using Bits = U16;  // W float32 bit patterns
};

template <int W>
[[gnu::always_inline]] inline typename VecOf<W>::F load(const float* p) {
  typename VecOf<W>::F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// W weights as floats: loaded as they are, or bfloat16 widened exactly (its 16 bits are a float's high half).
template <int W>
[[gnu::always_inline]] inline typename VecOf<W>::F load_weight(const float* p) {
  return load<W>(p);
}
template <int W>
[[gnu::always_inline]] inline typename VecOf<W>::F load_weight(const at::BFloat16* p) {
  typename VecOf<W>::Half half;
  std::memcpy(&half, p, sizeof(half));
  const typename VecOf<W>::Bits bits = __builtin_convertvector(half, typename VecOf<W>::Bits) << 16;
  typename VecOf<W>::F v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
[[gnu::always_inline]] inline float widen(float x) { return x; }
[[gnu::always_inline]] inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

// Sum of a vector's lanes as a tree of half-width additions: log2(W) vector adds instead of W - 1 dependent scalar
// adds, and the accumulators stay in registers (a lane loop spilled all MR * NB of them to the stack).
template <int W>
[[gnu::always_inline]] inline float hsum(const typename VecOf<W>::F& v) {
  if constexpr (W == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else if constexpr (W == 8) {
    return hsum<4>(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
  } else {
    return hsum<8>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  }
}

// The lane sums of N <= 16 vectors of 16 floats (out[i] = the sum of v[i]'s lanes), as one fold of all of them: at
// each level, pairs of vectors (a, b) become one whose first half holds a's lanes and second half b's, each source's
// lanes halved by adding its two halves -- 15 vector adds and 30 shuffles for 16 vectors, where a tree per vector
// (hsum) takes 4 adds and 4 shuffles each and leaves 16 scalars. Missing vectors (N < 16) count as zero. Lane i of
// the result is source i. At D = 512 a tile's accumulators do 32 multiply-adds each, so the per-vector trees were
// about a fifth of its vector instructions; measured on Kosmos-2's 16 decoder linears (2 threads): batch 1
// 0.75 -> 0.67 ms, batch 8 1.46 -> 1.42 ms (there the multiply-adds themselves are the bound).
template <int N>
[[gnu::always_inline]] inline void fold_sums(const F16* v, float* out) {
  static_assert(N >= 1 && N <= 16, "fold_sums folds at most 16 vectors");
  F16 l1[8], l2[4], l3[2];
  for (int j = 0; j < 8; ++j) {  // block 8: lanes 0-7 from v[2j], 8-15 from v[2j + 1]
    const F16 a = 2 * j < N ? v[2 * j] : F16{}, b = 2 * j + 1 < N ? v[2 * j + 1] : F16{};
    l1[j] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int j = 0; j < 4; ++j) {  // blocks of 4 lanes, sources in order
    const F16 a = l1[2 * j], b = l1[2 * j + 1];
    l2[j] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int j = 0; j < 2; ++j) {  // blocks of 2 lanes
    const F16 a = l2[2 * j], b = l2[2 * j + 1];
    l3[j] = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  const F16 all = __builtin_shufflevector(l3[0], l3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
                  __builtin_shufflevector(l3[0], l3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  float lanes[16];
  std::memcpy(lanes, &all, sizeof(lanes));
  for (int i = 0; i < N; ++i) out[i] = lanes[i];
}

// Vector accumulators per tile: half the ISA's vector registers (16 of AVX-512's 32, 8 of AVX2's/SSE2's 16),
// leaving the rest for the MR weight vectors and one hidden vector of a step.
template <int W>
constexpr int kAccumulators = W == 16 ? 16 : 8;
// Hidden rows per tile (the largest NB); the batch is covered by tiles of kMaxNb rows and one smaller tile.
// Timed against 2 and 8 (AVX-512 build, D = 512 and 2048, batch 8 and 17, on a shared machine): within the noise,
// except 8 at batch 17, D = 2048, 1.3x slower (8 hidden vectors per step, from L2 at that width).
constexpr int kMaxNb = 4;
// Weight rows per panel: the panel (8 rows x D) is reused from L1/L2 by every group of kMaxNb hidden rows.
constexpr int kPanel = 8;

// Weight rows per tile for NB hidden rows: the largest power of two with MR * NB <= kAccumulators, at most kPanel.
template <int W, int NB>
constexpr int tile_rows() {
  int mr = 1;
  while (mr * 2 * NB <= kAccumulators<W> && mr * 2 <= kPanel) mr *= 2;
  return mr;
}

// Software prefetch distance in weight rows: every tile prefetches, into L2, the rows one panel ahead at the
// offset it is loading, so the next panel streams in while this one is computed. Measured on the Zen 4 machine,
// one thread, in CPU time (batch 8; D = 512 / 2048): no software prefetch 22 / 52 ms; prefetch into L1
// (prefetcht0) 16 / 50 ms -- it holds L1 miss buffers and caps the stream near 15 GB/s; into L2 (prefetcht1) from
// the panel's first hidden group only 10 / 40 ms; from every group (repeats hit L2) 9 / 32 ms. At batch 1 the
// rows stream at the speed of weight.sum() (the hardware prefetcher alone follows the MR interleaved row streams of
// a tile poorly when each is only D * 4 bytes long).
constexpr int64_t kPrefetchRows = kPanel;
// __builtin_prefetch's locality argument: 2 is prefetcht1 (into L2, not L1).
constexpr int kPrefetchLocality = 2;

// out[b * ldo + r] = dot(hidden row b, weight row r) (+ bias[r]) for r < MR, b < NB. With kPrefetch, also
// prefetches rows r of pf (same stride and length as w's).
template <int W, int MR, int NB, bool kPrefetch, typename WT>
[[gnu::always_inline]] inline void tile(const WT* w, int64_t ldw, const WT* pf, const float* h, int64_t ldh,
                                        int64_t dim, const float* bias, float* out, int64_t ldo) {
  using F = typename VecOf<W>::F;
  F acc[MR][NB];
  for (int r = 0; r < MR; ++r) {
    for (int b = 0; b < NB; ++b) acc[r][b] = F{};
  }
  int64_t k = 0;
  for (; k + W <= dim; k += W) {
    F wv[MR];
    for (int r = 0; r < MR; ++r) wv[r] = load_weight<W>(w + r * ldw + k);
    if constexpr (kPrefetch) {
      for (int r = 0; r < MR; ++r) __builtin_prefetch(pf + r * ldw + k, 0, kPrefetchLocality);
    }
    for (int b = 0; b < NB; ++b) {
      const F hv = load<W>(h + b * ldh + k);
      for (int r = 0; r < MR; ++r) acc[r][b] += wv[r] * hv;
    }
  }
  float sum[MR][NB];
  if constexpr (W == 16) {
    fold_sums<MR * NB>(&acc[0][0], &sum[0][0]);
  } else {
    for (int r = 0; r < MR; ++r) {
      for (int b = 0; b < NB; ++b) sum[r][b] = hsum<W>(acc[r][b]);
    }
  }
  for (; k < dim; ++k) {
    for (int r = 0; r < MR; ++r) {
      for (int b = 0; b < NB; ++b) sum[r][b] += widen(w[r * ldw + k]) * h[b * ldh + k];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int b = 0; b < NB; ++b) out[b * ldo + r] = bias ? sum[r][b] + bias[r] : sum[r][b];
  }
}

// One tile of MR weight rows from row r against hidden rows [b0, b0 + NB), prefetching unless the rows one
// panel ahead lie past the range.
template <int W, int NB, int MR, typename WT>
[[gnu::always_inline]] inline void tile_at(const Problem<float, WT>& p, int64_t r, int64_t b0) {
  const WT* w = p.weight + r * p.ldw;
  const float* h = p.hidden + b0 * p.dim;
  const float* bias = p.bias ? p.bias + r : nullptr;
  float* out = p.out + b0 * p.rows + r;
  if (r + kPrefetchRows + MR <= p.rows) {
    tile<W, MR, NB, true>(w, p.ldw, w + kPrefetchRows * p.ldw, h, p.dim, p.dim, bias, out, p.rows);
  } else {
    tile<W, MR, NB, false>(w, p.ldw, static_cast<const WT*>(nullptr), h, p.dim, p.dim, bias, out, p.rows);
  }
}

// Weight rows [r0, r1) against hidden rows [b0, b0 + NB): tiles of MR rows, then single rows.
template <int W, int NB, typename WT>
[[gnu::always_inline]] inline void rows_x_group(const Problem<float, WT>& p, int64_t r0, int64_t r1, int64_t b0) {
  constexpr int MR = tile_rows<W, NB>();
  int64_t r = r0;
  for (; r + MR <= r1; r += MR) tile_at<W, NB, MR>(p, r, b0);
  for (; r < r1; ++r) tile_at<W, NB, 1>(p, r, b0);
}

// Output columns [r0, r1): one panel of kPanel weight rows at a time, every hidden group against it.
template <int W, typename WT>
[[gnu::always_inline]] inline void logits_rows_impl(const Problem<float, WT>& p, int64_t r0, int64_t r1) {
  static_assert(kMaxNb == 4, "the switch below covers NB = 1 ... 4");
  for (int64_t pr = r0; pr < r1; pr += kPanel) {
    const int64_t pe = std::min<int64_t>(pr + kPanel, r1);
    for (int64_t b = 0; b < p.batch; b += kMaxNb) {
      switch (std::min<int64_t>(kMaxNb, p.batch - b)) {
        case 1:
          rows_x_group<W, 1, WT>(p, pr, pe, b);
          break;
        case 2:
          rows_x_group<W, 2, WT>(p, pr, pe, b);
          break;
        case 3:
          rows_x_group<W, 3, WT>(p, pr, pe, b);
          break;
        default:
          rows_x_group<W, 4, WT>(p, pr, pe, b);
      }
    }
  }
}

// One version per ISA (GCC/Clang function multiversioning, dispatched at load time).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
[[gnu::target("default")]] void logits_rows(const Problem<float>& p, int64_t r0, int64_t r1) {
  logits_rows_impl<4>(p, r0, r1);
}
[[gnu::target("arch=x86-64-v3")]] void logits_rows(const Problem<float>& p, int64_t r0, int64_t r1) {
  logits_rows_impl<8>(p, r0, r1);
}
[[gnu::target("arch=x86-64-v4")]] void logits_rows(const Problem<float>& p, int64_t r0, int64_t r1) {
  logits_rows_impl<16>(p, r0, r1);
}
[[gnu::target("default")]] void logits_rows(const Problem<float, at::BFloat16>& p, int64_t r0, int64_t r1) {
  logits_rows_impl<4>(p, r0, r1);
}
[[gnu::target("arch=x86-64-v3")]] void logits_rows(const Problem<float, at::BFloat16>& p, int64_t r0, int64_t r1) {
  logits_rows_impl<8>(p, r0, r1);
}
[[gnu::target("arch=x86-64-v4")]] void logits_rows(const Problem<float, at::BFloat16>& p, int64_t r0, int64_t r1) {
  logits_rows_impl<16>(p, r0, r1);
}
#else
void logits_rows(const Problem<float>& p, int64_t r0, int64_t r1) { logits_rows_impl<4>(p, r0, r1); }
void logits_rows(const Problem<float, at::BFloat16>& p, int64_t r0, int64_t r1) { logits_rows_impl<4>(p, r0, r1); }
#endif

// float64: the exact path, a plain loop.
void logits_rows(const Problem<double>& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const double* w = p.weight + r * p.ldw;
    for (int64_t b = 0; b < p.batch; ++b) {
      const double* h = p.hidden + b * p.dim;
      double s = 0.0;
      for (int64_t k = 0; k < p.dim; ++k) s += h[k] * w[k];
      p.out[b * p.rows + r] = p.bias ? s + p.bias[r] : s;
    }
  }
}

// ---- bfloat16 hidden states and weights, float32 sums: the screened head.
//
// Widening bfloat16 weights costs two instructions per vector on top of the multiply-adds; once several hidden rows
// share each weight vector the product is no longer bound by reading the weight, and the widening made batch 8
// slower than float32 (10.2 against 8.2 ms, V = 65,037, D = 512, one thread). AVX512-BF16's vdpbf16ps multiplies 32
// bfloat16 pairs exactly and adds them into 16 float32 lanes in one instruction, twice the FMA rate, so with the
// hidden states rounded to bfloat16 too (the caller accounts for that in its bounds) the weight is read at half the
// bytes and multiplied at twice the rate. Denormal inputs are flushed to zero by the instruction (the caller's
// bfloat16 copies hold none); sums round to nearest even. Where the CPU lacks AVX512-BF16, both operands are
// widened to float32 and the kernel above runs (its own summation order; the caller's bounds hold for both).
struct DotProblem {
  const at::BFloat16* hidden;
  const at::BFloat16* weight;
  const at::BFloat16* bias;
  float* out;
  int64_t batch, dim, rows, ldw;
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMCORE_DPBF16 gnu::target("avx512f,avx512bw,avx512bf16")

// NOTE: the accumulators and operands are held in this file's own vector types and converted at each intrinsic:
// ImmIntrin's __m512 / __m512bh are declared may_alias, which kept GCC 12 from holding an array of them in
// registers (every vdpbf16ps was followed by a store of its accumulator to the stack; 2x slower).
using Pairs = int16_t __attribute__((vector_size(64)));  // 32 bfloat16 bit patterns

// Accumulators per tile: 12. With 16 (as the float32 tile has) GCC 12 kept the array in memory and stored every
// accumulator after each vdpbf16ps. Weight rows per panel: 24, a multiple of every tile height (12 / NB rows).
constexpr int kDotAccumulators = 12;
constexpr int64_t kDotPanel = 24;

// 32 bfloat16 from p, the lanes at and past `left` zero (masked load: no read past the row).
[[MMCORE_DPBF16, gnu::always_inline]] inline Pairs load_bf16(const at::BFloat16* p, int64_t left) {
  const __mmask32 m = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1);
  return (Pairs)_mm512_maskz_loadu_epi16(m, p);
}

// acc[i][b] += weight row i . hidden row b over the 32 entries at k (fewer past `left`).
template <int MR, int NB>
[[MMCORE_DPBF16, gnu::always_inline]] inline void dot_step(F16 (&acc)[MR][NB], const at::BFloat16* w, int64_t ldw,
                                                          const at::BFloat16* h, int64_t ldh, int64_t k,
                                                          int64_t left) {
  Pairs wv[MR];
  for (int i = 0; i < MR; ++i) wv[i] = load_bf16(w + i * ldw + k, left);
  for (int b = 0; b < NB; ++b) {
    const Pairs hv = load_bf16(h + b * ldh + k, left);
    for (int i = 0; i < MR; ++i) acc[i][b] = (F16)_mm512_dpbf16_ps((__m512)acc[i][b], (__m512bh)wv[i], (__m512bh)hv);
  }
}

template <int MR, int NB, bool kPrefetch>
[[MMCORE_DPBF16, gnu::always_inline]] inline void dot_tile(const DotProblem& p, int64_t r, int64_t b0) {
  const at::BFloat16* w = p.weight + r * p.ldw;
  const at::BFloat16* h = p.hidden + b0 * p.dim;
  F16 acc[MR][NB];
  for (int i = 0; i < MR; ++i) {
    for (int b = 0; b < NB; ++b) acc[i][b] = F16{};
  }
  int64_t k = 0;
  for (; k + 32 <= p.dim; k += 32) {
    if constexpr (kPrefetch) {
      for (int i = 0; i < MR; ++i) __builtin_prefetch(w + (i + kDotPanel) * p.ldw + k, 0, kPrefetchLocality);
    }
    dot_step<MR, NB>(acc, w, p.ldw, h, p.dim, k, 32);
  }
  if (k < p.dim) dot_step<MR, NB>(acc, w, p.ldw, h, p.dim, k, p.dim - k);
  for (int i = 0; i < MR; ++i) {
    const float bias = p.bias ? static_cast<float>(p.bias[r + i]) : 0.0f;
    for (int b = 0; b < NB; ++b) p.out[(b0 + b) * p.rows + r + i] = hsum<16>(acc[i][b]) + bias;
  }
}

template <int NB>
[[MMCORE_DPBF16, gnu::always_inline]] inline void dot_rows_x_group(const DotProblem& p, int64_t r0, int64_t r1,
                                                                   int64_t b0) {
  constexpr int MR = std::min<int>(kDotAccumulators / NB, 8);
  int64_t r = r0;
  for (; r + MR <= r1; r += MR) {
    if (r + kDotPanel + MR <= p.rows) {
      dot_tile<MR, NB, true>(p, r, b0);
    } else {
      dot_tile<MR, NB, false>(p, r, b0);
    }
  }
  for (; r < r1; ++r) dot_tile<1, NB, false>(p, r, b0);
}

[[MMCORE_DPBF16]] void dot_rows(const DotProblem& p, int64_t r0, int64_t r1) {
  for (int64_t pr = r0; pr < r1; pr += kDotPanel) {
    const int64_t pe = std::min<int64_t>(pr + kDotPanel, r1);
    for (int64_t b = 0; b < p.batch; b += kMaxNb) {
      switch (std::min<int64_t>(kMaxNb, p.batch - b)) {
        case 1:
          dot_rows_x_group<1>(p, pr, pe, b);
          break;
        case 2:
          dot_rows_x_group<2>(p, pr, pe, b);
          break;
        case 3:
          dot_rows_x_group<3>(p, pr, pe, b);
          break;
        default:
          dot_rows_x_group<4>(p, pr, pe, b);
      }
    }
  }
}

#else
void dot_rows(const DotProblem&, int64_t, int64_t) { TORCH_CHECK(false, "unreachable: no AVX512-BF16 build"); }
#endif

// Output columns per at::parallel_for grain (a thread's share is one contiguous run of rows, as OpenMP's static
// schedule): at D = 512 and batch 1, 64 rows are 128 KB of weight, 5-10 us of streaming -- above the cost of
// waking a second thread, so small row ranges stay on one thread.
constexpr int64_t kGrainRows = 64;

// weight: the selected rows (R, D), unit stride along D; bias: (R,) or none.
template <typename T, typename WT = T>
void run(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const Problem<T, WT> p{hidden.const_data_ptr<T>(),
                     weight.const_data_ptr<WT>(),
                     bias ? bias->const_data_ptr<T>() : nullptr,
                     out.data_ptr<T>(),
                     hidden.size(0),
                     hidden.size(1),
                     out.size(1),
                     weight.stride(0)};
  at::parallel_for(0, p.rows, kGrainRows, [&](int64_t r0, int64_t r1) { logits_rows(p, r0, r1); });
}

// hidden (B, D) and weight rows (R, D, unit stride along D) both bfloat16; out (B, R) float32.
void run_bf16(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              at::Tensor& out) {
  if (!has_avx512bf16()) {  // also under MMCORE_DISABLE_AVX512BF16=1: how the tests reach the widening path
    const at::Tensor wide_bias = bias ? bias->to(at::kFloat) : at::Tensor();
    run<float, at::BFloat16>(hidden.to(at::kFloat), weight,
                             bias ? std::optional<at::Tensor>(wide_bias) : std::nullopt, out);
    return;
  }
  const DotProblem p{hidden.const_data_ptr<at::BFloat16>(),
                     weight.const_data_ptr<at::BFloat16>(),
                     bias ? bias->const_data_ptr<at::BFloat16>() : nullptr,
                     out.data_ptr<float>(),
                     hidden.size(0),
                     hidden.size(1),
                     out.size(1),
                     weight.stride(0)};
  at::parallel_for(0, p.rows, kGrainRows, [&](int64_t r0, int64_t r1) { dot_rows(p, r0, r1); });
}

}  // namespace

void linear_f32(const float* hidden, int64_t batch, int64_t dim, const float* weight, int64_t ldw, const float* bias,
                float* out, int64_t rows) {
  const Problem<float> p{hidden, weight, bias, out, batch, dim, rows, ldw};
  at::parallel_for(0, p.rows, kGrainRows, [&](int64_t r0, int64_t r1) { logits_rows(p, r0, r1); });
}

at::Tensor decode_logits_cpu(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             int64_t row_start, int64_t row_end) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
                    "hidden (B, D) and weight (V, D) must share D, got ", hidden.sizes(), " and ", weight.sizes());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
                   "hidden must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, "weight must share hidden's dtype ", dtype, ", got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(hidden.device().is_cpu() && weight.device().is_cpu(), "decode_logits_cpu needs CPU tensors, got ",
                    hidden.device(), " and ", weight.device());
  const int64_t vocab = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == vocab, "bias must have shape (", vocab, ",), got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, "bias must share hidden's dtype ", dtype, ", got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), "bias must be a CPU tensor, got ", bias->device());
  }
  TORCH_CHECK_VALUE(0 <= row_start && row_start <= row_end && row_end <= vocab, "rows [", row_start, ", ", row_end,
                    ") must satisfy 0 <= start <= end <= ", vocab);

  const int64_t rows = row_end - row_start;
  // NOTE: weight rows with unit stride (the tied embedding, or a slice of rows of it) are read in place; any other
  // layout has its selected rows copied here, which costs as much as the product.
  const at::Tensor selected = weight.narrow(0, row_start, rows);
  const at::Tensor w = selected.stride(1) == 1 || selected.size(1) <= 1 ? selected : selected.contiguous();
  const at::Tensor h = hidden.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->narrow(0, row_start, rows).contiguous()) : std::nullopt;
  at::Tensor out = at::empty({hidden.size(0), rows}, hidden.options().dtype(dtype == at::kDouble ? dtype : at::kFloat));
  if (dtype == at::kBFloat16) {
    run_bf16(h, w, b, out);
  } else if (dtype == at::kFloat) {
    run<float>(h, w, b, out);
  } else {
    run<double>(h, w, b, out);
  }
  return out;
}

// The schema is declared once, in mmcore/ops/_library.py; this file only supplies the CPU kernel.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) { m.impl("decode_logits", &decode_logits_cpu); }

}  // namespace mmcore::decoding
