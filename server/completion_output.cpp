#include "completion_output.h"

#include "api_error.h"

namespace m1::server {
namespace {

using Kind = GenerationEvent::Kind;

// Cancelled and failed choices end the whole answer with an error: the client's (400, naming
// `output_param`) when the request's own constraints caused it, else the server's.
void check_finish(const GenerationEvent& event, const std::string& output_param) {
  if (event.kind != Kind::kFinish) return;
  if (event.finish_reason == "cancelled")
    throw unavailable("the request was cancelled: the server is shutting down", "cancelled");
  if (event.finish_reason != "error") return;
  if (event.request_fault) throw request_fault(output_param, event.error);
  throw ApiError(500, "server_error", "generation failed: " + event.error);
}

ordered_json logprobs_json(ApiKind kind, bool wanted, std::span<const ReportedToken> tokens, const Tokenizer& tokenizer) {
  if (!wanted) return nullptr;
  return kind == ApiKind::kChat ? chat_logprobs_json(tokens, tokenizer) : completion_logprobs_json(tokens, tokenizer);
}

template <class Choice>
std::vector<Choice> choices_for(const CompletionJob& job) {
  std::vector<Choice> choices;
  for (int i = 0; i < job.generation.n; ++i) choices.emplace_back(ChoiceOutput(job));
  return choices;
}

}  // namespace

ResponseCollector::ResponseCollector(const CompletionJob& job, const Tokenizer& tokenizer, ResponseMeta meta)
    : kind_(job.kind), logprobs_(job.logprobs), output_param_(job.output_param), tokenizer_(tokenizer),
      meta_(std::move(meta)), choices_(choices_for<Choice>(job)) {}

bool ResponseCollector::add(const GenerationEvent& event) {
  if (event.kind == Kind::kDone) {
    prompt_tokens_ = event.prompt_tokens;
    completion_tokens_ = event.completion_tokens;
    cached_tokens_ = event.cached_tokens;
    return true;
  }
  check_finish(event, output_param_);
  Choice& choice = choices_.at(size_t(event.choice));
  choice.whole.append(choice.output.on_event(event));
  return false;
}

ordered_json ResponseCollector::response() const {
  ordered_json choices = ordered_json::array();
  for (size_t i = 0; i < choices_.size(); ++i) {
    const ChoiceDelta& whole = choices_[i].whole;
    ordered_json logprobs = logprobs_json(kind_, logprobs_, whole.tokens, tokenizer_);
    const std::string& finish = choices_[i].output.finish_reason();
    choices.push_back(kind_ == ApiKind::kChat ? chat_choice_json(int(i), whole, std::move(logprobs), finish)
                                              : completion_choice_json(int(i), whole.content, std::move(logprobs), finish));
  }
  ordered_json response = response_json(kind_, false, meta_, std::move(choices));
  response["usage"] = usage_json(prompt_tokens_, completion_tokens_, cached_tokens_);
  return response;
}

ChunkStreamer::ChunkStreamer(const CompletionJob& job, const Tokenizer& tokenizer, ResponseMeta meta)
    : kind_(job.kind), logprobs_(job.logprobs), include_usage_(job.include_usage), output_param_(job.output_param),
      tokenizer_(tokenizer), meta_(std::move(meta)), choices_(choices_for<Choice>(job)) {}

std::vector<ordered_json> ChunkStreamer::opening() const {
  std::vector<ordered_json> chunks;
  if (kind_ != ApiKind::kChat) return chunks;
  for (size_t i = 0; i < choices_.size(); ++i) {
    const ordered_json role = {{"role", "assistant"}, {"content", ""}};
    chunks.push_back(chunk(chat_chunk_choice_json(int(i), role, nullptr, nullptr)));
  }
  return chunks;
}

std::vector<ordered_json> ChunkStreamer::on_event(const GenerationEvent& event) {
  std::vector<ordered_json> chunks;
  if (event.kind == Kind::kDone) {
    if (!include_usage_) return chunks;
    ordered_json last = response_json(kind_, true, meta_, ordered_json::array());
    last["usage"] = usage_json(event.prompt_tokens, event.completion_tokens, event.cached_tokens);
    chunks.push_back(std::move(last));
    return chunks;
  }
  check_finish(event, output_param_);
  const int index = event.choice;
  Choice& choice = choices_.at(size_t(index));
  ChoiceDelta delta = choice.output.on_event(event);
  std::move(delta.tokens.begin(), delta.tokens.end(), std::back_inserter(choice.unsent));
  if (delta.has_parts()) chunks.push_back(parts_chunk(index, choice, delta));
  if (event.kind == Kind::kFinish) chunks.push_back(finish_chunk(index, choice));
  return chunks;
}

ordered_json ChunkStreamer::chunk(ordered_json choice) const {
  ordered_json json = response_json(kind_, true, meta_, ordered_json::array({std::move(choice)}));
  if (include_usage_) json["usage"] = nullptr;  // OpenAI: present on every chunk, set on the last
  return json;
}

// A choice's new text and calls, with the log-probabilities of the tokens that produced them.
ordered_json ChunkStreamer::parts_chunk(int index, Choice& choice, const ChoiceDelta& delta) {
  ordered_json logprobs = logprobs_json(kind_, logprobs_, choice.unsent, tokenizer_);
  choice.unsent.clear();
  if (kind_ != ApiKind::kChat) return chunk(completion_choice_json(index, delta.content, std::move(logprobs), nullptr));
  ordered_json parts = chat_delta_json(delta, choice.calls_sent);
  choice.calls_sent += delta.tool_calls.size();
  return chunk(chat_chunk_choice_json(index, std::move(parts), std::move(logprobs), nullptr));
}

// The finish reason, with the log-probabilities of tokens whose text never came out (cut by a
// stop string, or held back by the output parser).
ordered_json ChunkStreamer::finish_chunk(int index, Choice& choice) {
  ordered_json logprobs = choice.unsent.empty() ? nullptr : logprobs_json(kind_, logprobs_, choice.unsent, tokenizer_);
  choice.unsent.clear();
  const std::string& reason = choice.output.finish_reason();
  if (kind_ != ApiKind::kChat) return chunk(completion_choice_json(index, "", std::move(logprobs), reason));
  return chunk(chat_chunk_choice_json(index, ordered_json::object(), std::move(logprobs), reason));
}

}  // namespace m1::server
