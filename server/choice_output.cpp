#include "choice_output.h"

#include <algorithm>
#include <iterator>

namespace m1::server {
namespace {

// Code points in UTF-8 text: every byte that does not continue a character starts one.
int64_t count_chars(std::string_view text) {
  return std::count_if(text.begin(), text.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; });
}

ChoiceDelta from_parser(ChatOutputDelta&& parsed) {
  return {std::move(parsed.content), std::move(parsed.reasoning), std::move(parsed.tool_calls), {}};
}

}  // namespace

void ChoiceDelta::append(ChoiceDelta&& later) {
  content += later.content;
  reasoning += later.reasoning;
  std::move(later.tool_calls.begin(), later.tool_calls.end(), std::back_inserter(tool_calls));
  std::move(later.tokens.begin(), later.tokens.end(), std::back_inserter(tokens));
}

ChoiceOutput::ChoiceOutput(const CompletionJob& job) : end_tokens_(job.generation.end_tokens) {
  if (job.kind != ApiKind::kChat) return;
  parser_.emplace(job.output);
  primed_ = from_parser(parser_->push(job.forced_output));
}

ChoiceDelta ChoiceOutput::on_event(const GenerationEvent& event) {
  ChoiceDelta delta = std::exchange(primed_, {});
  const bool is_end_token = event.kind == GenerationEvent::Kind::kToken &&
                            std::find(end_tokens_.begin(), end_tokens_.end(), event.token.id) != end_tokens_.end();
  if (event.kind == GenerationEvent::Kind::kToken && !is_end_token) delta.tokens.push_back({event.token, text_chars_});
  delta.append(take_text(event.text));
  if (event.kind == GenerationEvent::Kind::kFinish) {
    if (parser_) delta.append(from_parser(parser_->finish()));
    const bool called_tools = parser_ && parser_->saw_tool_calls();
    finish_reason_ = event.finish_reason == "stop" && called_tools ? "tool_calls" : event.finish_reason;
  }
  return delta;
}

ChoiceDelta ChoiceOutput::take_text(std::string_view text) {
  text_chars_ += count_chars(text);
  if (!parser_) return {std::string(text), {}, {}, {}};
  return from_parser(parser_->push(text));
}

}  // namespace m1::server
