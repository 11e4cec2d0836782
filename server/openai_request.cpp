#include "openai_request.h"

#include <algorithm>
#include <random>

#include <fmt/format.h>

#include "api_error.h"
#include "json_body.h"
#include "json_fields.h"
#include "m1/error.h"
#include "m1/sampler.h"
#include "output_constraints.h"

namespace m1::server {
namespace {

constexpr size_t kMaxStopStrings = 16;
constexpr int kMaxTopLogprobs = 20;
constexpr size_t kMaxCacheSaltBytes = 1024;
constexpr const char* kToolBlockOpening = "<tool_calls>\n";  // how the model starts its calls

struct ChatInput {
  std::vector<ChatMessage> messages;
  std::vector<ordered_json> tools;  // the function objects
};

// Assistant tool-call arguments are JSON inside a string, which rendering parses and writes back
// recursively: their nesting is bounded like the body's.
void check_tool_argument_depth(const ordered_json& messages) {
  if (!messages.is_array()) return;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ordered_json* calls = messages[i].is_object() ? find_field(messages[i], "tool_calls") : nullptr;
    if (calls == nullptr || !calls->is_array()) continue;
    for (size_t j = 0; j < calls->size(); ++j) {
      const ordered_json& call = (*calls)[j];
      const ordered_json* function = call.is_object() ? find_field(call, "function") : nullptr;
      const ordered_json* arguments = function && function->is_object() ? find_field(*function, "arguments") : nullptr;
      if (arguments == nullptr || !arguments->is_string()) continue;
      check_json_depth(arguments->get_ref<const std::string&>(),
                       fmt::format("messages[{}].tool_calls[{}].function.arguments", i, j));
    }
  }
}

ChatInput parse_chat_input(const ordered_json& body) {
  const auto messages = body.find("messages");
  if (messages == body.end()) throw invalid_request("messages: required", "messages");
  check_tool_argument_depth(*messages);
  const auto tools = body.find("tools");
  try {
    return {parse_chat_messages(*messages), tools == body.end() ? std::vector<ordered_json>{} : parse_chat_tools(*tools)};
  } catch (const Error& error) {
    throw invalid_request_from(error);
  }
}

// How tool_choice shapes the turn: whether tool calls are parsed out of the output, and the
// start of a tool block the prompt writes for the model when a call is required.
struct ToolChoice {
  bool parse_calls = false;
  std::vector<ChatPiece> forced;  // appended to the prompt after the generation prompt
  ToolMode mode = ToolMode::kNone;
  std::string name;  // kNamed
};

ToolChoice named_tool_choice(const ordered_json& choice, const std::vector<ordered_json>& tools) {
  const ordered_json* function = choice.is_object() ? find_field(choice, "function") : nullptr;
  const bool is_function = choice.is_object() && choice.value("type", ordered_json()) == "function";
  if (!is_function || function == nullptr || !function->is_object())
    throw invalid_request(
        R"(tool_choice: must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}})",
        "tool_choice");
  const auto name = string_field(*function, "name");
  const bool known = name && std::any_of(tools.begin(), tools.end(),
                                         [&](const ordered_json& tool) { return tool.value("name", "") == *name; });
  if (!known)
    throw invalid_request(fmt::format("tool_choice: no tool named '{}' in tools", name.value_or("")), "tool_choice");
  // The call's opening up to its arguments; the name came from the client, so it is untrusted.
  return {true,
          {{kToolBlockOpening, true}, {"{\"name\": " + python_json_dumps(*name) + ", \"arguments\": ", false}},
          ToolMode::kNamed,
          *name};
}

ToolChoice parse_tool_choice(const ordered_json& body, const std::vector<ordered_json>& tools) {
  const ordered_json* choice = find_field(body, "tool_choice");
  const ToolMode automatic = tools.empty() ? ToolMode::kNone : ToolMode::kAuto;
  if (choice == nullptr) return {!tools.empty(), {}, automatic, {}};
  if (!choice->is_string()) return named_tool_choice(*choice, tools);
  const std::string& mode = choice->get_ref<const std::string&>();
  if (mode == "none") return {false, {}, ToolMode::kNone, {}};
  if (mode == "auto") return {!tools.empty(), {}, automatic, {}};
  if (mode != "required") throw invalid_request(fmt::format("tool_choice: unknown value '{}'", mode), "tool_choice");
  if (tools.empty()) throw invalid_request("tool_choice: 'required' needs tools", "tool_choice");
  return {true, {{kToolBlockOpening, true}}, ToolMode::kRequired, {}};
}

void read_float(const ordered_json& body, const std::string& name, float& target) {
  if (auto value = number_field(body, name)) target = float(*value);
}

SamplingParams parse_sampling(const ordered_json& body) {
  SamplingParams s;
  read_float(body, "temperature", s.temperature);
  read_float(body, "top_p", s.top_p);
  read_float(body, "min_p", s.min_p);
  read_float(body, "presence_penalty", s.presence_penalty);
  read_float(body, "frequency_penalty", s.frequency_penalty);
  read_float(body, "repetition_penalty", s.repetition_penalty);
  if (auto top_k = integer_field(body, "top_k")) {
    if (*top_k < -1 || *top_k > INT32_MAX) throw invalid_request("top_k: must be -1 or 0 (off) or a positive count", "top_k");
    s.top_k = *top_k < 0 ? 0 : int(*top_k);  // vLLM spells "off" -1
  }
  const auto seed = integer_field(body, "seed");
  s.seed = seed ? uint64_t(*seed) : std::random_device{}();
  return s;
}

std::vector<std::string> parse_stop(const ordered_json& body) {
  const ordered_json* stop = find_field(body, "stop");
  if (stop == nullptr) return {};
  if (stop->is_string()) return {stop->get<std::string>()};
  if (!stop->is_array()) throw invalid_request("stop: must be a string or an array of strings", "stop");
  if (stop->size() > kMaxStopStrings)
    throw invalid_request(fmt::format("stop: at most {} stop strings", kMaxStopStrings), "stop");
  std::vector<std::string> stops;
  for (const ordered_json& item : *stop) {
    if (!item.is_string()) throw invalid_request("stop: must be a string or an array of strings", "stop");
    stops.push_back(item.get<std::string>());
  }
  return stops;
}

int parse_n(const ordered_json& body, int64_t max_choices) {
  const int64_t n = integer_field(body, "n").value_or(1);
  if (n < 1 || n > max_choices)
    throw invalid_request(fmt::format("n: must be between 1 and {} (the server's batch size), got {}", max_choices, n), "n");
  return int(n);
}

// max_tokens defaults to the room left in the context; a prompt that leaves none, or a
// max_tokens beyond it, is refused rather than silently cut.
int64_t resolve_max_tokens(const ordered_json& body, int64_t prompt_tokens, const ServedModel& model,
                           const std::string& prompt_param) {
  const int64_t room = model.max_context - prompt_tokens;
  if (room < 1)
    throw invalid_request(fmt::format("{}: the prompt is {} tokens, which leaves no room to generate in the context of {}",
                                      prompt_param, prompt_tokens, model.max_context),
                          prompt_param);
  const std::string name = find_field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  const auto given = integer_field(body, name);
  if (!given) return room;
  if (*given < 1) throw invalid_request(fmt::format("{}: must be at least 1, got {}", name, *given), name);
  if (*given > room)
    throw invalid_request(fmt::format("{}: {} is more than the {} tokens the context of {} leaves after a {}-token prompt",
                                      name, *given, room, model.max_context, prompt_tokens),
                          name);
  return *given;
}

void parse_stream(const ordered_json& body, CompletionJob& job) {
  job.stream = bool_field(body, "stream").value_or(false);
  const ordered_json* options = find_field(body, "stream_options");
  if (options == nullptr) return;
  if (!options->is_object()) throw invalid_request("stream_options: must be an object", "stream_options");
  if (!job.stream) throw invalid_request("stream_options: only allowed with stream: true", "stream_options");
  const ordered_json* include_usage = find_field(*options, "include_usage");
  if (include_usage != nullptr && !include_usage->is_boolean())
    throw invalid_request("stream_options.include_usage: must be a boolean", "stream_options.include_usage");
  job.include_usage = include_usage != nullptr && include_usage->get<bool>();
}

void parse_chat_logprobs(const ordered_json& body, CompletionJob& job) {
  job.logprobs = bool_field(body, "logprobs").value_or(false);
  const auto top = integer_field(body, "top_logprobs");
  if (!top) return;
  if (!job.logprobs) throw invalid_request("top_logprobs: needs logprobs: true", "top_logprobs");
  if (*top < 0 || *top > kMaxTopLogprobs)
    throw invalid_request(fmt::format("top_logprobs: must be between 0 and {}, got {}", kMaxTopLogprobs, *top), "top_logprobs");
  job.generation.sampling.top_logprobs = int(*top);
}

void parse_completion_logprobs(const ordered_json& body, CompletionJob& job) {
  const auto top = integer_field(body, "logprobs");
  if (!top) return;
  if (*top < 0 || *top > kMaxTopLogprobs)
    throw invalid_request(fmt::format("logprobs: must be between 0 and {}, got {}", kMaxTopLogprobs, *top), "logprobs");
  job.logprobs = true;
  job.generation.sampling.top_logprobs = int(*top);
}

void refuse_unsupported_completion_options(const ordered_json& body) {
  if (bool_field(body, "echo").value_or(false)) throw invalid_request("echo: not supported", "echo");
  if (!string_field(body, "suffix").value_or("").empty()) throw invalid_request("suffix: not supported", "suffix");
  if (integer_field(body, "best_of").value_or(1) != 1) throw invalid_request("best_of: only 1 is supported", "best_of");
}

std::optional<std::string> parse_cache_salt(const ordered_json& body) {
  const ordered_json* salt = find_field(body, "cache_salt");
  if (salt == nullptr) return std::nullopt;
  if (!salt->is_string() || salt->get_ref<const std::string&>().empty())
    throw invalid_request("cache_salt: must be a non-empty string", "cache_salt");
  if (salt->get_ref<const std::string&>().size() > kMaxCacheSaltBytes)
    throw invalid_request(fmt::format("cache_salt: at most {} bytes", kMaxCacheSaltBytes), "cache_salt");
  return salt->get<std::string>();
}

// Settings shared by both endpoints, once the prompt is known.
CompletionJob common_job(const ordered_json& body, const ServedModel& model, std::vector<int32_t> prompt,
                         const std::string& prompt_param) {
  CompletionJob job;
  job.generation.max_tokens = resolve_max_tokens(body, int64_t(prompt.size()), model, prompt_param);
  job.generation.prompt = std::move(prompt);
  job.generation.sampling = parse_sampling(body);
  job.generation.stop = parse_stop(body);
  job.generation.end_tokens = {model.end_of_turn};
  job.generation.n = parse_n(body, model.max_choices);
  parse_stream(body, job);
  job.generation.logit_bias = parse_logit_bias(body);
  job.cache_salt = parse_cache_salt(body);
  return job;
}

void validate_sampling(const SamplingParams& sampling) {
  try {
    validate(sampling);
  } catch (const Error& error) {
    throw invalid_request_from(error);
  }
}

// A token list, or one prompt given as a string or token list (alone or as a one-item list).
const ordered_json& single_prompt(const ordered_json& body) {
  const ordered_json* prompt = find_field(body, "prompt");
  if (prompt == nullptr) throw invalid_request("prompt: required", "prompt");
  if (!prompt->is_array() || prompt->empty() || !((*prompt)[0].is_string() || (*prompt)[0].is_array())) return *prompt;
  if (prompt->size() > 1) throw invalid_request("prompt: only one prompt per request is supported", "prompt");
  return (*prompt)[0];
}

std::vector<int32_t> completion_prompt(const ordered_json& body, const Tokenizer& tokenizer) {
  const ordered_json& prompt = single_prompt(body);
  if (prompt.is_string()) return tokenizer.encode(prompt.get_ref<const std::string&>());
  if (!prompt.is_array()) throw invalid_request("prompt: must be a string or an array of token ids", "prompt");
  return parse_token_ids(prompt, tokenizer, "prompt");
}

}  // namespace

