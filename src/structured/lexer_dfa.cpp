#include "structured/lexer_dfa.h"

#include <algorithm>
#include <array>
#include <deque>

#include "m1/error.h"
#include "structured/reachability.h"

namespace m1::structured {
namespace {

// Aho-Corasick automaton over the markers' text: which prefix of a marker the last bytes spell.
class MarkerGuard {
 public:
  static constexpr uint8_t kCaught = 255;  // a marker's text is complete

  MarkerGuard() {
    // The trie of the texts.
    std::vector<std::array<int16_t, 256>> child(1);
    child[0].fill(-1);
    std::vector<char> complete(1, 0);
    for (std::string_view text : kMarkerText) {
      size_t at = 0;
      for (char ch : text) {
        const auto b = static_cast<uint8_t>(ch);
        if (child[at][b] < 0) {
          child[at][b] = int16_t(child.size());
          child.emplace_back();
          child.back().fill(-1);
          complete.push_back(0);
        }
        at = size_t(child[at][b]);
      }
      complete[at] = 1;
    }
    // Failure links, breadth first, into a full transition table.
    next_.resize(child.size());
    std::vector<int16_t> fail_to(child.size(), 0);
    std::deque<size_t> queue;
    for (int b = 0; b < 256; ++b) {
      if (child[0][size_t(b)] >= 0) {
        next_[0][size_t(b)] = uint8_t(child[0][size_t(b)]);
        queue.push_back(size_t(child[0][size_t(b)]));
      } else {
        next_[0][size_t(b)] = 0;
      }
    }
    while (!queue.empty()) {
      const size_t s = queue.front();
      queue.pop_front();
      for (int b = 0; b < 256; ++b) {
        const int16_t c = child[s][size_t(b)];
        if (c >= 0) {
          fail_to[size_t(c)] = int16_t(next_[size_t(fail_to[s])][size_t(b)]);
          complete[size_t(c)] = char(complete[size_t(c)] || complete[size_t(fail_to[size_t(c)])]);
          next_[s][size_t(b)] = uint8_t(c);
          queue.push_back(size_t(c));
        } else {
          next_[s][size_t(b)] = next_[size_t(fail_to[s])][size_t(b)];
        }
      }
    }
    for (auto& row : next_)
      for (uint8_t& to : row)
        if (complete[to]) to = kCaught;
  }

  uint8_t step(uint8_t state, int32_t symbol) const {
    return symbol >= kByteSymbols ? 0 : next_[state][size_t(symbol)];
  }

