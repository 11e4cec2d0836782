#pragma once
// The regular-expression subset that JSON Schema `pattern` accepts here (ECMA-262 syntax, as ajv
// reads it with the `u` flag), parsed into a tree over code-point classes. What it takes:
// literals and escapes (\n \r \t \f \v \0 \xHH \uHHHH \u{H..} and escaped syntax characters), the
// class escapes \d \D \w \W \s \S, `.` (any character but a line terminator), classes [...] and
// [^...] with ranges, groups (...), (?:...) and (?<name>...), alternation, the quantifiers * + ?
// {n} {n,} {n,m} (lazy forms match the same strings), and anchors ^ and $ at the start and end of
// the whole pattern or of its top-level alternatives. A pattern matches anywhere in the string
// unless anchored, as ECMA-262's RegExp.test does. Anything else (backreferences, lookaround,
// word boundaries, \p{..}, anchors inside) is refused with an m1::Error naming it.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "structured/codepoint_set.h"

namespace m1::structured {

struct RegexNode {
  enum class Kind { kSet, kConcat, kAlt, kRepeat };
  Kind kind = Kind::kConcat;  // a concatenation of nothing is the empty string
  CodepointSet set;           // kSet
  std::vector<RegexNode> items;
  int32_t min = 0, max = -1;  // kRepeat of items[0]; max -1: unbounded

  static RegexNode of_set(CodepointSet set) {
    RegexNode n;
    n.kind = Kind::kSet;
    n.set = std::move(set);
    return n;
  }
  static RegexNode concat(std::vector<RegexNode> items) {
    RegexNode n;
    n.items = std::move(items);
    return n;
  }
  static RegexNode alt(std::vector<RegexNode> items) {
    RegexNode n;
    n.kind = Kind::kAlt;
    n.items = std::move(items);
    return n;
  }
  static RegexNode repeat(RegexNode item, int32_t min, int32_t max) {
    RegexNode n;
    n.kind = Kind::kRepeat;
    n.items.push_back(std::move(item));
    n.min = min;
    n.max = max;
    return n;
  }
};

// The most a quantifier may count: {n,m} with n or m above it is refused.
constexpr int32_t kMaxRepeat = 10000;

// The strings `pattern` matches, whole (unanchored sides padded with any characters). Throws
// m1::Error "pattern: ..." naming what is unsupported or malformed and where.
RegexNode parse_pattern(std::string_view pattern);

// A regex literal (escaped), for building languages from fixed text.
RegexNode literal(std::u32string_view text);

// UTF-8 to code points; throws m1::Error "`what`: invalid UTF-8" on bad input.
std::u32string decode_utf8(std::string_view text, const char* what);
void append_utf8(std::string& out, char32_t c);

}  // namespace m1::structured
