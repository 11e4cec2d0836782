#pragma once
// Dense matrix products out = x w^T with fp32 activations and weights in their stored dtype,
// accumulated in fp32. Every output element is summed in the same order whatever the number of
// rows or the tile it falls in, so a row's result never depends on the rows beside it.

#include "cpu/threadpool.h"
#include "m1/backend.h"

namespace m1::cpu {

void matmul(ThreadPool& pool, const Mat& x, const Weight& w, Mat out);

// The oracle: one thread, double accumulation.
void matmul_reference(const Mat& x, const Weight& w, Mat out);

// Instruction set the fast kernels use on this machine ("avx512", "avx2" or "scalar").
const char* matmul_isa();

}  // namespace m1::cpu
