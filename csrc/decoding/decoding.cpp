// Fused grounded decoding step, CPU kernel. Semantics: mmcore/ops/decoding.py (module docstring and the
// reference grounded_decode_step_ref); the passes follow kernels/decoding.py, with per-row algorithms that suit a
// CPU: std::nth_element for the top-k score, a weighted 2048-bucket histogram of the scores' order-preserving keys
// then a sort of one bucket for the top-p cutoff. Rows run in parallel (at::parallel_for), each in a thread-local
// float32 workspace of one vocabulary row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "decoding/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace mmcore::decoding {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Grammar states, as mmcore.ops.decoding.BOX_STATES.
enum : int64_t { kText = 0, kAfterPhrase = 1, kExpectTopLeft = 2, kExpectBottomRight = 3, kExpectClose = 4 };

// GroundingTokens, in its field order.
struct Special {
  int64_t phrase_open, phrase_close, object_open, object_close, delimiter, first_loc, num_bins, eos, pad;
  bool is_loc(int64_t t) const { return t >= first_loc && t < first_loc + num_bins * num_bins; }
};

struct Options {
  int64_t ngram;
  int64_t min_new_tokens;
  bool do_sample;
  float temperature;
  int64_t top_k;
  double top_p;
  uint64_t seed;
  bool constrain;
  bool write_scores;
};

inline bool allowed(int64_t v, int64_t state, int64_t top_left, const Special& s) {
  const bool loc = s.is_loc(v);
  const bool closes = v == s.object_close || v == s.delimiter;
  switch (state) {
    case kText:
      return !loc && !closes;
    case kAfterPhrase:
      return v == s.object_open;
    case kExpectTopLeft:
      return loc;
    case kExpectBottomRight: {
      if (!loc) return false;
      const int64_t idx = v - s.first_loc;
      return idx / s.num_bins >= top_left / s.num_bins && idx % s.num_bins >= top_left % s.num_bins;
    }
    default:
      return closes;
  }
}

inline int64_t advance(int64_t state, int64_t t, const Special& s) {
  if (t == s.phrase_close) return kAfterPhrase;
  if (t == s.object_open) return kExpectTopLeft;
  if (t == s.delimiter && state == kExpectClose) return kExpectTopLeft;
  if (s.is_loc(t) && state == kExpectTopLeft) return kExpectBottomRight;
  if (s.is_loc(t) && state == kExpectBottomRight) return kExpectClose;
  return kText;
}

