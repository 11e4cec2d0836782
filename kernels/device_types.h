#pragma once
// Plain descriptors the CUDA launchers take: device pointers and sizes, no ownership.

#include <cstdint>

#include "m1/dtype.h"

namespace m1::cuda {

// A weight matrix in device memory in its stored dtype: [rows = outputs, cols = inputs],
// row-major and contiguous; a vector has rows = 1. Quantized (dtype kQ8 or kQ4): `data` holds the
// packed codes and `scales` their [rows, ceil(cols / group_size)] scales of `scale_dtype`, laid
// out as m1/quantize.h describes.
struct DeviceMatrix {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0;
  const void* scales = nullptr;      // quantized only
  DType scale_dtype = DType::kBF16;  // quantized only
  int64_t group_size = 0;            // quantized only: inputs per scale
};

// Operands of a matrix product. kFp32: fp32 activations times the stored weights (exact; with
// BF16 weights on tensor cores, each activation as three bf16 terms that sum to it exactly).
// kBf16: activations rounded to bf16, multiplied with BF16 weights on tensor cores (fast).
// Both accumulate in fp32.
enum class GemmOperands { kFp32, kBf16 };

}  // namespace m1::cuda
