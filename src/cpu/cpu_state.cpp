#include "cpu/cpu_state.h"

#include <algorithm>
#include <cstring>

#include "m1/error.h"

namespace m1::cpu {

CpuState::CpuState(const StateShape& shape, DType kv_dtype) : SequenceState(shape), kv_dtype_(kv_dtype) {
  if (kv_dtype != DType::kF32 && kv_dtype != DType::kBF16)
    fail("CPU KV cache: dtype {} is not F32 or BF16", dtype_name(kv_dtype));
  const size_t per_layer = size_t(shape.heads * shape.head_dim * shape.head_dim);
  lightning_.assign(size_t(shape.lightning_layers), std::vector<float>(per_layer, 0.0f));
  caches_.resize(size_t(shape.softmax_layers));
}

std::unique_ptr<SequenceState> CpuState::clone() const {
  auto copy = std::make_unique<CpuState>(shape_, kv_dtype_);
  copy->lightning_ = lightning_;
  copy->caches_ = caches_;
  copy->capacity_ = capacity_;
  copy->length_ = length_;
  return copy;
}

size_t CpuState::bytes() const { return lightning_bytes() + kv_bytes(length_); }

void CpuState::reserve(int64_t tokens) {
  if (tokens <= capacity_) return;
  const int64_t old_capacity = capacity_;
  capacity_ = std::max(tokens, std::max<int64_t>(2 * capacity_, 256));
  const size_t head_bytes = head_row_bytes(), old_span = size_t(old_capacity) * head_bytes;
  const size_t bytes = size_t(capacity_) * token_bytes();
  for (KvCache& c : caches_)
    for (AlignedVector<std::byte>* part : {&c.keys, &c.values}) {
      part->resize(bytes);
      // Last head first: each moves to a higher offset than any head before it still occupies.
      for (int64_t h = shape_.kv_heads - 1; h > 0 && old_span > 0; --h)
        std::memmove(part->data() + head_offset(h), part->data() + size_t(h) * old_span, old_span);
    }
}

void CpuState::store_kv(int64_t layer, int64_t pos, const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                        int64_t rows) {
  reserve(pos + rows);
  const int64_t d = shape_.head_dim;
  KvCache& c = caches_[size_t(layer)];
  for (int64_t h = 0; h < shape_.kv_heads; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      const size_t at = head_offset(h) + size_t(pos + i) * head_row_bytes();
      const float* key = k + i * k_stride + h * d;
      const float* value = v + i * v_stride + h * d;
      if (kv_dtype_ == DType::kF32) {
        std::memcpy(c.keys.data() + at, key, size_t(d) * sizeof(float));
        std::memcpy(c.values.data() + at, value, size_t(d) * sizeof(float));
        continue;
      }
      auto* key_out = reinterpret_cast<uint16_t*>(c.keys.data() + at);
      auto* value_out = reinterpret_cast<uint16_t*>(c.values.data() + at);
      for (int64_t j = 0; j < d; ++j) {
        key_out[j] = f32_to_bf16(key[j]);
        value_out[j] = f32_to_bf16(value[j]);
      }
    }
}

// The portable form: lightning layers in order, then per softmax layer the keys of the rows and
// their values (SequenceState::save_kv), each a token's kv_heads * d values in the cache's dtype.
void CpuState::read_lightning(std::byte* out) const {
  for (const auto& layer : lightning_) {
    std::memcpy(out, layer.data(), layer.size() * sizeof(float));
    out += layer.size() * sizeof(float);
  }
}

void CpuState::gather_rows(const AlignedVector<std::byte>& part, int64_t begin, int64_t end, std::byte* out) const {
  const size_t head_bytes = head_row_bytes();
  for (int64_t t = begin; t < end; ++t)
    for (int64_t h = 0; h < shape_.kv_heads; ++h, out += head_bytes)
      std::memcpy(out, part.data() + head_offset(h) + size_t(t) * head_bytes, head_bytes);
}

void CpuState::scatter_rows(const std::byte* rows, int64_t pos, int64_t tokens, AlignedVector<std::byte>& part) {
  const size_t head_bytes = head_row_bytes();
  for (int64_t t = pos; t < pos + tokens; ++t)
    for (int64_t h = 0; h < shape_.kv_heads; ++h, rows += head_bytes)
      std::memcpy(part.data() + head_offset(h) + size_t(t) * head_bytes, rows, head_bytes);
}

void CpuState::read_kv(int64_t begin, int64_t end, std::byte* out) const {
  const size_t bytes = size_t(end - begin) * token_bytes();
  for (const KvCache& c : caches_)
    for (const AlignedVector<std::byte>* part : {&c.keys, &c.values}) {
      gather_rows(*part, begin, end, out);
      out += bytes;
    }
}

void CpuState::write_kv(const std::byte* rows, int64_t tokens) {
  reserve(length_ + tokens);
  const size_t bytes = size_t(tokens) * token_bytes();
  for (KvCache& c : caches_)
    for (AlignedVector<std::byte>* part : {&c.keys, &c.values}) {
      scatter_rows(rows, length_, tokens, *part);
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
