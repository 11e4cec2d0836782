#pragma once
// Matrix products on quantized weights (int8 / int4 codes with scales, m1/quantize.h), for
// matmul_batch. The arithmetic is that of matmul.h's Operands: kFp32 multiplies fp32 x by
// code * scale (fp32); bf16 x meets the codes (one scale per row: applied to the sum) or
// code * scale rounded to bf16 (several groups). Every output is summed in the order the dense
// tiles use (gemm_nt, gemm_nt_bf16), whatever the number of rows, so a row's result never depends
// on the rows beside it.

#include <cstdint>

#include "m1/backend.h"

namespace m1::cpu {

// Tasks out = x w^T splits into for `rows` rows of x; each task writes outputs of its own.
int64_t quantized_tasks(int64_t rows, const Weight& w);
// Runs one task: x is `rows` rows of w.cols fp32 values or, with bf16, bf16 values.
void quantized_task(const void* x, int64_t rows, const Weight& w, Mat out, bool bf16, int64_t task);

}  // namespace m1::cpu
