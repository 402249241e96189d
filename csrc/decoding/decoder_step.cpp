// Kosmos-2's text decoder for one generation step on the CPU, every layer in one call: the same arithmetic as
// mmcore/models/kosmos2/modeling.py TextDecoder in eval mode (pre-LN blocks with Magneto's sub-LN: inner_attn_ln
// before out_proj, ffn_layernorm between the activation and fc2; the final LayerNorm), for the few new tokens of a
// step against the KV cache. Semantics and the Python entry point: TextDecoder.step.
//
// Why one op: at batch 8 on the 50M benchmark configuration a step of the module stack took ~3.4 ms, of which the
// 16 float32 products were ~1.8 ms and the KV attention ~0.4 ms; the rest (~1.2 ms) was Python and ATen dispatch
// around (8, 512)-sized tensors: 17 LayerNorms at ~8 us each, the activation, cache writes, views, residual adds.
// Here the products are the decode_logits kernel (decoding/logits.h), the attention is the packed-attention C++
// forward (its decode path for one query per segment), the LayerNorms, cache writes and residual adds are plain
// loops over a few rows, and the activation is ATen's own in-place op (so it rounds as torch's does).
//
// NOTE: the LayerNorm statistics are float sums over 16 interleaved partial sums; torch's CPU kernel uses its own
// cascade, so results differ in the last bits (as the products already do from BLAS); the tests bound the
// difference against the module path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <string>

#include "decoding/logits.h"
#include "packed_attention/packed_attention.h"

namespace mmcore::decoding {
namespace {

// Per layer, in this order (TextDecoder.step_params): self_attn_layer_norm w, b; qkv w, b; inner_attn_ln w, b;
// out_proj w, b; final_layer_norm w, b; fc1 w, b; ffn_layernorm w, b; fc2 w, b. Then the final LayerNorm's w, b.
constexpr int64_t kPerLayer = 16;
constexpr int kLanes = 16;

// Sum of n floats as 16 interleaved partial sums (vectorisable without reassociation flags), then the partials.
inline float sum16(const float* x, int64_t n) {
  float part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += x[k + j];
  }
  float s = 0.0f;
  for (; k < n; ++k) s += x[k];
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

inline float sum_sq16(const float* x, int64_t n, float mean) {
  float part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float d = x[k + j] - mean;
      part[j] += d * d;
    }
  }
  float s = 0.0f;
  for (; k < n; ++k) s += (x[k] - mean) * (x[k] - mean);
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

// y = LayerNorm(x) * w + b over rows of n floats (biased variance, as torch); y may be x.
void layer_norm_rows(const float* x, int64_t rows, int64_t n, const float* w, const float* b, double eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    const float mean = sum16(xr, n) / static_cast<float>(n);
    const float var = sum_sq16(xr, n, mean) / static_cast<float>(n);
    const float rstd = 1.0f / std::sqrt(var + static_cast<float>(eps));
    for (int64_t k = 0; k < n; ++k) yr[k] = (xr[k] - mean) * rstd * w[k] + b[k];
  }
}

void add_rows(float* x, const float* y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) x[k] += y[k];
}

void check_param(const at::Tensor& t, const char* what, int64_t layer, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "kosmos2_decode_step: layer ", layer, " ", what, " must have shape ", shape,
                    ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "kosmos2_decode_step: layer ", layer, " ", what,
                   " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "kosmos2_decode_step: layer ", layer, " ", what,
                    " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "kosmos2_decode_step: layer ", layer, " ", what, " must be contiguous");
}

void activate_(at::Tensor& t, const std::string& activation) {
  if (activation == "gelu") {
    at::gelu_(t, "none");
  } else if (activation == "gelu_tanh") {
    at::gelu_(t, "tanh");
  } else {  // quick_gelu, checked by the caller: x * sigmoid(1.702 x), as ACTIVATIONS["quick_gelu"]
    t.mul_(at::sigmoid(t * 1.702));
  }
}

}  // namespace

