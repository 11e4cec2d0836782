#pragma once
// A sequence's state in host memory: fp32 lightning states and a KV cache that grows
// geometrically as tokens arrive, in fp32, or in bf16 where fast precision rounds attention's
// operands anyway (half the memory, and half the bytes attention reads at depth). The cache is
// head-major: each key/value head's rows lie together, so that attention, a task per head,
// reads its head's keys and values as two contiguous streams.

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
  // Rows of head_dim values of kv_dtype(), one per token and each right after the one before, of
  // key/value head `kv_head` of softmax layer `layer`.
  const std::byte* keys(int64_t layer, int64_t kv_head) const { return caches_[size_t(layer)].keys.data() + head_offset(kv_head); }
  const std::byte* values(int64_t layer, int64_t kv_head) const {
    return caches_[size_t(layer)].values.data() + head_offset(kv_head);
  }
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
  // Bytes of one token's keys (or values) of one head, of all heads (a row of the portable form),
  // and where a head's rows begin.
  size_t head_row_bytes() const { return m1::row_bytes(kv_dtype_, shape_.head_dim); }
  size_t token_bytes() const { return size_t(shape_.kv_heads) * head_row_bytes(); }
  size_t head_offset(int64_t kv_head) const { return size_t(kv_head) * size_t(capacity_) * head_row_bytes(); }
  // Makes room in every KV cache for `tokens` tokens in all, moving each head's rows to where a
  // head of the new capacity begins.
  void reserve(int64_t tokens);
  // Copies tokens [begin, end) of one layer's keys or values between the cache's head-major rows
  // and the portable form's token-major ones (kv_heads * d values a token).
  void gather_rows(const AlignedVector<std::byte>& part, int64_t begin, int64_t end, std::byte* out) const;
  void scatter_rows(const std::byte* rows, int64_t pos, int64_t tokens, AlignedVector<std::byte>& part);

  DType kv_dtype_;
  std::vector<std::vector<float>> lightning_;
  std::vector<KvCache> caches_;
  int64_t capacity_ = 0;
};

}  // namespace m1::cpu
