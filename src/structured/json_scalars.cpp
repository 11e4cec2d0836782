#include "structured/json_scalars.h"

#include <algorithm>
#include <string>

#include "m1/error.h"

namespace m1::structured {
namespace {

RegexNode chars(char32_t lo, char32_t hi) { return RegexNode::of_set(CodepointSet::range(lo, hi)); }
RegexNode text(const std::string& ascii) { return literal(std::u32string(ascii.begin(), ascii.end())); }
RegexNode seq(std::vector<RegexNode> items) { return RegexNode::concat(std::move(items)); }
RegexNode any_of(std::vector<RegexNode> items) {
  if (items.size() == 1) return std::move(items[0]);
  return RegexNode::alt(std::move(items));
}
RegexNode optional(RegexNode node) { return RegexNode::repeat(std::move(node), 0, 1); }
RegexNode digit() { return chars('0', '9'); }
RegexNode nothing() { return RegexNode::of_set(CodepointSet()); }

// Digits are bounded so that every number reads back finite in JavaScript and exact as a 64-bit
// integer: at most 18 before the point and 18 after it, exponents of at most two digits.
constexpr int32_t kMaxDigits = 18;
constexpr uint64_t kMaxMagnitude = 999'999'999'999'999'999ULL;


// Equal-length decimal strings a <= b: every string of that length between them.
RegexNode same_length_range(const std::string& a, const std::string& b) {
  if (a.empty()) return seq({});
  const size_t rest = a.size() - 1;
  const bool full_rest = a.find_first_not_of('0', 1) == std::string::npos && b.find_first_not_of('9', 1) == std::string::npos;
  if (full_rest) return seq({chars(char32_t(a[0]), char32_t(b[0])), RegexNode::repeat(digit(), int32_t(rest), int32_t(rest))});
  if (a[0] == b[0]) return seq({text(a.substr(0, 1)), same_length_range(a.substr(1), b.substr(1))});
  std::vector<RegexNode> options;
  options.push_back(seq({text(a.substr(0, 1)), same_length_range(a.substr(1), std::string(rest, '9'))}));
  if (a[0] + 1 <= b[0] - 1) options.push_back(seq({chars(char32_t(a[0] + 1), char32_t(b[0] - 1)), RegexNode::repeat(digit(), int32_t(rest), int32_t(rest))}));
  options.push_back(seq({text(b.substr(0, 1)), same_length_range(std::string(rest, '0'), b.substr(1))}));
  return any_of(std::move(options));
}

uint64_t power_of_ten(size_t digits) {
  uint64_t p = 1;
  for (size_t i = 0; i < digits; ++i) p *= 10;
  return p;
}

// Unsigned integers in [lo, hi] (hi absent: up to kMaxMagnitude) without leading zeros.
RegexNode unsigned_range(uint64_t lo, std::optional<uint64_t> hi) {
  if (!hi || *hi > kMaxMagnitude) hi = std::max(lo, kMaxMagnitude);
  if (*hi < lo) return nothing();
  const size_t lo_digits = std::to_string(lo).size();
  const size_t hi_digits = hi ? std::to_string(*hi).size() : lo_digits;
  std::vector<RegexNode> options;
  for (size_t digits = lo_digits; digits <= hi_digits; ++digits) {
    const uint64_t first = digits == 1 ? 0 : power_of_ten(digits - 1);
    const uint64_t last = digits >= 20 ? UINT64_MAX : power_of_ten(digits) - 1;
    const uint64_t from = std::max(lo, first);
    const uint64_t to = hi ? std::min(*hi, last) : last;
    if (from <= to) options.push_back(same_length_range(std::to_string(from), std::to_string(to)));
  }
  return options.empty() ? nothing() : any_of(std::move(options));
}

uint64_t magnitude(int64_t value) { return value < 0 ? uint64_t(-(value + 1)) + 1 : uint64_t(value); }

RegexNode fraction() { return optional(seq({text("."), RegexNode::repeat(digit(), 1, kMaxDigits)})); }
RegexNode zero_fraction() { return optional(seq({text("."), RegexNode::repeat(text("0"), 1, kMaxDigits)})); }

// Non-negative decimals i.f with i in [lo, hi_exclusive) and any fraction, then hi itself with a
// zero fraction: the values in [lo, hi]. Unbounded above when hi is absent.
RegexNode decimal_range(uint64_t lo, std::optional<uint64_t> hi) {
  std::vector<RegexNode> options;
  if (!hi) return seq({unsigned_range(lo, std::nullopt), fraction()});  // capped by unsigned_range
  if (*hi >= 1 && lo <= *hi - 1) options.push_back(seq({unsigned_range(lo, *hi - 1), fraction()}));
  if (*hi >= lo) options.push_back(seq({text(std::to_string(*hi)), zero_fraction()}));
  return options.empty() ? nothing() : any_of(std::move(options));
}

// The patterns of the supported formats (ajv-formats' full checks: real calendar dates, hours
// below 24; date-time and time always with a time zone).
std::string format_pattern(const std::string& format) {
  const std::string leap_year = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)";
  const std::string date = "([0-9]{4}-(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|[0-9]{4}-(0[469]|11)-(0[1-9]|[12][0-9]|30)|"
                           "[0-9]{4}-02-(0[1-9]|1[0-9]|2[0-8])|" + leap_year + "-02-29)";
  const std::string time = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])";
  if (format == "date") return "^" + date + "$";
  if (format == "time") return "^" + time + "$";
  if (format == "date-time") return "^" + date + "T" + time + "$";
  if (format == "uuid") return "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
  if (format == "email") {
    const std::string atom = "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]+";
    const std::string label = "[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?";
    return "^" + atom + "(\\." + atom + ")*@(" + label + "\\.)+" + label + "$";
  }
  fail("format '{}' is not supported (supported: {})", format, kSupportedFormats);
}

}  // namespace

