#include "structured/regex.h"

#include <fmt/format.h>

#include "m1/error.h"

namespace m1::structured {
namespace {

CodepointSet digits() { return CodepointSet::range('0', '9'); }
CodepointSet word_chars() {
  CodepointSet s = CodepointSet::range('a', 'z');
  s.add('A', 'Z');
  s.add('0', '9');
  s.add('_', '_');
  return s;
}
// ECMA-262 WhiteSpace and LineTerminator.
CodepointSet space_chars() {
  CodepointSet s = CodepointSet::range('\t', '\r');
  for (char32_t c : {U' ', U'\u00A0', U'\u1680', U'\u2028', U'\u2029', U'\u202F', U'\u205F', U'\u3000', U'\uFEFF'})
    s.add(c, c);
  s.add(0x2000, 0x200A);
  return s;
}
CodepointSet line_terminators() {
  CodepointSet s;
  for (char32_t c : {U'\n', U'\r', U'\u2028', U'\u2029'}) s.add(c, c);
  return s;
}

class Parser {
 public:
  explicit Parser(std::u32string text) : text_(std::move(text)) {}

  RegexNode parse() {
    std::vector<RegexNode> alternatives;
    for (;;) {
      alternatives.push_back(top_alternative());
      if (at_end()) break;
      expect(U'|');
    }
    return alternatives.size() == 1 ? std::move(alternatives[0]) : RegexNode::alt(std::move(alternatives));
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail("pattern: {} at character {}", what, pos_ + 1);
  }
  bool at_end() const { return pos_ >= text_.size(); }
  char32_t peek() const { return at_end() ? 0 : text_[pos_]; }
  char32_t take() {
    if (at_end()) error("unexpected end");
    return text_[pos_++];
  }
  void expect(char32_t c) {
    if (peek() != c || at_end()) error(fmt::format("expected '{}'", char(c)));
    ++pos_;
  }

  // A top-level alternative: anchors allowed at its ends; an unanchored side matches anything.
  RegexNode top_alternative() {
    const bool anchored_start = peek() == U'^' && !at_end();
    if (anchored_start) ++pos_;
    std::vector<RegexNode> items;
    bool anchored_end = false;
    while (!at_end() && peek() != U'|') {
      if (peek() == U'$') {
        ++pos_;
        if (!at_end() && peek() != U'|') error("'$' is supported only at the end of the pattern");
        anchored_end = true;
        break;
      }
      items.push_back(term());
    }
    const RegexNode any = RegexNode::repeat(RegexNode::of_set(CodepointSet::all()), 0, -1);
    if (!anchored_start) items.insert(items.begin(), any);
    if (!anchored_end) items.push_back(any);
    return RegexNode::concat(std::move(items));
  }

  RegexNode alternation() {
    std::vector<RegexNode> alternatives;
    for (;;) {
      std::vector<RegexNode> items;
      while (!at_end() && peek() != U'|' && peek() != U')') items.push_back(term());
      alternatives.push_back(RegexNode::concat(std::move(items)));
      if (peek() != U'|' || at_end()) break;
      ++pos_;
    }
    return alternatives.size() == 1 ? std::move(alternatives[0]) : RegexNode::alt(std::move(alternatives));
  }

  RegexNode term() {
    RegexNode node = atom();
    return quantified(std::move(node));
  }

  RegexNode quantified(RegexNode node) {
    if (at_end()) return node;
    int32_t min = 0, max = -1;
    switch (peek()) {
      case U'*': ++pos_; break;
      case U'+': ++pos_; min = 1; break;
      case U'?': ++pos_; max = 1; break;
      case U'{': {
        ++pos_;
        min = number();
        max = min;
        if (peek() == U',') {
          ++pos_;
          max = peek() == U'}' ? -1 : number();
        }
        expect(U'}');
        if (max >= 0 && max < min) error("quantifier {n,m} with m < n");
        break;
      }
      default: return node;
    }
    if (!at_end() && peek() == U'?') ++pos_;  // lazy: the same strings match
    if (!at_end() && (peek() == U'*' || peek() == U'+' || peek() == U'?' || peek() == U'{'))
      error("nothing to repeat");
    return RegexNode::repeat(std::move(node), min, max);
  }

