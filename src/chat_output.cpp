#include "m1/chat_output.h"

#include <algorithm>
#include <optional>
#include <span>

#include <nlohmann/json.hpp>

namespace m1 {
namespace {

using nlohmann::ordered_json;

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
constexpr std::string_view kToolsOpen = "<tool_calls>";
constexpr std::string_view kToolsClose = "</tool_calls>";

constexpr std::string_view kIdAlphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
constexpr size_t kIdRandomLength = 24;

struct TagMatch {
  size_t position = std::string_view::npos;
  std::string_view tag;
};

TagMatch find_first_tag(std::string_view text, std::span<const std::string_view> tags) {
  TagMatch first;
  for (const std::string_view tag : tags) {
    const size_t position = text.find(tag);
    if (position < first.position) first = {position, tag};
  }
  return first;
}

// The length of the longest end of `text` that could still grow into one of `tags`.
size_t partial_tag_length(std::string_view text, std::span<const std::string_view> tags) {
  size_t longest = 0;
  for (const std::string_view tag : tags) {
    for (size_t length = std::min(tag.size() - 1, text.size()); length > longest; --length) {
      if (text.ends_with(tag.substr(0, length))) {
        longest = length;
        break;
      }
    }
  }
  return longest;
}

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r") == std::string_view::npos;
}

// Arguments are an object, or a string holding one (some models quote them); either way the
// result keeps the model's key order.
std::optional<std::string> arguments_text(const ordered_json& arguments) {
  if (arguments.is_object()) return python_json_dumps(arguments);
  if (!arguments.is_string()) return std::nullopt;
  const auto parsed = parse_json_object(arguments.get_ref<const std::string&>());
  if (!parsed) return std::nullopt;
  return python_json_dumps(*parsed);
}

// A line `{"name": "...", "arguments": {...}}`, or nullopt when it is anything else.
std::optional<ToolCall> parse_tool_call(std::string_view line) {
  const auto object = parse_json_object(line);
  if (!object) return std::nullopt;
  const auto name = object->find("name");
  const auto arguments = object->find("arguments");
  if (name == object->end() || !name->is_string() || arguments == object->end()) return std::nullopt;
  const std::string& name_text = name->get_ref<const std::string&>();
  if (name_text.empty()) return std::nullopt;
  auto arguments_json = arguments_text(*arguments);
  if (!arguments_json) return std::nullopt;
  return ToolCall{.id = {}, .name = name_text, .arguments = std::move(*arguments_json)};
}

std::mt19937_64 seeded_from_random_device() {
  std::random_device device;
  std::seed_seq seed{device(), device(), device(), device(), device(), device(), device(), device()};
  return std::mt19937_64(seed);
}

}  // namespace

ChatOutputParser::ChatOutputParser(ChatOutputOptions options)
    : options_(options), id_random_(seeded_from_random_device()) {}

ChatOutputDelta ChatOutputParser::push(std::string_view text) {
  ChatOutputDelta delta;
  pending_.append(text);
  consume_pending(delta);
  return delta;
}

ChatOutputDelta ChatOutputParser::finish() {
  ChatOutputDelta delta;
  switch (mode_) {
    case Mode::kContent: emit_content(delta, pending_); break;  // a held "<thi" is just text
    case Mode::kReasoning: delta.reasoning += pending_; break;
    case Mode::kTools: delta.content.append(unfinished_block_).append(pending_); break;
  }
  mode_ = Mode::kContent;
  pending_.clear();
  unfinished_block_.clear();
  malformed_lines_.clear();
  line_scanned_ = 0;
  strip_newlines_ = false;
  return delta;
}

void ChatOutputParser::consume_pending(ChatOutputDelta& delta) {
  bool progressed = true;
  while (progressed) {
    progressed = mode_ == Mode::kTools ? consume_tool_line(delta) : consume_text(delta);
  }
}

