// The CUDA matmul and elementwise kernels against the CPU references, on fresh random inputs of
// awkward sizes (not multiples of any tile, chunk or vector width), and the matmul's batch
// invariance: a row's bits do not depend on how many rows share its call. Also the scratch
// carver the launchers lay out their temporaries with, and the warpgroup tiles (wgmma) against the
// mma.sync tiles, bit for bit.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cpu/elementwise.h"
#include "cpu/matmul.h"
#include "bf16_stream.h"
#include "cuda_check.h"
#include "cuda_test_support.h"
#include "device_scratch.h"
#include "elementwise.h"
#include "m1/dtype.h"
#include "matmul.h"
#include "test_support.h"

namespace m1::cuda {
namespace {

using test::DeviceArray;
using testing::random_floats;
using testing::RandomWeight;
using testing::relative_error;

// Random values stored in `dtype`, scaled so that products are O(1).
RandomWeight random_weight(DType dtype, int64_t rows, int64_t cols, std::mt19937& rng) {
  return RandomWeight(dtype, rows, cols, 1.0f / std::sqrt(float(cols)), rng);
}

const char* operands_name(GemmOperands o) { return o == GemmOperands::kBf16 ? "bf16" : "fp32"; }

// out = x w^T on the GPU, with row strides ldx >= k and ldo >= n; padding of out is left as is.
std::vector<float> gpu_matmul(const std::vector<float>& x, int64_t ldx, int64_t m, const RandomWeight& w,
                              GemmOperands operands, int64_t ldo, float fill = 0.0f) {
  DeviceArray<float> dx(x);
  DeviceArray<uint8_t> dw(w.bytes);
  DeviceArray<float> dout(std::vector<float>(size_t(m * ldo), fill));
  DeviceScratch scratch(nullptr);
  matmul(dx.get(), ldx, m, DeviceMatrix{dw.get(), w.w.dtype, w.w.rows, w.w.cols}, dout.get(), ldo, operands, scratch, test::test_device(), nullptr);
  return dout.download();
}

// The CPU oracle (double accumulation) on the operands the GPU multiplies: kBf16 with BF16 weights
// rounds x to bf16 first, whatever this CPU supports.
std::vector<float> reference_matmul(const std::vector<float>& x, int64_t m, const RandomWeight& w, GemmOperands operands) {
  std::vector<float> xr = x;
  if (operands == GemmOperands::kBf16 && w.w.dtype == DType::kBF16)
    for (float& v : xr) v = bf16_to_f32(f32_to_bf16(v));
  std::vector<float> out(size_t(m * w.w.rows));
  cpu::matmul_reference(Mat{xr.data(), m, w.w.cols}, w.w, Mat{out.data(), m, w.w.rows}, cpu::Operands::kFp32);
  return out;
}

// fp32 sums of exactly the same products as the double oracle differ by rounding alone: about
// sqrt(k) ulp, 1e-5 leaves room for k in the thousands. kBf16 multiplies identical bf16 operands,
// so only the order of fp32 accumulation on the tensor cores differs too; 1e-4 bounds it.
double bound(GemmOperands operands, DType dtype) {
  return operands == GemmOperands::kBf16 && dtype == DType::kBF16 ? 1e-4 : 1e-5;
}

void check_matmul(int64_t m, int64_t n, int64_t k, DType dtype, GemmOperands operands, std::mt19937& rng) {
  const RandomWeight w = random_weight(dtype, n, k, rng);
  const std::vector<float> x = random_floats(size_t(m * k), 1.0f, rng);
  const std::vector<float> got = gpu_matmul(x, k, m, w, operands, n);
  const double err = relative_error(got, reference_matmul(x, m, w, operands));
  EXPECT_LT(err, bound(operands, dtype)) << "m " << m << " n " << n << " k " << k << " " << dtype_name(dtype) << " "
                                         << operands_name(operands);
}

class CudaMatmul : public ::testing::TestWithParam<std::tuple<DType, GemmOperands>> {};

TEST_P(CudaMatmul, MatchesReferenceOnAwkwardShapes) {
  M1_REQUIRE_CUDA();
  const auto [dtype, operands] = GetParam();
  std::mt19937 rng(1234);
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1}, {7, 15}, {17, 7}, {15, 17}, {100, 1000}, {1000, 100}, {33, 257}, {65, 513}};
  for (int64_t m : {1, 2, 3, 5, 16, 17, 33, 100, 257})
    for (const auto& [n, k] : shapes) check_matmul(m, n, k, dtype, operands, rng);
}

// A projection of the real model's width (k = 6144, n a slice of 8192 outputs), at decode and
// prefill row counts.
TEST_P(CudaMatmul, MatchesReferenceOnARealisticShape) {
  M1_REQUIRE_CUDA();
  const auto [dtype, operands] = GetParam();
  std::mt19937 rng(99);
  for (int64_t m : {1, 16, 130}) check_matmul(m, 1024, 6144, dtype, operands, rng);
}

// Row strides wider than the rows: results land in the first n columns, the rest is untouched.
TEST_P(CudaMatmul, HonoursRowStrides) {
  M1_REQUIRE_CUDA();
  const auto [dtype, operands] = GetParam();
  std::mt19937 rng(7);
  for (int64_t m : {3, 70}) {
    const int64_t n = 45, k = 301, ldx = k + 3, ldo = n + 5;
    const RandomWeight w = random_weight(dtype, n, k, rng);
    const std::vector<float> x = random_floats(size_t(m * ldx), 1.0f, rng);
    const std::vector<float> got = gpu_matmul(x, ldx, m, w, operands, ldo, /*fill=*/-7.0f);
    std::vector<float> packed_x(size_t(m * k)), packed_got(size_t(m * n));
    for (int64_t r = 0; r < m; ++r) {
      std::copy_n(x.begin() + r * ldx, k, packed_x.begin() + r * k);
      std::copy_n(got.begin() + r * ldo, n, packed_got.begin() + r * n);
      for (int64_t c = n; c < ldo; ++c) EXPECT_EQ(got[size_t(r * ldo + c)], -7.0f) << "row " << r << " col " << c;
    }
    EXPECT_LT(relative_error(packed_got, reference_matmul(packed_x, m, w, operands)), bound(operands, dtype)) << "m " << m;
  }
}