// The key's identity has a fixed length, so no salt can make one scope look like another.
std::string cache_scope(std::string_view key_identity, const std::optional<std::string>& salt) {
  return salt ? fmt::format("{}/{}", key_identity, *salt) : std::string(key_identity);
}

void check_model(const ordered_json& body, const ServedModel& model) {
  const auto name = string_field(body, "model");
  if (name && *name != model.name)
    throw not_found(fmt::format("model '{}' does not exist; this server serves '{}'", *name, model.name), "model",
                    "model_not_found");
}

std::vector<int32_t> parse_token_ids(const ordered_json& ids, const Tokenizer& tokenizer, const std::string& param) {
  const int32_t vocab = tokenizer.vocab_size();
  std::vector<int32_t> parsed;
  for (const ordered_json& id : ids) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= vocab)
      throw invalid_request(fmt::format("{}: token ids must be integers in [0, {})", param, vocab), param);
    parsed.push_back(id.get<int32_t>());
  }
  return parsed;
}

std::vector<ChatPiece> chat_prompt(const ordered_json& body, bool add_generation_prompt) {
  const ChatInput input = parse_chat_input(body);
  return render_chat(input.messages, input.tools, add_generation_prompt);
}

CompletionJob parse_chat_request(const ordered_json& body, const ServedModel& model) {
  check_model(body, model);
  const ChatInput input = parse_chat_input(body);
  const ToolChoice tools = parse_tool_choice(body, input.tools);
  std::vector<ChatPiece> pieces = render_chat(input.messages, input.tools, true);
  pieces.insert(pieces.end(), tools.forced.begin(), tools.forced.end());

  CompletionJob job = common_job(body, model, encode_chat(*model.tokenizer, pieces), "messages");
  job.kind = ApiKind::kChat;
  job.output = {.reasoning = true, .tool_calls = tools.parse_calls};
  job.forced_output = join_pieces(tools.forced);
  parse_chat_logprobs(body, job);
  validate_sampling(job.generation.sampling);
  ConstrainedOutput output = output_grammar(body, {.chat = true, .tools = &input.tools, .tool_mode = tools.mode,
                                                   .named_tool = tools.name, .max_lexer_states = model.max_grammar_states});
  job.generation.grammar = std::move(output.grammar);
  job.output_param = std::move(output.param);
  return job;
}

CompletionJob parse_completion_request(const ordered_json& body, const ServedModel& model) {
  check_model(body, model);
  refuse_unsupported_completion_options(body);
  std::vector<int32_t> prompt = completion_prompt(body, *model.tokenizer);
  if (prompt.empty()) throw invalid_request("prompt: empty (at least one token is needed)", "prompt");

  CompletionJob job = common_job(body, model, std::move(prompt), "prompt");
  job.kind = ApiKind::kCompletion;
  parse_completion_logprobs(body, job);
  validate_sampling(job.generation.sampling);
  OutputRequest constraints;
  constraints.max_lexer_states = model.max_grammar_states;
  ConstrainedOutput output = output_grammar(body, constraints);
  job.generation.grammar = std::move(output.grammar);
  job.output_param = std::move(output.param);
  return job;
}

}  // namespace m1::server
