#include "snapshot_tree.h"

#include <algorithm>
#include <cstring>

#include "m1/error.h"

namespace m1 {

struct SnapshotTree::Node {
  std::vector<int32_t> edge;  // the tokens after the parent's prefix
  int64_t length = 0;         // tokens of the prefix
  Node* parent = nullptr;
  std::map<int32_t, std::unique_ptr<Node>> children;  // by the first token of their edge
  Bytes kv;                   // the KV rows of the edge's tokens
  Bytes lightning;            // the snapshot's lightning states, when one is kept here
  uint64_t used = 0;          // when the snapshot was last found or kept

  size_t kv_size() const { return kv ? kv->size() : 0; }
};

SnapshotTree::SnapshotTree(int64_t max_bytes, int64_t kv_blocks, int64_t kv_row_bytes)
    : max_bytes_(max_bytes), kv_blocks_(kv_blocks), kv_row_bytes_(kv_row_bytes) {}

SnapshotTree::~SnapshotTree() = default;

std::optional<SnapshotTree::Found> SnapshotTree::find(const std::string& scope, std::span<const int32_t> tokens,
                                                      int64_t limit) {
  const auto root = roots_.find(scope);
  if (root == roots_.end()) return std::nullopt;
  Node* best = nullptr;
  size_t pos = 0;
  for (Node* node = root->second.get();;) {
    if (node->lightning && node->length <= limit) best = node;
    if (pos == tokens.size()) break;
    const auto child = node->children.find(tokens[pos]);
    if (child == node->children.end()) break;
    Node* next = child->second.get();
    const size_t n = next->edge.size();
    if (next->length > limit || n > tokens.size() - pos || !std::equal(next->edge.begin(), next->edge.end(), tokens.begin() + pos))
      break;
    node = next;
    pos += n;
  }
  if (!best) return std::nullopt;
  touch(best);
  return pieces_of(best);
}

std::optional<SnapshotTree::Found> SnapshotTree::insert(const std::string& scope, std::span<const int32_t> tokens,
                                                        const SequenceState& state) {
  const int64_t length = int64_t(tokens.size());
  if (state.length() != length) fail("prefix cache: a state of {} tokens kept as a prefix of {}", state.length(), length);
  std::unique_ptr<Node>& root = roots_[scope];
  if (!root) root = std::make_unique<Node>();
  // Down the tree as far as the tokens match, splitting an edge where they part.
  Node* node = root.get();
  size_t pos = 0;
  int64_t path_bytes = 0;
  while (pos < tokens.size()) {
    const auto child = node->children.find(tokens[pos]);
    if (child == node->children.end()) break;
    Node* next = child->second.get();
    const auto parted = std::mismatch(next->edge.begin(), next->edge.end(), tokens.begin() + pos, tokens.end());
    const size_t common = size_t(parted.first - next->edge.begin());
    if (common < next->edge.size()) next = split(next, common);
    node = next;
    pos += common;
    path_bytes += int64_t(node->kv_size());
  }
  if (pos == tokens.size() && node->lightning) {
    touch(node);
    return pieces_of(node);
  }
  const int64_t lightning = int64_t(state.lightning_bytes()), rows = (length - int64_t(pos)) * kv_row_bytes_;
  if (path_bytes + rows + lightning > max_bytes_) {
    if (node->children.empty() && !node->lightning) prune(node);  // the scope's empty root, if nothing else
    return std::nullopt;
  }
  if (pos < tokens.size()) {
    auto leaf = std::make_unique<Node>();
    leaf->edge.assign(tokens.begin() + pos, tokens.end());
    leaf->length = length;
    leaf->parent = node;
    leaf->kv = copy_kv(state, int64_t(pos), length);
    bytes_ += int64_t(leaf->kv_size());
    Node* made = leaf.get();
    node->children[tokens[pos]] = std::move(leaf);
    node = made;
  }
  auto states = std::make_shared<std::vector<std::byte>>(size_t(lightning));
  state.save_lightning(*states);
  node->lightning = std::move(states);
  bytes_ += lightning;
  ++snapshots_;
  touch(node);
  Found kept = pieces_of(node);
  evict_to_budget();
  return kept;
}

// Cuts `node`'s edge after `at` tokens: a new node takes the first part (and its KV rows) and
// becomes `node`'s parent. Returns the new node.
SnapshotTree::Node* SnapshotTree::split(Node* node, size_t at) {
  Node* parent = node->parent;
  auto middle = std::make_unique<Node>();
  middle->edge.assign(node->edge.begin(), node->edge.begin() + ptrdiff_t(at));
  middle->length = node->length - int64_t(node->edge.size() - at);
  middle->parent = parent;
  // Each block of the KV range splits at the same row.
  const int64_t total = int64_t(node->edge.size()), row = kv_blocks_ > 0 ? kv_row_bytes_ / kv_blocks_ : 0;
  auto first = std::make_shared<std::vector<std::byte>>(size_t(int64_t(at) * kv_row_bytes_));
  auto rest = std::make_shared<std::vector<std::byte>>(size_t((total - int64_t(at)) * kv_row_bytes_));
  for (int64_t block = 0; block < kv_blocks_ && row > 0; ++block) {
    const std::byte* from = node->kv->data() + block * total * row;
    std::memcpy(first->data() + block * int64_t(at) * row, from, size_t(int64_t(at) * row));
    std::memcpy(rest->data() + block * (total - int64_t(at)) * row, from + int64_t(at) * row,
                size_t((total - int64_t(at)) * row));
  }
  middle->kv = std::move(first);
  node->kv = std::move(rest);
  const int32_t key = node->edge.front();
  node->edge.erase(node->edge.begin(), node->edge.begin() + ptrdiff_t(at));
  std::unique_ptr<Node>& slot = parent->children[key];
  Node* made = middle.get();
  node->parent = made;
  made->children[node->edge.front()] = std::move(slot);
  slot = std::move(middle);
  return made;
}

SnapshotTree::Found SnapshotTree::pieces_of(Node* node) const {
  Found f;
  f.tokens = node->length;
  f.held.push_back(node->lightning);
  f.pieces.lightning = *node->lightning;
  std::vector<Node*> path;
  for (Node* n = node; n->parent; n = n->parent) path.push_back(n);
  for (auto it = path.rbegin(); it != path.rend(); ++it) {
    f.held.push_back((*it)->kv);
    f.pieces.kv.push_back({*(*it)->kv, int64_t((*it)->edge.size())});
  }
  return f;
}

void SnapshotTree::touch(Node* node) { node->used = ++clock_; }

// Drops the least recently used snapshots until the budget holds.
void SnapshotTree::evict_to_budget() {
  while (bytes_ > max_bytes_) {
    Node* victim = nullptr;
    std::vector<Node*> stack;
    for (auto& [scope, root] : roots_) stack.push_back(root.get());
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      if (n->lightning && (!victim || n->used < victim->used)) victim = n;
      for (auto& [token, child] : n->children) stack.push_back(child.get());
    }
    if (!victim) return;
    bytes_ -= int64_t(victim->lightning->size());
    victim->lightning.reset();
    --snapshots_;
    ++evictions_;
    prune(victim);
  }
}

// Removes `node` and then its ancestors while they hold no snapshot and lead to none; a scope
// whose tree is empty goes too.
void SnapshotTree::prune(Node* node) {
  while (node->parent && !node->lightning && node->children.empty()) {
    Node* parent = node->parent;
    bytes_ -= int64_t(node->kv_size());
    parent->children.erase(node->edge.front());
    node = parent;
  }
  std::erase_if(roots_, [](const auto& root) { return root.second->children.empty(); });
}

SnapshotTree::Bytes SnapshotTree::copy_kv(const SequenceState& state, int64_t begin, int64_t end) {
  auto rows = std::make_shared<std::vector<std::byte>>(state.kv_bytes(end - begin));
  state.save_kv(begin, end, *rows);
  return rows;
}

}  // namespace m1
