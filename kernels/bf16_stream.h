#pragma once
// Products out = x w^T on BF16 weights for a few rows of x (decode), with the weights streamed
// through a ring of shared-memory stages by cp.async: one persistent CTA per SM, each taking an
// equal run of (column block, chunk) work units, so every SM keeps several stages of weights in
// flight while it multiplies the one that has landed. The same bits as matmul.h's other kernels
// (every output element the same sequence of operations; see the top of matmul.cu). matmul.cu
// picks these when bf16_streams says they take the product.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

#include "device.h"
#include "device_scratch.h"
#include "device_types.h"
#include "matmul.h"

namespace m1::cuda {

// Rows of x (of a plain product, or of a grouped product's tile) these kernels take at most: one
// row tile of the tensor cores' fragments, which cost the same for 1 row as for 16. The ring then
// takes 221 KB at most (fp32 operands and SwiGLU), within the 227 KB a block may take on an H100
// or H200; where a GPU has less, bf16_streams says no and a grouped product takes tiles of 8.
inline constexpr int64_t kBf16StreamMaxRows = 16;

// Whether bf16_stream_matmul takes a product of `rows` rows of x (row stride ldx) with BF16
// weights of `cols` inputs at `weights` (every group's, for grouped products): few enough rows,
// 16-byte aligned rows of x and of the weights (the copies are 16 bytes), and the ring fits the
// device's shared memory. With `up` (rows ldx apart, aligned like x's), the products multiply
// swiglu(x, up) (activations.cuh) instead of x, as swiglu then the product would (grouped only).
bool bf16_streams(int64_t rows, const float* x, int64_t ldx, std::span<const DeviceMatrix> weights, int parts,
                  const Device& device, const float* up = nullptr);

// out [m, w.rows] = x [m, w.cols] w^T for each of `pieces` (1 to kMaxStreamPieces products whose
// weights share a shape) in one launch, x's bf16 terms `parts` (1: kBf16, 3: kFp32), when
// bf16_streams says so for all their weights. `scratch` holds the chunk partials and the fold
// counters.
void bf16_stream_matmul(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> pieces, int parts,
                        DeviceScratch& scratch, Device& device, cudaStream_t stream);

// grouped_matmuls (matmul.h) for groups of at most `group_rows` rows (a bound the device's offsets
// keep), when bf16_streams(group_rows, ...) says so for every product: two products (a MoE's gate
// and up) in one launch when their chunk partials fit together. With `x_rows` (device), row r of
// the call is x's row x_rows[r] (read in place, not gathered first).
void bf16_stream_grouped(const float* x, int64_t ldx, int64_t rows, const int64_t* offsets, int64_t group_rows,
                         std::span<const GroupedProduct> products, int parts, DeviceScratch& scratch, Device& device,
                         cudaStream_t stream, const float* up = nullptr, const int64_t* x_rows = nullptr);

}  // namespace m1::cuda