// The first 32-bit output of Philox-4x32-10 for a 64-bit counter, as Triton's tl.randint(seed, counter) and
// mmcore/ops/_philox.py: key (seed low, seed high), state (counter low, counter high, 0, 0).
inline uint32_t philox_randint(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = uint64_t{0xCD9E8D57} * c2;
    const uint64_t prod_a = uint64_t{0xD2511F53} * c0;
    c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(prod_b);
    c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(prod_a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// float32 -> 32-bit key with the values' order (-0.0 and +0.0 share the key of +0.0).
inline uint32_t order_key(float x) {
  if (x == 0.0f) x = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The top-p cutoff for mass > 0: the largest key J with sum(w over keys >= J) >= mass (keep keys >= J). A weighted
// histogram over the keys' top 11 bits finds J's bucket, a sort of that bucket's tokens finds J.
uint32_t top_p_cutoff(const float* x, const float* w, int64_t vocab, double mass,
                      std::vector<std::pair<uint32_t, double>>& bucket) {
  constexpr int kShift = 21;
  std::array<double, (1u << (32 - kShift))> hist{};
  for (int64_t v = 0; v < vocab; ++v) {
    if (w[v] > 0.0f) hist[order_key(x[v]) >> kShift] += static_cast<double>(w[v]);
  }
  double above = 0.0;
  int64_t b = static_cast<int64_t>(hist.size()) - 1;
  for (; b >= 0; --b) {
    if (above + hist[b] >= mass) break;
    above += hist[b];
  }
  if (b < 0) return 0;  // rounding: the total fell short of top_p * total; keep everything
  bucket.clear();
  for (int64_t v = 0; v < vocab; ++v) {
    const uint32_t key = order_key(x[v]);
    if (w[v] > 0.0f && static_cast<int64_t>(key >> kShift) == b) bucket.emplace_back(key, static_cast<double>(w[v]));
  }
  std::sort(bucket.begin(), bucket.end(), [](const auto& l, const auto& r) { return l.first > r.first; });
  for (size_t i = 0; i < bucket.size();) {
    const uint32_t key = bucket[i].first;
    for (; i < bucket.size() && bucket[i].first == key; ++i) above += bucket[i].second;
    if (above >= mass) return key;
  }
  return bucket.empty() ? 0 : bucket.back().first;  // rounding again: the bucket's smallest key
}

// Sets what the grammar does not allow in `state` to -inf (the ranges of allowed(), which the fallback uses).
void ban_by_grammar(float* x, int64_t vocab, int64_t state, int64_t top_left, const Special& s) {
  const int64_t first = s.first_loc, nb = s.num_bins, end = first + nb * nb;
  auto fill = [&](int64_t lo, int64_t hi) { std::fill(x + lo, x + hi, kNegInf); };
  auto keep_only = [&](std::initializer_list<int64_t> ids) {
    std::array<float, 2> kept{};
    size_t k = 0;
    for (int64_t t : ids) kept[k++] = x[t];
    fill(0, vocab);
    k = 0;
    for (int64_t t : ids) x[t] = kept[k++];
  };
  switch (state) {
    case kText:
      fill(first, end);
      x[s.object_close] = x[s.delimiter] = kNegInf;
      return;
    case kAfterPhrase:
      keep_only({s.object_open});
      return;
    case kExpectTopLeft:
      fill(0, first);
      fill(end, vocab);
      return;
    case kExpectBottomRight: {
      fill(0, first);
      fill(end, vocab);
      const int64_t cell = std::clamp<int64_t>(top_left, 0, nb * nb - 1), row = cell / nb, col = cell % nb;
      fill(first, first + row * nb);                                                  // rows above the top-left
      for (int64_t r = row; r < nb; ++r) fill(first + r * nb, first + r * nb + col);  // columns left of it
      return;
    }
    default:
      keep_only({s.object_close, s.delimiter});
  }
}

// The maximum of x[0, n), the first index holding it (n when n == 0), and whether some entry is NaN (NaN entries
// are otherwise skipped): eight independent running maxima, so the loop is not one long dependency chain, then a
// search for the first equal entry.
struct RowMax {
  float best;
  int64_t index;
  bool nan;
};

RowMax max_and_first(const float* x, int64_t n) {
  std::array<float, 8> m;
  m.fill(kNegInf);
  bool nan = false;
  int64_t v = 0;
  for (; v + 8 <= n; v += 8) {
    for (int k = 0; k < 8; ++k) {
      m[k] = x[v + k] > m[k] ? x[v + k] : m[k];
      nan |= std::isnan(x[v + k]);
    }
  }
  for (; v < n; ++v) {
    m[0] = x[v] > m[0] ? x[v] : m[0];
    nan |= std::isnan(x[v]);
  }
  const float best = *std::max_element(m.begin(), m.end());
  return {best, std::find(x, x + n, best) - x, nan};
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same with AVX-512: four 16-lane running maxima (vmaxps returns its second operand when the first is NaN,
// as the comparison above keeps the running maximum), then a 16-lane search. A greedy step of a batch of 8 over
// 65,037 logits spent most of its time in the scalar search.
[[gnu::target("avx512f")]] RowMax max_and_first_avx512(const float* x, int64_t n) {
  __m512 m[4];
  for (auto& acc : m) acc = _mm512_set1_ps(kNegInf);
  __mmask16 unordered = 0;  // lanes that met a NaN
  int64_t v = 0;
  for (; v + 64 <= n; v += 64) {
    for (int k = 0; k < 4; ++k) {
      const __m512 xv = _mm512_loadu_ps(x + v + 16 * k);
      m[k] = _mm512_max_ps(xv, m[k]);
      unordered |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
    }
  }
  float best = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
  bool nan = unordered != 0;
  for (; v < n; ++v) {
    best = x[v] > best ? x[v] : best;
    nan |= std::isnan(x[v]);
  }
  const __m512 target = _mm512_set1_ps(best);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
    if (eq != 0) return {best, i + __builtin_ctz(eq), nan};
  }
  for (; i < n; ++i) {
    if (x[i] == best) return {best, i, nan};
  }
  return {best, n, nan};
}
#else
RowMax max_and_first_avx512(const float* x, int64_t n) { return max_and_first(x, n); }
#endif

// decode_row's result for a row whose scores hold NaN after the bans (no token can be chosen).
constexpr int64_t kNanRow = -1;

struct RowState {
  int64_t* seq;  // (max_len,)
  int64_t& length;
  int64_t start;
  int64_t& box_state;
  int64_t& top_left;
  int64_t& step;
  bool& finished;
};

// Row `row`'s choice (its state is only read; the scores go to x): the token, or kNanRow.
template <typename scalar_t>
int64_t decode_row(const scalar_t* logits, int64_t vocab, int64_t batch, int64_t row, RowState r, float* x,
                   std::vector<float>& weights, std::vector<std::pair<uint32_t, double>>& bucket, const Special& s,
                   const Options& o) {
  // logits (/ temperature) into the workspace, then the grammar's and min-new-tokens' bans
  for (int64_t v = 0; v < vocab; ++v) x[v] = static_cast<float>(logits[v]);
  if (o.do_sample) {
    for (int64_t v = 0; v < vocab; ++v) x[v] = x[v] / o.temperature;
  }
  if (o.constrain) ban_by_grammar(x, vocab, r.box_state, r.top_left, s);
  if (r.step < o.min_new_tokens) x[s.eos] = kNegInf;
  // no-repeat-n-gram over seq[start, length): window j bans its last token when its first n - 1 match the tail
  const int64_t n = o.ngram;
  if (n > 0 && r.length - r.start >= n) {
    const int64_t last = r.length - n;
    const int64_t* tail = r.seq + last + 1;
    for (int64_t j = r.start; j <= last; ++j) {
      if (std::equal(r.seq + j, r.seq + j + n - 1, tail)) {
        const int64_t t = r.seq[j + n - 1];
        if (t >= 0 && t < vocab) x[t] = kNegInf;
      }
    }
  }
  // maximum and its first index; nothing finite: the grammar's allowed tokens with score 0
  auto [best, next, nan] = has_avx512f() ? max_and_first_avx512(x, vocab) : max_and_first(x, vocab);
  // NaN left after the bans: no token can be chosen by the scores (torch.argmax would return the NaN's index and
  // sampling has no distribution); finished rows emit pad whatever their logits hold. The caller raises.
  if (nan && !r.finished) return kNanRow;
  if (best == kNegInf) {
    next = vocab;
    for (int64_t v = vocab - 1; v >= 0; --v) {
      const bool ok = !o.constrain || allowed(v, r.box_state, r.top_left, s);
      x[v] = ok ? 0.0f : kNegInf;
      if (ok) next = v;
    }
    best = 0.0f;
  }

  if (o.do_sample) {
    uint32_t key_cut = 0;
    const bool has_k = o.top_k > 0 && o.top_k < vocab, has_p = o.top_p < 1.0;
    if (has_k) {
      weights.assign(x, x + vocab);
      std::nth_element(weights.begin(), weights.begin() + (o.top_k - 1), weights.end(), std::greater<float>());
      key_cut = order_key(weights[o.top_k - 1]);
    }
    // weights exp(x - max) of the tokens top-k keeps, 0 elsewhere: the only exp pass
    weights.resize(vocab);
    float* w = weights.data();
    for (int64_t v = 0; v < vocab; ++v) w[v] = order_key(x[v]) >= key_cut ? std::exp(x[v] - best) : 0.0f;
    if (has_p) {
      double total = 0.0;
      for (int64_t v = 0; v < vocab; ++v) total += static_cast<double>(w[v]);
      const double mass = o.top_p * total;
      uint32_t key_p = mass > 0.0 ? top_p_cutoff(x, w, vocab, mass, bucket) : 0xFFFFFFFFu;
      key_p = std::min(key_p, order_key(best));  // the largest score is always kept
      key_cut = std::max(key_cut, key_p);
      for (int64_t v = 0; v < vocab; ++v) {
        if (order_key(x[v]) < key_cut) w[v] = 0.0f;
      }
    }
    // inverse-CDF sample over the kept tokens in vocabulary order
    double kept_total = 0.0;
    int64_t last_kept = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      kept_total += static_cast<double>(w[v]);
      if (w[v] > 0.0f) last_kept = v;
    }
    const uint32_t draw = philox_randint(o.seed, static_cast<uint64_t>(r.step * batch + row));
    const double target = static_cast<double>(draw) * (1.0 / 4294967296.0) * kept_total;
    double running = 0.0;
    next = last_kept;  // NOTE: only when float64 rounding leaves the running sum a hair below the target
    for (int64_t v = 0; v < vocab; ++v) {
      if (w[v] > 0.0f) {
        running += static_cast<double>(w[v]);
        if (running > target) {
          next = v;
          break;
        }
      }
    }
    if (o.write_scores && (has_k || has_p)) {
      for (int64_t v = 0; v < vocab; ++v) {
        if (order_key(x[v]) < key_cut) x[v] = kNegInf;
      }
    }
  }

  return next;
}

// The state update of a row after its choice: finished rows emit pad; append; grammar transition. Returns the token
// emitted.
int64_t advance_row(RowState r, int64_t next, int64_t max_len, const Special& s) {
  if (r.finished) next = s.pad;
  if (r.length < max_len) r.seq[r.length] = next;
  r.length += 1;
  r.step += 1;
  r.finished = r.finished || next == s.eos;
  const int64_t new_state = advance(r.box_state, next, s);
  r.top_left = new_state == kExpectBottomRight ? next - s.first_loc : -1;
  r.box_state = new_state;
  return next;
}

void check_row_tensor(const at::Tensor& t, const char* name, int64_t batch, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, name, " must have shape (", batch, ",), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

}  // namespace

at::Tensor grounded_decode_step_cpu(const at::Tensor& logits, at::Tensor& sequences, at::Tensor& lengths,
                                    const at::Tensor& starts, at::Tensor& box_state, at::Tensor& top_left,
                                    at::Tensor& steps, at::Tensor& finished, const std::optional<at::Tensor>& scores,
                                    at::IntArrayRef special_tokens, int64_t no_repeat_ngram_size,
                                    int64_t min_new_tokens, bool do_sample, double temperature, int64_t top_k,
                                    double top_p, int64_t seed, bool constrain_boxes) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must have shape (batch, vocab), got ", logits.sizes());
  TORCH_CHECK_TYPE(
      logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf || logits.scalar_type() == at::kBFloat16,
      "logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "grounded_decode_step_cpu needs CPU tensors, got ", logits.device());
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(sequences.dim() == 2 && sequences.size(0) == batch, "sequences must have shape (", batch,
                    ", max_len), got ", sequences.sizes());
  TORCH_CHECK_TYPE(sequences.scalar_type() == at::kLong, "sequences must be int64, got ", sequences.scalar_type());
  TORCH_CHECK_VALUE(sequences.device().is_cpu() && sequences.is_contiguous(),
                    "sequences must be a contiguous CPU tensor");
  check_row_tensor(lengths, "lengths", batch, at::kLong);
  check_row_tensor(starts, "starts", batch, at::kLong);
  check_row_tensor(box_state, "box_state", batch, at::kLong);
  check_row_tensor(top_left, "top_left", batch, at::kLong);
  check_row_tensor(steps, "steps", batch, at::kLong);
  check_row_tensor(finished, "finished", batch, at::kBool);
  if (scores.has_value()) {
    TORCH_CHECK_VALUE(scores->sizes() == logits.sizes(), "scores must have the shape of logits ", logits.sizes(),
                      ", got ", scores->sizes());
    TORCH_CHECK_TYPE(scores->scalar_type() == at::kFloat, "scores must be float32, got ", scores->scalar_type());
    TORCH_CHECK_VALUE(scores->device().is_cpu() && scores->is_contiguous(), "scores must be a contiguous CPU tensor");
  }
  TORCH_CHECK_VALUE(special_tokens.size() == 9, "special_tokens must hold the 9 GroundingTokens fields, got ",
                    special_tokens.size());
  const Special s{special_tokens[0], special_tokens[1], special_tokens[2], special_tokens[3], special_tokens[4],
                  special_tokens[5], special_tokens[6], special_tokens[7], special_tokens[8]};
  TORCH_CHECK_VALUE(s.num_bins >= 1 && s.first_loc >= 0 && s.first_loc + s.num_bins * s.num_bins <= vocab,
                    "special_tokens: the location tokens must lie inside the vocabulary of ", vocab);
  for (const int64_t id : {s.phrase_close, s.object_open, s.object_close, s.delimiter, s.eos, s.pad}) {
    TORCH_CHECK_VALUE(id >= 0 && id < vocab, "special_tokens: id ", id, " is outside the vocabulary of ", vocab);
  }
  TORCH_CHECK_VALUE(no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0, got ", no_repeat_ngram_size);
  TORCH_CHECK_VALUE(min_new_tokens >= 0, "min_new_tokens must be >= 0, got ", min_new_tokens);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(top_p >= 0 && top_p <= 1, "top_p must be in [0, 1], got ", top_p);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be >= 0, got ", seed);
  const Options o{.ngram = no_repeat_ngram_size,
                  .min_new_tokens = min_new_tokens,
                  .do_sample = do_sample,
                  .temperature = static_cast<float>(temperature),
                  .top_k = top_k,
                  .top_p = top_p,
                  .seed = static_cast<uint64_t>(seed),
                  .constrain = constrain_boxes,
                  .write_scores = scores.has_value()};

  const at::Tensor lg = logits.stride(1) == 1 ? logits : logits.contiguous();
  at::Tensor out = at::empty({batch}, logits.options().dtype(at::kLong));
  const int64_t max_len = sequences.size(1);
  int64_t* seq = sequences.data_ptr<int64_t>();
  int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* start = starts.const_data_ptr<int64_t>();
  int64_t* state = box_state.data_ptr<int64_t>();
  int64_t* tl = top_left.data_ptr<int64_t>();
  int64_t* step = steps.data_ptr<int64_t>();
  bool* fin = finished.data_ptr<bool>();
  float* sc = scores.has_value() ? scores->data_ptr<float>() : nullptr;
  int64_t* o_ptr = out.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "grounded_decode_step_cpu", [&] {
    const scalar_t* lp = lg.const_data_ptr<scalar_t>();
    const int64_t stride = lg.stride(0);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      // NOTE: per-thread buffers kept across calls: a fresh 260 KB vector per call costs an mmap, page faults
      // and a memset, as much as the greedy step itself.
      thread_local std::vector<float> workspace, weights;
      thread_local std::vector<std::pair<uint32_t, double>> bucket;
      if (!sc && static_cast<int64_t>(workspace.size()) < vocab) workspace.resize(vocab);
      for (int64_t r = begin; r < end; ++r) {
        float* x = sc ? sc + r * vocab : workspace.data();
        RowState row{seq + r * max_len, len[r], start[r], state[r], tl[r], step[r], fin[r]};
        o_ptr[r] = decode_row(lp + r * stride, vocab, batch, r, row, x, weights, bucket, s, o);
      }
    });
  });
  // every row chosen before any state changes, so an error leaves the state as it was (as the torch backend's)
  for (int64_t r = 0; r < batch; ++r) {
    TORCH_CHECK_VALUE(o_ptr[r] != kNanRow, "grounded_decode_step: the logits of row ", r,
                      " hold NaN (after the bans): the model's output is not finite");
  }
  for (int64_t r = 0; r < batch; ++r) {
    const RowState row{seq + r * max_len, len[r], start[r], state[r], tl[r], step[r], fin[r]};
    o_ptr[r] = advance_row(row, o_ptr[r], max_len, s);
  }
  return out;
}

// The schema is declared once, in mmcore/ops/_library.py; this file only supplies the CPU kernel.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) { m.impl("grounded_decode_step", &grounded_decode_step_cpu); }

}  // namespace mmcore::decoding
