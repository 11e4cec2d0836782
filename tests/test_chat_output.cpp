#include "m1/chat_output.h"

#include <cctype>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

namespace {

using m1::ChatOutputDelta;
using m1::ChatOutputOptions;
using m1::ChatOutputParser;
using m1::ToolCall;

// Everything a parse produced, deltas concatenated.
struct Parsed {
  std::string reasoning;
  std::string content;
  std::vector<ToolCall> calls;
  bool saw_tool_calls = false;

  void add(ChatOutputDelta delta) {
    reasoning += delta.reasoning;
    content += delta.content;
    for (ToolCall& call : delta.tool_calls) calls.push_back(std::move(call));
  }
};

// Calls compared by what they say; ids are random.
std::vector<std::pair<std::string, std::string>> call_texts(const std::vector<ToolCall>& calls) {
  std::vector<std::pair<std::string, std::string>> texts;
  for (const ToolCall& call : calls) texts.emplace_back(call.name, call.arguments);
  return texts;
}

void expect_same(const Parsed& actual, const Parsed& expected) {
  EXPECT_EQ(actual.reasoning, expected.reasoning);
  EXPECT_EQ(actual.content, expected.content);
  EXPECT_EQ(call_texts(actual.calls), call_texts(expected.calls));
  EXPECT_EQ(actual.saw_tool_calls, expected.saw_tool_calls);
}

Parsed parse_pieces(const std::vector<std::string>& pieces, ChatOutputOptions options = {}) {
  ChatOutputParser parser(options);
  Parsed parsed;
  for (const std::string& piece : pieces) parsed.add(parser.push(piece));
  parsed.add(parser.finish());
  parsed.saw_tool_calls = parser.saw_tool_calls();
  return parsed;
}

Parsed parse(const std::string& text, ChatOutputOptions options = {}) {
  return parse_pieces({text}, options);
}

std::vector<std::string> bytewise(const std::string& text) {
  std::vector<std::string> pieces;
  for (const char ch : text) pieces.emplace_back(1, ch);
  return pieces;
}

std::vector<std::string> split_at(const std::string& text, std::vector<size_t> cuts) {
  std::vector<std::string> pieces;
  size_t start = 0;
  for (const size_t cut : cuts) {
    pieces.push_back(text.substr(start, cut - start));
    start = cut;
  }
  pieces.push_back(text.substr(start));
  return pieces;
}

std::string call_line(const std::string& name, const std::string& arguments) {
  return R"({"name": ")" + name + R"(", "arguments": )" + arguments + "}";
}

// A sample with every construct: reasoning holding tool tags, stripped blank lines, a held "<",
// a tool block with blank, good and malformed lines, and text after the block.
const std::string kSample =
    "<think>\nPlan: call <tool_calls> maybe.\n</think>\n\nLet me check <this>.\n<tool_calls>\n" +
    call_line("get_weather", R"({"location": "Paris", "unit": "C"})") + "\n  \nnot json\n" +
    call_line("get_time", "{}") + "\n</tool_calls>\nDone <th";

// ---------------------------------------------------------------------------------------------
// Reasoning and content

TEST(ChatOutput, PlainContent) {
  const Parsed parsed = parse("Hello, world! 1 < 2 and a <b>tag</b>.");
  EXPECT_EQ(parsed.content, "Hello, world! 1 < 2 and a <b>tag</b>.");
  EXPECT_EQ(parsed.reasoning, "");
  EXPECT_TRUE(parsed.calls.empty());
  EXPECT_FALSE(parsed.saw_tool_calls);
}

TEST(ChatOutput, ReasoningThenContent) {
  const Parsed parsed = parse("<think>\nTwo and two.\n</think>\n\nThe answer is 4.");
  EXPECT_EQ(parsed.reasoning, "\nTwo and two.\n");
  EXPECT_EQ(parsed.content, "The answer is 4.");
}

TEST(ChatOutput, StripsOnlyTheNewlinesRightAfterThinkClose) {
  EXPECT_EQ(parse("<think>r</think>\n\n\nA\n\nB\n").content, "A\n\nB\n");
  EXPECT_EQ(parse("<think>r</think>  \nA").content, "  \nA");
  EXPECT_EQ(parse("\n<think>r</think>A").content, "\nA");
  // Stripping continues across pushes and survives a held "<" that turns out to be text.
  EXPECT_EQ(parse_pieces({"<think>r</think>\n", "\n<", "b>\n"}).content, "<b>\n");
}

TEST(ChatOutput, UnterminatedReasoningStaysReasoning) {
  const Parsed parsed = parse("<think>still thinking </thi");
  EXPECT_EQ(parsed.reasoning, "still thinking </thi");
  EXPECT_EQ(parsed.content, "");
}

TEST(ChatOutput, HoldsBackOnlyWhatCouldBeATag) {
  ChatOutputParser parser;
  EXPECT_EQ(parser.push("a < b, c <thi").content, "a < b, c ");
  EXPECT_EQ(parser.push("s").content, "<this");
  EXPECT_EQ(parser.push(" <tool_").content, " ");
  EXPECT_EQ(parser.push("x").content, "<tool_x");
  EXPECT_TRUE(parser.push("<think>").empty());
  EXPECT_EQ(parser.push("idea <t").reasoning, "idea <t");  // only </think> ends reasoning
  EXPECT_EQ(parser.push(" </thin").reasoning, " ");
  EXPECT_EQ(parser.finish().reasoning, "</thin");
}

TEST(ChatOutput, TagsSplitAnywhereParseAsOnePush) {
  const Parsed whole = parse(kSample);
  ASSERT_EQ(whole.calls.size(), 2u);
  for (size_t first = 0; first <= kSample.size(); ++first) {
    for (size_t second = first; second <= kSample.size(); ++second) {
      SCOPED_TRACE(testing::Message() << "cuts at " << first << ", " << second);
      expect_same(parse_pieces(split_at(kSample, {first, second})), whole);
      if (testing::Test::HasFailure()) return;
    }
  }
  expect_same(parse_pieces(bytewise(kSample)), whole);
}

TEST(ChatOutput, SampleParsesIntoItsParts) {
  const Parsed parsed = parse(kSample);
  EXPECT_EQ(parsed.reasoning, "\nPlan: call <tool_calls> maybe.\n");
  EXPECT_EQ(parsed.content, "Let me check <this>.\nnot json\n\nDone <th");
  ASSERT_EQ(parsed.calls.size(), 2u);
  EXPECT_EQ(parsed.calls[0].name, "get_weather");
  EXPECT_EQ(parsed.calls[0].arguments, R"({"location": "Paris", "unit": "C"})");
  EXPECT_EQ(parsed.calls[1].name, "get_time");
  EXPECT_EQ(parsed.calls[1].arguments, "{}");
}

TEST(ChatOutput, InvalidUtf8PassesThrough) {
  const Parsed parsed = parse("\xff\xfe<think>\xc3</think>\n\x80<tool_calls>\n{\"name\": \"\xff\"}\n");
  EXPECT_EQ(parsed.reasoning, "\xc3");
  EXPECT_EQ(parsed.content, "\xff\xfe\x80<tool_calls>\n{\"name\": \"\xff\"}\n");  // unterminated: in order
}

// ---------------------------------------------------------------------------------------------
// Tool calls

TEST(ChatOutput, OneToolCall) {
  const Parsed parsed = parse("<tool_calls>\n" + call_line("get_weather", R"({"location": "Paris"})") +
                              "\n</tool_calls>");
  ASSERT_EQ(parsed.calls.size(), 1u);
  EXPECT_EQ(parsed.calls[0].name, "get_weather");
  EXPECT_EQ(parsed.calls[0].arguments, R"({"location": "Paris"})");
  EXPECT_EQ(parsed.content, "");
  EXPECT_TRUE(parsed.saw_tool_calls);
}

TEST(ChatOutput, TwoToolCallsEachEmittedWhenItsLineEnds) {
  ChatOutputParser parser;
  EXPECT_TRUE(parser.push("<tool_calls>\n" + call_line("first", R"({"n": 1})")).empty());
  EXPECT_FALSE(parser.saw_tool_calls());
  ChatOutputDelta delta = parser.push("\n" + call_line("second", "{}"));
  ASSERT_EQ(delta.tool_calls.size(), 1u);
  EXPECT_EQ(delta.tool_calls[0].name, "first");
  EXPECT_TRUE(parser.saw_tool_calls());
  delta = parser.push("</tool_calls>");  // the closing tag ends the last line too
  ASSERT_EQ(delta.tool_calls.size(), 1u);
  EXPECT_EQ(delta.tool_calls[0].name, "second");
  EXPECT_TRUE(parser.finish().empty());
}

TEST(ChatOutput, ArgumentsAsAStringHoldingJson) {
  const Parsed parsed = parse("<tool_calls>\n" + call_line("f", R"("{\"x\": [1, 2.5], \"a\": \"é\"}")") +
                              "\n</tool_calls>");
  ASSERT_EQ(parsed.calls.size(), 1u);
  EXPECT_EQ(parsed.calls[0].arguments, R"({"x": [1, 2.5], "a": "é"})");
}

TEST(ChatOutput, ArgumentKeyOrderIsKept) {
  const std::string arguments = R"({"zeta": 1, "alpha": {"b": true, "a": null}, "mid": "日本"})";
  const Parsed parsed = parse("<tool_calls>\n" + call_line("f", arguments) + "\n</tool_calls>");
  ASSERT_EQ(parsed.calls.size(), 1u);
  EXPECT_EQ(parsed.calls[0].arguments, arguments);
}

TEST(ChatOutput, ContentBeforeAndAfterTheBlock) {
  const Parsed parsed = parse("Let me check.\n<tool_calls>\n" + call_line("f", "{}") +
                              "\n</tool_calls>\nDone.");
  EXPECT_EQ(parsed.content, "Let me check.\n\nDone.");
  EXPECT_EQ(parsed.calls.size(), 1u);
}

TEST(ChatOutput, MalformedLinesBecomeContentAndGoodOnesStillCall) {
  const std::vector<std::string> malformed = {
      R"({"name": "broken", )",
      "[1, 2]",
      R"({"name": "no_arguments"})",
      R"({"name": 3, "arguments": {}})",
      R"({"name": "", "arguments": {}})",
      R"({"name": "f", "arguments": [1]})",
      R"({"name": "f", "arguments": "[1]"})",
      R"({"name": "f", "arguments": "{oops"})",
      R"({"name": "f", "arguments": {}} trailing)",
      "  {\"name\": \"f\" \t",
  };
  std::string text = "<tool_calls>\n" + call_line("good", "{}") + "\n";
  std::string expected_content;
  for (const std::string& line : malformed) {
    text += line + "\n";
    expected_content += line + "\n";
  }
  text += call_line("also_good", R"({"k": "v"})") + "\n</tool_calls>";
  const Parsed parsed = parse(text);
  EXPECT_EQ(parsed.content, expected_content);
  ASSERT_EQ(parsed.calls.size(), 2u);
  EXPECT_EQ(parsed.calls[0].name, "good");
  EXPECT_EQ(parsed.calls[1].name, "also_good");
}

// A block that never closes comes back as written, its malformed lines in place.
TEST(ChatOutput, UnterminatedBlockWithMalformedLineKeepsItsOrder) {
  const std::string text = "<tool_calls>\n\nnot json\n{\"name\": \"f\", \"arguments\": {}}\n{\"name\": ";
  const Parsed parsed = parse(text);
  ASSERT_EQ(parsed.calls.size(), 1u);
  EXPECT_EQ(parsed.content, "<tool_calls>\n\nnot json\n{\"name\": ");
}

TEST(ChatOutput, MalformedLastLineKeepsNoNewline) {
  EXPECT_EQ(parse("<tool_calls>\nnope</tool_calls>").content, "nope");
}

TEST(ChatOutput, DeeplyNestedArgumentsAreContentNotACrash) {
  const std::string line =
      R"({"name": "f", "arguments": {"a": )" + std::string(100000, '[') + std::string(100000, ']') + "}}";
  const Parsed parsed = parse("<tool_calls>\n" + line + "\n</tool_calls>");
  EXPECT_TRUE(parsed.calls.empty());
  EXPECT_EQ(parsed.content, line + "\n");
}

TEST(ChatOutput, UnterminatedBlockBecomesContent) {
  const std::string cut_off = "Sure.\n<tool_calls>\n{\"name\": \"f\", \"argu";
  EXPECT_EQ(parse(cut_off).content, cut_off);
  // Calls already emitted are not repeated as content.
  const Parsed parsed = parse("<tool_calls>\n" + call_line("f", "{}") + "\n\n{\"name\": \"g\"");
  EXPECT_EQ(parsed.calls.size(), 1u);
  EXPECT_EQ(parsed.content, "<tool_calls>\n\n{\"name\": \"g\"");
}

TEST(ChatOutput, ToolTagsInsideReasoningAreReasoning) {
  const std::string reasoning = "<tool_calls>\n" + call_line("f", "{}") + "\n</tool_calls>";
  const Parsed parsed = parse("<think>" + reasoning + "</think>ok");
  EXPECT_EQ(parsed.reasoning, reasoning);
  EXPECT_EQ(parsed.content, "ok");
  EXPECT_FALSE(parsed.saw_tool_calls);
}

TEST(ChatOutput, OptionsOffLeaveEverythingContent) {
  const Parsed plain = parse(kSample, {.reasoning = false, .tool_calls = false});
  EXPECT_EQ(plain.content, kSample);
  EXPECT_EQ(plain.reasoning, "");
  EXPECT_FALSE(plain.saw_tool_calls);

  const std::string thinking = "<think>x</think>\n\ny";
  EXPECT_EQ(parse(thinking, {.reasoning = false}).content, thinking);

  const std::string block = "<tool_calls>\n" + call_line("f", "{}") + "\n</tool_calls>";
  const Parsed untouched = parse("<think>r</think>" + block, {.tool_calls = false});
  EXPECT_EQ(untouched.reasoning, "r");
  EXPECT_EQ(untouched.content, block);
  EXPECT_TRUE(untouched.calls.empty());
}

TEST(ChatOutput, CallIdsAreUniqueAndShapedLikeOpenAi) {
  std::string text = "<tool_calls>\n";
  for (int i = 0; i < 50; ++i) text += call_line("f", "{}") + "\n";
  std::vector<ToolCall> calls = parse(text).calls;
  const std::vector<ToolCall> more = parse(text).calls;  // a second parser draws other ids
  calls.insert(calls.end(), more.begin(), more.end());
  ASSERT_EQ(calls.size(), 100u);
  std::set<std::string> ids;
  for (const ToolCall& call : calls) {
    EXPECT_EQ(call.id.size(), 29u);
    EXPECT_TRUE(call.id.starts_with("call_"));
    for (size_t i = 5; i < call.id.size(); ++i) {
      EXPECT_TRUE(std::isalnum(static_cast<unsigned char>(call.id[i]))) << call.id;
    }
    ids.insert(call.id);
  }
  EXPECT_EQ(ids.size(), calls.size());
}

// ---------------------------------------------------------------------------------------------
// Randomized

// Random text with '<', tag fragments, newlines and odd bytes, but no whole tag.
std::string random_text(std::mt19937& random, size_t max_parts) {
  static const std::vector<std::string> parts = {
      "a", "word ", " ", "\n", "\n\n", "<", "</", "<thi", "</think", "<tool_", "</tool_calls", ">",
      "{", "}", "\"", "é", "\xff", "\xe6\x97", "ok."};
  std::string text;
  const size_t count = std::uniform_int_distribution<size_t>(0, max_parts)(random);
  for (size_t i = 0; i < count; ++i) {
    text += parts[std::uniform_int_distribution<size_t>(0, parts.size() - 1)(random)];
  }
  return text;
}

// A random model output together with what parsing it must give.
struct Document {
  std::string text;
  Parsed expected;
  bool strip_next_content = false;  // mirrors the rule for content right after </think>
  size_t tags_written = 0;

  void add_content(std::string content) {
    if (strip_next_content) {
      content.erase(0, content.find_first_not_of('\n'));
      strip_next_content = content.empty();
    }
    text += content;
    expected.content += content;
  }
  void add_reasoning(const std::string& reasoning, bool closed) {
    text += "<think>" + reasoning + (closed ? "</think>" : "");
    tags_written += closed ? 2 : 1;
    expected.reasoning += reasoning;
    strip_next_content = closed;
  }
};

void add_tool_block(Document& document, std::mt19937& random, bool closed) {
  document.strip_next_content = false;
  document.text += "<tool_calls>\n";
  document.tags_written += closed ? 2 : 1;
  const int lines = std::uniform_int_distribution<int>(0, 3)(random);
  for (int i = 0; i < lines; ++i) {
    const int kind = closed ? std::uniform_int_distribution<int>(0, 2)(random) : 0;
    if (kind == 0) {
      const std::string name = "tool" + std::to_string(i);
      const std::string arguments = R"({"i": )" + std::to_string(i) + R"(, "s": "x<y"})";
      document.text += call_line(name, arguments) + "\n";
      document.expected.calls.push_back({.id = {}, .name = name, .arguments = arguments});
      document.expected.saw_tool_calls = true;
    } else if (kind == 1) {
      document.text += " \n";  // blank: skipped
    } else {
      const std::string bad = "oops" + random_text(random, 4);
      const std::string line = bad.substr(0, bad.find('\n'));
      document.text += line + "\n";
      document.expected.content += line + "\n";
    }
  }
  if (closed) {
    document.text += "</tool_calls>";
  } else {
    const std::string partial = R"({"name": "cut)";
    document.text += partial;
    document.expected.content += "<tool_calls>\n" + partial;
  }
}

Document random_document(std::mt19937& random) {
  Document document;
  const int segments = std::uniform_int_distribution<int>(0, 6)(random);
  for (int i = 0; i < segments; ++i) {
    switch (std::uniform_int_distribution<int>(0, 2)(random)) {
      case 0: document.add_content(random_text(random, 8)); break;
      case 1: document.add_reasoning(random_text(random, 8), /*closed=*/true); break;
      case 2: add_tool_block(document, random, /*closed=*/true); break;
    }
  }
  switch (std::uniform_int_distribution<int>(0, 2)(random)) {
    case 0: document.add_reasoning(random_text(random, 8), /*closed=*/false); break;
    case 1: add_tool_block(document, random, /*closed=*/false); break;
    case 2: document.add_content(random_text(random, 8)); break;
  }
  return document;
}

std::vector<std::string> random_split(const std::string& text, std::mt19937& random) {
  std::vector<std::string> pieces;
  size_t start = 0;
  while (start < text.size()) {
    const size_t length = std::uniform_int_distribution<size_t>(0, 6)(random);
    pieces.push_back(text.substr(start, length));
    start += length;
  }
  return pieces;
}

size_t count_tags(const std::string& text) {
  size_t count = 0;
  for (const std::string tag : {"<think>", "</think>", "<tool_calls>", "</tool_calls>"}) {
    for (size_t at = text.find(tag); at != std::string::npos; at = text.find(tag, at + 1)) ++count;
  }
  return count;
}

TEST(ChatOutput, RandomDocumentsParseAsGeneratedWhateverTheSplits) {
  std::mt19937 random(20250607);
  int skipped = 0;
  for (int round = 0; round < 2000; ++round) {
    const Document document = random_document(random);
    SCOPED_TRACE(testing::Message() << "round " << round << ", text: " << document.text);
    // Fragments can meet to form a tag ("</think" + ">"): that text is not the planned one.
    if (count_tags(document.text) != document.tags_written) {
      ++skipped;
      continue;
    }
    expect_same(parse(document.text), document.expected);
    expect_same(parse_pieces(random_split(document.text, random)), document.expected);
    if (testing::Test::HasFailure()) return;
  }
  EXPECT_LT(skipped, 200);
}

TEST(ChatOutput, RandomGarbageNeverThrowsAndSplitsDoNotMatter) {
  static const std::vector<std::string> parts = {
      "<think>", "</think>", "<tool_calls>", "</tool_calls>", "\n", "<", "</", "<tool", "x",
      call_line("f", R"({"a": 1})"), R"({"name": "g", "arguments": "{}"})", "{", "\xc0", " "};
  std::mt19937 random(7);
  for (int round = 0; round < 2000; ++round) {
    std::string text;
    const int count = std::uniform_int_distribution<int>(0, 24)(random);
    for (int i = 0; i < count; ++i) {
      text += parts[std::uniform_int_distribution<size_t>(0, parts.size() - 1)(random)];
    }
    SCOPED_TRACE(testing::Message() << "round " << round << ", text: " << text);
    for (const ChatOutputOptions options : {ChatOutputOptions{}, ChatOutputOptions{false, false}}) {
      Parsed whole;
      ASSERT_NO_THROW(whole = parse(text, options));
      expect_same(parse_pieces(random_split(text, random), options), whole);
      expect_same(parse_pieces(bytewise(text), options), whole);
    }
    EXPECT_EQ(parse(text, {.reasoning = false, .tool_calls = false}).content, text);
    if (testing::Test::HasFailure()) return;
  }
}

}  // namespace
