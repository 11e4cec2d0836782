#include "structured/earley.h"

#include <algorithm>
#include <unordered_set>

namespace m1::structured {
namespace {

// Closes a set under prediction and completion. Nullable nonterminals are stepped over as they
// are predicted (Aycock and Horspool), so completions only ever look at earlier sets.
class Closer {
 public:
  Closer(const Grammar& grammar, int32_t position, const std::function<const EarleySet&(int32_t)>* set_at)
      : g_(grammar), position_(position), set_at_(set_at) {}

  void add(EarleyItem item) {
    const uint64_t key = (uint64_t(uint32_t(item.production)) << 40) ^ (uint64_t(uint32_t(item.dot)) << 32) ^
                         uint64_t(uint32_t(item.origin));
    if (seen_.insert(key).second) set_.items.push_back(item);
  }

  EarleySet close() {
    for (size_t i = 0; i < set_.items.size(); ++i) {
      const EarleyItem item = set_.items[i];
      const Production& p = g_.productions()[size_t(item.production)];
      if (size_t(item.dot) == p.rhs.size()) {
        if (item.production == g_.start_production() && item.origin == 0) set_.accepting = true;
        if (item.origin == position_) continue;  // an empty derivation: stepped over when predicted
        for (const EarleyItem& waiting : (*set_at_)(item.origin).items) {
          const Production& q = g_.productions()[size_t(waiting.production)];
          if (size_t(waiting.dot) < q.rhs.size() && q.rhs[size_t(waiting.dot)] == p.lhs)
            add({waiting.production, waiting.dot + 1, waiting.origin});
        }
        continue;
      }
      const int32_t symbol = p.rhs[size_t(item.dot)];
      if (is_terminal(symbol)) {
        set_.terminals.push_back(terminal_of(symbol));
        continue;
      }
      if (!predicted_nonterminal(symbol))
        for (int32_t q : g_.productions_of(symbol)) add({q, 0, position_});
      if (g_.nullable(symbol)) add({item.production, item.dot + 1, item.origin});
    }
    std::sort(set_.terminals.begin(), set_.terminals.end());
    set_.terminals.erase(std::unique(set_.terminals.begin(), set_.terminals.end()), set_.terminals.end());
    return std::move(set_);
  }

 private:
  bool predicted_nonterminal(int32_t n) {
    if (std::find(predicted_list_.begin(), predicted_list_.end(), n) != predicted_list_.end()) return true;
    predicted_list_.push_back(n);
    return false;
  }

  const Grammar& g_;
  int32_t position_;
  const std::function<const EarleySet&(int32_t)>* set_at_;
  std::vector<int32_t> predicted_list_;
  std::unordered_set<uint64_t> seen_;
  EarleySet set_;
};

}  // namespace

EarleySet earley_start(const Grammar& grammar) {
  const std::function<const EarleySet&(int32_t)> none;
  Closer closer(grammar, 0, &none);
  closer.add({grammar.start_production(), 0, 0});
  return closer.close();
}

EarleySet earley_scan(const Grammar& grammar, const EarleySet& previous, std::span<const int32_t> scanned,
                      int32_t position, const std::function<const EarleySet&(int32_t)>& set_at) {
  Closer closer(grammar, position, &set_at);
  for (const EarleyItem& item : previous.items) {
    const Production& p = grammar.productions()[size_t(item.production)];
    if (size_t(item.dot) == p.rhs.size() || !is_terminal(p.rhs[size_t(item.dot)])) continue;
    if (std::binary_search(scanned.begin(), scanned.end(), terminal_of(p.rhs[size_t(item.dot)])))
      closer.add({item.production, item.dot + 1, item.origin});
  }
  return closer.close();
}

}  // namespace m1::structured