// Emits text up to the next tag that matters in this mode and switches mode there. Returns
// false, holding back only a possible tag start, when no whole tag is in sight.
bool ChatOutputParser::consume_text(ChatOutputDelta& delta) {
  std::vector<std::string_view> tags;
  if (mode_ == Mode::kReasoning) {
    tags.push_back(kThinkClose);
  } else {
    if (options_.reasoning) tags.push_back(kThinkOpen);
    if (options_.tool_calls) tags.push_back(kToolsOpen);
  }
  const TagMatch match = find_first_tag(pending_, tags);
  if (match.tag.empty()) {
    const size_t decided = pending_.size() - partial_tag_length(pending_, tags);
    emit_text(delta, std::string_view(pending_).substr(0, decided));
    pending_.erase(0, decided);
    return false;
  }
  emit_text(delta, std::string_view(pending_).substr(0, match.position));
  pending_.erase(0, match.position + match.tag.size());
  enter_after_tag(match.tag);
  return true;
}

// Takes the next line of a tool block once it ends in "\n" or </tool_calls>. Returns false
// while the line is incomplete.
bool ChatOutputParser::consume_tool_line(ChatOutputDelta& delta) {
  const std::string_view text = pending_;
  const size_t newline = text.find('\n', line_scanned_);
  const size_t close = text.find(kToolsClose, line_scanned_);
  if (newline == std::string_view::npos && close == std::string_view::npos) {
    // Long argument lines arrive a token at a time: rescan only what could hold a new terminator.
    line_scanned_ = text.size() - std::min(text.size(), kToolsClose.size() - 1);
    return false;
  }
  line_scanned_ = 0;
  if (newline < close) {
    take_tool_line(delta, text.substr(0, newline), "\n");
    pending_.erase(0, newline + 1);
    return true;
  }
  take_tool_line(delta, text.substr(0, close), "");
  pending_.erase(0, close + kToolsClose.size());
  delta.content += malformed_lines_;
  malformed_lines_.clear();
  unfinished_block_.clear();  // the block is whole: its tags and blank lines are spent
  mode_ = Mode::kContent;
  return true;
}

void ChatOutputParser::enter_after_tag(std::string_view tag) {
  strip_newlines_ = tag == kThinkClose;
  if (tag == kThinkOpen) {
    mode_ = Mode::kReasoning;
  } else if (tag == kThinkClose) {
    mode_ = Mode::kContent;
  } else {
    mode_ = Mode::kTools;
    unfinished_block_ = kToolsOpen;
  }
}

// A blank line is kept aside in case the block never closes; a malformed one is content as
// written, so nothing the model said is lost.
void ChatOutputParser::take_tool_line(ChatOutputDelta& delta, std::string_view line,
                                      std::string_view terminator) {
  if (is_blank(line)) {
    unfinished_block_.append(line).append(terminator);
    return;
  }
  auto call = parse_tool_call(line);
  if (!call) {
    // Held until the block ends: as content on its own if the block closes, or in place within
    // the block's text if it never does.
    malformed_lines_.append(line).append(terminator);
    unfinished_block_.append(line).append(terminator);
    return;
  }
  call->id = new_call_id();
  delta.tool_calls.push_back(std::move(*call));
  ++calls_emitted_;
}

void ChatOutputParser::emit_text(ChatOutputDelta& delta, std::string_view text) {
  if (mode_ == Mode::kReasoning) {
    delta.reasoning += text;
  } else {
    emit_content(delta, text);
  }
}

void ChatOutputParser::emit_content(ChatOutputDelta& delta, std::string_view text) {
  if (strip_newlines_) {
    text.remove_prefix(std::min(text.find_first_not_of('\n'), text.size()));
    strip_newlines_ = text.empty();  // still at the start of the answer: keep stripping
  }
  delta.content += text;
}

std::string ChatOutputParser::new_call_id() {
  std::uniform_int_distribution<size_t> pick(0, kIdAlphabet.size() - 1);
  std::string id = "call_";
  for (size_t i = 0; i < kIdRandomLength; ++i) id += kIdAlphabet[pick(id_random_)];
  return id;
}

}  // namespace m1
