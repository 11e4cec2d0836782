#pragma once
// Automatic prefix caching: snapshots of prompts' states, so that a request whose prompt starts
// with a cached prefix (a shared system prompt, the earlier turns of a chat, a long document)
// resumes from it and prefills only the rest.
//
// A lightning layer's whole past is one fixed-size state per head; only the softmax layers keep
// a KV cache that grows. A snapshot after N tokens is those states plus the KV rows of the N
// tokens, kept in host memory (m1/state_snapshot.h: on a GPU, snapshots live in host memory and
// leave the device's to the running sequences). Snapshots sharing a prefix share its KV rows (a
// radix tree over token ids); a sequence restored from one gets its own copy. Least recently used
// snapshots go first when the memory budget is reached; with a directory, snapshots of long
// prefixes are also written to disk and found again after a restart.
//
// Snapshots are taken only where a prefill chunk may end without changing a sum
// (Backend::prefill_alignment, m1/prefill.h), so a request resumed from one gets exactly the
// numbers it would get from a cold prefill. Requests share snapshots only within one scope (the
// server's API key and cache_salt): a hit is faster, and timing it tells whether a prefix was sent
// before. Used on the engine's thread; stats() from any.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <span>
#include <string>

#include "m1/backend.h"
#include "m1/model.h"

namespace m1 {

struct PrefixCacheOptions {
  int64_t max_bytes = 0;  // memory for snapshots; 0: no cache
  // A snapshot every this many tokens of a long prompt (rounded up to the backend's prefill
  // alignment), besides the one near its end; 0: only that one.
  int64_t every = 4096;
  std::filesystem::path dir;      // snapshot files; empty: memory only
  int64_t dir_max_bytes = 0;      // disk budget for the files
  int64_t min_disk_tokens = 4096;  // only prefixes at least this long are written to disk
};

struct PrefixCacheStats {
  int64_t hits = 0, misses = 0, hit_tokens = 0;  // requests that resumed from a snapshot, and those that did not
  int64_t snapshots = 0, bytes = 0, evictions = 0;  // in memory: held now, and dropped for the budget
  int64_t disk_hits = 0, disk_files = 0, disk_bytes = 0, disk_writes = 0, disk_rejected = 0;
};

class SnapshotTree;
class SnapshotStore;

class PrefixCache {
 public:
  // Throws m1::Error for invalid options or a directory that cannot be used.
  PrefixCache(const Model& model, PrefixCacheOptions options);
  ~PrefixCache();  // finishes queued disk writes

  struct Hit {
    std::unique_ptr<SequenceState> state;  // null on a miss
    int64_t tokens = 0;                    // prompt tokens the state has consumed
  };
  // A state resumed from the longest snapshot of a prefix of `prompt` in `scope` that leaves at
  // least one prompt token to prefill, from memory or disk (a disk hit is then kept in memory too).
  Hit restore(const std::string& scope, std::span<const int32_t> prompt);
  // Where the prefill of `prompt_length` tokens that has consumed `pos` should stop next for a
  // snapshot; 0: nowhere.
  int64_t next_snapshot(int64_t pos, int64_t prompt_length) const;
  // Keeps a snapshot of `state`, which has consumed the first state.length() tokens of `prompt`
  // (a point next_snapshot gave), and writes it to disk when it is long enough and one of the
  // last two points of the prompt. Failures (no memory, a full disk) are logged, never thrown.
  void keep(const std::string& scope, std::span<const int32_t> prompt, const SequenceState& state);

  PrefixCacheStats stats() const;
  // Waits for the queued disk writes.
  void flush();
  int64_t alignment() const { return alignment_; }

 private:
  bool written_to_disk(int64_t point, int64_t prompt_length) const;
  void publish();

  const Model& model_;
  PrefixCacheOptions options_;
  int64_t alignment_, every_;
  std::unique_ptr<SnapshotTree> tree_;
  std::unique_ptr<SnapshotStore> store_;
  mutable std::mutex stats_mutex_;
  PrefixCacheStats stats_;
};

}  // namespace m1
