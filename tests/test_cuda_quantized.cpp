// The CUDA products on int8 / int4 weights (kernels/quantized_matmul.cu) against the CPU reference
// on fresh random inputs of awkward sizes (inner sizes off every block, chunk and group, rows off
// every tile), for each type, group size and scale dtype, in both precisions; their batch
// invariance (a row's bits alone, in small calls and inside large ones: skinny and tiled kernels);
// the grouped products bit for bit against matmul on each group; the streamed kernels for few
// rows against the tiled ones, plain and grouped, on any grid; the mixture of experts on
// quantized experts against moe_reference; and the backend's upload of quantized weights. Set
// M1_TEST_SEED to replay a failure; every test prints the seed it used. Also the warpgroup tiles
// (wgmma) against the mma.sync tiles, bit for bit.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "cpu/matmul.h"
#include "cpu/moe.h"
#include "cuda_check.h"
#include "cuda_test_support.h"
#include "device_scratch.h"
#include "m1/dtype.h"
#include "m1/error.h"
#include "m1/quantize.h"
#include "matmul.h"
#include "moe.h"
#include "quantized_stream.h"
#include "test_support.h"

namespace m1::cuda {
namespace {

using test::DeviceArray;
using testing::random_floats;
using testing::relative_error;
using testing::seed;

const char* operands_name(GemmOperands o) { return o == GemmOperands::kBf16 ? "fast" : "exact"; }

// A quantization scheme and the dtype its scales are stored in.
struct Scheme {
  QuantScheme q;
  DType scale_dtype = DType::kBF16;
};

std::string scheme_name(const Scheme& s) {
  return fmt::format("{} group {} {} scales", dtype_name(s.q.type), s.q.group_size ? s.q.group_size : -1,
                     dtype_name(s.scale_dtype));
}

// int8 with one scale per row and in groups of 32, int4 in groups of 32 and 128, bf16 scales (what
// m1 writes); F16 and F32 scales on one of each type.
const Scheme kSchemes[] = {{{DType::kQ8, 0}}, {{DType::kQ8, 32}}, {{DType::kQ4, 32}}, {{DType::kQ4, 128}},
                           {{DType::kQ4, 32}, DType::kF16},       {{DType::kQ8, 0}, DType::kF32},
                           {{DType::kQ4, 128}, DType::kF32}};

// A random quantized weight (values N(0, scale^2), quantized from bf16), its scales stored again
// in the scheme's dtype: F16 holds the bf16 values exactly; F32 nudges each off bf16 (a relative
// 2^-10 at most), so that code * scale is no longer a bf16 product. On the host for the oracle
// and on the device for the kernels.
struct TestQuantWeight {
  testing::RandomQuantizedWeight source;
  std::vector<uint8_t> scales;
  Weight host;
  DeviceArray<uint8_t> codes_device, scales_device;
  DeviceMatrix device;

  TestQuantWeight(const Scheme& s, int64_t rows, int64_t cols, float scale)
      : source(s.q, rows, cols, scale),
        scales(restore(source.w, s.scale_dtype)),
        host(with_scales(source.w, scales.data(), s.scale_dtype)),
        codes_device(bytes(host.data, host.data_bytes())),
        scales_device(bytes(host.scales, host.scale_bytes())),
        device{codes_device.get(), host.dtype, rows, cols, scales_device.get(), host.scale_dtype, host.group_size} {}

  static std::vector<uint8_t> bytes(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    return std::vector<uint8_t>(b, b + n);
  }
  static std::vector<uint8_t> restore(const Weight& w, DType dtype) {
    std::uniform_real_distribution<float> nudge(-1.0f, 1.0f);
    std::vector<float> values(size_t(w.rows * w.groups()));
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t g = 0; g < w.groups(); ++g) {
        float v = scale_at(w, r, g);
        if (dtype == DType::kF32) v *= 1.0f + nudge(testing::rng()) * 0x1p-10f;
        values[size_t(r * w.groups() + g)] = v;
      }
    return testing::encode(dtype, values);
  }
  static Weight with_scales(Weight w, const void* scales, DType dtype) {
    w.scales = scales;
    w.scale_dtype = dtype;
    return w;
  }
};

// The oracle on the operands the GPU multiplies, whatever this CPU supports (matmul_reference's
// arithmetic for quantized weights, with double sums): exact, fp32 x times code * scale; fast, x
// rounded to bf16 times the codes and the sum times the row's scale (one group per row), or times
// bf16(code * scale) (several groups).
std::vector<float> reference(std::vector<float> x, int64_t m, const Weight& w, GemmOperands operands) {
  std::vector<float> out(size_t(m * w.rows));
  if (operands == GemmOperands::kFp32) {
    cpu::matmul_reference(Mat{x.data(), m, w.cols}, w, Mat{out.data(), m, w.rows}, cpu::Operands::kFp32);
    return out;
  }
  const bool one_scale = w.groups() == 1;
  for (float& v : x) v = bf16_to_f32(f32_to_bf16(v));
  std::vector<float> dense(size_t(w.rows * w.cols));
  for (int64_t j = 0; j < w.rows; ++j)
    for (int64_t c = 0; c < w.cols; ++c)
      dense[size_t(j * w.cols + c)] = one_scale ? float(packed_code(packed_row(w, j), w.dtype, c))
                                                : bf16_to_f32(f32_to_bf16(weight_value(w, j, c)));
  cpu::matmul_reference(Mat{x.data(), m, w.cols}, Weight{dense.data(), DType::kF32, w.rows, w.cols},
                        Mat{out.data(), m, w.rows}, cpu::Operands::kFp32);
  if (one_scale)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < w.rows; ++j) out[size_t(i * w.rows + j)] *= scale_at(w, j, 0);
  return out;
}

