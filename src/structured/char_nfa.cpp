#include "structured/char_nfa.h"

#include <algorithm>
#include <map>
#include <utility>

#include "m1/error.h"
#include "structured/reachability.h"
#include "structured/state_set.h"

namespace m1::structured {
namespace {

struct Fragment {
  int32_t start, end;
};

class ThompsonBuilder {
 public:
  explicit ThompsonBuilder(const char* what) : what_(what) {}

  CharNfa build(const RegexNode& regex) {
    const Fragment f = fragment(regex);
    nfa_.start = f.start;
    nfa_.states[size_t(f.end)].accept = true;
    return std::move(nfa_);
  }

 private:
  int32_t state() {
    if (nfa_.states.size() >= kMaxCharStates) fail("{}: the language is too large (more than {} states)", what_, kMaxCharStates);
    return nfa_.add_state();
  }
  void eps(int32_t from, int32_t to) { nfa_.states[size_t(from)].eps.push_back(to); }

  Fragment fragment(const RegexNode& n) {
    switch (n.kind) {
      case RegexNode::Kind::kSet: {
        const Fragment f{state(), state()};
        if (!n.set.empty()) nfa_.states[size_t(f.start)].edges.push_back({n.set, f.end});
        return f;
      }
      case RegexNode::Kind::kConcat: {
        const int32_t start = state();
        int32_t end = start;
        for (const RegexNode& item : n.items) {
          const Fragment f = fragment(item);
          eps(end, f.start);
          end = f.end;
        }
        return {start, end};
      }
      case RegexNode::Kind::kAlt: {
        const Fragment f{state(), state()};
        for (const RegexNode& item : n.items) {
          const Fragment g = fragment(item);
          eps(f.start, g.start);
          eps(g.end, f.end);
        }
        return f;
      }
      case RegexNode::Kind::kRepeat: {
        const RegexNode& item = n.items[0];
        const int32_t start = state();
        int32_t end = start;
        for (int32_t i = 0; i < n.min; ++i) {
          const Fragment f = fragment(item);
          eps(end, f.start);
          end = f.end;
        }
        if (n.max < 0) {  // a loop
          const Fragment f = fragment(item);
          const int32_t after = state();
          eps(end, f.start);
          eps(end, after);
          eps(f.end, f.start);
          eps(f.end, after);
          return {start, after};
        }
        const int32_t after = state();
        eps(end, after);
        for (int32_t i = n.min; i < n.max; ++i) {  // optional copies, each may stop
          const Fragment f = fragment(item);
          eps(end, f.start);
          eps(f.end, after);
          end = f.end;
        }
        return {start, after};
      }
    }
    return {state(), state()};
  }

  const char* what_;
  CharNfa nfa_;
};

// Epsilon closures with one marker array for many calls: a state is seen when its mark is the
// current call's stamp.
class Closure {
 public:
  explicit Closure(const CharNfa& nfa) : nfa_(nfa), mark_(nfa.states.size(), 0) {}
  // Adds the closure of `from` to `out` (states already added since reset() are skipped).
  void add(int32_t from, std::vector<int32_t>& out) {
    if (mark_[size_t(from)] == stamp_) return;
    mark_[size_t(from)] = stamp_;
    const size_t first = out.size();
    out.push_back(from);
    for (size_t i = first; i < out.size(); ++i)
      for (int32_t t : nfa_.states[size_t(out[i])].eps)
        if (mark_[size_t(t)] != stamp_) {
          mark_[size_t(t)] = stamp_;
          out.push_back(t);
        }
  }
  void reset() { ++stamp_; }