// Rows computed alone, in small groups (the decode kernels) and inside large calls (the tiled
// kernels) are bit-identical, for inner dimensions spanning several chunks, aligned or not.
TEST_P(CudaMatmul, RowsDoNotDependOnTheirBatch) {
  M1_REQUIRE_CUDA();
  const auto [dtype, operands] = GetParam();
  std::mt19937 rng(42);
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{300, 1000}, {77, 999}}) {
    const int64_t rows = 300;
    const RandomWeight w = random_weight(dtype, n, k, rng);
    const std::vector<float> x = random_floats(size_t(rows * k), 1.0f, rng);
    const std::vector<float> all = gpu_matmul(x, k, rows, w, operands, n);
    // (first row, count): counts that take each kernel, at positions inside and across tiles.
    const std::pair<int64_t, int64_t> calls[] = {{0, 1},   {150, 1}, {299, 1},  {100, 7}, {3, 7},
                                                 {11, 20}, {200, 40}, {130, 70}, {5, 129}};
    for (const auto& [first, count] : calls) {
      const std::vector<float> part(x.begin() + first * k, x.begin() + (first + count) * k);
      const std::vector<float> got = gpu_matmul(part, k, count, w, operands, n);
      ASSERT_EQ(std::memcmp(got.data(), all.data() + first * n, got.size() * sizeof(float)), 0)
          << "rows [" << first << ", " << first + count << ") of " << rows << ", n " << n << " k " << k << " "
          << dtype_name(dtype) << " " << operands_name(operands);
    }
  }
}

// The skinny kernels' chunk partials, added in chunk order by the last CTA of each column block
// (fold_chunk_partials), give the bits of the tiled kernels, which keep the sum in registers (and
// which the separate sum_partials launch matched before it was folded in): every row count from 1
// to 32, one chunk, chunks not dividing the inner dimension, outputs not dividing the 64-column
// block. One scratch serves every call, so each call must leave its counters at zero.
TEST_P(CudaMatmul, FoldedChunkSumsMatchTheTiledKernel) {
  M1_REQUIRE_CUDA();
  const auto [dtype, operands] = GetParam();
  std::mt19937 rng(31);
  const int64_t rows = 70;  // tiled for every weight dtype
  DeviceScratch scratch(nullptr);
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{1, 256}, {63, 100}, {65, 257}, {130, 1000}}) {
    const RandomWeight w = random_weight(dtype, n, k, rng);
    const DeviceArray<uint8_t> dw(w.bytes);
    const DeviceMatrix dm{dw.get(), w.w.dtype, n, k};
    const DeviceArray<float> dx(random_floats(size_t(rows * k), 1.0f, rng));
    DeviceArray<float> dout(size_t(rows * n));
    matmul(dx.get(), k, rows, dm, dout.get(), n, operands, scratch, test::test_device(), nullptr);
    const std::vector<float> tiled = dout.download();
    for (int64_t m = 1; m <= 32; ++m) {
      const int64_t first = (m * 7) % (rows - m + 1);
      matmul(dx.get() + first * k, k, m, dm, dout.get(), n, operands, scratch, test::test_device(), nullptr);
      const std::vector<float> got = dout.download();
      ASSERT_EQ(std::memcmp(got.data(), tiled.data() + first * n, size_t(m * n) * sizeof(float)), 0)
          << m << " rows from " << first << ", n " << n << " k " << k << " " << dtype_name(dtype) << " "
          << operands_name(operands);
    }
  }
}

