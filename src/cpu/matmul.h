#pragma once
// Dense matrix products out = x w^T with fp32 activations and weights in their stored dtype,
// accumulated in fp32. Every output element is summed in the same order whatever the number of
// rows or the tile it falls in, so a row's result never depends on the rows beside it.

#include <span>

#include "cpu/threadpool.h"
#include "m1/backend.h"

namespace m1::cpu {

// kFp32: the stored weights times fp32 activations. kBf16: activations rounded to bf16 and
// multiplied with BF16 weights by the AVX-512 BF16 dot product; weights stored in another dtype,
// and CPUs without the instruction, fall back to kFp32.
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

// The oracle: one thread, double accumulation, with the same operand rounding as `operands` asks.
void matmul_reference(const Mat& x, const Weight& w, Mat out, Operands operands = Operands::kFp32);

// Whether kBf16 is honoured on this machine for BF16 weights.
bool bf16_products_available();

// Instruction set the fast kernels use on this machine ("avx512", "avx2" or "scalar").
const char* matmul_isa();

}  // namespace m1::cpu
