#include "structured/token_mask.h"

#include <array>

namespace m1::structured {
namespace {

// Depth-first over a trie: a node's bytes extend its parent's (context, state), or the subtree
// is skipped.
void walk(Matcher& matcher, const std::vector<TrieNode>& trie, std::span<uint32_t> allowed) {
  struct Frame {
    int32_t context, state;
  };
  std::array<Frame, 257> stack;
  stack[0] = {Matcher::kBase, matcher.lexer_state()};
  LexerDfa& lexer = matcher.lexer();
  const size_t n = trie.size();
  for (size_t i = 0; i < n;) {
    const TrieNode& node = trie[i];
    Frame frame = stack[node.depth - 1];
    const int32_t to = lexer.next(frame.state, node.byte);
    if (to != LexerDfa::kDead) {
      frame.state = to;
    } else if (!matcher.step_across(frame.context, frame.state, node.byte)) {
      i = size_t(node.end);
      continue;
    }
    stack[node.depth] = frame;
    if (node.token >= 0) allowed[size_t(node.token) / 32] |= 1u << (node.token % 32);
    ++i;
  }
}

}  // namespace

void fill_token_mask(Matcher& matcher, const TokenIndex& index, std::span<const int32_t> end_tokens,
                     std::span<uint32_t> allowed) {
  LexerDfa& lexer = matcher.lexer();
  const int32_t state = matcher.lexer_state();
  std::array<int32_t, kTextClassCount> runs{};
  for (int32_t c = 0; c < kTextClassCount; ++c) runs[size_t(c)] = lexer.uniform_run(state, TextClass(c));
  index.copy_class_tokens(runs, allowed);
  for (int32_t c = 0; c <= kTextClassCount; ++c)
    if (c == kTextClassCount || runs[size_t(c)] < 0) walk(matcher, index.trie(c), allowed);
  for (const auto& [id, marker] : index.markers()) {
    int32_t context = Matcher::kBase, at = state;
    if (matcher.step(context, at, marker_symbol(marker))) allowed[size_t(id) / 32] |= 1u << (id % 32);
  }
  if (matcher.can_end())
    for (int32_t id : end_tokens)
      if (id >= 0 && id < index.rows()) allowed[size_t(id) / 32] |= 1u << (id % 32);
}

bool token_allowed(Matcher& matcher, const Tokenizer& tokenizer, int32_t id) {
  if (tokenizer.is_special(id)) return false;
  const std::string& bytes = tokenizer.token_bytes(id);
  int32_t context = Matcher::kBase, state = matcher.lexer_state();
  if (tokenizer.is_added(id)) {
    for (int32_t m = 0; m < kMarkerCount; ++m)
      if (bytes == kMarkerText[size_t(m)]) return matcher.step(context, state, marker_symbol(Marker(m)));
    return false;
  }
  for (char ch : bytes)
    if (!matcher.step(context, state, static_cast<uint8_t>(ch))) return false;
  return !bytes.empty();
}

}  // namespace m1::structured
