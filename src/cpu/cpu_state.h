#pragma once
// A sequence's state in host memory: fp32 lightning states and an fp32 KV cache that grows
// geometrically as tokens arrive.

#include <vector>

#include "m1/backend.h"

namespace m1::cpu {

class CpuState final : public SequenceState {
 public:
  explicit CpuState(const StateShape& shape);
  std::unique_ptr<SequenceState> clone() const override;
  size_t bytes() const override;
  DType kv_dtype() const override { return DType::kF32; }

  // heads x d x d floats of lightning layer `layer` (counted among lightning layers).
  float* lightning(int64_t layer) { return lightning_[size_t(layer)].data(); }
  // Rows of kv_heads * d floats, one per token, of softmax layer `layer`.
  float* keys(int64_t layer) { return caches_[size_t(layer)].keys.data(); }
  float* values(int64_t layer) { return caches_[size_t(layer)].values.data(); }
  // Makes room in every KV cache for `tokens` tokens in all.
  void reserve(int64_t tokens);

 protected:
  void read_lightning(std::byte* out) const override;
  void read_kv(int64_t begin, int64_t end, std::byte* out) const override;
  void write_kv(const std::byte* rows, int64_t tokens) override;
  void write_lightning(const std::byte* in) override;

 private:
  struct KvCache {
    std::vector<float> keys, values;
  };
  std::vector<std::vector<float>> lightning_;
  std::vector<KvCache> caches_;
  int64_t capacity_ = 0;
};

}  // namespace m1::cpu
