#pragma once
// Dense matrix products out = x w^T on the GPU, fp32 accumulation. Every output element is summed
// over k in the same order whatever the number of rows or the tile it falls in, so a row's result
// never depends on the rows beside it (batch invariance, DESIGN.md §4); cuBLAS gives no such
// promise, so it is the benchmark's yardstick rather than the model's path.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

#include "device.h"

#include "device_scratch.h"
#include "device_types.h"

namespace m1::cuda {

// Inner-dimension values per partial sum: part of the arithmetic, shared by every kernel (each
// output element is the sum, in chunk order, of its chunks' fp32 partial sums).
inline constexpr int kMatmulChunk = 256;

// out [m, w.rows] (row stride ldo) = x [m, w.cols] (row stride ldx, fp32) times w^T.
// kBf16 with F32 or F16 weights runs as kFp32; int8 and int4 weights take quantized_matmul.h's
// kernels. `scratch` holds the bf16 terms of x.
void matmul(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
            GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream);

// Grouped products, for mixtures of experts: for every group g, rows [offsets[g], offsets[g + 1])
// of x times w[g]^T into the same rows of out, each row bit-identical to what matmul gives it.
// `offsets` (w.size() + 1 non-decreasing values in [0, rows]) is in device memory, and
// only the kernels read it: the launches are sized from `rows` and the group count, so the host
// never waits for the device. `group_rows`, a bound on each group's rows, only picks the kernels:
// any value gives the same bits.
// x has `rows` readable rows; rows of out outside every group are not written. All w share one
// shape and dtype.
void grouped_matmul(const float* x, int64_t ldx, const int64_t* offsets, std::span<const DeviceMatrix> w,
                    int64_t rows, int64_t group_rows, float* out, int64_t ldo, GemmOperands operands,
                    DeviceScratch& scratch, Device& device, cudaStream_t stream);

// One of several grouped products of the same rows: its weights, one per group, and its output.
struct GroupedProduct {
  std::span<const DeviceMatrix> w;
  float* out = nullptr;
  int64_t ldo = 0;
};

// One of several products of the same x (matmuls): its weights, and its output (row stride ldo).
struct PlainProduct {
  DeviceMatrix w;
  float* out = nullptr;
  int64_t ldo = 0;
};

// out = x w^T for each product, each with the bits matmul gives it. Products of a few rows of x
// (a decode step's q, k and v, or qkv and the output gate) whose weights share a dtype, inputs
// and scales, and whose rows are all multiples of the fewest rows any has, stream in one launch:
// each weight cut into blocks of that many rows (at most kMaxStreamPieces blocks in all).
void matmuls(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> products, GemmOperands operands,
             DeviceScratch& scratch, Device& device, cudaStream_t stream);

// grouped_matmuls of the rows of x (row stride ldx) that `x_rows` names (device: row r of the call
// is x's row x_rows[r]; a MoE's tokens in expert order), with the same bits. The streamed kernels
// read the rows in place; otherwise they are gathered into `gathered` ([rows, ldx]) first.
void grouped_matmuls_of_rows(const float* x, int64_t ldx, const int64_t* x_rows, float* gathered,
                             const int64_t* offsets, std::span<const GroupedProduct> products, int64_t rows,
                             int64_t group_rows, GemmOperands operands, DeviceScratch& scratch, Device& device,
                             cudaStream_t stream);

// grouped_matmul of swiglu(gate, up) (elementwise.h's swiglu: silu(gate) * up), both [rows, ldx],
// with the bits of swiglu then grouped_matmul: the streamed kernels apply SwiGLU as they stage
// the rows (one launch, gate left as it is); otherwise gate is overwritten with swiglu(gate, up)
// (all rows x ldx values) and multiplied.
void grouped_matmul_swiglu(float* gate, const float* up, int64_t ldx, const int64_t* offsets,
                           std::span<const DeviceMatrix> w, int64_t rows, int64_t group_rows, float* out, int64_t ldo,
                           GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream);

// Each product in turn, as grouped_matmul would compute it (the same bits), but x is rounded to
// bf16 once for all of them (a MoE's gate and up products). Every product's weights share one
// group count, shape and dtype.
void grouped_matmuls(const float* x, int64_t ldx, const int64_t* offsets, std::span<const GroupedProduct> products,
                     int64_t rows, int64_t group_rows, GemmOperands operands, DeviceScratch& scratch,
                     Device& device, cudaStream_t stream);

}  // namespace m1::cuda