// x (T, D) float32: the step's embedded tokens; params: kPerLayer per layer then the final LayerNorm's 2;
// k_cache / v_cache (layers, slots, heads, head_dim), written at write_index (T,) int64 for every layer;
// cu_seqlens_q / cu_seqlens_k: the packed layout of the T queries against the cache slots (causal, bottom-right
// aligned, as DecoderAttention). Returns (T, D): the final LayerNorm's output.
at::Tensor kosmos2_decode_step_cpu(const at::Tensor& x, at::TensorList params, at::Tensor& k_cache,
                                   at::Tensor& v_cache, const at::Tensor& write_index, const at::Tensor& cu_seqlens_q,
                                   const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t heads,
                                   double eps,
                                   std::string activation) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                    "kosmos2_decode_step: x must be a (tokens, dim) float32 CPU tensor, got ", x.sizes(), " ",
                    x.scalar_type(), " on ", x.device());
  const int64_t tokens = x.size(0), dim = x.size(1);
  const auto n_params = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(n_params >= 2 && (n_params - 2) % kPerLayer == 0, "kosmos2_decode_step: params must hold ",
                    kPerLayer, " tensors per layer and the final LayerNorm's 2, got ", n_params);
  const int64_t layers = (n_params - 2) / kPerLayer;
  TORCH_CHECK_VALUE(heads > 0 && dim % heads == 0, "kosmos2_decode_step: heads (", heads, ") must divide dim (", dim,
                    ")");
  const int64_t head_dim = dim / heads;
  TORCH_CHECK_VALUE(activation == "gelu" || activation == "gelu_tanh" || activation == "quick_gelu",
                    "kosmos2_decode_step: activation must be gelu, gelu_tanh or quick_gelu, got ", activation);
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK_VALUE(c->dim() == 4 && c->size(0) == layers && c->size(2) == heads && c->size(3) == head_dim &&
                          c->scalar_type() == at::kFloat && c->device().is_cpu() && c->is_contiguous(),
                      "kosmos2_decode_step: the caches must be contiguous float32 CPU tensors of shape (", layers,
                      ", slots, ", heads, ", ", head_dim, "), got ", c->sizes(), " ", c->scalar_type());
  }
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "kosmos2_decode_step: v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t slots = k_cache.size(1);
  TORCH_CHECK_VALUE(write_index.dim() == 1 && write_index.size(0) == tokens &&
                        write_index.scalar_type() == at::kLong && write_index.device().is_cpu(),
                    "kosmos2_decode_step: write_index must be a (", tokens, ",) int64 CPU tensor, got ",
                    write_index.sizes(), " ", write_index.scalar_type());
  const at::Tensor slot_of = write_index.contiguous();
  const int64_t* slot = slot_of.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK_VALUE(0 <= slot[t] && slot[t] < slots, "kosmos2_decode_step: write_index[", t, "] = ", slot[t],
                      " is outside the cache's ", slots, " slots");
  }
  int64_t ffn = -1;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* p = params.data() + l * kPerLayer;
    if (ffn < 0) ffn = p[10].dim() == 2 ? p[10].size(0) : -1;
    TORCH_CHECK_VALUE(ffn > 0, "kosmos2_decode_step: layer ", l, " fc1.weight must be (ffn_dim, dim)");
    check_param(p[0], "self_attn_layer_norm.weight", l, {dim});
    check_param(p[1], "self_attn_layer_norm.bias", l, {dim});
    check_param(p[2], "qkv.weight", l, {3 * dim, dim});
    check_param(p[3], "qkv.bias", l, {3 * dim});
    check_param(p[4], "inner_attn_ln.weight", l, {dim});
    check_param(p[5], "inner_attn_ln.bias", l, {dim});
    check_param(p[6], "out_proj.weight", l, {dim, dim});
    check_param(p[7], "out_proj.bias", l, {dim});
    check_param(p[8], "final_layer_norm.weight", l, {dim});
    check_param(p[9], "final_layer_norm.bias", l, {dim});
    check_param(p[10], "fc1.weight", l, {ffn, dim});
    check_param(p[11], "fc1.bias", l, {ffn});
    check_param(p[12], "ffn_layernorm.weight", l, {ffn});
    check_param(p[13], "ffn_layernorm.bias", l, {ffn});
    check_param(p[14], "fc2.weight", l, {dim, ffn});
    check_param(p[15], "fc2.bias", l, {dim});
  }
  check_param(params[n_params - 2], "layer_norm.weight (final)", layers, {dim});
  check_param(params[n_params - 1], "layer_norm.bias (final)", layers, {dim});

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor hidden = x.contiguous().clone();  // the residual stream
  at::Tensor normed = at::empty({tokens, dim}, f32);
  at::Tensor qkv = at::empty({tokens, 3 * dim}, f32);
  at::Tensor q = at::empty({tokens, heads, head_dim}, f32);
  at::Tensor branch = at::empty({tokens, dim}, f32);
  at::Tensor inner = at::empty({tokens, ffn < 0 ? 0 : ffn}, f32);
  float* h = hidden.data_ptr<float>();
  float* nrm = normed.data_ptr<float>();
  float* qkvp = qkv.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* br = branch.data_ptr<float>();
  float* in = inner.data_ptr<float>();
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  auto ptr = [](const at::Tensor& t) { return t.const_data_ptr<float>(); };

  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* p = params.data() + l * kPerLayer;
    // attention: LayerNorm, qkv, this step's keys and values into the cache, attention over the cache
    layer_norm_rows(h, tokens, dim, ptr(p[0]), ptr(p[1]), eps, nrm);
    linear_f32(nrm, tokens, dim, ptr(p[2]), dim, ptr(p[3]), qkvp, 3 * dim);
    at::Tensor k_layer = k_cache.select(0, l), v_layer = v_cache.select(0, l);
    float* kc = k_layer.data_ptr<float>();
    float* vc = v_layer.data_ptr<float>();
    for (int64_t t = 0; t < tokens; ++t) {
      const float* row = qkvp + t * 3 * dim;
      std::memcpy(qp + t * dim, row, dim * sizeof(float));
      std::memcpy(kc + slot[t] * dim, row + dim, dim * sizeof(float));
      std::memcpy(vc + slot[t] * dim, row + 2 * dim, dim * sizeof(float));
    }
    const auto [attn, lse] = packed_attention::packed_attention_fwd_cpu(
        q, k_layer, v_layer, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        static_cast<int64_t>(packed_attention::Mode::kCausal), std::nullopt, scale, 0.0, 0, 0);
    layer_norm_rows(attn.const_data_ptr<float>(), tokens, dim, ptr(p[4]), ptr(p[5]), eps, nrm);
    linear_f32(nrm, tokens, dim, ptr(p[6]), dim, ptr(p[7]), br, dim);
    add_rows(h, br, tokens * dim);
    // feed-forward: LayerNorm, fc1, activation, ffn LayerNorm, fc2
    layer_norm_rows(h, tokens, dim, ptr(p[8]), ptr(p[9]), eps, nrm);
    linear_f32(nrm, tokens, dim, ptr(p[10]), dim, ptr(p[11]), in, ffn);
    activate_(inner, activation);
    layer_norm_rows(in, tokens, ffn, ptr(p[12]), ptr(p[13]), eps, in);
    linear_f32(in, tokens, ffn, ptr(p[14]), ffn, ptr(p[15]), br, dim);
    add_rows(h, br, tokens * dim);
  }
  at::Tensor out = at::empty({tokens, dim}, f32);
  layer_norm_rows(h, tokens, dim, ptr(params[n_params - 2]), ptr(params[n_params - 1]), eps, out.data_ptr<float>());
  return out;
}

// The schema is declared once, in mmcore/ops/_library.py; this file only supplies the CPU kernel.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) { m.impl("kosmos2_decode_step", &kosmos2_decode_step_cpu); }

}  // namespace mmcore::decoding