// A skinny product recorded in a CUDA graph and replayed three times, x changed between the
// first two: every replay gives the bits of an eager call on its x, so the fold's counters are
// back at zero after each replay, as the graph's next replay needs them.
TEST_P(CudaMatmul, GraphReplaysFoldTheirChunksEachTime) {
  M1_REQUIRE_CUDA();
  const auto [dtype, operands] = GetParam();
  for (const int64_t k : {700, 704}) {  // 704: BF16 weights take the streamed kernel (bf16_stream.h)
  std::mt19937 rng(32);
  const int64_t m = 3, n = 77;
  const RandomWeight w = random_weight(dtype, n, k, rng);
  const DeviceArray<uint8_t> dw(w.bytes);
  const DeviceMatrix dm{dw.get(), w.w.dtype, n, k};
  const std::vector<float> x1 = random_floats(size_t(m * k), 1.0f, rng), x2 = random_floats(size_t(m * k), 1.0f, rng);
  DeviceArray<float> dx(x1), dout(size_t(m * n));
  cudaStream_t stream = nullptr;
  M1_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    DeviceScratch scratch(stream);
    auto run = [&] { matmul(dx.get(), k, m, dm, dout.get(), n, operands, scratch, test::test_device(), stream); };
    auto result = [&] {
      M1_CUDA_CHECK(cudaStreamSynchronize(stream));
      return dout.download();
    };
    run();  // sizes the scratch and its counters before the capture
    const std::vector<float> want1 = result();
    dx.upload(x2);
    run();
    const std::vector<float> want2 = result();
    dx.upload(x1);

    test::CapturedGraph graph(stream, run);
    const std::vector<float>* wants[] = {&want1, &want2, &want2};
    for (int replay = 0; replay < 3; ++replay) {
      if (replay == 1) dx.upload(x2);
      graph.launch();
      const std::vector<float> got = result();
      EXPECT_EQ(std::memcmp(got.data(), wants[replay]->data(), got.size() * sizeof(float)), 0)
          << "replay " << replay << " " << dtype_name(dtype) << " " << operands_name(operands) << " k " << k;
    }
  }
  M1_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

// The streamed kernels (bf16_stream.h: persistent CTAs, each an equal run of (column block,
// chunk) units) against the tiled kernel (70 rows), bit for bit, for 1 to 16 rows (9 of those
// counts: 1-4, 7-9, 15, 16) at sizes off the
// column block (128), the chunk (256) and the stage (128 inputs), on grids of 1, 3, 7 and 132 CTAs
// (how the units split: a CTA's run can start mid-block and cross blocks, and a block's chunks
// are counted by several CTAs).
TEST(CudaBf16Stream, MatchesTheTiledKernelOnAnyGrid) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(33);
  const int64_t rows = 70;
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{1, 8}, {127, 136}, {129, 256}, {300, 1000}, {64, 2056}}) {
    const RandomWeight w = random_weight(DType::kBF16, n, k, rng);
    const DeviceArray<uint8_t> dw(w.bytes);
    const DeviceMatrix dm{dw.get(), DType::kBF16, n, k};
    const DeviceArray<float> dx(random_floats(size_t(rows * k), 1.0f, rng));
    DeviceArray<float> dout(size_t(rows * n));
    for (GemmOperands operands : {GemmOperands::kBf16, GemmOperands::kFp32}) {
      DeviceScratch scratch(nullptr);
      matmul(dx.get(), k, rows, dm, dout.get(), n, operands, scratch, test::test_device(), nullptr);
      const std::vector<float> tiled = dout.download();
      for (int sms : {1, 3, 7, 132}) {
        Device device = test::device_with_sms(sms);
        for (int64_t m : {1, 2, 3, 4, 7, 8, 9, 15, 16}) {
          const int64_t first = (m * 5 + sms) % (rows - m + 1);
          const std::string what = fmt::format("{} rows from {}, n {} k {}, {} CTAs, {}", m, first, n, k, sms,
                                               operands_name(operands));
          const int parts = operands == GemmOperands::kBf16 ? 1 : 3;
          ASSERT_TRUE(bf16_streams(m, dx.get() + first * k, k, std::span(&dm, 1), parts, device)) << what;
          matmul(dx.get() + first * k, k, m, dm, dout.get(), n, operands, scratch, device, nullptr);
          const std::vector<float> got = dout.download();
          ASSERT_EQ(std::memcmp(got.data(), tiled.data() + first * n, size_t(m * n) * sizeof(float)), 0) << what;
        }
      }
    }
  }
}

// matmuls (several products of the same x) against matmul of each product alone, bit for bit:
// products whose rows are multiples of the fewest rows any has (qkv and the output gate; q, k and
// v) stream in one launch at 1 to 16 rows, on grids of 1, 7 and 132 CTAs; rows that are no such
// multiple, more pieces than a launch takes, 17 rows (not streamed) and a budget too small for
// the pieces' partials together take the products one by one. Widths off the column block (200,
// 96) and inputs off the chunk (520, 296).
TEST(CudaBf16Stream, MatmulsMatchEachProductAlone) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(35);
  const int64_t rows = kBf16StreamMaxRows + 1;
  struct Case {
    std::vector<int64_t> widths;
    int64_t k;
  };
  const Case cases[] = {{{600, 200}, 520}, {{384, 96, 96}, 296}, {{300, 200}, 520}, {{96, 96 * 12}, 296}};
  for (const Case& c : cases) {
    std::vector<DeviceArray<uint8_t>> stored;
    std::vector<DeviceMatrix> weights;
    for (int64_t n : c.widths) {
      stored.emplace_back(random_weight(DType::kBF16, n, c.k, rng).bytes);
      weights.push_back(DeviceMatrix{stored.back().get(), DType::kBF16, n, c.k});
    }
    const DeviceArray<float> dx(random_floats(size_t(rows * c.k), 1.0f, rng));
    for (GemmOperands operands : {GemmOperands::kBf16, GemmOperands::kFp32}) {
      DeviceScratch scratch(nullptr);
      for (int sms : {1, 7, 132}) {
        for (const size_t budget : {cuda::kDefaultPartialBytes, test::partial_bytes(1, c.widths[0], c.k)}) {
          Device device = test::device_with_sms(sms, budget);
          for (int64_t m : {int64_t(1), int64_t(3), int64_t(12), rows}) {
            if (sms != 7 && m != 3) continue;  // the grids with one row count
            const std::string what = fmt::format("widths {} k {}, {} rows, {} CTAs, budget {}, {}",
                                                 fmt::join(c.widths, "/"), c.k, m, sms, budget, operands_name(operands));
            test::expect_matmuls_bits(dx.get(), c.k, m, weights, operands, scratch, device, what);
          }
        }
      }
    }
  }
}

