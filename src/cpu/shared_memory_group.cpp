#include "cpu/shared_memory_group.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "m1/error.h"

namespace m1::cpu {
namespace {

// Polls before sleeping: the ranks of a step arrive within microseconds of each other.
constexpr int kSpins = 2000;
// Elements per task of the pool when summing or copying.
constexpr int64_t kBlock = 16384;

// [begin, end) of rank r's share of `count` elements.
std::pair<int64_t, int64_t> share(int64_t count, int world, int r) {
  return {count * r / world, count * (r + 1) / world};
}

}  // namespace

SharedMemoryGroup::SharedMemoryGroup(int world)
    : world_(world), published_(size_t(world)), reduced_(size_t(world)) {
  if (world < 1) fail("a group of {} ranks", world);
}

void SharedMemoryGroup::throw_if_aborted() {
  if (!aborted_.load(std::memory_order_acquire)) return;
  std::lock_guard lock(why_mutex_);
  fail("tensor-parallel group stopped: {}", why_);
}

void SharedMemoryGroup::abort(const std::string& why) {
  {
    std::lock_guard lock(why_mutex_);
    if (aborted_.load()) return;
    why_ = why;
  }
  aborted_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
}

void SharedMemoryGroup::barrier() {
  throw_if_aborted();
  const uint64_t generation = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == world_) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    generation_.notify_all();
    return;
  }
  for (int i = 0; i < kSpins && generation_.load(std::memory_order_acquire) == generation; ++i) _mm_pause();
  while (generation_.load(std::memory_order_acquire) == generation) generation_.wait(generation, std::memory_order_acquire);
  throw_if_aborted();
}

void SharedMemoryGroup::all_reduce_sum(int rank, float* data, int64_t count, ThreadPool& pool) {
  if (world_ == 1) return;
  published_[size_t(rank)] = data;
  barrier();
  // Every rank sums its share of the elements over all ranks, in rank order...
  // (Named copies: clang's OpenMP mode refuses lambdas that capture structured bindings.)
  const auto shared = share(count, world_, rank);
  const int64_t begin = shared.first, end = shared.second;
  std::vector<float>& mine = reduced_[size_t(rank)];
  mine.resize(size_t(end - begin));  // no peer reads it before the next barrier
  pool.parallel_for((end - begin + kBlock - 1) / kBlock, [&](int64_t task) {
    const int64_t first = begin + task * kBlock, n = std::min(end, first + kBlock) - first;
    float* out = mine.data() + (first - begin);
    std::copy_n(published_[0] + first, n, out);
    for (int r = 1; r < world_; ++r) {
      const float* from = published_[size_t(r)] + first;
      for (int64_t i = 0; i < n; ++i) out[i] += from[i];
    }
  });
  barrier();
  // ...then copies every rank's sums into its own data. The next call's first barrier keeps the
  // sums from changing before every rank has copied them.
  pool.parallel_for(world_, [&](int64_t r) {
    const auto [first, last] = share(count, world_, int(r));
    if (last > first) std::memcpy(data + first, reduced_[size_t(r)].data(), size_t(last - first) * sizeof(float));
  });
}

void SharedMemoryGroup::gather_columns(int rank, const float* part, int64_t rows, std::span<const int64_t> widths,
                                       float* out) {
  if (int64_t(widths.size()) != world_) fail("gather_columns: {} widths for {} ranks", widths.size(), world_);
  published_[size_t(rank)] = part;
  barrier();
  if (rank == 0) {
    int64_t total = 0;
    for (int64_t w : widths) total += w;
    int64_t column = 0;
    for (int r = 0; r < world_; ++r) {
      const int64_t width = widths[size_t(r)];
      for (int64_t row = 0; row < rows; ++row)
        std::memcpy(out + row * total + column, published_[size_t(r)] + row * width, size_t(width) * sizeof(float));
      column += width;
    }
  }
  barrier();  // the parts stay untouched until rank 0 has copied them
}

}  // namespace m1::cpu
