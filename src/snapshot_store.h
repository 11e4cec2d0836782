#pragma once
// The prefix cache's disk tier: snapshot files (m1/state_snapshot.h) in one directory, found
// again after a restart, least recently used deleted first under a byte budget. Files are written
// by a thread of its own, so the engine never waits for the disk to save; reading one back is a
// cache hit, on the caller's thread.
//
// A file that does not match this model, backend, precision or state layout, or is damaged, is
// skipped with a warning and deleted: at startup when its header is wrong, when it is read back
// when its contents are. Files of other names in the directory are left alone.

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "m1/state_snapshot.h"
#include "snapshot_tree.h"

namespace m1 {

class SnapshotStore {
 public:
  struct Stats {
    int64_t files = 0, bytes = 0, writes = 0, rejected = 0;
  };
  struct Match {
    int64_t tokens = 0;
    std::filesystem::path path;
  };

  // Creates `dir` if needed and reads the headers of the files in it. Throws m1::Error when the
  // directory cannot be made or read.
  SnapshotStore(std::filesystem::path dir, int64_t max_bytes, SnapshotFormat format);
  ~SnapshotStore();  // finishes the writes queued so far

  // The longest stored prefix of `tokens` in `scope`, of at most `limit` tokens.
  std::optional<Match> find(const std::string& scope, std::span<const int32_t> tokens, int64_t limit) const;
  // Whether this prefix is stored, or queued to be.
  bool holds(const std::string& scope, std::span<const int32_t> tokens) const;
  // Queues a file of the snapshot of `tokens`; the pieces are held until it is written.
  void write(const std::string& scope, std::span<const int32_t> tokens, SnapshotTree::Found snapshot);
  // The state of a file find() gave, or null when the file turned out unusable (it is then
  // deleted, with a warning) or has gone.
  std::unique_ptr<SequenceState> load(const Match& match, const std::string& scope, std::span<const int32_t> tokens,
                                      const Model& model);
  // Waits until every queued write is done.
  void flush();
  Stats stats() const;

 private:
  struct Entry {
    std::string scope;
    std::vector<int32_t> tokens;
    uint64_t bytes = 0;
    int64_t used = 0;  // nanoseconds since the epoch: the file's modification time
  };
  struct Job {
    std::string scope;
    std::vector<int32_t> tokens;
    SnapshotTree::Found snapshot;
  };

  void scan();
  void writer();
  void store(Job& job);
  void reject(const std::filesystem::path& path, const std::string& why);  // mutex_ held
  void evict_to_budget();                                                   // mutex_ held
  std::filesystem::path path_of(const std::string& scope, std::span<const int32_t> tokens) const;

  std::filesystem::path dir_;
  int64_t max_bytes_;
  SnapshotFormat format_;

  mutable std::mutex mutex_;  // guards everything below
  std::condition_variable wake_, idle_;
  std::map<std::filesystem::path, Entry> entries_;
  std::set<std::filesystem::path> queued_;
  std::deque<Job> jobs_;
  bool writing_ = false, stopping_ = false;
  Stats stats_;
  std::thread thread_;
};

}  // namespace m1