 private:
  const CharNfa& nfa_;
  std::vector<uint32_t> mark_;
  uint32_t stamp_ = 1;
};

// Keeps the states reachable from the start that can reach an accepting state (no epsilons).
CharNfa trim(const CharNfa& nfa) {
  const size_t n = nfa.states.size();
  std::vector<std::vector<int32_t>> successors(n), reverse(n);
  for (size_t s = 0; s < n; ++s)
    for (const auto& e : nfa.states[s].edges) {
      successors[s].push_back(e.to);
      reverse[size_t(e.to)].push_back(int32_t(s));
    }
  std::vector<char> reach(n, 0), live(n, 0);
  reach[size_t(nfa.start)] = 1;
  mark_reaching(successors, reach, [](int32_t) { return true; });
  for (size_t s = 0; s < n; ++s) live[s] = nfa.states[s].accept && reach[s];
  mark_reaching(reverse, live, [&](int32_t p) { return reach[size_t(p)] != 0; });
  CharNfa out;
  std::vector<int32_t> id(n, -1);
  if (!live[size_t(nfa.start)]) {
    out.add_state();
    return out;
  }
  for (size_t s = 0; s < n; ++s)
    if (live[s]) id[s] = out.add_state();
  for (size_t s = 0; s < n; ++s) {
    if (!live[s]) continue;
    CharNfa::State& to = out.states[size_t(id[s])];
    to.accept = nfa.states[s].accept;
    for (const auto& e : nfa.states[s].edges)
      if (live[size_t(e.to)]) to.edges.push_back({e.set, id[size_t(e.to)]});
  }
  out.start = id[size_t(nfa.start)];
  return out;
}

}  // namespace

CharNfa nfa_from_regex(const RegexNode& regex, const char* what) { return ThompsonBuilder(what).build(regex); }

CharNfa without_epsilons(const CharNfa& nfa) {
  CharNfa out;
  out.states.resize(nfa.states.size());
  out.start = nfa.start;
  Closure closure(nfa);
  std::vector<int32_t> reached;
  for (size_t s = 0; s < nfa.states.size(); ++s) {
    closure.reset();
    reached.clear();
    closure.add(int32_t(s), reached);
    for (int32_t t : reached) {
      const CharNfa::State& from = nfa.states[size_t(t)];
      out.states[s].accept = out.states[s].accept || from.accept;
      out.states[s].edges.insert(out.states[s].edges.end(), from.edges.begin(), from.edges.end());
    }
  }
  return trim(out);
}

CharNfa intersect(const CharNfa& a_in, const CharNfa& b_in, const char* what) {
  const CharNfa a = without_epsilons(a_in), b = without_epsilons(b_in);
  CharNfa out;
  std::map<std::pair<int32_t, int32_t>, int32_t> ids;
  std::vector<std::pair<int32_t, int32_t>> work;
  const auto id_of = [&](int32_t x, int32_t y) {
    auto [it, added] = ids.try_emplace({x, y}, int32_t(out.states.size()));
    if (added) {
      if (out.states.size() >= kMaxCharStates)
        fail("{}: the language is too large (more than {} states)", what, kMaxCharStates);
      out.add_state();
      out.states.back().accept = a.states[size_t(x)].accept && b.states[size_t(y)].accept;
      work.push_back({x, y});
    }
    return it->second;
  };
  out.start = id_of(a.start, b.start);
  while (!work.empty()) {
    const auto [x, y] = work.back();
    work.pop_back();
    const int32_t from = ids.at({x, y});
    for (const auto& ea : a.states[size_t(x)].edges)
      for (const auto& eb : b.states[size_t(y)].edges) {
        CodepointSet both = ea.set.intersect(eb.set);
        if (both.empty()) continue;
        const int32_t to = id_of(ea.to, eb.to);
        out.states[size_t(from)].edges.push_back({std::move(both), to});
      }
  }
  return trim(out);
}

CharNfa with_length(const CharNfa& a, int64_t min, int64_t max, const char* what) {
  if (max >= 0 && min > max) {
    CharNfa empty;
    empty.add_state();
    return empty;
  }
  // Counting automaton: state i after i characters; past `min` it loops when unbounded.
  const int64_t counted = max >= 0 ? max : min;
  if (counted >= int64_t(kMaxCharStates)) fail("{}: a length bound of {} is too large", what, counted);
  CharNfa counter;
  for (int64_t i = 0; i <= counted; ++i) counter.add_state();
  for (int64_t i = 0; i <= counted; ++i) {
    CharNfa::State& s = counter.states[size_t(i)];
    s.accept = i >= min;
    if (i < counted) s.edges.push_back({CodepointSet::all(), int32_t(i + 1)});
    else if (max < 0) s.edges.push_back({CodepointSet::all(), int32_t(i)});
  }
  return intersect(a, counter, what);
}

bool is_empty(const CharNfa& nfa) {
  const CharNfa trimmed = without_epsilons(nfa);
  return !trimmed.states[size_t(trimmed.start)].accept && trimmed.states[size_t(trimmed.start)].edges.empty();
}

DeterministicSize deterministic_size(const CharNfa& nfa_in, size_t max_states, size_t max_entries) {
  const CharNfa nfa = without_epsilons(nfa_in);
  // The classes: code points between consecutive boundaries of any edge's ranges.
  std::vector<char32_t> starts{0};
  for (const CharNfa::State& state : nfa.states)
    for (const CharNfa::Edge& e : state.edges)
      for (const auto& [lo, hi] : e.set.ranges()) {
        starts.push_back(lo);
        if (hi < kMaxCodepoint) starts.push_back(hi + 1);
      }
  std::sort(starts.begin(), starts.end());
  starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
  const auto class_of = [&](char32_t c) { return size_t(std::upper_bound(starts.begin(), starts.end(), c) - starts.begin()) - 1; };

  DeterministicSize size;
  const auto within = [&] { return size.states <= max_states && size.entries <= max_entries; };
  StateSets seen;
  std::vector<const std::vector<int32_t>*> work;  // sets seen, not yet expanded (keys of `seen`)
  const auto see = [&](std::vector<int32_t>& set) {
    std::sort(set.begin(), set.end());
    set.erase(std::unique(set.begin(), set.end()), set.end());
    const auto [at, added] = seen.insert(set);
    if (!added) return;
    ++size.states;
    size.entries += set.size();
    work.push_back(&*at);
  };
  std::vector<int32_t> first{nfa.start};
  see(first);
  std::vector<std::vector<int32_t>> targets(starts.size());
  std::vector<size_t> touched;
  while (!work.empty() && within()) {
    const std::vector<int32_t>& set = *work.back();
    work.pop_back();
    touched.clear();
    for (int32_t s : set)
      for (const CharNfa::Edge& e : nfa.states[size_t(s)].edges)
        for (const auto& [lo, hi] : e.set.ranges())
          for (size_t c = class_of(lo); c < starts.size() && starts[c] <= hi; ++c) {
            if (targets[c].empty()) touched.push_back(c);
            targets[c].push_back(e.to);
          }
    for (size_t c : touched) {
      if (within()) see(targets[c]);
      targets[c].clear();
    }
  }
  return size;
}

bool matches(const CharNfa& nfa, std::u32string_view text) {
  Closure closure(nfa);
  std::vector<int32_t> current, next;
  closure.add(nfa.start, current);
  for (char32_t c : text) {
    closure.reset();
    next.clear();
    for (int32_t s : current)
      for (const auto& e : nfa.states[size_t(s)].edges)
        if (e.set.contains(c)) closure.add(e.to, next);
    current.swap(next);
    if (current.empty()) return false;
  }
  for (int32_t s : current)
    if (nfa.states[size_t(s)].accept) return true;
  return false;
}

}  // namespace m1::structured