 private:
  std::vector<std::array<uint8_t, 256>> next_;
};

const MarkerGuard& marker_guard() {
  static const MarkerGuard guard;
  return guard;
}

}  // namespace

LexerDfa::LexerDfa(const ByteNfa& nfa, std::vector<int32_t> terminal_start, int32_t max_states)
    : nfa_(nfa), terminal_start_(std::move(terminal_start)), max_states_(max_states), class_of_(kSymbolCount), mark_(nfa.states.size(), 0) {
  // Symbols split into classes at every edge's bounds, around every byte of the markers' text,
  // and between bytes and markers.
  std::vector<char> cut(kSymbolCount + 1, 0);
  for (const ByteNfa::State& s : nfa.states)
    for (const ByteNfa::Edge& e : s.edges) {
      cut[size_t(e.lo)] = 1;
      cut[size_t(e.hi) + 1] = 1;
    }
  for (std::string_view text : kMarkerText)
    for (char ch : text) {
      cut[static_cast<uint8_t>(ch)] = 1;
      cut[size_t(static_cast<uint8_t>(ch)) + 1] = 1;
    }
  for (int32_t m = 0; m <= kMarkerCount; ++m) cut[size_t(kByteSymbols + m)] = 1;
  for (int32_t symbol = 0; symbol < kSymbolCount; ++symbol) {
    if (symbol > 0 && cut[size_t(symbol)]) ++classes_;
    class_of_[size_t(symbol)] = classes_;
  }
  ++classes_;
  class_end_.assign(size_t(classes_), kSymbolCount);
  for (int32_t symbol = 0; symbol + 1 < kSymbolCount; ++symbol)
    if (class_of_[size_t(symbol + 1)] != class_of_[size_t(symbol)]) class_end_[size_t(class_of_[size_t(symbol)])] = symbol + 1;
  // NFA states that reach an accepting one without reading '<' or '>': from such a state a lexeme
  // can end without spelling a marker, whose text starts with one and ends with the other.
  std::vector<std::vector<int32_t>> predecessors(nfa.states.size());
  for (size_t s = 0; s < nfa.states.size(); ++s) {
    for (const ByteNfa::Edge& e : nfa.states[s].edges) {
      const bool only_brackets = e.lo == e.hi && (e.lo == '<' || e.lo == '>');
      if (!only_brackets) predecessors[size_t(e.to)].push_back(int32_t(s));
    }
    for (int32_t t : nfa.states[s].eps) predecessors[size_t(t)].push_back(int32_t(s));
  }
  free_.assign(nfa.states.size(), 0);
  for (size_t s = 0; s < nfa.states.size(); ++s) free_[s] = nfa.states[s].accepts >= 0;
  mark_reaching(predecessors, free_, [](int32_t) { return true; });
  std::vector<int32_t> dead{-1};
  intern(dead);  // state 0: no lexeme possible
  std::fill(raw_.begin(), raw_.end(), kDead);
  std::fill(table_.begin(), table_.end(), kDead);
  live_[0] = 0;
}

void LexerDfa::close(std::vector<int32_t>& set) {
  if (++stamp_ == 0) {
    std::fill(mark_.begin(), mark_.end(), 0);
    stamp_ = 1;
  }
  std::vector<int32_t> out;
  out.reserve(set.size() * 2);
  for (int32_t s : set)
    if (mark_[size_t(s)] != stamp_) {
      mark_[size_t(s)] = stamp_;
      out.push_back(s);
    }
  for (size_t i = 0; i < out.size(); ++i)
    for (int32_t t : nfa_.states[size_t(out[i])].eps)
      if (mark_[size_t(t)] != stamp_) {
        mark_[size_t(t)] = stamp_;
        out.push_back(t);
      }
  std::sort(out.begin(), out.end());
  set.swap(out);
}

// `key`: sorted NFA states followed by -1 - guard.
int32_t LexerDfa::intern(std::vector<int32_t>& key) {
  const auto found = ids_.find(key);
  if (found != ids_.end()) return found->second;
  if (int32_t(sets_.size()) >= max_states_)
    throw RequestError(fmt::format(
        "the output format needs more than {} lexer states to match (patterns whose automata grow too large, "
        "alone or side by side)",
        max_states_));
  const int32_t id = int32_t(sets_.size());
  std::vector<int32_t> accepted;
  for (size_t i = 0; i + 1 < key.size(); ++i) {
    const int32_t terminal = nfa_.states[size_t(key[i])].accepts;
    if (terminal >= 0) accepted.push_back(terminal);
  }
  std::sort(accepted.begin(), accepted.end());
  accepted.erase(std::unique(accepted.begin(), accepted.end()), accepted.end());
  accepts_.push_back(std::move(accepted));
  guard_.push_back(uint8_t(-1 - key.back()));
  live_.push_back(-1);
  runs_.emplace_back();
  steps_.emplace_back();
  steps_.back().fill(kUnknownStep);
  ids_.emplace(key, id);
  sets_.push_back(key);
  raw_.resize(raw_.size() + size_t(classes_), -1);
  table_.resize(table_.size() + size_t(classes_), -1);
  return id;
}

int32_t LexerDfa::start(std::span<const int32_t> terminals) {
  std::vector<int32_t> key(terminals.begin(), terminals.end());
  const auto found = starts_.find(key);
  if (found != starts_.end()) return found->second;
  std::vector<int32_t> set;
  for (int32_t t : terminals)
    if (terminal_start_[size_t(t)] >= 0) set.push_back(terminal_start_[size_t(t)]);
  close(set);
  int32_t id = kDead;
  if (!set.empty()) {
    set.push_back(-1);  // no marker text begun
    id = intern(set);
    if (!live(id)) id = kDead;
  }
  starts_.emplace(std::move(key), id);
  return id;
}

// Each class's targets gathered from the NFA edges, closed and interned (classes with the same
// targets and the same marker-prefix step share the work).
void LexerDfa::compute_raw_row(int32_t state) {
  std::vector<std::vector<int32_t>>& buckets = buckets_;
  buckets.resize(size_t(classes_));
  for (auto& bucket : buckets) bucket.clear();
  const std::vector<int32_t> members = sets_[size_t(state)];  // intern() may grow sets_
  const uint8_t guard = guard_[size_t(state)];
  for (size_t i = 0; i + 1 < members.size(); ++i)
    for (const ByteNfa::Edge& e : nfa_.states[size_t(members[i])].edges)
      for (int32_t c = class_of_[size_t(e.lo)]; c <= class_of_[size_t(e.hi)]; ++c) buckets[size_t(c)].push_back(e.to);
  StateSetMap<int32_t>& done = row_targets_;
  done.clear();
  int32_t symbol = 0;
  for (int32_t c = 0; c < classes_; ++c) {
    while (class_of_[size_t(symbol)] < c) ++symbol;  // the class's first symbol
    std::vector<int32_t>& bucket = buckets[size_t(c)];
    const uint8_t next_guard = marker_guard().step(guard, symbol);
    int32_t to = kDead;
    if (!bucket.empty() && next_guard != MarkerGuard::kCaught) {
      std::sort(bucket.begin(), bucket.end());
      bucket.erase(std::unique(bucket.begin(), bucket.end()), bucket.end());
      bucket.push_back(-1 - int32_t(next_guard));
      const auto seen = done.find(bucket);
      if (seen != done.end()) {
        to = seen->second;
      } else {
        std::vector<int32_t> key = bucket;
        key.pop_back();
        close(key);
        key.push_back(-1 - int32_t(next_guard));
        to = intern(key);
        done.emplace(std::move(bucket), to);
      }
    }
    raw_[size_t(state) * size_t(classes_) + size_t(c)] = to;
  }
}

// Whether a lexeme can still end from `state`: a search over raw transitions for a state that
// accepts or is known to be live, whose path there is then live too. Breadth first while it stays
// small, as most lexemes can end within a few symbols (a closing quote); then depth first, as the
// terminals' automaton is trimmed, so nearly every path leads to a lexeme's end and the first one
// tried usually gets there however far away, where a breadth-first search would build every state
// within that distance (a pattern with a '>' hundreds of symbols on: seconds). A search that finds
// none has seen everything reachable, all dead.
bool LexerDfa::live(int32_t state) {
  if (live_[size_t(state)] >= 0) return live_[size_t(state)] != 0;
  const std::vector<int32_t>& members = sets_[size_t(state)];
  if (std::any_of(members.begin(), members.end() - 1, [&](int32_t s) { return free_[size_t(s)] != 0; })) {
    live_[size_t(state)] = 1;
    return true;
  }
  constexpr size_t kBreadthFirstStates = 256;
  const int near = live_breadth_first(state, kBreadthFirstStates);
  return near >= 0 ? near != 0 : live_depth_first(state);
}

namespace {

// Which lexer states a search has reached.
class Reached {
 public:
  explicit Reached(size_t states) : marked_(states, 0) {}
  bool mark(int32_t s) {  // false when already marked
    if (size_t(s) >= marked_.size()) marked_.resize(size_t(s) + 1, 0);
    if (marked_[size_t(s)]) return false;
    marked_[size_t(s)] = 1;
    return true;
  }

