// The candidate rows of a screened greedy step (mmcore/models/kosmos2/generation.py, _screened_logits): the sorted
// vocabulary ids c for which some batch row r has upper[r, c] >= floor[r] and scores[r, c] > -inf (the step allows
// c), where upper = approx + coef[r] . table[:, c] is the screen's upper bound (mmcore/ops/logits.py ScreenedHead:
// the approximate logit plus its error bound), formed here in float32 rather than stored. One pass over the
// (B, V) tables; the same selection in ATen ops (the bound, a comparison, nonzero over B x V, an index and a unique)
// cost ~0.6 ms a step at B = 8, V = 65,037 on two cores.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "decoding/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMCORE_SCAN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMCORE_SCAN_CLONES
#endif

namespace mmcore::decoding {
namespace {

// The row's factors: upper[c] = approx[c] + c0 * t0[c] + c1 * t1[c] + c2 * t2[c].
struct RowBound {
  const float* approx;
  const float* scores;
  const float* t0;
  const float* t1;
  const float* t2;
  float c0, c1, c2, floor;
};

// mark[c] = 1 where upper[c] >= floor and scores[c] > -inf, c in [c0, n) (NaN compares false: never marked).
MMCORE_SCAN_CLONES void mark_row(const RowBound& r, int64_t begin, int64_t n, uint8_t* mark) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t c = begin; c < n; ++c) {
    const float upper = r.approx[c] + (r.c0 * r.t0[c] + r.c1 * r.t1[c] + r.c2 * r.t2[c]);
    mark[c] |= static_cast<uint8_t>((upper >= r.floor) & (r.scores[c] > kNegInf));
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same with AVX-512 and an early exit: 16 upper bounds compared against the floor, which almost never holds (a
// handful of the 65,037 ids), and the scores read only where it does. The same arithmetic, lane by lane.
[[gnu::target("avx512f")]] void mark_row_avx512(const RowBound& r, int64_t n, uint8_t* mark) {
  const __m512 fv = _mm512_set1_ps(r.floor);
  const __m512 c0 = _mm512_set1_ps(r.c0), c1 = _mm512_set1_ps(r.c1), c2 = _mm512_set1_ps(r.c2);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(c0, _mm512_loadu_ps(r.t0 + c)),
                                                 _mm512_mul_ps(c1, _mm512_loadu_ps(r.t1 + c))),
                                   _mm512_mul_ps(c2, _mm512_loadu_ps(r.t2 + c)));
    __mmask16 m = _mm512_cmp_ps_mask(_mm512_add_ps(_mm512_loadu_ps(r.approx + c), e), fv, _CMP_GE_OQ);
    if (m == 0) continue;
    m &= _mm512_cmp_ps_mask(_mm512_loadu_ps(r.scores + c), neg_inf, _CMP_GT_OQ);
    for (; m != 0; m &= static_cast<__mmask16>(m - 1)) mark[c + __builtin_ctz(m)] = 1;
  }
  mark_row(r, c, n, mark);
}
#else
void mark_row_avx512(const RowBound& r, int64_t n, uint8_t* mark) { mark_row(r, 0, n, mark); }
#endif

at::Tensor screen_candidates_cpu(const at::Tensor& approx, const at::Tensor& scores, const at::Tensor& floor,
                                 const at::Tensor& table, const at::Tensor& coef) {
  TORCH_CHECK_VALUE(approx.dim() == 2 && scores.sizes() == approx.sizes(), "approx and scores must be (B, V) of one "
                    "shape, got ", approx.sizes(), " and ", scores.sizes());
  const int64_t batch = approx.size(0), vocab = approx.size(1);
  TORCH_CHECK_VALUE(floor.dim() == 1 && floor.size(0) == batch, "floor must have shape (", batch, ",), got ",
                    floor.sizes());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == 3 && table.size(1) == vocab, "table must have shape (3, ",
                    vocab, "), got ", table.sizes());
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == batch && coef.size(1) == 3, "coef must have shape (", batch,
                    ", 3), got ", coef.sizes());
  for (const at::Tensor* t : {&approx, &scores, &floor, &table, &coef}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "screen_candidates takes float32 tensors, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), "screen_candidates needs CPU tensors, got ", t->device());
  }
  const at::Tensor a = approx.contiguous(), s = scores.contiguous(), f = floor.contiguous();
  const at::Tensor t = table.contiguous(), k = coef.contiguous();
  std::vector<uint8_t> mark(static_cast<size_t>(vocab), 0);
  const float* ap = a.const_data_ptr<float>();
  const float* sp = s.const_data_ptr<float>();
  const float* fp = f.const_data_ptr<float>();
  const float* tp = t.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const bool avx512 = has_avx512f();
  for (int64_t r = 0; r < batch; ++r) {
    const RowBound row{ap + r * vocab, sp + r * vocab, tp, tp + vocab, tp + 2 * vocab, kp[3 * r], kp[3 * r + 1],
                       kp[3 * r + 2], fp[r]};
    if (avx512) {
      mark_row_avx512(row, vocab, mark.data());
    } else {
      mark_row(row, 0, vocab, mark.data());
    }
  }
  std::vector<int64_t> rows;
  int64_t c = 0;
  for (; c + 8 <= vocab; c += 8) {  // marks are rare: skip 8 clear bytes at a time
    uint64_t word;
    std::memcpy(&word, mark.data() + c, sizeof(word));
    if (word == 0) continue;
    for (int64_t j = c; j < c + 8; ++j) {
      if (mark[j]) rows.push_back(j);
    }
  }
  for (; c < vocab; ++c) {
    if (mark[c]) rows.push_back(c);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(rows.size())}, a.options().dtype(at::kLong));
  if (!rows.empty()) std::memcpy(out.data_ptr<int64_t>(), rows.data(), rows.size() * sizeof(int64_t));
  return out;
}

}  // namespace

// The schema is declared once, in mmcore/ops/_library.py; this file only supplies the CPU kernel.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) { m.impl("screen_candidates", &screen_candidates_cpu); }

}  // namespace mmcore::decoding
