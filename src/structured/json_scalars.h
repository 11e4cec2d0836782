#pragma once
// The regular languages of JSON scalars: numbers (any, or within integer bounds), integers within
// bounds, and the decoded contents of strings under formats, patterns and length bounds. Strings
// are code-point languages here; the grammar spells them with JSON escapes.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "structured/char_nfa.h"

namespace m1::structured {

// Formats a string may be held to, exactly as ajv-formats checks them in full mode.
inline constexpr const char* kSupportedFormats = "date-time, date, time, uuid, email";
bool is_supported_format(const std::string& format);

// Bounds of an integer language; absent sides are unbounded.
struct IntegerBounds {
  std::optional<int64_t> min, max;
};

// Integers in bounds, written as JSON writes them (no leading zeros, no "-0"), of at most 18
// digits where a side is unbounded.
RegexNode integer_language(const IntegerBounds& bounds);
// Numbers: any JSON number when unbounded; else decimals without exponent whose value lies in
// the integer bounds. At most 18 digits before the point and 18 after it, and two in an
// exponent, so that every number is finite in JavaScript.
RegexNode number_language(const IntegerBounds& bounds);

struct StringConstraints {
  int64_t min_length = 0, max_length = -1;  // code points; -1: no bound
  std::vector<std::string> patterns;         // all must match
  std::optional<std::string> format;
};

// A pattern whose deterministic automaton passes this many states and twice its NFA's, or holds
// more than kPatternEntries NFA states over all its states, is refused.
constexpr size_t kPatternStatesFloor = 10000;
constexpr size_t kPatternEntries = 500000;

// The decoded string values that satisfy every constraint. Throws m1::Error naming `what` when a
// pattern is unsupported or the language grows too large.
CharNfa string_language(const StringConstraints& constraints, const char* what);

}  // namespace m1::structured
