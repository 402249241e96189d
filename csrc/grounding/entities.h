// Grounded-text parsing: Kosmos-2 tag sequences -> clean text + entities with boxes.
//
// Semantics are those of transformers' `clean_text_and_extract_entities_with_bboxes` (Python `re` on `str`),
// reproduced on code points so that offsets are Python string indices:
//   * tags are removed as the regex `<.*?>` does (`.` excludes only '\n');
//   * entities are `(<phrase>[^<]+</phrase>)?<object>PAIR(</delimiter_of_multi_objects/>PAIR)*</object>`,
//     PAIR = `<patch_index_\d+><patch_index_\d+>`, with `\d` any Unicode decimal digit;
//   * spans are offsets in the tag-stripped *prefix* of the text, then shifted for `str.strip()`.
// No Python here, so the same code builds into the extension and the ctest executable.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mmcore::grounding {

struct Box {
  double x1, y1, x2, y2;
};

// (x1, y1, x2, y2) of a (top-left, bottom-right) cell pair on a num_bins x num_bins grid: cell edges when
// both corners share a cell, a row or a column, cell centres otherwise (the Kosmos-2 demo's decoder).
// Expects num_bins >= 1 and non-negative indices (callers check; the parser only produces those).
Box cell_pair_to_box(int64_t ul, int64_t lr, int64_t num_bins);

struct Entity {
  bool has_phrase = false;
  // Phrase entities: the stripped phrase occupies [name_begin, name_end) of the *input* text.
  size_t name_begin = 0, name_end = 0;
  // Phrase-less entities (one per box): the raw indices, for the name `<patch_index_{ul}><patch_index_{lr}>`.
  int64_t ul = 0, lr = 0;
  int64_t start = 0, end = 0;  // span in the clean text
  std::vector<Box> boxes;
  std::vector<std::pair<int64_t, int64_t>> cells;  // the (top-left, bottom-right) index pair of each box
};

struct Extraction {
  std::u32string clean_text;
  std::vector<Entity> entities;
  // False when an index does not fit in int64: the caller must use the reference parser (Python ints).
  bool ok = true;
};

Extraction extract_entities(std::u32string_view text, int64_t num_bins);

// UTF-8 convenience for C++ callers and tests (offsets stay in code points). utf8_to_u32 throws
// std::invalid_argument on malformed UTF-8 (bad continuation bytes, overlong forms, surrogates, > U+10FFFF).
std::u32string utf8_to_u32(const std::string& s);
std::string u32_to_utf8(const std::u32string& s);

}  // namespace mmcore::grounding