// grouped_matmul(s) through the streamed kernels: each group's rows bit-identical to the tiled
// kernel's on them (matmul of all 70 rows by the group's weights), with empty groups, groups of
// 1 to 20 rows, a bound on the rows per group that splits groups into tiles (1, 3), is tight, or
// is every row of a call of 60 rows (tiles of 16), 70 groups (two launches), and two products in
// one launch, or one after the other when the device's budget holds only one product's chunk
// partials. Rows outside the groups keep what they held.
TEST(CudaBf16Stream, GroupedMatchesTheTiledKernel) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(34);
  const int64_t rows = 70, call_rows = 60, n = 200, k = 520, ldo = n + 3;
  const float kUntouched = -7.25f;
  // 7 CTAs (the plain test covers 1 to 132): the emulator runs every CTA of a grouped launch.
  Device device = test::device_with_sms(7);
  for (const std::vector<int64_t>& counts : test::streamed_group_counts()) {
    const int64_t groups = int64_t(counts.size()), lead = 1;
    std::vector<int64_t> offsets = {lead};
    for (int64_t c : counts) offsets.push_back(offsets.back() + c);
    const int64_t most = *std::max_element(counts.begin(), counts.end());
    std::vector<DeviceArray<uint8_t>> stored;
    std::vector<DeviceMatrix> w[2];
    for (int product = 0; product < 2; ++product)
      for (int64_t g = 0; g < groups; ++g) {
        stored.emplace_back(random_weight(DType::kBF16, n, k, rng).bytes);
        w[product].push_back(DeviceMatrix{stored.back().get(), DType::kBF16, n, k});
      }
    const DeviceArray<float> dx(random_floats(size_t(rows * k), 1.0f, rng));
    const DeviceArray<int64_t> doffsets(offsets);
    for (GemmOperands operands : {GemmOperands::kBf16, GemmOperands::kFp32}) {
      DeviceScratch scratch(nullptr);
      // Each group's rows from the tiled kernel, the rest untouched.
      std::vector<float> want[2];
      for (int product = 0; product < 2; ++product) {
        want[product].assign(size_t(rows * ldo), kUntouched);
        DeviceArray<float> all(size_t(rows * ldo));
        for (int64_t g = 0; g < groups; ++g) {
          if (counts[size_t(g)] == 0) continue;
          matmul(dx.get(), k, rows, w[product][size_t(g)], all.get(), ldo, operands, scratch, test::test_device(), nullptr);
          const std::vector<float> got = all.download();
          for (int64_t r = offsets[size_t(g)]; r < offsets[size_t(g) + 1]; ++r)
            std::copy_n(got.begin() + r * ldo, n, want[product].begin() + r * ldo);
        }
        want[product].resize(size_t(call_rows * ldo));
      }
      const int parts = operands == GemmOperands::kBf16 ? 1 : 3;
      std::vector<int64_t> tiles_tried;  // bounds past 16 rows give tiles of 16: try each tile height once
      for (int64_t bound : {int64_t(1), int64_t(3), most, call_rows}) {
        if (bound == 1 && offsets.back() - lead > 12) continue;  // a tile per row: slow on the emulator
        if (std::ranges::count(tiles_tried, std::min(bound, kBf16StreamMaxRows)) > 0 && bound != call_rows) continue;
        tiles_tried.push_back(std::min(bound, kBf16StreamMaxRows));
        const std::string what = fmt::format("{} groups, bound {}, {}", groups, bound, operands_name(operands));
        ASSERT_TRUE(bf16_streams(std::min(bound, kBf16StreamMaxRows), dx.get(), k, w[0], parts, device)) << what;
        test::expect_grouped_bits(dx.get(), k, doffsets.get(), w, call_rows, bound, ldo, kUntouched, operands, scratch,
                                  device, want, what);
      }
      // A budget for one product's chunk partials but not two: the products stream one at a time,
      // sharing one set of partials and counters.
      Device one_at_a_time = test::device_with_sms(7, test::partial_bytes(call_rows, n, k));
      test::expect_grouped_bits(dx.get(), k, doffsets.get(), w, call_rows, call_rows, ldo, kUntouched, operands,
                                scratch, one_at_a_time, want,
                                fmt::format("{} groups, one product at a time, {}", groups, operands_name(operands)));
    }
  }
}

// grouped_matmuls_of_rows (a MoE's gate and up products of its tokens in expert order) against
// the rows gathered first, bit for bit: tokens taken twice and not at all, empty groups, bounds
// that stream in tiles of 3 and of 16 (reading x's rows in place) and a call of 70 rows under a
// loose bound (gathered, then the skinny kernels), in both operand modes.
TEST(CudaBf16Stream, GroupedRowsReadInPlaceMatchGathered) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(36);
  const int64_t n = 150, k = 264, tokens = 40, ldo = n + 1;
  std::vector<DeviceArray<uint8_t>> stored;
  std::vector<DeviceMatrix> w[2];
  const std::vector<int64_t> counts = {3, 0, 7, 10, 10, 0, 40};
  for (int product = 0; product < 2; ++product)
    for (size_t g = 0; g < counts.size(); ++g) {
      stored.emplace_back(random_weight(DType::kBF16, n, k, rng).bytes);
      w[product].push_back(DeviceMatrix{stored.back().get(), DType::kBF16, n, k});
    }
  const std::vector<float> x = random_floats(size_t(tokens * k), 1.0f, rng);
  for (const auto& [call_rows, bound] : {std::pair<int64_t, int64_t>{30, 3}, {30, 30}, {70, 70}}) {
    std::vector<int64_t> offsets = {0};
    for (int64_t c : counts) offsets.push_back(std::min(call_rows, offsets.back() + c));
    const DeviceArray<int64_t> doffsets(offsets);
    std::vector<int64_t> x_rows(static_cast<size_t>(call_rows));
    for (int64_t& r : x_rows) r = int64_t(rng() % uint64_t(tokens - 5));  // the last 5 tokens never taken
    for (GemmOperands operands : {GemmOperands::kBf16, GemmOperands::kFp32}) {
      DeviceScratch scratch(nullptr);
      Device device = test::device_with_sms(7);
      test::expect_rows_read_in_place(x, k, x_rows, doffsets.get(), w, bound, ldo, -7.25f, operands, scratch, device,
                                      fmt::format("{} rows, bound {}, {}", call_rows, bound, operands_name(operands)));
    }
  }
}

