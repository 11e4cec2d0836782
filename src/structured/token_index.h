#pragma once
// A tokenizer's vocabulary arranged for token masks, built once per tokenizer: each token's
// bytes in a trie (depth-first order, so a refused prefix skips its whole subtree), one trie per
// text class and one for the rest, and each class token's length in characters. The model's
// marker tokens (<think> and the others) are inputs of their own; special tokens are left out
// (the end of output is asked of the matcher separately).

#include <array>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <span>
#include <utility>
#include <vector>

#include "m1/tokenizer.h"
#include "structured/byte_nfa.h"
#include "structured/text_classes.h"

namespace m1::structured {

struct TrieNode {
  uint8_t byte = 0;
  uint8_t depth = 0;   // 1 for a first byte
  int32_t token = -1;  // the token these bytes spell, if any
  int32_t end = 0;     // the index after this node's subtree
};

class TokenIndex {
 public:
  // `rows`: the width of the model's logits (ids at or beyond the tokenizer's size never match).
  TokenIndex(const Tokenizer& tokenizer, int64_t rows);

  int64_t rows() const { return rows_; }
  int64_t words() const { return (rows_ + 31) / 32; }
  // Tokens of a text class; kTextClassCount: every other token.
  const std::vector<TrieNode>& trie(int32_t text_class) const { return tries_[size_t(text_class)]; }
  std::span<const std::pair<int32_t, Marker>> markers() const { return markers_; }
  // The most characters a token of the class has.
  int32_t longest(int32_t text_class) const { return longest_[size_t(text_class)]; }
  // Writes to `out` (words() words) the bitmask of the class tokens no longer than runs[c]
  // characters (runs[c] < 1: none of class c). The masks of the runs met most are kept.
  void copy_class_tokens(const std::array<int32_t, kTextClassCount>& runs, std::span<uint32_t> out) const;

 private:
  int64_t rows_;
  std::vector<std::vector<TrieNode>> tries_;
  std::vector<std::pair<int32_t, Marker>> markers_;
  std::array<int32_t, kTextClassCount> longest_{};
  std::vector<uint16_t> codes_;  // 32 * (class + 1) + characters, 0 for other tokens
  // [class][n]: the class's tokens of at most n characters.
  std::vector<std::vector<std::vector<uint32_t>>> up_to_length_;
  static constexpr size_t kCombinedKept = 64;
  mutable std::mutex mutex_;
  mutable std::unordered_map<uint64_t, std::vector<uint32_t>> combined_;
};

}  // namespace m1::structured
