// Entry points of the packed attention CPU kernels: input checks, output allocation, the parameter block,
// and the registration for the schemas declared in mmcore/ops/_library.py.
#include "packed_attention/packed_attention.h"

#include <torch/library.h>

#include <climits>
#include <cmath>
#include <string>

#include "packed_attention/kernel_utils.h"

namespace mmcore::packed_attention {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "packed attention's CPU kernel needs CPU tensors, got ", name, " on ",
                    t.device());
}

// Returns cu contiguous, for the kernel to read.
at::Tensor check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen) {
  check_cpu(cu, name);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, name, " must have shape (segments + 1,), got ", cu.sizes());
  // O(segments), against out-of-bounds accesses when the op is called directly rather than through
  // mmcore.ops (which checks the same with friendlier messages). Segments longer than max_seqlen would
  // overflow the tile buffers and alias dropout counters.
  const at::Tensor c = cu.contiguous();
  const int32_t* v = c.const_data_ptr<int32_t>();
  const int64_t n = c.size(0);
  TORCH_CHECK_VALUE(v[0] == 0 && v[n - 1] == total, name, " must start at 0 and end at ", total, ", got ", v[0],
                    " and ", v[n - 1]);
  for (int64_t s = 0; s + 1 < n; ++s) {
    TORCH_CHECK_VALUE(v[s + 1] >= v[s] && v[s + 1] - v[s] <= max_seqlen, name, " must be non-decreasing with "
                      "segment lengths <= ", max_seqlen, ", got ", v[s], ", ", v[s + 1], " at segment ", s);
  }
  return c;
}

// Contiguous int32 tensors the parameter block points into.
struct IndexTensors {
  at::Tensor cu_seqlens_q, cu_seqlens_k, prefix_lens;
};

// Checks shared by forward and backward; returns the parameter block without the q/k/v/output pointers.
Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                   const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t mode,
                   const std::optional<at::Tensor>& prefix_lens, IndexTensors& index, double softmax_scale,
                   double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
                    "q, k, v must have shapes (total_q, heads, head_dim) and (total_k, heads_kv, head_dim), got ",
                    q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(q.size(2) == k.size(2) && q.size(2) >= 1, "q and k must have the same head_dim >= 1, got ",
                    q.size(2), " and ", k.size(2));
  TORCH_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "heads (", q.size(1),
                    ") must be a multiple of heads_kv (", k.size(1), ")");
  // Leading dimensions reach BLAS as int.
  TORCH_CHECK_VALUE(q.size(1) * q.size(2) <= INT_MAX, "heads * head_dim must be <= ", INT_MAX, ", got ",
                    q.size(1) * q.size(2));
  const at::ScalarType dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "q must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(k.scalar_type() == dtype && v.scalar_type() == dtype, "q, k, v must have the same dtype, got ",
                   dtype, ", ", k.scalar_type(), ", ", v.scalar_type());
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
                    max_seqlen_q, " and ", max_seqlen_k);
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
                    "cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_seqlens_q.numel(), " and ",
                    cu_seqlens_k.numel());
  index.cu_seqlens_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.size(0), max_seqlen_q);
  index.cu_seqlens_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.size(0), max_seqlen_k);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (full), 1 (causal) or 2 (prefix), got ", mode);
  const int64_t segments = cu_seqlens_q.numel() - 1;
  if (mode == static_cast<int64_t>(Mode::kPrefix)) {
    TORCH_CHECK_VALUE(prefix_lens.has_value() && prefix_lens->defined(), "mode 2 (prefix) needs prefix_lens");
    check_cpu(*prefix_lens, "prefix_lens");
    TORCH_CHECK_TYPE(prefix_lens->scalar_type() == at::kInt, "prefix_lens must be int32, got ",
                     prefix_lens->scalar_type());
    TORCH_CHECK_VALUE(prefix_lens->dim() == 1 && prefix_lens->size(0) == segments,
                      "prefix_lens must have shape (segments,) = (", segments, ",), got ", prefix_lens->sizes());
    index.prefix_lens = prefix_lens->contiguous();
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), "softmax_scale must be finite, got ", softmax_scale);

  Params p{};
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.heads = q.size(1);
  p.heads_kv = k.size(1);
  p.head_dim = q.size(2);
  p.num_segments = segments;
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  p.cu_seqlens_q = index.cu_seqlens_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = index.cu_seqlens_k.const_data_ptr<int32_t>();
  p.prefix_lens = index.prefix_lens.defined() ? index.prefix_lens.const_data_ptr<int32_t>() : nullptr;
  p.softmax_scale = softmax_scale;
  p.dropout = dropout_p > 0.0;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.threshold = dropout_threshold(dropout_p);
  p.keep_scale = 1.0 / (1.0 - dropout_p);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t mode,
    const std::optional<at::Tensor>& prefix_lens, double softmax_scale, double dropout_p, int64_t seed,
    int64_t offset) {
  IndexTensors index;
  Params p = make_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mode, prefix_lens, index,
                         softmax_scale, dropout_p, seed, offset);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(qc, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({p.heads, p.total_q}, q.options().dtype(at::kFloat));
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  run_fwd_kernel(p, q.scalar_type(), static_cast<Mode>(mode));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, int64_t mode, const std::optional<at::Tensor>& prefix_lens, double softmax_scale,
    double dropout_p, int64_t seed, int64_t offset) {
  IndexTensors index;
  Params p = make_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mode, prefix_lens, index,
                         softmax_scale, dropout_p, seed, offset);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "dout and out must have q's shape (total_q, heads, head_dim) = ", q.sizes(), ", got ",
                    dout.sizes(), " and ", out.sizes());
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "dout and out must have q's dtype ", q.scalar_type(), ", got ", dout.scalar_type(), " and ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == p.heads && lse.size(1) == p.total_q,
                    "lse must have shape (heads, total_q) = (", p.heads, ", ", p.total_q, "), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  check_cpu(dout, "dout");
  check_cpu(out, "out");
  check_cpu(lse, "lse");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor doc = dout.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::empty_like(qc, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(kc, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(vc, at::MemoryFormat::Contiguous);
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.dout = doc.const_data_ptr();
  p.out_in = oc.const_data_ptr();
  p.lse_in = lc.const_data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  run_bwd_kernel(p, q.scalar_type(), static_cast<Mode>(mode));
  return {dq, dk, dv};
}

// Schemas are declared once, in mmcore/ops/_library.py; this file only supplies the CPU kernels.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) {
  m.impl("packed_attention_fwd", &packed_attention_fwd_cpu);
  m.impl("packed_attention_bwd", &packed_attention_bwd_cpu);
}

}  // namespace mmcore::packed_attention
