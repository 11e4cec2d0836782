#include "m1/chat.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <optional>
#include <string_view>

#include <fmt/format.h>

#include "m1/error.h"

namespace m1 {
namespace {

using nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// python_json_dumps

void append_python_string(std::string& out, std::string_view text) {
  out += '"';
  for (const char ch : text) {
    const auto byte = static_cast<unsigned char>(ch);
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (byte < 0x20) {
          out += fmt::format("\\u{:04x}", byte);
        } else {
          out += ch;  // ensure_ascii=False: UTF-8 passes through unchanged
        }
    }
  }
  out += '"';
}

// The shortest digits that read back as `magnitude`, as d.ddd × 10^exponent.
struct ShortestDigits {
  std::string digits;
  int exponent = 0;
};

ShortestDigits shortest_digits(double magnitude) {
  std::array<char, 64> buffer{};
  const auto result = std::to_chars(buffer.data(), buffer.data() + buffer.size(), magnitude,
                                    std::chars_format::scientific);
  const std::string_view scientific(buffer.data(), result.ptr);  // "d[.ddd]e±XX"
  const size_t e_pos = scientific.find('e');
  ShortestDigits shortest{std::string(scientific.substr(0, e_pos))};
  std::erase(shortest.digits, '.');
  const size_t exponent_pos = e_pos + 1 + (scientific[e_pos + 1] == '+');  // from_chars rejects '+'
  std::from_chars(scientific.data() + exponent_pos, result.ptr, shortest.exponent);
  return shortest;
}

// Python's float repr: positional when the decimal exponent is in [-4, 16), otherwise
// scientific with an exponent of two digits at least.
std::string python_float_repr(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value < 0 ? "-Infinity" : "Infinity";
  auto [digits, exponent] = shortest_digits(std::fabs(value));
  std::string text = std::signbit(value) ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    text += digits[0];
    if (digits.size() > 1) text.append(".").append(digits, 1);
    text += fmt::format("e{}{:02d}", exponent < 0 ? '-' : '+', std::abs(exponent));
  } else if (exponent < 0) {
    text.append("0.").append(static_cast<size_t>(-exponent - 1), '0').append(digits);
  } else {
    const auto int_digits = static_cast<size_t>(exponent) + 1;
    if (digits.size() < int_digits) digits.resize(int_digits, '0');
    text.append(digits, 0, int_digits).append(".");
    text.append(digits.size() > int_digits ? digits.substr(int_digits) : "0");
  }
  return text;
}

void append_python_json(std::string& out, const ordered_json& value) {
  switch (value.type()) {
    case ordered_json::value_t::null: out += "null"; break;
    case ordered_json::value_t::boolean: out += value.get<bool>() ? "true" : "false"; break;
    case ordered_json::value_t::number_integer: out += std::to_string(value.get<int64_t>()); break;
    case ordered_json::value_t::number_unsigned: out += std::to_string(value.get<uint64_t>()); break;
    case ordered_json::value_t::number_float: out += python_float_repr(value.get<double>()); break;
    case ordered_json::value_t::string: append_python_string(out, value.get_ref<const std::string&>()); break;
    case ordered_json::value_t::array: {
      out += '[';
      for (size_t i = 0; i < value.size(); ++i) {
        if (i > 0) out += ", ";
        append_python_json(out, value[i]);
      }
      out += ']';
      break;
    }
    case ordered_json::value_t::object: {
      out += '{';
      bool first = true;
      for (const auto& [key, item] : value.items()) {
        if (!first) out += ", ";
        first = false;
        append_python_string(out, key);
        out += ": ";
        append_python_json(out, item);
      }
      out += '}';
      break;
    }
    default: fail("python_json_dumps: value of type '{}' has no JSON text", value.type_name());
  }
}

// ---------------------------------------------------------------------------------------------
// Parsing the OpenAI request

