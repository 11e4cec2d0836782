#pragma once
// Earley recognition of a grammar over lexemes: one set of items per lexeme read. A set says
// which terminals may come next and whether the input so far is a whole sentence. Sets are built
// one from the previous one, so a matcher can keep its committed sets and try speculative ones
// on top of them.

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "structured/grammar.h"

namespace m1::structured {

struct EarleyItem {
  int32_t production = 0, dot = 0, origin = 0;
};

struct EarleySet {
  std::vector<EarleyItem> items;
  std::vector<int32_t> terminals;  // the terminals that may come next, sorted
  bool accepting = false;          // the lexemes so far form a whole sentence
};

// The set before any lexeme.
EarleySet earley_start(const Grammar& grammar);

// The set at position `position` after a lexeme that matches every terminal of `scanned`
// (sorted) follows `previous` (the set at position - 1). `set_at(i)` gives the set at any
// earlier position i. No items: the lexeme fits nowhere.
EarleySet earley_scan(const Grammar& grammar, const EarleySet& previous, std::span<const int32_t> scanned,
                      int32_t position, const std::function<const EarleySet&(int32_t)>& set_at);

}  // namespace m1::structured