 private:
  std::vector<char> marked_;
};

}  // namespace

int LexerDfa::live_breadth_first(int32_t state, size_t budget) {
  std::vector<int32_t> queue{state}, parent{-1};  // parent: the index in queue it was reached from
  Reached reached(sets_.size());
  reached.mark(state);
  for (size_t i = 0; i < queue.size(); ++i) {
    const int32_t s = queue[i];
    if (ends_or_live(s)) {
      for (int32_t at = int32_t(i); at >= 0; at = parent[size_t(at)]) live_[size_t(queue[size_t(at)])] = 1;
      return 1;
    }
    if (live_[size_t(s)] == 0) continue;
    if (i >= budget) return -1;
    if (raw_[size_t(s) * size_t(classes_)] < 0) compute_raw_row(s);
    for (int32_t c = 0; c < classes_; ++c) {
      const int32_t to = raw_[size_t(s) * size_t(classes_) + size_t(c)];
      if (to != kDead && reached.mark(to)) {
        queue.push_back(to);
        parent.push_back(int32_t(i));
      }
    }
  }
  for (int32_t s : queue) live_[size_t(s)] = 0;
  return 0;
}

bool LexerDfa::live_depth_first(int32_t state) {
  struct Frame {
    int32_t state, next_class;
  };
  std::vector<Frame> stack{{state, 0}};
  std::vector<int32_t> seen{state};
  Reached reached(sets_.size());
  reached.mark(state);
  while (!stack.empty()) {
    const int32_t s = stack.back().state;
    if (stack.back().next_class == 0) {  // arrived
      if (ends_or_live(s)) {
        for (const Frame& f : stack) live_[size_t(f.state)] = 1;
        return true;
      }
      if (live_[size_t(s)] == 0) {
        stack.pop_back();
        continue;
      }
      if (raw_[size_t(s) * size_t(classes_)] < 0) compute_raw_row(s);
    }
    if (stack.back().next_class == classes_) {
      stack.pop_back();
      continue;
    }
    const int32_t to = raw_[size_t(s) * size_t(classes_) + size_t(stack.back().next_class++)];
    if (to != kDead && reached.mark(to)) {
      seen.push_back(to);
      stack.push_back({to, 0});
    }
  }
  for (int32_t s : seen) live_[size_t(s)] = 0;
  return false;
}

int32_t LexerDfa::compute_row_and_get(int32_t state, int32_t symbol) {
  if (raw_[size_t(state) * size_t(classes_)] < 0) compute_raw_row(state);
  for (int32_t c = 0; c < classes_; ++c) {
    const int32_t to = raw_[size_t(state) * size_t(classes_) + size_t(c)];
    table_[size_t(state) * size_t(classes_) + size_t(c)] = to != kDead && live(to) ? to : kDead;
  }
  return table_[size_t(state) * size_t(classes_) + size_t(class_of_[size_t(symbol)])];
}

int32_t LexerDfa::uniform_step(int32_t state, TextClass text) {
  int32_t common = -2;  // none seen yet
  const auto see = [&](int32_t to) {
    if (common == -2) common = to;
    return common == to;
  };
  for (int32_t b = 0x20; b < 0x7F; ++b)
    if (in_text_class(text, uint8_t(b)) && !see(next(state, b))) return -1;
  if (text != kUnicodeText) return common;
  // Every non-ASCII character of the class, by the byte ranges of each position of the
  // well-formed UTF-8 sequences (U+2028 and U+2029, E2 80 A8-A9, left out). Bytes of one symbol
  // class lead alike, so one byte per class is tried.
  struct Sequence {
    std::array<std::pair<int32_t, int32_t>, 4> bytes;
    int32_t length;
  };
  constexpr Sequence sequences[] = {
      {{{{0xC2, 0xDF}, {0x80, 0xBF}}}, 2},
      {{{{0xE0, 0xE0}, {0xA0, 0xBF}, {0x80, 0xBF}}}, 3},
      {{{{0xE1, 0xE1}, {0x80, 0xBF}, {0x80, 0xBF}}}, 3},
      {{{{0xE2, 0xE2}, {0x81, 0xBF}, {0x80, 0xBF}}}, 3},
      {{{{0xE2, 0xE2}, {0x80, 0x80}, {0x80, 0xA7}}}, 3},
      {{{{0xE2, 0xE2}, {0x80, 0x80}, {0xAA, 0xBF}}}, 3},
      {{{{0xE3, 0xEC}, {0x80, 0xBF}, {0x80, 0xBF}}}, 3},
      {{{{0xED, 0xED}, {0x80, 0x9F}, {0x80, 0xBF}}}, 3},
      {{{{0xEE, 0xEF}, {0x80, 0xBF}, {0x80, 0xBF}}}, 3},
      {{{{0xF0, 0xF0}, {0x90, 0xBF}, {0x80, 0xBF}, {0x80, 0xBF}}}, 4},
      {{{{0xF1, 0xF3}, {0x80, 0xBF}, {0x80, 0xBF}, {0x80, 0xBF}}}, 4},
      {{{{0xF4, 0xF4}, {0x80, 0x8F}, {0x80, 0xBF}, {0x80, 0xBF}}}, 4},
  };
  std::vector<int32_t> current, after;
  for (const Sequence& sequence : sequences) {
    current.assign(1, state);
    for (int32_t i = 0; i < sequence.length; ++i) {
      after.clear();
      const auto [lo, hi] = sequence.bytes[size_t(i)];
      for (int32_t s : current)
        for (int32_t b = lo; b <= hi; b = class_end_[size_t(class_of_[size_t(b)])]) {
          const int32_t t = s == kDead ? kDead : next(s, b);
          if (std::find(after.begin(), after.end(), t) == after.end()) after.push_back(t);
        }
      current.swap(after);
    }
    for (int32_t s : current)
      if (!see(s)) return -1;
  }
  return common;
}

// A state's run is found by following its chain of uniform steps until it ends (every character
// refused, or treated apart) or passes kMaxRunLength. Each step and each run found is kept per
// state, so the chains of later states cost a lookup per step.
int32_t LexerDfa::uniform_run(int32_t state, TextClass text, int32_t cap) {
  const size_t c = size_t(text);
  std::vector<int32_t>& path = run_path_;
  path.clear();
  int32_t at = state;
  RunEnd end{};
  for (;;) {
    if (runs_[size_t(at)][c].known) {
      end = runs_[size_t(at)][c];
      break;
    }
    if (int32_t(path.size()) > kMaxRunLength) {  // long enough for any token: "at least"
      end = {true, false, 0};
      path.resize(1);
      end.length = kMaxRunLength - 1;  // path[0] gets kMaxRunLength below
      break;
    }
    path.push_back(at);
    if (steps_[size_t(at)][c] == kUnknownStep) steps_[size_t(at)][c] = uniform_step(at, text);
    const int32_t to = steps_[size_t(at)][c];
    if (to == kDead && accepts_[size_t(at)].empty()) {
      end = {true, false, -1};  // refused: the run ends at `at`
      break;
    }
    if (to <= kDead) {
      end = {true, true, -1};  // treated apart (or a lexeme may end here)
      break;
    }
    at = to;
  }
  // Back along the path: each state's run is one more than its successor's.
  for (size_t i = path.size(); i-- > 0;) {
    end.length = std::min(end.length + 1, kMaxRunLength);
    runs_[size_t(path[i])][c] = end;
  }
  const RunEnd& run = runs_[size_t(state)][c];
  if (run.length >= cap) return cap;
  return run.apart ? -1 : run.length;
}

int32_t LexerDfa::unguarded(int32_t state) {
  if (guard_[size_t(state)] == 0) return state;
  std::vector<int32_t> key = sets_[size_t(state)];
  key.back() = -1;
  const int32_t twin = intern(key);
  return live(twin) ? twin : kDead;
}

bool LexerDfa::guard_differs(int32_t state, uint8_t byte) const {
  const uint8_t guard = guard_[size_t(state)];
  return guard != 0 && marker_guard().step(guard, byte) != marker_guard().step(0, byte);
}

bool LexerDfa::can_continue(int32_t state) {
  if (state == kDead) return false;
  next(state, 0);  // computes the row
  const int32_t* row = &table_[size_t(state) * size_t(classes_)];
  return std::any_of(row, row + classes_, [](int32_t to) { return to != kDead; });
}

}  // namespace m1::structured