// out = x w^T on the GPU, with row strides ldx >= k and ldo >= n; padding of out is left as is.
std::vector<float> gpu_matmul(const std::vector<float>& x, int64_t ldx, int64_t m, const TestQuantWeight& w,
                              GemmOperands operands, int64_t ldo, float fill = 0.0f) {
  DeviceArray<float> dx(x);
  DeviceArray<float> dout(std::vector<float>(size_t(m * ldo), fill));
  DeviceScratch scratch(nullptr);
  matmul(dx.get(), ldx, m, w.device, dout.get(), ldo, operands, scratch, test::test_device(), nullptr);
  return dout.download();
}

// The first `cols` of each of `rows` rows `ld` apart.
std::vector<float> packed(const std::vector<float>& v, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<float> out(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r) std::copy_n(v.begin() + r * ld, cols, out.begin() + r * cols);
  return out;
}

// Both sides sum the same products (bf16 operands in fast precision, exact fp32 ones in exact
// precision), the GPU in fp32 (tensor cores truncating within each step, partials and scales
// rounded to nearest), the oracle in double: rounding alone, as for the float weights
// (test_cuda_matmul), plus the exact path's rounding of each group's sum times its scale.
double bound(GemmOperands operands) { return operands == GemmOperands::kBf16 ? 1e-4 : 1e-5; }

class CudaQuantized : public ::testing::Test {
 protected:
  void SetUp() override { M1_REQUIRE_CUDA(); }
};

// Row counts for the skinny kernels (1 to 64, in tiles of 16) and the tiled ones (65 and more);
// inner sizes below a block, off the blocks and groups (77), across two chunks (288, a last group
// of 32 for groups of 128) and three (520); 130 weight rows spill past a tiled CTA's 128. Rows of
// codes copied 16 bytes at a time (288: whole 16-byte units) and 4 at a time (the others). Row
// strides wider than the rows, and the padding of out left alone.
TEST_F(CudaQuantized, MatchesReferenceOnAwkwardShapes) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  const std::pair<int64_t, int64_t> shapes[] = {{7, 15}, {70, 77}, {33, 288}, {130, 520}};
  for (const Scheme& scheme : kSchemes)
    for (const auto& [n, k] : shapes) {
      const TestQuantWeight w(scheme, n, k, 1.0f / std::sqrt(float(k)));
      for (int64_t m : {1, 3, 17, 33, 64, 65, 130}) {
        const int64_t ldx = k + 3, ldo = n + 5;
        const std::vector<float> x = random_floats(size_t(m * ldx));
        for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16}) {
          const std::vector<float> got = gpu_matmul(x, ldx, m, w, operands, ldo, -7.0f);
          const std::string what = fmt::format("{} {}: m {} n {} k {}", scheme_name(scheme), operands_name(operands), m, n, k);
          for (int64_t r = 0; r < m; ++r)
            for (int64_t c = n; c < ldo; ++c) ASSERT_EQ(got[size_t(r * ldo + c)], -7.0f) << what << " row " << r << " col " << c;
          EXPECT_LT(relative_error(packed(got, m, n, ldo), reference(packed(x, m, k, ldx), m, w.host, operands)),
                    bound(operands))
              << what;
        }
      }
    }
}

// Rows computed alone, in small calls (the streamed kernels for up to 8 or 16 rows of 16-byte aligned
// rows, the skinny ones, 1 to 4 row tiles) and inside large ones (the tiled kernels, at other
// offsets within their tiles) are bit-identical, over an inner size of three chunks whose last
// group is partial (608 = 4 x 128 + 96).
TEST_F(CudaQuantized, RowsDoNotDependOnTheirBatch) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  const int64_t n = 77, k = 608, rows = 150;
  const std::vector<float> x = random_floats(size_t(rows * k));
  for (const Scheme& scheme : kSchemes) {
    const TestQuantWeight w(scheme, n, k, 1.0f / std::sqrt(float(k)));
    for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16}) {
      const std::vector<float> all = gpu_matmul(x, k, rows, w, operands, n);
      EXPECT_TRUE(std::all_of(all.begin(), all.end(), [](float v) { return std::isfinite(v); }));
      const std::pair<int64_t, int64_t> calls[] = {{0, 1}, {149, 1}, {5, 3}, {20, 17}, {100, 33}, {70, 64}, {3, 65}, {11, 139}};
      for (const auto& [first, count] : calls)
        for (const int64_t ldx : {k, k + 1}) {  // few rows: streamed (aligned rows of x) and skinny kernels
          std::vector<float> part(size_t(count * ldx));
          for (int64_t r = 0; r < count; ++r) std::copy_n(x.begin() + (first + r) * k, k, part.begin() + r * ldx);
          const std::vector<float> got = gpu_matmul(part, ldx, count, w, operands, n);
          ASSERT_EQ(std::memcmp(got.data(), all.data() + first * n, got.size() * sizeof(float)), 0)
              << "rows [" << first << ", " << first + count << ") of " << rows << ", row stride " << ldx << ", "
              << scheme_name(scheme) << " " << operands_name(operands);
        }
    }
  }
}

