#pragma once
// CUDA tests run on a machine with a GPU and skip, saying why, everywhere else. Their device
// memory lives in DeviceArray.

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "cuda_check.h"

namespace m1::test {

// Empty when a CUDA device is usable, else the reason it is not.
inline std::string cuda_unavailable_reason() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device";
  return {};
}

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

}  // namespace m1::test

#define M1_REQUIRE_CUDA()                                                     \
  do {                                                                        \
    if (std::string why = ::m1::test::cuda_unavailable_reason(); !why.empty()) \
      GTEST_SKIP() << why;                                                    \
  } while (0)
