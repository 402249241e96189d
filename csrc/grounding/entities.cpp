#include "entities.h"

#include <algorithm>
#include <stdexcept>

#include "unicode_tables.h"

namespace mmcore::grounding {
namespace {

template <size_t N>
const unicode::Range* find_range(const unicode::Range (&table)[N], uint32_t cp) {
  const unicode::Range* it =
      std::upper_bound(table, table + N, cp, [](uint32_t v, const unicode::Range& r) { return v < r.lo; });
  if (it == table) return nullptr;
  --it;
  return cp <= it->hi ? it : nullptr;
}

// Value 0..9 of a Unicode decimal digit, or -1.
inline int digit_value(char32_t c) {
  if (c >= U'0' && c <= U'9') return static_cast<int>(c - U'0');
  if (c < 0x80) return -1;
  const unicode::Range* r = find_range(unicode::kDecimalDigits, static_cast<uint32_t>(c));
  return r ? static_cast<int>((static_cast<uint32_t>(c) - r->lo) % 10) : -1;
}

inline bool is_space(char32_t c) {
  if (c < 0x80) return (c >= 0x9 && c <= 0xD) || (c >= 0x1C && c <= 0x20);
  return find_range(unicode::kWhitespace, static_cast<uint32_t>(c)) != nullptr;
}

class Cursor {
 public:
  explicit Cursor(std::u32string_view t) : t_(t) {}

  bool literal(size_t& pos, const char* lit) const {
    size_t p = pos;
    for (const char* c = lit; *c; ++c, ++p) {
      if (p >= t_.size() || t_[p] != static_cast<char32_t>(*c)) return false;
    }
    pos = p;
    return true;
  }

  // `<patch_index_\d+>`; sets overflow when the digits exceed int64 (the match itself still stands).
  bool patch_index(size_t& pos, int64_t& value, bool& overflow) const {
    size_t p = pos;
    if (!literal(p, "<patch_index_")) return false;
    size_t first = p;
    int64_t v = 0;
    for (int d; p < t_.size() && (d = digit_value(t_[p])) >= 0; ++p) {
      if (v > (INT64_MAX - d) / 10) overflow = true;
      else v = v * 10 + d;
    }
    if (p == first || !literal(p, ">")) return false;
    pos = p;
    value = v;
    return true;
  }

  // `<object>PAIR(</delimiter_of_multi_objects/>PAIR)*</object>` starting at pos.
  bool object(size_t& pos, std::vector<std::pair<int64_t, int64_t>>& pairs, bool& overflow) const {
    size_t p = pos;
    pairs.clear();
    if (!literal(p, "<object>")) return false;
    while (true) {
      int64_t ul, lr;
      if (!patch_index(p, ul, overflow) || !patch_index(p, lr, overflow)) return false;
      pairs.emplace_back(ul, lr);
      if (literal(p, "</object>")) break;
      if (!literal(p, "</delimiter_of_multi_objects/>")) return false;
    }
    pos = p;
    return true;
  }

