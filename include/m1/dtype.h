#pragma once
// Element types of checkpoint tensors and the conversions between them.

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace m1 {

// Float types are stored element by element. kQ8 and kQ4 are the integer codes of a quantized
// matrix (symmetric, scaled per group of inputs; their packed layout is described in
// m1/quantize.h): kQ4 packs two codes in a byte, so it has no whole-byte element size. kI32 and
// kI64 are plain integers (the packed words and shapes of compressed-tensors checkpoints).
enum class DType { kF32, kF16, kBF16, kQ8, kQ4, kI32, kI64 };

constexpr int dtype_bits(DType t) {
  switch (t) {
    case DType::kF32: return 32;
    case DType::kF16: return 16;
    case DType::kBF16: return 16;
    case DType::kQ8: return 8;
    case DType::kQ4: return 4;
    case DType::kI32: return 32;
    case DType::kI64: return 64;
  }
  return 0;
}

constexpr bool is_float(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }
constexpr bool is_quantized(DType t) { return t == DType::kQ8 || t == DType::kQ4; }

// Bytes from one row of a [rows, cols] matrix to the next. Quantized rows are packed into whole
// little-endian 32-bit words (m1/quantize.h); other types are `cols` elements back to back.
constexpr size_t row_bytes(DType t, int64_t cols) {
  const size_t bits = size_t(cols) * size_t(dtype_bits(t));
  return is_quantized(t) ? (bits + 31) / 32 * 4 : bits / 8;
}

// Bytes of a [rows, cols] matrix (a vector or scalar: rows = 1).
constexpr size_t matrix_bytes(DType t, int64_t rows, int64_t cols) { return size_t(rows) * row_bytes(t, cols); }

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kQ8: return "int8";
    case DType::kQ4: return "int4";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
  }
  return "?";
}

// Safetensors spelling ("F32", "F16", "BF16", "I32", "I64"); other safetensors types are nothing
// m1 reads. (kQ8 and kQ4 have no safetensors type: compressed-tensors stores them as I32 words.)
inline std::optional<DType> dtype_from_name(std::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  if (name == "I32") return DType::kI32;
  if (name == "I64") return DType::kI64;
  return std::nullopt;
}

// Command-line spelling ("bf16", "f16", "f32").
inline std::optional<DType> dtype_from_option(std::string_view name) {
  if (name == "bf16") return DType::kBF16;
  if (name == "f16") return DType::kF16;
  if (name == "f32") return DType::kF32;
  return std::nullopt;
}

inline float bf16_to_f32(uint16_t v) { return std::bit_cast<float>(uint32_t(v) << 16); }

// Round to nearest even, NaN kept quiet.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: value = mantissa * 2^-24
    float magnitude = std::ldexp(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// Round to nearest even, with overflow to infinity and gradual underflow.
inline uint16_t f32_to_f16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000);
  float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00);
  if (a < 6.103515625e-05f) {  // subnormal half: multiples of 2^-24
    return uint16_t(sign | uint16_t(std::nearbyint(std::ldexp(a, 24))));
  }
  uint32_t bits = std::bit_cast<uint32_t>(a);
  uint32_t rounded = bits + 0xfff + ((bits >> 13) & 1);
  return uint16_t(sign | ((rounded >> 13) - (112u << 10)));
}

// Element i of float data (F32, F16 or BF16); NaN for any other type.
inline float load_as_f32(const void* data, DType t, size_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(data)[i];
    case DType::kF16: return f16_to_f32(static_cast<const uint16_t*>(data)[i]);
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(data)[i]);
    default: return NAN;
  }
}

}  // namespace m1