bool is_supported_format(const std::string& format) {
  return format == "date-time" || format == "date" || format == "time" || format == "uuid" || format == "email";
}

namespace {

// Values in bounds as a non-negative part and a negated one, each written by `magnitudes(lo, hi)`
// (hi absent: unbounded); `least_negative` is the smallest magnitude after a '-'.
template <class Magnitudes>
RegexNode signed_language(const IntegerBounds& bounds, uint64_t least_negative, Magnitudes magnitudes) {
  if (bounds.min && bounds.max && *bounds.min > *bounds.max) return nothing();
  std::vector<RegexNode> options;
  if (!bounds.max || *bounds.max >= 0)
    options.push_back(magnitudes(bounds.min && *bounds.min > 0 ? uint64_t(*bounds.min) : 0,
                                 bounds.max ? std::optional<uint64_t>(uint64_t(*bounds.max)) : std::nullopt));
  if (!bounds.min || *bounds.min < 0) {
    const uint64_t smallest = bounds.max && *bounds.max < 0 ? magnitude(*bounds.max) : least_negative;
    const std::optional<uint64_t> largest = bounds.min ? std::optional<uint64_t>(magnitude(*bounds.min)) : std::nullopt;
    options.push_back(seq({text("-"), magnitudes(smallest, largest)}));
  }
  return any_of(std::move(options));
}

}  // namespace

RegexNode integer_language(const IntegerBounds& bounds) {
  return signed_language(bounds, 1, unsigned_range);  // no "-0"
}

RegexNode number_language(const IntegerBounds& bounds) {
  if (!bounds.min && !bounds.max) {
    const RegexNode integer = any_of({text("0"), seq({chars('1', '9'), RegexNode::repeat(digit(), 0, kMaxDigits - 1)})});
    const RegexNode exponent = optional(seq({any_of({text("e"), text("E")}), optional(any_of({text("+"), text("-")})),
                                             RegexNode::repeat(digit(), 1, 2)}));
    return seq({optional(text("-")), integer, fraction(), exponent});
  }
  return signed_language(bounds, 0, decimal_range);  // -(i.f) for i.f in [max(-hi, 0), -lo]
}

CharNfa string_language(const StringConstraints& c, const char* what) {
  std::vector<CharNfa> parts;
  if (c.format) parts.push_back(nfa_from_regex(parse_pattern(format_pattern(*c.format)), what));
  for (const std::string& pattern : c.patterns) {
    parts.push_back(nfa_from_regex(parse_pattern(pattern), what));
    // Refused here, not while matching: a pattern whose deterministic automaton blows up (past
    // kPatternStatesFloor and twice its NFA, or past kPatternEntries) would have the lexer spend
    // seconds building it, and pass its bound mid-generation. Counted repetitions grow the NFA as
    // much and pass.
    const size_t max_states = std::max(kPatternStatesFloor, 2 * parts.back().states.size());
    const DeterministicSize size = deterministic_size(parts.back(), max_states, kPatternEntries);
    if (size.states > max_states || size.entries > kPatternEntries)
      fail("{}: pattern '{}' is too complex to match: its deterministic automaton passes {} states, or {} NFA "
           "states over all of them",
           what, pattern, max_states, kPatternEntries);
  }
  if (parts.empty())
    parts.push_back(nfa_from_regex(RegexNode::repeat(RegexNode::of_set(CodepointSet::all()), 0, -1), what));
  CharNfa language = std::move(parts[0]);
  for (size_t i = 1; i < parts.size(); ++i) language = intersect(language, parts[i], what);
  if (c.min_length > 0 || c.max_length >= 0) language = with_length(language, c.min_length, c.max_length, what);
  return language;
}

}  // namespace m1::structured
