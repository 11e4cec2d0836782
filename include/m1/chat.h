#pragma once
// The MiniMax-M1 chat format, rendered natively: the same text as the release's Jinja chat
// template (tokenizer_config.json), kept as pieces so that message text supplied by users never
// turns into special (control) tokens.

#include <cstdint>
#include <optional>
#include <string_view>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "m1/tokenizer.h"

namespace m1 {

struct ToolCall {
  std::string id;
  std::string name;
  std::string arguments;  // a JSON object, as text
};

struct ChatMessage {
  std::string role;                  // "system" | "user" | "assistant" | "tool"
  std::string content;               // text parts joined
  std::vector<ToolCall> tool_calls;  // assistant turns that called tools
  std::string name;                  // tool turns: the function whose result this is
  std::string tool_call_id;          // tool turns
};

// Parses and validates an OpenAI `messages` array. Throws m1::Error whose message names the
// offending parameter, e.g. "messages[2].role: unknown role 'robot'".
std::vector<ChatMessage> parse_chat_messages(const nlohmann::ordered_json& messages);

// Parses an OpenAI `tools` array ([{"type": "function", "function": F}, ...]) into the function
// objects F, keeping the client's key order. Throws m1::Error naming the parameter ("tools[0]...").
std::vector<nlohmann::ordered_json> parse_chat_tools(const nlohmann::ordered_json& tools);

// A stretch of rendered prompt. Template text is trusted; text that came from a message is not.
struct ChatPiece {
  std::string text;
  bool trusted = false;
};

std::vector<ChatPiece> render_chat(const std::vector<ChatMessage>& messages,
                                   const std::vector<nlohmann::ordered_json>& tools,
                                   bool add_generation_prompt);
std::string join_pieces(const std::vector<ChatPiece>& pieces);
// The rendered text tokenized whole, as the reference (Hugging Face) does, with one exception:
// a special added token (<end_of_sentence>, <beginning_of_sentence>, the reserved ones) is
// matched only within trusted text, so message text never yields one. The non-special added
// tokens (<think>, </think>, <tool_calls>, </tool_calls>) are matched wherever they appear, as
// the reference matches them: an assistant turn sent back with its raw tool block gets the
// tokens the model wrote.
std::vector<int32_t> encode_chat(const Tokenizer& tokenizer, const std::vector<ChatPiece>& pieces);

// A JSON object of at most kMaxJsonDepth levels, else nullopt (bad JSON, not an object, too deep).
// python_json_dumps recurses once per level, so deeper values are refused before they reach it;
// no real tool argument nests this deep.
constexpr int kMaxJsonDepth = 256;
std::optional<nlohmann::ordered_json> parse_json_object(std::string_view text);

// Python's json.dumps(value, ensure_ascii=False) with its default ", " and ": " separators, which
// is what the template's `tojson` filter produced for the release's examples.
std::string python_json_dumps(const nlohmann::ordered_json& value);

}  // namespace m1
