// int8 screening logits: the cheapest first pass of greedy decoding's screened head (mmcore/ops/logits.py
// ScreenedHead, kind "int8"). Every logit is approximated from 8-bit copies of the head and of the hidden states;
// the caller bounds the approximation's error and computes the few rows that can still win exactly in float32.
//
// Operands. The weight copy is int8 q_w = round(w / s_w) per row (scale s_w = max|w| / 127), packed for AVX512-VNNI:
// (V_pad / 16, D_pad / 4, 16, 4) -- panels of 16 rows, and within a panel, for each group of 4 columns, the 4 entries
// of each of the 16 rows -- so that one 64-byte load holds 4 columns of 16 rows, exactly what vpdpbusd multiplies
// against 4 bytes of one hidden state broadcast to every lane. Each lane then accumulates one row's dot product:
// there is no horizontal sum at the end (the bfloat16 kernel spends one per output), and the epilogue is 16 rows
// wide. The hidden states are uint8 u = round(h / s_h) + 128 (vpdpbusd multiplies unsigned by signed bytes), so
//   sum_k u_k q_w,k = sum_k q_h,k q_w,k + 128 sum_k q_w,k,
// and ``offsets`` holds the second term per row. All integer arithmetic is exact (|sum| <= 255 * 127 * D_pad < 2^31
// for D_pad <= 66,000, checked). The epilogue is (sum - offset) * s_w * s_h in float64, rounded once to float32
// (float64 so that no intermediate product can overflow or underflow where the result does not).
// Half the bfloat16 copy's bytes and twice vdpbf16ps' products per instruction.
//
// Without AVX512-VNNI (or with MMCORE_DISABLE_AVX512VNNI=1) a scalar loop computes the same integers and the same
// float64 epilogue in the same order: the two paths give identical results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "decoding/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace mmcore::decoding {
namespace {

constexpr int64_t kPanelRows = 16;   // weight rows per panel (one 512-bit lane each)
constexpr int64_t kGroupCols = 4;    // columns per vpdpbusd step
constexpr int64_t kMaxDim = 66000;   // 255 * 127 * 66,000 < 2^31: no int32 sum can wrap
// Panels (192 KB at D = 512) whose tiles run for every batch group in turn: a multiple of every tile height (3, 6
// and 8 panels for groups of 8, 4 and 1-3 hidden rows), so no block ends in single-panel tiles.
constexpr int64_t kBlockPanels = 24;
constexpr int64_t kGrainPanels = 8;  // at::parallel_for grain
// Software prefetch: each tile prefetches, into L2 (prefetcht1), the panels of the tile after it at the offset it is
// loading. One core's hardware prefetcher alone pulled the packed weight at 13-15 GB/s. Measured (V = 65,037,
// D = 512, screen_logits_int8 alone, 2 threads; no prefetch -> one tile ahead; 2 or 4 tiles ahead within noise):
// batch 1 0.51 -> 0.30 ms, batch 4 0.44 -> 0.37 ms, batch 8 1.04 -> 0.74 ms (1.18 ms with blocks of 8 panels).
constexpr int64_t kPrefetchTiles = 1;
constexpr int kPrefetchLocality = 2;

struct Int8Problem {
  const uint8_t* hidden;   // (batch, dim) with dim = D_pad
  const int8_t* weight;    // (panels, dim / 4, 16, 4)
  const int32_t* offsets;  // (panels * 16,)
  const float* wscale;     // (panels * 16,)
  const float* hscale;     // (batch,)
  float* out;              // (batch, vocab)
  int64_t batch, dim, vocab;
  int64_t panels;          // ceil(vocab / 16)
};

// The epilogue of one output: double(sum - offset) * s_w * s_h, in this order on both paths, then float32.
inline float finish(int32_t sum, int32_t offset, float ws, float hs) {
  return static_cast<float>(static_cast<double>(sum - offset) * static_cast<double>(ws) * static_cast<double>(hs));
}

void int8_rows_scalar(const Int8Problem& p, int64_t p0, int64_t p1) {
  const int64_t groups = p.dim / kGroupCols;
  for (int64_t b = 0; b < p.batch; ++b) {
    const uint8_t* h = p.hidden + b * p.dim;
    for (int64_t panel = p0; panel < p1; ++panel) {
      const int8_t* w = p.weight + panel * kPanelRows * p.dim;
      for (int64_t lane = 0; lane < kPanelRows; ++lane) {
        const int64_t r = panel * kPanelRows + lane;
        if (r >= p.vocab) break;
        int32_t sum = 0;
        for (int64_t g = 0; g < groups; ++g) {
          const int8_t* wg = w + (g * kPanelRows + lane) * kGroupCols;
          for (int64_t c = 0; c < kGroupCols; ++c) sum += static_cast<int32_t>(h[g * kGroupCols + c]) * wg[c];
        }
        p.out[b * p.vocab + r] = finish(sum, p.offsets[r], p.wscale[r], p.hscale[b]);
      }
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMCORE_VNNI gnu::target("avx512f,avx512bw,avx512vnni")

// The file's own vector type for the accumulators (as the bfloat16 kernel: arrays of the may_alias __m512i kept
// GCC from holding them in registers).
using I32x16 = int32_t __attribute__((vector_size(64)));
// Accumulators per tile: 24 (+ MR weight vectors and one broadcast: at most 32 registers), hidden rows per group:
// up to 8, so that a batch of 8 reads each weight vector once and issues 11 loads per 24 vpdpbusd.
constexpr int kAccumulators = 24;
constexpr int64_t kMaxGroup = 8;

// Two halves of 8 floats as one vector of 16 (AVX512F only: no AVX512DQ insert).
[[MMCORE_VNNI, gnu::always_inline]] inline __m512 join(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

template <int MR, int NB>
[[MMCORE_VNNI, gnu::always_inline]] inline void int8_tile(const Int8Problem& p, int64_t panel, int64_t b0,
                                                         int64_t prefetch_panels) {
  const int64_t groups = p.dim / kGroupCols, panel_bytes = kPanelRows * p.dim;
  const int8_t* w = p.weight + panel * panel_bytes;
  const int8_t* ahead = w + prefetch_panels * panel_bytes;
  I32x16 acc[MR][NB];
  for (int i = 0; i < MR; ++i) {
    for (int b = 0; b < NB; ++b) acc[i][b] = I32x16{};
  }
  for (int64_t g = 0; g < groups; ++g) {
    I32x16 wv[MR];
    for (int i = 0; i < MR; ++i) wv[i] = (I32x16)_mm512_loadu_si512(w + i * panel_bytes + g * kPanelRows * kGroupCols);
    if (prefetch_panels > 0) {
      for (int i = 0; i < MR; ++i) {
        __builtin_prefetch(ahead + i * panel_bytes + g * kPanelRows * kGroupCols, 0, kPrefetchLocality);
      }
    }
    for (int b = 0; b < NB; ++b) {
      int32_t four;
      std::memcpy(&four, p.hidden + (b0 + b) * p.dim + g * kGroupCols, sizeof(four));
      const __m512i hv = _mm512_set1_epi32(four);
      for (int i = 0; i < MR; ++i) acc[i][b] = (I32x16)_mm512_dpbusd_epi32((__m512i)acc[i][b], hv, (__m512i)wv[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const int64_t r = (panel + i) * kPanelRows;
    const int64_t left = p.vocab - r;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512i off = _mm512_loadu_si512(p.offsets + r);
    const __m512d ws_lo = _mm512_cvtps_pd(_mm256_loadu_ps(p.wscale + r));
    const __m512d ws_hi = _mm512_cvtps_pd(_mm256_loadu_ps(p.wscale + r + 8));
    for (int b = 0; b < NB; ++b) {
      const __m512i d = _mm512_sub_epi32((__m512i)acc[i][b], off);
      const __m512d hs = _mm512_set1_pd(static_cast<double>(p.hscale[b0 + b]));
      const __m512d lo = _mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(d)), ws_lo), hs);
      const __m512d hi = _mm512_mul_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 1)), ws_hi), hs);
      _mm512_mask_storeu_ps(p.out + (b0 + b) * p.vocab + r, m, join(_mm512_cvtpd_ps(lo), _mm512_cvtpd_ps(hi)));
    }
  }
}

template <int NB>
[[MMCORE_VNNI, gnu::always_inline]] inline void int8_panels_x_group(const Int8Problem& p, int64_t p0, int64_t p1,
                                                                   int64_t b0) {
  constexpr int MR = std::min<int>(kAccumulators / NB, 8);
  // prefetch the panels kPrefetchTiles tiles ahead while they lie inside this thread's range
  const int64_t ahead = kPrefetchTiles * MR;
  int64_t panel = p0;
  for (; panel + MR <= p1; panel += MR) int8_tile<MR, NB>(p, panel, b0, panel + ahead + MR <= p.panels ? ahead : 0);
  for (; panel < p1; ++panel) int8_tile<1, NB>(p, panel, b0, 0);
}

[[MMCORE_VNNI]] void int8_rows_vnni(const Int8Problem& p, int64_t p0, int64_t p1) {
  for (int64_t pb = p0; pb < p1; pb += kBlockPanels) {
    const int64_t pe = std::min<int64_t>(pb + kBlockPanels, p1);
    for (int64_t b = 0; b < p.batch; b += kMaxGroup) {
      switch (std::min<int64_t>(kMaxGroup, p.batch - b)) {
        case 1:
          int8_panels_x_group<1>(p, pb, pe, b);
          break;
        case 2:
          int8_panels_x_group<2>(p, pb, pe, b);
          break;
        case 3:
          int8_panels_x_group<3>(p, pb, pe, b);
          break;
        case 4:
          int8_panels_x_group<4>(p, pb, pe, b);
          break;
        case 5:
          int8_panels_x_group<5>(p, pb, pe, b);
          break;
        case 6:
          int8_panels_x_group<6>(p, pb, pe, b);
          break;
        case 7:
          int8_panels_x_group<7>(p, pb, pe, b);
          break;
        default:
          int8_panels_x_group<8>(p, pb, pe, b);
      }
    }
  }
}

#else
void int8_rows_vnni(const Int8Problem&, int64_t, int64_t) { TORCH_CHECK(false, "unreachable: no AVX512-VNNI build"); }
#endif

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

at::Tensor screen_logits_int8_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& offsets,
                                  const at::Tensor& weight_scale, const at::Tensor& hidden_scale, int64_t vocab) {
  TORCH_CHECK_TYPE(hidden.scalar_type() == at::kByte, "hidden must be uint8, got ", hidden.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kChar, "weight must be int8, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(hidden.dim() == 2 && hidden.device().is_cpu(), "hidden must be a (B, D) CPU tensor, got ",
                    hidden.sizes(), " on ", hidden.device());
  const int64_t batch = hidden.size(0), dim = hidden.size(1);
  TORCH_CHECK_VALUE(dim % kGroupCols == 0 && dim <= kMaxDim, "hidden's D must be a multiple of 4 and <= ", kMaxDim,
                    ", got ", dim);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) * kGroupCols == dim && weight.size(2) == kPanelRows &&
                        weight.size(3) == kGroupCols && weight.device().is_cpu(),
                    "weight must be a CPU tensor packed as (V_pad / 16, D / 4, 16, 4) = (*, ", dim / kGroupCols,
                    ", 16, 4), got ", weight.sizes(), " on ", weight.device());
  const int64_t padded = weight.size(0) * kPanelRows;
  TORCH_CHECK_VALUE(0 <= vocab && vocab <= padded && padded - vocab < kPanelRows, "vocab must be within the last panel",
                    " of the weight's ", padded, " rows, got ", vocab);
  check_vector(offsets, "offsets", at::kInt, padded);
  check_vector(weight_scale, "weight_scale", at::kFloat, padded);
  check_vector(hidden_scale, "hidden_scale", at::kFloat, batch);
  const at::Tensor h = hidden.contiguous(), w = weight.contiguous(), o = offsets.contiguous();
  const at::Tensor ws = weight_scale.contiguous(), hs = hidden_scale.contiguous();
  at::Tensor out = at::empty({batch, vocab}, hidden.options().dtype(at::kFloat));
  const Int8Problem p{h.const_data_ptr<uint8_t>(), w.const_data_ptr<int8_t>(), o.const_data_ptr<int32_t>(),
                      ws.const_data_ptr<float>(), hs.const_data_ptr<float>(), out.data_ptr<float>(),
                      batch, dim, vocab, (vocab + kPanelRows - 1) / kPanelRows};
  const int64_t panels = p.panels;
  if (batch == 0 || panels == 0) return out;
  const bool vnni = has_avx512vnni();  // false under MMCORE_DISABLE_AVX512VNNI=1: the tests' way to the scalar path
  at::parallel_for(0, panels, kGrainPanels, [&](int64_t p0, int64_t p1) {
    if (vnni) {
      int8_rows_vnni(p, p0, p1);
    } else {
      int8_rows_scalar(p, p0, p1);
    }
  });
  return out;
}

