#pragma once
// Matches input symbols against a grammar one at a time: the lexer state of the lexeme being
// read, over the Earley sets of the lexemes before it. A lexeme ends when the next symbol cannot
// extend it (the grammar's lexemes are built so that this never loses a document); the parser
// then takes it and says which lexemes may follow.
//
// Besides committing symbols, a matcher answers "what if" questions for token masks: contexts
// are parser states reached speculatively from the committed one, each lexeme boundary computed
// once per mask however many tokens cross it.

#include <cstdint>
#include <memory>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "structured/earley.h"
#include "structured/grammar.h"

namespace m1::structured {

class Matcher {
 public:
  explicit Matcher(std::shared_ptr<Grammar> grammar);

  const Grammar& grammar() const { return *grammar_; }
  LexerDfa& lexer() const { return grammar_->lexer(); }

  // Commits one symbol; false (and nothing changes) when the grammar does not allow it here.
  bool advance(int32_t symbol);
  // Commits every byte, or none when one is refused.
  bool advance_bytes(std::string_view bytes);
  // Whether the input so far is a whole sentence.
  bool can_end();
  // Whether it is whole and nothing may follow.
  bool must_end();

  // Changes whenever the committed parser state does: the same (generation, lexer state,
  // started) is the same matcher state, with the same token mask.
  uint64_t generation() const { return generation_; }
  bool started() const { return started_; }

  // Speculation. Context 0 is the committed parser state; others come from boundary().
  static constexpr int32_t kBase = 0;
  int32_t lexer_state() const { return state_; }
  // The context after the lexeme that ends at lexer state `state`, read in context `context`;
  // -1 when no lexeme ends there or the parser refuses it. Memoised until the next commit.
  int32_t boundary(int32_t context, int32_t state);
  // The lexer state that starts the next lexeme in `context`.
  int32_t start_state(int32_t context) const { return contexts_[size_t(context)].start; }
  // One symbol from (context, state): false when refused, else the new pair.
  bool step(int32_t& context, int32_t& state, int32_t symbol) {
    const int32_t to = lexer().next(state, symbol);
    if (to != LexerDfa::kDead) {
      state = to;
      return true;
    }
    return step_across(context, state, symbol);
  }
  bool step_across(int32_t& context, int32_t& state, int32_t symbol);

 private:
  struct Context {
    int32_t parent = -1;
    int32_t position = 0;  // of its set in the chart
    EarleySet set;         // empty for the base: the chart's last set
    int32_t start = LexerDfa::kDead;
  };
  const EarleySet& set_at(int32_t context, int32_t position) const;
  const EarleySet& set_of(int32_t context) const;
  void reset_contexts();

  std::shared_ptr<Grammar> grammar_;
  std::vector<EarleySet> chart_;
  int32_t state_ = LexerDfa::kDead;  // of the lexeme being read
  bool started_ = false;             // any symbol read (a lexeme ends only when the next begins)
  uint64_t generation_ = 0;
  std::vector<Context> contexts_;
  std::unordered_map<uint64_t, int32_t> boundaries_;
};

}  // namespace m1::structured
