#pragma once
// The JSON shapes of OpenAI responses: chat completions and text completions, whole and as
// stream chunks, with their log-probabilities (chat and legacy formats), usage and model list.

#include <cstdint>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "choice_output.h"
#include "m1/tokenizer.h"

namespace m1::server {

using nlohmann::ordered_json;

// Fields every response and chunk of one request shares.
struct ResponseMeta {
  std::string id;  // "chatcmpl-..." or "cmpl-..."
  int64_t created = 0;
  std::string model;
};

// A fresh response id such as "chatcmpl-3YfZ..." for the endpoint.
std::string new_response_id(ApiKind kind);

// Serializes for the wire; invalid UTF-8 is replaced rather than thrown on.
std::string dump_json(const ordered_json& value);

// OpenAI's usage object; prompt_tokens_details.cached_tokens counts the prompt tokens resumed from
// the prefix cache instead of prefilled.
ordered_json usage_json(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens);

// Chat format: {"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...]}.
ordered_json chat_logprobs_json(std::span<const ReportedToken> tokens, const Tokenizer& tokenizer);
// Legacy completions format: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}.
ordered_json completion_logprobs_json(std::span<const ReportedToken> tokens, const Tokenizer& tokenizer);

// A whole choice or one chunk's choice. `logprobs` is null when not asked for; a chunk's
// finish_reason is null until its last.
ordered_json chat_choice_json(int index, const ChoiceDelta& whole, ordered_json logprobs, const std::string& finish_reason);
ordered_json chat_chunk_choice_json(int index, ordered_json delta, ordered_json logprobs, ordered_json finish_reason);
ordered_json completion_choice_json(int index, const std::string& text, ordered_json logprobs, ordered_json finish_reason);

// A chat stream delta: the parts present in `delta`; tool calls are numbered from first_call.
ordered_json chat_delta_json(const ChoiceDelta& delta, size_t first_call);

// The envelope of a whole response or of a chunk around its choices.
ordered_json response_json(ApiKind kind, bool chunk, const ResponseMeta& meta, ordered_json choices);

ordered_json model_list_json(const std::string& name, int64_t created, int64_t max_context);

}  // namespace m1::server
