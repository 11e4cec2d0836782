// The plain quantizer and dequantizer of m1/quantize.h.

#include "m1/quantize.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <thread>
#include <vector>

#include "cpu/vectorize.h"
#include "m1/error.h"

namespace m1 {
namespace {

// Scales tried per group: max|v| / d for each divisor d. Divisors above qmax clip the largest
// values a little to step the rest more finely; for int4 that often wins (a group of 32 has few
// large values), for int8's long rows rarely.
std::span<const float> divisors(DType t) {
  static constexpr float kInt8[] = {127.0f, 127.5f, 128.0f, 124.0f, 120.0f, 114.0f};
  static constexpr float kInt4[] = {7.0f, 7.5f, 8.0f, 8.5f, 9.0f, 9.5f, 10.0f};
  if (t == DType::kQ8) return kInt8;
  return kInt4;
}

// round(v * inverse) clamped to [qmin, qmax], as a float: rounding to nearest even by adding and
// taking away 1.5 * 2^23 (exact for |v * inverse| < 2^22, and anything larger is clamped anyway;
// nearbyint is a library call on baseline x86-64, and this loop runs on every weight of a
// checkpoint several times).
M1_INLINE float code_for(float v, float inverse, float qmin, float qmax) {
  constexpr float kRound = 12582912.0f;
  const float scaled = std::clamp(v * inverse, -4194304.0f, 4194304.0f);
  return std::clamp((scaled + kRound) - kRound, qmin, qmax);
}

// The loops below run on every weight of a checkpoint once per divisor, so they are vectorised
// (one compiled copy per x86-64 level). The codes are the same whatever the vector width; only the
// order in which a group's squared errors are summed (in double) depends on it.

M1_VECTOR_CLONES float absolute_max(const float* v, int64_t n) {
  float m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(v[i]));
  return m;
}

// Sum of (v - code * s)^2 over n values at scale s (code * s is exact in fp32, the difference in
// double).
M1_VECTOR_CLONES double squared_error(const float* v, int64_t n, float s, float inverse, float qmin, float qmax) {
  double error = 0;
#pragma omp simd reduction(+ : error)
  for (int64_t i = 0; i < n; ++i) {
    const double e = double(v[i]) - double(code_for(v[i], inverse, qmin, qmax) * s);
    error += e * e;
  }
  return error;
}

M1_VECTOR_CLONES void write_codes(const float* v, int64_t n, float inverse, float qmin, float qmax, int8_t* codes) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) codes[i] = int8_t(int(code_for(v[i], inverse, qmin, qmax)));
}

M1_VECTOR_CLONES bool all_finite(const float* v, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= int((std::bit_cast<uint32_t>(v[i]) & 0x7f800000u) == 0x7f800000u);
  return bad == 0;
}

// n codes into a packed row (m1/quantize.h's layout): int8 as code + 128, int4 as code + 8, two to
// a byte, the first in the low nibble (an odd row's last high nibble 0).
M1_VECTOR_CLONES void pack_codes(const int8_t* codes, int64_t n, DType t, uint8_t* out) {
  if (t == DType::kQ8) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = uint8_t(codes[i] + 128);
    return;
  }
  const int64_t pairs = n / 2;
#pragma omp simd
  for (int64_t i = 0; i < pairs; ++i) out[i] = uint8_t((codes[2 * i] + 8) | ((codes[2 * i + 1] + 8) << 4));
  if (n % 2) out[pairs] = uint8_t(codes[n - 1] + 8);
}

// Quantizes n values with one scale: returns the scale's bf16 bits and writes the codes.
uint16_t quantize_group(const float* v, int64_t n, DType t, int8_t* codes) {
  const float qmin = float(quant_min(t)), qmax = float(quant_max(t));
  const float absmax = absolute_max(v, n);
  uint16_t best = 0;
  double best_error = INFINITY;
  for (float d : divisors(t)) {
    const uint16_t bits = f32_to_bf16(absmax / d);
    const float s = bf16_to_f32(bits), inverse = 1.0f / s;
    if (!(s > 0) || !std::isfinite(s) || !std::isfinite(inverse)) continue;  // all zeros, or under/overflow
    const double error = squared_error(v, n, s, inverse, qmin, qmax);
    if (error < best_error) best_error = error, best = bits;
  }
  if (best == 0) {
    std::fill(codes, codes + n, int8_t(0));
    return best;
  }
  write_codes(v, n, 1.0f / bf16_to_f32(best), qmin, qmax, codes);
  return best;
}

