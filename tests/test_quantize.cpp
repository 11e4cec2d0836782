// The quantized weight layout (m1/quantize.h) byte for byte, and the quantizer: its codes, scales
// and error, on fresh random weights of awkward widths.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "m1/error.h"
#include "m1/quantize.h"
#include "test_support.h"

namespace m1 {
namespace {

using testing::random_floats;
using testing::RandomWeight;
using testing::relative_error;

std::vector<float> dequantized(const Weight& w) {
  std::vector<float> out(size_t(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) dequantize_row(w, r, out.data() + r * w.cols);
  return out;
}

// The layout as documented: offset-binary codes, low nibble first, rows on 32-bit words.
TEST(QuantizeTest, LayoutIsPackQuantized) {
  QuantizedWeight q4(QuantScheme{DType::kQ4, 32}, 2, 10);
  EXPECT_EQ(q4.weight().row_bytes(), 8u);  // 10 codes round up to two 32-bit words
  EXPECT_EQ(q4.weight().data_bytes(), 16u);
  EXPECT_EQ(q4.weight().groups(), 1);
  EXPECT_EQ(q4.weight().group_size, 32);
  const int codes[10] = {7, 1, -8, 0, -1, 3, 5, -7, 2, -2};
  for (int c = 0; c < 10; ++c) set_packed_code(q4.data().data() + 8, DType::kQ4, c, codes[c]);
  const uint8_t* row1 = reinterpret_cast<const uint8_t*>(q4.data().data()) + 8;
  EXPECT_EQ(row1[0], 0x9F);  // element 0 = 0xF - 8 = 7 (low nibble), element 1 = 0x9 - 8 = 1
  EXPECT_EQ(row1[1], 0x80);
  EXPECT_EQ(row1[2], 0xB7);
  EXPECT_EQ(row1[3], 0x1D);
  EXPECT_EQ(row1[4], 0x6A);
  EXPECT_EQ(row1[5], 0x00);  // padding: u = 0
  uint32_t word = 0;
  std::memcpy(&word, row1, 4);  // little-endian word: element i in bits [4i, 4i + 4)
  for (int i = 0; i < 8; ++i) EXPECT_EQ(int((word >> (4 * i)) & 15) - 8, codes[i]) << i;
  for (int c = 0; c < 10; ++c) EXPECT_EQ(packed_code(row1, DType::kQ4, c), codes[c]);

  QuantizedWeight q8(QuantScheme{DType::kQ8, 0}, 3, 5);
  EXPECT_EQ(q8.weight().row_bytes(), 8u);
  EXPECT_EQ(q8.weight().group_size, 5);  // one scale per row
  EXPECT_EQ(q8.weight().scale_bytes(), 3u * 2);
  set_packed_code(q8.data().data(), DType::kQ8, 0, -128);
  set_packed_code(q8.data().data(), DType::kQ8, 1, 127);
  set_packed_code(q8.data().data(), DType::kQ8, 2, -1);
  const uint8_t* row0 = reinterpret_cast<const uint8_t*>(q8.data().data());
  EXPECT_EQ(row0[0], 0x00);
  EXPECT_EQ(row0[1], 0xFF);
  EXPECT_EQ(row0[2], 0x7F);

  EXPECT_EQ(matrix_bytes(DType::kQ4, 3, 9), 3u * 8);
  EXPECT_EQ(matrix_bytes(DType::kQ8, 2, 4), 8u);
  EXPECT_EQ(matrix_bytes(DType::kBF16, 2, 3), 12u);
  EXPECT_EQ(dtype_bits(DType::kQ4), 4);
  EXPECT_EQ(dtype_bits(DType::kI64), 64);
}

// Dequantized values are code * scale, and each code lies in its type's range.
TEST(QuantizeTest, ValuesAreCodeTimesScale) {
  RandomWeight source(DType::kBF16, 5, 77, 0.3f);
  for (const QuantScheme scheme : {QuantScheme{DType::kQ8, 0}, QuantScheme{DType::kQ4, 32}, QuantScheme{DType::kQ4, 64}}) {
    const QuantizedWeight q = quantize(source.w, scheme, "w");
    const Weight& w = q.weight();
    EXPECT_EQ(w.groups(), scheme.type == DType::kQ8 ? 1 : (77 + scheme.group_size - 1) / scheme.group_size);
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t c = 0; c < w.cols; ++c) {
        const int code = packed_code(packed_row(w, r), w.dtype, c);
        ASSERT_GE(code, quant_min(w.dtype));
        ASSERT_LE(code, quant_max(w.dtype));
        ASSERT_EQ(weight_value(w, r, c), float(code) * scale_at(w, r, c / w.group_size));
      }
    // Padding codes past the last column stay u = 0.
    const auto* last = static_cast<const uint8_t*>(packed_row(w, w.rows - 1));
    if (w.dtype == DType::kQ4) {
      EXPECT_EQ(last[w.row_bytes() - 1], 0);
    }
  }
}

// The error the quantizer reaches on N(0, 1) weights, and that searching the scale never does
// worse than the plain max|v| / qmax scale.
TEST(QuantizeTest, ErrorWithinBoundsOnAwkwardWidths) {
  struct Case {
    QuantScheme scheme;
    double bound;  // relative Frobenius error of the dequantized weights
  };
  for (int64_t cols : {1, 7, 33, 95, 200, 1030})
    for (const Case& c : {Case{{DType::kQ8, 0}, 0.012}, Case{{DType::kQ4, 32}, 0.12}, Case{{DType::kQ4, 128}, 0.15}}) {
      RandomWeight source(DType::kF32, 9, cols);
      const std::vector<float> want(static_cast<const float*>(source.w.data), static_cast<const float*>(source.w.data) + 9 * cols);
      const double error = relative_error(dequantized(quantize(source.w, c.scheme, "w").weight()), want);
      EXPECT_LE(error, c.bound) << dtype_name(c.scheme.type) << " group " << c.scheme.group_size << " cols " << cols;
      // Round to nearest with max|v| / qmax per group, in the same bf16 scales.
      const int64_t group = c.scheme.group_size > 0 ? c.scheme.group_size : cols;
      std::vector<float> plain = want;
      for (int64_t r = 0; r < 9; ++r)
        for (int64_t g = 0; g < cols; g += group) {
          float absmax = 0;
          for (int64_t i = g; i < std::min(cols, g + group); ++i) absmax = std::max(absmax, std::fabs(want[size_t(r * cols + i)]));
          const float s = bf16_to_f32(f32_to_bf16(absmax / float(quant_max(c.scheme.type))));
          for (int64_t i = g; i < std::min(cols, g + group); ++i) {
            float& v = plain[size_t(r * cols + i)];
            v = s > 0 ? float(std::clamp(int(std::nearbyint(v / s)), quant_min(c.scheme.type), quant_max(c.scheme.type))) * s : 0;
          }
        }
      EXPECT_LE(error, relative_error(plain, want) * (1 + 1e-9)) << "cols " << cols;
    }
}

// The search against a plain scalar one: each group's scale is the best of max|v| / d over the
// type's divisors (squared error summed in double in order; the quantizer's vector order may
// differ in the last bits), and its codes are round(v * (1 / scale)) clamped to the type's range.
TEST(QuantizeTest, ScaleIsTheSearchsBestAndCodesRoundToNearest) {
  const std::vector<float> int8_divisors = {127.0f, 127.5f, 128.0f, 124.0f, 120.0f, 114.0f};
  const std::vector<float> int4_divisors = {7.0f, 7.5f, 8.0f, 8.5f, 9.0f, 9.5f, 10.0f};
  for (int64_t cols : {5, 16, 33, 100, 1030})
    for (const QuantScheme scheme : {QuantScheme{DType::kQ8, 0}, QuantScheme{DType::kQ4, 32}, QuantScheme{DType::kQ4, 64}}) {
      RandomWeight source(DType::kF32, 6, cols);
      const auto* v = static_cast<const float*>(source.w.data);
      const QuantizedWeight q = quantize(source.w, scheme, "w");
      const Weight& w = q.weight();
      const float qmin = float(quant_min(w.dtype)), qmax = float(quant_max(w.dtype));
      auto code = [&](float x, float s) { return std::clamp(std::nearbyint(x * (1.0f / s)), qmin, qmax); };
      for (int64_t r = 0; r < w.rows; ++r)
        for (int64_t g = 0; g < w.groups(); ++g) {
          const int64_t first = g * w.group_size, last = std::min(cols, first + w.group_size);
          auto error = [&](float s) {
            double sum = 0;
            for (int64_t c = first; c < last; ++c) {
              const double e = double(v[r * cols + c]) - double(code(v[r * cols + c], s) * s);
              sum += e * e;
            }
            return sum;
          };
          float absmax = 0;
          for (int64_t c = first; c < last; ++c) absmax = std::max(absmax, std::fabs(v[r * cols + c]));
          double best = INFINITY;
          for (float d : w.dtype == DType::kQ8 ? int8_divisors : int4_divisors) best = std::min(best, error(bf16_to_f32(f32_to_bf16(absmax / d))));
          const float chosen = scale_at(w, r, g);
          const std::string what = std::string(dtype_name(w.dtype)) + " cols " + std::to_string(cols) + " row " + std::to_string(r) +
                                   " group " + std::to_string(g);
          ASSERT_LE(error(chosen), best * (1 + 1e-12)) << what;
          for (int64_t c = first; c < last; ++c)
            ASSERT_EQ(float(packed_code(packed_row(w, r), w.dtype, c)), code(v[r * cols + c], chosen)) << what << " col " << c;
        }
    }
}

TEST(QuantizeTest, SameResultOnAnyThreadCount) {
  RandomWeight source(DType::kF16, 37, 96);
  const QuantizedWeight one = quantize(source.w, {DType::kQ4, 32}, "w", 1), three = quantize(source.w, {DType::kQ4, 32}, "w", 3);
  EXPECT_EQ(0, std::memcmp(one.weight().data, three.weight().data, one.weight().data_bytes()));
  EXPECT_EQ(0, std::memcmp(one.weight().scales, three.weight().scales, one.weight().scale_bytes()));
}

TEST(QuantizeTest, ZerosAndNonFiniteValues) {
  std::vector<float> zeros(64, 0.0f);
  const Weight z{zeros.data(), DType::kF32, 2, 32};
  const QuantizedWeight q = quantize(z, {DType::kQ4, 32}, "w");
  for (float v : dequantized(q.weight())) EXPECT_EQ(v, 0.0f);
  zeros[37] = NAN;
  try {
    quantize(z, {DType::kQ8, 0}, "model.layers.0.w");
    FAIL() << "NaN was quantized";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "model.layers.0.w: cannot quantize: element (1, 5) is nan");
  }
  zeros[37] = 0.0f;
  zeros[62] = -INFINITY;  // past the first vector of its row
  try {
    quantize(z, {DType::kQ4, 32}, "w");
    FAIL() << "-inf was quantized";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "w: cannot quantize: element (1, 30) is -inf");
  }
}

TEST(QuantizeTest, SchemeOptions) {
  EXPECT_EQ(parse_quant_scheme("int4", 0, "--quantize").group_size, 32);
  EXPECT_EQ(parse_quant_scheme("int4", 128, "--quantize").group_size, 128);
  EXPECT_EQ(parse_quant_scheme("int8", 0, "--quantize").type, DType::kQ8);
  auto message = [](const std::string& type, int64_t group) {
    try {
      parse_quant_scheme(type, group, "--quantize");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_EQ(message("int3", 0), "--quantize: 'int3' is not a quantization m1 implements (expected int8 or int4)");
  EXPECT_EQ(message("int4", 48), "--quantize: group size 48 is not a positive multiple of 32 (expected 32, 64, 128, ...)");
  EXPECT_EQ(message("int8", 32), "--quantize: int8 has one scale per output row; a group size applies to int4 only");
}

}  // namespace
}  // namespace m1
