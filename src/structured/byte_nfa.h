#pragma once
// The terminals of a grammar as one automaton over input symbols: the 256 bytes, and the model's
// marker tokens (<think>, </think>, <tool_calls>, </tool_calls>), which a constrained output may
// hold only as those tokens, never spelled out in bytes. Code-point languages (char_nfa.h) are
// spelled here, as UTF-8 or as the contents of a JSON string (escapes for '"', '\' and control
// characters, every other character as itself).

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "structured/char_nfa.h"

namespace m1::structured {

enum Marker : int32_t { kThinkOpen = 0, kThinkClose = 1, kToolsOpen = 2, kToolsClose = 3, kMarkerCount = 4 };
constexpr int32_t kByteSymbols = 256;
constexpr int32_t kSymbolCount = kByteSymbols + kMarkerCount;
constexpr int32_t marker_symbol(Marker m) { return kByteSymbols + m; }
// The markers' text, which a constrained output never spells in bytes.
constexpr std::array<std::string_view, kMarkerCount> kMarkerText = {"<think>", "</think>", "<tool_calls>",
                                                                    "</tool_calls>"};

struct ByteNfa {
  struct Edge {
    int16_t lo, hi;  // symbols, inclusive
    int32_t to;
  };
  struct State {
    std::vector<Edge> edges;
    std::vector<int32_t> eps;
    int32_t accepts = -1;  // the terminal whose lexeme ends here, or -1
  };
  std::vector<State> states;

  int32_t add_state();
  void edge(int32_t from, int32_t lo, int32_t hi, int32_t to) {
    states[size_t(from)].edges.push_back({int16_t(lo), int16_t(hi), to});
  }
};

// How code points become bytes.
enum class Spelling {
  kUtf8,        // as UTF-8
  kJsonString,  // as inside a JSON string: '"' -> \", '\' -> \\, controls -> \b \f \n \r \t or \u00XX
};

struct ByteFragment {
  int32_t start, end;
};

// The most states a grammar's automaton may take; larger grammars are refused (m1::Error).
constexpr size_t kMaxByteStates = 2000000;

// Adds `nfa`'s language, spelled, as a fragment of `out` from a new start to a new end state.
ByteFragment add_spelled(ByteNfa& out, const CharNfa& nfa, Spelling spelling);
// Adds a fixed byte string.
ByteFragment add_bytes(ByteNfa& out, std::string_view bytes);

}  // namespace m1::structured
