#include "read_bandwidth.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <span>
#include <thread>
#include <vector>

#include "bench_measure.h"
#include "cpu/weight_arena.h"

namespace m1::bench {
namespace {

constexpr int kTimedPasses = 3;
// Threads take pieces in turn. The piece size matters: each is a fresh stream for the hardware
// prefetchers, and on a Zen 4 machine of 2 cores 64 KiB pieces read at 37-47 GB/s, 1-4 MiB ones at
// 58-70 GB/s. The limit is the fastest of these sizes.
constexpr size_t kPieces[] = {size_t(64) << 10, size_t(1) << 20, size_t(4) << 20};
constexpr size_t kSample = size_t(2) << 30;  // bytes read: enough to pass every cache

using Region = std::span<const std::byte>;

// Folds every 8-byte word of `region` into one value, so the reads cannot be optimised away;
// compiled for the widest vectors the CPU has, so the fold keeps up with memory.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) uint64_t fold_words(Region region) {
  uint64_t folded = 0;
  const size_t words = region.size() / sizeof(uint64_t);
  const std::byte* data = region.data();
  for (size_t i = 0; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, data + i * sizeof(uint64_t), sizeof w);
    folded ^= w;
  }
  return folded;
}

// Returns the seconds one read of every region took.
double read_once(const std::vector<Region>& pieces, int threads) {
  std::vector<uint64_t> folded(size_t(threads), 0);
  std::atomic<size_t> next{0};
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      uint64_t mine = 0;  // a local: threads writing neighbouring words of `folded` would contend
      for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < pieces.size();) mine ^= fold_words(pieces[i]);
      folded[size_t(t)] = mine;
    });
  for (std::thread& w : workers) w.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile uint64_t sink = 0;  // keeps the folds, and so the reads, alive
  for (uint64_t f : folded) sink = sink ^ f;
  return seconds;
}

}  // namespace

double weight_read_bandwidth(const Checkpoint& checkpoint, int threads) {
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  // The weights' bytes (up to kSample of them) copied into memory like the CPU backend's own:
  // anonymous, in huge pages. A mapped file's 4 KiB pages read slower, and are not what decode reads.
  cpu::WeightArena arena;
  std::vector<Region> copies;
  size_t bytes = 0;
  for (const auto& [name, tensor] : checkpoint.tensors()) {
    if (bytes == kSample) break;
    const size_t n = std::min(tensor.nbytes, kSample - bytes);
    if (n == 0) continue;
    copies.emplace_back(static_cast<const std::byte*>(arena.copy(tensor.data, n)), n);
    bytes += n;
  }
  double best = 0;
  for (const size_t piece : kPieces) {
    std::vector<Region> pieces;
    for (const Region& copy : copies)
      for (size_t offset = 0; offset < copy.size(); offset += piece) pieces.push_back(copy.subspan(offset, std::min(piece, copy.size() - offset)));
    std::vector<double> seconds;
    for (int pass = 0; pass < kTimedPasses; ++pass) seconds.push_back(read_once(pieces, threads));
    best = std::max(best, double(bytes) / median(std::move(seconds)));
  }
  return best;
}

}  // namespace m1::bench
