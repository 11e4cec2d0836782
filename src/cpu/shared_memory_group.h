#pragma once
// The collectives of CPU ranks in one process (the threads of a tensor-parallel group): every
// rank's data is read in place by its peers between barriers, so nothing is copied twice. Sums are
// taken in rank order, element by element, so every rank gets the same bits and an element's sum
// depends only on its addends. A failed rank aborts the group: its peers' collectives then throw
// instead of waiting for ever.

#include <atomic>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "cpu/threadpool.h"

namespace m1::cpu {

class SharedMemoryGroup {
 public:
  explicit SharedMemoryGroup(int world);
  SharedMemoryGroup(const SharedMemoryGroup&) = delete;
  SharedMemoryGroup& operator=(const SharedMemoryGroup&) = delete;

  int world() const { return world_; }

  // Each rank calls with its own `count` floats; each rank's data becomes the sum over ranks. The
  // rank's pool shares the work of its part.
  void all_reduce_sum(int rank, float* data, int64_t count, ThreadPool& pool);
  // Rank 0's `out` [rows, sum of widths] gets each rank's `part` [rows, widths[rank]] at the
  // columns after the widths of the ranks before it; other ranks pass out = nullptr.
  void gather_columns(int rank, const float* part, int64_t rows, std::span<const int64_t> widths, float* out);
  // Makes every collective, now waiting or later, throw m1::Error citing `why`.
  void abort(const std::string& why);

 private:
  // Waits until every rank has arrived; throws once the group is aborted.
  void barrier();
  void throw_if_aborted();

  const int world_;
  std::vector<const float*> published_;  // each rank's data, between the barriers of one call
  std::vector<std::vector<float>> reduced_;  // each rank's part of an all-reduce, summed
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> aborted_{false};
  std::mutex why_mutex_;
  std::string why_;
};

}  // namespace m1::cpu
