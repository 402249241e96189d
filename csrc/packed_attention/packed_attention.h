// Packed (varlen) attention, CPU kernels: the C++ API behind torch.ops.mmcore.packed_attention_fwd/_bwd.
//
// Layout and semantics are those of mmcore/ops/attention.py (packed_attention_ref) and DESIGN.md "Data
// layout: packed sequences": q (total_q, heads, head_dim), k and v (total_k, heads_kv, head_dim), cu_seqlens
// int32 (segments + 1,). Query head h reads kv head h / (heads / heads_kv).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace mmcore::packed_attention {

// The mask of one segment (Lq queries, Lk keys): query i sees key j when
//   kFull    always
//   kCausal  j <= i + (Lk - Lq)                        (bottom-right aligned)
//   kPrefix  j <= i + (Lk - Lq)  or  j < prefix_lens[s]
// Every mode makes the visible keys of a row a prefix [0, n_i) of the segment's keys, with n_i
// non-decreasing in i; the kernels rely on that.
enum class Mode : int64_t { kFull = 0, kCausal = 1, kPrefix = 2 };

// Forward. Returns out (total_q, heads, head_dim) in q's dtype and lse (heads, total_q) float32: the natural
// log-sum-exp of the scaled scores over the visible keys (before dropout), +inf for a row that sees no key
// (its output row is 0). dropout_p in [0, 1): see philox_randint for which elements are kept.
std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t mode,
    const std::optional<at::Tensor>& prefix_lens, double softmax_scale, double dropout_p, int64_t seed,
    int64_t offset);

// Backward (FlashAttention-2's recomputation from lse). Returns (dq, dk, dv) in the dtypes of q, k, v; dk
// and dv sum over the query heads of each kv group.
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, int64_t mode, const std::optional<at::Tensor>& prefix_lens, double softmax_scale,
    double dropout_p, int64_t seed, int64_t offset);

// Philox-4x32-10's first output word for a 64-bit counter, as Triton's tl.randint(seed, counter) and
// mmcore.ops._philox.philox_randint: key (seed low word, seed high word), state (counter low word, counter
// high word, 0, 0). Attention element (query head h, packed query row i, key j counted from its segment's
// first key) draws counter = offset + (h * total_q + i) * max_seqlen_k + j (int64, wrapping) and is kept
// when the draw is >= dropout_threshold(p).
inline uint32_t philox_randint(uint64_t seed, uint64_t counter) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = uint64_t{kRoundB} * c2;
    const uint64_t prod_a = uint64_t{kRoundA} * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// Draws below this threshold are dropped: floor(p * 2^32), as mmcore.ops._philox.dropout_threshold.
inline uint64_t dropout_threshold(double p) { return static_cast<uint64_t>(p * 4294967296.0); }

}  // namespace mmcore::packed_attention
