#pragma once
// One sequence's state across the ranks of a tensor-parallel group: each rank's part (the
// lightning states of its heads, the caches of the KV heads it computes) on that rank's backend,
// behind the one SequenceState the engine holds. No state ever crosses ranks.

#include <memory>
#include <vector>

#include "lockstep.h"
#include "m1/backend.h"

namespace m1 {

class ShardedState final : public SequenceState {
 public:
  // `parts`: one per rank, in rank order, made (and later cloned) on the ranks' own threads.
  ShardedState(const StateShape& whole, std::vector<std::unique_ptr<SequenceState>> parts, Lockstep& lockstep);

  size_t bytes() const override;
  std::unique_ptr<SequenceState> clone() const override;

  SequenceState& part(int rank) const { return *parts_[size_t(rank)]; }
  // The group whose ranks hold the parts: a state serves only the model that made it.
  const Lockstep& lockstep() const { return lockstep_; }
  // The state and every part consumed `tokens` more.
  void advance_all(int64_t tokens);

 private:
  std::vector<std::unique_ptr<SequenceState>> parts_;
  Lockstep& lockstep_;
};

}  // namespace m1
