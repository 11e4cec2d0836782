#pragma once
// Turns OpenAI request bodies (/v1/chat/completions, /v1/completions) into engine requests:
// validates every field, renders and tokenizes the prompt, and keeps what the response needs.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "m1/chat.h"
#include "m1/chat_output.h"
#include "m1/engine.h"
#include "m1/tokenizer.h"

namespace m1::server {

// What request handling needs to know of the model being served.
struct ServedModel {
  const Tokenizer* tokenizer = nullptr;
  std::string name;          // the id clients put in `model`
  int32_t end_of_turn = -1;  // the token that ends an assistant turn
  int64_t max_context = 0;   // prompt + generated tokens per sequence
  int64_t max_choices = 1;   // the most choices (n) one request may ask for: the batch size
  int32_t max_grammar_states = kDefaultMaxLexerStates;  // each request's OutputFormat::max_lexer_states
};

enum class ApiKind { kChat, kCompletion };

struct CompletionJob {
  ApiKind kind = ApiKind::kChat;
  GenerationRequest generation;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;       // report log-probabilities (alternatives: generation.sampling.top_logprobs)
  // Chat only: how to split the model's text, and the text the prompt already put in the
  // model's mouth (tool_choice forcing), which the output parser reads before the model's own.
  ChatOutputOptions output;
  std::string forced_output;
  // vLLM's cache_salt: requests with different salts never share cached prompt states.
  std::optional<std::string> cache_salt;
  // With generation.grammar: the parameter whose constraints it enforces ("response_format" or
  // "tools"), named when matching fails mid-generation.
  std::string output_param;
};

// Both throw ApiError: 400 for an invalid request, 404 for a `model` other than the served one.
CompletionJob parse_chat_request(const nlohmann::ordered_json& body, const ServedModel& model);
CompletionJob parse_completion_request(const nlohmann::ordered_json& body, const ServedModel& model);

// The chat prompt of `messages` and `tools`, as pieces ready to tokenize; shared with /tokenize.
std::vector<ChatPiece> chat_prompt(const nlohmann::ordered_json& body, bool add_generation_prompt);

// The ids of a JSON array of token ids; throws a 400 naming `param` for anything else.
std::vector<int32_t> parse_token_ids(const nlohmann::ordered_json& ids, const Tokenizer& tokenizer,
                                     const std::string& param);

// The prefix-cache scope of a request (GenerationRequest::cache_scope): requests share cached
// prompt states only when they come with the same API key (`key_identity`, empty without keys)
// and the same cache_salt, or both without one.
std::string cache_scope(std::string_view key_identity, const std::optional<std::string>& salt);

// Throws a 404 when the body names a model other than the served one; no `model` is accepted.
void check_model(const nlohmann::ordered_json& body, const ServedModel& model);

}  // namespace m1::server
