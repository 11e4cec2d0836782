#pragma once
// One sequence's state across the ranks of a tensor-parallel group: each rank's part (the
// lightning states of its heads, the caches of the KV heads it computes) on that rank's backend,
// behind the one SequenceState the engine holds. No state ever crosses ranks in a step; its
// portable form (what prefix-cache snapshots and cache files hold) is the whole model's, put
// together from the parts' and cut back into them on restore, so that a snapshot reads the same
// whatever the group (the format's numerics still tell the groups apart).

#include <functional>
#include <memory>
#include <vector>

#include "lockstep.h"
#include "m1/backend.h"
#include "m1/sharding.h"

namespace m1 {

class ShardedState final : public SequenceState {
 public:
  // `parts`: one per rank, in rank order, made (and later cloned) on the ranks' own threads;
  // `plan` says which heads and KV heads each holds (it outlives the state, as the model does).
  ShardedState(const StateShape& whole, std::vector<std::unique_ptr<SequenceState>> parts, Lockstep& lockstep,
               const ShardPlan& plan);

  size_t bytes() const override;
  std::unique_ptr<SequenceState> clone() const override;
  DType kv_dtype() const override { return parts_.front()->kv_dtype(); }

  SequenceState& part(int rank) const { return *parts_[size_t(rank)]; }
  // The group whose ranks hold the parts: a state serves only the model that made it.
  const Lockstep& lockstep() const { return lockstep_; }
  // The state and every part consumed `tokens` more.
  void advance_all(int64_t tokens);

 protected:
  void read_lightning(std::byte* out) const override;
  void read_kv(int64_t begin, int64_t end, std::byte* out) const override;
  void write_kv(const std::byte* rows, int64_t tokens) override;
  void write_lightning(const std::byte* in) override;

 private:
  // fn(rank, part) on each rank's thread.
  void on_parts(const std::function<void(int, SequenceState&)>& fn) const;
  // Calls copy(whole_offset, part_offset, bytes) for every run of bytes of rank `r`'s part of
  // `tokens` tokens of KV rows (kv) or of the lightning states, in the portable layout.
  void map_kv(int r, int64_t tokens, const std::function<void(size_t, size_t, size_t)>& copy) const;
  void map_lightning(int r, const std::function<void(size_t, size_t, size_t)>& copy) const;

  std::vector<std::unique_ptr<SequenceState>> parts_;
  Lockstep& lockstep_;
  const ShardPlan& plan_;
};

}  // namespace m1
