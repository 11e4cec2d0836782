#include "structured/grammar.h"

#include <algorithm>

#include "m1/error.h"
#include "structured/reachability.h"

namespace m1::structured {

// The most productions and terminals one grammar may have.
constexpr size_t kMaxProductions = 1 << 20;
constexpr size_t kMaxTerminals = 1 << 20;

GrammarBuilder::GrammarBuilder(int32_t max_lexer_states)
    : grammar_(new Grammar), max_lexer_states_(max_lexer_states) {}

int32_t GrammarBuilder::terminal(ByteFragment fragment, std::string name) {
  Grammar& g = *grammar_;
  if (g.terminal_start_.size() >= kMaxTerminals) fail("grammar: more than {} terminals", kMaxTerminals);
  const int32_t t = int32_t(g.terminal_start_.size());
  g.nfa_.states[size_t(fragment.end)].accepts = t;
  g.terminal_start_.push_back(fragment.start);
  g.terminal_names_.push_back(std::move(name));
  return t;
}

int32_t GrammarBuilder::terminal(const CharNfa& chars, Spelling spelling, std::string name) {
  return terminal(add_spelled(grammar_->nfa_, chars, spelling), std::move(name));
}

int32_t GrammarBuilder::literal(std::string_view bytes) {
  for (const auto& [text, t] : literals_)
    if (text == bytes) return t;
  const int32_t t = terminal(add_bytes(grammar_->nfa_, bytes), std::string(bytes));
  literals_.emplace_back(std::string(bytes), t);
  return t;
}

int32_t GrammarBuilder::nonterminal(std::string name) {
  nonterminal_names_.push_back(std::move(name));
  grammar_->by_lhs_.emplace_back();
  return int32_t(nonterminal_names_.size() - 1);
}

void GrammarBuilder::production(int32_t lhs, std::vector<int32_t> rhs) {
  Grammar& g = *grammar_;
  if (g.productions_.size() >= kMaxProductions) fail("grammar: more than {} rules", kMaxProductions);
  g.by_lhs_[size_t(lhs)].push_back(int32_t(g.productions_.size()));
  g.productions_.push_back({lhs, std::move(rhs)});
}

// Removes every edge into a state from which no accepting state can be reached, so that the
// lexer's non-empty states are exactly those that can still end a lexeme.
void GrammarBuilder::trim_nfa() {
  ByteNfa& nfa = grammar_->nfa_;
  const size_t n = nfa.states.size();
  std::vector<std::vector<int32_t>> reverse(n);
  for (size_t s = 0; s < n; ++s) {
    for (const auto& e : nfa.states[s].edges) reverse[size_t(e.to)].push_back(int32_t(s));
    for (int32_t t : nfa.states[s].eps) reverse[size_t(t)].push_back(int32_t(s));
  }
  std::vector<char> live(n, 0);
  for (size_t s = 0; s < n; ++s) live[s] = nfa.states[s].accepts >= 0;
  mark_reaching(reverse, live, [](int32_t) { return true; });
  for (ByteNfa::State& s : nfa.states) {
    std::erase_if(s.edges, [&](const ByteNfa::Edge& e) { return !live[size_t(e.to)]; });
    std::erase_if(s.eps, [&](int32_t t) { return !live[size_t(t)]; });
  }
  // A terminal whose start is dead has an empty language.
  for (int32_t& start : grammar_->terminal_start_)
    if (!live[size_t(start)]) start = -1;
}

std::vector<char> GrammarBuilder::productive_nonterminals() {
  const Grammar& g = *grammar_;
  std::vector<char> productive(nonterminal_names_.size(), 0);
  const auto symbol_ok = [&](int32_t symbol) {
    return is_terminal(symbol) ? g.terminal_start_[size_t(terminal_of(symbol))] >= 0 : productive[size_t(symbol)] != 0;
  };
  for (bool changed = true; changed;) {
    changed = false;
    for (const Production& p : g.productions_)
      if (!productive[size_t(p.lhs)] && std::all_of(p.rhs.begin(), p.rhs.end(), symbol_ok)) {
        productive[size_t(p.lhs)] = 1;
        changed = true;
      }
  }
  return productive;
}

bool GrammarBuilder::derives_text(int32_t nonterminal) {
  return productive_nonterminals()[size_t(nonterminal)] != 0;
}

std::shared_ptr<Grammar> GrammarBuilder::finish(int32_t root, const std::string& what) {
  trim_nfa();
  Grammar& g = *grammar_;
  g.lexer_ = std::make_unique<LexerDfa>(g.nfa_, g.terminal_start_, max_lexer_states_);
  for (int32_t t = 0; t < g.terminal_count(); ++t) {
    if (g.terminal_start_[size_t(t)] < 0) continue;
    const int32_t state = g.lexer_->start(std::span(&t, 1));
    // Lexemes are never empty: the lexer ends one only when a symbol cannot extend it.
    if (!g.lexer_->accepts(state).empty())
      fail("grammar: terminal '{}' matches the empty string", g.terminal_names_[size_t(t)]);
    // A lexeme that must spell out a marker's text cannot be written.
    if (state == LexerDfa::kDead) g.terminal_start_[size_t(t)] = -1;
  }
  const std::vector<char> productive = productive_nonterminals();
  if (!productive[size_t(root)]) fail("{}: no output satisfies it", what);
  // A start rule S' -> root, so that acceptance is one item; then only rules whose symbols all
  // derive text.
  const int32_t start = nonterminal("$start");
  production(start, {root});
  std::vector<Production> kept;
  for (const Production& p : g.productions_) {
    const bool ok = p.lhs == start || std::all_of(p.rhs.begin(), p.rhs.end(), [&](int32_t symbol) {
      return is_terminal(symbol) ? g.terminal_start_[size_t(terminal_of(symbol))] >= 0 : productive[size_t(symbol)] != 0;
    });
    if (ok) kept.push_back(p);
  }
  g.productions_ = std::move(kept);
  g.by_lhs_.assign(nonterminal_names_.size(), {});
  for (size_t i = 0; i < g.productions_.size(); ++i) {
    g.by_lhs_[size_t(g.productions_[i].lhs)].push_back(int32_t(i));
    if (g.productions_[i].lhs == start) g.start_production_ = int32_t(i);
  }
  g.nullable_.assign(nonterminal_names_.size(), 0);
  for (bool changed = true; changed;) {
    changed = false;
    for (const Production& p : g.productions_)
      if (!g.nullable_[size_t(p.lhs)] && std::all_of(p.rhs.begin(), p.rhs.end(), [&](int32_t symbol) {
            return !is_terminal(symbol) && g.nullable_[size_t(symbol)];
          })) {
        g.nullable_[size_t(p.lhs)] = 1;
        changed = true;
      }
  }
  return std::shared_ptr<Grammar>(grammar_.release());
}

}  // namespace m1::structured
