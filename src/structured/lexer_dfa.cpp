#include "structured/lexer_dfa.h"

#include <algorithm>
#include <array>
#include <deque>

#include "m1/error.h"

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

size_t LexerDfa::VectorHash::operator()(const std::vector<int32_t>& v) const {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ v.size();
  for (int32_t x : v) h = (h ^ uint64_t(uint32_t(x))) * 0x100000001B3ULL + (h >> 29);
  return size_t(h);
}

LexerDfa::LexerDfa(const ByteNfa& nfa, std::vector<int32_t> terminal_start)
    : nfa_(nfa), terminal_start_(std::move(terminal_start)), class_of_(kSymbolCount), mark_(nfa.states.size(), 0) {
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
  if (int32_t(sets_.size()) >= kMaxLexerStates)
    fail("grammar: matching needs more than {} lexer states (a pattern whose automaton grows too large)",
         kMaxLexerStates);
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
  runs_.back().fill(-2);
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
  std::vector<std::vector<int32_t>> buckets(static_cast<size_t>(classes_));
  const std::vector<int32_t> members = sets_[size_t(state)];  // intern() may grow sets_
  const uint8_t guard = guard_[size_t(state)];
  for (size_t i = 0; i + 1 < members.size(); ++i)
    for (const ByteNfa::Edge& e : nfa_.states[size_t(members[i])].edges)
      for (int32_t c = class_of_[size_t(e.lo)]; c <= class_of_[size_t(e.hi)]; ++c) buckets[size_t(c)].push_back(e.to);
  std::unordered_map<std::vector<int32_t>, int32_t, VectorHash> done;
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

// Whether a lexeme can still end from `state`: a breadth-first search over raw transitions for a
// state that accepts. A search that finds none has seen everything reachable, all dead.
bool LexerDfa::live(int32_t state) {
  if (live_[size_t(state)] >= 0) return live_[size_t(state)] != 0;
  std::vector<int32_t> queue{state};
  std::vector<char> queued;
  const auto mark = [&](int32_t s) {
    if (size_t(s) >= queued.size()) queued.resize(sets_.size() + 1, 0);
    if (queued[size_t(s)]) return false;
    queued[size_t(s)] = 1;
    return true;
  };
  mark(state);
  for (size_t i = 0; i < queue.size(); ++i) {
    const int32_t s = queue[i];
    if (live_[size_t(s)] == 1 || !accepts_[size_t(s)].empty()) {
      live_[size_t(state)] = 1;
      return true;
    }
    if (live_[size_t(s)] == 0) continue;
    if (raw_[size_t(s) * size_t(classes_)] < 0) compute_raw_row(s);
    for (int32_t c = 0; c < classes_; ++c) {
      const int32_t to = raw_[size_t(s) * size_t(classes_) + size_t(c)];
      if (to != kDead && mark(to)) queue.push_back(to);
    }
  }
  for (int32_t s : queue) live_[size_t(s)] = 0;
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
  // Every non-ASCII character, by the well-formed UTF-8 sequences: (first bytes, then the range of
  // the second byte), the rest continuation bytes.
  struct Lead {
    int32_t first_lo, first_hi, second_lo, second_hi, length;
  };
  constexpr Lead leads[] = {{0xC2, 0xDF, 0x80, 0xBF, 2}, {0xE0, 0xE0, 0xA0, 0xBF, 3}, {0xE1, 0xEC, 0x80, 0xBF, 3},
                            {0xED, 0xED, 0x80, 0x9F, 3}, {0xEE, 0xEF, 0x80, 0xBF, 3}, {0xF0, 0xF0, 0x90, 0xBF, 4},
                            {0xF1, 0xF3, 0x80, 0xBF, 4}, {0xF4, 0xF4, 0x80, 0x8F, 4}};
  for (const Lead& lead : leads) {
    std::vector<int32_t> states;
    const auto add_next = [&](const std::vector<int32_t>& from, int32_t lo, int32_t hi, std::vector<int32_t>& to) {
      to.clear();
      for (int32_t s : from)
        for (int32_t b = lo; b <= hi; ++b) {
          const int32_t t = s == kDead ? kDead : next(s, b);
          if (std::find(to.begin(), to.end(), t) == to.end()) to.push_back(t);
        }
    };
    std::vector<int32_t> current{state}, after;
    add_next(current, lead.first_lo, lead.first_hi, after);
    current.swap(after);
    add_next(current, lead.second_lo, lead.second_hi, after);
    current.swap(after);
    for (int32_t i = 2; i < lead.length; ++i) {
      add_next(current, 0x80, 0xBF, after);
      current.swap(after);
    }
    for (int32_t s : current)
      if (!see(s)) return -1;
  }
  return common;
}

int32_t LexerDfa::uniform_run(int32_t state, TextClass text) {
  if (runs_[size_t(state)][size_t(text)] != -2) return runs_[size_t(state)][size_t(text)];
  int32_t at = state, run = 0;
  for (; run < kMaxRunLength; ++run) {
    const int32_t to = uniform_step(at, text);
    // Where a lexeme may end, a refused character may still begin the next one.
    if (to == kDead && accepts_[size_t(at)].empty()) break;
    if (to <= kDead) {
      run = -1;
      break;
    }
    if (to == at) {  // a loop: any length
      run = kMaxRunLength;
      break;
    }
    at = to;
  }
  runs_[size_t(state)][size_t(text)] = int8_t(run);  // runs_ may have grown: no reference kept
  return run;
}

bool LexerDfa::can_continue(int32_t state) {
  if (state == kDead) return false;
  next(state, 0);  // computes the row
  const int32_t* row = &table_[size_t(state) * size_t(classes_)];
  return std::any_of(row, row + classes_, [](int32_t to) { return to != kDead; });
}

}  // namespace m1::structured
