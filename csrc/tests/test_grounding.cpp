// Tests of the grounding C++ API (csrc/grounding/entities.h, codec.h) without Python.
//
// Expected values were taken from transformers' clean_text_and_extract_entities_with_bboxes (entities),
// patch_index_to_coordinate (cell pair -> box) and coordinate_to_patch_index ("hf" rounding), transformers
// 5.24.0, which mmcore.grounding.extract_entities_ref reproduces (`python -c "from mmcore.grounding import
// extract_entities_ref; print(extract_entities_ref(TEXT))"`), and hard-coded here. Floats are compared exactly:
// the C++ code is meant to be bit-identical to that Python arithmetic.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "grounding/codec.h"
#include "grounding/entities.h"

namespace g = mmcore::grounding;

namespace {

std::u32string u32(const std::string& utf8) { return g::utf8_to_u32(utf8); }

void check_box(const g::Box& b, double x1, double y1, double x2, double y2, const char* file, int line) {
  const double got[4] = {b.x1, b.y1, b.x2, b.y2}, want[4] = {x1, y1, x2, y2};
  const char* names[4] = {"x1", "y1", "x2", "y2"};
  for (int k = 0; k < 4; ++k) {
    if (got[k] != want[k]) {
      mmcore::testing::fail(file, line,
                            std::string("box.") + names[k] + " = " + mmcore::testing::show(got[k]) + ", expected " +
                                mmcore::testing::show(want[k]));
    }
  }
}
#define EXPECT_BOX(box, x1, y1, x2, y2) check_box((box), (x1), (y1), (x2), (y2), __FILE__, __LINE__)

// The name of a phrase entity, as the Python binding slices it out of the input text.
std::u32string name_of(const std::u32string& text, const g::Entity& e) {
  return text.substr(e.name_begin, e.name_end - e.name_begin);
}

at::Tensor long_tensor(std::vector<int64_t> v) {
  return at::from_blob(v.data(), {static_cast<int64_t>(v.size())}, at::kLong).clone();
}

at::Tensor double_tensor(std::vector<double> v) {
  return at::from_blob(v.data(), {static_cast<int64_t>(v.size())}, at::kDouble).clone();
}

std::vector<int64_t> shape_of(const at::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

std::vector<int64_t> longs(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return {c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel()};
}

std::vector<double> doubles(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return {c.const_data_ptr<double>(), c.const_data_ptr<double>() + c.numel()};
}

}  // namespace

// ---------------------------------------------------------------------------------------------- entities

TEST_CASE(extract_entities_docstring_example) {
  const std::u32string text =
      u32("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
          "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.");
  const g::Extraction ex = g::extract_entities(text, 32);
  EXPECT(ex.ok);
  EXPECT_EQ(ex.clean_text, std::u32string(U"An image of a snowman warming himself by a fire."));
  EXPECT_EQ(ex.entities.size(), size_t{2});
  if (ex.entities.size() != 2) return;

  const g::Entity& snowman = ex.entities[0];
  EXPECT(snowman.has_phrase);
  EXPECT_EQ(name_of(text, snowman), std::u32string(U"a snowman"));
  EXPECT_EQ(snowman.start, 12);
  EXPECT_EQ(snowman.end, 21);
  EXPECT_EQ(snowman.boxes.size(), size_t{1});
  EXPECT_BOX(snowman.boxes.at(0), 0.390625, 0.046875, 0.984375, 0.828125);
  // The span indexes the clean text.
  EXPECT_EQ(ex.clean_text.substr(12, 21 - 12), std::u32string(U"a snowman"));

  const g::Entity& fire = ex.entities[1];
  EXPECT(fire.has_phrase);
  EXPECT_EQ(name_of(text, fire), std::u32string(U"a fire"));
  EXPECT_EQ(fire.start, 41);
  EXPECT_EQ(fire.end, 47);
  EXPECT_EQ(fire.boxes.size(), size_t{1});
  EXPECT_BOX(fire.boxes.at(0), 0.171875, 0.015625, 0.484375, 0.890625);
}

TEST_CASE(extract_entities_phraseless_object_gives_one_entity_per_box) {
  // Reference: ('Look here', [('<patch_index_44><patch_index_863>', (4, 4), [(0.390625, 0.046875, 0.984375,
  // 0.828125)]), ('<patch_index_5><patch_index_911>', (4, 4), [(0.171875, 0.015625, 0.484375, 0.890625)])])
  const g::Extraction ex =
      g::extract_entities(u32("Look<object><patch_index_0044><patch_index_0863></delimiter_of_multi_objects/>"
                              "<patch_index_0005><patch_index_0911></object> here"),
                          32);
  EXPECT(ex.ok);
  EXPECT_EQ(ex.clean_text, std::u32string(U"Look here"));
  EXPECT_EQ(ex.entities.size(), size_t{2});
  if (ex.entities.size() != 2) return;
  const int64_t ul[2] = {44, 5}, lr[2] = {863, 911};
  for (int k = 0; k < 2; ++k) {
    const g::Entity& e = ex.entities[k];
    EXPECT(!e.has_phrase);
    EXPECT_EQ(e.ul, ul[k]);
    EXPECT_EQ(e.lr, lr[k]);
    EXPECT_EQ(e.start, 4);
    EXPECT_EQ(e.end, 4);
    EXPECT_EQ(e.boxes.size(), size_t{1});
  }
  EXPECT_BOX(ex.entities[0].boxes.at(0), 0.390625, 0.046875, 0.984375, 0.828125);
  EXPECT_BOX(ex.entities[1].boxes.at(0), 0.171875, 0.015625, 0.484375, 0.890625);
}

TEST_CASE(extract_entities_malformed_object_gives_no_entity) {
  // Reference: ('A dog runs', [])
  const g::Extraction ex =
      g::extract_entities(u32("A<phrase> dog</phrase><object><patch_index_0044></object> runs"), 32);
  EXPECT(ex.ok);
  EXPECT_EQ(ex.clean_text, std::u32string(U"A dog runs"));
  EXPECT_EQ(ex.entities.size(), size_t{0});
}

TEST_CASE(extract_entities_multiple_boxes_for_one_phrase) {
  // Reference: ('two dogs play', [('two dogs', (0, 8), [(0.390625, 0.046875, 0.984375, 0.828125),
  // (0.015625, 0.015625, 0.984375, 0.984375)])])
  const std::u32string text =
      u32("<phrase>two dogs</phrase><object><patch_index_0044><patch_index_0863></delimiter_of_multi_objects/>"
          "<patch_index_0000><patch_index_1023></object> play");
  const g::Extraction ex = g::extract_entities(text, 32);
  EXPECT(ex.ok);
  EXPECT_EQ(ex.clean_text, std::u32string(U"two dogs play"));
  EXPECT_EQ(ex.entities.size(), size_t{1});
  if (ex.entities.size() != 1) return;
  const g::Entity& e = ex.entities[0];
  EXPECT_EQ(name_of(text, e), std::u32string(U"two dogs"));
  EXPECT_EQ(e.start, 0);
  EXPECT_EQ(e.end, 8);
  EXPECT_EQ(e.boxes.size(), size_t{2});
  if (e.boxes.size() != 2) return;
  EXPECT_BOX(e.boxes[0], 0.390625, 0.046875, 0.984375, 0.828125);
  EXPECT_BOX(e.boxes[1], 0.015625, 0.015625, 0.984375, 0.984375);
}

TEST_CASE(extract_entities_index_overflowing_int64_is_not_ok) {
  // 25 digits: Python's int holds it (the reference returns an entity with a 9.765625e+21 coordinate); the
  // C++ parser cannot, and says so through ok = false so that the caller falls back to the reference.
  const g::Extraction ex = g::extract_entities(
      u32("<phrase>x</phrase><object><patch_index_" + std::string(25, '9') + "><patch_index_0001></object>"), 32);
  EXPECT(!ex.ok);
}

TEST_CASE(extract_entities_unclosed_angle_bracket_is_kept) {
  // A '<' with no '>' before the newline starts no tag. Reference: ('a < b\nc', [('c', (6, 7), [(0.0, 0.0,
  // 0.0625, 0.03125)])])
  const g::Extraction ex =
      g::extract_entities(u32("a < b\n<phrase>c</phrase><object><patch_index_0000><patch_index_0001></object>"), 32);
  EXPECT(ex.ok);
  EXPECT_EQ(ex.clean_text, std::u32string(U"a < b\nc"));
  EXPECT_EQ(ex.entities.size(), size_t{1});
  if (ex.entities.size() != 1) return;
  EXPECT_EQ(ex.entities[0].start, 6);
  EXPECT_EQ(ex.entities[0].end, 7);
  EXPECT_BOX(ex.entities[0].boxes.at(0), 0.0, 0.0, 0.0625, 0.03125);

  // Reference: ('a <b\nc d>', [('c', (5, 6), [(0.0, 0.0, 0.0625, 0.03125)])])
  const g::Extraction ex2 =
      g::extract_entities(u32("a <b\n<phrase>c</phrase><object><patch_index_0000><patch_index_0001></object> d>"), 32);
  EXPECT_EQ(ex2.clean_text, std::u32string(U"a <b\nc d>"));
  EXPECT_EQ(ex2.entities.size(), size_t{1});
  if (ex2.entities.size() != 1) return;
  EXPECT_EQ(ex2.entities[0].start, 5);
  EXPECT_EQ(ex2.entities[0].end, 6);
}

TEST_CASE(extract_entities_whitespace_stripping_shifts_spans) {
  // Reference: ('cat', [('cat', (0, 3), [(0.0, 0.03125, 0.0625, 0.0625)])])
  const std::u32string text =
      u32("  \t <phrase>  cat  </phrase><object><patch_index_0032><patch_index_0033></object>  ");
  const g::Extraction ex = g::extract_entities(text, 32);
  EXPECT_EQ(ex.clean_text, std::u32string(U"cat"));
  EXPECT_EQ(ex.entities.size(), size_t{1});
  if (ex.entities.size() == 1) {
    EXPECT_EQ(name_of(text, ex.entities[0]), std::u32string(U"cat"));
    EXPECT_EQ(ex.entities[0].start, 0);
    EXPECT_EQ(ex.entities[0].end, 3);
    EXPECT_BOX(ex.entities[0].boxes.at(0), 0.0, 0.03125, 0.0625, 0.0625);
  }

  // Non-ASCII whitespace (U+00A0) is stripped too, as str.strip() does. Reference: ('cat', [('cat', (0, 3),
  // [(0.0, 0.0, 0.0625, 0.03125)])])
  const g::Extraction nbsp =
      g::extract_entities(u32("\u00a0 <phrase>cat</phrase><object><patch_index_0000><patch_index_0001></object>"), 32);
  EXPECT_EQ(nbsp.clean_text, std::u32string(U"cat"));
  EXPECT_EQ(nbsp.entities.size(), size_t{1});
  if (nbsp.entities.size() == 1) {
    EXPECT_EQ(nbsp.entities[0].start, 0);
    EXPECT_EQ(nbsp.entities[0].end, 3);
  }

  // An object inside the stripped leading whitespace gets a negative offset, as in transformers. Reference:
  // ('x', [('<patch_index_1><patch_index_2>', (-1, -1), [(0.03125, 0.0, 0.09375, 0.03125)])])
  const g::Extraction lead = g::extract_entities(u32("  <object><patch_index_0001><patch_index_0002></object> x"), 32);
  EXPECT_EQ(lead.clean_text, std::u32string(U"x"));
  EXPECT_EQ(lead.entities.size(), size_t{1});
  if (lead.entities.size() == 1) {
    EXPECT_EQ(lead.entities[0].start, -1);
    EXPECT_EQ(lead.entities[0].end, -1);
    EXPECT_BOX(lead.entities[0].boxes.at(0), 0.03125, 0.0, 0.09375, 0.03125);
  }

  // A whitespace-only phrase: empty name, start after end. Reference: ('y', [('', (-1, -4), [(0.015625,
  // 0.015625, 0.046875, 0.046875)])])
  const std::u32string blank_text = u32("<phrase>   </phrase><object><patch_index_0000><patch_index_0033></object> y");
  const g::Extraction blank = g::extract_entities(blank_text, 32);
  EXPECT_EQ(blank.clean_text, std::u32string(U"y"));
  EXPECT_EQ(blank.entities.size(), size_t{1});
  if (blank.entities.size() == 1) {
    EXPECT_EQ(name_of(blank_text, blank.entities[0]), std::u32string());
    EXPECT_EQ(blank.entities[0].start, -1);
    EXPECT_EQ(blank.entities[0].end, -4);
    EXPECT_BOX(blank.entities[0].boxes.at(0), 0.015625, 0.015625, 0.046875, 0.046875);
  }
}

TEST_CASE(extract_entities_unicode_decimal_digits_in_indices) {
  // `\d` matches any Unicode decimal digit and int() reads it. Reference for ARABIC-INDIC "12":
  // ('x', [('<patch_index_12><patch_index_3>', (1, 1), [(0.375, 0.0, 0.125, 0.03125)])])
  const g::Extraction ex =
      g::extract_entities(u32("x<object><patch_index_\u0661\u0662><patch_index_0003></object>"), 32);
  EXPECT(ex.ok);
  EXPECT_EQ(ex.entities.size(), size_t{1});
  if (ex.entities.size() != 1) return;
  EXPECT_EQ(ex.entities[0].ul, 12);
  EXPECT_EQ(ex.entities[0].lr, 3);
  EXPECT_EQ(ex.entities[0].start, 1);
  EXPECT_BOX(ex.entities[0].boxes.at(0), 0.375, 0.0, 0.125, 0.03125);
}

TEST_CASE(extract_entities_spans_count_code_points) {
  // "é" is 2 UTF-8 bytes and the emoji 4 (one code point, outside the BMP); offsets are Python str indices.
  // Reference: ('café 😀 a dog ok', [('a dog', (7, 12), [(0.390625, 0.046875, 0.984375, 0.828125)])])
  const std::u32string text =
      u32("caf\u00e9 \U0001F600<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object> ok");
  const g::Extraction ex = g::extract_entities(text, 32);
  EXPECT(ex.ok);
  EXPECT_EQ(ex.clean_text, std::u32string(U"caf\u00e9 \U0001F600 a dog ok"));
  EXPECT_EQ(ex.entities.size(), size_t{1});
  if (ex.entities.size() != 1) return;
  EXPECT_EQ(name_of(text, ex.entities[0]), std::u32string(U"a dog"));
  EXPECT_EQ(ex.entities[0].start, 7);
  EXPECT_EQ(ex.entities[0].end, 12);
  EXPECT_BOX(ex.entities[0].boxes.at(0), 0.390625, 0.046875, 0.984375, 0.828125);
}

TEST_CASE(extract_entities_rejects_nonpositive_num_bins) {
  EXPECT_THROWS(g::extract_entities(u32("x"), 0), std::invalid_argument, "num_bins");
}

TEST_CASE(utf8_round_trip) {
  const std::string utf8 = "caf\u00e9 \u20ac \U0001F600 \u0661 plain";
  const std::u32string cps = g::utf8_to_u32(utf8);
  EXPECT_EQ(cps, std::u32string(U"caf\u00e9 \u20ac \U0001F600 \u0661 plain"));
  EXPECT_EQ(cps.size(), size_t{16});
  EXPECT_EQ(g::u32_to_utf8(cps), utf8);
  EXPECT_THROWS(g::utf8_to_u32("abc\xff"), std::invalid_argument, "UTF-8");
  EXPECT_THROWS(g::utf8_to_u32("\xe2\x82"), std::invalid_argument, "UTF-8");  // truncated sequence
}

// ---------------------------------------------------------------------------------------- cell_pair_to_box

TEST_CASE(cell_pair_to_box_centres_and_edges) {
  EXPECT_BOX(g::cell_pair_to_box(44, 863, 32), 0.390625, 0.046875, 0.984375, 0.828125);  // cell centres
  EXPECT_BOX(g::cell_pair_to_box(0, 1023, 32), 0.015625, 0.015625, 0.984375, 0.984375);
  EXPECT_BOX(g::cell_pair_to_box(33, 33, 32), 0.03125, 0.03125, 0.0625, 0.0625);  // same cell: its edges
  EXPECT_BOX(g::cell_pair_to_box(32, 35, 32), 0.0, 0.03125, 0.125, 0.0625);       // same row
  EXPECT_BOX(g::cell_pair_to_box(1, 33, 32), 0.03125, 0.0, 0.0625, 0.0625);       // same column
}

TEST_CASE(cell_pair_to_box_is_bit_exact_without_fma) {
  // On a 10 x 10 grid the cell (0.1) is inexact, and a fused multiply-add gives a different last bit than
  // Python's two roundings for these coordinates (checked with exact rational arithmetic): these fail if the
  // compiler contracts `a * cell + cell` (no -ffp-contract=off on an FMA target). GCC 12 on x86-64 happens
  // not to contract this function even when allowed; the codec test below does catch it there.
  // transformers: patch_index_to_coordinate(76, 97, 10) and patch_index_to_coordinate(55, 59, 10).
  EXPECT_BOX(g::cell_pair_to_box(76, 97, 10), 0x1.4cccccccccccep-1, 0x1.8000000000001p-1, 0x1.8000000000001p-1,
             0x1.e666666666667p-1);
  EXPECT_BOX(g::cell_pair_to_box(55, 59, 10), 0x1.0000000000000p-1, 0x1.0000000000000p-1, 0x1.0000000000000p+0,
             0x1.3333333333333p-1);
}

// ------------------------------------------------------------------------------------------------- codec

TEST_CASE(boxes_to_loc_indices_roundings) {
  const at::Tensor box = double_tensor({0.25, 0.25, 0.5, 0.5});
  EXPECT_EQ(longs(g::boxes_to_loc_indices_cpu(box, 32, "hf")), (std::vector<int64_t>{264, 495}));
  EXPECT_EQ(longs(g::boxes_to_loc_indices_cpu(box, 32, "unilm")), (std::vector<int64_t>{264, 528}));
  // float32 input is computed in double too.
  EXPECT_EQ(longs(g::boxes_to_loc_indices_cpu(box.to(at::kFloat), 32, "hf")), (std::vector<int64_t>{264, 495}));
  EXPECT_EQ(g::boxes_to_loc_indices_cpu(box, 32, "hf").scalar_type(), at::kLong);
}

TEST_CASE(boxes_to_loc_indices_is_bit_exact_without_fma) {
  // transformers computes ceil(x2 * P - 1) with two roundings: 0.1 * 10 rounds to 1.0, so x2 = 0.1 gives cell 0.
  // Fused into one FMA, 0.1 * 10 - 1 is 5.55e-17 and the ceil gives cell 1 (checked with exact arithmetic).
  // Python: mmcore.grounding.boxes_to_loc_indices(torch.tensor([0.0, 0.0, 0.1, 0.1], dtype=torch.float64), 10,
  // rounding) with rounding "hf" (= transformers' coordinate_to_patch_index) and "unilm".
  const at::Tensor box = double_tensor({0.0, 0.0, 0.1, 0.1});
  EXPECT_EQ(longs(g::boxes_to_loc_indices_cpu(box, 10, "hf")), (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(longs(g::boxes_to_loc_indices_cpu(box, 10, "unilm")), (std::vector<int64_t>{0, 11}));
}

TEST_CASE(boxes_to_loc_indices_keeps_leading_shape) {
  const at::Tensor boxes =
      double_tensor({0.25, 0.25, 0.5, 0.5, 0.0, 0.0, 1.0, 1.0, 0.1, 0.2, 0.3, 0.4}).repeat({2}).view({2, 3, 4});
  const at::Tensor hf = g::boxes_to_loc_indices_cpu(boxes, 32, "hf");
  EXPECT_EQ(shape_of(hf), (std::vector<int64_t>{2, 3, 2}));
  // Python: mmcore.grounding.boxes_to_loc_indices(boxes, 32, "hf") / "unilm".
  EXPECT_EQ(longs(hf), (std::vector<int64_t>{264, 495, 0, 1023, 195, 393, 264, 495, 0, 1023, 195, 393}));
  EXPECT_EQ(longs(g::boxes_to_loc_indices_cpu(boxes, 32, "unilm")),
            (std::vector<int64_t>{264, 528, 0, 1023, 195, 393, 264, 528, 0, 1023, 195, 393}));
  // A non-contiguous view gives the same result.
  EXPECT_EQ(longs(g::boxes_to_loc_indices_cpu(boxes.transpose(0, 1), 32, "hf")),
            (std::vector<int64_t>{264, 495, 264, 495, 0, 1023, 0, 1023, 195, 393, 195, 393}));
}

TEST_CASE(boxes_to_loc_indices_rejects_invalid_input) {
  at::Tensor boxes = double_tensor({0.25, 0.25, 0.5, 0.5}).repeat({6}).view({2, 3, 4});
  boxes[1][1][2].fill_(0.0);  // x2 < x1 at boxes[1, 1]
  EXPECT_THROWS(g::boxes_to_loc_indices_cpu(boxes, 32, "hf"), c10::ValueError, "boxes[1, 1]");
  EXPECT_THROWS(g::boxes_to_loc_indices_cpu(double_tensor({0.5, 0.5, 1.5, 1.0}), 32, "hf"), c10::ValueError,
                "outside [0, 1]");
  EXPECT_THROWS(g::boxes_to_loc_indices_cpu(double_tensor({0.1, 0.1, 0.5, 0.5}), 32, "round"), c10::ValueError,
                "rounding");
  EXPECT_THROWS(g::boxes_to_loc_indices_cpu(at::zeros({2, 3}, at::kDouble), 32, "hf"), c10::ValueError, "(..., 4)");
  EXPECT_THROWS(g::boxes_to_loc_indices_cpu(at::zeros({4}, at::kLong), 32, "hf"), c10::TypeError, "float32");
  EXPECT_THROWS(g::boxes_to_loc_indices_cpu(double_tensor({0.1, 0.1, 0.5, 0.5}), 0, "hf"), c10::ValueError, "num_bins");
}

TEST_CASE(loc_indices_to_boxes_values_and_shape) {
  const at::Tensor idx = long_tensor({264, 495, 264, 528}).view({2, 2});
  const at::Tensor boxes = g::loc_indices_to_boxes_cpu(idx, 32);
  EXPECT_EQ(shape_of(boxes), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(boxes.scalar_type(), at::kDouble);
  EXPECT_EQ(doubles(boxes),
            (std::vector<double>{0.265625, 0.265625, 0.484375, 0.484375, 0.265625, 0.265625, 0.515625, 0.515625}));
  // int32 indices are accepted.
  EXPECT_EQ(doubles(g::loc_indices_to_boxes_cpu(idx.to(at::kInt), 32)), doubles(boxes));
}

TEST_CASE(loc_indices_round_trip_every_cell_pair) {
  // Every pair whose lower-right cell is not left of or above the upper-left one, on the 32 x 32 grid:
  // indices -> boxes -> indices ("hf" rounding) is the identity.
  constexpr int64_t kBins = 32;
  std::vector<int64_t> pairs;
  for (int64_t ul = 0; ul < kBins * kBins; ++ul) {
    for (int64_t lr = 0; lr < kBins * kBins; ++lr) {
      if (ul % kBins <= lr % kBins && ul / kBins <= lr / kBins) {
        pairs.push_back(ul);
        pairs.push_back(lr);
      }
    }
  }
  const int64_t n = static_cast<int64_t>(pairs.size()) / 2;
  const at::Tensor idx = at::from_blob(pairs.data(), {n, 2}, at::kLong).clone();
  const at::Tensor back = g::boxes_to_loc_indices_cpu(g::loc_indices_to_boxes_cpu(idx, kBins), kBins, "hf");
  const at::Tensor mismatch = (back != idx).any(-1).nonzero();
  EXPECT_EQ(mismatch.size(0), 0);
  if (mismatch.size(0) > 0) {
    const int64_t i = mismatch[0][0].item<int64_t>();
    mmcore::testing::fail(__FILE__, __LINE__,
                          "first mismatch: (" + std::to_string(pairs[2 * i]) + ", " + std::to_string(pairs[2 * i + 1]) +
                              ") came back as " + mmcore::testing::show(longs(back[i])));
  }
}

TEST_CASE(loc_indices_to_boxes_rejects_indices_off_the_grid) {
  EXPECT_THROWS(g::loc_indices_to_boxes_cpu(long_tensor({0, 1024}).view({1, 2}), 32), c10::ValueError,
                "indices[0] = (0, 1024)");
  EXPECT_THROWS(g::loc_indices_to_boxes_cpu(long_tensor({-1, 3}), 32), c10::ValueError, "grid");
  EXPECT_THROWS(g::loc_indices_to_boxes_cpu(double_tensor({0.0, 3.0}), 32), c10::TypeError, "integer");
  EXPECT_THROWS(g::loc_indices_to_boxes_cpu(at::zeros({3}, at::kLong), 32), c10::ValueError, "(..., 2)");
}

// ------------------------------------------------------------------------------------- op registration

TEST_CASE(cpu_kernels_are_registered_without_a_schema) {
  // codec.cpp registers CPU kernels for mmcore::* ops whose schemas Python defines (mmcore/ops/_library.py).
  // In this Python-free binary the registrations must still load, leaving schema-less ops with a CPU kernel.
  for (const char* name : {"mmcore::boxes_to_loc_indices", "mmcore::loc_indices_to_boxes"}) {
    const auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, ""));
    EXPECT(op.has_value());
    if (!op) continue;
    EXPECT(!op->hasSchema());
    EXPECT(op->hasKernelForDispatchKey(c10::DispatchKey::CPU));
  }
}