// The grouped product against matmul on each group's rows alone, bit for bit: empty groups, one
// group with every row, more groups than one launch takes (70), bounds on the rows per group that
// are too low (1), tight and loose (skinny and tiled kernels); two products in one call
// (grouped_matmuls: one bf16 copy of x, one set of partials) give each product those bits too.
// Rows before and after the groups keep what they held.
TEST_F(CudaQuantized, GroupedMatmulMatchesMatmulPerGroup) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  std::vector<int64_t> many(70);
  for (size_t g = 0; g < many.size(); ++g) many[g] = int64_t(g % 7 == 3 ? 0 : g % 3);
  const std::vector<std::vector<int64_t>> patterns = {{0, 3, 0}, {5, 0, 70, 1}, many};
  const float kUntouched = -7.25f;
  const int64_t k = 300, n = 72;
  for (const Scheme& scheme : {kSchemes[0], kSchemes[2], kSchemes[6]})
    for (const std::vector<int64_t>& counts : patterns) {
      const int64_t groups = int64_t(counts.size()), lead = 2;
      const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t(0));
      const int64_t rows = lead + total + 1, ldx = k + 3, ldo = n + 5;
      std::vector<int64_t> offsets = {lead};
      for (int64_t c : counts) offsets.push_back(offsets.back() + c);
      const int64_t most = *std::max_element(counts.begin(), counts.end());
      std::vector<std::unique_ptr<TestQuantWeight>> weights;
      std::vector<DeviceMatrix> w, other;
      for (std::vector<DeviceMatrix>* list : {&w, &other})
        for (int64_t g = 0; g < groups; ++g) {
          weights.push_back(std::make_unique<TestQuantWeight>(scheme, n, k, 1.0f / std::sqrt(float(k))));
          list->push_back(weights.back()->device);
        }
      const std::vector<float> x = random_floats(size_t(rows * ldx));
      DeviceArray<float> x_device(x);
      DeviceArray<int64_t> offsets_device(offsets);
      DeviceScratch scratch(nullptr);
      for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16}) {
        const std::string what = fmt::format("{} {}, {} groups of {} rows", scheme_name(scheme), operands_name(operands),
                                             groups, total);
        const auto per_group = [&](const std::vector<DeviceMatrix>& weights_of) {
          DeviceArray<float> out(std::vector<float>(size_t(rows * ldo), kUntouched));
          for (int64_t g = 0; g < groups; ++g)
            if (counts[size_t(g)] > 0)
              matmul(x_device.get() + offsets[size_t(g)] * ldx, ldx, counts[size_t(g)], weights_of[size_t(g)],
                     out.get() + offsets[size_t(g)] * ldo, ldo, operands, scratch, test::test_device(), nullptr);
          return out.download();
        };
        const std::vector<float> want = per_group(w), want_other = per_group(other);
        const auto expect_bits = [&](const DeviceArray<float>& out, const std::vector<float>& expected,
                                     const std::string& call) {
          const std::vector<float> got = out.download();
          EXPECT_TRUE(std::all_of(got.begin() + lead * ldo, got.begin() + (lead + total) * ldo,
                                  [](float v) { return std::isfinite(v); }))
              << what << ", " << call;
          EXPECT_EQ(0, std::memcmp(got.data(), expected.data(), got.size() * sizeof(float))) << what << ", " << call;
        };
        for (int64_t bound : {int64_t(1), most, rows}) {
          DeviceArray<float> out(std::vector<float>(size_t(rows * ldo), kUntouched));
          grouped_matmul(x_device.get(), ldx, offsets_device.get(), w, rows, bound, out.get(), ldo, operands, scratch,
                         test::test_device(), nullptr);
          expect_bits(out, want, fmt::format("grouped_matmul, bound {}", bound));
          DeviceArray<float> first(std::vector<float>(size_t(rows * ldo), kUntouched));
          DeviceArray<float> second(std::vector<float>(size_t(rows * ldo), kUntouched));
          const GroupedProduct products[] = {{w, first.get(), ldo}, {other, second.get(), ldo}};
          grouped_matmuls(x_device.get(), ldx, offsets_device.get(), products, rows, bound, operands, scratch, test::test_device(), nullptr);
          expect_bits(first, want, fmt::format("grouped_matmuls first, bound {}", bound));
          expect_bits(second, want_other, fmt::format("grouped_matmuls second, bound {}", bound));
        }
      }
    }
}