// A call whose skinny chunk partials would pass the device's budget for them (by default 64 MB:
// the LM head at batch 32 would take 615 MB) takes the kernels without partials instead: the
// scratch stays under the budget, and its rows are bit-identical to the same rows computed alone
// (skinny). Under the default budget the same call makes its partials (the budget is what
// decides). BF16 weights with both operand modes, and F32 weights.
TEST(CudaMatmulLarge, LargePartialsTakeTheTiledKernelWithTheSameBits) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(44);
  const int64_t n = 1000, k = 600, rows = 32;  // 3 chunks: 384,000 bytes of partials at 32 rows
  const size_t partials = test::partial_bytes(rows, n, k);
  Device tight = test::device_with_sms(test::test_device().limits().sms, partials - 1);
  const std::vector<float> x = random_floats(size_t(rows * k), 1.0f, rng);
  const DeviceArray<float> dx(x);
  DeviceArray<float> all(static_cast<size_t>(rows * n)), alone(static_cast<size_t>(n));
  for (const auto& [dtype, operands] : {std::pair{DType::kBF16, GemmOperands::kFp32},
                                        {DType::kBF16, GemmOperands::kBf16}, {DType::kF32, GemmOperands::kFp32}}) {
    const std::string what = fmt::format("{} {}", dtype_name(dtype), operands_name(operands));
    const RandomWeight rw = random_weight(dtype, n, k, rng);
    const DeviceArray<uint8_t> dw(rw.bytes);
    const DeviceMatrix w{dw.get(), dtype, n, k};
    DeviceScratch scratch(nullptr), roomy(nullptr);
    matmul(dx.get(), k, rows, w, all.get(), n, operands, scratch, tight, nullptr);
    // At most the bf16 terms of x (115,200 bytes) and the growth margin: no chunk partials.
    EXPECT_LT(scratch.capacity(), partials) << what;
    const std::vector<float> all_rows = all.download();
    for (int64_t r : {0, 13, 31}) {
      matmul(dx.get() + r * k, k, 1, w, alone.get(), n, operands, scratch, tight, nullptr);
      const std::vector<float> got = alone.download();
      EXPECT_EQ(std::memcmp(got.data(), all_rows.data() + r * n, size_t(n) * sizeof(float)), 0)
          << "row " << r << " " << what;
    }
    matmul(dx.get(), k, rows, w, all.get(), n, operands, roomy, test::test_device(), nullptr);
    EXPECT_GE(roomy.capacity(), partials) << what << ": the default budget holds these partials";
    const std::vector<float> skinny_rows = all.download();
    EXPECT_EQ(std::memcmp(skinny_rows.data(), all_rows.data(), all_rows.size() * sizeof(float)), 0) << what;
  }
}

// The warpgroup tiles (wgmma, Hopper) against the mma.sync tiles, bit for bit, plain and grouped,
// in both operand modes (one term of x and three), on shapes that cut the tiles, the chunks and
// the 16-input steps anywhere (k = 7 and 100: weight rows not in 16-byte units; k = 1000: four
// chunks, the last short), and against the double reference. Skipped where the GPU or the build
// has no warpgroup products; the emulator has them.
TEST(CudaMatmulWarpgroup, MatchesTheMmaTilesBitForBit) {
  M1_REQUIRE_CUDA();
  if (!warpgroup_mma_available(test::test_device().index())) GTEST_SKIP() << "no sm_90a warpgroup products here";
  std::mt19937 rng(std::random_device{}());
  Device mma = test::test_device().with_warpgroup_mma(false);
  Device warpgroup = test::test_device().with_warpgroup_mma(true);
  DeviceScratch scratch(nullptr);
  struct Shape { int64_t m, n, k; };
  for (const Shape& s : {Shape{70, 130, 1000}, Shape{129, 257, 520}, Shape{200, 64, 100}, Shape{65, 200, 7},
                         Shape{33, 1, 256}}) {
    const RandomWeight w = random_weight(DType::kBF16, s.n, s.k, rng);
    const DeviceArray<uint8_t> dw(w.bytes);
    const DeviceMatrix dm{dw.get(), DType::kBF16, s.n, s.k};
    const std::vector<float> x = random_floats(size_t(s.m * s.k), 1.0f, rng);
    const DeviceArray<float> dx(x);
    const int64_t ldo = s.n + 3;
    for (GemmOperands operands : {GemmOperands::kBf16, GemmOperands::kFp32}) {
      const std::string what = fmt::format("m {} n {} k {} {}", s.m, s.n, s.k, operands_name(operands));
      DeviceArray<float> want(std::vector<float>(size_t(s.m * ldo), -3.5f)), got(std::vector<float>(size_t(s.m * ldo), -3.5f));
      matmul(dx.get(), s.k, s.m, dm, want.get(), ldo, operands, scratch, mma, nullptr);
      matmul(dx.get(), s.k, s.m, dm, got.get(), ldo, operands, scratch, warpgroup, nullptr);
      const std::vector<float> a = want.download(), b = got.download();
      ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what;
      std::vector<float> packed(size_t(s.m * s.n));
      for (int64_t r = 0; r < s.m; ++r) std::copy_n(b.begin() + r * ldo, s.n, packed.begin() + r * s.n);
      EXPECT_LT(relative_error(packed, reference_matmul(x, s.m, w, operands)), bound(operands, DType::kBF16)) << what;
    }
  }
  // Grouped: groups of more than 32 rows (the 128-row tiles), an empty one, one of a single row.
  const int64_t n = 150, k = 300, ldo = n + 1;
  const std::vector<int64_t> offsets = {2, 45, 45, 180, 181, 260};
  const int64_t rows = offsets.back() + 3;
  std::vector<DeviceArray<uint8_t>> stored;
  std::vector<DeviceMatrix> w;
  for (size_t g = 0; g + 1 < offsets.size(); ++g) {
    stored.emplace_back(random_weight(DType::kBF16, n, k, rng).bytes);
    w.push_back(DeviceMatrix{stored.back().get(), DType::kBF16, n, k});
  }
  const DeviceArray<float> dx(random_floats(size_t(rows * k), 1.0f, rng));
  const DeviceArray<int64_t> doffsets(offsets);
  for (GemmOperands operands : {GemmOperands::kBf16, GemmOperands::kFp32}) {
    DeviceArray<float> want(std::vector<float>(size_t(rows * ldo), -3.5f)), got(std::vector<float>(size_t(rows * ldo), -3.5f));
    grouped_matmul(dx.get(), k, doffsets.get(), w, rows, 135, want.get(), ldo, operands, scratch, mma, nullptr);
    grouped_matmul(dx.get(), k, doffsets.get(), w, rows, 135, got.get(), ldo, operands, scratch, warpgroup, nullptr);
    const std::vector<float> a = want.download(), b = got.download();
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "grouped " << operands_name(operands);
  }
}

