#pragma once
// A sequence's state in device memory: fp32 lightning states (one allocation for all layers,
// zeroed) and a bf16 KV cache for the softmax layers (one allocation, keys and values per layer)
// that grows geometrically as tokens arrive. Memory is stream-ordered on the owning backend's
// stream, so growing, copying and freeing never wait for the GPU; the state must not outlive
// that backend. The portable form (SequenceState::save_kv ...) is copied to and from host memory
// on the same stream, which is synchronised before the copies return.

#include <cstdint>

#include <cuda_runtime.h>

#include "m1/backend.h"

namespace m1::cuda {

class CudaState final : public SequenceState {
 public:
  // On GPU `device` (made current for the calls that need it), in `stream`'s order.
  CudaState(const StateShape& shape, int device, cudaStream_t stream);
  ~CudaState() override;

  std::unique_ptr<SequenceState> clone() const override;
  size_t bytes() const override;
  DType kv_dtype() const override { return DType::kBF16; }

  // heads x d x d floats of lightning layer `layer` (counted among lightning layers): 16-byte
  // aligned when d is a multiple of 4, as the decode kernel requires (the allocation is 256-byte
  // aligned and each layer takes a multiple of 16 bytes).
  float* lightning(int64_t layer) const { return lightning_ + layer * lightning_layer_floats(); }
  // Rows of kv_heads * d bf16 values (raw bits), one per token, of softmax layer `layer`.
  uint16_t* keys(int64_t layer) const { return kv_ + 2 * layer * capacity_ * kv_row(); }
  uint16_t* values(int64_t layer) const { return kv_ + (2 * layer + 1) * capacity_ * kv_row(); }
  // Makes room in every KV cache for `tokens` tokens in all, keeping the first length() rows.
  void reserve(int64_t tokens);
  // Tokens the KV caches have room for.
  int64_t capacity() const { return capacity_; }
  // Names this state's device memory as it is now: unique in the process, and new whenever the
  // caches move. A recorded CUDA graph that used the state is valid while this is unchanged.
  uint64_t layout() const { return layout_; }

 protected:
  void read_lightning(std::byte* out) const override;
  void read_kv(int64_t begin, int64_t end, std::byte* out) const override;
  void write_kv(const std::byte* rows, int64_t tokens) override;
  void write_lightning(const std::byte* in) override;

 private:
  int64_t lightning_layer_floats() const { return shape_.heads * shape_.head_dim * shape_.head_dim; }
  int64_t kv_row() const { return shape_.kv_heads * shape_.head_dim; }
  // Moves the caches to a new allocation of `capacity` rows, holding the first `rows` rows of
  // `from` (laid out for `from_capacity` rows).
  void adopt_caches(const uint16_t* from, int64_t from_capacity, int64_t rows, int64_t capacity);

  int device_;
  cudaStream_t stream_;
  float* lightning_ = nullptr;
  uint16_t* kv_ = nullptr;
  int64_t capacity_ = 0;
  uint64_t layout_;
};

}  // namespace m1::cuda
