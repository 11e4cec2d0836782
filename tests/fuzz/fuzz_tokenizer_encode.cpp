// Fuzzes encoding with the real MiniMax-M1 tokenizer: arbitrary bytes, added tokens matched and
// literal. Byte-level BPE loses nothing, so the tokens' bytes must spell the input again, and
// decode must return it when it is valid UTF-8. Literal encoding must never produce an added token:
// that is what keeps text a user typed from becoming control tokens.

#include "fuzz_support.h"

namespace {

// Well-formed UTF-8: no overlong forms, surrogates or code points past U+10FFFF.
bool is_utf8(std::string_view text) {
  constexpr char32_t kSmallest[] = {0, 0, 0x80, 0x800, 0x10000};  // by sequence length
  for (size_t i = 0; i < text.size();) {
    const auto lead = static_cast<uint8_t>(text[i]);
    const size_t length = lead < 0x80 ? 1 : lead >> 5 == 0x6 ? 2 : lead >> 4 == 0xE ? 3 : lead >> 3 == 0x1E ? 4 : 0;
    if (length == 0 || i + length > text.size()) return false;
    char32_t cp = length == 1 ? lead : lead & (0x7F >> length);
    for (size_t k = 1; k < length; ++k) {
      const auto byte = static_cast<uint8_t>(text[i + k]);
      if (byte >> 6 != 0x2) return false;
      cp = (cp << 6) | (byte & 0x3F);
    }
    if (cp < kSmallest[length] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += length;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  m1::fuzz::real_tokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const m1::Tokenizer& tokenizer = m1::fuzz::real_tokenizer();
  const std::string_view text = m1::fuzz::as_text(data, size);
  const bool utf8 = is_utf8(text);
  for (const auto added : {m1::AddedTokens::kMatch, m1::AddedTokens::kLiteral}) {
    m1::fuzz::must_not_throw([&] {
      const std::vector<int32_t> ids = tokenizer.encode(text, added);
      std::string bytes;
      for (const int32_t id : ids) {
        bytes += tokenizer.token_bytes(id);  // throws for an id outside the vocabulary
        if (added == m1::AddedTokens::kLiteral)
          m1::fuzz::check(!tokenizer.is_added(id), "literal text never encodes to an added token");
      }
      m1::fuzz::check(bytes == text, "the tokens' bytes spell the input");
      if (utf8) m1::fuzz::check(tokenizer.decode(ids) == text, "decode(encode(text)) == text");
    });
  }
  return 0;
}
