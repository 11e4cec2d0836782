#pragma once
// What a request says its output must be, turned into the engine's terms: `response_format`
// (json_object, json_schema), strict tools and required or named `tool_choice` become one
// compiled output grammar; `logit_bias` becomes the sampler's token biases.

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "m1/sampler.h"
#include "m1/structured_output.h"

namespace m1::server {

// How the request's tool_choice shapes the turn.
enum class ToolMode { kNone, kAuto, kRequired, kNamed };

struct OutputRequest {
  bool chat = false;  // a chat turn (reasoning may come first; tools may be called)
  const std::vector<nlohmann::ordered_json>* tools = nullptr;  // the function objects
  ToolMode tool_mode = ToolMode::kNone;
  std::string named_tool;  // kNamed
  int32_t max_lexer_states = kDefaultMaxLexerStates;  // the server's --max-grammar-states
};

struct ConstrainedOutput {
  std::shared_ptr<OutputGrammar> grammar;  // null when nothing constrains the output
  std::string param;                       // "response_format" or "tools": what the grammar enforces
};

// The grammar the output must follow. Throws ApiError (400) naming `response_format` or `tools`
// for a malformed request or a schema m1 refuses.
ConstrainedOutput output_grammar(const nlohmann::ordered_json& body, const OutputRequest& request);

// `logit_bias`: {"token id": bias}. Ids and ranges are checked against the vocabulary later
// (Engine::submit); here the shape. Throws ApiError naming `logit_bias`.
std::vector<TokenBias> parse_logit_bias(const nlohmann::ordered_json& body);

}  // namespace m1::server