// carve_scratch takes every piece from one buffer: in order, each 256-byte aligned (so vector
// loads of any piece are), none overlapping, all inside the scratch; an empty piece is nullptr.
TEST(CudaScratch, CarvesAlignedPiecesInOrder) {
  M1_REQUIRE_CUDA();
  struct Pieces {
    float* three;
    int64_t* hundred;
    uint16_t* none;
    char* one;
  };
  DeviceScratch scratch(nullptr);
  const Pieces p = carve_scratch(scratch, [](ScratchCarver& carver) {
    Pieces pieces;
    pieces.three = carver.take<float>(3);
    pieces.hundred = carver.take<int64_t>(100);
    pieces.none = carver.take<uint16_t>(0);
    pieces.one = carver.take<char>(1);
    return pieces;
  });
  const char* base = static_cast<const char*>(scratch.get(0));  // what it holds, without growing
  EXPECT_EQ(reinterpret_cast<const char*>(p.three) - base, 0);
  EXPECT_EQ(reinterpret_cast<const char*>(p.hundred) - base, 256);  // after 12 bytes, rounded up
  EXPECT_EQ(p.none, nullptr);
  EXPECT_EQ(p.one - base, 256 + 1024);  // after 800 bytes, rounded up
  EXPECT_GE(scratch.capacity(), size_t(256 + 1024 + 1));
}

INSTANTIATE_TEST_SUITE_P(DtypesAndOperands, CudaMatmul,
                         ::testing::Combine(::testing::Values(DType::kBF16, DType::kF16, DType::kF32),
                                            ::testing::Values(GemmOperands::kFp32, GemmOperands::kBf16)),
                         [](const auto& info) {
                           return std::string(dtype_name(std::get<0>(info.param))) + "_" +
                                  operands_name(std::get<1>(info.param));
                         });

// ---------------------------------------------------------------------------------------------
// Elementwise steps against the CPU row kernels. They compute the same formulas in fp32; the
// GPU's expf and its tree-ordered sum of squares differ by a few ulp, so 1e-6 bounds them.

constexpr double kElementwiseBound = 1e-6;

// Inputs with a wide spread (and some far in the tails) so the sigmoid's both branches and its
// saturation are exercised.
std::vector<float> spread_floats(size_t n, std::mt19937& rng) {
  std::vector<float> v = random_floats(n, 3.0f, rng);
  for (size_t i = 0; i < n; i += 97) v[i] = (i % 2 ? 1.0f : -1.0f) * 40.0f;
  return v;
}

TEST(CudaElementwise, EmbedAndGatherCopyExactly) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(5);
  for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
    const int64_t vocab = 50, cols = 37;
    const RandomWeight table = random_weight(dtype, vocab, cols, rng);
    const std::vector<int32_t> tokens = {3, 0, 49, 3, 17};
    DeviceArray<uint8_t> dtable(table.bytes);
    DeviceArray<int32_t> dtokens(tokens);
    DeviceArray<float> out(std::vector<float>(tokens.size() * cols));
    // The table as a rank's rows [first, first + vocab) of a larger vocabulary: others give zeros.
    for (int64_t first : {0, 3}) {
      embed(DeviceMatrix{dtable.get(), dtype, vocab, cols}, first, dtokens.get(), int64_t(tokens.size()), out.get(),
            nullptr);
      const std::vector<float> got = out.download();
      for (size_t i = 0; i < tokens.size(); ++i) {
        const int64_t row = tokens[i] - first;
        for (int64_t c = 0; c < cols; ++c)
          ASSERT_EQ(got[i * cols + c], row < 0 ? 0.0f : load_as_f32(table.bytes.data(), dtype, size_t(row * cols + c)))
              << dtype_name(dtype) << " first " << first;
      }
    }
  }
  const int64_t rows = 9, cols = 1001;
  const std::vector<float> x = random_floats(size_t(rows * cols), 1.0f, rng);
  const std::vector<int64_t> picks = {8, 0, 4, 4};
  DeviceArray<float> dx(x), out(std::vector<float>(picks.size() * cols));
  DeviceArray<int64_t> dpicks(picks);
  gather_rows(dx.get(), cols, dpicks.get(), int64_t(picks.size()), out.get(), nullptr);
  const std::vector<float> got = out.download();
  for (size_t i = 0; i < picks.size(); ++i)
    EXPECT_EQ(std::memcmp(got.data() + i * cols, x.data() + picks[i] * cols, cols * sizeof(float)), 0) << i;
}