// The warpgroup tiles (wgmma, Hopper; fast precision) against quant_tile, bit for bit, and against
// the oracle: every scheme (one scale per row: codes as operands and each chunk's partial times
// the scale; groups: bf16(code * scale) operands; BF16, F16 and F32 scales), inner sizes off the
// blocks and the k-tiles (77: three blocks, the last k-tile one block), across chunks (520), 130
// weight rows (past a CTA's 128), 65 to 200 rows; grouped, groups of more than 64 rows beside
// small and empty ones (the small ones' rows ride in the same tiles). Exact precision never takes
// them: checked too. Skipped where the GPU or the build has no warpgroup products.
TEST_F(CudaQuantized, WarpgroupTilesMatchTheMmaTiles) {
  if (!warpgroup_mma_available(test::test_device().index())) GTEST_SKIP() << "no sm_90a warpgroup products here";
  SCOPED_TRACE("seed " + std::to_string(seed()));
  Device mma = test::test_device().with_warpgroup_mma(false);
  Device warpgroup = test::test_device().with_warpgroup_mma(true);
  DeviceScratch scratch(nullptr);
  struct Shape { int64_t m, n, k; };
  for (const Scheme& scheme : kSchemes)
    for (const Shape& shape : {Shape{65, 130, 520}, Shape{200, 64, 77}, Shape{129, 33, 288}}) {
      const TestQuantWeight w(scheme, shape.n, shape.k, 1.0f / std::sqrt(float(shape.k)));
      const std::vector<float> x = random_floats(size_t(shape.m * shape.k));
      const DeviceArray<float> dx(x);
      const int64_t ldo = shape.n + 2;
      for (GemmOperands operands : {GemmOperands::kBf16, GemmOperands::kFp32}) {
        const std::string what = fmt::format("{} {}, m {} n {} k {}", scheme_name(scheme), operands_name(operands),
                                             shape.m, shape.n, shape.k);
        DeviceArray<float> want(std::vector<float>(size_t(shape.m * ldo), -3.5f));
        DeviceArray<float> got(std::vector<float>(size_t(shape.m * ldo), -3.5f));
        matmul(dx.get(), shape.k, shape.m, w.device, want.get(), ldo, operands, scratch, mma, nullptr);
        matmul(dx.get(), shape.k, shape.m, w.device, got.get(), ldo, operands, scratch, warpgroup, nullptr);
        const std::vector<float> a = want.download(), b = got.download();
        ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what;
        EXPECT_LT(relative_error(packed(b, shape.m, shape.n, ldo), reference(x, shape.m, w.host, operands)),
                  bound(operands))
            << what;
      }
    }
  const int64_t n = 140, k = 300, ldo = n + 1;
  const std::vector<int64_t> offsets = {1, 90, 90, 93, 230, 231};
  const int64_t rows = offsets.back() + 2;
  const std::vector<float> x = random_floats(size_t(rows * k));
  const DeviceArray<float> dx(x);
  const DeviceArray<int64_t> doffsets(offsets);
  for (const Scheme& scheme : {kSchemes[0], kSchemes[2]}) {
    std::vector<std::unique_ptr<TestQuantWeight>> weights;
    std::vector<DeviceMatrix> w;
    for (size_t g = 0; g + 1 < offsets.size(); ++g) {
      weights.push_back(std::make_unique<TestQuantWeight>(scheme, n, k, 1.0f / std::sqrt(float(k))));
      w.push_back(weights.back()->device);
    }
    DeviceArray<float> want(std::vector<float>(size_t(rows * ldo), -3.5f));
    DeviceArray<float> got(std::vector<float>(size_t(rows * ldo), -3.5f));
    grouped_matmul(dx.get(), k, doffsets.get(), w, rows, 137, want.get(), ldo, GemmOperands::kBf16, scratch, mma,
                   nullptr);
    grouped_matmul(dx.get(), k, doffsets.get(), w, rows, 137, got.get(), ldo, GemmOperands::kBf16, scratch,
                   warpgroup, nullptr);
    const std::vector<float> a = want.download(), b = got.download();
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "grouped " << scheme_name(scheme);
  }
}

// The streamed kernels (quantized_stream.h: persistent CTAs, an equal run of (column block, chunk)
// units each, codes, x and scales through a ring) against the tiled kernel (70 rows), bit for bit,
// for 1, 3 and 8 rows (and 16 of int4), every scheme, inner sizes of one block, of three chunks with a partial block
// and group (520), and off the blocks (300), 1 to 257 weight rows (off the column block of 128),
// on grids of 1, 3, 7 and 132 CTAs.
TEST_F(CudaQuantized, StreamedMatchesTheTiledKernelOnAnyGrid) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  const int64_t rows = 70;
  for (const Scheme& scheme : kSchemes)
    for (const auto& [n, k] : {std::pair<int64_t, int64_t>{1, 32}, {130, 520}, {257, 300}}) {
      const TestQuantWeight w(scheme, n, k, 1.0f / std::sqrt(float(k)));
      const DeviceArray<float> x(random_floats(size_t(rows * k)));
      DeviceArray<float> out(size_t(rows * n));
      DeviceScratch scratch(nullptr);
      for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16}) {
        matmul(x.get(), k, rows, w.device, out.get(), n, operands, scratch, test::test_device(), nullptr);
        const std::vector<float> tiled = out.download();
        for (int sms : {1, 3, 7, 132}) {
          Device device = test::device_with_sms(sms);
          for (int64_t m : {1, 3, 8, 16}) {
            // 16 rows (int4 only) on one grid: the others' splits are the same at any height.
            if (m > quantized_stream_max_rows(scheme.q.type) || (m == 16 && sms != 7)) continue;
            const int64_t first = (m * 11 + sms) % (rows - m + 1);
            const std::string what = fmt::format("{} {}: {} rows from {}, n {} k {}, {} CTAs", scheme_name(scheme),
                                                 operands_name(operands), m, first, n, k, sms);
            ASSERT_TRUE(quantized_streams(m, x.get() + first * k, k, std::span(&w.device, 1), operands, device)) << what;
            matmul(x.get() + first * k, k, m, w.device, out.get(), n, operands, scratch, device, nullptr);
            const std::vector<float> got = out.download();
            ASSERT_EQ(std::memcmp(got.data(), tiled.data() + first * n, size_t(m * n) * sizeof(float)), 0) << what;
          }
        }
      }
    }
}

