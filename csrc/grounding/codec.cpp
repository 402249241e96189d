#include "codec.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <iomanip>
#include <sstream>

#include "entities.h"

namespace mmcore::grounding {
namespace {

constexpr int64_t kGrain = 4096;
// Grids up to 2^20 per side keep every index (num_bins^2) and its arithmetic far inside int64.
constexpr int64_t kMaxNumBins = int64_t{1} << 20;

// "[2, 7]" for flat row 23 of a (4, 8, k) tensor: errors name the element as the caller indexes it.
std::string row_index(at::IntArrayRef sizes, int64_t row) {
  std::vector<int64_t> idx(sizes.size() - 1);
  for (int64_t d = static_cast<int64_t>(idx.size()) - 1; d >= 0; --d) {
    idx[d] = row % sizes[d];
    row /= sizes[d];
  }
  std::string s = "[";
  for (size_t d = 0; d < idx.size(); ++d) s += (d ? ", " : "") + std::to_string(idx[d]);
  return idx.empty() ? std::string() : s + "]";  // a single (4,) box is just "boxes"
}

// Shortest-round-trip-ish formatting (17 significant digits), so 1.0000001 never prints as 1.
std::string fmt_box(const double* b) {
  std::ostringstream os;
  os << std::setprecision(17) << "(" << b[0] << ", " << b[1] << ", " << b[2] << ", " << b[3] << ")";
  return os.str();
}

inline void check_box(const double* b, at::IntArrayRef sizes, int64_t i) {
  const double x1 = b[0], y1 = b[1], x2 = b[2], y2 = b[3];
  if (std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2) && x1 >= 0 && y1 >= 0 &&
      x2 <= 1 && y2 <= 1 && x2 > x1 && y2 > y1) {
    return;
  }
  const char* why = !(std::isfinite(x1) && std::isfinite(y1) && std::isfinite(x2) && std::isfinite(y2))
                        ? "is not finite"
                    : !(x1 >= 0 && y1 >= 0 && x2 <= 1 && y2 <= 1) ? "lies outside [0, 1]"
                                                                  : "needs x2 > x1 and y2 > y1";
  TORCH_CHECK_VALUE(false, "boxes", row_index(sizes, i), " = ", fmt_box(b), " ", why);
}

template <bool kUnilm>
void encode(const double* boxes, int64_t* out, int64_t n, int64_t num_bins) {
  const double p = static_cast<double>(num_bins);
  const double cell = 1.0 / p;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* b = boxes + 4 * i;
      int64_t ux, uy, lx, ly;
      if constexpr (kUnilm) {
        // unilm/data/vl/obj_utils.py: floor(max(x1, 0) / cell), floor(min(x2, 0.99999) / cell).
        ux = static_cast<int64_t>(std::floor(std::max(b[0], 0.0) / cell));
        uy = static_cast<int64_t>(std::floor(std::max(b[1], 0.0) / cell));
        lx = static_cast<int64_t>(std::floor(std::min(b[2], 0.99999) / cell));
        ly = static_cast<int64_t>(std::floor(std::min(b[3], 0.99999) / cell));
      } else {
        // transformers' coordinate_to_patch_index: floor(x1 * P), ceil(x2 * P - 1). NOTE: for x2 < ~2^-53 / P,
        // x2 * P - 1 rounds to -1 and transformers yields cell -1; clamping to 0 is the one departure.
        ux = static_cast<int64_t>(std::floor(b[0] * p));
        uy = static_cast<int64_t>(std::floor(b[1] * p));
        lx = std::max<int64_t>(static_cast<int64_t>(std::ceil(b[2] * p - 1)), 0);
        ly = std::max<int64_t>(static_cast<int64_t>(std::ceil(b[3] * p - 1)), 0);
      }
      out[2 * i] = uy * num_bins + ux;
      out[2 * i + 1] = ly * num_bins + lx;
    }
  });
}

}  // namespace

at::Tensor boxes_to_loc_indices_cpu(const at::Tensor& boxes, int64_t num_bins, const std::string& rounding) {
  TORCH_CHECK_VALUE(num_bins >= 1 && num_bins <= kMaxNumBins, "num_bins must be in [1, ", kMaxNumBins, "], got ",
                    num_bins);
  TORCH_CHECK_VALUE(rounding == "hf" || rounding == "unilm", "rounding must be 'hf' or 'unilm', got '", rounding,
                    "'");
  TORCH_CHECK_VALUE(boxes.dim() >= 1 && boxes.size(-1) == 4, "boxes must have shape (..., 4), got ",
                    boxes.sizes());
  TORCH_CHECK_TYPE(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble,
                   "boxes must be float32 or float64, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(boxes.device().is_cpu(), "boxes_to_loc_indices_cpu needs a CPU tensor, got ", boxes.device());
  const at::Tensor b = boxes.to(at::kDouble).contiguous();
  const int64_t n = b.numel() / 4;
  const double* ptr = b.const_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) check_box(ptr + 4 * i, boxes.sizes(), i);

  std::vector<int64_t> shape(boxes.sizes().begin(), boxes.sizes().end());
  shape.back() = 2;
  at::Tensor out = at::empty(shape, boxes.options().dtype(at::kLong));
  if (rounding == "unilm") {
    encode<true>(ptr, out.data_ptr<int64_t>(), n, num_bins);
  } else {
    encode<false>(ptr, out.data_ptr<int64_t>(), n, num_bins);
  }
  return out;
}

at::Tensor loc_indices_to_boxes_cpu(const at::Tensor& indices, int64_t num_bins) {
  TORCH_CHECK_VALUE(num_bins >= 1 && num_bins <= kMaxNumBins, "num_bins must be in [1, ", kMaxNumBins, "], got ",
                    num_bins);
  TORCH_CHECK_VALUE(indices.dim() >= 1 && indices.size(-1) == 2, "indices must have shape (..., 2), got ",
                    indices.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(indices.scalar_type(), /*includeBool=*/false),
                   "indices must be an integer tensor, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device().is_cpu(), "loc_indices_to_boxes_cpu needs a CPU tensor, got ",
                    indices.device());
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t n = idx.numel() / 2;
  const int64_t* ptr = idx.const_data_ptr<int64_t>();
  const int64_t cells = num_bins * num_bins;
  for (int64_t i = 0; i < 2 * n; ++i) {
    TORCH_CHECK_VALUE(ptr[i] >= 0 && ptr[i] < cells, "indices", row_index(indices.sizes(), i / 2), " = (",
                      ptr[i - i % 2], ", ", ptr[i - i % 2 + 1], ") has an index outside the ", num_bins, "x",
                      num_bins, " grid [0, ", cells, ")");
  }
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.back() = 4;
  at::Tensor out = at::empty(shape, indices.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Box b = cell_pair_to_box(ptr[2 * i], ptr[2 * i + 1], num_bins);
      o[4 * i] = b.x1;
      o[4 * i + 1] = b.y1;
      o[4 * i + 2] = b.x2;
      o[4 * i + 3] = b.y2;
    }
  });
  return out;
}

// Schemas are declared once, in mmcore/ops/_library.py; this file only supplies the CPU kernels.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) {
  m.impl("boxes_to_loc_indices", &boxes_to_loc_indices_cpu);
  m.impl("loc_indices_to_boxes", &loc_indices_to_boxes_cpu);
}

}  // namespace mmcore::grounding
