// The elementwise steps of elementwise.h. Rows go to CTAs (embedding, gather, RMSNorm); flat
// steps are grid-stride loops. RMSNorm sums its squares in a fixed tree, so a row's result
// depends only on the row.

#include "elementwise.h"


#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "activations.cuh"
#include "cuda_check.h"
#include "launch.h"

namespace m1::cuda {
namespace {

constexpr int kThreads = 256;

// One CTA per row; the grid is capped, so CTAs loop over rows.
int row_grid(int64_t rows) { return grid_for(rows, 1); }

__device__ __forceinline__ float load_weight(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(data)[i];
    case DType::kF16: return __half2float(static_cast<const __half*>(data)[i]);
    case DType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]);
    default: return 0.0f;  // norms and embeddings are float (upload refuses quantized weights)
  }
}


// alpha * a + beta * b, with its roundings spelled out, so that every kernel computing it (alone or
// fused) gives the same bits.
__device__ __forceinline__ float scaled_sum(float alpha, float a, float beta, float b) {
  return __fmaf_rn(alpha, a, __fmul_rn(beta, b));
}

// fn(i) for i in [0, n), spread over the whole grid.
template <class Fn>
__device__ __forceinline__ void for_each_index(int64_t n, Fn fn) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) fn(i);
}

__global__ void embed_rows(const void* table, DType dtype, int64_t table_rows, int64_t cols, int64_t first_token,
                           const int32_t* tokens, int64_t n, float* out) {
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const int64_t id = int64_t(tokens[row]) - first_token;
    const bool held = id >= 0 && id < table_rows;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
      out[row * cols + c] = held ? load_weight(table, dtype, id * cols + c) : 0.0f;
  }
}

__global__ void gather(const float* x, int64_t cols, const int64_t* rows, int64_t n, float* out) {
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float* src = x + rows[row] * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[row * cols + c] = src[c];
  }
}

// The sum of the squares of row xr, the same in every thread of the block: each thread sums its
// strided elements in order; warps then combine by a fixed butterfly, and warp 0 combines the
// warp sums the same way. `total` and `warp_sums` are the block's shared memory.
__device__ __forceinline__ float block_sum_squares(const float* xr, int64_t cols, float* warp_sums, float& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float squares = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) squares = fmaf(xr[c], xr[c], squares);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
  if (lane == 0) warp_sums[warp] = squares;
  __syncthreads();
  if (warp == 0) {
    float sum = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) total = sum;
  }
  __syncthreads();
  return total;
}

__global__ __launch_bounds__(kThreads) void sum_squares_rows(const float* x, int64_t rows, int64_t cols, float* sums) {
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float total;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float sum = block_sum_squares(x + row * cols, cols, warp_sums, total);
    if (threadIdx.x == 0) sums[row] = sum;
    __syncthreads();  // warp_sums and total are reused by the next row
  }
}

// One row of RMSNorm from its sum of squares over `width` columns (x holds `cols` of them), times
// sigmoid(gate) when given; each thread its strided columns.
__device__ __forceinline__ void norm_row(const float* xr, int64_t cols, float squares, int64_t width, const void* w,
                                         DType w_dtype, float eps, const float* grow, float* orow) {
  const float inv = 1.0f / sqrtf(squares / float(width) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    const float normed = load_weight(w, w_dtype, c) * (xr[c] * inv);
    orow[c] = grow ? normed * sigmoid(grow[c]) : normed;
  }
}

// Without `sums`, each row's own squares over `cols` (= width); with them, the given sums over
// `width` columns of which x holds `cols`.
__global__ __launch_bounds__(kThreads) void rmsnorm_rows(const float* x, int64_t rows, int64_t cols, const float* sums,
                                                         int64_t width, const void* w, DType w_dtype, float eps,
                                                         const float* gate, float* out) {
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float total;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* xr = x + row * cols;
    const float squares = sums ? sums[row] : block_sum_squares(xr, cols, warp_sums, total);
    norm_row(xr, cols, squares, width, w, w_dtype, eps, gate ? gate + row * cols : nullptr, out + row * cols);
    __syncthreads();  // warp_sums and total are reused by the next row
  }
}

