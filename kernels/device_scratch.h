#pragma once
// A device buffer that grows to the largest request and is then reused, for kernels' temporary
// data (split-K partials, gathered rows, bf16 copies of activations), and beside it a second one of
// counters that the kernels using them leave at zero (see counters()). Growing is stream-ordered:
// the old buffer is freed after the kernels queued before, which may still read it, and the host
// never waits for the device (a rank waiting there could hold up a peer's collective that its own
// queued kernels wait for).

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda_check.h"
#include "memory_epoch.h"

namespace m1::cuda {

class DeviceScratch {
 public:
  // `stream`: the stream of the kernels that use the buffer, which its growth is ordered on. No
  // default: a scratch left on the legacy stream beside a non-blocking one would be freed and
  // reallocated out of order with the kernels that read it.
  explicit DeviceScratch(cudaStream_t stream) : stream_(stream) {}
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() {
    cudaFree(data_);
    cudaFree(counters_);
  }

  // At least `bytes` bytes, 256-byte aligned; the contents are not kept across growth.
  void* get(size_t bytes) {
    if (bytes > capacity_) {
      if (data_) M1_CUDA_CHECK(cudaFreeAsync(data_, stream_));
      memory_moved();
      data_ = nullptr;
      capacity_ = 0;
      size_t grown = bytes + bytes / 4;
      M1_CUDA_CHECK(cudaMallocAsync(&data_, grown, stream_));
      capacity_ = grown;
    }
    return data_;
  }
  // At least `count` ints, zero when the stream's kernels reach them, for kernels that count and
  // set their counters back to zero before they end (the skinny products' chunk folds): so the
  // next kernel on the stream, or a graph's next replay, finds them at zero. Kernels on this stream
  // run in order, so one set serves them all. Kept across growth of get()'s buffer.
  int* counters(int64_t count) {
    if (size_t(count) > counter_capacity_) {
      if (counters_) M1_CUDA_CHECK(cudaFreeAsync(counters_, stream_));
      memory_moved();
      counters_ = nullptr;
      counter_capacity_ = 0;
      const size_t grown = std::max<size_t>(size_t(count) + size_t(count) / 4, 256);
      M1_CUDA_CHECK(cudaMallocAsync(&counters_, grown * sizeof(int), stream_));
      M1_CUDA_CHECK(cudaMemsetAsync(counters_, 0, grown * sizeof(int), stream_));
      counter_capacity_ = grown;
    }
    return counters_;
  }
  // Bytes held now: the largest request so far, plus the growth margin.
  size_t capacity() const { return capacity_; }
  template <class T>
  T* get(size_t count) {
    return static_cast<T*>(get(count * sizeof(T)));
  }

 private:
  cudaStream_t stream_;
  void* data_ = nullptr;
  size_t capacity_ = 0;
  int* counters_ = nullptr;
  size_t counter_capacity_ = 0;
};

// Hands out consecutive pieces of one buffer, each starting 256-byte aligned. Without a base it
// only counts the bytes, so the same carving can size the buffer first (see carve_scratch).
class ScratchCarver {
 public:
  explicit ScratchCarver(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  // `count` elements of T; nullptr for none, and nullptr throughout while only counting.
  template <class T>
  T* take(int64_t count) {
    if (count <= 0) return nullptr;
    T* piece = base_ ? reinterpret_cast<T*>(base_ + bytes_) : nullptr;
    bytes_ += (size_t(count) * sizeof(T) + 255) / 256 * 256;
    return piece;
  }
  size_t bytes() const { return bytes_; }

 private:
  char* base_;
  size_t bytes_ = 0;
};

// Runs `carve(ScratchCarver&)` twice, first to count the bytes of its pieces, then on one buffer
// of that size from `scratch`, and returns what the second run returns. One get() for all the
// pieces, since a later get() may move the buffer under the earlier ones.
template <class Carve>
auto carve_scratch(DeviceScratch& scratch, Carve carve) {
  ScratchCarver sizing;
  carve(sizing);
  ScratchCarver carver(scratch.get(sizing.bytes()));
  return carve(carver);
}

}  // namespace m1::cuda
