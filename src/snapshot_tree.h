#pragma once
// The prefix cache's memory tier: snapshots of sequences in a radix tree over token ids, one tree
// per scope, least recently used dropped first under a byte budget.
//
// A node stands for a token prefix. It holds the KV rows of the tokens on its edge (those after
// its parent's prefix), in the portable form of SequenceState::save_kv, and may hold a snapshot:
// the lightning states after its prefix. A snapshot is its node's lightning states plus the KV
// rows of every node on the path from the root, so snapshots that share a prefix share those rows.
// Dropping a snapshot frees its lightning states, and the KV rows of nodes that no snapshot
// still needs.

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "m1/backend.h"
#include "m1/state_snapshot.h"

namespace m1 {

class SnapshotTree {
 public:
  using Bytes = std::shared_ptr<const std::vector<std::byte>>;

  // A snapshot found or kept: its pieces, valid while `held` lives (also after the tree drops it).
  struct Found {
    int64_t tokens = 0;
    SnapshotPieces pieces;
    std::vector<Bytes> held;
  };

  // `kv_blocks`: blocks of a KV range (2 per softmax layer); `kv_row_bytes`: one token's rows
  // over all of them.
  SnapshotTree(int64_t max_bytes, int64_t kv_blocks, int64_t kv_row_bytes);
  ~SnapshotTree();

  // The longest snapshot in `scope` whose prefix `tokens` starts with, of at most `limit` tokens;
  // it becomes the most recently used.
  std::optional<Found> find(const std::string& scope, std::span<const int32_t> tokens, int64_t limit);
  // Keeps a snapshot of `state`, which has consumed exactly `tokens` (copying its lightning states
  // and the KV rows no node holds yet), then drops least recently used snapshots until the budget
  // holds. An existing snapshot of the same prefix is only marked used. nullopt when the snapshot
  // alone, with the KV rows it needs, is larger than the budget: nothing is copied then.
  std::optional<Found> insert(const std::string& scope, std::span<const int32_t> tokens, const SequenceState& state);

  int64_t bytes() const { return bytes_; }
  int64_t snapshots() const { return snapshots_; }
  int64_t evictions() const { return evictions_; }

 private:
  struct Node;
  struct Walk;

  Walk walk(const std::string& scope, std::span<const int32_t> tokens, bool create);
  Node* split(Node* node, size_t at);
  Found pieces_of(Node* node) const;
  void touch(Node* node);
  void evict_to_budget();
  void prune(Node* node);
  Bytes copy_kv(const SequenceState& state, int64_t begin, int64_t end);

  int64_t max_bytes_, kv_blocks_, kv_row_bytes_;
  std::map<std::string, std::unique_ptr<Node>> roots_;
  int64_t bytes_ = 0, snapshots_ = 0, evictions_ = 0;
  uint64_t clock_ = 0;
};

}  // namespace m1
