// Sample packing: first-fit-decreasing bin packing of sample lengths into bins of a token budget.
//
// Deterministic: samples are taken by length descending, ties by index ascending; each goes into the first
// bin (in creation order) with enough room, or opens a new bin. A max-tree over the bins' remaining room
// finds that bin in O(log n), so packing n samples costs O(n log n). No Python here, so the same code
// builds into the extension and the ctest executable.
#pragma once

#include <cstdint>
#include <vector>

namespace mmcore::data {

// Bins in compressed form: bin b holds the sample indices indices[offsets[b] : offsets[b + 1]], in the order
// they were placed (longest first). offsets has num_bins + 1 entries and starts at 0.
struct Bins {
  std::vector<int64_t> indices;
  std::vector<int64_t> offsets{0};

  int64_t num_bins() const { return static_cast<int64_t>(offsets.size()) - 1; }
  std::vector<std::vector<int64_t>> to_lists() const;
};

// lengths: n >= 0 non-negative sample lengths, each at most budget; budget >= 1. Throws c10::ValueError
// (TORCH_CHECK_VALUE) on a budget below 1, a negative length or a length above the budget, naming the
// sample index. Zero-length samples are packed like any other (into the first bin, as they always fit).
Bins first_fit_decreasing(const int64_t* lengths, int64_t n, int64_t budget);

inline Bins first_fit_decreasing(const std::vector<int64_t>& lengths, int64_t budget) {
  return first_fit_decreasing(lengths.data(), static_cast<int64_t>(lengths.size()), budget);
}

}  // namespace mmcore::data