// Plain and gated (the lightning output: the norm times sigmoid(gate)), out of place and in place.
TEST(CudaElementwise, RmsnormMatchesCpu) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(6);
  for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32})
    for (int64_t cols : {1, 7, 255, 1000, 6144})
      for (bool gated : {false, true}) {
        const int64_t rows = 5;
        const std::vector<float> x = random_floats(size_t(rows * cols), 2.0f, rng);
        const std::vector<float> gate = spread_floats(x.size(), rng);
        RandomWeight w = random_weight(dtype, 1, cols, rng);
        std::vector<float> want(x.size());
        for (int64_t r = 0; r < rows; ++r) {
          cpu::rmsnorm_row(x.data() + r * cols, w.bytes.data(), dtype, 1e-5f, want.data() + r * cols, cols);
          if (gated) cpu::sigmoid_gate(gate.data() + r * cols, want.data() + r * cols, cols);
        }
        DeviceArray<uint8_t> dw(w.bytes);
        DeviceArray<float> dx(x), dgate(gate), out(std::vector<float>(x.size()));
        const DeviceMatrix weight{dw.get(), dtype, 1, cols};
        const float* g = gated ? dgate.get() : nullptr;
        const std::string what = fmt::format("{} cols {}{}", dtype_name(dtype), cols, gated ? " gated" : "");
        rmsnorm(dx.get(), rows, cols, weight, 1e-5f, g, out.get(), nullptr);
        EXPECT_LT(relative_error(out.download(), want), kElementwiseBound) << what;
        rmsnorm(dx.get(), rows, cols, weight, 1e-5f, g, dx.get(), nullptr);  // in place
        EXPECT_LT(relative_error(dx.download(), want), kElementwiseBound) << what << " in place";
      }
}

// grouped_matmul_swiglu (the MoE's down products) gives the bits of swiglu then grouped_matmul:
// streamed with SwiGLU applied as the rows are staged (BF16, bounds of 1 and 8 rows, and every row
// of a 40-row call in tiles of 16), and the fallback (F32 weights; 100 rows under a loose bound).
TEST(CudaBf16Stream, GroupedSwigluMatchesSwigluThenTheProduct) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(35);
  const int64_t n = 130, k = 264, ldo = n + 1;
  for (DType dtype : {DType::kBF16, DType::kF32})
    for (const auto& [counts, bound] : {std::pair<std::vector<int64_t>, int64_t>{{3, 0, 5}, 1},
                                        {{3, 0, 5}, 8},
                                        {{12, 1, 20, 0, 6}, 40},
                                        {{60, 39}, 100}}) {
      std::vector<int64_t> offsets = {0};
      for (int64_t c : counts) offsets.push_back(offsets.back() + c);
      const int64_t rows = std::max<int64_t>(offsets.back(), bound);
      std::vector<DeviceArray<uint8_t>> stored;
      std::vector<DeviceMatrix> w;
      for (size_t g = 0; g < counts.size(); ++g) {
        stored.emplace_back(random_weight(dtype, n, k, rng).bytes);
        w.push_back(DeviceMatrix{stored.back().get(), dtype, n, k});
      }
      const std::vector<float> gate = random_floats(size_t(rows * k), 3.0f, rng), up = random_floats(size_t(rows * k), 1.0f, rng);
      const DeviceArray<int64_t> doffsets(offsets);
      for (GemmOperands operands : {GemmOperands::kBf16, GemmOperands::kFp32}) {
        DeviceScratch scratch(nullptr);
        const bool fused = dtype == DType::kBF16 && (bound <= 8 || rows <= 64);
        test::expect_swiglu_product_bits(gate, up, k, doffsets.get(), w, rows, bound, ldo, -7.25f, operands, scratch,
                                         test::test_device(), fused,
                                         fmt::format("{} {} rows bound {} {}", dtype_name(dtype), rows, bound,
                                                     operands_name(operands)));
      }
    }
}

// A residual add and the norm after it in one launch give the bits of add_scaled then rmsnorm, with
// out apart from both inputs, out aliasing a (pre-norm layers: x = alpha x + beta y), and normed
// aliasing a (post-norm layers: x = alpha xn + beta y, then xn = norm(x)); rows off the block
// width, more rows than CTAs in a row, and columns below one per thread.
TEST(CudaElementwise, AddScaledRmsnormMatchesTheTwoSteps) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(8);
  enum class Alias { kNone, kOutIsA, kNormedIsA };
  for (DType dtype : {DType::kBF16, DType::kF32})
    for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{1, 7}, {5, 320}, {3, 1000}, {70, 257}})
      for (Alias alias : {Alias::kNone, Alias::kOutIsA, Alias::kNormedIsA}) {
        const std::vector<float> a = random_floats(size_t(rows * cols), 2.0f, rng);
        const std::vector<float> b = random_floats(size_t(rows * cols), 2.0f, rng);
        const RandomWeight w = random_weight(dtype, 1, cols, rng);
        const DeviceArray<uint8_t> dw(w.bytes);
        const DeviceMatrix weight{dw.get(), dtype, 1, cols};
        const float alpha = 0.75f, beta = 1.3f;
        const std::string what = fmt::format("{} rows {} cols {} alias {}", dtype_name(dtype), rows, cols, int(alias));
        // The two steps.
        DeviceArray<float> a1(a), b1(b), out1(size_t(rows * cols)), normed1(size_t(rows * cols));
        float* o1 = alias == Alias::kOutIsA ? a1.get() : out1.get();
        float* n1 = alias == Alias::kNormedIsA ? a1.get() : normed1.get();
        add_scaled(a1.get(), alpha, b1.get(), beta, o1, rows * cols, nullptr);
        rmsnorm(o1, rows, cols, weight, 1e-5f, nullptr, n1, nullptr);
        // One launch.
        DeviceArray<float> a2(a), b2(b), out2(size_t(rows * cols)), normed2(size_t(rows * cols));
        float* o2 = alias == Alias::kOutIsA ? a2.get() : out2.get();
        float* n2 = alias == Alias::kNormedIsA ? a2.get() : normed2.get();
        add_scaled_rmsnorm(a2.get(), alpha, b2.get(), beta, o2, rows, cols, weight, 1e-5f, n2, nullptr);
        const std::vector<float> sum1 = (alias == Alias::kOutIsA ? a1 : out1).download();
        const std::vector<float> sum2 = (alias == Alias::kOutIsA ? a2 : out2).download();
        const std::vector<float> norm1 = (alias == Alias::kNormedIsA ? a1 : normed1).download();
        const std::vector<float> norm2 = (alias == Alias::kNormedIsA ? a2 : normed2).download();
        EXPECT_TRUE(std::all_of(norm2.begin(), norm2.end(), [](float v) { return std::isfinite(v); })) << what;
        EXPECT_EQ(std::memcmp(sum1.data(), sum2.data(), sum1.size() * sizeof(float)), 0) << what << ": the sum";
        EXPECT_EQ(std::memcmp(norm1.data(), norm2.data(), norm1.size() * sizeof(float)), 0) << what << ": the norm";
      }
}

