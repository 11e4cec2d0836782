#pragma once
// e^x and the logistic function from basic IEEE arithmetic: the same bits on every machine, and
// loops over them vectorise (std::exp does neither).

#include <bit>
#include <cstdint>

// Also compiled by nvcc for the sampling kernel, which must draw the same weights bit for bit.
#if defined(__CUDACC__)
#define M1_HOST_DEVICE __host__ __device__
#else
#define M1_HOST_DEVICE
#endif

namespace m1 {

// a * b, rounded before whatever is added to it: nvcc would fuse a * b + c into one FMA (one
// rounding, other bits); host compilers in ISO mode do not.
M1_HOST_DEVICE inline float mul_rounded(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// e^x for x <= 0 (-inf included) to within 2 ulp, from basic IEEE arithmetic only: unlike
// std::exp it gives the same bits on every machine, and the compiler vectorises it. The two
// conditions are integer selects; the default floating-point rules forbid vectorising FP ones.
M1_HOST_DEVICE inline float exp_nonpositive(float x) {
  // Below -87 the result would be denormal: flush to 0. For x <= 0 the bits, read as unsigned,
  // grow as x falls, so no floating-point compare is needed.
  constexpr uint32_t kLowestBits = std::bit_cast<uint32_t>(-87.0f);
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const bool underflows = bits > kLowestBits;
  x = std::bit_cast<float>(underflows ? kLowestBits : bits);
  // e^x = 2^n * e^r with n = round(x / ln 2); adding and removing 1.5 * 2^23 rounds to integer.
  const float n = (mul_rounded(x, 1.44269504f) + 12582912.0f) - 12582912.0f;
  const float r = (x - mul_rounded(n, 0.693359375f)) - mul_rounded(n, -2.12194440e-4f);  // ln 2 in two parts: exact
  // Cephes' minimax polynomial for e^r on [-ln 2 / 2, ln 2 / 2].
  float p = 1.9875691500e-4f;
  p = mul_rounded(p, r) + 1.3981999507e-3f;
  p = mul_rounded(p, r) + 8.3334519073e-3f;
  p = mul_rounded(p, r) + 4.1665795894e-2f;
  p = mul_rounded(p, r) + 1.6666665459e-1f;
  p = mul_rounded(p, r) + 5.0000001201e-1f;
  const float e_r = mul_rounded(p * r, r) + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(e_r * two_n) & (underflows ? 0u : ~0u));
}

// 1 / (1 + e^-v), through e^-|v| so the exponential never overflows; the sign picks the form
// with integer selects, which vectorise.
inline float sigmoid(float v) {
  const uint32_t sign = std::bit_cast<uint32_t>(v) & 0x80000000u;
  const float e = exp_nonpositive(std::bit_cast<float>(std::bit_cast<uint32_t>(v) | 0x80000000u));  // e^-|v|
  const float inv = 1.0f / (1.0f + e);
  const float negative = e * inv;  // v < 0: e^v / (1 + e^v)
  return std::bit_cast<float>(sign ? std::bit_cast<uint32_t>(negative) : std::bit_cast<uint32_t>(inv));
}

inline float silu(float v) { return v * sigmoid(v); }

}  // namespace m1
