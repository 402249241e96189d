// Packed attention backward on CPU (in progress).
#include "packed_attention/kernel_utils.h"

namespace mmcore::packed_attention {

void run_bwd_kernel(const Params&, at::ScalarType, Mode) {
  TORCH_CHECK(false, "packed_attention_bwd: the CPU backward is not implemented yet");
}

}  // namespace mmcore::packed_attention
