// The grammar of an output under a request's constraints, in MiniMax-M1's turn format: an
// optional reasoning block (<think>...</think> then blank lines), then the document, or the
// tool block (<tool_calls>, one `{"name": ..., "arguments": ...}` line per call, </tool_calls>),
// as src/chat_output.cpp parses them.

#include "m1/chat.h"
#include "m1/error.h"
#include "m1/structured_output.h"
#include "structured/grammar.h"
#include "structured/json_schema.h"

namespace m1 {

using namespace structured;

namespace {

// Any symbols but the tool markers, at least one; then, when `then` is a marker, that marker.
int32_t free_text(GrammarBuilder& b, int32_t then, const char* name) {
  ByteNfa& nfa = b.nfa();
  const int32_t start = nfa.add_state(), text = nfa.add_state(), end = nfa.add_state();
  const int32_t last_free = marker_symbol(kThinkClose);
  if (then < 0) {
    nfa.edge(start, 0, last_free, text);
    nfa.edge(text, 0, last_free, text);
    nfa.states[size_t(text)].eps.push_back(end);
  } else {
    nfa.edge(start, 0, last_free, start);
    nfa.edge(start, then, then, end);
  }
  return b.terminal(ByteFragment{start, end}, name);
}

// <think>, any bytes, </think>.
int32_t reasoning(GrammarBuilder& b) {
  ByteNfa& nfa = b.nfa();
  const int32_t start = nfa.add_state(), text = nfa.add_state(), end = nfa.add_state();
  nfa.edge(start, marker_symbol(kThinkOpen), marker_symbol(kThinkOpen), text);
  nfa.edge(text, 0, kByteSymbols - 1, text);
  nfa.edge(text, marker_symbol(kThinkClose), marker_symbol(kThinkClose), end);
  return b.terminal(ByteFragment{start, end}, "reasoning");
}

int32_t marker(GrammarBuilder& b, Marker m) {
  ByteNfa& nfa = b.nfa();
  const int32_t start = nfa.add_state(), end = nfa.add_state();
  nfa.edge(start, marker_symbol(m), marker_symbol(m), end);
  return b.terminal(ByteFragment{start, end}, std::string(kMarkerText[size_t(m)]));
}

// One or two newlines (what the model writes after its reasoning).
int32_t blank_lines(GrammarBuilder& b) {
  ByteNfa& nfa = b.nfa();
  const int32_t start = nfa.add_state(), one = nfa.add_state(), two = nfa.add_state(), end = nfa.add_state();
  nfa.edge(start, '\n', '\n', one);
  nfa.edge(one, '\n', '\n', two);
  nfa.states[size_t(one)].eps.push_back(end);
  nfa.states[size_t(two)].eps.push_back(end);
  return b.terminal(ByteFragment{start, end}, "blank lines");
}

int32_t arguments(JsonGrammar& json, const ToolGrammar& tool) {
  return tool.parameters.is_null() ? json.any_object() : json.schema(tool.parameters, tool.what);
}

// Calls, one per line: `{"name": "f", "arguments": {...}}`.
int32_t calls(GrammarBuilder& b, JsonGrammar& json, const std::vector<ToolGrammar>& tools) {
  const int32_t call = b.nonterminal("call");
  for (const ToolGrammar& tool : tools) {
    const std::string opening = "{\"name\": " + python_json_dumps(tool.name) + ", \"arguments\": ";
    b.production(call, {terminal_symbol(b.literal(opening)), arguments(json, tool), terminal_symbol(b.literal("}"))});
  }
  const int32_t list = b.nonterminal("calls");
  const int32_t newline = terminal_symbol(b.literal("\n"));
  b.production(list, {call});
  b.production(list, {list, newline, call});
  return list;
}

}  // namespace

std::shared_ptr<OutputGrammar> compile_output_grammar(const OutputFormat& f) {
  if (f.max_lexer_states < 1) fail("output format: max_lexer_states must be positive, got {}", f.max_lexer_states);
  GrammarBuilder b(f.max_lexer_states);
  JsonGrammar json(b);
  const int32_t root = b.nonterminal("output");
  const int32_t newline = terminal_symbol(b.literal("\n"));
  const auto close_block = [&] { return terminal_symbol(marker(b, kToolsClose)); };
  if (f.calls != OutputFormat::Calls::kNone && f.tools.empty()) fail("tool calls: no tools to call");

  if (f.calls == OutputFormat::Calls::kNamed) {
    b.production(root, {arguments(json, f.tools.at(0)), terminal_symbol(b.literal("}")), newline, close_block()});
    return b.finish(root, "output");
  }
  if (f.calls == OutputFormat::Calls::kRequired) {
    b.production(root, {calls(b, json, f.tools), newline, close_block()});
    return b.finish(root, "output");
  }
  // The tool block after its opening marker.
  int32_t block_rest = -1;
  if (f.calls == OutputFormat::Calls::kOptional) {
    block_rest = b.nonterminal("tool block");
    b.production(block_rest, {newline, calls(b, json, f.tools), newline, close_block()});
  }
  if (f.document == OutputFormat::Document::kNone) {
    // Free text, then maybe the tool block.
    b.production(root, {});
    b.production(root, {terminal_symbol(free_text(b, -1, "text"))});
    if (block_rest >= 0)
      b.production(root, {terminal_symbol(free_text(b, marker_symbol(kToolsOpen), "text then <tool_calls>")), block_rest});
    return b.finish(root, "output");
  }
  const int32_t document = f.document == OutputFormat::Document::kAnyObject ? json.any_object()
                                                                           : json.schema(f.schema, f.schema_what);
  const int32_t answer = b.nonterminal("answer");
  b.production(answer, {document});
  if (block_rest >= 0) b.production(answer, {terminal_symbol(marker(b, kToolsOpen)), block_rest});
  b.production(root, {answer});
  if (f.reasoning) {
    const int32_t think = terminal_symbol(reasoning(b));
    b.production(root, {think, answer});
    b.production(root, {think, terminal_symbol(blank_lines(b)), answer});
  }
  return b.finish(root, f.document == OutputFormat::Document::kSchema ? f.schema_what : "output");
}

}  // namespace m1