// A row split in two column ranges (a rank's heads): each part's sums of squares, added, normalise
// each part as the whole row's norm does.
TEST(CudaElementwise, SplitRmsnormMatchesTheWholeRow) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(7);
  const int64_t rows = 6, cols = 999, left = 500, right = cols - left;
  const std::vector<float> x = random_floats(size_t(rows * cols), 2.0f, rng), gate = spread_floats(x.size(), rng);
  RandomWeight w = random_weight(DType::kBF16, 1, cols, rng);
  std::vector<float> want(x.size()), parts[2], sums(size_t(rows), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    cpu::rmsnorm_row(x.data() + r * cols, w.bytes.data(), DType::kBF16, 1e-6f, want.data() + r * cols, cols);
    cpu::sigmoid_gate(gate.data() + r * cols, want.data() + r * cols, cols);
  }
  DeviceArray<uint8_t> dw(w.bytes);
  for (int half = 0; half < 2; ++half) {
    const int64_t first = half ? left : 0, width = half ? right : left;
    std::vector<float> xs, gs;
    for (int64_t r = 0; r < rows; ++r) {
      xs.insert(xs.end(), x.begin() + r * cols + first, x.begin() + r * cols + first + width);
      gs.insert(gs.end(), gate.begin() + r * cols + first, gate.begin() + r * cols + first + width);
    }
    DeviceArray<float> dx(xs), dsums(std::vector<float>(static_cast<size_t>(rows)));
    row_sum_squares(dx.get(), rows, width, dsums.get(), nullptr);
    const std::vector<float> part_sums = dsums.download();
    for (int64_t r = 0; r < rows; ++r) sums[size_t(r)] += part_sums[size_t(r)];
    parts[half] = xs;
    parts[half].insert(parts[half].end(), gs.begin(), gs.end());
  }
  DeviceArray<float> dsums(sums);
  std::vector<float> got(x.size());
  for (int half = 0; half < 2; ++half) {
    const int64_t first = half ? left : 0, width = half ? right : left;
    DeviceArray<float> dx(std::vector<float>(parts[half].begin(), parts[half].begin() + rows * width));
    DeviceArray<float> dgate(std::vector<float>(parts[half].begin() + rows * width, parts[half].end()));
    const auto* wb = reinterpret_cast<const uint8_t*>(dw.get()) + first * 2;
    rmsnorm_with_sums(dx.get(), rows, width, dsums.get(), cols, DeviceMatrix{wb, DType::kBF16, 1, width}, 1e-6f,
                      dgate.get(), dx.get(), nullptr);
    const std::vector<float> out = dx.download();
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(out.begin() + r * width, width, got.begin() + r * cols + first);
  }
  EXPECT_LT(relative_error(got, want), kElementwiseBound);
}

TEST(CudaElementwise, ActivationsMatchCpu) {
  M1_REQUIRE_CUDA();
  std::mt19937 rng(8);
  for (int64_t n : {1, 33, 100003}) {
    const std::vector<float> a = spread_floats(size_t(n), rng), b = spread_floats(size_t(n), rng);
    {
      std::vector<float> want = a;
      cpu::swiglu(want.data(), b.data(), n);
      DeviceArray<float> dgate(a), dup(b);
      swiglu(dgate.get(), dup.get(), n, nullptr);
      EXPECT_LT(relative_error(dgate.download(), want), kElementwiseBound) << "swiglu " << n;
    }
    {
      std::vector<float> want(static_cast<size_t>(n));
      cpu::add_scaled(a.data(), 3.5f, b.data(), -0.25f, want.data(), n);
      DeviceArray<float> da(a), db(b);
      add_scaled(da.get(), 3.5f, db.get(), -0.25f, da.get(), n, nullptr);  // out aliases a
      EXPECT_LT(relative_error(da.download(), want), kElementwiseBound) << "add_scaled " << n;
    }
  }
  for (int64_t cols : {1, 7, 1000}) {
    const int64_t rows = 6;
    const std::vector<float> x = random_floats(size_t(rows * cols), 1.0f, rng), y = random_floats(size_t(rows * cols), 1.0f, rng);
    const std::vector<float> coef = spread_floats(size_t(rows), rng);
    std::vector<float> want = x;
    for (int64_t r = 0; r < rows; ++r) cpu::blend_sigmoid(want.data() + r * cols, y.data() + r * cols, coef[size_t(r)], cols);
    DeviceArray<float> dx(x), dy(y), dcoef(coef);
    blend_sigmoid(dx.get(), dy.get(), dcoef.get(), rows, cols, nullptr);
    EXPECT_LT(relative_error(dx.download(), want), kElementwiseBound) << "blend_sigmoid cols " << cols;
  }
}

}  // namespace
}  // namespace m1::cuda
