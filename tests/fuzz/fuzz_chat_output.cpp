// Fuzzes ChatOutputParser, which splits what the model writes into reasoning, content and tool
// calls as it streams. No text may make it throw, and the result must not depend on how the text
// was cut into pushes: fed whole and fed in pieces the input chooses, it must come out the same.
// Input, read from the end: one byte per option, the number of cuts (0-16), two bytes per cut;
// what is left is the text.

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <utility>

#include "fuzz_support.h"
#include "m1/chat_output.h"

namespace {

struct Parsed {
  std::string reasoning, content;
  std::vector<std::pair<std::string, std::string>> calls;  // name and arguments; ids are random
  bool operator==(const Parsed&) const = default;
};

// Pushes `text` cut at `cuts` (ascending offsets), then finishes.
Parsed parse(m1::ChatOutputOptions options, std::string_view text, const std::vector<size_t>& cuts) {
  m1::ChatOutputParser parser(options);
  Parsed parsed;
  const auto take = [&](const m1::ChatOutputDelta& delta) {
    parsed.reasoning += delta.reasoning;
    parsed.content += delta.content;
    for (const m1::ToolCall& call : delta.tool_calls) parsed.calls.emplace_back(call.name, call.arguments);
  };
  size_t begin = 0;
  for (const size_t cut : cuts) {
    take(parser.push(text.substr(begin, cut - begin)));
    begin = cut;
  }
  take(parser.push(text.substr(begin)));
  take(parser.finish());
  m1::fuzz::check(parser.saw_tool_calls() == !parsed.calls.empty(), "saw_tool_calls() tells whether calls were emitted");
  return parsed;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider input(data, size);
  const m1::ChatOutputOptions options{.reasoning = input.ConsumeBool(), .tool_calls = input.ConsumeBool()};
  std::vector<size_t> cuts(input.ConsumeIntegralInRange<size_t>(0, 16));
  for (size_t& cut : cuts) cut = input.ConsumeIntegral<uint16_t>();
  const std::string text = input.ConsumeRemainingBytesAsString();
  for (size_t& cut : cuts) cut %= text.size() + 1;
  std::ranges::sort(cuts);

  m1::fuzz::must_not_throw([&] {
    const Parsed whole = parse(options, text, {});
    m1::fuzz::check(parse(options, text, cuts) == whole, "the result does not depend on how the text is cut");
    if (!options.reasoning && !options.tool_calls)
      m1::fuzz::check(whole.content == text && whole.reasoning.empty(), "with both options off, all text is content");
  });
  return 0;
}
