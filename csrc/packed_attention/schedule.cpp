// Host-side tile schedule of the Triton packed-attention kernels (kernels/packed_attention.py): the work items
// (segment, tile start within the segment) of the tiles of block_size tokens of every segment, in segment
// order, as int32 (capacity, 2) with capacity = segments + total / block_size (an upper bound of
// sum(ceil(L_s / block_size)) that the GPU builder knows without reading cu_seqlens); unused rows are (-1, -1).
// Identical to kernels.packed_attention.build_schedule, the torch-ops builder used on GPUs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

namespace mmcore::packed_attention {
namespace {

at::Tensor packed_attention_schedule_cpu(const at::Tensor& cu_seqlens, int64_t total, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
  TORCH_CHECK_VALUE(total >= 0, "total must be >= 0, got ", total);
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
                    "cu_seqlens must have shape (segments + 1,), got ", cu_seqlens.sizes());
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ",
                   cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.device().is_cpu(), "packed_attention_schedule needs a CPU tensor, got ",
                    cu_seqlens.device());
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int64_t segments = cu.numel() - 1;
  const int64_t capacity = segments + total / block_size;
  at::Tensor out = at::full({capacity, 2}, -1, cu.options());
  int32_t* o = out.data_ptr<int32_t>();
  int64_t n = 0;
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t len = static_cast<int64_t>(c[s + 1]) - c[s];
    TORCH_CHECK_VALUE(len >= 0, "cu_seqlens must be non-decreasing, but cu_seqlens[", s + 1, "] = ", c[s + 1],
                      " < cu_seqlens[", s, "] = ", c[s]);
    for (int64_t start = 0; start < len; start += block_size) {
      TORCH_CHECK_VALUE(n < capacity, "cu_seqlens spans ", c[segments] - c[0], " tokens, more than total = ", total);
      o[2 * n] = static_cast<int32_t>(s);
      o[2 * n + 1] = static_cast<int32_t>(start);
      ++n;
    }
  }
  return out;
}

}  // namespace

// The schema is declared once, in mmcore/ops/_library.py.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) { m.impl("packed_attention_schedule", &packed_attention_schedule_cpu); }

}  // namespace mmcore::packed_attention
