// Packed attention backward on CPU: FlashAttention-2's recomputation of P from lse over (block_q x block_k)
// tiles, one work item per (segment, kv head) so that dq, dk and dv of an item are written by one thread (no
// atomics, no reduction pass); dk and dv sum over the query heads of the kv group inside the item.
#include <cmath>
#include <limits>
#include <vector>

#include "packed_attention/kernel_utils.h"

namespace mmcore::packed_attention {
namespace {

// Tile sizes, from a sweep of block_q in {32, 64, 128} x block_k in {64, 128, 256} (8 heads x 64 and x 128,
// segments of 512, float32, one thread, CPU time): five GEMMs per (block_q x block_k) tile (S, dV, dP, dK,
// dQ). block_q 128; block_k 64 for causal and prefix masks (diagonal tiles waste less; 5-8% faster than 128),
// 128 without a mask (3-4% faster than 64).
constexpr int64_t kBlockQ = 128;
template <Mode kMode>
constexpr int64_t kBlockK = kMode == Mode::kFull ? 128 : 64;

struct BwdItem {
  int64_t segment, kv_head, cost;
};

template <typename acc_t>
struct BwdWorkspace {
  // Score-shaped tiles (block_q x block_k): P, P with dropout (Z), dP then dS.
  std::vector<acc_t> p, z, ds;
  // Converted input tiles (half types only).
  std::vector<acc_t> q, dout, k, v;
  // Gradient accumulators of the item: dq of one head (Lq x d), dk and dv of the kv head (Lk x d).
  std::vector<acc_t> dq, dk, dv;
  // float64 only: the row log-sum-exp recomputed in float64 (see lse_rows).
  std::vector<acc_t> lse;
};

// D_i = sum_d dout_i,d * out_i,d for every (head, query row), as (heads, total_q), in the accumulation type.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> dout_dot_out(const Params& p) {
  const int64_t d = p.head_dim, heads = p.heads;
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const auto* out = static_cast<const scalar_t*>(p.out_in);
  std::vector<acc_t> result(heads * p.total_q);
  at::parallel_for(0, p.total_q, std::max<int64_t>(1, 16384 / (heads * d)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t off = (i * heads + h) * d;
        result[h * p.total_q + i] = row_ops::dot(dout + off, out + off, d);
      }
    }
  });
  return result;
}

