// The emulator's own arithmetic, against definitions written here: the tensor cores' rounding of
// a sum toward zero, mma.m16n8k16's fragment layouts as the PTX manual draws them (which lane
// holds which elements of A, B, C and D), and wgmma.m64n128k16's: its accumulators' layout, A
// from shared memory or from registers, and its shared-memory descriptors (K-major and N-major, in
// the 128-byte swizzle and as unswizzled core matrices). The kernel tests rely on all of it
// without seeing it.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "shim.h"

#include "device_array.h"

namespace {

// Toward zero: the float nearest to the sum, one step back toward zero where it lies beyond it.
float toward_zero(double sum) {
  const float nearest = float(sum);
  return std::fabs(double(nearest)) > std::fabs(sum) ? std::nextafter(nearest, 0.0f) : nearest;
}

bool same_float(float a, float b) {
  return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b) || (std::isnan(a) && std::isnan(b));
}

// Two warpgroups' accumulators, thread th (warpgroup q, warp w, lane 4g + t) holding d[4i + e] =
// (64q + 16w + g + 8(e / 2), 8i + 2t + e % 2) of a [128][128] matrix.
template <class At>
void for_each_accumulator(At at) {
  for (int th = 0; th < 256; ++th) {
    const int q = th / 128, w = (th % 128) / 32, g = (th % 32) / 4, t = th % 4;
    for (int i = 0; i < 16; ++i)
      for (int e = 0; e < 4; ++e) at(size_t(th) * 64 + 4 * i + e, 64 * q + 16 * w + g + 8 * (e / 2), 8 * i + 2 * t + e % 2);
  }
}
// C [128][128] in the accumulators' order.
std::vector<float> accumulators_of(const std::vector<float>& c) {
  std::vector<float> accumulators(size_t(256) * 64);
  for_each_accumulator([&](size_t at, int row, int col) { accumulators[at] = c[size_t(row) * 128 + col]; });
  return accumulators;
}
// The device buffer the kernels read C from and write what each thread saw into: C, then room
// for the accumulators after the wait.
std::vector<float> with_room_after(std::vector<float> accumulators) {
  accumulators.resize(2 * accumulators.size(), 0.0f);
  return accumulators;
}
// What each thread saw before the wait (seen[0, 16384): still C, in `accumulators`) and after it
// (seen[16384, 32768)), against want(row, col).
// Inside a 256-thread launch: the shared-memory image `img` placed from the first 1024-byte-aligned
// window address of dynamic shared memory, and that address (every thread copies its share, then
// all meet at a barrier).
uint32_t stage_image(const unsigned char* img, size_t size) {
  const uint32_t window = __cvta_generic_to_shared(emu::shared_mem());
  unsigned char* base = emu::shared_mem() + (1024 - window % 1024) % 1024;
  for (size_t i = threadIdx.x; i < size; i += 256) base[i] = img[i];
  __syncthreads();
  return __cvta_generic_to_shared(base);
}
// The first mismatch is reported, with the count.
template <class Want>
void expect_products_at_the_wait(const std::vector<float>& seen, const std::vector<float>& accumulators, Want want) {
  int early = 0, wrong = 0;
  for_each_accumulator([&](size_t at, int row, int col) {
    if (!same_float(seen[at], accumulators[at]) && early++ == 0)
      ADD_FAILURE() << "D(" << row << ", " << col << ") changed before the wait";
    const float expected = want(row, col);
    if (!same_float(seen[256 * 64 + at], expected) && wrong++ == 0)
      ADD_FAILURE() << "D(" << row << ", " << col << "): " << seen[256 * 64 + at] << " vs " << expected;
  });
  EXPECT_EQ(early, 0) << "accumulators changed before the wait";
  EXPECT_EQ(wrong, 0) << "wrong products";
}

