#include "output_constraints.h"

#include <algorithm>
#include <charconv>
#include <tuple>

#include <fmt/format.h>

#include "api_error.h"
#include "json_fields.h"
#include "m1/error.h"

namespace m1::server {
namespace {

// OpenAI's rule for a response format's name.
bool valid_format_name(const std::string& name) {
  return !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  });
}

// response_format's document, if it asks for one.
void parse_response_format(const ordered_json& body, OutputFormat& format) {
  const ordered_json* response_format = find_field(body, "response_format");
  if (response_format == nullptr) return;
  if (!response_format->is_object()) throw invalid_request("response_format: must be an object", "response_format");
  const ordered_json* type_field = find_field(*response_format, "type");
  if (type_field != nullptr && !type_field->is_string())
    throw invalid_request("response_format.type: must be a string", "response_format");
  const std::string type = type_field ? type_field->get<std::string>() : "text";
  if (type == "text") return;
  if (type == "json_object") {
    format.document = OutputFormat::Document::kAnyObject;
    return;
  }
  if (type != "json_schema")
    throw invalid_request(fmt::format("response_format.type: must be text, json_object or json_schema, got '{}'", type),
                          "response_format");
  const ordered_json* spec = find_field(*response_format, "json_schema");
  if (spec == nullptr || !spec->is_object())
    throw invalid_request("response_format.json_schema: must be an object with a name and a schema", "response_format");
  const auto name = string_field(*spec, "name");
  if (!name || !valid_format_name(*name))
    throw invalid_request("response_format.json_schema.name: must be 1 to 64 letters, digits, '_' or '-'",
                          "response_format");
  // strict: a boolean when given (the schema is enforced either way); description: a string.
  for (const auto& [field, is_typed, kind] : {std::tuple{"strict", &ordered_json::is_boolean, "a boolean"},
                                              std::tuple{"description", &ordered_json::is_string, "a string"}}) {
    const ordered_json* value = find_field(*spec, field);
    if (value != nullptr && !(value->*is_typed)())
      throw invalid_request(fmt::format("response_format.json_schema.{}: must be {}", field, kind), "response_format");
  }
  const ordered_json* schema = find_field(*spec, "schema");
  format.document = OutputFormat::Document::kSchema;
  format.schema = schema ? *schema : ordered_json::object();
  format.schema_what = "response_format.json_schema.schema";
}

// A function's arguments schema: its parameters (none: an empty object), or null for any object
// when the call is not constrained.
ToolGrammar tool_grammar(const ordered_json& function, size_t index, bool constrained) {
  ToolGrammar tool;
  tool.name = function.value("name", "");
  tool.what = fmt::format("tools[{}].function.parameters", index);
  if (!constrained) return tool;
  const ordered_json* parameters = find_field(function, "parameters");
  tool.parameters = parameters ? *parameters
                               : ordered_json{{"type", "object"}, {"properties", ordered_json::object()},
                                              {"additionalProperties", false}};
  return tool;
}

bool is_strict(const ordered_json& function, size_t index) {
  const ordered_json* strict = find_field(function, "strict");
  if (strict == nullptr) return false;
  if (!strict->is_boolean())
    throw invalid_request(fmt::format("tools[{}].function.strict: must be a boolean", index), "tools");
  return strict->get<bool>();
}

}  // namespace

ConstrainedOutput output_grammar(const ordered_json& body, const OutputRequest& request) {
  OutputFormat format;
  parse_response_format(body, format);
  format.reasoning = request.chat;
  format.max_lexer_states = request.max_lexer_states;
  const std::vector<ordered_json> no_tools;
  const std::vector<ordered_json>& functions = request.tools ? *request.tools : no_tools;
  bool any_strict = false;
  std::vector<char> strict;
  for (size_t i = 0; i < functions.size(); ++i) {
    strict.push_back(is_strict(functions[i], i));
    any_strict = any_strict || strict.back();
  }
  switch (request.tool_mode) {
    case ToolMode::kNone: break;
    case ToolMode::kAuto:
      // Calls are constrained when a tool is strict, or when a document is asked for instead.
      if (any_strict || format.document != OutputFormat::Document::kNone) {
        format.calls = OutputFormat::Calls::kOptional;
        for (size_t i = 0; i < functions.size(); ++i) format.tools.push_back(tool_grammar(functions[i], i, strict[i]));
      }
      break;
    case ToolMode::kRequired:
      format.calls = OutputFormat::Calls::kRequired;
      for (size_t i = 0; i < functions.size(); ++i) format.tools.push_back(tool_grammar(functions[i], i, true));
      break;
    case ToolMode::kNamed:
      format.calls = OutputFormat::Calls::kNamed;
      for (size_t i = 0; i < functions.size(); ++i)
        if (functions[i].value("name", "") == request.named_tool) format.tools.push_back(tool_grammar(functions[i], i, true));
      break;
  }
  if (format.document == OutputFormat::Document::kNone && format.calls == OutputFormat::Calls::kNone) return {};
  const std::string enforced = format.document != OutputFormat::Document::kNone ? "response_format" : "tools";
  try {
    return {compile_output_grammar(format), enforced};
  } catch (const RequestError& error) {  // the lexer's bound, already while compiling
    throw request_fault(enforced, error.what());
  } catch (const Error& error) {
    const std::string param = leading_parameter(error.what()).starts_with("tools") ? "tools" : "response_format";
    throw invalid_request(error.what(), param);
  }
}

std::vector<TokenBias> parse_logit_bias(const ordered_json& body) {
  const ordered_json* bias = find_field(body, "logit_bias");
  if (bias == nullptr) return {};
  if (!bias->is_object())
    throw invalid_request("logit_bias: must be an object mapping token ids to biases", "logit_bias");
  std::vector<TokenBias> biases;
  for (const auto& [key, value] : bias->items()) {
    int64_t id = -1;
    const auto [end, error] = std::from_chars(key.data(), key.data() + key.size(), id);
    if (error != std::errc() || end != key.data() + key.size() || key.empty())
      throw invalid_request(fmt::format("logit_bias: key '{}' is not a token id", key), "logit_bias");
    if (!value.is_number())
      throw invalid_request(fmt::format("logit_bias: the bias of token {} must be a number", key), "logit_bias");
    if (id < 0 || id > INT32_MAX)
      throw invalid_request(fmt::format("logit_bias: token id {} is outside the vocabulary", key), "logit_bias");
    biases.push_back({int32_t(id), float(value.get<double>())});
  }
  return biases;
}

}  // namespace m1::server
