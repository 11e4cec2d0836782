#include "cuda_state.h"

#include <algorithm>
#include <atomic>

#include "cuda_check.h"
#include "device.h"

namespace m1::cuda {
namespace {

uint64_t next_layout() {
  static std::atomic<uint64_t> counter{0};
  return counter.fetch_add(1, std::memory_order_relaxed) + 1;
}

}  // namespace

CudaState::CudaState(const StateShape& shape, int device, cudaStream_t stream)
    : SequenceState(shape), device_(device), stream_(stream), layout_(next_layout()) {
  const DeviceGuard current(device_);
  const size_t bytes = lightning_bytes();
  if (bytes == 0) return;
  M1_CUDA_CHECK(cudaMallocAsync(&lightning_, bytes, stream_));
  M1_CUDA_CHECK(cudaMemsetAsync(lightning_, 0, bytes, stream_));
}

CudaState::~CudaState() {
  // Errors are ignored: a destructor cannot report them, and the memory is gone either way.
  const DeviceGuard current(device_);
  if (lightning_) cudaFreeAsync(lightning_, stream_);
  if (kv_) cudaFreeAsync(kv_, stream_);
}

std::unique_ptr<SequenceState> CudaState::clone() const {
  const DeviceGuard current(device_);
  auto copy = std::make_unique<CudaState>(shape_, device_, stream_);
  const size_t bytes = lightning_bytes();
  if (bytes) M1_CUDA_CHECK(cudaMemcpyAsync(copy->lightning_, lightning_, bytes, cudaMemcpyDeviceToDevice, stream_));
  // The original's room, so the fork's next token does not move its caches straight away.
  if (kv_) copy->adopt_caches(kv_, capacity_, length_, capacity_);
  copy->length_ = length_;
  return copy;
}

size_t CudaState::bytes() const {
  const size_t kv = size_t(shape_.softmax_layers * 2 * kv_row() * length_) * sizeof(uint16_t);
  return lightning_bytes() + kv;
}

void CudaState::reserve(int64_t tokens) {
  if (tokens <= capacity_ || shape_.softmax_layers * kv_row() == 0) return;
  const DeviceGuard current(device_);
  adopt_caches(kv_, capacity_, length_, std::max(tokens, std::max<int64_t>(2 * capacity_, 256)));
}

void CudaState::adopt_caches(const uint16_t* from, int64_t from_capacity, int64_t rows, int64_t capacity) {
  const int64_t row = kv_row();
  uint16_t* fresh = nullptr;
  M1_CUDA_CHECK(cudaMallocAsync(&fresh, size_t(2 * shape_.softmax_layers * capacity * row) * sizeof(uint16_t), stream_));
  // Keys and values of every layer are 2 * layers consecutive blocks of `capacity` rows.
  for (int64_t block = 0; rows > 0 && block < 2 * shape_.softmax_layers; ++block) {
    const cudaError_t status = cudaMemcpyAsync(fresh + block * capacity * row, from + block * from_capacity * row,
                                               size_t(rows * row) * sizeof(uint16_t), cudaMemcpyDeviceToDevice, stream_);
    if (status != cudaSuccess) {
      cudaFreeAsync(fresh, stream_);
      check(status, "cudaMemcpyAsync (KV cache)");
    }
  }
  // Stream order: the old caches are released only after the copies and earlier kernels ran.
  if (kv_) M1_CUDA_CHECK(cudaFreeAsync(kv_, stream_));
  kv_ = fresh;
  capacity_ = capacity;
  layout_ = next_layout();
}

void CudaState::read_lightning(std::byte* out) const {
  M1_CUDA_CHECK(cudaMemcpyAsync(out, lightning_, lightning_bytes(), cudaMemcpyDeviceToHost, stream_));
  M1_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// Per softmax layer the keys of rows [begin, end), then their values: each one block of the cache.
void CudaState::read_kv(int64_t begin, int64_t end, std::byte* out) const {
  const size_t bytes = size_t((end - begin) * kv_row()) * sizeof(uint16_t);
  for (int64_t block = 0; block < 2 * shape_.softmax_layers; ++block, out += bytes)
    M1_CUDA_CHECK(cudaMemcpyAsync(out, kv_ + (block * capacity_ + begin) * kv_row(), bytes, cudaMemcpyDeviceToHost, stream_));
  M1_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaState::write_kv(const std::byte* rows, int64_t tokens) {
  reserve(length_ + tokens);
  const size_t bytes = size_t(tokens * kv_row()) * sizeof(uint16_t);
  for (int64_t block = 0; block < 2 * shape_.softmax_layers; ++block, rows += bytes)
    M1_CUDA_CHECK(cudaMemcpyAsync(kv_ + (block * capacity_ + length_) * kv_row(), rows, bytes, cudaMemcpyHostToDevice, stream_));
  M1_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the caller may free `rows` on return
}

void CudaState::write_lightning(const std::byte* in) {
  M1_CUDA_CHECK(cudaMemcpyAsync(lightning_, in, lightning_bytes(), cudaMemcpyHostToDevice, stream_));
  M1_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace m1::cuda
