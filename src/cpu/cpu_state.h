#pragma once
// A sequence's state in host memory: fp32 lightning states and a KV cache that grows
// geometrically as tokens arrive, in fp32, or in bf16 where fast precision rounds attention's
// operands anyway (half the memory, and half the bytes attention reads at depth).

#include <cstddef>
#include <vector>

#include "cpu/aligned_vector.h"
#include "m1/backend.h"

namespace m1::cpu {

class CpuState final : public SequenceState {
 public:
  // kv_dtype: DType::kF32, or DType::kBF16 (raw bits, each value rounded to nearest even as it
  // is stored).
  CpuState(const StateShape& shape, DType kv_dtype);
  std::unique_ptr<SequenceState> clone() const override;
  size_t bytes() const override;
  DType kv_dtype() const override { return kv_dtype_; }

  // heads x d x d floats of lightning layer `layer` (counted among lightning layers).
  float* lightning(int64_t layer) { return lightning_[size_t(layer)].data(); }
  // Rows of kv_heads * d values of kv_dtype(), one per token, of softmax layer `layer`.
  const std::byte* keys(int64_t layer) const { return caches_[size_t(layer)].keys.data(); }
  const std::byte* values(int64_t layer) const { return caches_[size_t(layer)].values.data(); }
  // Stores `rows` tokens' keys and values (fp32 rows of kv_heads * d, strides in floats) at
  // positions [pos, pos + rows) of softmax layer `layer`, making room for them first.
  void store_kv(int64_t layer, int64_t pos, const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                int64_t rows);

 protected:
  void read_lightning(std::byte* out) const override;
  void read_kv(int64_t begin, int64_t end, std::byte* out) const override;
  void write_kv(const std::byte* rows, int64_t tokens) override;
  void write_lightning(const std::byte* in) override;

 private:
  struct KvCache {
    AlignedVector<std::byte> keys, values;
  };
  // Bytes of one cache row (one token of one layer's keys or values).
  size_t row_bytes() const { return m1::row_bytes(kv_dtype_, shape_.kv_heads * shape_.head_dim); }
  // Makes room in every KV cache for `tokens` tokens in all.
  void reserve(int64_t tokens);

  DType kv_dtype_;
  std::vector<std::vector<float>> lightning_;
  std::vector<KvCache> caches_;
  int64_t capacity_ = 0;
};

}  // namespace m1::cpu
