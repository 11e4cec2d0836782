#include "read_bandwidth.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <span>
#include <thread>
#include <vector>

#include "bench_measure.h"

namespace m1::bench {
namespace {

constexpr int kTimedPasses = 3;
// Threads take 64 KiB pieces in turn, as the decode kernels take blocks of weight rows: static
// halves of every tensor leave one thread idle on the many small ones and read slower.
constexpr size_t kPiece = size_t(64) << 10;

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
  std::vector<Region> pieces;
  size_t bytes = 0;
  for (const auto& [name, tensor] : checkpoint.tensors()) {
    for (size_t offset = 0; offset < tensor.nbytes; offset += kPiece)
      pieces.emplace_back(tensor.data + offset, std::min(kPiece, tensor.nbytes - offset));
    bytes += tensor.nbytes;
  }
  read_once(pieces, threads);
  std::vector<double> seconds;
  for (int pass = 0; pass < kTimedPasses; ++pass) seconds.push_back(read_once(pieces, threads));
  return double(bytes) / median(std::move(seconds));
}

}  // namespace m1::bench
