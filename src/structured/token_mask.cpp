#include "structured/token_mask.h"

#include <array>

namespace m1::structured {
namespace {

// Depth-first over trie[begin, end): a node's bytes extend its parent's (context, state), or the
// subtree is skipped.
void walk(Matcher& matcher, const std::vector<TrieNode>& trie, size_t begin, size_t end, int32_t state,
          std::span<uint32_t> allowed) {
  struct Frame {
    int32_t context, state;
  };
  std::array<Frame, 257> stack;
  stack[0] = {Matcher::kBase, state};
  LexerDfa& lexer = matcher.lexer();
  // Transitions looked up in place; the table is fetched again after anything that may add states.
  const int32_t* table = lexer.table_data();
  const int32_t* class_of = lexer.class_data();
  const size_t classes = size_t(lexer.class_count());
  uint32_t* bits = allowed.data();
  for (size_t i = begin; i < end;) {
    const TrieNode& node = trie[i];
    Frame frame = stack[node.depth - 1];
    int32_t to = table[size_t(frame.state) * classes + size_t(class_of[node.byte])];
    if (to < 0) {
      to = lexer.next(frame.state, node.byte);
      table = lexer.table_data();
    }
    if (to != LexerDfa::kDead) {
      frame.state = to;
    } else {
      const bool crossed = matcher.step_across(frame.context, frame.state, node.byte);
      table = lexer.table_data();
      if (!crossed) {
        i = size_t(node.end);
        continue;
      }
    }
    stack[node.depth] = frame;
    if (node.token >= 0) bits[size_t(node.token) / 32] |= 1u << (node.token % 32);
    ++i;
  }
}

void walk(Matcher& matcher, const std::vector<TrieNode>& trie, int32_t state, std::span<uint32_t> allowed) {
  walk(matcher, trie, 0, trie.size(), state, allowed);
}

}  // namespace

void fill_token_mask(Matcher& matcher, const TokenIndex& index, std::span<const int32_t> end_tokens,
                     std::span<uint32_t> allowed) {
  LexerDfa& lexer = matcher.lexer();
  const int32_t state = matcher.lexer_state();
  // When the last bytes begin a marker's text, the class tokens are taken as from the state that
  // began none, but for those whose first byte continues the marker, tried from the real state.
  const int32_t twin = lexer.unguarded(state);
  std::array<int32_t, kTextClassCount> runs{};
  for (int32_t c = 0; c < kTextClassCount; ++c)
    runs[size_t(c)] = twin == LexerDfa::kDead ? -1 : lexer.uniform_run(twin, TextClass(c), index.longest(c));
  index.copy_class_tokens(runs, allowed);
  for (int32_t c = 0; c <= kTextClassCount; ++c) {
    const std::vector<TrieNode>& trie = index.trie(c);
    if (c == kTextClassCount || runs[size_t(c)] < 0) {
      walk(matcher, trie, state, allowed);
      continue;
    }
    if (twin == state) continue;
    for (size_t i = 0; i < trie.size(); i = size_t(trie[i].end)) {  // the first bytes
      if (!lexer.guard_differs(state, trie[i].byte)) continue;
      for (size_t k = i; k < size_t(trie[i].end); ++k)
        if (trie[k].token >= 0) allowed[size_t(trie[k].token) / 32] &= ~(1u << (trie[k].token % 32));
      walk(matcher, trie, i, size_t(trie[i].end), state, allowed);
    }
  }
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
  if (bytes.empty() || bytes.size() > 255) return false;
  for (char ch : bytes)
    if (!matcher.step(context, state, static_cast<uint8_t>(ch))) return false;
  return true;
}

}  // namespace m1::structured