// grouped_matmul(s) through the streamed kernels: each group's rows bit-identical to the skinny
// kernel's on them (matmul of the group's rows with a row stride that is not 16-byte aligned,
// which the streamed kernels refuse; RowsDoNotDependOnTheirBatch ties the skinny kernels to the
// tiled ones), with empty groups, groups of 1 to 20 rows, bounds on the rows per group that split
// groups into tiles (1, 3), are tight, or are every row of the call (60 rows: tiles of 16 of int4,
// 8 of int8), 70 groups (two launches), two chunks with a partial block and group, and two
// products in one launch, or one after the other when the device's budget holds only one
// product's chunk partials. Rows outside the groups keep what they held.
TEST_F(CudaQuantized, StreamedGroupedMatchesTheSkinnyKernel) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  const int64_t rows = 60, n = 150, k = 300, ldo = n + 3;
  const float kUntouched = -7.25f;
  // 7 CTAs (the plain test covers 1 to 132): the emulator runs every CTA of a grouped launch.
  Device device = test::device_with_sms(7);
  for (const Scheme& scheme : {kSchemes[0], kSchemes[2], kSchemes[6]})
    for (const std::vector<int64_t>& counts : test::streamed_group_counts()) {
      const int64_t groups = int64_t(counts.size()), lead = 1;
      std::vector<int64_t> offsets = {lead};
      for (int64_t c : counts) offsets.push_back(offsets.back() + c);
      const int64_t most = *std::max_element(counts.begin(), counts.end());
      std::vector<std::unique_ptr<TestQuantWeight>> weights;
      std::vector<DeviceMatrix> w[2];
      for (int product = 0; product < 2; ++product)
        for (int64_t g = 0; g < groups; ++g) {
          weights.push_back(std::make_unique<TestQuantWeight>(scheme, n, k, 1.0f / std::sqrt(float(k))));
          w[product].push_back(weights.back()->device);
        }
      const std::vector<float> x_host = random_floats(size_t(rows * k));
      const int64_t ld_skinny = k + 1;
      std::vector<float> x_skinny(size_t(rows * ld_skinny));
      for (int64_t r = 0; r < rows; ++r) std::copy_n(x_host.begin() + r * k, k, x_skinny.begin() + r * ld_skinny);
      const DeviceArray<float> x(x_host), x_unaligned(x_skinny);
      const DeviceArray<int64_t> offsets_device(offsets);
      DeviceScratch scratch(nullptr);
      for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16}) {
        std::vector<float> want[2];
        for (int product = 0; product < 2; ++product) {
          DeviceArray<float> out(std::vector<float>(size_t(rows * ldo), kUntouched));
          for (int64_t g = 0; g < groups; ++g)
            if (counts[size_t(g)] > 0)
              matmul(x_unaligned.get() + offsets[size_t(g)] * ld_skinny, ld_skinny, counts[size_t(g)],
                     w[product][size_t(g)], out.get() + offsets[size_t(g)] * ldo, ldo, operands, scratch,
                     test::test_device(), nullptr);
          want[product] = out.download();
        }
        // Bounds past the cap give tiles of the cap (16 rows of int4, 8 of int8): each height once.
        const int64_t cap = quantized_stream_max_rows(scheme.q.type);
        std::vector<int64_t> tiles_tried;
        for (int64_t bound : {int64_t(1), int64_t(3), most, rows}) {
          if (bound == 1 && offsets.back() - lead > 6) continue;  // a tile per row: slow on the emulator
          if (std::ranges::count(tiles_tried, std::min(bound, cap)) > 0 && bound != rows) continue;
          tiles_tried.push_back(std::min(bound, cap));
          const std::string what = fmt::format("{} {}, {} groups, bound {}", scheme_name(scheme), operands_name(operands),
                                               groups, bound);
          ASSERT_TRUE(quantized_streams(std::min(bound, cap), x.get(), k, w[0], operands, device))
              << what;
          test::expect_grouped_bits(x.get(), k, offsets_device.get(), w, rows, bound, ldo, kUntouched, operands, scratch,
                                    device, want, what);
        }
        // A budget for one product's chunk partials but not two: the products stream one at a
        // time, sharing one set of partials and counters.
        Device one_at_a_time = test::device_with_sms(7, test::partial_bytes(rows, n, k));
        test::expect_grouped_bits(x.get(), k, offsets_device.get(), w, rows, rows, ldo, kUntouched, operands, scratch,
                                  one_at_a_time, want,
                                  fmt::format("{} {}, {} groups, one product at a time", scheme_name(scheme),
                                              operands_name(operands), groups));
      }
    }
}

