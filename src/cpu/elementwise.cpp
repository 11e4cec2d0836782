#include "cpu/elementwise.h"

#include <cmath>

#include "cpu/vectorize.h"
#include "fast_exp.h"

namespace m1::cpu {

M1_VECTOR_CLONES void silu_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = silu(x[i]);
}

M1_VECTOR_CLONES void sigmoid_gate(const float* gate, float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= sigmoid(gate[i]);
}

M1_VECTOR_CLONES void swiglu(float* gate, const float* up, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gate[i] = silu(gate[i]) * up[i];
}

M1_VECTOR_CLONES void add_scaled(const float* a, float alpha, const float* b, float beta, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = alpha * a[i] + beta * b[i];
}

M1_VECTOR_CLONES void blend_sigmoid(float* x, const float* y, float coef, int64_t n) {
  const float c = sigmoid(coef);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * (1.0f - c) + y[i] * c;
}

M1_VECTOR_CLONES double sum_squares(const float* x, int64_t n) {
  double squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) squares += double(x[i]) * x[i];
  return squares;
}

M1_VECTOR_CLONES void rmsnorm_row_with(double squares, int64_t width, const float* x, const void* w, DType w_dtype,
                                       float eps, float* out, int64_t n) {
  const float inv = float(1.0 / std::sqrt(squares / double(width) + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = load_as_f32(w, w_dtype, size_t(i)) * (x[i] * inv);
}

void rmsnorm_row(const float* x, const void* w, DType w_dtype, float eps, float* out, int64_t n) {
  rmsnorm_row_with(sum_squares(x, n), n, x, w, w_dtype, eps, out, n);
}

}  // namespace m1::cpu