TEST(EmulatorArithmetic, TensorCoreSumsRoundTowardZero) {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  std::vector<double> sums;
  // Every binade a float has (subnormal, normal, past the largest), and doubles of any bits.
  for (int i = 0; i < 200000; ++i) sums.push_back(std::ldexp(unit(rng), int(rng() % 320) - 170));
  for (int i = 0; i < 200000; ++i) sums.push_back(std::bit_cast<double>(rng()));
  for (double edge : {0.0, 0x1p-149, 0x1p-150, 0x1p-127, 0x1p-126, 1.0, 0x1.fffffep127, 0x1.ffffffp127, 0x1p128,
                      double(INFINITY), double(NAN)})
    for (double d : {edge, std::nextafter(edge, 0.0), std::nextafter(edge, double(INFINITY))}) {
      sums.push_back(d);
      sums.push_back(-d);
    }
  for (double sum : sums) ASSERT_TRUE(same_float(emu::tensor_core_round(sum), toward_zero(sum))) << std::hexfloat << sum;
}

uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | uint32_t(hi) << 16; }

// One warp's mma.m16n8k16 (bf16 A 16 x 16 row-major, B 16 x 8, fp32 C and D 16 x 8) against each
// output written out: C plus the 16 exact products in k order, summed in double, rounded toward zero.
TEST(EmulatorArithmetic, MmaFragmentsFollowThePtxLayout) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int trial = 0; trial < 20; ++trial) {
    uint16_t a[16][16], b[16][8];
    float c[16][8];
    // Scales that differ row by row and column by column, so a misplaced element shows.
    for (int i = 0; i < 16; ++i)
      for (int k = 0; k < 16; ++k) a[i][k] = m1::f32_to_bf16(std::ldexp(normal(rng), i - k / 2));
    for (int k = 0; k < 16; ++k)
      for (int j = 0; j < 8; ++j) b[k][j] = m1::f32_to_bf16(std::ldexp(normal(rng), j - k / 4));
    for (auto& row : c)
      for (float& v : row) v = normal(rng);

    // Lane l = 4g + t: a0..a3 hold A's (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
    // b0, b1 hold B's (2t..2t+1, g) and (2t+8..2t+9, g); c and d hold (g, 2t), (g, 2t+1),
    // (g+8, 2t), (g+8, 2t+1).
    std::vector<uint32_t> registers(32 * 6);
    std::vector<float> accumulators(32 * 4);
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      uint32_t* r = &registers[size_t(l) * 6];
      r[0] = pair(a[g][2 * t], a[g][2 * t + 1]);
      r[1] = pair(a[g + 8][2 * t], a[g + 8][2 * t + 1]);
      r[2] = pair(a[g][2 * t + 8], a[g][2 * t + 9]);
      r[3] = pair(a[g + 8][2 * t + 8], a[g + 8][2 * t + 9]);
      r[4] = pair(b[2 * t][g], b[2 * t + 1][g]);
      r[5] = pair(b[2 * t + 8][g], b[2 * t + 9][g]);
      for (int e = 0; e < 4; ++e) accumulators[size_t(l) * 4 + e] = c[g + 8 * (e / 2)][2 * t + e % 2];
    }
    uint32_t* device_registers = nullptr;
    float* device_accumulators = nullptr;
    ASSERT_EQ(cudaMalloc(&device_registers, registers.size() * sizeof(uint32_t)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&device_accumulators, accumulators.size() * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(device_registers, registers.data(), registers.size() * sizeof(uint32_t), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(device_accumulators, accumulators.data(), accumulators.size() * sizeof(float),
                         cudaMemcpyHostToDevice),
              cudaSuccess);
    static const char kernel_id = 0;
    emu::launch(&kernel_id, dim3(1), dim3(32), 0, nullptr,
                [](const uint32_t* r, float* acc) {
                  const unsigned l = emu::lane();
                  const uint32_t fragment_a[4] = {r[l * 6], r[l * 6 + 1], r[l * 6 + 2], r[l * 6 + 3]};
                  float d[4] = {acc[l * 4], acc[l * 4 + 1], acc[l * 4 + 2], acc[l * 4 + 3]};
                  emu::mma_m16n8k16(d, fragment_a, r[l * 6 + 4], r[l * 6 + 5]);
                  for (int e = 0; e < 4; ++e) acc[l * 4 + e] = d[e];
                },
                static_cast<const uint32_t*>(device_registers), device_accumulators);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(accumulators.data(), device_accumulators, accumulators.size() * sizeof(float),
                         cudaMemcpyDeviceToHost),
              cudaSuccess);
    cudaFree(device_registers);
    cudaFree(device_accumulators);

    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const int i = l / 4 + 8 * (e / 2), j = 2 * (l % 4) + e % 2;
        double sum = c[i][j];
        for (int k = 0; k < 16; ++k) sum += double(m1::bf16_to_f32(a[i][k])) * double(m1::bf16_to_f32(b[k][j]));
        ASSERT_TRUE(same_float(accumulators[size_t(l) * 4 + e], toward_zero(sum)))
            << "D(" << i << ", " << j << ") from lane " << l << ": " << accumulators[size_t(l) * 4 + e] << " vs "
            << toward_zero(sum);
      }
  }
}

