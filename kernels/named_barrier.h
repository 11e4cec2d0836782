#pragma once
// Named CTA barriers (bar.sync / bar.arrive with an id and a thread count), for kernels whose
// warps take roles: producers arrive on a barrier without waiting while consumers wait on it, and
// the other way round for a buffer handed back. Id 0 is __syncthreads'; a count is a multiple of
// 32 and every lane of a warp takes part.

namespace m1::cuda {

// Waits until `threads` threads have arrived at barrier `id` or wait on it, this one included.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Counts this thread at barrier `id` (its shared-memory writes so far are visible to the threads
// that wait there) and goes on without waiting.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace m1::cuda
