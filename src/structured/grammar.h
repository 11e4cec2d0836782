#pragma once
// A context-free grammar over lexemes, each lexeme a regular language over input symbols (bytes
// and marker tokens): what a constrained output may be. Built once per request (or schema) by
// GrammarBuilder, which drops every rule that derives no text, so a matcher following the grammar
// never reaches a dead end; a grammar whose start derives nothing is refused.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "structured/byte_nfa.h"
#include "structured/lexer_dfa.h"

namespace m1::structured {

// A symbol of a production: a nonterminal (>= 0) or a terminal t (stored as ~t, < 0).
constexpr int32_t terminal_symbol(int32_t t) { return ~t; }
constexpr bool is_terminal(int32_t symbol) { return symbol < 0; }
constexpr int32_t terminal_of(int32_t symbol) { return ~symbol; }

struct Production {
  int32_t lhs = 0;
  std::vector<int32_t> rhs;
};

class Grammar {
 public:
  const std::vector<Production>& productions() const { return productions_; }
  const std::vector<int32_t>& productions_of(int32_t nonterminal) const { return by_lhs_[size_t(nonterminal)]; }
  bool nullable(int32_t nonterminal) const { return nullable_[size_t(nonterminal)] != 0; }
  int32_t start_production() const { return start_production_; }
  int32_t terminal_count() const { return int32_t(terminal_start_.size()); }
  const std::string& terminal_name(int32_t t) const { return terminal_names_[size_t(t)]; }
  // The lexer over this grammar's terminals; built lazily as matching explores it. A grammar,
  // with its lexer, serves the matchers of one thread.
  LexerDfa& lexer() const { return *lexer_; }

 private:
  friend class GrammarBuilder;
  ByteNfa nfa_;
  std::vector<int32_t> terminal_start_;
  std::vector<std::string> terminal_names_;
  std::vector<Production> productions_;
  std::vector<std::vector<int32_t>> by_lhs_;
  std::vector<char> nullable_;
  int32_t start_production_ = 0;
  std::unique_ptr<LexerDfa> lexer_;
};

class GrammarBuilder {
 public:
  // `max_lexer_states`: the lexer's bound (LexerDfa).
  explicit GrammarBuilder(int32_t max_lexer_states);
  // A terminal matching the spelled language of `chars` (never the empty string: callers
  // make such a lexeme optional in the productions instead).
  int32_t terminal(const CharNfa& chars, Spelling spelling, std::string name);
  // A terminal matching exactly `bytes`; one per distinct text.
  int32_t literal(std::string_view bytes);
  // A terminal built from a fragment of nfa() (for languages mixing bytes and markers).
  int32_t terminal(ByteFragment fragment, std::string name);
  ByteNfa& nfa() { return grammar_->nfa_; }

  int32_t nonterminal(std::string name);
  void production(int32_t lhs, std::vector<int32_t> rhs);
  const std::string& nonterminal_name(int32_t n) const { return nonterminal_names_[size_t(n)]; }
  size_t production_count() const { return grammar_->productions_.size(); }

  // Whether `nonterminal` derives any text by the rules so far (terminals assumed non-empty).
  bool derives_text(int32_t nonterminal);

  // The grammar of `root`'s language. Throws m1::Error "`what`: no output satisfies it" when
  // root derives nothing.
  std::shared_ptr<Grammar> finish(int32_t root, const std::string& what);

 private:
  void trim_nfa();
  std::vector<char> productive_nonterminals();

  std::unique_ptr<Grammar> grammar_;
  int32_t max_lexer_states_;
  std::vector<std::string> nonterminal_names_;
  std::vector<std::pair<std::string, int32_t>> literals_;
};

}  // namespace m1::structured