// matmuls on quantized weights against matmul of each product alone, bit for bit: qkv and the
// output gate, and q, k and v, cut into row blocks that stream in one launch (their codes and
// scales offset by whole rows), for int8 with a scale per row and int4 in groups of 32 and of
// 128 with F32 scales, at 1, 3, 8 and 16 rows (int8 streams up to 8, int4 up to 16) and at 17 (not
// streamed).
TEST_F(CudaQuantized, MatmulsMatchEachProductAlone) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  const int64_t rows = 17, k = 300;
  Device device = test::device_with_sms(7);
  for (const Scheme& scheme : {kSchemes[0], kSchemes[2], kSchemes[6]})
    for (const std::vector<int64_t>& widths : {std::vector<int64_t>{600, 200}, std::vector<int64_t>{384, 96, 96}}) {
      std::vector<std::unique_ptr<TestQuantWeight>> stored;
      std::vector<DeviceMatrix> weights;
      for (int64_t n : widths) {
        stored.push_back(std::make_unique<TestQuantWeight>(scheme, n, k, 1.0f / std::sqrt(float(k))));
        weights.push_back(stored.back()->device);
      }
      const DeviceArray<float> x(random_floats(size_t(rows * k)));
      DeviceScratch scratch(nullptr);
      for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16})
        for (int64_t m : {int64_t(1), int64_t(3), int64_t(8), int64_t(16), rows})
          test::expect_matmuls_bits(x.get(), k, m, weights, operands, scratch, device,
                                    fmt::format("{} {}: widths {}, {} rows", scheme_name(scheme),
                                                operands_name(operands), fmt::join(widths, "/"), m));
    }
}

// grouped_matmuls_of_rows on quantized experts against the rows gathered first, bit for bit:
// streamed in tiles of 8 reading x's rows in place, and 70 rows under a loose bound (gathered).
TEST_F(CudaQuantized, GroupedRowsReadInPlaceMatchGathered) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  const int64_t n = 130, k = 300, tokens = 40, ldo = n + 1;
  const std::vector<int64_t> counts = {3, 0, 17, 10, 40};
  Device device = test::device_with_sms(7);
  for (const Scheme& scheme : {kSchemes[0], kSchemes[2], kSchemes[6]}) {
    std::vector<std::unique_ptr<TestQuantWeight>> stored;
    std::vector<DeviceMatrix> w[2];
    for (int product = 0; product < 2; ++product)
      for (size_t g = 0; g < counts.size(); ++g) {
        stored.push_back(std::make_unique<TestQuantWeight>(scheme, n, k, 1.0f / std::sqrt(float(k))));
        w[product].push_back(stored.back()->device);
      }
    const std::vector<float> x = random_floats(size_t(tokens * k));
    for (int64_t call_rows : {30, 70}) {
      std::vector<int64_t> offsets = {0};
      for (int64_t c : counts) offsets.push_back(std::min(call_rows, offsets.back() + c));
      const DeviceArray<int64_t> doffsets(offsets);
      std::vector<int64_t> x_rows(static_cast<size_t>(call_rows));
      for (size_t r = 0; r < x_rows.size(); ++r) x_rows[r] = int64_t((r * 7 + 3) % size_t(tokens - 5));
      for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16}) {
        DeviceScratch scratch(nullptr);
        test::expect_rows_read_in_place(x, k, x_rows, doffsets.get(), w, call_rows, ldo, -7.25f, operands, scratch,
                                        device, fmt::format("{} {}, {} rows", scheme_name(scheme),
                                                            operands_name(operands), call_rows));
      }
    }
  }
}

// grouped_matmul_swiglu on quantized experts gives the bits of swiglu then grouped_matmul: streamed
// with SwiGLU applied as the rows are staged (int8's ring holds up's rows beside x's only in tiles
// of 4, so bounds of 8 and 33 take those), and the fallback (100 rows under a loose bound).
TEST_F(CudaQuantized, GroupedSwigluMatchesSwigluThenTheProduct) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  const int64_t n = 130, k = 300, ldo = n + 1;
  for (const Scheme& scheme : {kSchemes[0], kSchemes[2], kSchemes[6]})
    for (const auto& [counts, bound] : {std::pair<std::vector<int64_t>, int64_t>{{3, 0, 5}, 3},
                                        {{3, 0, 5}, 8},
                                        {{12, 1, 20}, 33},
                                        {{60, 39}, 100}}) {
      std::vector<int64_t> offsets = {0};
      for (int64_t c : counts) offsets.push_back(offsets.back() + c);
      const int64_t rows = std::max<int64_t>(offsets.back(), bound);
      std::vector<std::unique_ptr<TestQuantWeight>> weights;
      std::vector<DeviceMatrix> w;
      for (size_t g = 0; g < counts.size(); ++g) {
        weights.push_back(std::make_unique<TestQuantWeight>(scheme, n, k, 1.0f / std::sqrt(float(k))));
        w.push_back(weights.back()->device);
      }
      const std::vector<float> gate = random_floats(size_t(rows * k)), up = random_floats(size_t(rows * k));
      const DeviceArray<int64_t> offsets_device(offsets);
      DeviceScratch scratch(nullptr);
      for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16})
        test::expect_swiglu_product_bits(gate, up, k, offsets_device.get(), w, rows, bound, ldo, -7.25f, operands,
                                         scratch, test::test_device(), bound <= 8 || rows <= 64,
                                         fmt::format("{} {}: {} rows, bound {}", scheme_name(scheme),
                                                     operands_name(operands), rows, bound));
    }
}

