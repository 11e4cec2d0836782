#pragma once
// Sets of Unicode scalar values as sorted, disjoint, non-adjacent ranges: the character classes
// of patterns and of the JSON languages. Surrogates (U+D800..U+DFFF) are never members: no valid
// UTF-8 text holds them, and JSON text here never escapes them.

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace m1::structured {

constexpr char32_t kMaxCodepoint = 0x10FFFF;
constexpr char32_t kSurrogateFirst = 0xD800, kSurrogateLast = 0xDFFF;

class CodepointSet {
 public:
  using Range = std::pair<char32_t, char32_t>;  // inclusive

  CodepointSet() = default;
  static CodepointSet of(char32_t c) { return range(c, c); }
  static CodepointSet range(char32_t lo, char32_t hi) {
    CodepointSet s;
    s.add(lo, hi);
    return s;
  }
  static CodepointSet all() { return range(0, kMaxCodepoint); }

  void add(char32_t lo, char32_t hi) {
    if (lo > hi) return;
    // Surrogates split the range.
    if (lo <= kSurrogateLast && hi >= kSurrogateFirst) {
      if (lo < kSurrogateFirst) insert(lo, kSurrogateFirst - 1);
      if (hi > kSurrogateLast) insert(kSurrogateLast + 1, hi);
      return;
    }
    insert(lo, hi);
  }
  void add(const CodepointSet& other) {
    for (auto [lo, hi] : other.ranges_) insert(lo, hi);
  }

  CodepointSet complement() const {
    CodepointSet out;
    char32_t next = 0;
    for (auto [lo, hi] : ranges_) {
      if (lo > next) out.add(next, lo - 1);
      next = hi + 1;
    }
    if (next <= kMaxCodepoint) out.add(next, kMaxCodepoint);
    return out;
  }
  CodepointSet intersect(const CodepointSet& other) const {
    CodepointSet out;
    size_t i = 0, j = 0;
    while (i < ranges_.size() && j < other.ranges_.size()) {
      const char32_t lo = std::max(ranges_[i].first, other.ranges_[j].first);
      const char32_t hi = std::min(ranges_[i].second, other.ranges_[j].second);
      if (lo <= hi) out.ranges_.push_back({lo, hi});
      if (ranges_[i].second < other.ranges_[j].second) ++i; else ++j;
    }
    return out;
  }
  CodepointSet minus(const CodepointSet& other) const { return intersect(other.complement()); }

  bool empty() const { return ranges_.empty(); }
  bool contains(char32_t c) const {
    auto it = std::upper_bound(ranges_.begin(), ranges_.end(), c,
                               [](char32_t value, const Range& r) { return value < r.first; });
    return it != ranges_.begin() && std::prev(it)->second >= c;
  }
  const std::vector<Range>& ranges() const { return ranges_; }
  bool operator==(const CodepointSet&) const = default;

 private:
  // Inserts [lo, hi] keeping the ranges sorted, disjoint and merged with their neighbours.
  void insert(char32_t lo, char32_t hi) {
    auto it = std::lower_bound(ranges_.begin(), ranges_.end(), lo,
                               [](const Range& r, char32_t value) { return r.second + 1 < value; });
    auto last = it;
    while (last != ranges_.end() && last->first <= hi + 1) {
      lo = std::min(lo, last->first);
      hi = std::max(hi, last->second);
      ++last;
    }
    it = ranges_.erase(it, last);
    ranges_.insert(it, {lo, hi});
  }

  std::vector<Range> ranges_;
};

}  // namespace m1::structured
