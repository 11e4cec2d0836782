#include "sharded_state.h"

namespace m1 {

ShardedState::ShardedState(const StateShape& whole, std::vector<std::unique_ptr<SequenceState>> parts,
                           Lockstep& lockstep)
    : SequenceState(whole), parts_(std::move(parts)), lockstep_(lockstep) {
  if (!parts_.empty()) length_ = parts_.front()->length();
}

size_t ShardedState::bytes() const {
  size_t total = 0;
  for (const auto& part : parts_) total += part->bytes();
  return total;
}

std::unique_ptr<SequenceState> ShardedState::clone() const {
  std::vector<std::unique_ptr<SequenceState>> copies(parts_.size());
  lockstep_.run([&](int rank) { copies[size_t(rank)] = parts_[size_t(rank)]->clone(); });
  return std::make_unique<ShardedState>(shape_, std::move(copies), lockstep_);
}

void ShardedState::advance_all(int64_t tokens) {
  advance(tokens);
  for (auto& part : parts_) part->advance(tokens);
}

}  // namespace m1
