// Packed attention forward on CPU: FlashAttention's online softmax over (block_q x block_k) score tiles, one
// work item per (segment, query head, query block), Q K^T and P V as MKL GEMMs on tiles.
#include <cmath>
#include <limits>
#include <vector>

#include "packed_attention/kernel_utils.h"

namespace mmcore::packed_attention {
namespace {

// Tile sizes, from a sweep of block_q in {32, 64, 128, 256} x block_k in {128, 256, 512} (8 heads x 64 and x
// 128, segments of 512, float32, one thread, CPU time). block_k 512: the (block_q x 512) float32 score tile
// stays in L2 and the GEMMs are long enough to amortise MKL's packing of K and V. block_q: 64 for causal and
// prefix masks (less wasted work in diagonal tiles), 128 without a mask (each K tile is packed once per 128
// queries; 4-5% faster than 64).
template <Mode kMode>
constexpr int64_t kBlockQ = kMode == Mode::kFull ? 128 : 64;
constexpr int64_t kBlockK = 512;

struct FwdItem {
  int64_t segment, head, q_begin, cost;
};

template <typename acc_t>
struct FwdWorkspace {
  std::vector<acc_t> scores, acc, q, k, v, row_max, row_sum;
};

// One key tile of the online softmax for one query row, shared by both forward paths: row[0, cnt) holds the scaled
// scores of the tile's keys the row sees, row[cnt, n) the others. The row becomes exp(score - m) (0 past cnt); the
// running maximum m and sum l are updated and the output accumulator acc[0, d) rescaled by exp(m_old - m_new).
// first: the row's first key tile (l starts from it). A row that sees no key of the tile only has it zeroed. (Keys
// a row sees are a prefix of the segment, so a row that sees a key of this tile saw all keys of the earlier tiles,
// and m is finite after the first.)
template <typename acc_t>
inline void online_softmax_tile(acc_t* row, int64_t cnt, int64_t n, bool first, acc_t& m, acc_t& l, acc_t* acc,
                                int64_t d) {
  std::fill(row + cnt, row + n, acc_t(0));
  if (cnt == 0) return;
  const acc_t m_new = std::max(m, row_ops::row_max(row, cnt));
  const acc_t sum = row_ops::exp_sub_sum(row, cnt, m_new);
  if (first) {
    l = sum;
  } else {
    const acc_t alpha = std::exp(m - m_new);
    l = l * alpha + sum;
    if (alpha != acc_t(1)) row_ops::scale(acc, d, alpha);
  }
  m = m_new;
}

// A query row's output once every key tile is done: acc / l in the output type and the log-sum-exp m + log l, or
// zeros and +inf when the row saw no key (l == 0). A NaN or infinite score makes l NaN, and the row NaN as in the
// reference: `l > 0` would have taken it for a row without keys and written zeros.
template <typename scalar_t, typename acc_t>
inline void finish_row(acc_t* acc, acc_t m, acc_t l, int64_t d, scalar_t* dst, float& lse) {
  if (l != acc_t(0)) {
    row_ops::scale(acc, d, acc_t(1) / l);
    row_ops::convert(acc, dst, d);
    lse = static_cast<float>(m + std::log(l));
  } else {
    std::fill(dst, dst + d, scalar_t(0));
    lse = std::numeric_limits<float>::infinity();
  }
}

template <typename scalar_t, Mode kMode>
void packed_attention_fwd_impl(const Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
  const int64_t d = p.head_dim, heads = p.heads, group = p.heads / p.heads_kv;
  const int64_t ld_q = heads * d, ld_kv = p.heads_kv * d;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t keep_scale = static_cast<acc_t>(p.keep_scale);
  const int64_t block_q = std::max<int64_t>(std::min(kBlockQ<kMode>, p.max_seqlen_q), 1);
  const int64_t block_k = std::max<int64_t>(std::min(kBlockK, p.max_seqlen_k), 1);

  std::vector<FwdItem> items;
  for (int64_t s = 0; s < p.num_segments; ++s) {
    const Segment seg = Segment::at(p, s);
    for (int64_t i0 = 0; i0 < seg.lq; i0 += block_q) {
      const int64_t rows = std::min(block_q, seg.lq - i0);
      // Work ~ the score tiles' area plus reading Q and writing O.
      const int64_t cost = rows * (seg.template visible<kMode>(i0 + rows - 1) + 2 * d);
      for (int64_t h = 0; h < heads; ++h) items.push_back({s, h, i0, cost});
    }
  }

  auto make_workspace = [&] {
    FwdWorkspace<acc_t> ws;
    ws.scores.resize(block_q * block_k);
    ws.acc.resize(block_q * d);
    if (kConvert) {
      ws.q.resize(block_q * d);
      ws.k.resize(block_k * d);
      ws.v.resize(block_k * d);
    }
    ws.row_max.resize(block_q);
    ws.row_sum.resize(block_q);
    return ws;
  };

  auto body = [&](const FwdItem& item, FwdWorkspace<acc_t>& ws) {
    const Segment seg = Segment::at(p, item.segment);
    const int64_t h = item.head, kv_head = h / group, i0 = item.q_begin;
    const int64_t rows = std::min(block_q, seg.lq - i0);
    const int64_t keys_end = seg.template visible<kMode>(i0 + rows - 1);  // keys any row of the block sees
    const int64_t keys_all = seg.template visible<kMode>(i0);             // keys every row of the block sees
    acc_t* scores = ws.scores.data();
    acc_t* acc = ws.acc.data();
    acc_t* m = ws.row_max.data();
    acc_t* l = ws.row_sum.data();
    std::fill(m, m + rows, -std::numeric_limits<acc_t>::infinity());
    std::fill(l, l + rows, acc_t(0));

    int64_t ld_qt, ld_kt, ld_vt;
    const acc_t* q_tile = load_rows(q + ((seg.q0 + i0) * heads + h) * d, rows, ld_q, d, ws.q.data(), ld_qt);
    for (int64_t j0 = 0; j0 < keys_end; j0 += block_k) {
      const int64_t n = std::min(block_k, keys_end - j0);
      const scalar_t* k_src = k + ((seg.k0 + j0) * p.heads_kv + kv_head) * d;
      const scalar_t* v_src = v + ((seg.k0 + j0) * p.heads_kv + kv_head) * d;
      const acc_t* k_tile = load_rows(k_src, n, ld_kv, d, ws.k.data(), ld_kt);
      // S = scale * Q K^T, (rows x n), leading dimension n.
      gemm_rm(false, true, rows, n, d, scale, q_tile, ld_qt, k_tile, ld_kt, acc_t(0), scores, n);
      const bool all_visible = j0 + n <= keys_all;  // no row of this tile needs masking
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* row = scores + r * n;
        const int64_t cnt =
            all_visible ? n : std::clamp<int64_t>(seg.template visible<kMode>(i0 + r) - j0, 0, n);
        online_softmax_tile(row, cnt, n, j0 == 0, m[r], l[r], acc + r * d, d);
        if (p.dropout && cnt > 0) {
          const uint64_t counter =
              p.offset + (static_cast<uint64_t>(h * p.total_q + seg.q0 + i0 + r) * p.max_seqlen_k + j0);
          row_ops::dropout(row, row, cnt, p.seed, counter, p.threshold, keep_scale);
        }
      }
      const acc_t* v_tile = load_rows(v_src, n, ld_kv, d, ws.v.data(), ld_vt);
      // O = O + P V (the first tile initialises O; rows with no key in it get P = 0).
      gemm_rm(false, false, rows, d, n, acc_t(1), scores, n, v_tile, ld_vt, j0 == 0 ? acc_t(0) : acc_t(1),
                     acc, d);
    }

    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = seg.q0 + i0 + r;
      finish_row(acc + r * d, m[r], l[r], d, out + (row * heads + h) * d, p.lse[h * p.total_q + row]);
    }
  };

