// The decoding-step float32 product of csrc/decoding/logits.cpp, for other C++ kernels (the fused decoder step).
#pragma once

#include <cstdint>

namespace mmcore::decoding {

// out[b * rows + r] = sum_d hidden[b * dim + d] * weight[r * ldw + d] (+ bias[r]) for b < batch, r < rows: the
// kernel behind mmcore::decode_logits for float32 (same tiles, same summation order, at::parallel_for over rows).
// hidden and out contiguous; weight rows unit-stride; bias null or `rows` entries.
void linear_f32(const float* hidden, int64_t batch, int64_t dim, const float* weight, int64_t ldw, const float* bias,
                float* out, int64_t rows);

}  // namespace mmcore::decoding
