#include "structured/matcher.h"

#include "m1/error.h"

namespace m1::structured {

Matcher::Matcher(std::shared_ptr<Grammar> grammar) : grammar_(std::move(grammar)) {
  chart_.push_back(earley_start(*grammar_));
  reset_contexts();
  state_ = contexts_[0].start;
}

void Matcher::reset_contexts() {
  contexts_.clear();
  boundaries_.clear();
  Context base;
  base.position = int32_t(chart_.size()) - 1;
  base.start = lexer().start(chart_.back().terminals);
  contexts_.push_back(std::move(base));
}

const EarleySet& Matcher::set_of(int32_t context) const {
  return context == kBase ? chart_.back() : contexts_[size_t(context)].set;
}

const EarleySet& Matcher::set_at(int32_t context, int32_t position) const {
  if (position < int32_t(chart_.size())) return chart_[size_t(position)];
  while (contexts_[size_t(context)].position != position) context = contexts_[size_t(context)].parent;
  return contexts_[size_t(context)].set;
}

int32_t Matcher::boundary(int32_t context, int32_t state) {
  const uint64_t key = (uint64_t(uint32_t(context)) << 32) | uint32_t(state);
  if (const auto found = boundaries_.find(key); found != boundaries_.end()) return found->second;
  int32_t result = -1;
  const auto accepted = lexer().accepts(state);
  if (!accepted.empty()) {
    const int32_t position = contexts_[size_t(context)].position + 1;
    const std::function<const EarleySet&(int32_t)> earlier = [&](int32_t p) -> const EarleySet& {
      return set_at(context, p);
    };
    EarleySet set = earley_scan(*grammar_, set_of(context), accepted, position, earlier);
    if (!set.items.empty()) {
      Context next;
      next.parent = context;
      next.position = position;
      next.start = lexer().start(set.terminals);
      next.set = std::move(set);
      result = int32_t(contexts_.size());
      contexts_.push_back(std::move(next));
    }
  }
  boundaries_.emplace(key, result);
  return result;
}

bool Matcher::step_across(int32_t& context, int32_t& state, int32_t symbol) {
  const int32_t next_context = boundary(context, state);
  if (next_context < 0) return false;
  const int32_t to = lexer().next(contexts_[size_t(next_context)].start, symbol);
  if (to == LexerDfa::kDead) return false;
  context = next_context;
  state = to;
  return true;
}

bool Matcher::can_end() {
  if (!started_) return chart_.back().accepting;
  const int32_t after = boundary(kBase, state_);
  return after >= 0 && set_of(after).accepting;
}

bool Matcher::advance(int32_t symbol) {
  int32_t context = kBase, state = state_;
  if (!step(context, state, symbol)) return false;
  if (context != kBase) {
    // Commit the contexts the step crossed, oldest first.
    std::vector<int32_t> path;
    for (int32_t c = context; c != kBase; c = contexts_[size_t(c)].parent) path.push_back(c);
    for (auto it = path.rbegin(); it != path.rend(); ++it) chart_.push_back(std::move(contexts_[size_t(*it)].set));
    reset_contexts();
    ++generation_;
  }
  state_ = state;
  started_ = true;
  return true;
}

bool Matcher::advance_bytes(std::string_view bytes) {
  // Speculate over the whole string first, so that a refusal changes nothing.
  int32_t context = kBase, state = state_;
  for (char ch : bytes)
    if (!step(context, state, static_cast<uint8_t>(ch))) return false;
  for (char ch : bytes) advance(static_cast<uint8_t>(ch));
  return true;
}

bool Matcher::must_end() {
  if (!can_end()) return false;
  if (!started_) return chart_.back().terminals.empty();
  if (lexer().can_continue(state_)) return false;
  const int32_t after = boundary(kBase, state_);
  return after >= 0 && set_of(after).terminals.empty();
}

}  // namespace m1::structured