 private:
  std::u32string_view t_;
};

}  // namespace

Box cell_pair_to_box(int64_t ul, int64_t lr, int64_t num_bins) {
  // NOTE: the operations and their order follow the Python decoder exactly (int -> double conversions,
  // `a * c + c`, `a * c + c / 2`) so results are bit-identical; the build disables FMA contraction.
  const double cell = 1.0 / static_cast<double>(num_bins);
  const int64_t ux = ul % num_bins, uy = ul / num_bins, lx = lr % num_bins, ly = lr / num_bins;
  if (ul == lr || ux == lx || uy == ly) {
    return {static_cast<double>(ux) * cell, static_cast<double>(uy) * cell, static_cast<double>(lx) * cell + cell,
            static_cast<double>(ly) * cell + cell};
  }
  const double half = cell / 2;
  return {static_cast<double>(ux) * cell + half, static_cast<double>(uy) * cell + half,
          static_cast<double>(lx) * cell + half, static_cast<double>(ly) * cell + half};
}

Extraction extract_entities(std::u32string_view text, int64_t num_bins) {
  if (num_bins < 1) throw std::invalid_argument("num_bins must be >= 1");
  Extraction out;
  const size_t n = text.size();

  // 1. Tag removal, `<.*?>` scanned left to right. Removed intervals are kept (sorted) so that the
  //    stripped length of any prefix text[:s] is s minus the removed lengths that end at or before s:
  //    a removal straddling s cannot happen in the prefix, and none follows it there (see NOTE below).
  std::vector<size_t> removed_end;     // exclusive end of each removed interval
  std::vector<size_t> removed_prefix;  // removed characters up to and including each interval
  // NOTE: capacities up front: Kosmos-2 output has dozens of tags per string, and vector growth was a visible
  // share of the batch parser's time (malloc/free) in profiles.
  removed_end.reserve(64);
  removed_prefix.reserve(64);
  std::u32string stripped;
  stripped.reserve(n);
  size_t total_removed = 0;
  for (size_t i = 0; i < n;) {
    if (text[i] != U'<') {
      stripped.push_back(text[i++]);
      continue;
    }
    size_t j = i + 1;
    while (j < n && text[j] != U'>' && text[j] != U'\n') ++j;
    if (j < n && text[j] == U'>') {
      total_removed += j + 1 - i;
      removed_end.push_back(j + 1);
      removed_prefix.push_back(total_removed);
      i = j + 1;
    } else {
      // No '>' before the line ends: neither this '<' nor any '<' up to j can start a tag.
      stripped.append(text.substr(i, j - i));
      i = j;
    }
  }
  // NOTE: for a prefix text[:s], a tag of the full text starting at a < s and ending after s has no '>'
  // in [a, s), so the prefix keeps text[a:s] untouched; tags ending at or before s are removed in both.
  auto stripped_prefix_len = [&](size_t s) -> int64_t {
    auto it = std::upper_bound(removed_end.begin(), removed_end.end(), s);
    size_t k = static_cast<size_t>(it - removed_end.begin());
    return static_cast<int64_t>(s - (k ? removed_prefix[k - 1] : 0));
  };

  size_t lead = 0;
  while (lead < stripped.size() && is_space(stripped[lead])) ++lead;
  size_t stop = stripped.size();
  while (stop > lead && is_space(stripped[stop - 1])) --stop;
  out.clean_text = stripped.substr(lead, stop - lead);
  const int64_t lead_i = static_cast<int64_t>(lead);

  // 2. Entities, leftmost-first, non-overlapping, like re.finditer.
  out.entities.reserve(8);
  Cursor cur(text);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  bool overflow = false;
  for (size_t p = 0; p < n;) {
    if (text[p] != U'<') {
      ++p;
      continue;
    }
    size_t q = p, name_begin = 0, name_end = 0;
    bool has_phrase = false, matched = false;
    if (cur.literal(q, "<phrase>")) {
      name_begin = q;
      while (q < n && text[q] != U'<') ++q;
      name_end = q;
      if (name_end > name_begin && cur.literal(q, "</phrase>") && cur.object(q, pairs, overflow)) {
        has_phrase = matched = true;
      }
    }
    if (!matched) {
      q = p;
      matched = cur.object(q, pairs, overflow);
    }
    if (!matched) {
      ++p;
      continue;
    }
    if (has_phrase) {
      Entity e;
      e.has_phrase = true;
      size_t b = name_begin, f = name_end;
      while (b < name_end && is_space(text[b])) ++b;
      while (f > name_begin && is_space(text[f - 1])) --f;
      const int64_t name_lead = static_cast<int64_t>(b - name_begin);
      const int64_t name_trail = static_cast<int64_t>(name_end - f);
      e.name_begin = b;
      e.name_end = std::max(b, f);
      e.start = stripped_prefix_len(name_begin) - lead_i + name_lead;
      e.end = stripped_prefix_len(name_end) - lead_i - name_trail;
      e.boxes.reserve(pairs.size());
      for (auto& pr : pairs) e.boxes.push_back(cell_pair_to_box(pr.first, pr.second, num_bins));
      e.cells = pairs;
      out.entities.push_back(std::move(e));
    } else {
      const int64_t s = stripped_prefix_len(p) - lead_i;
      for (auto& pr : pairs) {
        Entity e;
        e.ul = pr.first;
        e.lr = pr.second;
        e.start = e.end = s;
        e.boxes.push_back(cell_pair_to_box(pr.first, pr.second, num_bins));
        e.cells.push_back(pr);
        out.entities.push_back(std::move(e));
      }
    }
    p = q;
  }
  out.ok = !overflow;
  return out;
}

std::u32string utf8_to_u32(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + len > s.size()) throw std::invalid_argument("invalid UTF-8 at byte " + std::to_string(i));
    char32_t cp = len == 1 ? c : c & (0x7F >> len);
    for (int k = 1; k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) throw std::invalid_argument("invalid UTF-8 at byte " + std::to_string(i + k));
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr char32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      throw std::invalid_argument("invalid UTF-8 code point at byte " + std::to_string(i));
    }
    out.push_back(cp);
    i += len;
  }
  return out;
}

std::string u32_to_utf8(const std::u32string& s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t cp : s) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  return out;
}

}  // namespace mmcore::grounding
