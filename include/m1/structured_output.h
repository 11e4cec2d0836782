#pragma once
// Constrained decoding: what a request's output must be (a JSON document valid against a schema,
// any JSON object, tool calls whose arguments follow their functions' schemas), compiled into a
// grammar, and the matcher that follows one sequence's tokens through it and says which tokens
// may come next, as a bitmask the sampler applies. The grammar engine is m1's own (src/structured).

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "m1/tokenizer.h"

namespace m1 {

namespace structured {
class Grammar;
class Matcher;
class TokenIndex;
}  // namespace structured

// A compiled output grammar. Its lexer grows as matchers explore it, so one grammar serves the
// matchers of one thread (the engine's).
using OutputGrammar = structured::Grammar;

// A function the output may call.
struct ToolGrammar {
  std::string name;
  // Its arguments' schema; null: any JSON object.
  nlohmann::ordered_json parameters;
  std::string what;  // names the schema in errors, e.g. "tools[0].function.parameters"
};

// OutputFormat::max_lexer_states unless set.
constexpr int32_t kDefaultMaxLexerStates = 200000;

struct OutputFormat {
  enum class Document {
    kNone,       // no document: free text (and tool calls, if any)
    kAnyObject,  // any JSON object (response_format json_object)
    kSchema,     // a JSON document valid against `schema` (response_format json_schema)
  };
  enum class Calls {
    kNone,      // no tool calls
    kOptional,  // the model may call tools (tool_choice auto) after its text, or instead of the document
    kRequired,  // the prompt opened the tool block: one or more calls, then its end
    kNamed,     // the prompt opened the one call up to its arguments: the arguments, then the end
  };
  Document document = Document::kNone;
  nlohmann::ordered_json schema;
  std::string schema_what;  // e.g. "response_format.json_schema.schema"
  Calls calls = Calls::kNone;
  std::vector<ToolGrammar> tools;  // kNamed: the one named
  // A chat turn may begin with reasoning (<think>...</think>) before its document or calls.
  bool reasoning = false;
  // The most states the matchers' lexer may build (each a row of transitions, built as matching
  // needs them): patterns whose automata grow past it, alone or side by side, fail the request
  // with m1::RequestError, up front or mid-generation.
  int32_t max_lexer_states = kDefaultMaxLexerStates;
};

// Throws m1::Error naming the schema and the place in it for an unsupported keyword, a malformed
// schema or one no document satisfies.
std::shared_ptr<OutputGrammar> compile_output_grammar(const OutputFormat& format);

// A tokenizer's vocabulary arranged for token masks (built once; about a second's work at the
// real tokenizer's 200,064 tokens).
class TokenVocabulary {
 public:
  // `rows`: the width of the model's logits.
  TokenVocabulary(const Tokenizer& tokenizer, int64_t rows);
  ~TokenVocabulary();
  int64_t rows() const;
  int64_t words() const { return (rows() + 31) / 32; }  // of a mask
  const structured::TokenIndex& index() const { return *index_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }

 private:
  const Tokenizer& tokenizer_;
  std::unique_ptr<structured::TokenIndex> index_;
};

// Follows one sequence's tokens through a grammar.
class GrammarMatcher {
 public:
  GrammarMatcher(std::shared_ptr<OutputGrammar> grammar, std::shared_ptr<const TokenVocabulary> vocabulary);
  GrammarMatcher(GrammarMatcher&&) noexcept;
  ~GrammarMatcher();

  // Takes the next token; false (and nothing changes) when the grammar does not allow it.
  bool accept(int32_t token);
  // Sets bit i of `allowed` (word i / 32; rows() bits) for every token allowed next, with the
  // `end_tokens` when the output may end here. A matcher back in the state of its last mask (a
  // token inside a string, say) copies that mask instead of working it out again.
  void fill_mask(std::span<uint32_t> allowed, std::span<const int32_t> end_tokens);
  // Whether the output may end here, and whether it must (nothing more may follow).
  bool can_end();
  bool must_end();

 private:
  std::unique_ptr<structured::Matcher> matcher_;
  std::shared_ptr<const TokenVocabulary> vocabulary_;
  // The last mask and the state it is for.
  std::vector<uint32_t> last_mask_;
  std::vector<int32_t> last_ends_;
  uint64_t last_generation_ = 0;
  int32_t last_state_ = -1;
  bool last_started_ = false;
};

}  // namespace m1
