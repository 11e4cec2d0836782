#pragma once
// Documents drawn from a grammar byte by byte, for tests and fuzz targets that check what the
// grammar engine produces against an independent validator: at each step a random byte among
// those the matcher accepts (closing brackets and quotes favoured, so that documents end), until
// the output may end and the draw says so, or `limit` bytes.

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "structured/matcher.h"

namespace m1::testing {

// The document, or nullopt when none ended within `limit` bytes.
inline std::optional<std::string> walk_document(structured::Matcher& matcher, std::mt19937_64& rng, size_t limit) {
  std::string text;
  std::vector<uint8_t> allowed, closing;
  while (text.size() < limit) {
    const bool can_end = matcher.can_end();
    if (can_end && (matcher.must_end() || rng() % 4 == 0)) return text;
    allowed.clear();
    closing.clear();
    for (int b = 0; b < 256; ++b) {
      int32_t context = structured::Matcher::kBase, state = matcher.lexer_state();
      if (!matcher.step(context, state, b)) continue;
      allowed.push_back(uint8_t(b));
      if (b == '"' || b == ']' || b == '}') closing.push_back(uint8_t(b));
    }
    if (allowed.empty()) return can_end ? std::optional<std::string>(text) : std::nullopt;
    const std::vector<uint8_t>& from = !closing.empty() && rng() % 3 == 0 ? closing : allowed;
    const uint8_t b = from[rng() % from.size()];
    if (!matcher.advance(b)) return std::nullopt;  // refused after the mask-style step allowed it
    text += char(b);
  }
  return std::nullopt;
}

}  // namespace m1::testing
