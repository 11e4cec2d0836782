#include "read_bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <span>
#include <thread>
#include <vector>

#include "bench_measure.h"

namespace m1::bench {
namespace {

constexpr int kTimedPasses = 3;

using Region = std::span<const std::byte>;

// Folds every 8-byte word of `region` into one value, so the reads cannot be optimised away.
uint64_t fold_words(Region region) {
  uint64_t folded = 0;
  const size_t words = region.size() / sizeof(uint64_t);
  for (size_t i = 0; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, region.data() + i * sizeof(uint64_t), sizeof w);
    folded ^= w;
  }
  return folded;
}

// Every thread reads its own contiguous share of each region. Returns the seconds taken.
double read_once(const std::vector<Region>& regions, int threads) {
  std::vector<uint64_t> folded(size_t(threads), 0);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      uint64_t mine = 0;  // a local: threads writing neighbouring words of `folded` would contend
      for (Region r : regions) {
        const size_t begin = r.size() * size_t(t) / size_t(threads), end = r.size() * size_t(t + 1) / size_t(threads);
        mine ^= fold_words(r.subspan(begin, end - begin));
      }
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
  std::vector<Region> regions;
  size_t bytes = 0;
  for (const auto& [name, tensor] : checkpoint.tensors()) {
    regions.emplace_back(tensor.data, tensor.nbytes);
    bytes += tensor.nbytes;
  }
  read_once(regions, threads);
  std::vector<double> seconds;
  for (int pass = 0; pass < kTimedPasses; ++pass) seconds.push_back(read_once(regions, threads));
  return double(bytes) / median(std::move(seconds));
}

}  // namespace m1::bench
