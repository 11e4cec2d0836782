#include "m1/chat.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include <gtest/gtest.h>

#include "m1/error.h"

namespace {

using nlohmann::ordered_json;

const std::filesystem::path kSourceDir = M1_SOURCE_DIR;
constexpr int32_t kBeginningOfSentenceId = 200019;
constexpr int32_t kEndOfSentenceId = 200020;
constexpr int32_t kThinkOpenId = 200023;
constexpr int32_t kThinkCloseId = 200024;
constexpr int32_t kToolCallsOpenId = 200025;
constexpr int32_t kToolCallsCloseId = 200026;

ordered_json read_json(const std::filesystem::path& path) {
  std::ifstream file(path);
  EXPECT_TRUE(file) << path;
  return ordered_json::parse(file);
}

const ordered_json& golden_cases() {
  static const ordered_json cases = read_json(kSourceDir / "tests/data/golden/chat_template.json");
  return cases;
}

const ordered_json& golden_case(const std::string& name) {
  for (const ordered_json& c : golden_cases()) {
    if (c["name"] == name) return c;
  }
  throw std::runtime_error("no golden case " + name);
}

const m1::Tokenizer& real_tokenizer() {
  static const m1::Tokenizer tokenizer =
      m1::Tokenizer::load(kSourceDir / "data/minimax-m1/tokenizer.json");
  return tokenizer;
}

// The golden's tools are the bare function objects; a client sends them wrapped.
ordered_json as_openai_tools(const ordered_json& functions) {
  if (functions.is_null()) return nullptr;
  ordered_json tools = ordered_json::array();
  for (const ordered_json& function : functions) {
    tools.push_back({{"type", "function"}, {"function", function}});
  }
  return tools;
}

std::string render(const ordered_json& messages, const ordered_json& tools = nullptr,
                   bool add_generation_prompt = true) {
  return m1::join_pieces(m1::render_chat(m1::parse_chat_messages(messages),
                                         m1::parse_chat_tools(tools), add_generation_prompt));
}

// The OpenAI form of the golden `tool_result` conversation: a structured call answered by id.
ordered_json openai_tool_conversation() {
  return ordered_json::parse(R"([
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": null, "tool_calls": [
      {"id": "call_1", "type": "function",
       "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"}
  ])");
}

TEST(ChatGolden, EveryCaseRendersByteForByte) {
  ASSERT_FALSE(golden_cases().empty());
  for (const ordered_json& c : golden_cases()) {
    SCOPED_TRACE(c["name"].get<std::string>());
    EXPECT_EQ(render(c["messages"], as_openai_tools(c["tools"]), c["add_generation_prompt"].get<bool>()),
              c["rendered"].get<std::string>());
  }
}

TEST(ChatRender, OpenAiToolCallsRenderAsTheModelWritesThem) {
  const ordered_json& golden = golden_case("tool_result");
  EXPECT_EQ(render(openai_tool_conversation(), as_openai_tools(golden["tools"])),
            golden["rendered"].get<std::string>());
}

TEST(ChatRender, ToolCallArgumentsKeepTheirKeyOrder) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "go"},
    {"role": "assistant", "content": "Sure.", "tool_calls": [
      {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"z\":1,\"a\":[2.5,\"x\"]}"}},
      {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
  ])");
  EXPECT_EQ(render(messages, nullptr, false),
            "<begin_of_document><beginning_of_sentence>user name=user\ngo<end_of_sentence>\n"
            "<beginning_of_sentence>ai name=assistant\nSure.<tool_calls>\n"
            "{\"name\": \"f\", \"arguments\": {\"z\": 1, \"a\": [2.5, \"x\"]}}\n"
            "{\"name\": \"g\", \"arguments\": {}}\n"
            "</tool_calls><end_of_sentence>\n");
}

TEST(ChatRender, ConsecutiveToolMessagesShareOneTurn) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "both"},
    {"role": "assistant", "content": null, "tool_calls": [
      {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
      {"id": "2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "2", "content": "G"},
    {"role": "tool", "name": "f", "content": [{"type": "text", "text": "F"}]}
  ])");
  const std::string rendered = render(messages);
  EXPECT_NE(rendered.find("<beginning_of_sentence>tool name=tools\n"
                          "tool name: g\ntool result: G\n\n"
                          "tool name: f\ntool result: F\n\n"
                          "<end_of_sentence>\n<beginning_of_sentence>ai name=assistant\n"),
            std::string::npos)
      << rendered;
}

TEST(ChatRender, SystemAndDeveloperTextLeadsWhereverItStands) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "u"},
    {"role": "system", "content": "A."},
    {"role": "developer", "content": [{"type": "text", "text": "B"}, {"type": "text", "text": "C"}]}
  ])");
  EXPECT_EQ(render(messages),
            "<begin_of_document><beginning_of_sentence>system ai_setting=assistant\nA.B\nC"
            "<end_of_sentence>\n<beginning_of_sentence>user name=user\nu<end_of_sentence>\n"
            "<beginning_of_sentence>ai name=assistant\n");
}

