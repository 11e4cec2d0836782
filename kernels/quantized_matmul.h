#pragma once
// Batch-invariant products out = x w^T on quantized weights (int8 / int4 codes with scales, laid
// out as m1/quantize.h describes) on the GPU: the codes are dequantized in registers and multiplied
// on bf16 tensor cores with fp32 accumulation. matmul.h's entry points (matmul, grouped_matmul,
// grouped_matmuls) take these weights and come here; the arithmetic is the CPU reference's
// (m1::cpu::matmul_reference):
//   kBf16 (fast): x rounded to bf16 times bf16(code * scale) (several groups per row), or times
//     the codes, the row's scale multiplying the sum of each chunk of 256 inputs (one scale per
//     row);
//   kFp32 (exact): x, as three bf16 terms that sum to it exactly, times the codes, each group's
//     sum multiplied by its scale in fp32.
// Every output element is summed in one fixed order whatever the number of rows or the kernel
// (quantized_matmul.cu), so a row's result never depends on the rows beside it.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

#include "device_scratch.h"
#include "device_types.h"
#include "matmul.h"

namespace m1::cuda {

// Throws m1::Error naming `what` when w is not a quantized weight the kernels can run: no scales,
// scales that are not F32, F16 or BF16, or a group size that is neither a multiple of 32 nor the
// whole row.
void check_quantized(const DeviceMatrix& w, const char* what);

// As matmul (matmul.h), for a quantized w, which matmul passes on here once it has dealt with
// empty products (m, w.rows or w.cols 0).
void quantized_matmul(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
                      GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream);

// As grouped_matmuls (matmul.h), for quantized weights, which grouped_matmuls passes on here once
// it has checked that every product's weights share one type, shape, group size and scale dtype
// and dealt with empty products.
void quantized_grouped_matmuls(const float* x, int64_t ldx, const int64_t* offsets,
                               std::span<const GroupedProduct> products, int64_t rows, int64_t group_rows,
                               GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream);

}  // namespace m1::cuda