const ordered_json* find_field(const ordered_json& object, const char* key) {
  const auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

const std::string& require_string(const ordered_json& object, const char* key, const std::string& path) {
  const ordered_json* field = find_field(object, key);
  if (field == nullptr || !field->is_string()) fail("{}.{}: must be a string", path, key);
  return field->get_ref<const std::string&>();
}

const ordered_json& require_object(const ordered_json& object, const char* key, const std::string& path) {
  const ordered_json* field = find_field(object, key);
  if (field == nullptr || !field->is_object()) fail("{}.{}: must be an object", path, key);
  return *field;
}

// Absent and null read alike, as OpenAI clients send either.
std::optional<std::string> optional_string(const ordered_json& object, const char* key,
                                           const std::string& path) {
  const ordered_json* field = find_field(object, key);
  if (field == nullptr || field->is_null()) return std::nullopt;
  if (!field->is_string()) fail("{}.{}: must be a string", path, key);
  return field->get<std::string>();
}

void require_function_type(const ordered_json& object, const std::string& path) {
  if (require_string(object, "type", path) != "function") fail("{}.type: must be \"function\"", path);
}

// Several text parts are joined with "\n", as vLLM does; the template itself would read only
// the first part of a user or system message and concatenate an assistant's parts.
std::string join_text_parts(const ordered_json& parts, const std::string& path) {
  std::string text;
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string part_path = fmt::format("{}[{}]", path, i);
    if (!parts[i].is_object()) fail("{}: must be an object", part_path);
    if (require_string(parts[i], "type", part_path) != "text") {
      fail("{}.type: only text content parts are supported", part_path);
    }
    if (i > 0) text += '\n';
    text += require_string(parts[i], "text", part_path);
  }
  return text;
}

// nullopt when the content is null or absent.
std::optional<std::string> parse_content(const ordered_json& message, const std::string& path) {
  const ordered_json* content = find_field(message, "content");
  if (content == nullptr || content->is_null()) return std::nullopt;
  const std::string content_path = path + ".content";
  if (content->is_string()) return content->get<std::string>();
  if (content->is_array()) return join_text_parts(*content, content_path);
  fail("{}: must be a string, an array of text parts or null", content_path);
}

ordered_json parse_arguments(const std::string& arguments, const std::string& path) {
  std::optional<ordered_json> parsed = parse_json_object(arguments);
  if (!parsed) fail("{}: must hold a JSON object (of at most {} levels)", path, kMaxJsonDepth);
  return *std::move(parsed);
}

}  // namespace

std::optional<ordered_json> parse_json_object(std::string_view text) {
  bool too_deep = false;
  const auto limit_depth = [&too_deep](int depth, ordered_json::parse_event_t, ordered_json&) {
    too_deep = too_deep || depth > kMaxJsonDepth;
    return !too_deep;  // stop building the value once it is known to be rejected
  };
  ordered_json value = ordered_json::parse(text, limit_depth, /*allow_exceptions=*/false);
  if (too_deep || !value.is_object()) return std::nullopt;  // a parse error reads as discarded
  return value;
}

