// Tests of first-fit-decreasing packing (csrc/data/packing.h) without Python: hand-worked cases, a naive
// O(n * bins) first fit on random inputs (both sort paths, a tree that has to grow), and the input errors.
// The comparison with the Python reference is tests/data/test_packing.py.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "check.h"
#include "data/packing.h"

namespace d = mmcore::data;

namespace {

using Lists = std::vector<std::vector<int64_t>>;

// The definition, as plainly as possible: stable sort by length descending, then scan the bins in order.
Lists naive_ffd(const std::vector<int64_t>& lengths, int64_t budget) {
  std::vector<int64_t> order(lengths.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  Lists bins;
  std::vector<int64_t> room;
  for (int64_t i : order) {
    size_t b = 0;
    while (b < bins.size() && room[b] < lengths[i]) ++b;
    if (b == bins.size()) {
      bins.emplace_back();
      room.push_back(budget);
    }
    bins[b].push_back(i);
    room[b] -= lengths[i];
  }
  return bins;
}

}  // namespace

TEST_CASE(ffd_hand_worked) {
  // Taken as 8 (index 5), 5 (1), 5 (3), 3 (0), 2 (2), 0 (4): the zero length fits the first bin, full or not.
  EXPECT_EQ(d::first_fit_decreasing({3, 5, 2, 5, 0, 8}, 8).to_lists(), (Lists{{5, 4}, {1, 0}, {3, 2}}));
  EXPECT_EQ(d::first_fit_decreasing({}, 8).to_lists(), Lists{});
  EXPECT_EQ(d::first_fit_decreasing({}, 8).offsets, std::vector<int64_t>{0});
  EXPECT_EQ(d::first_fit_decreasing({0, 0, 0}, 1).to_lists(), (Lists{{0, 1, 2}}));
  EXPECT_EQ(d::first_fit_decreasing({4, 4, 4}, 4).to_lists(), (Lists{{0}, {1}, {2}}));
  EXPECT_EQ(d::first_fit_decreasing({2, 2, 2, 2, 2}, 4).to_lists(), (Lists{{0, 1}, {2, 3}, {4}}));
  EXPECT_EQ(d::first_fit_decreasing({1, 1, 1}, 100).to_lists(), (Lists{{0, 1, 2}}));
}

TEST_CASE(ffd_matches_naive_first_fit) {
  std::mt19937_64 rng(7);
  // (n, budget, lengths from, to): the counting-sort path (budget <= 4n) and the comparison-sort path, lengths
  // over half the budget (one bin each: 1500 bins outgrow the first 1024 leaves), many ties, all zero, Kosmos-2
  // sizes.
  const int64_t cases[][4] = {{1000, 64, 0, 64},     {300, 100000, 0, 100000}, {1500, 1000, 501, 520},
                              {2000, 50, 0, 5},      {1000, 7, 0, 0},          {1, 1, 1, 1},
                              {777, 8192, 16, 2048}, {64, 1 << 20, 0, 1 << 20}};
  for (const auto& c : cases) {
    std::uniform_int_distribution<int64_t> len(c[2], c[3]);
    std::vector<int64_t> lengths(c[0]);
    for (auto& l : lengths) l = len(rng);
    EXPECT_EQ(d::first_fit_decreasing(lengths, c[1]).to_lists(), naive_ffd(lengths, c[1]));
  }
}

TEST_CASE(ffd_rejects_bad_inputs) {
  EXPECT_THROWS(d::first_fit_decreasing({1, 2}, 0), c10::ValueError, "budget must be >= 1, got 0");
  EXPECT_THROWS(d::first_fit_decreasing({1, -2}, 4), c10::ValueError, "lengths[1] = -2 is negative");
  EXPECT_THROWS(d::first_fit_decreasing({1, 2, 5}, 4), c10::ValueError, "lengths[2] = 5 exceeds the budget 4");
}