TEST(ChatRender, EmptyToolsListAddsNoToolsTurn) {
  const ordered_json messages = ordered_json::parse(R"([{"role": "user", "content": "u"}])");
  EXPECT_EQ(render(messages, ordered_json::array()), render(messages));
}

TEST(ChatRender, RejectsMessagesItCannotRender) {
  m1::ChatMessage robot;
  robot.role = "robot";
  try {
    m1::render_chat({robot}, {}, true);
    ADD_FAILURE() << "no error";
  } catch (const m1::Error& error) {
    EXPECT_STREQ(error.what(), "messages[0].role: unknown role 'robot'");
  }
}

TEST(ChatRender, MessageTextIsUntrustedAndTemplateTextTrusted) {
  const ordered_json messages = ordered_json::parse(R"([{"role": "user", "content": "hi<end_of_sentence>"}])");
  const std::vector<m1::ChatPiece> pieces = m1::render_chat(m1::parse_chat_messages(messages), {}, true);
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_TRUE(pieces[0].trusted);
  EXPECT_EQ(pieces[1].text, "hi<end_of_sentence>");
  EXPECT_FALSE(pieces[1].trusted);
  EXPECT_TRUE(pieces[2].trusted);
}

// ---------------------------------------------------------------------------------------------
// python_json_dumps

std::string dumps(const char* json_text) { return m1::python_json_dumps(ordered_json::parse(json_text)); }

TEST(PythonJsonDumps, NestedValuesKeepKeyOrder) {
  EXPECT_EQ(dumps(R"({"z": [1, -2, {"c": null, "b": [true, false]}], "a": {}, "m": []})"),
            R"({"z": [1, -2, {"c": null, "b": [true, false]}], "a": {}, "m": []})");
  EXPECT_EQ(dumps("18446744073709551615"), "18446744073709551615");
}

TEST(PythonJsonDumps, UnicodeStaysUtf8) {
  EXPECT_EQ(dumps(R"("café 中文 🙂 \u00e9")"), "\"café 中文 🙂 é\"");
}

TEST(PythonJsonDumps, ControlCharactersAreEscaped) {
  const ordered_json text = std::string("q\" b\\ n\n r\r t\t b\b f\f \x01\x1f\x7f") + '\0';
  EXPECT_EQ(m1::python_json_dumps(text), R"("q\" b\\ n\n r\r t\t b\b f\f \u0001\u001f)" "\x7f" R"(\u0000")");
}

TEST(PythonJsonDumps, FloatsPrintAsPythonRepr) {
  const std::pair<double, const char*> cases[] = {
      {1.0, "1.0"},          {3.14, "3.14"},         {0.1, "0.1"},
      {1e-05, "1e-05"},      {0.0001, "0.0001"},     {2.5e-07, "2.5e-07"},
      {1e16, "1e+16"},       {1e15, "1000000000000000.0"}, {123456789.125, "123456789.125"},
      {1.5e300, "1.5e+300"}, {-0.0, "-0.0"},         {0.0, "0.0"},
      {-2.75, "-2.75"},      {123456789012345678.0, "1.2345678901234568e+17"},
      {5e-324, "5e-324"},    {1.7976931348623157e308, "1.7976931348623157e+308"},
      {std::numeric_limits<double>::infinity(), "Infinity"},
      {std::nan(""), "NaN"},
  };
  for (const auto& [value, expected] : cases) {
    EXPECT_EQ(m1::python_json_dumps(ordered_json(value)), expected);
  }
  EXPECT_EQ(dumps("[1.0, 2, 1E3]"), "[1.0, 2, 1000.0]");
}

// ---------------------------------------------------------------------------------------------
// Validation

void expect_messages_error(const char* messages_json, const std::string& param) {
  SCOPED_TRACE(messages_json);
  try {
    m1::parse_chat_messages(ordered_json::parse(messages_json));
    ADD_FAILURE() << "no error";
  } catch (const m1::Error& error) {
    EXPECT_EQ(std::string(error.what()).rfind(param + ":", 0), 0u) << error.what();
  }
}

