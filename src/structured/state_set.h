#pragma once
// Sets of automaton states as sorted vectors, and a hash for them: the keys of the subset
// constructions (the lexer's states, the size check of a pattern's deterministic automaton).

#include <cstdint>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace m1::structured {

struct StateSetHash {
  size_t operator()(const std::vector<int32_t>& v) const {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ v.size();
    for (int32_t x : v) h = (h ^ uint64_t(uint32_t(x))) * 0x100000001B3ULL + (h >> 29);
    return size_t(h);
  }
};

template <class Value>
using StateSetMap = std::unordered_map<std::vector<int32_t>, Value, StateSetHash>;
using StateSets = std::unordered_set<std::vector<int32_t>, StateSetHash>;

}  // namespace m1::structured