template <typename scalar_t, Mode kMode>
void packed_attention_bwd_impl(const Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
  // NOTE: lse arrives as float32 (the schema's dtype). exp(s - lse) with a float32 lse is off by up to
  // ~1e-7 relative, which is float32 rounding for float32/half inputs but would cap float64 gradients at
  // float32 accuracy; the float64 path therefore recomputes each row's log-sum-exp in float64 first.
  constexpr bool kRecomputeLse = std::is_same_v<acc_t, double>;
  const int64_t d = p.head_dim, heads = p.heads, group = p.heads / p.heads_kv;
  const int64_t ld_q = heads * d, ld_kv = p.heads_kv * d;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  auto* dq = static_cast<scalar_t*>(p.dq);
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t keep_scale = static_cast<acc_t>(p.keep_scale);
  const int64_t block_q = std::max<int64_t>(std::min(kBlockQ, p.max_seqlen_q), 1);
  const int64_t block_k = std::max<int64_t>(std::min(kBlockK<kMode>, p.max_seqlen_k), 1);
  const std::vector<acc_t> delta = dout_dot_out<scalar_t, acc_t>(p);

  std::vector<BwdItem> items;
  for (int64_t s = 0; s < p.num_segments; ++s) {
    const Segment seg = Segment::at(p, s);
    int64_t area = 0;  // visible (query, key) pairs of one head
    for (int64_t i = 0; i < seg.lq; ++i) area += seg.template visible<kMode>(i);
    const int64_t cost = group * (area + 2 * d * seg.lq) + 2 * d * seg.lk;
    for (int64_t g = 0; g < p.heads_kv; ++g) items.push_back({s, g, cost});
  }

  auto make_workspace = [&] {
    BwdWorkspace<acc_t> ws;
    ws.p.resize(block_q * block_k);
    ws.ds.resize(block_q * block_k);
    if (p.dropout) ws.z.resize(block_q * block_k);
    if (kConvert) {
      ws.q.resize(block_q * d);
      ws.dout.resize(block_q * d);
      ws.k.resize(block_k * d);
      ws.v.resize(block_k * d);
    }
    ws.dq.resize(p.max_seqlen_q * d);
    ws.dk.resize(p.max_seqlen_k * d);
    ws.dv.resize(p.max_seqlen_k * d);
    if (kRecomputeLse) ws.lse.resize(p.max_seqlen_q);
    return ws;
  };

  // Natural-log log-sum-exp of the scaled visible scores of rows [0, lq) of one head (float64 path only);
  // +inf for rows that see no key.
  auto lse_rows = [&](const Segment& seg, int64_t h, int64_t kv_head, BwdWorkspace<acc_t>& ws) {
    acc_t* s_tile = ws.p.data();
    for (int64_t i0 = 0; i0 < seg.lq; i0 += block_q) {
      const int64_t rows = std::min(block_q, seg.lq - i0);
      const int64_t keys_end = seg.template visible<kMode>(i0 + rows - 1);
      acc_t* m = ws.lse.data() + i0;
      std::vector<acc_t> l(rows, acc_t(0));
      std::fill(m, m + rows, -std::numeric_limits<acc_t>::infinity());
      int64_t ld_qt, ld_kt;
      const acc_t* q_tile = load_rows(q + ((seg.q0 + i0) * heads + h) * d, rows, ld_q, d, ws.q.data(), ld_qt);
      for (int64_t j0 = 0; j0 < keys_end; j0 += block_k) {
        const int64_t n = std::min(block_k, keys_end - j0);
        const acc_t* k_tile =
            load_rows(k + ((seg.k0 + j0) * p.heads_kv + kv_head) * d, n, ld_kv, d, ws.k.data(), ld_kt);
        gemm_rm(false, true, rows, n, d, scale, q_tile, ld_qt, k_tile, ld_kt, acc_t(0), s_tile, n);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t cnt = std::clamp<int64_t>(seg.template visible<kMode>(i0 + r) - j0, 0, n);
          if (cnt == 0) continue;
          acc_t* row = s_tile + r * n;
          const acc_t m_new = std::max(m[r], row_ops::row_max(row, cnt));
          l[r] = l[r] * std::exp(m[r] - m_new) + row_ops::exp_sub_sum(row, cnt, m_new);
          m[r] = m_new;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        m[r] = l[r] != acc_t(0) ? m[r] + std::log(l[r]) : std::numeric_limits<acc_t>::infinity();
      }
    }
  };

  auto body = [&](const BwdItem& item, BwdWorkspace<acc_t>& ws) {
    const Segment seg = Segment::at(p, item.segment);
    const int64_t g = item.kv_head;
    acc_t* dk_acc = ws.dk.data();
    acc_t* dv_acc = ws.dv.data();
    acc_t* dq_acc = ws.dq.data();
    acc_t* p_tile = ws.p.data();
    acc_t* z_tile = p.dropout ? ws.z.data() : p_tile;
    acc_t* ds_tile = ws.ds.data();
    std::fill(dk_acc, dk_acc + seg.lk * d, acc_t(0));
    std::fill(dv_acc, dv_acc + seg.lk * d, acc_t(0));

    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      std::fill(dq_acc, dq_acc + seg.lq * d, acc_t(0));
      if constexpr (kRecomputeLse) lse_rows(seg, h, g, ws);
      for (int64_t j0 = 0; j0 < seg.lk; j0 += block_k) {
        const int64_t n = std::min(block_k, seg.lk - j0);
        const int64_t first_row = seg.template first_row_seeing<kMode>(j0);
        if (first_row >= seg.lq) break;  // later key blocks are seen by no row either
        int64_t ld_kt, ld_vt;
        const acc_t* k_tile =
            load_rows(k + ((seg.k0 + j0) * p.heads_kv + g) * d, n, ld_kv, d, ws.k.data(), ld_kt);
        const acc_t* v_tile =
            load_rows(v + ((seg.k0 + j0) * p.heads_kv + g) * d, n, ld_kv, d, ws.v.data(), ld_vt);
        for (int64_t i0 = first_row; i0 < seg.lq; i0 += block_q) {
          const int64_t rows = std::min(block_q, seg.lq - i0);
          const int64_t packed_row = seg.q0 + i0;
          int64_t ld_qt, ld_ot;
          const acc_t* q_tile = load_rows(q + (packed_row * heads + h) * d, rows, ld_q, d, ws.q.data(), ld_qt);
          const acc_t* do_tile =
              load_rows(dout + (packed_row * heads + h) * d, rows, ld_q, d, ws.dout.data(), ld_ot);
          // P = exp(scale * Q K^T - lse) on the visible entries, 0 elsewhere.
          gemm_rm(false, true, rows, n, d, scale, q_tile, ld_qt, k_tile, ld_kt, acc_t(0), p_tile, n);
          const bool all_visible = j0 + n <= seg.template visible<kMode>(i0);
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* row = p_tile + r * n;
            const int64_t cnt =
                all_visible ? n : std::clamp<int64_t>(seg.template visible<kMode>(i0 + r) - j0, 0, n);
            acc_t lse;
            if constexpr (kRecomputeLse) {
              lse = ws.lse[i0 + r];
            } else {
              lse = p.lse_in[h * p.total_q + packed_row + r];
            }
            // lse is +inf only for a row that sees no key; a NaN lse (NaN or infinite inputs) goes through exp and
            // makes the gradients NaN, as in the reference.
            if (cnt == 0 || lse == std::numeric_limits<acc_t>::infinity()) {
              std::fill(row, row + n, acc_t(0));
            } else {
              row_ops::exp_sub_sum(row, cnt, lse);
              std::fill(row + cnt, row + n, acc_t(0));
            }
            if (p.dropout) {
              const uint64_t counter =
                  p.offset + (static_cast<uint64_t>(h * p.total_q + packed_row + r) * p.max_seqlen_k + j0);
              row_ops::dropout(z_tile + r * n, row, n, p.seed, counter, p.threshold, keep_scale);
            }
          }
          // dV += Z^T dO
          gemm_rm(true, false, n, d, rows, acc_t(1), z_tile, n, do_tile, ld_ot, acc_t(1), dv_acc + j0 * d, d);
          // dP = dO V^T, then dS = Z * dP - P * D_i in place (= P * (dP * keep / (1 - p) - D_i)).
          gemm_rm(false, true, rows, n, d, acc_t(1), do_tile, ld_ot, v_tile, ld_vt, acc_t(0), ds_tile, n);
          for (int64_t r = 0; r < rows; ++r) {
            row_ops::softmax_grad(ds_tile + r * n, p_tile + r * n, z_tile + r * n, n,
                                  delta[h * p.total_q + packed_row + r]);
          }
          // dK += scale * dS^T Q, dQ += scale * dS K
          gemm_rm(true, false, n, d, rows, scale, ds_tile, n, q_tile, ld_qt, acc_t(1), dk_acc + j0 * d, d);
          gemm_rm(false, false, rows, d, n, scale, ds_tile, n, k_tile, ld_kt, acc_t(1), dq_acc + i0 * d, d);
        }
      }
      for (int64_t i = 0; i < seg.lq; ++i) {
        row_ops::convert(dq_acc + i * d, dq + ((seg.q0 + i) * heads + h) * d, d);
      }
    }
    for (int64_t j = 0; j < seg.lk; ++j) {
      row_ops::convert(dk_acc + j * d, dk + ((seg.k0 + j) * p.heads_kv + g) * d, d);
      row_ops::convert(dv_acc + j * d, dv + ((seg.k0 + j) * p.heads_kv + g) * d, d);
    }
  };

  run_work_items(items, make_workspace, body);
}

}  // namespace

void run_bwd_kernel(const Params& p, at::ScalarType dtype, Mode mode) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "packed_attention_bwd_cpu", [&] {
    MMCORE_MODE_SWITCH(mode, kMode, [&] { packed_attention_bwd_impl<scalar_t, kMode>(p); });
  });
}

}  // namespace mmcore::packed_attention