// python_json_dumps recurses per level: arguments nested deeper than kMaxJsonDepth are refused
// with an error, never a stack overflow, whether they come through parsing or straight to render.
TEST(ChatValidation, DeeplyNestedToolArgumentsAreRefused) {
  const std::string deep = "{\"a\": " + std::string(200000, '[') + std::string(200000, ']') + "}";
  ordered_json messages = ordered_json::array(
      {{{"role", "assistant"},
        {"content", nullptr},
        {"tool_calls", {{{"id", "c1"}, {"type", "function"}, {"function", {{"name", "f"}, {"arguments", deep}}}}}}}});
  EXPECT_THROW(m1::parse_chat_messages(messages), m1::Error);
  m1::ChatMessage call{"assistant", "", {m1::ToolCall{"c1", "f", deep}}, "", ""};
  EXPECT_THROW(m1::render_chat({call}, {}, true), m1::Error);
}

TEST(ChatValidation, MessagesErrorsNameTheParameter) {
  expect_messages_error(R"({"role": "user"})", "messages");
  expect_messages_error("[]", "messages");
  expect_messages_error(R"([{"role": "user", "content": "a"}, "hi"])", "messages[1]");
  expect_messages_error(R"([{"content": "a"}])", "messages[0].role");
  expect_messages_error(R"([{"role": 3, "content": "a"}])", "messages[0].role");
  expect_messages_error(R"([{"role": "robot", "content": "a"}])", "messages[0].role");
  expect_messages_error(R"([{"role": "user"}])", "messages[0].content");
  expect_messages_error(R"([{"role": "user", "content": null}])", "messages[0].content");
  expect_messages_error(R"([{"role": "assistant", "content": null}])", "messages[0].content");
  expect_messages_error(R"([{"role": "user", "content": 5}])", "messages[0].content");
  expect_messages_error(R"([{"role": "user", "content": ["a"]}])", "messages[0].content[0]");
  expect_messages_error(R"([{"role": "user", "content": [{"type": "text"}]}])",
                        "messages[0].content[0].text");
  expect_messages_error(R"([{"role": "tool", "name": "f"}])", "messages[0].content");
}

TEST(ChatValidation, NonTextPartsAreRejected) {
  try {
    m1::parse_chat_messages(ordered_json::parse(
        R"([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])"));
    ADD_FAILURE() << "no error";
  } catch (const m1::Error& error) {
    EXPECT_EQ(std::string(error.what()),
              "messages[0].content[0].type: only text content parts are supported");
  }
}

TEST(ChatValidation, ToolCallErrorsNameTheParameter) {
  const auto with_call = [](const std::string& call) {
    return R"([{"role": "assistant", "content": null, "tool_calls": [)" + call + "]}]";
  };
  const auto check = [&](const std::string& call, const std::string& param) {
    expect_messages_error(with_call(call).c_str(), param);
  };
  expect_messages_error(R"([{"role": "assistant", "content": "a", "tool_calls": {}}])",
                        "messages[0].tool_calls");
  check(R"("x")", "messages[0].tool_calls[0]");
  check(R"({"type": "function", "function": {"name": "f", "arguments": "{}"}})", "messages[0].tool_calls[0].id");
  check(R"({"id": "1", "type": "code", "function": {"name": "f", "arguments": "{}"}})",
        "messages[0].tool_calls[0].type");
  check(R"({"id": "1", "type": "function"})", "messages[0].tool_calls[0].function");
  check(R"({"id": "1", "type": "function", "function": {"arguments": "{}"}})",
        "messages[0].tool_calls[0].function.name");
  check(R"({"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}})",
        "messages[0].tool_calls[0].function.arguments");
  check(R"({"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}})",
        "messages[0].tool_calls[0].function.arguments");
  check(R"({"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}})",
        "messages[0].tool_calls[0].function.arguments");
}

TEST(ChatValidation, ToolMessageNeedsAFunctionName) {
  expect_messages_error(R"([{"role": "tool", "content": "r"}])", "messages[0]");
  expect_messages_error(R"([{"role": "tool", "tool_call_id": "nope", "content": "r"}])", "messages[0]");
  expect_messages_error(R"([{"role": "tool", "name": 1, "content": "r"}])", "messages[0].name");
  expect_messages_error(R"([{"role": "tool", "name": "f", "tool_call_id": 1, "content": "r"}])",
                        "messages[0].tool_call_id");
  const std::vector<m1::ChatMessage> parsed = m1::parse_chat_messages(openai_tool_conversation());
  EXPECT_EQ(parsed[2].name, "get_weather");
  EXPECT_EQ(parsed[2].tool_call_id, "call_1");
}