// add_scaled_kernel's values into out, row by row, then rmsnorm_rows' norm of them into normed:
// each thread writes, sums and normalises the same columns of the row, so it reads back only
// what it wrote, and a column of `a` (which normed may alias) before that column of normed.
__global__ __launch_bounds__(kThreads) void add_scaled_rmsnorm_rows(const float* a, float alpha, const float* b,
                                                                    float beta, float* out, int64_t rows,
                                                                    int64_t cols, const void* w, DType w_dtype,
                                                                    float eps, float* normed) {
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float total;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float* orow = out + row * cols;
    for (int64_t c = threadIdx.x; c < cols; c += kThreads)
      orow[c] = scaled_sum(alpha, a[row * cols + c], beta, b[row * cols + c]);
    const float squares = block_sum_squares(orow, cols, warp_sums, total);
    norm_row(orow, cols, squares, cols, w, w_dtype, eps, nullptr, normed + row * cols);
    __syncthreads();  // warp_sums and total are reused by the next row
  }
}

__global__ void swiglu_kernel(float* gate, const float* up, int64_t n) {
  for_each_index(n, [&](int64_t i) { gate[i] = swiglu_value(gate[i], up[i]); });
}

__global__ void add_scaled_kernel(const float* a, float alpha, const float* b, float beta, float* out, int64_t n) {
  for_each_index(n, [&](int64_t i) { out[i] = scaled_sum(alpha, a[i], beta, b[i]); });
}

__global__ void blend_sigmoid_kernel(float* x, const float* y, const float* coef, int64_t rows, int64_t cols) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float c = sigmoid(coef[row]);
    for (int64_t i = row * cols + threadIdx.x; i < (row + 1) * cols; i += blockDim.x) x[i] = x[i] * (1.0f - c) + y[i] * c;
  }
}

}  // namespace

void embed(const DeviceMatrix& table, int64_t first_token, const int32_t* tokens, int64_t n, float* out,
           cudaStream_t stream) {
  if (n == 0) return;
  embed_rows<<<row_grid(n), kThreads, 0, stream>>>(table.data, table.dtype, table.rows, table.cols, first_token, tokens,
                                                   n, out);
  M1_CUDA_CHECK_LAUNCH();
}

void gather_rows(const float* x, int64_t cols, const int64_t* rows, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return;
  gather<<<row_grid(n), kThreads, 0, stream>>>(x, cols, rows, n, out);
  M1_CUDA_CHECK_LAUNCH();
}

void rmsnorm(const float* x, int64_t rows, int64_t cols, const DeviceMatrix& w, float eps, const float* gate, float* out,
             cudaStream_t stream) {
  if (rows == 0) return;
  rmsnorm_rows<<<row_grid(rows), kThreads, 0, stream>>>(x, rows, cols, nullptr, cols, w.data, w.dtype, eps, gate, out);
  M1_CUDA_CHECK_LAUNCH();
}

void row_sum_squares(const float* x, int64_t rows, int64_t cols, float* sums, cudaStream_t stream) {
  if (rows == 0) return;
  sum_squares_rows<<<row_grid(rows), kThreads, 0, stream>>>(x, rows, cols, sums);
  M1_CUDA_CHECK_LAUNCH();
}

void rmsnorm_with_sums(const float* x, int64_t rows, int64_t cols, const float* sums, int64_t width,
                       const DeviceMatrix& w, float eps, const float* gate, float* out, cudaStream_t stream) {
  if (rows == 0) return;
  rmsnorm_rows<<<row_grid(rows), kThreads, 0, stream>>>(x, rows, cols, sums, width, w.data, w.dtype, eps, gate, out);
  M1_CUDA_CHECK_LAUNCH();
}

void swiglu(float* gate, const float* up, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  swiglu_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(gate, up, n);
  M1_CUDA_CHECK_LAUNCH();
}

void add_scaled(const float* a, float alpha, const float* b, float beta, float* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  add_scaled_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(a, alpha, b, beta, out, n);
  M1_CUDA_CHECK_LAUNCH();
}

void add_scaled_rmsnorm(const float* a, float alpha, const float* b, float beta, float* out, int64_t rows,
                        int64_t cols, const DeviceMatrix& w, float eps, float* normed, cudaStream_t stream) {
  if (rows == 0) return;
  add_scaled_rmsnorm_rows<<<row_grid(rows), kThreads, 0, stream>>>(a, alpha, b, beta, out, rows, cols, w.data, w.dtype,
                                                                   eps, normed);
  M1_CUDA_CHECK_LAUNCH();
}

void blend_sigmoid(float* x, const float* y, const float* coef, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return;
  blend_sigmoid_kernel<<<row_grid(rows), kThreads, 0, stream>>>(x, y, coef, rows, cols);
  M1_CUDA_CHECK_LAUNCH();
}

}  // namespace m1::cuda