  int32_t number() {
    if (at_end() || peek() < U'0' || peek() > U'9') error("bad quantifier: expected a number");
    int64_t value = 0;
    while (!at_end() && peek() >= U'0' && peek() <= U'9') {
      value = value * 10 + (take() - U'0');
      if (value > kMaxRepeat) error(fmt::format("quantifier count above {}", kMaxRepeat));
    }
    return int32_t(value);
  }

  RegexNode atom() {
    const char32_t c = take();
    switch (c) {
      case U'.': return RegexNode::of_set(line_terminators().complement());
      case U'[': return RegexNode::of_set(char_class());
      case U'(': return group();
      case U'\\': return RegexNode::of_set(atom_escape());
      case U'^': case U'$': error("anchors (^, $) are supported only at the start and end of the pattern");
      case U'*': case U'+': case U'?': case U'{': error("nothing to repeat");
      case U')': error("unmatched ')'");
      case U']': case U'}': error(fmt::format("lone '{}'", char(c)));
      default: return RegexNode::of_set(CodepointSet::of(c));
    }
  }

  RegexNode group() {
    if (peek() == U'?') {
      ++pos_;
      const char32_t kind = take();
      if (kind == U'<' && peek() != U'=' && peek() != U'!') {
        while (take() != U'>') {
        }
      } else if (kind != U':') {
        error("lookaround and other (?...) groups are not supported");
      }
    }
    RegexNode inner = alternation();
    if (at_end() || peek() != U')') error("missing ')'");
    ++pos_;
    return inner;
  }

  // After a backslash outside a class.
  CodepointSet atom_escape() {
    const char32_t c = peek();
    if (c == U'b' || c == U'B') error("word boundaries (\\b, \\B) are not supported");
    if (c >= U'1' && c <= U'9') error("backreferences are not supported");
    if (c == U'k') error("named backreferences are not supported");
    return escape();
  }

  // A character or class escape after a backslash (shared with classes).
  CodepointSet escape() {
    const char32_t c = take();
    switch (c) {
      case U'd': return digits();
      case U'D': return digits().complement();
      case U'w': return word_chars();
      case U'W': return word_chars().complement();
      case U's': return space_chars();
      case U'S': return space_chars().complement();
      case U'n': return CodepointSet::of(U'\n');
      case U'r': return CodepointSet::of(U'\r');
      case U't': return CodepointSet::of(U'\t');
      case U'f': return CodepointSet::of(U'\f');
      case U'v': return CodepointSet::of(U'\v');
      case U'0':
        if (peek() >= U'0' && peek() <= U'9' && !at_end()) error("octal escapes are not supported");
        return CodepointSet::of(0);
      case U'x': return CodepointSet::of(hex(2));
      case U'u': {
        if (peek() == U'{' && !at_end()) {
          ++pos_;
          char32_t value = 0;
          int count = 0;
          while (peek() != U'}' || at_end()) {
            value = value * 16 + hex(1);
            if (++count > 6 || value > kMaxCodepoint) error("\\u{...} beyond U+10FFFF");
          }
          ++pos_;
          if (count == 0) error("empty \\u{}");
          return code_point(value);
        }
        return code_point(hex(4));
      }
      case U'p': case U'P': error("Unicode property escapes (\\p{...}) are not supported");
      case U'c': error("control escapes (\\c) are not supported");
      default:
        if ((c >= U'a' && c <= U'z') || (c >= U'A' && c <= U'Z') || (c >= U'0' && c <= U'9'))
          error(fmt::format("unknown escape '\\{}'", char(c)));
        return CodepointSet::of(c);  // an escaped syntax character stands for itself
    }
  }

