#pragma once
// Quantized weights: their layout, and the plain quantizer and dequantizer every kernel is
// checked against (the oracle).
//
// Layout of a quantized [rows, cols] weight (Weight with dtype kQ8 or kQ4). It is byte for byte the
// compressed-tensors "pack-quantized" layout (weight_packed, weight_scale), so such checkpoints
// are used in place, and what m1 quantizes at load is what m1-quantize writes.
//
//   Codes. Symmetric integers, no zero point: q in [-128, 127] (kQ8) or [-8, 7] (kQ4). They are
//   stored offset-binary, unsigned: u = q + 128 (kQ8) or u = q + 8 (kQ4).
//   Packing. Each row is packed, low bits first, into little-endian 32-bit words: word w of a kQ8
//   row holds elements 4w..4w+3, element 4w+i in bits [8i, 8i+8); word w of a kQ4 row holds
//   elements 8w..8w+7, element 8w+i in bits [4i, 4i+4). Read as bytes: kQ8 element c is byte c of
//   its row; kQ4 element c is in byte c/2, in the low nibble (bits 0-3) when c is even and the high
//   nibble (bits 4-7) when c is odd. So byte 0x9F of a kQ4 row holds element 0 = 0xF - 8 = 7 and
//   element 1 = 0x9 - 8 = 1.
//   Rows. Each row starts on a word: the row stride is row_bytes(dtype, cols) = 4 * ceil(cols / 4)
//   bytes (kQ8) or 4 * ceil(cols / 8) bytes (kQ4). Elements past `cols` in a row's last word are
//   padding, stored as u = 0, and never read as values.
//   Scales. A row-major [rows, groups] array of scale_dtype (kBF16 when m1 quantizes; kF16 and
//   kF32 are read from checkpoints), groups = ceil(cols / group_size): scale (r, g) covers inputs
//   [g * group_size, min(cols, (g + 1) * group_size)) of row r, the last group possibly shorter.
//   group_size is a multiple of 32, or equals cols: one scale per output row (int8's default).
//   Value. element (r, c) = float(q) * float(scale(r, c / group_size)), an fp32 product (exact for
//   bf16 and f16 scales).
//
// m1's quantizer: int8 with one scale per row, int4 with one scale per group of 32 inputs (64, 128,
// ... accepted). For each group it tries a few scales s near max|v| / qmax (each rounded to bf16;
// codes round(v * (1 / s)) to nearest even, clamped) and keeps the one with the least squared error.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "m1/backend.h"

namespace m1 {

struct QuantScheme {
  DType type = DType::kQ4;  // kQ8 or kQ4
  int64_t group_size = 32;  // inputs per scale; 0: one scale per output row
};

// "int8" (one scale per row) or "int4" (group_size inputs per scale); throws m1::Error naming
// `option` for any other type or a group size m1 does not implement (not a positive multiple of 32,
// or given for int8).
QuantScheme parse_quant_scheme(const std::string& type, int64_t group_size, const std::string& option);
// The largest and smallest code of a quantized type.
constexpr int quant_max(DType t) { return t == DType::kQ8 ? 127 : 7; }
constexpr int quant_min(DType t) { return t == DType::kQ8 ? -128 : -8; }
// Checks a quantized Weight's type, group size and scale dtype against what the layout allows;
// throws m1::Error starting with `what` otherwise.
void check_quantized_layout(const Weight& w, const std::string& what);

// Code of element `col` of a packed row (see the layout above).
inline int packed_code(const void* row, DType t, int64_t col) {
  const auto* bytes = static_cast<const uint8_t*>(row);
  if (t == DType::kQ8) return int(bytes[col]) - 128;
  const uint8_t b = bytes[col / 2];
  return int(col % 2 ? b >> 4 : b & 15) - 8;
}
inline void set_packed_code(void* row, DType t, int64_t col, int q) {
  auto* bytes = static_cast<uint8_t*>(row);
  if (t == DType::kQ8) {
    bytes[col] = uint8_t(q + 128);
    return;
  }
  uint8_t& b = bytes[col / 2];
  const uint8_t u = uint8_t(q + 8);
  b = col % 2 ? uint8_t((b & 0x0f) | (u << 4)) : uint8_t((b & 0xf0) | u);
}

// Row r of a quantized weight: its packed codes and its scales.
inline const void* packed_row(const Weight& w, int64_t r) {
  return static_cast<const std::byte*>(w.data) + size_t(r) * w.row_bytes();
}
inline float scale_at(const Weight& w, int64_t r, int64_t group) {
  return load_as_f32(w.scales, w.scale_dtype, size_t(r * w.groups() + group));
}

// Element (r, c) of any weight as fp32: the stored value, or code * scale.
float weight_value(const Weight& w, int64_t r, int64_t c);
// Row r of any weight as fp32 (cols values).
void dequantize_row(const Weight& w, int64_t r, float* out);

// A quantized weight that owns its packed codes and bf16 scales (64-byte aligned).
class QuantizedWeight {
 public:
  QuantizedWeight() = default;
  // Zeroed codes (u = 0) and scales for a [rows, cols] weight of `scheme`.
  QuantizedWeight(const QuantScheme& scheme, int64_t rows, int64_t cols);

  const Weight& weight() const { return weight_; }
  std::span<std::byte> data() { return {data_.get(), weight_.data_bytes()}; }
  std::span<std::byte> scales() { return {scales_.get(), weight_.scale_bytes()}; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  struct Free {
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte[], Free> data_, scales_;
  Weight weight_;
};

// Quantizes a float weight (F32, F16 or BF16, any layout Weight describes) with `scheme`, rows split
// over `threads` threads (the result does not depend on them). Throws m1::Error naming `name` if a
// value is not finite.
QuantizedWeight quantize(const Weight& source, const QuantScheme& scheme, const std::string& name, int threads = 1);

}  // namespace m1
