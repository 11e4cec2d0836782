#include "token_count.h"

#include <cctype>

namespace m1::bench {
namespace {

constexpr int64_t kKilo = 1024, kMega = 1024 * 1024;
// Far beyond any context a model takes, and far from overflowing the multiplications below.
constexpr int64_t kMaxCount = int64_t(1) << 40;

}  // namespace

std::optional<int64_t> parse_token_count(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  if (digits == 0 || digits > 12) return std::nullopt;
  const std::string suffix = text.substr(digits);
  int64_t unit = 1;
  if (suffix == "k" || suffix == "K")
    unit = kKilo;
  else if (suffix == "m" || suffix == "M")
    unit = kMega;
  else if (!suffix.empty())
    return std::nullopt;
  const int64_t count = std::stoll(text.substr(0, digits)) * unit;
  if (count > kMaxCount) return std::nullopt;
  return count;
}

std::string format_token_count(int64_t tokens) {
  if (tokens > 0 && tokens % kMega == 0) return std::to_string(tokens / kMega) + "m";
  if (tokens > 0 && tokens % kKilo == 0) return std::to_string(tokens / kKilo) + "k";
  return std::to_string(tokens);
}

}  // namespace m1::bench
