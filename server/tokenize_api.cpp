#include "tokenize_api.h"

#include "api_error.h"
#include "json_fields.h"

namespace m1::server {

ordered_json tokenize_json(const ordered_json& body, const ServedModel& model) {
  check_model(body, model);
  std::vector<int32_t> tokens;
  if (const auto prompt = string_field(body, "prompt")) {
    tokens = model.tokenizer->encode(*prompt);
  } else if (body.contains("messages")) {
    const bool add_generation_prompt = bool_field(body, "add_generation_prompt").value_or(true);
    tokens = encode_chat(*model.tokenizer, chat_prompt(body, add_generation_prompt));
  } else {
    throw invalid_request("give either prompt (a string) or messages", "prompt");
  }
  return {{"tokens", tokens}, {"count", tokens.size()}, {"max_model_len", model.max_context}};
}

ordered_json detokenize_json(const ordered_json& body, const ServedModel& model) {
  check_model(body, model);
  const ordered_json* tokens = find_field(body, "tokens");
  if (tokens == nullptr || !tokens->is_array()) throw invalid_request("tokens: must be an array of token ids", "tokens");
  const std::vector<int32_t> ids = parse_token_ids(*tokens, *model.tokenizer, "tokens");
  return {{"prompt", model.tokenizer->decode(ids)}};
}

}  // namespace m1::server
