#include "cpu/cpu_state.h"

#include <algorithm>
#include <cstring>

namespace m1::cpu {

CpuState::CpuState(const StateShape& shape) : SequenceState(shape) {
  const size_t per_layer = size_t(shape.heads * shape.head_dim * shape.head_dim);
  lightning_.assign(size_t(shape.lightning_layers), std::vector<float>(per_layer, 0.0f));
  caches_.resize(size_t(shape.softmax_layers));
}

std::unique_ptr<SequenceState> CpuState::clone() const {
  auto copy = std::make_unique<CpuState>(shape_);
  copy->lightning_ = lightning_;
  copy->caches_ = caches_;
  copy->capacity_ = capacity_;
  copy->length_ = length_;
  return copy;
}

size_t CpuState::bytes() const {
  size_t lightning = size_t(shape_.lightning_layers * shape_.heads * shape_.head_dim * shape_.head_dim);
  size_t kv = size_t(shape_.softmax_layers * 2 * shape_.kv_heads * shape_.head_dim * length_);
  return (lightning + kv) * sizeof(float);
}

void CpuState::reserve(int64_t tokens) {
  if (tokens <= capacity_) return;
  capacity_ = std::max(tokens, std::max<int64_t>(2 * capacity_, 256));
  const size_t floats = size_t(capacity_ * shape_.kv_heads * shape_.head_dim);
  for (KvCache& c : caches_) {
    c.keys.resize(floats);
    c.values.resize(floats);
  }
}

// The portable form: lightning layers in order, then per softmax layer the keys of the rows and
// their values (SequenceState::save_kv).
void CpuState::read_lightning(std::byte* out) const {
  for (const auto& layer : lightning_) {
    std::memcpy(out, layer.data(), layer.size() * sizeof(float));
    out += layer.size() * sizeof(float);
  }
}

void CpuState::read_kv(int64_t begin, int64_t end, std::byte* out) const {
  const size_t row = size_t(shape_.kv_heads * shape_.head_dim), bytes = size_t(end - begin) * row * sizeof(float);
  for (const KvCache& c : caches_)
    for (const std::vector<float>* part : {&c.keys, &c.values}) {
      std::memcpy(out, part->data() + size_t(begin) * row, bytes);
      out += bytes;
    }
}

void CpuState::write_kv(const std::byte* rows, int64_t tokens) {
  reserve(length_ + tokens);
  const size_t row = size_t(shape_.kv_heads * shape_.head_dim), bytes = size_t(tokens) * row * sizeof(float);
  for (KvCache& c : caches_)
    for (std::vector<float>* part : {&c.keys, &c.values}) {
      std::memcpy(part->data() + size_t(length_) * row, rows, bytes);
      rows += bytes;
    }
}

void CpuState::write_lightning(const std::byte* in) {
  for (auto& layer : lightning_) {
    std::memcpy(layer.data(), in, layer.size() * sizeof(float));
    in += layer.size() * sizeof(float);
  }
}

}  // namespace m1::cpu
