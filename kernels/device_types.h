#pragma once
// Plain descriptors the CUDA launchers take: device pointers and sizes, no ownership.

#include <cstdint>

#include "m1/dtype.h"

namespace m1::cuda {

// A weight matrix in device memory in its stored dtype: [rows = outputs, cols = inputs],
// row-major and contiguous; a vector has rows = 1.
struct DeviceMatrix {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0;
};

// Operands of a matrix product. kFp32: fp32 activations times the stored weights (exact; with
// BF16 weights on tensor cores, each activation as three bf16 terms that sum to it exactly).
// kBf16: activations rounded to bf16, multiplied with BF16 weights on tensor cores (fast).
// Both accumulate in fp32.
enum class GemmOperands { kFp32, kBf16 };

}  // namespace m1::cuda
