#include "openai_json.h"

#include <random>

namespace m1::server {
namespace {

constexpr std::string_view kIdAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
constexpr size_t kIdRandomLength = 24;

std::string token_text(int32_t id, const Tokenizer& tokenizer) { return tokenizer.decode(std::span(&id, 1)); }

// The token's raw bytes: a token may hold part of a UTF-8 character, which `token` cannot show.
ordered_json token_bytes(int32_t id, const Tokenizer& tokenizer) {
  ordered_json bytes = ordered_json::array();
  for (const char c : tokenizer.token_bytes(id)) bytes.push_back(int(static_cast<unsigned char>(c)));
  return bytes;
}

ordered_json chat_token_json(int32_t id, float logprob, const Tokenizer& tokenizer) {
  return {{"token", token_text(id, tokenizer)}, {"logprob", logprob}, {"bytes", token_bytes(id, tokenizer)}};
}

ordered_json tool_call_json(const ToolCall& call) {
  return {{"id", call.id}, {"type", "function"}, {"function", {{"name", call.name}, {"arguments", call.arguments}}}};
}

ordered_json text_or_null(const std::string& text) { return text.empty() ? ordered_json(nullptr) : ordered_json(text); }

}  // namespace

std::string new_response_id(ApiKind kind) {
  thread_local std::mt19937_64 random{std::random_device{}()};
  std::uniform_int_distribution<size_t> pick(0, kIdAlphabet.size() - 1);
  std::string id = kind == ApiKind::kChat ? "chatcmpl-" : "cmpl-";
  for (size_t i = 0; i < kIdRandomLength; ++i) id += kIdAlphabet[pick(random)];
  return id;
}

std::string dump_json(const ordered_json& value) {
  return value.dump(-1, ' ', false, ordered_json::error_handler_t::replace);
}

ordered_json usage_json(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}}};
}

ordered_json chat_logprobs_json(std::span<const ReportedToken> tokens, const Tokenizer& tokenizer) {
  ordered_json content = ordered_json::array();
  for (const ReportedToken& reported : tokens) {
    ordered_json entry = chat_token_json(reported.token.id, reported.token.logprob, tokenizer);
    ordered_json top = ordered_json::array();
    for (const auto& [id, logprob] : reported.token.top) top.push_back(chat_token_json(id, logprob, tokenizer));
    entry["top_logprobs"] = std::move(top);
    content.push_back(std::move(entry));
  }
  return {{"content", std::move(content)}};
}

ordered_json completion_logprobs_json(std::span<const ReportedToken> tokens, const Tokenizer& tokenizer) {
  ordered_json texts = ordered_json::array(), logprobs = ordered_json::array(), tops = ordered_json::array(),
               offsets = ordered_json::array();
  for (const ReportedToken& reported : tokens) {
    texts.push_back(token_text(reported.token.id, tokenizer));
    logprobs.push_back(reported.token.logprob);
    ordered_json top = ordered_json::object();
    for (const auto& [id, logprob] : reported.token.top) top[token_text(id, tokenizer)] = logprob;
    tops.push_back(std::move(top));
    offsets.push_back(reported.text_offset);
  }
  return {{"tokens", std::move(texts)}, {"token_logprobs", std::move(logprobs)}, {"top_logprobs", std::move(tops)},
          {"text_offset", std::move(offsets)}};
}

ordered_json chat_choice_json(int index, const ChoiceDelta& whole, ordered_json logprobs, const std::string& finish_reason) {
  // Content is null, not "", when the turn is only tool calls, as OpenAI writes it.
  const bool only_calls = whole.content.empty() && !whole.tool_calls.empty();
  ordered_json message = {{"role", "assistant"},
                          {"content", only_calls ? ordered_json(nullptr) : ordered_json(whole.content)},
                          {"reasoning_content", text_or_null(whole.reasoning)}};
  if (!whole.tool_calls.empty()) {
    ordered_json calls = ordered_json::array();
    for (const ToolCall& call : whole.tool_calls) calls.push_back(tool_call_json(call));
    message["tool_calls"] = std::move(calls);
  }
  return {{"index", index}, {"message", std::move(message)}, {"logprobs", std::move(logprobs)},
          {"finish_reason", finish_reason}};
}

ordered_json chat_chunk_choice_json(int index, ordered_json delta, ordered_json logprobs, ordered_json finish_reason) {
  return {{"index", index}, {"delta", std::move(delta)}, {"logprobs", std::move(logprobs)},
          {"finish_reason", std::move(finish_reason)}};
}

ordered_json completion_choice_json(int index, const std::string& text, ordered_json logprobs, ordered_json finish_reason) {
  return {{"index", index}, {"text", text}, {"logprobs", std::move(logprobs)}, {"finish_reason", std::move(finish_reason)}};
}

ordered_json chat_delta_json(const ChoiceDelta& delta, size_t first_call) {
  ordered_json json = ordered_json::object();
  if (!delta.reasoning.empty()) json["reasoning_content"] = delta.reasoning;
  if (!delta.content.empty()) json["content"] = delta.content;
  if (delta.tool_calls.empty()) return json;
  ordered_json calls = ordered_json::array();
  for (size_t i = 0; i < delta.tool_calls.size(); ++i) {
    ordered_json call = {{"index", first_call + i}};
    call.update(tool_call_json(delta.tool_calls[i]));
    calls.push_back(std::move(call));
  }
  json["tool_calls"] = std::move(calls);
  return json;
}

ordered_json response_json(ApiKind kind, bool chunk, const ResponseMeta& meta, ordered_json choices) {
  const char* object = kind == ApiKind::kCompletion ? "text_completion"
                       : chunk                      ? "chat.completion.chunk"
                                                    : "chat.completion";
  return {{"id", meta.id}, {"object", object}, {"created", meta.created}, {"model", meta.model},
          {"choices", std::move(choices)}};
}

ordered_json model_list_json(const std::string& name, int64_t created, int64_t max_context) {
  const ordered_json model = {{"id", name}, {"object", "model"}, {"created", created}, {"owned_by", "m1"},
                              {"max_model_len", max_context}};
  return {{"object", "list"}, {"data", ordered_json::array({model})}};
}

}  // namespace m1::server