void quantize_rows(const Weight& source, const std::string& name, int64_t begin, int64_t end, QuantizedWeight& out) {
  const Weight& w = out.weight();
  std::vector<float> row(size_t(w.cols));
  std::vector<int8_t> codes(size_t(w.cols));
  auto* scales = reinterpret_cast<uint16_t*>(out.scales().data());
  for (int64_t r = begin; r < end; ++r) {
    dequantize_row(source, r, row.data());
    if (!all_finite(row.data(), w.cols))
      for (int64_t c = 0; c < w.cols; ++c)
        if (!std::isfinite(row[size_t(c)]))
          fail("{}: cannot quantize: element ({}, {}) is {}", name, r, c, row[size_t(c)]);
    for (int64_t g = 0; g < w.groups(); ++g) {
      const int64_t first = g * w.group_size, count = std::min(w.group_size, w.cols - first);
      scales[r * w.groups() + g] = quantize_group(row.data() + first, count, w.dtype, codes.data() + first);
    }
    pack_codes(codes.data(), w.cols, w.dtype, reinterpret_cast<uint8_t*>(out.data().data() + size_t(r) * w.row_bytes()));
  }
}

}  // namespace

QuantScheme parse_quant_scheme(const std::string& type, int64_t group_size, const std::string& option) {
  if (type == "int8") {
    if (group_size != 0) fail("{}: int8 has one scale per output row; a group size applies to int4 only", option);
    return {DType::kQ8, 0};
  }
  if (type == "int4") {
    if (group_size == 0) return {DType::kQ4, 32};
    if (group_size < 0 || group_size % 32 != 0)
      fail("{}: group size {} is not a positive multiple of 32 (expected 32, 64, 128, ...)", option, group_size);
    return {DType::kQ4, group_size};
  }
  fail("{}: '{}' is not a quantization m1 implements (expected int8 or int4)", option, type);
}

void check_quantized_layout(const Weight& w, const std::string& what) {
  if (!w.quantized()) fail("{}: dtype {} is not a quantized type", what, dtype_name(w.dtype));
  if (!is_float(w.scale_dtype)) fail("{}: scales of dtype {} (expected BF16, F16 or F32)", what, dtype_name(w.scale_dtype));
  if (w.group_size <= 0 || (w.group_size % 32 != 0 && w.group_size < w.cols))
    fail("{}: group size {} is neither a multiple of 32 nor the whole row of {}", what, w.group_size, w.cols);
}

float weight_value(const Weight& w, int64_t r, int64_t c) {
  if (!w.quantized()) return load_as_f32(w.data, w.dtype, size_t(r * w.cols + c));
  return float(packed_code(packed_row(w, r), w.dtype, c)) * scale_at(w, r, c / w.group_size);
}

void dequantize_row(const Weight& w, int64_t r, float* out) {
  if (w.dtype == DType::kBF16) {  // the common source: widened in bulk (exact)
    const auto* row = static_cast<const uint16_t*>(w.data) + r * w.cols;
    for (int64_t c = 0; c < w.cols; ++c) out[c] = bf16_to_f32(row[c]);
    return;
  }
  for (int64_t c = 0; c < w.cols; ++c) out[c] = weight_value(w, r, c);
}

void QuantizedWeight::Free::operator()(std::byte* p) const { std::free(p); }

QuantizedWeight::QuantizedWeight(const QuantScheme& scheme, int64_t rows, int64_t cols) {
  weight_ = Weight{nullptr, scheme.type, rows, cols, nullptr, DType::kBF16, scheme.group_size > 0 ? scheme.group_size : cols};
  check_quantized_layout(weight_, "quantize");
  auto allocate = [](size_t bytes) {
    const size_t rounded = std::max<size_t>((bytes + 63) / 64 * 64, 64);
    auto* p = static_cast<std::byte*>(std::aligned_alloc(64, rounded));
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, rounded);
    return p;
  };
  data_.reset(allocate(weight_.data_bytes()));
  scales_.reset(allocate(weight_.scale_bytes()));
  weight_.data = data_.get();
  weight_.scales = scales_.get();
}

QuantizedWeight quantize(const Weight& source, const QuantScheme& scheme, const std::string& name, int threads) {
  if (!is_float(source.dtype)) fail("{}: cannot quantize a weight of dtype {}", name, dtype_name(source.dtype));
  QuantizedWeight out(scheme, source.rows, source.cols);
  const int64_t parts = std::clamp<int64_t>(threads, 1, std::max<int64_t>(source.rows, 1));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(parts));
  std::vector<std::thread> workers;
  auto part = [&](int64_t p) {
    try {
      quantize_rows(source, name, source.rows * p / parts, source.rows * (p + 1) / parts, out);
    } catch (...) {
      errors[size_t(p)] = std::current_exception();
    }
  };
  for (int64_t p = 1; p < parts; ++p) workers.emplace_back(part, p);
  part(0);
  for (std::thread& t : workers) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

}  // namespace m1
