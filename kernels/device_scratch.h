#pragma once
// A device buffer that grows to the largest request and is then reused, for kernels' temporary
// data (split-K partials, gathered rows, bf16 copies of activations). Growing waits for the
// stream, so memory a queued kernel still reads is never freed under it.

#include <cstddef>

#include <cuda_runtime.h>

#include "cuda_check.h"
#include "memory_epoch.h"

namespace m1::cuda {

class DeviceScratch {
 public:
  explicit DeviceScratch(cudaStream_t stream = nullptr) : stream_(stream) {}
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() { cudaFree(data_); }

  // At least `bytes` bytes, 256-byte aligned; the contents are not kept across growth.
  void* get(size_t bytes) {
    if (bytes > capacity_) {
      M1_CUDA_CHECK(cudaStreamSynchronize(stream_));
      M1_CUDA_CHECK(cudaFree(data_));
      memory_moved();
      data_ = nullptr;
      capacity_ = 0;
      size_t grown = bytes + bytes / 4;
      M1_CUDA_CHECK(cudaMalloc(&data_, grown));
      capacity_ = grown;
    }
    return data_;
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
};

}  // namespace m1::cuda