  run_work_items(items, make_workspace, body);
}

// Decode-shaped calls: at most kRowsMaxQ queries per segment (one new token per row of a KV cache). The tile path
// reads each (head, key) row of K and V as its own 256-byte piece at a stride of heads_kv * head_dim, tile GEMMs
// of one row; here an item is (segment, block of kv heads) and walks the segment's keys in order, reading for each
// key the block's heads in one contiguous piece, which the hardware prefetcher follows. Measured (8 rows, 8 heads
// x 64, ~90 cached keys each, float32, caches cold as after a decoding step's output head, 2 threads): the tile
// path 193 us, SDPA over the padded cache 236 us.
constexpr int64_t kRowsMaxQ = 4;

struct RowItem {
  int64_t segment, kv_begin, kv_end, cost;
};

template <typename scalar_t, Mode kMode>
void packed_attention_fwd_rows(const Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
  const int64_t d = p.head_dim, heads = p.heads, heads_kv = p.heads_kv, group = heads / heads_kv;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const int64_t block_k = std::max<int64_t>(std::min(kBlockK, p.max_seqlen_k), 1);

  // Enough items for two per thread: kv heads split into blocks when there are few segments.
  int64_t active = 0;
  for (int64_t s = 0; s < p.num_segments; ++s) active += p.cu_seqlens_q[s + 1] > p.cu_seqlens_q[s];
  const int64_t want = 2 * at::get_num_threads();
  const int64_t blocks = std::clamp<int64_t>((want + active - 1) / std::max<int64_t>(active, 1), 1, heads_kv);
  const int64_t per_block = (heads_kv + blocks - 1) / blocks;
  std::vector<RowItem> items;
  for (int64_t s = 0; s < p.num_segments; ++s) {
    const Segment seg = Segment::at(p, s);
    if (seg.lq == 0) continue;
    for (int64_t kv0 = 0; kv0 < heads_kv; kv0 += per_block) {
      const int64_t kv1 = std::min(kv0 + per_block, heads_kv);
      items.push_back({s, kv0, kv1, seg.lq * (kv1 - kv0) * (seg.template visible<kMode>(seg.lq - 1) + 2 * d)});
    }
  }

  const int64_t max_rows = std::min(p.max_seqlen_q, kRowsMaxQ) * per_block * group;  // (query, head) pairs
  auto make_workspace = [&] {
    FwdWorkspace<acc_t> ws;
    ws.scores.resize(max_rows * block_k);
    ws.acc.resize(max_rows * d);
    ws.q.resize(max_rows * d);
    if (kConvert) {
      ws.k.resize(per_block * d);
      ws.v.resize(per_block * d);
    }
    ws.row_max.resize(max_rows);
    ws.row_sum.resize(max_rows);
    return ws;
  };

  auto body = [&](const RowItem& item, FwdWorkspace<acc_t>& ws) {
    const Segment seg = Segment::at(p, item.segment);
    const int64_t kv0 = item.kv_begin, nkv = item.kv_end - kv0, h0 = kv0 * group, nh = nkv * group;
    const int64_t rows = seg.lq, pairs = rows * nh;  // pair (r, hh) is query row r, head h0 + hh
    const int64_t keys_end = seg.template visible<kMode>(rows - 1);
    acc_t* scores = ws.scores.data();
    acc_t* acc = ws.acc.data();
    acc_t* m = ws.row_max.data();
    acc_t* l = ws.row_sum.data();
    acc_t* qs = ws.q.data();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = q + ((seg.q0 + r) * heads + h0) * d;
      if constexpr (kConvert) {
        row_ops::convert(src, qs + r * nh * d, nh * d);
      } else {
        std::copy(src, src + nh * d, qs + r * nh * d);
      }
    }
    std::fill(m, m + pairs, -std::numeric_limits<acc_t>::infinity());
    std::fill(l, l + pairs, acc_t(0));
    std::fill(acc, acc + pairs * d, acc_t(0));
    // The block's kv heads of key row j, in the accumulation type.
    auto kv_row = [&](const scalar_t* base, int64_t j, acc_t* buf) -> const acc_t* {
      const scalar_t* src = base + ((seg.k0 + j) * heads_kv + kv0) * d;
      if constexpr (kConvert) {
        row_ops::convert(src, buf, nkv * d);
        return buf;
      } else {
        return src;
      }
    };

    for (int64_t j0 = 0; j0 < keys_end; j0 += block_k) {
      const int64_t n = std::min(block_k, keys_end - j0);
      for (int64_t jj = 0; jj < n; ++jj) {
        const acc_t* krow = kv_row(k, j0 + jj, ws.k.data());
        for (int64_t r = 0; r < rows; ++r) {
          row_ops::dot_heads(qs + r * nh * d, krow, nh, group, d, scale, scores + r * nh * block_k + jj, block_k);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t cnt = std::clamp<int64_t>(seg.template visible<kMode>(r) - j0, 0, n);
        for (int64_t i = r * nh; i < (r + 1) * nh; ++i) {
          online_softmax_tile(scores + i * block_k, cnt, n, j0 == 0, m[i], l[i], acc + i * d, d);
        }
      }
      for (int64_t jj = 0; jj < n; ++jj) {
        const acc_t* vrow = kv_row(v, j0 + jj, ws.v.data());
        for (int64_t r = 0; r < rows; ++r) {
          row_ops::axpy_heads(acc + r * nh * d, scores + r * nh * block_k + jj, block_k, vrow, nh, group, d);
        }
      }
    }

    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t hh = 0; hh < nh; ++hh) {
        const int64_t i = r * nh + hh, h = h0 + hh, row = seg.q0 + r;
        finish_row(acc + i * d, m[i], l[i], d, out + (row * heads + h) * d, p.lse[h * p.total_q + row]);
      }
    }
  };

  run_work_items(items, make_workspace, body);
}

}  // namespace

void run_fwd_kernel(const Params& p, at::ScalarType dtype, Mode mode) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "packed_attention_fwd_cpu", [&] {
    MMCORE_MODE_SWITCH(mode, kMode, [&] {
      if (p.max_seqlen_q <= kRowsMaxQ && !p.dropout) {
        packed_attention_fwd_rows<scalar_t, kMode>(p);
      } else {
        packed_attention_fwd_impl<scalar_t, kMode>(p);
      }
    });
  });
}

}  // namespace mmcore::packed_attention