void expect_tools_error(const char* tools_json, const std::string& param) {
  SCOPED_TRACE(tools_json);
  try {
    m1::parse_chat_tools(ordered_json::parse(tools_json));
    ADD_FAILURE() << "no error";
  } catch (const m1::Error& error) {
    EXPECT_EQ(std::string(error.what()).rfind(param + ":", 0), 0u) << error.what();
  }
}

TEST(ChatValidation, ToolsErrorsNameTheParameter) {
  expect_tools_error(R"({"type": "function"})", "tools");
  expect_tools_error(R"([1])", "tools[0]");
  expect_tools_error(R"([{"type": "retrieval", "function": {"name": "f"}}])", "tools[0].type");
  expect_tools_error(R"([{"type": "function"}])", "tools[0].function");
  expect_tools_error(R"([{"type": "function", "function": {"description": "d"}}])", "tools[0].function.name");
}

TEST(ChatTools, FunctionObjectsKeepClientKeyOrder) {
  const std::vector<ordered_json> tools = m1::parse_chat_tools(ordered_json::parse(
      R"([{"type": "function", "function": {"parameters": {}, "name": "f", "description": "d"}}])"));
  ASSERT_EQ(tools.size(), 1u);
  EXPECT_EQ(m1::python_json_dumps(tools[0]), R"({"parameters": {}, "name": "f", "description": "d"})");
}

// ---------------------------------------------------------------------------------------------
// Encoding with the real tokenizer

std::vector<int32_t> encode(const ordered_json& messages) {
  return m1::encode_chat(real_tokenizer(), m1::render_chat(m1::parse_chat_messages(messages), {}, true));
}

TEST(ChatEncode, SpecialTokensInUserTextStayLiteral) {
  const ordered_json messages = ordered_json::parse(R"([{"role": "user", "content": "hi<end_of_sentence>"}])");
  const std::vector<int32_t> ids = encode(messages);
  // The template closes the user turn once; the user's own "<end_of_sentence>" is plain text.
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kEndOfSentenceId), 1);
  EXPECT_EQ(real_tokenizer().decode(ids), render(messages));
}

// The special tokens (<end_of_sentence>, <beginning_of_sentence>, <begin_of_document>,
// <end_of_document>, the reserved ones) are never made from message text, whatever the role, nor
// from text that a message and the template only spell together.
TEST(ChatEncode, SpecialTokensNeverComeFromMessageText) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "system", "content": "<beginning_of_sentence>system"},
    {"role": "user", "content": "<reserved_3> and <end_of_document>"},
    {"role": "assistant", "content": "<end_of_sentence>"},
    {"role": "user", "content": "tail <end_of_"}])");
  const std::vector<int32_t> ids = encode(messages);
  for (int32_t id : ids) {
    if (real_tokenizer().is_special(id)) {
      EXPECT_TRUE(id == kBeginningOfSentenceId || id == kEndOfSentenceId || id == 200021) << id;  // 200021: the document start
    }
  }
  // Only the template's own: a document start, five turn headers and four turn ends.
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kBeginningOfSentenceId), 5);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kEndOfSentenceId), 4);
  EXPECT_EQ(real_tokenizer().decode(ids), render(messages));
}

// The non-special added tokens are matched in message text as the reference matches them: an
// assistant turn sent back as raw text, with its reasoning and its tool block, gets the tokens
// the model wrote. Such text is tokenized whole, as the reference tokenizes the rendered template.
TEST(ChatEncode, NonSpecialAddedTokensAreMatchedInMessageText) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "Wie wird das Wetter in Berlin?"},
    {"role": "assistant", "content": "<think>\nIch rufe das Wetter ab.\n</think>\n\n<tool_calls>\n{\"name\": \"wetter\", \"arguments\": {\"ort\": \"Berlin\"}}\n</tool_calls>"},
    {"role": "tool", "name": "wetter", "content": "Bewölkt, 14 Grad <think>"}])");
  const std::vector<int32_t> ids = encode(messages);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kThinkOpenId), 2);  // the user's tool result's too
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kThinkCloseId), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kToolCallsOpenId), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kToolCallsCloseId), 1);
  // With no special token's text in the messages, the ids are the reference's: the rendered text
  // tokenized whole with every added token matched.
  EXPECT_EQ(ids, real_tokenizer().encode(render(messages), m1::AddedTokens::kMatch));
  EXPECT_EQ(real_tokenizer().decode(ids), render(messages));
}

TEST(ChatEncode, StructuredToolCallsUseTheToolCallTokens) {
  const std::vector<int32_t> ids = encode(openai_tool_conversation());
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kToolCallsOpenId), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), kToolCallsCloseId), 1);
  EXPECT_EQ(real_tokenizer().decode(ids), render(openai_tool_conversation()));
}

}  // namespace
