#pragma once
// Device memory owned by a host object: the tests' and benchmarks' buffers (the backend itself
// allocates stream-ordered).

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "cuda_check.h"

namespace m1::cuda {

// `count` values of T in device memory, freed on destruction. Copies are blocking cudaMemcpy calls,
// so they order after the kernels launched before them on the legacy default stream.
template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t count) : size_(count) {
    M1_CUDA_CHECK(cudaMalloc(&data_, std::max<size_t>(count, 1) * sizeof(T)));  // a valid pointer even when empty
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  DeviceArray(DeviceArray&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray& operator=(DeviceArray&&) = delete;
  ~DeviceArray() { cudaFree(data_); }

  T* get() const { return data_; }
  size_t size() const { return size_; }
  void upload(const std::vector<T>& host) {
    if (host.size() != size_) throw std::length_error("DeviceArray::upload: host size differs");
    M1_CUDA_CHECK(cudaMemcpy(data_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(size_);
    M1_CUDA_CHECK(cudaMemcpy(host.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* data_ = nullptr;
  size_t size_;
};

}  // namespace m1::cuda
