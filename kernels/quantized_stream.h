#pragma once
// Products out = x w^T on int8 / int4 weights for a few rows of x (decode), with the codes, the
// scales and x streamed through a ring of shared-memory stages: one persistent CTA per SM takes an
// equal run of (tile of rows, column block, chunk) units, as bf16_stream.h does for BF16 weights.
// The same bits as quantized_matmul.h's other kernels (quantized_common.cuh's arithmetic).
// quantized_matmul.cu picks these when quantized_streams says they take the product.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

#include "device.h"
#include "device_scratch.h"
#include "device_types.h"
#include "matmul.h"

namespace m1::cuda {

// Rows of x (of a plain product, or of a grouped product's tile) these kernels take at most with
// weights of `dtype`: one 16-row fragment tile (the tensor cores' work is the same for 1 row as
// for 16) for int4 codes; int8 codes take twice the bytes of a stage, which leaves room for 8.
constexpr int64_t quantized_stream_max_rows(DType dtype) { return dtype == DType::kQ4 ? 16 : 8; }

// Whether the streamed kernels take a product of `rows` rows of x (row stride ldx) with the
// quantized `weights` (every group's, for grouped products; checked by check_quantized): few
// enough rows, x's rows 16-byte aligned, and the ring fits the device's shared memory. With `up`
// (rows ldx apart, aligned like x's), the products multiply swiglu(x, up) (activations.cuh)
// instead of x, as swiglu then the product would (grouped only).
bool quantized_streams(int64_t rows, const float* x, int64_t ldx, std::span<const DeviceMatrix> weights,
                       GemmOperands operands, const Device& device, const float* up = nullptr);

// quantized_matmul (quantized_matmul.h) for each of `pieces` (1 to kMaxStreamPieces products whose
// weights share a shape, scale dtype and group size) in one launch, when quantized_streams says
// so for all their weights.
void quantized_stream_matmul(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> pieces,
                             GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream);

// quantized_grouped_matmuls (quantized_matmul.h) for groups of at most `group_rows` rows, when
// quantized_streams(group_rows, ...) says so for every product: two products (a MoE's gate and up)
// in one launch when their chunk partials fit together. With `x_rows` (device), row r of the call
// is x's row x_rows[r] (read in place, not gathered first).
void quantized_stream_grouped(const float* x, int64_t ldx, int64_t rows, const int64_t* offsets, int64_t group_rows,
                              std::span<const GroupedProduct> products, GemmOperands operands, DeviceScratch& scratch,
                              Device& device, cudaStream_t stream, const float* up = nullptr,
                              const int64_t* x_rows = nullptr);

}  // namespace m1::cuda
