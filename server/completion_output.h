#pragma once
// Turns the generation events of one request into its OpenAI answer: a whole response body
// (ResponseCollector) or the chunks of a Server-Sent Events stream (ChunkStreamer).

#include <cstdint>
#include <vector>

#include "choice_output.h"
#include "openai_json.h"
#include "openai_request.h"

namespace m1::server {

// Both keep what they need of the job: it may be gone (its request moved to the engine).
class ResponseCollector {
 public:
  ResponseCollector(const CompletionJob& job, const Tokenizer& tokenizer, ResponseMeta meta);
  // Takes the request's next event; true once it was the last. Throws ApiError when a choice
  // ends cancelled (503) or failed (500).
  bool add(const GenerationEvent& event);
  ordered_json response() const;

 private:
  struct Choice {
    explicit Choice(ChoiceOutput output) : output(std::move(output)) {}
    ChoiceOutput output;
    ChoiceDelta whole;
  };
  ApiKind kind_;
  bool logprobs_;
  std::string output_param_;  // CompletionJob::output_param
  const Tokenizer& tokenizer_;
  ResponseMeta meta_;
  std::vector<Choice> choices_;
  int64_t prompt_tokens_ = 0, completion_tokens_ = 0, cached_tokens_ = 0;
};

class ChunkStreamer {
 public:
  ChunkStreamer(const CompletionJob& job, const Tokenizer& tokenizer, ResponseMeta meta);
  // What the stream opens with: for chat, each choice's role.
  std::vector<ordered_json> opening() const;
  // The chunks the next event makes (possibly none). Throws ApiError as ResponseCollector::add.
  std::vector<ordered_json> on_event(const GenerationEvent& event);

 private:
  struct Choice {
    explicit Choice(ChoiceOutput output) : output(std::move(output)) {}
    ChoiceOutput output;
    std::vector<ReportedToken> unsent;  // tokens whose text is still held back
    size_t calls_sent = 0;
  };
  ordered_json chunk(ordered_json choice) const;
  ordered_json parts_chunk(int index, Choice& choice, const ChoiceDelta& delta);
  ordered_json finish_chunk(int index, Choice& choice);

  ApiKind kind_;
  bool logprobs_, include_usage_;
  std::string output_param_;  // CompletionJob::output_param
  const Tokenizer& tokenizer_;
  ResponseMeta meta_;
  std::vector<Choice> choices_;
};

}  // namespace m1::server