// Quantized groups must share a group size and scale dtype, and have scales.
TEST_F(CudaQuantized, GroupedMatmulRejectsMixedQuantization) {
  const TestQuantWeight a({{DType::kQ4, 32}}, 8, 64, 1.0f), b({{DType::kQ4, 64}}, 8, 64, 1.0f),
      c({{DType::kQ4, 32}, DType::kF16}, 8, 64, 1.0f);
  DeviceMatrix unscaled = a.device;
  unscaled.scales = nullptr;
  DeviceArray<float> x(128), out(16);
  DeviceArray<int64_t> offsets(std::vector<int64_t>{0, 1, 2});
  DeviceScratch scratch(nullptr);
  for (const DeviceMatrix& other : {b.device, c.device, unscaled}) {
    const std::vector<DeviceMatrix> w = {a.device, other};
    EXPECT_THROW(grouped_matmul(x.get(), 64, offsets.get(), w, 2, 1, out.get(), 8, GemmOperands::kBf16, scratch, test::test_device(), nullptr),
                 Error);
  }
  EXPECT_THROW(matmul(x.get(), 64, 1, unscaled, out.get(), 8, GemmOperands::kBf16, scratch, test::test_device(), nullptr), Error);
}

// ---------------------------------------------------------------------------------------------
// The mixture of experts with quantized experts (the router stays BF16, routing fp32).

struct QuantizedMoe {
  int64_t experts, top_k, hidden, ffn;
  testing::RandomWeight router;
  std::vector<std::unique_ptr<TestQuantWeight>> owned;
  MoeWeights cpu;
  DeviceArray<uint8_t> router_device;
  std::vector<DeviceMatrix> w1, w3, w2;

  QuantizedMoe(const Scheme& scheme, int64_t experts_, int64_t top_k_, int64_t hidden_, int64_t ffn_)
      : experts(experts_), top_k(top_k_), hidden(hidden_), ffn(ffn_),
        router(DType::kBF16, experts, hidden, 1.0f / std::sqrt(float(hidden))), router_device(router.bytes) {
    cpu.router = router.w;
    cpu.top_k = top_k;
    const float in_scale = 1.0f / std::sqrt(float(hidden)), out_scale = 1.0f / std::sqrt(float(ffn));
    for (int64_t e = 0; e < experts; ++e)
      for (auto [device, host, rows, cols, scale] : {std::tuple{&w1, &cpu.w1, ffn, hidden, in_scale},
                                                     {&w3, &cpu.w3, ffn, hidden, in_scale},
                                                     {&w2, &cpu.w2, hidden, ffn, out_scale}}) {
        owned.push_back(std::make_unique<TestQuantWeight>(scheme, rows, cols, scale));
        device->push_back(owned.back()->device);
        host->push_back(owned.back()->host);
      }
  }

  std::vector<float> run(const std::vector<float>& x, int64_t rows, GemmOperands operands, cudaStream_t stream) const {
    DeviceArray<float> x_device(x), out(size_t(rows * hidden));
    DeviceScratch matmul_scratch(stream);
    MoeWorkspace workspace(stream, matmul_scratch);
    MoeArgs a;
    a.x = x_device.get();
    a.rows = rows;
    a.hidden = hidden;
    a.router = DeviceMatrix{router_device.get(), DType::kBF16, experts, hidden};
    a.w1 = w1;
    a.w3 = w3;
    a.w2 = w2;
    a.top_k = top_k;
    a.operands = operands;
    a.out = out.get();
    moe(a, workspace, test::test_device(), stream);
    M1_CUDA_CHECK(cudaStreamSynchronize(stream));
    return out.download();
  }
};