namespace {

ToolCall parse_tool_call(const ordered_json& call, const std::string& path) {
  if (!call.is_object()) fail("{}: must be an object", path);
  require_function_type(call, path);
  const std::string function_path = path + ".function";
  const ordered_json& function = require_object(call, "function", path);
  ToolCall parsed{.id = require_string(call, "id", path),
                  .name = require_string(function, "name", function_path),
                  .arguments = require_string(function, "arguments", function_path)};
  parse_arguments(parsed.arguments, function_path + ".arguments");
  return parsed;
}

std::vector<ToolCall> parse_tool_calls(const ordered_json& message, const std::string& path) {
  const ordered_json* calls = find_field(message, "tool_calls");
  if (calls == nullptr || calls->is_null()) return {};
  const std::string calls_path = path + ".tool_calls";
  if (!calls->is_array()) fail("{}: must be an array", calls_path);
  std::vector<ToolCall> parsed;
  for (size_t i = 0; i < calls->size(); ++i) {
    parsed.push_back(parse_tool_call((*calls)[i], fmt::format("{}[{}]", calls_path, i)));
  }
  return parsed;
}

std::string parse_role(const ordered_json& message, const std::string& path) {
  const std::string& role = require_string(message, "role", path);
  if (role == "developer") return "system";
  if (role == "system" || role == "user" || role == "assistant" || role == "tool") return role;
  fail("{}.role: unknown role '{}' (expected system, developer, user, assistant or tool)", path, role);
}

// The function a tool result belongs to: its own `name`, else the earlier assistant tool call
// whose id it answers.
std::string resolve_tool_name(const ordered_json& message, const std::string& path,
                              const std::vector<ChatMessage>& earlier, const std::string& call_id) {
  if (auto name = optional_string(message, "name", path)) return *name;
  for (auto it = earlier.rbegin(); it != earlier.rend() && !call_id.empty(); ++it) {
    for (const ToolCall& call : it->tool_calls) {
      if (call.id == call_id) return call.name;
    }
  }
  fail("{}: tool message needs a 'name' or a 'tool_call_id' matching an earlier assistant tool call",
       path);
}

ChatMessage parse_message(const ordered_json& message, const std::string& path,
                          const std::vector<ChatMessage>& earlier) {
  if (!message.is_object()) fail("{}: must be an object", path);
  ChatMessage parsed;
  parsed.role = parse_role(message, path);
  if (parsed.role == "assistant") parsed.tool_calls = parse_tool_calls(message, path);
  std::optional<std::string> content = parse_content(message, path);
  if (!content && parsed.tool_calls.empty()) {
    fail("{}.content: required for a {} message{}", path, parsed.role,
         parsed.role == "assistant" ? " without tool_calls" : "");
  }
  parsed.content = content.value_or("");
  if (parsed.role == "tool") {
    parsed.tool_call_id = optional_string(message, "tool_call_id", path).value_or("");
    parsed.name = resolve_tool_name(message, path, earlier, parsed.tool_call_id);
  }
  return parsed;
}

// ---------------------------------------------------------------------------------------------
// Rendering

constexpr std::string_view kEndOfTurn = "<end_of_sentence>\n";
constexpr std::string_view kAssistantHeader = "<beginning_of_sentence>ai name=assistant\n";

// The template's tool instructions; `''name''` inside its single-quoted Jinja string renders as
// `name` without quotes, so the model was shown `{name: ..., arguments: ...}`.
constexpr std::string_view kToolsFooter =
    "</tools>\n\n"
    "If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide "
    "tool-name and json-object of arguments, following the format below:\n"
    "<tool_calls>\n"
    "{name: <tool-name-1>, arguments: <args-json-object-1>}\n"
    "...\n"
    "</tool_calls><end_of_sentence>\n";

class PieceWriter {
 public:
  void trusted(std::string_view text) { append(text, true); }
  void untrusted(std::string_view text) { append(text, false); }
  std::vector<ChatPiece> take() { return std::move(pieces_); }

 private:
  void append(std::string_view text, bool trusted) {
    if (text.empty()) return;
    if (pieces_.empty() || pieces_.back().trusted != trusted) pieces_.push_back({"", trusted});
    pieces_.back().text += text;
  }
  std::vector<ChatPiece> pieces_;
};

// The template gathers every system message's text, wherever it stands, into one leading turn.
void render_system_turn(PieceWriter& out, const std::vector<ChatMessage>& messages) {
  std::string system_prompt;
  for (const ChatMessage& message : messages) {
    if (message.role == "system") system_prompt += message.content;
  }
  if (system_prompt.empty()) return;
  out.trusted("<beginning_of_sentence>system ai_setting=assistant\n");
  out.untrusted(system_prompt);
  out.trusted(kEndOfTurn);
}

void render_tools_turn(PieceWriter& out, const std::vector<ordered_json>& tools) {
  if (tools.empty()) return;
  out.trusted("<beginning_of_sentence>system tool_setting=tools\nYou are provided with these tools:\n<tools>\n");
  for (const ordered_json& tool : tools) {
    out.untrusted(python_json_dumps(tool) + "\n");
  }
  out.trusted(kToolsFooter);
}

// The block the model writes when it calls tools: the markers are its added tokens, each call
// one `{"name": ..., "arguments": {...}}` line with the client's argument key order.
void render_tool_calls(PieceWriter& out, const std::vector<ToolCall>& calls, const std::string& path) {
  if (calls.empty()) return;
  out.trusted("<tool_calls>\n");
  for (size_t i = 0; i < calls.size(); ++i) {
    const std::string arguments_path = fmt::format("{}.tool_calls[{}].function.arguments", path, i);
    const ordered_json line = {{"name", calls[i].name},
                               {"arguments", parse_arguments(calls[i].arguments, arguments_path)}};
    out.untrusted(python_json_dumps(line) + "\n");
  }
  out.trusted("</tool_calls>");
}

void render_user_turn(PieceWriter& out, const ChatMessage& message) {
  out.trusted("<beginning_of_sentence>user name=user\n");
  out.untrusted(message.content);
  out.trusted(kEndOfTurn);
}

void render_assistant_turn(PieceWriter& out, const ChatMessage& message, const std::string& path) {
  out.trusted(kAssistantHeader);
  out.untrusted(message.content);  // the tool-call block follows the text with no separator
  render_tool_calls(out, message.tool_calls, path);
  out.trusted(kEndOfTurn);
}

// A run of consecutive tool messages becomes one tool turn holding all their results, which is
// what the template renders for one tool message whose content lists several results. Returns
// the index after the run.
size_t render_tool_turn(PieceWriter& out, const std::vector<ChatMessage>& messages, size_t first) {
  out.trusted("<beginning_of_sentence>tool name=tools\n");
  size_t i = first;
  for (; i < messages.size() && messages[i].role == "tool"; ++i) {
    out.trusted("tool name: ");
    out.untrusted(messages[i].name);
    out.trusted("\ntool result: ");
    out.untrusted(messages[i].content);
    out.trusted("\n\n");
  }
  out.trusted(kEndOfTurn);
  return i;
}

void render_conversation(PieceWriter& out, const std::vector<ChatMessage>& messages) {
  size_t i = 0;
  while (i < messages.size()) {
    const ChatMessage& message = messages[i];
    if (message.role == "tool") {
      i = render_tool_turn(out, messages, i);
      continue;
    }
    if (message.role == "user") {
      render_user_turn(out, message);
    } else if (message.role == "assistant") {
      render_assistant_turn(out, message, fmt::format("messages[{}]", i));
    } else if (message.role != "system") {
      fail("messages[{}].role: unknown role '{}'", i, message.role);
    }
    ++i;
  }
}

}  // namespace

