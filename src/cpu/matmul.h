#pragma once
// Dense matrix products out = x w^T with fp32 activations and weights in their stored dtype (or
// quantized, see quantized_matmul.h), accumulated in fp32. Every output element is summed in the same order whatever the number of
// rows or the tile it falls in, so a row's result never depends on the rows beside it.

#include <span>

#include "cpu/threadpool.h"
#include "m1/backend.h"

namespace m1::cpu {

// kFp32: the stored weights (quantized: code * scale in fp32) times fp32 activations. kBf16:
// activations rounded to bf16 and multiplied with BF16 weights by the AVX-512 BF16 dot product;
// with quantized weights, with their codes (a row of one scale: the scale multiplies the sum) or
// code * scale rounded to bf16 (several groups per row). F32 and F16 weights, and CPUs without
// the instruction, fall back to kFp32.
enum class Operands { kFp32, kBf16 };

void matmul(ThreadPool& pool, const Mat& x, const Weight& w, Mat out, Operands operands = Operands::kFp32);

// Several independent products in one parallel loop (e.g. every expert's gate and up
// projections), so small ones share the threads instead of running one after another.
struct MatmulJob {
  Mat x;
  Weight w;
  Mat out;
};
void matmul_batch(ThreadPool& pool, std::span<const MatmulJob> jobs, Operands operands);

// Single-threaded fp32 products, the building blocks of kernels that do their own threading
// (attention). In both, a row's result does not depend on the other rows.
// out (m x n, row stride ldo) = x (m x k, stride ldx) times w (n x k, stride ldw)^T: dot products,
// best when m is small.
void gemm_nt(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t m, int64_t n, int64_t k, float* out,
             int64_t ldo);
// The same with w in bf16 (raw bits), widened exactly as it is read: the bits gemm_nt gives on
// the widened values.
void gemm_nt(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t m, int64_t n, int64_t k, float* out,
             int64_t ldo);
// The same with bf16 x and w (AVX-512 BF16 only): the tiles bf16 operands use.
void gemm_nt_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t m, int64_t n, int64_t k,
                  float* out, int64_t ldo);
// out (m x n, row stride ldo) = a (m x k, stride lda) times b (k x n, stride ldb): rows of b
// scaled and summed over k in order, best when m is large.
void gemm_nn(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* out,
             int64_t ldo);
// The same with b in bf16 (raw bits), widened exactly as it is read: the bits gemm_nn gives on the
// widened values.
void gemm_nn(const float* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* out,
             int64_t ldo);

// The oracle: one thread, double accumulation, with the same operand rounding as `operands` asks.
void matmul_reference(const Mat& x, const Weight& w, Mat out, Operands operands = Operands::kFp32);

// Whether kBf16 is honoured on this machine for BF16 weights.
bool bf16_products_available();

// Instruction set the fast kernels use on this machine ("avx512", "avx2" or "scalar").
const char* matmul_isa();

}  // namespace m1::cpu