// The hidden states' 8-bit codes (ScreenedHead.approximate; the same arithmetic as mmcore/ops/logits.py
// _quantize_rows): per row, scale = float32(max|h| / 127) (in float64, rounded once), codes round(h / scale) (half
// to even, as torch.round) clamped to [-127, 127] and stored + 128 as uint8, columns past D set to 128 (code 0);
// norms (B, 2) float64: ||h|| and ||h - scale * codes||. A row whose scale is 0 gets codes 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_int8_cpu(const at::Tensor& hidden, int64_t padded_dim) {
  TORCH_CHECK_TYPE(hidden.scalar_type() == at::kFloat, "hidden must be float32, got ", hidden.scalar_type());
  TORCH_CHECK_VALUE(hidden.dim() == 2 && hidden.device().is_cpu(), "hidden must be a (B, D) CPU tensor, got ",
                    hidden.sizes(), " on ", hidden.device());
  const int64_t batch = hidden.size(0), dim = hidden.size(1);
  TORCH_CHECK_VALUE(padded_dim >= dim && padded_dim % kGroupCols == 0, "padded_dim must be a multiple of 4 and >= D = ",
                    dim, ", got ", padded_dim);
  const at::Tensor h = hidden.contiguous();
  at::Tensor codes = at::full({batch, padded_dim}, 128, hidden.options().dtype(at::kByte));
  at::Tensor scale = at::empty({batch}, hidden.options());
  at::Tensor norms = at::empty({batch, 2}, hidden.options().dtype(at::kDouble));
  const float* hp = h.const_data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  double* np = norms.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b) {
    const float* x = hp + b * dim;
    double top = 0.0;
    for (int64_t k = 0; k < dim; ++k) top = std::max(top, std::abs(static_cast<double>(x[k])));
    const float s = static_cast<float>(top / 127.0);
    const double s64 = s;
    double norm = 0.0, residual = 0.0;
    for (int64_t k = 0; k < dim; ++k) {
      const double v = x[k];
      const double q = s64 > 0.0 ? std::clamp(std::nearbyint(v / s64), -127.0, 127.0) : 0.0;
      const double e = v - s64 * q;
      norm += v * v;
      residual += e * e;
      cp[b * padded_dim + k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
    }
    sp[b] = s;
    np[2 * b] = std::sqrt(norm);
    np[2 * b + 1] = std::sqrt(residual);
  }
  return {codes, scale, norms};
}

}  // namespace

bool int8_dot_fast() { return has_avx512vnni(); }

// The schema is declared once, in mmcore/ops/_library.py; this file only supplies the CPU kernel.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) {
  m.impl("screen_logits_int8", &screen_logits_int8_cpu);
  m.impl("quantize_rows_int8", &quantize_rows_int8_cpu);
}

}  // namespace mmcore::decoding
