#pragma once
// Backward reachability over an automaton's states, for trimming the states that lead nowhere.

#include <cstdint>
#include <vector>

namespace m1::structured {

// Marks every state from which a state already marked can be reached, given each state's
// predecessors; `allowed(s)` says whether s may be marked at all.
template <class Allowed>
void mark_reaching(const std::vector<std::vector<int32_t>>& predecessors, std::vector<char>& marked, Allowed allowed) {
  std::vector<int32_t> stack;
  for (size_t s = 0; s < marked.size(); ++s)
    if (marked[s]) stack.push_back(int32_t(s));
  while (!stack.empty()) {
    const int32_t s = stack.back();
    stack.pop_back();
    for (int32_t p : predecessors[size_t(s)])
      if (!marked[size_t(p)] && allowed(p)) {
        marked[size_t(p)] = 1;
        stack.push_back(p);
      }
  }
}

}  // namespace m1::structured
