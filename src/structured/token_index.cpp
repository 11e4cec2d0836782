#include "structured/token_index.h"

#include <algorithm>
#include <string>

#include "m1/error.h"

namespace m1::structured {
namespace {

// Characters of `bytes` when it is whole UTF-8 with none kUnicodeText leaves out, else -1.
int32_t utf8_characters(std::string_view bytes) {
  int32_t count = 0;
  for (size_t i = 0; i < bytes.size();) {
    const auto b = static_cast<uint8_t>(bytes[i]);
    size_t extra;
    if (b < 0x80) extra = 0;
    else if (b >= 0xC2 && b <= 0xDF) extra = 1;
    else if (b >= 0xE0 && b <= 0xEF) extra = 2;
    else if (b >= 0xF0 && b <= 0xF4) extra = 3;
    else return -1;
    if (extra > 0 && i + extra >= bytes.size()) return -1;
    char32_t c = extra == 0 ? b : extra == 1 ? (b & 0x1F) : extra == 2 ? (b & 0x0F) : (b & 0x07);
    for (size_t k = 1; k <= extra; ++k) {
      const auto cont = static_cast<uint8_t>(bytes[i + k]);
      if ((cont & 0xC0) != 0x80) return -1;
      c = (c << 6) | (cont & 0x3F);
    }
    const char32_t min = extra == 1 ? 0x80 : extra == 2 ? 0x800 : extra == 3 ? 0x10000 : 0;
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF) || outside_unicode_text(c)) return -1;
    i += extra + 1;
    ++count;
  }
  return count;
}

// The text class of a token's bytes and its length in characters; kTextClassCount for none.
std::pair<int32_t, int32_t> classify(std::string_view bytes) {
  const auto all = [&](size_t from, TextClass c) {
    return std::all_of(bytes.begin() + from, bytes.end(), [&](char ch) { return in_text_class(c, uint8_t(ch)); });
  };
  const int32_t n = int32_t(bytes.size());
  if (all(0, kLower)) return {kLower, n};
  if (all(0, kLetters)) return {kLetters, n};
  if (n > 1 && bytes[0] == ' ' && all(1, kLower)) return {kSpaceLower, n};
  if (n > 1 && bytes[0] == ' ' && all(1, kLetters)) return {kSpaceLetters, n};
  if (all(0, kDigits)) return {kDigits, n};
  if (all(0, kAsciiText)) return {kAsciiText, n};
  if (all(0, kAsciiDigits)) return {kAsciiDigits, n};
  const bool ascii_ok = std::all_of(bytes.begin(), bytes.end(), [](char ch) {
    return uint8_t(ch) >= 0x80 || in_text_class(kUnicodeText, uint8_t(ch));
  });
  const int32_t chars = utf8_characters(bytes);
  if (ascii_ok && chars > 0) return {kUnicodeText, chars};
  return {kTextClassCount, 0};
}

std::vector<TrieNode> build_trie(std::vector<std::pair<std::string, int32_t>> tokens) {
  std::sort(tokens.begin(), tokens.end());
  std::vector<TrieNode> nodes;
  std::vector<int32_t> open;  // the node at each depth of the current path
  std::string_view previous;
  for (const auto& [bytes, id] : tokens) {
    size_t common = 0;
    while (common < previous.size() && common < bytes.size() && previous[common] == bytes[common]) ++common;
    while (open.size() > common) {
      nodes[size_t(open.back())].end = int32_t(nodes.size());
      open.pop_back();
    }
    for (size_t d = common; d < bytes.size(); ++d) {
      nodes.push_back({static_cast<uint8_t>(bytes[d]), uint8_t(d + 1), -1, 0});
      open.push_back(int32_t(nodes.size() - 1));
    }
    nodes[size_t(open.back())].token = id;
    previous = bytes;
  }
  while (!open.empty()) {
    nodes[size_t(open.back())].end = int32_t(nodes.size());
    open.pop_back();
  }
  return nodes;
}

}  // namespace

TokenIndex::TokenIndex(const Tokenizer& tokenizer, int64_t rows) : rows_(rows), codes_(size_t(rows), 0) {
  static_assert(32 * kTextClassCount + kMaxRunLength < 65536, "a token's code fits 16 bits");
  std::vector<std::vector<std::pair<std::string, int32_t>>> by_class(kTextClassCount + 1);
  const int64_t known = std::min<int64_t>(rows, tokenizer.vocab_size());
  for (int32_t id = 0; id < known; ++id) {
    if (tokenizer.is_special(id)) continue;
    std::string bytes;
    try {
      bytes = tokenizer.token_bytes(id);
    } catch (const Error&) {
      continue;  // an id the vocabulary does not use
    }
    if (tokenizer.is_added(id)) {
      for (int32_t m = 0; m < kMarkerCount; ++m)
        if (bytes == kMarkerText[size_t(m)]) markers_.emplace_back(id, Marker(m));
      continue;
    }
    if (bytes.empty() || bytes.size() > 255) continue;
    auto [text_class, length] = classify(bytes);
    if (text_class < kTextClassCount && length > kMaxRunLength) text_class = kTextClassCount;
    if (text_class < kTextClassCount) {
      codes_[size_t(id)] = uint16_t(32 * (text_class + 1) + length);
      longest_[size_t(text_class)] = std::max(longest_[size_t(text_class)], length);
    }
    by_class[size_t(text_class)].emplace_back(std::move(bytes), id);
  }
  for (auto& tokens : by_class) tries_.push_back(build_trie(std::move(tokens)));
  // Per class, the tokens of at most each length.
  up_to_length_.assign(kTextClassCount, std::vector<std::vector<uint32_t>>(kMaxRunLength + 1, std::vector<uint32_t>(size_t(words()), 0)));
  for (int64_t id = 0; id < rows_; ++id) {
    const uint16_t code = codes_[size_t(id)];
    if (code == 0) continue;
    for (int32_t length = code % 32; length <= kMaxRunLength; ++length)
      up_to_length_[size_t(code / 32 - 1)][size_t(length)][size_t(id / 32)] |= 1u << (id % 32);
  }
}

void TokenIndex::copy_class_tokens(const std::array<int32_t, kTextClassCount>& runs, std::span<uint32_t> out) const {
  uint64_t key = 0;
  for (int32_t run : runs) key = key * 33 + uint64_t(std::clamp(run, 0, kMaxRunLength));
  {
    std::lock_guard lock(mutex_);
    if (const auto found = combined_.find(key); found != combined_.end()) {
      std::copy(found->second.begin(), found->second.end(), out.begin());
      return;
    }
  }
  std::fill(out.begin(), out.end(), 0u);
  for (int32_t c = 0; c < kTextClassCount; ++c) {
    if (runs[size_t(c)] < 1) continue;
    const std::vector<uint32_t>& mask = up_to_length_[size_t(c)][size_t(std::min(runs[size_t(c)], kMaxRunLength))];
    for (size_t w = 0; w < out.size(); ++w) out[w] |= mask[w];
  }
  std::lock_guard lock(mutex_);
  if (combined_.size() >= kCombinedKept) combined_.clear();  // the common ones come back soon
  combined_.emplace(key, std::vector<uint32_t>(out.begin(), out.end()));
}

}  // namespace m1::structured