// Against moe_reference with the same operand rounding where this CPU multiplies bf16 (1e-3:
// fp32 versus double sums, through SwiGLU), else against its exact arithmetic (1e-2: the GPU's
// bf16 activations alone differ by ~2^-9); exact precision 1e-4. Rows with clear routing only
// (as test_cuda_moe): a near-tie could pick other experts on the two sides. And each row's bits
// alone equal its bits among the others.
TEST_F(CudaQuantized, MoeMatchesReferenceAndIsBatchInvariant) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  for (const Scheme& scheme : {kSchemes[0], kSchemes[2], kSchemes[3]})
    for (auto [rows, experts, top_k, hidden, ffn] : {std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>{1, 4, 2, 64, 96}, {9, 8, 2, 72, 40}, {70, 4, 2, 64, 96}}) {
      const QuantizedMoe m(scheme, experts, top_k, hidden, ffn);
      std::vector<float> x(static_cast<size_t>(rows * hidden)), logits(static_cast<size_t>(experts));
      for (int64_t t = 0; t < rows; ++t)
        for (int attempt = 0, clear = 0; !clear; ++attempt) {
          ASSERT_LT(attempt, 1000) << "no row with a clear routing margin in 1000 tries";
          const std::vector<float> fresh = random_floats(size_t(hidden));
          std::copy(fresh.begin(), fresh.end(), x.begin() + t * hidden);
          cpu::matmul_reference(Mat{x.data() + t * hidden, 1, hidden}, m.cpu.router, Mat{logits.data(), 1, experts});
          std::sort(logits.begin(), logits.end(), std::greater<>());
          clear = 1;
          for (int64_t r = 1; r <= top_k && r < experts; ++r) clear = clear && logits[size_t(r - 1)] - logits[size_t(r)] > 1e-3f;
        }
      for (GemmOperands operands : {GemmOperands::kFp32, GemmOperands::kBf16}) {
        const std::string what = fmt::format("{} {}: {} rows, {} experts, hidden {}, ffn {}", scheme_name(scheme),
                                             operands_name(operands), rows, experts, hidden, ffn);
        const std::vector<float> got = m.run(x, rows, operands, nullptr);
        std::vector<float> want(got.size()), x_copy = x;
        const bool fast = operands == GemmOperands::kBf16;
        cpu::moe_reference(Mat{x_copy.data(), rows, hidden}, m.cpu, Mat{want.data(), rows, hidden},
                           fast ? cpu::Operands::kBf16 : cpu::Operands::kFp32);
        EXPECT_LT(relative_error(got, want), !fast ? 1e-4 : cpu::bf16_products_available() ? 1e-3 : 1e-2) << what;
        for (int64_t row : {int64_t(0), rows / 2, rows - 1}) {
          const std::vector<float> alone(x.begin() + row * hidden, x.begin() + (row + 1) * hidden);
          const std::vector<float> one = m.run(alone, 1, operands, nullptr);
          EXPECT_EQ(0, std::memcmp(one.data(), got.data() + row * hidden, one.size() * sizeof(float))) << what << ", row " << row;
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------
// The backend: upload copies a quantized weight's codes and scales to the device, and its
// products on them are the kernels' (fast precision rounds only where the model allows it).

TEST_F(CudaQuantized, BackendUploadsAndMultiplies) {
  SCOPED_TRACE("seed " + std::to_string(seed()));
  const int64_t m = 3, n = 40, k = 200;
  for (Precision precision : {Precision::kExact, Precision::kFast})
    for (const Scheme& scheme : {kSchemes[0], kSchemes[3]}) {
      auto backend = create_backend(BackendOptions{"cuda", 0, precision, false});
      const TestQuantWeight w(scheme, n, k, 1.0f / std::sqrt(float(k)));
      const Weight device = backend->upload(w.host);
      EXPECT_EQ(device.dtype, w.host.dtype);
      EXPECT_EQ(device.group_size, w.host.group_size);
      EXPECT_NE(device.scales, w.host.scales);
      const std::vector<float> x = random_floats(size_t(m * k));
      const Mat dx = backend->alloc(m, k), dout = backend->alloc(m, n);
      M1_CUDA_CHECK(cudaDeviceSynchronize());  // the allocations are ordered on the backend's stream
      M1_CUDA_CHECK(cudaMemcpy(dx.data, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
      for (Rounding rounding : {Rounding::kAllowed, Rounding::kNever}) {
        backend->matmul(dx, device, dout, rounding);
        std::vector<float> got(size_t(m * n));
        backend->to_host(dout, got.data());
        const GemmOperands operands =
            precision == Precision::kFast && rounding == Rounding::kAllowed ? GemmOperands::kBf16 : GemmOperands::kFp32;
        EXPECT_LT(relative_error(got, reference(x, m, w.host, operands)), bound(operands))
            << scheme_name(scheme) << ", " << backend->name() << (rounding == Rounding::kNever ? ", never rounding" : "");
      }
      backend->free(dx);
      backend->free(dout);
    }
}

// What the kernels cannot run is refused at upload with one line naming it.
TEST_F(CudaQuantized, BackendRefusesBadQuantizedWeights) {
  auto backend = create_backend(BackendOptions{"cuda", 0, Precision::kFast, false});
  const TestQuantWeight w({{DType::kQ4, 32}}, 8, 100, 1.0f);
  Weight unscaled = w.host, bad_group = w.host, bad_scales = w.host;
  unscaled.scales = nullptr;
  bad_group.group_size = 48;
  bad_scales.scale_dtype = DType::kI32;
  for (const auto& [weight, message] : {std::pair{unscaled, "upload: int4 weights [8, 100] without scales"},
                                        {bad_group, "upload: group size 48 is neither a multiple of 32 nor the whole row of 100"},
                                        {bad_scales, "upload: scales of dtype I32 (expected BF16, F16 or F32)"}}) {
    try {
      backend->upload(weight);
      ADD_FAILURE() << "accepted: " << message;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()), message);
    }
  }
}

}  // namespace
}  // namespace m1::cuda
