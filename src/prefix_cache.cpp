#include "m1/prefix_cache.h"

#include <spdlog/spdlog.h>

#include "m1/error.h"
#include "m1/prefill.h"
#include "m1/state_snapshot.h"
#include "snapshot_store.h"
#include "snapshot_tree.h"

namespace m1 {

PrefixCache::PrefixCache(const Model& model, PrefixCacheOptions options)
    : model_(model), options_(std::move(options)), alignment_(std::max<int64_t>(1, model.backend().prefill_alignment())) {
  const PrefixCacheOptions& o = options_;
  if (o.max_bytes < 1) fail("prefix cache: the memory budget must be positive, got {} bytes", o.max_bytes);
  if (o.every < 0) fail("prefix cache: the snapshot interval must be 0 (none) or more, got {}", o.every);
  if (o.min_disk_tokens < 1) fail("prefix cache: the shortest prefix for disk must be at least 1, got {}", o.min_disk_tokens);
  if (!o.dir.empty() && o.dir_max_bytes < 1)
    fail("prefix cache: the disk budget must be positive, got {} bytes", o.dir_max_bytes);
  every_ = (o.every + alignment_ - 1) / alignment_ * alignment_;
  const auto probe = model.new_sequence();
  tree_ = std::make_unique<SnapshotTree>(o.max_bytes, 2 * model.state_shape().softmax_layers, int64_t(probe->kv_bytes(1)));
  if (!o.dir.empty()) store_ = std::make_unique<SnapshotStore>(o.dir, o.dir_max_bytes, snapshot_format(model));
  publish();
}

PrefixCache::~PrefixCache() = default;

PrefixCache::Hit PrefixCache::restore(const std::string& scope, std::span<const int32_t> prompt) {
  const int64_t limit = last_snapshot_point(int64_t(prompt.size()), 1);  // one token at least left to prefill
  Hit hit;
  std::optional<SnapshotTree::Found> memory = tree_->find(scope, prompt, limit);
  const int64_t in_memory = memory ? memory->tokens : 0;
  // A file longer than what memory holds, the longest first; an unusable one is deleted and the
  // next tried.
  for (auto on_disk = store_ ? store_->find(scope, prompt, limit) : std::nullopt; on_disk && on_disk->tokens > in_memory;
       on_disk = store_->find(scope, prompt, limit)) {
    hit.state = store_->load(*on_disk, scope, prompt, model_);
    if (!hit.state) continue;
    hit.tokens = on_disk->tokens;
    std::lock_guard lock(stats_mutex_);
    ++stats_.disk_hits;
    break;
  }
  if (hit.state) {
    try {
      tree_->insert(scope, prompt.first(size_t(hit.tokens)), *hit.state);
    } catch (const std::exception& error) {
      spdlog::warn("prefix cache: a snapshot read from disk was not kept in memory: {}", error.what());
    }
  } else if (memory) {
    hit.state = restore_state(model_, memory->pieces);
    hit.tokens = memory->tokens;
  }
  {
    std::lock_guard lock(stats_mutex_);
    ++(hit.state ? stats_.hits : stats_.misses);
    stats_.hit_tokens += hit.tokens;
  }
  publish();
  return hit;
}

int64_t PrefixCache::next_snapshot(int64_t pos, int64_t prompt_length) const {
  const int64_t last = last_snapshot_point(prompt_length, alignment_);
  if (last <= pos) return 0;
  if (every_ == 0) return last;
  return std::min(last, (pos / every_ + 1) * every_);
}

// The last point of a prompt (its state, for the next turn of a conversation), and the last
// periodic one before it (a long document shared by prompts that go on differently).
bool PrefixCache::written_to_disk(int64_t point, int64_t prompt_length) const {
  if (!store_ || point < options_.min_disk_tokens) return false;
  const int64_t last = last_snapshot_point(prompt_length, alignment_);
  return point == last || (every_ > 0 && point == (last - 1) / every_ * every_);
}

void PrefixCache::keep(const std::string& scope, std::span<const int32_t> prompt, const SequenceState& state) {
  const auto tokens = prompt.first(size_t(state.length()));
  try {
    std::optional<SnapshotTree::Found> kept = tree_->insert(scope, tokens, state);
    if (written_to_disk(state.length(), int64_t(prompt.size())) && !store_->holds(scope, tokens)) {
      if (!kept) {  // too large for the memory budget: a copy of its own for the disk
        auto copy = std::make_shared<const StateCopy>(copy_state(state));
        kept = SnapshotTree::Found{copy->tokens, copy->pieces(), {SnapshotTree::Bytes(copy, &copy->kv)}};
      }
      store_->write(scope, tokens, std::move(*kept));
    }
  } catch (const std::exception& error) {
    spdlog::warn("prefix cache: a snapshot of {} tokens was not kept: {}", tokens.size(), error.what());
  }
  publish();
}

PrefixCacheStats PrefixCache::stats() const {
  PrefixCacheStats s;
  {
    std::lock_guard lock(stats_mutex_);
    s = stats_;
  }
  if (store_) {  // the writer thread changes these: read them as they are now
    const SnapshotStore::Stats disk = store_->stats();
    s.disk_files = disk.files;
    s.disk_bytes = disk.bytes;
    s.disk_writes = disk.writes;
    s.disk_rejected = disk.rejected;
  }
  return s;
}

void PrefixCache::flush() {
  if (store_) store_->flush();
}

// Copies the memory tier's figures (the engine thread's alone) where stats() reads them.
void PrefixCache::publish() {
  std::lock_guard lock(stats_mutex_);
  stats_.snapshots = tree_->snapshots();
  stats_.bytes = tree_->bytes();
  stats_.evictions = tree_->evictions();
}

}  // namespace m1
