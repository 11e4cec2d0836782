#pragma once
// One choice's output as it streams: the engine's token and finish events become message parts
// (chat: reasoning, content and tool calls through the output parser; completions: plain
// text), the tokens to report log-probabilities for, and the OpenAI finish reason.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "m1/chat_output.h"
#include "m1/engine.h"
#include "openai_request.h"

namespace m1::server {

struct ReportedToken {
  SampledToken token;
  int64_t text_offset = 0;  // characters of the choice's text before this token
};

// What became final with one event, or (accumulated) a whole choice.
struct ChoiceDelta {
  std::string content;  // chat content, or completion text
  std::string reasoning;
  std::vector<ToolCall> tool_calls;
  std::vector<ReportedToken> tokens;

  bool has_parts() const { return !content.empty() || !reasoning.empty() || !tool_calls.empty(); }
  void append(ChoiceDelta&& later);
};

class ChoiceOutput {
 public:
  explicit ChoiceOutput(const CompletionJob& job);

  // A kToken or kFinish event of this choice. A finish must end normally ("stop" or "length");
  // cancelled and failed choices are the caller's to report.
  ChoiceDelta on_event(const GenerationEvent& event);
  // After the finish: "stop", "length" or "tool_calls".
  const std::string& finish_reason() const { return finish_reason_; }

 private:
  ChoiceDelta take_text(std::string_view text);

  std::optional<ChatOutputParser> parser_;  // chat only
  std::vector<int32_t> end_tokens_;          // not reported: they are no part of the text
  ChoiceDelta primed_;                       // what the forced output released, sent with the first event
  int64_t text_chars_ = 0;
  std::string finish_reason_;
};

}  // namespace m1::server
