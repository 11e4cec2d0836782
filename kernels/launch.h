#pragma once
// Small helpers the kernel launchers share: grid sizes and 16-byte alignment checks for vector
// loads. (A device's limits and its kernels' shared-memory opt-ins are the Device's: device.h.)

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_check.h"
#include "device.h"

namespace m1::cuda {

// a / b rounded up, for positive b; usable in device code and constant expressions.
__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether p may be read or written as 16-byte vectors.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks of `threads` for a grid-stride loop over `items`: at least one, at most 2^20.
inline int grid_for(int64_t items, int threads) {
  return int(std::clamp<int64_t>(ceil_div(items, threads), 1, 1 << 20));
}

}  // namespace m1::cuda
