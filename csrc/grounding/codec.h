// Box <-> location-index codec (Kosmos-2 location tokens), CPU kernels.
#pragma once

#include <torch/types.h>

#include <string>

namespace mmcore::grounding {

// boxes: (..., 4) float32/float64 normalised (x1, y1, x2, y2) -> (..., 2) int64 (top-left, bottom-right)
// cell indices on a num_bins x num_bins grid. rounding: "hf" (transformers' processor) or "unilm" (the
// original training code). Computed in double whatever the input dtype.
at::Tensor boxes_to_loc_indices_cpu(const at::Tensor& boxes, int64_t num_bins, const std::string& rounding);

// indices: (..., 2) integer -> (..., 4) float64 boxes.
at::Tensor loc_indices_to_boxes_cpu(const at::Tensor& indices, int64_t num_bins);

}  // namespace mmcore::grounding
