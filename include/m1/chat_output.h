#pragma once
// Splits the text a MiniMax-M1 model writes into OpenAI message parts, as it streams: reasoning
// between <think> and </think>, tool calls in a <tool_calls> block (one JSON object per line),
// and ordinary content. Malformed tool calls fall back to content; nothing is lost.

#include <cstddef>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "m1/chat.h"

namespace m1 {

struct ChatOutputOptions {
  bool reasoning = true;   // route <think>...</think> to reasoning (else it stays content)
  bool tool_calls = true;  // parse <tool_calls> blocks (else they stay content)
};

// What became final with the latest text. Tool calls are whole (name and arguments complete).
struct ChatOutputDelta {
  std::string reasoning;
  std::string content;
  std::vector<ToolCall> tool_calls;  // ids are "call_" + 24 random letters and digits
  bool empty() const { return reasoning.empty() && content.empty() && tool_calls.empty(); }
};

// One parser per generation. The newlines right after </think> are dropped (the model separates
// its reasoning from the answer with a blank line); every other character of the answer is kept.
class ChatOutputParser {
 public:
  explicit ChatOutputParser(ChatOutputOptions options = {});
  // Feeds decoded text (added tokens such as <think> appear as their text). Text that may still
  // turn out to be the start of a tag is held back until decided.
  ChatOutputDelta push(std::string_view text);
  // End of generation: releases what is held; an unterminated tool block becomes content.
  ChatOutputDelta finish();
  // Whether any tool call has been emitted (the finish_reason becomes "tool_calls").
  bool saw_tool_calls() const { return calls_emitted_ > 0; }

 private:
  enum class Mode { kContent, kReasoning, kTools };

  void consume_pending(ChatOutputDelta& delta);
  bool consume_text(ChatOutputDelta& delta);
  bool consume_tool_line(ChatOutputDelta& delta);
  void enter_after_tag(std::string_view tag);
  void take_tool_line(ChatOutputDelta& delta, std::string_view line, std::string_view terminator);
  void emit_text(ChatOutputDelta& delta, std::string_view text);
  void emit_content(ChatOutputDelta& delta, std::string_view text);
  std::string new_call_id();

  ChatOutputOptions options_;
  Mode mode_ = Mode::kContent;
  std::string pending_;           // undecided text (possible tag start) or the current tool line
  std::string unfinished_block_;  // tool-block text not yet emitted: the tag, blank and malformed lines
  std::string malformed_lines_;   // the block's lines that are not tool calls, in order
  size_t line_scanned_ = 0;       // how much of the current tool line is known to hold no terminator
  bool strip_newlines_ = false;   // just after </think>: drop the blank lines the model puts there
  int calls_emitted_ = 0;
  std::mt19937_64 id_random_;
};

}  // namespace m1
