#pragma once
// Row kernels of the elementwise steps between matrix products, vectorised for the CPU at hand.

#include <cstdint>

#include "m1/dtype.h"

namespace m1::cpu {

void silu_inplace(float* x, int64_t n);
// x *= sigmoid(gate)
void sigmoid_gate(const float* gate, float* x, int64_t n);
// gate = silu(gate) * up
void swiglu(float* gate, const float* up, int64_t n);
// out = alpha * a + beta * b
void add_scaled(const float* a, float alpha, const float* b, float beta, float* out, int64_t n);
// x = x * (1 - c) + y * c with c = sigmoid(coef)
void blend_sigmoid(float* x, const float* y, float coef, int64_t n);
// out = w * x / sqrt(mean(x^2) + eps); the mean square is accumulated in double.
void rmsnorm_row(const float* x, const void* w, DType w_dtype, float eps, float* out, int64_t n);
// The sum of x^2, accumulated in double.
double sum_squares(const float* x, int64_t n);
// rmsnorm_row of n values that are part of a row `width` wide whose squares sum to `squares`.
void rmsnorm_row_with(double squares, int64_t width, const float* x, const void* w, DType w_dtype, float eps, float* out,
                      int64_t n);

}  // namespace m1::cpu
