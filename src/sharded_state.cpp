#include "sharded_state.h"

#include <cstring>

namespace m1 {

ShardedState::ShardedState(const StateShape& whole, std::vector<std::unique_ptr<SequenceState>> parts,
                           Lockstep& lockstep, const ShardPlan& plan)
    : SequenceState(whole), parts_(std::move(parts)), lockstep_(lockstep), plan_(plan) {
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
  return std::make_unique<ShardedState>(shape_, std::move(copies), lockstep_, plan_);
}

void ShardedState::advance_all(int64_t tokens) {
  advance(tokens);
  for (auto& part : parts_) part->advance(tokens);
}

void ShardedState::on_parts(const std::function<void(int, SequenceState&)>& fn) const {
  lockstep_.run([&](int rank) { fn(rank, *parts_[size_t(rank)]); });
}

void ShardedState::map_lightning(int r, const std::function<void(size_t, size_t, size_t)>& copy) const {
  const Range heads = plan_.ranks[size_t(r)].heads;
  const size_t head = size_t(shape_.head_dim * shape_.head_dim) * sizeof(float);
  for (int64_t l = 0; l < shape_.lightning_layers; ++l)
    copy(size_t(l * shape_.heads + heads.begin) * head, size_t(l * heads.count) * head, size_t(heads.count) * head);
}

// Per softmax layer: the keys of the tokens, then their values; a row holds each KV head's d values.
void ShardedState::map_kv(int r, int64_t tokens, const std::function<void(size_t, size_t, size_t)>& copy) const {
  const std::vector<int64_t>& kv_heads = plan_.ranks[size_t(r)].kv_heads;
  const size_t head = size_t(shape_.head_dim) * size_t(dtype_bits(kv_dtype()) / 8);
  const size_t whole_row = size_t(shape_.kv_heads) * head, part_row = kv_heads.size() * head;
  for (int64_t block = 0; block < 2 * shape_.softmax_layers; ++block)
    for (int64_t t = 0; t < tokens; ++t) {
      const size_t row = size_t(block * tokens + t);
      for (size_t j = 0; j < kv_heads.size(); ++j)
        copy(row * whole_row + size_t(kv_heads[j]) * head, row * part_row + j * head, head);
    }
}

void ShardedState::read_lightning(std::byte* out) const {
  on_parts([&](int r, SequenceState& part) {
    std::vector<std::byte> mine(part.lightning_bytes());
    part.save_lightning(mine);
    map_lightning(r, [&](size_t whole, size_t at, size_t n) { std::memcpy(out + whole, mine.data() + at, n); });
  });
}

void ShardedState::read_kv(int64_t begin, int64_t end, std::byte* out) const {
  // A KV head computed by several ranks (each a copy for its query heads) is the same on each:
  // every rank writes it, the same bytes.
  std::vector<std::vector<std::byte>> rows(parts_.size());
  on_parts([&](int r, SequenceState& part) {
    rows[size_t(r)].resize(part.kv_bytes(end - begin));
    part.save_kv(begin, end, rows[size_t(r)]);
  });
  for (int r = int(parts_.size()) - 1; r >= 0; --r)
    map_kv(r, end - begin, [&](size_t whole, size_t at, size_t n) { std::memcpy(out + whole, rows[size_t(r)].data() + at, n); });
}

void ShardedState::write_kv(const std::byte* in, int64_t tokens) {
  on_parts([&](int r, SequenceState& part) {
    std::vector<std::byte> mine(part.kv_bytes(tokens));
    map_kv(r, tokens, [&](size_t whole, size_t at, size_t n) { std::memcpy(mine.data() + at, in + whole, n); });
    part.append_kv(mine, tokens);
  });
}

void ShardedState::write_lightning(const std::byte* in) {
  on_parts([&](int r, SequenceState& part) {
    std::vector<std::byte> mine(part.lightning_bytes());
    map_lightning(r, [&](size_t whole, size_t at, size_t n) { std::memcpy(mine.data() + at, in + whole, n); });
    part.load_lightning(mine);
  });
}

}  // namespace m1
