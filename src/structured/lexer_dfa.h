#pragma once
// The lexer of a grammar: a deterministic automaton over input symbols, built lazily from the
// terminals' automaton by subset construction. A state stands for the lexemes still possible
// after the symbols read since the last lexeme ended: the matcher starts one for the terminals
// the parser allows next, and a state remembers which terminals' lexemes end exactly there.
//
// A state also tracks how much of a marker's text (<think>, </think>, <tool_calls>,
// </tool_calls>) the bytes just read spell out: bytes that would complete one lead nowhere, as
// the markers may only appear as their tokens. A state is kept only if some lexeme can still end
// from it under that rule, so the matcher never reaches a dead end.
//
// Symbols that every transition treats alike share a class, so a row holds one entry per class.

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "structured/byte_nfa.h"
#include "structured/state_set.h"
#include "structured/text_classes.h"

namespace m1::structured {

class LexerDfa {
 public:
  static constexpr int32_t kDead = 0;

  // `nfa` must be trimmed (every state reaches an accepting one) and outlive the lexer. Building
  // more than `max_states` states throws m1::RequestError (OutputFormat::max_lexer_states):
  // patterns whose deterministic form explodes stop there instead of exhausting memory.
  LexerDfa(const ByteNfa& nfa, std::vector<int32_t> terminal_start, int32_t max_states);

  // The state before the first symbol of a lexeme of any of `terminals` (sorted, unique);
  // kDead when none of them can produce a lexeme.
  int32_t start(std::span<const int32_t> terminals);
  int32_t next(int32_t state, int32_t symbol) {
    const int32_t to = table_[size_t(state) * size_t(classes_) + size_t(class_of_[size_t(symbol)])];
    return to >= 0 ? to : compute_row_and_get(state, symbol);
  }
  // The terminals whose lexemes end at `state`, sorted.
  std::span<const int32_t> accepts(int32_t state) const { return accepts_[size_t(state)]; }
  // Whether any symbol leads from `state` to a live state.
  bool can_continue(int32_t state);
  // How many characters of `text` may follow `state` with every character of the class leading
  // to the same next state each time: n in [0, cap] means any run of at most n of them is
  // accepted and no longer one up to the cap; -1 that the class's characters are treated apart,
  // or that a lexeme may end on the way (the next one might begin with them). `cap` (at most
  // kMaxRunLength): the longest run asked about, the class's longest token.
  int32_t uniform_run(int32_t state, TextClass text, int32_t cap);
  int32_t symbol_class(int32_t symbol) const { return class_of_[size_t(symbol)]; }
  // The raw transition table (state * class_count() + class: the next state, or -1 where not yet
  // worked out) and each symbol's class, for loops that look up many transitions; the table moves
  // whenever a state is added (next() may add some).
  const int32_t* table_data() const { return table_.data(); }
  const int32_t* class_data() const { return class_of_.data(); }
  // The same lexemes with no marker text begun (kDead if that leaves none): from a state whose
  // last bytes begin a marker's text, a byte that does not continue it leads where the twin's
  // does.
  int32_t unguarded(int32_t state);
  // Whether `byte` leads `state` elsewhere than it leads its unguarded twin.
  bool guard_differs(int32_t state, uint8_t byte) const;
  int32_t class_count() const { return classes_; }
  int32_t state_count() const { return int32_t(sets_.size()); }

 private:
  int32_t compute_row_and_get(int32_t state, int32_t symbol);
  void compute_raw_row(int32_t state);
  bool live(int32_t state);
  // live()'s two searches: breadth first over at most `budget` states (1 live, 0 dead, -1 not
  // known within the budget), then depth first over all.
  int live_breadth_first(int32_t state, size_t budget);
  // Where the searches stop: a lexeme ends at `state`, or it is known to be live.
  bool ends_or_live(int32_t state) const { return live_[size_t(state)] == 1 || !accepts_[size_t(state)].empty(); }
  bool live_depth_first(int32_t state);
  // The state every character of `text` leads `state` to: kDead when all are refused, -1 when
  // they disagree.
  int32_t uniform_step(int32_t state, TextClass text);
  int32_t intern(std::vector<int32_t>& key);
  void close(std::vector<int32_t>& set);

  const ByteNfa& nfa_;
  std::vector<int32_t> terminal_start_;
  int32_t max_states_;
  std::vector<int32_t> class_of_;   // symbol -> class
  std::vector<int32_t> class_end_;  // class -> the symbol after its last
  int32_t classes_ = 0;
  // A state's key: its sorted NFA states, then the marker-prefix state as -1 - guard.
  std::vector<std::vector<int32_t>> sets_;
  std::vector<uint8_t> guard_;                 // state -> marker-prefix state
  std::vector<std::vector<int32_t>> accepts_;  // state -> terminals
  std::vector<int8_t> live_;                   // -1 unknown, 0 dead, 1 live
  std::vector<char> free_;  // NFA state -> can end a lexeme reading neither '<' nor '>'
  // Where a state's chain of uniform steps ends: after `length` characters (kMaxRunLength: not
  // within that many), every character refused or (`apart`) the characters treated apart.
  struct RunEnd {
    bool known = false, apart = false;
    int32_t length = 0;
  };
  static constexpr int32_t kUnknownStep = -2;
  std::vector<std::array<RunEnd, kTextClassCount>> runs_;
  std::vector<std::array<int32_t, kTextClassCount>> steps_;  // uniform_step, kUnknownStep
  std::vector<int32_t> run_path_;
  StateSetMap<int32_t> ids_;
  StateSetMap<int32_t> starts_;  // terminal set -> state
  std::vector<int32_t> raw_;    // state * classes + class -> state regardless of liveness; -1 unknown
  std::vector<int32_t> table_;  // the same with states that cannot end a lexeme as kDead
  std::vector<uint32_t> mark_;  // scratch for closures
  std::vector<std::vector<int32_t>> buckets_;  // scratch for rows
  StateSetMap<int32_t> row_targets_;
  uint32_t stamp_ = 0;
};

}  // namespace m1::structured
