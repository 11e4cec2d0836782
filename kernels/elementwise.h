#pragma once
// Row-wise and elementwise steps between the matrix products, on the GPU. Matrices are fp32,
// row-major and contiguous ([rows, cols]); norms and activations are computed in fp32.

#include <cstdint>

#include <cuda_runtime.h>

#include "device_types.h"

namespace m1::cuda {

// out[i] = table[tokens[i] - first_token] (tokens in device memory), converted to fp32; zeros for
// tokens outside [first_token, first_token + table.rows).
void embed(const DeviceMatrix& table, int64_t first_token, const int32_t* tokens, int64_t n, float* out,
           cudaStream_t stream);
// out[i] = x[rows[i]] (rows in device memory).
void gather_rows(const float* x, int64_t cols, const int64_t* rows, int64_t n, float* out, cudaStream_t stream);
// out = w * x / sqrt(mean(x^2) + eps), per row, times sigmoid(gate) elementwise when `gate` (same
// shape as x) is given; out may alias x.
void rmsnorm(const float* x, int64_t rows, int64_t cols, const DeviceMatrix& w, float eps, const float* gate, float* out,
             cudaStream_t stream);
// sums[r] = the sum of x[r, c]^2 over the row, in the order rmsnorm sums it.
void row_sum_squares(const float* x, int64_t rows, int64_t cols, float* sums, cudaStream_t stream);
// rmsnorm of rows `width` wide of which x holds `cols` columns, their sums of squares given.
void rmsnorm_with_sums(const float* x, int64_t rows, int64_t cols, const float* sums, int64_t width,
                       const DeviceMatrix& w, float eps, const float* gate, float* out, cudaStream_t stream);
// gate = silu(gate) * up
void swiglu(float* gate, const float* up, int64_t n, cudaStream_t stream);
// out = alpha * a + beta * b; out may alias a or b.
void add_scaled(const float* a, float alpha, const float* b, float beta, float* out, int64_t n, cudaStream_t stream);
// add_scaled over rows x cols, then normed = rmsnorm(out, w, eps) (no gate), in one launch with the
// bits of the two: out may alias a or b, normed may alias a, not out.
void add_scaled_rmsnorm(const float* a, float alpha, const float* b, float beta, float* out, int64_t rows,
                        int64_t cols, const DeviceMatrix& w, float eps, float* normed, cudaStream_t stream);
// x[r] = x[r] * (1 - c) + y[r] * c with c = sigmoid(coef[r]), rows of `cols`.
void blend_sigmoid(float* x, const float* y, const float* coef, int64_t rows, int64_t cols, cudaStream_t stream);

}  // namespace m1::cuda
