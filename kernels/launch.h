#pragma once
// Small helpers the kernel launchers share: grid sizes, 16-byte alignment checks for vector
// loads, and the opt-in to more than the default 48 KB of dynamic shared memory.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_check.h"

namespace m1::cuda {

// a / b rounded up, for positive b; usable in device code and constant expressions.
__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether p may be read or written as 16-byte vectors.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks of `threads` for a grid-stride loop over `items`: at least one, at most 2^20.
inline int grid_for(int64_t items, int threads) {
  return int(std::clamp<int64_t>(ceil_div(items, threads), 1, 1 << 20));
}

struct DeviceLimits {
  int sms = 0;               // streaming multiprocessors
  int shared_per_block = 0;  // bytes of shared memory a block may opt into
};

// The current device's limits, queried once per process (launchers size grids with them).
inline const DeviceLimits& device_limits() {
  static const DeviceLimits limits = [] {
    int device = 0;
    DeviceLimits l;
    M1_CUDA_CHECK(cudaGetDevice(&device));
    M1_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device));
    M1_CUDA_CHECK(cudaDeviceGetAttribute(&l.shared_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return l;
  }();
  return limits;
}

// Raises `Kernel`'s dynamic shared-memory limit on the current device to at least `bytes`. The
// attribute call is not free, so it is made only when a launch needs more than the kernel was
// last allowed (every kernel starts at the default 48 KB).
template <auto Kernel>
void allow_shared_memory(size_t bytes) {
  static std::atomic<size_t> allowed{48 * 1024};
  if (bytes <= allowed.load(std::memory_order_relaxed)) return;
  M1_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  allowed.store(bytes, std::memory_order_relaxed);
}

}  // namespace m1::cuda