// The descriptor of a K-major operand, written from the PTX manual's table: start address >> 4
// (bits 0-13), leading byte offset >> 4 (16-29), stride byte offset >> 4 (32-45), base offset 0
// (49-51), swizzle mode (62-63: 0 none, 1 128-byte).
uint64_t descriptor(uint32_t address, uint32_t leading, uint32_t stride, uint64_t swizzle) {
  return uint64_t((address & 0x3ffff) >> 4) | uint64_t(leading >> 4) << 16 | uint64_t(stride >> 4) << 32 | swizzle << 62;
}

// Two warpgroups, each D[64 x 128] = A[64 x 16] B[16 x 128] (+ C), A and B bf16 K-major in shared
// memory, against each output written out as the mma test writes it. A's two 64-row tiles are in
// the 128-byte swizzle (rows of 64 values, 16-byte unit u of row r stored at unit u ^ (r % 8),
// the tile 1024-byte aligned), the columns chosen by the descriptor's start (32 bytes per 16); B is
// unswizzled, 8 x 8 core matrices (8 rows of 16 bytes each) `leading` bytes apart along k and
// `stride` bytes apart down its rows. Each warpgroup issues two products on its accumulators in
// one group (the second accumulating onto the first's result, as the hardware chains them) before
// it waits.
TEST(EmulatorArithmetic, WarpgroupMmaFollowsThePtxLayout) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  constexpr int kB = 128, kK = 64;
  // B's core matrices: 8-row groups 272 bytes apart, k groups past all 16 of them (and a gap)
  constexpr uint32_t kStride = 2 * 128 + 16, kLeading = 16 * kStride + 32;
  for (int trial = 0; trial < 6; ++trial) {
    const int step[2] = {int(rng() % 4), int(rng() % 4)};  // A's 16 columns for the first and second product
    const bool accumulate_c = trial % 2 == 0;
    std::vector<uint16_t> a(size_t(128) * kK), b(size_t(kB) * 32);  // A[128][64] (both warpgroups' rows), B[128][32]
    for (int r = 0; r < 128; ++r)
      for (int k = 0; k < kK; ++k) a[size_t(r) * kK + k] = m1::f32_to_bf16(std::ldexp(normal(rng), r % 16 - k / 8));
    for (int n = 0; n < kB; ++n)
      for (int k = 0; k < 32; ++k) b[size_t(n) * 32 + k] = m1::f32_to_bf16(std::ldexp(normal(rng), n % 8 - k / 8));
    std::vector<float> c(size_t(128) * kB);
    for (float& v : c) v = normal(rng);

    // The shared-memory image, from offset 0 of a 1024-byte-aligned window address: A's tiles
    // (16 KB), then B's core matrices (k groups 0..3 of 8: the second product takes k 16..31).
    std::vector<unsigned char> image(16384 + size_t(kStride) * (kB / 8) + kLeading * 4, 0);
    for (int r = 0; r < 128; ++r)
      for (int u = 0; u < 8; ++u)
        std::memcpy(&image[size_t(r) * 128 + size_t(u ^ (r % 8)) * 16], &a[size_t(r) * kK + u * 8], 16);
    for (int n = 0; n < kB; ++n)
      for (int kg = 0; kg < 4; ++kg)
        std::memcpy(&image[16384 + size_t(n / 8) * kStride + size_t(kg) * kLeading + size_t(n % 8) * 16],
                    &b[size_t(n) * 32 + kg * 8], 16);

    const std::vector<float> accumulators = accumulators_of(c);
    const m1::cuda::DeviceArray<unsigned char> device_image(image);
    const m1::cuda::DeviceArray<float> device_accumulators(with_room_after(accumulators));
    static const char kernel_id = 0;
    emu::launch(&kernel_id, dim3(1), dim3(256), image.size() + 1024, nullptr,
                [step, accumulate_c](const unsigned char* img, size_t size, float* acc) {
                  const unsigned th = threadIdx.x, q = th / 128;
                  const uint32_t at = stage_image(img, size);
                  float d[64];
                  for (int e = 0; e < 64; ++e) d[e] = acc[th * 64 + e];
                  emu::warpgroup_fence();
                  emu::warpgroup_mma(d, 128, descriptor(at + q * 8192 + 32 * step[0], 16, 1024, 1),
                                     descriptor(at + 16384, kLeading, kStride, 0), accumulate_c, 0);
                  emu::warpgroup_mma(d, 128, descriptor(at + q * 8192 + 32 * step[1], 16, 1024, 1),
                                     descriptor(at + 16384 + 2 * kLeading, kLeading, kStride, 0), 1, 0);
                  emu::warpgroup_commit();
                  for (int e = 0; e < 64; ++e) acc[th * 64 + e] = d[e];  // still C: products land at the wait
                  emu::warpgroup_wait(0);
                  for (int e = 0; e < 64; ++e) acc[256 * 64 + th * 64 + e] = d[e];
                },
                static_cast<const unsigned char*>(device_image.get()), image.size(), device_accumulators.get());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> seen = device_accumulators.download();
    expect_products_at_the_wait(seen, accumulators, [&](int row, int col) {
      double first = accumulate_c ? c[size_t(row) * kB + col] : 0.0;
      for (int k = 0; k < 16; ++k)
        first += double(m1::bf16_to_f32(a[size_t(row) * kK + 16 * step[0] + k])) *
                 double(m1::bf16_to_f32(b[size_t(col) * 32 + k]));
      double second = toward_zero(first);
      for (int k = 0; k < 16; ++k)
        second += double(m1::bf16_to_f32(a[size_t(row) * kK + 16 * step[1] + k])) *
                  double(m1::bf16_to_f32(b[size_t(col) * 32 + 16 + k]));
      return toward_zero(second);
    });
  }
}

