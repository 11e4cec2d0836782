// The emulator's own arithmetic, against definitions written here: the tensor cores' rounding of
// a sum toward zero, and mma.m16n8k16's fragment layouts as the PTX manual draws them (which
// lane holds which elements of A, B, C and D). The kernel tests rely on both without seeing them.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "shim.h"

namespace {

// Toward zero: the float nearest to the sum, one step back toward zero where it lies beyond it.
float toward_zero(double sum) {
  const float nearest = float(sum);
  return std::fabs(double(nearest)) > std::fabs(sum) ? std::nextafter(nearest, 0.0f) : nearest;
}

bool same_float(float a, float b) {
  return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b) || (std::isnan(a) && std::isnan(b));
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

}  // namespace
