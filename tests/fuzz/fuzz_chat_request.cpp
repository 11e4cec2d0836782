// Fuzzes the chat request's `messages` and `tools`: arbitrary bytes read as a request body (within
// the server's nesting limit), validated by parse_chat_messages and parse_chat_tools, and rendered
// in the chat format. Bad requests must be refused with m1::Error; one that passed validation
// must render.

#include "fuzz_support.h"
#include "m1/chat.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using nlohmann::ordered_json;
  const std::optional<ordered_json> body = m1::parse_json_object(m1::fuzz::as_text(data, size));
  if (!body) return 0;
  std::vector<m1::ChatMessage> messages;
  std::vector<ordered_json> tools;
  const auto refused = m1::fuzz::m1_error_of([&] {
    messages = m1::parse_chat_messages(body->value("messages", ordered_json()));
    tools = m1::parse_chat_tools(body->value("tools", ordered_json()));
  });
  if (refused) return 0;
  m1::fuzz::must_not_throw([&] { m1::join_pieces(m1::render_chat(messages, tools, true)); });
  return 0;
}