  CodepointSet code_point(char32_t value) {
    if (value >= kSurrogateFirst && value <= kSurrogateLast) error("surrogate code points are not supported");
    return CodepointSet::of(value);
  }

  char32_t hex(int digits) {
    char32_t value = 0;
    for (int i = 0; i < digits; ++i) {
      const char32_t c = take();
      int d;
      if (c >= U'0' && c <= U'9') d = int(c - U'0');
      else if (c >= U'a' && c <= U'f') d = int(c - U'a' + 10);
      else if (c >= U'A' && c <= U'F') d = int(c - U'A' + 10);
      else error("bad hexadecimal escape");
      value = value * 16 + char32_t(d);
    }
    return value;
  }

  // After '[': the class up to its ']'.
  CodepointSet char_class() {
    const bool negated = peek() == U'^' && !at_end();
    if (negated) ++pos_;
    CodepointSet set;
    while (peek() != U']' || at_end()) {
      bool single = false;
      const CodepointSet first = class_atom(single);
      if (peek() == U'-' && pos_ + 1 < text_.size() && text_[pos_ + 1] != U']') {
        ++pos_;
        bool single_last = false;
        const CodepointSet last = class_atom(single_last);
        if (!single || !single_last) error("a class range bound is a class escape");
        const char32_t lo = first.ranges()[0].first, hi = last.ranges()[0].first;
        if (lo > hi) error("class range out of order");
        set.add(lo, hi);
      } else {
        set.add(first);
      }
    }
    ++pos_;
    return negated ? set.complement() : set;
  }

  CodepointSet class_atom(bool& single) {
    const char32_t c = take();
    single = true;
    if (c != U'\\') return CodepointSet::of(c);
    const char32_t e = peek();
    if (e == U'b' && !at_end()) {  // backspace inside a class
      ++pos_;
      return CodepointSet::of(U'\b');
    }
    if (e == U'-' && !at_end()) {
      ++pos_;
      return CodepointSet::of(U'-');
    }
    single = !(e == U'd' || e == U'D' || e == U'w' || e == U'W' || e == U's' || e == U'S');
    return escape();
  }

  std::u32string text_;
  size_t pos_ = 0;
};

}  // namespace

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6));
    out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18));
    out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  }
}

std::u32string decode_utf8(std::string_view text, const char* what) {
  std::u32string out;
  size_t i = 0;
  while (i < text.size()) {
    const auto b = static_cast<unsigned char>(text[i]);
    int extra;
    char32_t c;
    if (b < 0x80) { c = b; extra = 0; }
    else if (b >= 0xC2 && b <= 0xDF) { c = b & 0x1F; extra = 1; }
    else if (b >= 0xE0 && b <= 0xEF) { c = b & 0x0F; extra = 2; }
    else if (b >= 0xF0 && b <= 0xF4) { c = b & 0x07; extra = 3; }
    else fail("{}: invalid UTF-8", what);
    for (int k = 1; k <= extra; ++k) {
      if (i + size_t(k) >= text.size()) fail("{}: invalid UTF-8", what);
      const auto cont = static_cast<unsigned char>(text[i + size_t(k)]);
      if ((cont & 0xC0) != 0x80) fail("{}: invalid UTF-8", what);
      c = (c << 6) | (cont & 0x3F);
    }
    const char32_t min = extra == 1 ? 0x80 : extra == 2 ? 0x800 : extra == 3 ? 0x10000 : 0;
    if (c < min || c > kMaxCodepoint || (c >= kSurrogateFirst && c <= kSurrogateLast))
      fail("{}: invalid UTF-8", what);
    out += c;
    i += size_t(extra) + 1;
  }
  return out;
}

RegexNode parse_pattern(std::string_view pattern) {
  return Parser(decode_utf8(pattern, "pattern")).parse();
}

RegexNode literal(std::u32string_view text) {
  std::vector<RegexNode> items;
  for (char32_t c : text) items.push_back(RegexNode::of_set(CodepointSet::of(c)));
  return RegexNode::concat(std::move(items));
}

}  // namespace m1::structured