std::string python_json_dumps(const ordered_json& value) {
  std::string out;
  append_python_json(out, value);
  return out;
}

std::vector<ChatMessage> parse_chat_messages(const ordered_json& messages) {
  if (!messages.is_array()) fail("messages: must be an array of message objects");
  if (messages.empty()) fail("messages: must not be empty");
  std::vector<ChatMessage> parsed;
  for (size_t i = 0; i < messages.size(); ++i) {
    parsed.push_back(parse_message(messages[i], fmt::format("messages[{}]", i), parsed));
  }
  return parsed;
}

// A null `tools` means no tools, as an absent one does.
std::vector<ordered_json> parse_chat_tools(const ordered_json& tools) {
  if (tools.is_null()) return {};
  if (!tools.is_array()) fail("tools: must be an array");
  std::vector<ordered_json> functions;
  for (size_t i = 0; i < tools.size(); ++i) {
    const std::string path = fmt::format("tools[{}]", i);
    if (!tools[i].is_object()) fail("{}: must be an object", path);
    require_function_type(tools[i], path);
    const ordered_json& function = require_object(tools[i], "function", path);
    require_string(function, "name", path + ".function");
    functions.push_back(function);
  }
  return functions;
}

std::vector<ChatPiece> render_chat(const std::vector<ChatMessage>& messages,
                                   const std::vector<ordered_json>& tools,
                                   bool add_generation_prompt) {
  PieceWriter out;
  out.trusted("<begin_of_document>");
  render_system_turn(out, messages);
  render_tools_turn(out, tools);
  render_conversation(out, messages);
  if (add_generation_prompt) out.trusted(kAssistantHeader);
  return out.take();
}

std::string join_pieces(const std::vector<ChatPiece>& pieces) {
  std::string text;
  for (const ChatPiece& piece : pieces) text += piece.text;
  return text;
}

std::vector<int32_t> encode_chat(const Tokenizer& tokenizer, const std::vector<ChatPiece>& pieces) {
  // The whole text at once, as the reference tokenizes the rendered template; a special token
  // only where its text lies within one trusted piece.
  std::string text;
  std::vector<std::pair<size_t, size_t>> trusted;  // [begin, end) of each trusted piece
  for (const ChatPiece& piece : pieces) {
    if (piece.trusted) trusted.emplace_back(text.size(), text.size() + piece.text.size());
    text += piece.text;
  }
  return tokenizer.encode(text, [&](int32_t id, size_t begin, size_t end) {
    if (!tokenizer.is_special(id)) return true;
    return std::any_of(trusted.begin(), trusted.end(),
                       [&](const auto& range) { return range.first <= begin && end <= range.second; });
  });
}

}  // namespace m1
