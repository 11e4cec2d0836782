#pragma once
// A process-wide count of shared device memory that moved: activation buffers freed, scratch
// reallocated to grow. A recorded CUDA graph holds raw device addresses, so it may be replayed only
// while the count is what it was when the graph was recorded. (Sequence states are named by
// CudaState::layout() instead, so that one sequence ending does not retire every recording.)

#include <atomic>
#include <cstdint>

namespace m1::cuda {

inline std::atomic<uint64_t>& memory_epoch_counter() {
  static std::atomic<uint64_t> counter{0};
  return counter;
}

inline uint64_t memory_epoch() { return memory_epoch_counter().load(std::memory_order_relaxed); }

// Called wherever device memory a kernel may have been given is freed or replaced.
inline void memory_moved() { memory_epoch_counter().fetch_add(1, std::memory_order_relaxed); }

}  // namespace m1::cuda
