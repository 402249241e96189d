// The candidate rows of a screened greedy step (mmcore/models/kosmos2/generation.py, _screened_logits): the sorted
// vocabulary ids c for which some batch row r has upper[r, c] >= floor[r] and scores[r, c] > -inf (the step allows
// c). One pass over the two (B, V) tables; the same selection in ATen ops (a comparison, nonzero over B x V, an
// index and a unique) cost ~0.4 ms a step at B = 8, V = 65,037 on two cores.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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

// mark[c] = 1 where upper[c] >= floor and scores[c] > -inf, for one batch row (NaN compares false: never marked).
MMCORE_SCAN_CLONES void mark_row(const float* upper, const float* scores, float floor, int64_t n, uint8_t* mark) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n; ++c) mark[c] |= static_cast<uint8_t>((upper[c] >= floor) & (scores[c] > kNegInf));
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same with AVX-512 and an early exit: a 16-lane compare of upper against the floor, which almost never holds
// (a handful of the 65,037 ids), and the scores read only where it does. ~5x the loop above.
[[gnu::target("avx512f")]] void mark_row_avx512(const float* upper, const float* scores, float floor, int64_t n,
                                                uint8_t* mark) {
  const __m512 fv = _mm512_set1_ps(floor);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(upper + c), fv, _CMP_GE_OQ);
    if (m == 0) continue;
    m &= _mm512_cmp_ps_mask(_mm512_loadu_ps(scores + c), neg_inf, _CMP_GT_OQ);
    for (; m != 0; m &= static_cast<__mmask16>(m - 1)) mark[c + __builtin_ctz(m)] = 1;
  }
  if (c < n) mark_row(upper + c, scores + c, floor, n - c, mark + c);
}

bool has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#else
void mark_row_avx512(const float* upper, const float* scores, float floor, int64_t n, uint8_t* mark) {
  mark_row(upper, scores, floor, n, mark);
}
bool has_avx512f() { return false; }
#endif

at::Tensor screen_candidates_cpu(const at::Tensor& upper, const at::Tensor& scores, const at::Tensor& floor) {
  TORCH_CHECK_VALUE(upper.dim() == 2 && scores.sizes() == upper.sizes(), "upper and scores must be (B, V) of one "
                    "shape, got ", upper.sizes(), " and ", scores.sizes());
  TORCH_CHECK_VALUE(floor.dim() == 1 && floor.size(0) == upper.size(0), "floor must have shape (", upper.size(0),
                    ",), got ", floor.sizes());
  for (const at::Tensor* t : {&upper, &scores, &floor}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "screen_candidates takes float32 tensors, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), "screen_candidates needs CPU tensors, got ", t->device());
  }
  const at::Tensor u = upper.contiguous(), s = scores.contiguous(), f = floor.contiguous();
  const int64_t batch = u.size(0), vocab = u.size(1);
  std::vector<uint8_t> mark(static_cast<size_t>(vocab), 0);
  const float* up = u.const_data_ptr<float>();
  const float* sp = s.const_data_ptr<float>();
  const float* fp = f.const_data_ptr<float>();
  const bool avx512 = has_avx512f();
  for (int64_t r = 0; r < batch; ++r) {
    if (avx512) {
      mark_row_avx512(up + r * vocab, sp + r * vocab, fp[r], vocab, mark.data());
    } else {
      mark_row(up + r * vocab, sp + r * vocab, fp[r], vocab, mark.data());
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
  at::Tensor out = at::empty({static_cast<int64_t>(rows.size())}, u.options().dtype(at::kLong));
  if (!rows.empty()) std::memcpy(out.data_ptr<int64_t>(), rows.data(), rows.size() * sizeof(int64_t));
  return out;
}

}  // namespace

// The schema is declared once, in mmcore/ops/_library.py; this file only supplies the CPU kernel.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) { m.impl("screen_candidates", &screen_candidates_cpu); }

}  // namespace mmcore::decoding