// The register form: A in registers (each warp's 16 rows as mma.m16n8k16's A fragments), B
// N-major (imm-trans-b 1: B[k][n] with n contiguous), two warpgroups each issuing two chained
// products in one group, against each output written out from the manual's canonical layouts.
// The first product's B is in the 128-byte swizzle: k rows of 64 consecutive n (128 bytes),
// 8-row groups `stride` bytes apart, the two 64-column blocks `leading` bytes apart (a gap of
// 1024 bytes, so swapping the two offsets shows). The second's is unswizzled: core matrices of 8 k
// rows of 8 n, `stride` bytes apart along n and `leading` bytes apart along k (padded).
TEST(EmulatorArithmetic, WarpgroupMmaTakesRegisterAAndNMajorB) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  constexpr int kN = 128, kK = 32;
  constexpr uint32_t kSwizzledLeading = 5120, kSwizzledStride = 1024;  // the first product's k 0..15
  constexpr uint32_t kPlainStride = 144, kPlainLeading = 16 * kPlainStride + 32, kPlain = 2 * kSwizzledLeading;
  for (int trial = 0; trial < 4; ++trial) {
    const bool accumulate_c = trial % 2 == 0;
    std::vector<uint16_t> a(size_t(128) * kK), b(size_t(kK) * kN);  // A[128][32], B[32][128]
    for (int r = 0; r < 128; ++r)
      for (int k = 0; k < kK; ++k) a[size_t(r) * kK + k] = m1::f32_to_bf16(std::ldexp(normal(rng), r % 16 - k / 8));
    for (int k = 0; k < kK; ++k)
      for (int n = 0; n < kN; ++n) b[size_t(k) * kN + n] = m1::f32_to_bf16(std::ldexp(normal(rng), n % 8 - k / 8));
    std::vector<float> c(size_t(128) * kN);
    for (float& v : c) v = normal(rng);

    // The shared-memory image from a 1024-byte-aligned window address: B's k 0..15 swizzled, then
    // its k 16..31 as core matrices.
    std::vector<unsigned char> image(kPlain + 2 * size_t(kPlainLeading), 0);
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < kN; ++n) {
        uint32_t at = (n / 64) * kSwizzledLeading + (k / 8) * kSwizzledStride + (k % 8) * 128 + (n % 64) * 2;
        at ^= ((at >> 7) & 7) << 4;
        std::memcpy(&image[at], &b[size_t(k) * kN + n], 2);
      }
    for (int k = 16; k < kK; ++k)
      for (int n = 0; n < kN; ++n)
        std::memcpy(&image[kPlain + (n / 8) * kPlainStride + ((k - 16) / 8) * kPlainLeading + (k % 8) * 16 + (n % 8) * 2],
                    &b[size_t(k) * kN + n], 2);

    // Thread (warpgroup q, warp w, lane 4g + t): A fragments of rows 64q + 16w + g (+ 8).
    std::vector<uint32_t> fragments(size_t(256) * 8);
    for (int th = 0; th < 256; ++th) {
      const int q = th / 128, w = (th % 128) / 32, g = (th % 32) / 4, t = th % 4, row = 64 * q + 16 * w + g;
      for (int step = 0; step < 2; ++step)
        for (int i = 0; i < 4; ++i) {
          const size_t at = size_t(row + 8 * (i % 2)) * kK + 16 * step + 8 * (i / 2) + 2 * t;
          fragments[size_t(th) * 8 + 4 * step + i] = uint32_t(a[at]) | uint32_t(a[at + 1]) << 16;
        }
    }
    const std::vector<float> accumulators = accumulators_of(c);
    const m1::cuda::DeviceArray<unsigned char> device_image(image);
    const m1::cuda::DeviceArray<uint32_t> device_fragments(fragments);
    const m1::cuda::DeviceArray<float> device_accumulators(with_room_after(accumulators));
    static const char kernel_id = 0;
    emu::launch(&kernel_id, dim3(1), dim3(256), image.size() + 1024, nullptr,
                [accumulate_c](const unsigned char* img, size_t size, const uint32_t* frag, float* acc) {
                  const unsigned th = threadIdx.x;
                  const uint32_t at = stage_image(img, size);
                  float d[64];
                  for (int e = 0; e < 64; ++e) d[e] = acc[th * 64 + e];
                  uint32_t first[4], second[4];
                  for (int i = 0; i < 4; ++i) first[i] = frag[th * 8 + i], second[i] = frag[th * 8 + 4 + i];
                  emu::warpgroup_fence();
                  emu::warpgroup_mma_registers(d, 128, first, descriptor(at, kSwizzledLeading, kSwizzledStride, 1),
                                               accumulate_c, 1);
                  emu::warpgroup_mma_registers(d, 128, second, descriptor(at + kPlain, kPlainLeading, kPlainStride, 0),
                                               1, 1);
                  emu::warpgroup_commit();
                  for (int i = 0; i < 4; ++i) first[i] = second[i] = 0;  // the registers were read at the issue
                  for (int e = 0; e < 64; ++e) acc[th * 64 + e] = d[e];
                  emu::warpgroup_wait(0);
                  for (int e = 0; e < 64; ++e) acc[256 * 64 + th * 64 + e] = d[e];
                },
                static_cast<const unsigned char*>(device_image.get()), image.size(),
                static_cast<const uint32_t*>(device_fragments.get()), device_accumulators.get());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> seen = device_accumulators.download();
    expect_products_at_the_wait(seen, accumulators, [&](int row, int col) {
      double first = accumulate_c ? c[size_t(row) * kN + col] : 0.0;
      for (int k = 0; k < 16; ++k)
        first += double(m1::bf16_to_f32(a[size_t(row) * kK + k])) * double(m1::bf16_to_f32(b[size_t(k) * kN + col]));
      double second = toward_zero(first);
      for (int k = 16; k < kK; ++k)
        second += double(m1::bf16_to_f32(a[size_t(row) * kK + k])) * double(m1::bf16_to_f32(b[size_t(k) * kN + col]));
      return toward_zero(second);
    });
  }
}

}  // namespace
