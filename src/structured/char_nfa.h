#pragma once
// Automata over Unicode code points: the regular languages of JSON scalars (string contents,
// numbers, formats, patterns) before they are spelled out in bytes. Built from regex trees,
// combined by intersection (a pattern with a length bound, a format with a pattern), and tested
// for emptiness, which is how a schema no document satisfies is found.

#include <cstdint>
#include <string_view>
#include <vector>

#include "structured/codepoint_set.h"
#include "structured/regex.h"

namespace m1::structured {

struct CharNfa {
  struct Edge {
    CodepointSet set;
    int32_t to = 0;
  };
  struct State {
    std::vector<Edge> edges;
    std::vector<int32_t> eps;
    bool accept = false;
  };
  std::vector<State> states;
  int32_t start = 0;

  int32_t add_state() {
    states.emplace_back();
    return int32_t(states.size() - 1);
  }
};

// The most states one language may take; larger ones are refused (m1::Error naming `what`).
constexpr size_t kMaxCharStates = 200000;

// Thompson construction: repetitions are expanded, so a{3,5} costs five copies of a.
CharNfa nfa_from_regex(const RegexNode& regex, const char* what);
// The same language with no epsilon edges, and only states that lie on a path from the start to
// an accepting state. An empty language leaves a single non-accepting state.
CharNfa without_epsilons(const CharNfa& nfa);
// Strings both accept (the product of their epsilon-free forms, trimmed).
CharNfa intersect(const CharNfa& a, const CharNfa& b, const char* what);
// Strings of a, counted in code points, of at least `min` and at most `max` (-1: no bound).
CharNfa with_length(const CharNfa& a, int64_t min, int64_t max, const char* what);
bool is_empty(const CharNfa& nfa);
// The size of the deterministic form of `nfa` (subset construction over classes of code points
// that every edge treats alike, the dead state not counted): its states, and its entries (the NFA
// states of all its states together, which bound its memory and work). The construction stops
// once either passes its bound, so a pattern such as [ab]*a[ab]{20}, small as an NFA but 2^21
// states as a DFA (which the lexer would otherwise build while matching), is measured quickly.
struct DeterministicSize {
  size_t states = 0, entries = 0;
};
DeterministicSize deterministic_size(const CharNfa& nfa, size_t max_states, size_t max_entries);
bool matches(const CharNfa& nfa, std::u32string_view text);

}  // namespace m1::structured
