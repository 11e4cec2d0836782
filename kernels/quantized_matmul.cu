// Batch-invariant products out = x w^T on int8 / int4 weights (see quantized_matmul.h): the
// packed codes stream from device memory into shared memory (cp.async), each warp turns the codes
// it needs into bf16 tensor-core operands in registers, and mma.m16n8k16 multiplies them with the
// bf16 terms of x, accumulating in fp32.
// (quantized_common.cuh: the operand order and the arithmetic that every kernel here follows.)
//
// "Skinny" kernels (decode: up to 64 rows) give each CTA one chunk of 64 weight rows and copy all
// of its codes in at once (splitting its rows of x into bf16 terms while they land), so even a
// single row spreads the weight over the whole GPU with many copies in flight per SM; the last
// CTA of a column block adds its chunk partials (fold_chunk_partials). "Tiled" kernels (prefill) keep a
// CTA's output tile in registers along the whole inner dimension, the next k-tiles of x and codes
// streaming in (a 3-stage cp.async pipeline) while one is multiplied. The grouped entry points run
// the same bodies on each group's rows and weights, found in device memory.

#include "quantized_matmul.h"

#include <cuda_pipeline.h>

#include <algorithm>
#include <cstdint>
#include <span>

#include <cuda_bf16.h>

#include "launch.h"
#include "m1/error.h"
#include "matmul_common.cuh"
#include "quantized_common.cuh"
#include "quantized_stream.h"
#include "warp_mma.h"
#include "warpgroup_mma.h"

namespace m1::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Few rows: CTA (one chunk, 64 weight rows) of 4 warps, warp i owning weight rows [16 i, 16 i + 16)
// (two column tiles) for every row of x (kM tiles of 16).

constexpr int kSkinnyWarps = 4;
constexpr int kSkinnyCols = 16 * kSkinnyWarps;
constexpr int kSkinnyMaxRows = 64;

template <DType T>
constexpr int skinny_shared_bytes(int parts, int rows) {
  return kSkinnyCols * code_stride<T>(kBlocksPerChunk) + parts * rows * kChunk * 2;
}

// x: m rows of fp32, ldx apart (split into bf16 terms here).
template <DType T, int kParts, int kM>
__device__ __forceinline__ void skinny_block(const float* x, int64_t ldx, int64_t m, const QuantOperand& w,
                                             float* partial, int64_t plane_rows, float* out, int64_t ldo,
                                             int* counters) {
  extern __shared__ __align__(16) unsigned char quant_skinny_shared[];
  constexpr int kRows = 16 * kM, kThreads = kSkinnyWarps * 32;
  unsigned char* cs = quant_skinny_shared;
  unsigned char* xs = cs + kSkinnyCols * code_stride<T>(kBlocksPerChunk);
  const int warp = int(threadIdx.x) / 32;
  const int64_t n0 = blockIdx.y * int64_t(kSkinnyCols), kb0 = blockIdx.x * int64_t(kBlocksPerChunk);
  const int64_t col0 = n0 + 16 * warp;  // the warp's first weight row
  const int blocks = int(std::min<int64_t>(kBlocksPerChunk, ceil_div(w.k - kb0 * kBlockK, kBlockK)));

  stage_codes<T, kSkinnyCols, kBlocksPerChunk, kThreads>(cs, w, n0, kb0);
  __pipeline_commit();
  // While the codes land: x's terms, and the scales.
  stage_x_from_fp32<kParts, kRows, kBlocksPerChunk, kThreads>(xs, x, ldx, m, kb0 * kBlockK, w.k);
  float scales[kBlocksPerChunk][2], column_scales[2][2];
#pragma unroll
  for (int b = 0; b < kBlocksPerChunk; ++b) block_scales<2>(w, col0, kb0 + b, scales[b]);
  chunk_scales(w, col0, column_scales);
  __pipeline_wait_prior(0);
  __syncthreads();

  float part[kM][2][4];
  warp_chunk<T, kParts, kM, kRows>(xs, int(m), cs, 16 * warp, w, col0, kb0, blocks, scales, GlobalScales{w}, part);
  for_each_output<kM, 2>(col0, w.n, 0, m, [&](int i, int j, int e, int64_t r, int64_t col) {
    write_partial(chunk_value(w, part[i][j][e], column_scales[j][e & 1]), r, col, plane_rows, w.n, partial, out, ldo);
  });
  if (partial) fold_chunk_partials(counters, partial, plane_rows, m, n0, kSkinnyCols, w.n, out, ldo);
}

template <DType T, int kParts, int kM>
__global__ __launch_bounds__(kSkinnyWarps * 32) void quant_skinny(const float* x, int64_t ldx, int64_t m,
                                                                  QuantOperand w, float* partial, float* out,
                                                                  int64_t ldo, int* counters) {
  skinny_block<T, kParts, kM>(x, ldx, m, w, partial, m, out, ldo, counters);
}

// Grid z: tiles of up to 16 kM rows of a group.
template <DType T, int kParts, int kM>
__global__ __launch_bounds__(kSkinnyWarps * 32) void grouped_quant_skinny(const float* x, int64_t ldx, int64_t rows,
                                                                          const int64_t* offsets, int groups,
                                                                          GroupWeights weights, QuantOperand w,
                                                                          float* partial, float* out, int64_t ldo,
                                                                          int* counters) {
  GroupTile tile;
  if (!find_tile(offsets, groups, 16 * kM, blockIdx.z, tile)) return;
  const int64_t r0 = tile.row0 + tile.first;
  w.codes = static_cast<const unsigned char*>(weights.data[tile.group]);
  w.scales = weights.scales[tile.group];
  skinny_block<T, kParts, kM>(x + r0 * ldx, ldx, tile.rows, w, partial ? partial + r0 * w.n : nullptr, rows,
                              out + r0 * ldo, ldo, counters);
}

// ---------------------------------------------------------------------------------------------
// Many rows: a kTileM x 128 output tile per CTA of 8 warps, 2 down by 4 across, each warp
// kTileM / 2 rows by 32 weight rows (kM x 4 mma tiles); k-tiles of 2 blocks, three in flight.
// Fast: 128 rows (kM 4); exact, whose three terms of x and three levels of sums take more
// registers and shared memory: 64 rows (kM 2).

constexpr int kTileN = 128, kTileBlocks = 2, kTileStages = 3, kTileThreads = 256;
static_assert(kBlocksPerChunk % kTileBlocks == 0, "a chunk must be whole k-tiles");

template <DType T, int kParts>
struct QuantTile {
  static constexpr int kTileM = kParts == 1 ? 128 : 64, kM = kTileM / 32, kN = 4;
  static constexpr int kXBytes = kParts * kTileM * kTileBlocks * kBlockK * 2;
  static constexpr int kCodeBytes = kTileN * code_stride<T>(kTileBlocks);
  static constexpr int kStageBytes = kXBytes + kCodeBytes;
  static constexpr int kSharedBytes = kTileStages * kStageBytes;
};

// The tile of rows [m0, m0 + kTileM) of x [m, k] (block order, terms term_stride apart).
template <DType T, int kParts>
__device__ __forceinline__ void quant_tile(const __nv_bfloat16* xb, int64_t ldq, int64_t term_stride, int64_t m,
                                           const QuantOperand& w, float* out, int64_t ldo, int64_t m0) {
  using Shape = QuantTile<T, kParts>;
  constexpr int kM = Shape::kM, kN = Shape::kN, kTileM = Shape::kTileM;
  extern __shared__ __align__(16) unsigned char quant_tile_shared[];
  const int warp = int(threadIdx.x) / 32;
  const int wm0 = (warp / 4) * (kTileM / 2), wn0 = (warp % 4) * 32;
  const int64_t n0 = blockIdx.y * int64_t(kTileN), col0 = n0 + wn0;
  const int x_rows = int(std::min<int64_t>(kTileM, m - m0));
  const int64_t blocks = ceil_div(w.k, kBlockK), tiles = ceil_div(blocks, kTileBlocks);

  auto x_stage = [&](int64_t tile) { return quant_tile_shared + (tile % kTileStages) * Shape::kStageBytes; };
  auto code_stage = [&](int64_t tile) { return x_stage(tile) + Shape::kXBytes; };
  auto stage = [&](int64_t tile) {
    if (tile < tiles) {
      stage_x<kParts, kTileM, kTileBlocks, kTileThreads>(x_stage(tile), xb + m0 * ldq, ldq, term_stride, x_rows,
                                                          tile * kTileBlocks * kBlockK);
      stage_codes<T, kTileN, kTileBlocks, kTileThreads>(code_stage(tile), w, n0, tile * kTileBlocks);
    }
    __pipeline_commit();  // an empty group past the end keeps the wait count uniform
  };

  float total[kM][kN][4], part[kM][kN][4], span[kParts == 1 ? 1 : kM][kN][4], column_scales[kN][2];
  chunk_scales(w, col0, column_scales);
  zero(total);
  zero(part);
  zero(span);
#pragma unroll
  for (int s = 0; s < kTileStages - 1; ++s) stage(s);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    float scales[kTileBlocks][kN];
#pragma unroll
    for (int b = 0; b < kTileBlocks; ++b) block_scales<kN>(w, col0, tile * kTileBlocks + b, scales[b]);
    __pipeline_wait_prior(kTileStages - 2);
    __syncthreads();  // the tile has landed for every thread, and the stage refilled next is free
    stage(tile + kTileStages - 1);
#pragma unroll
    for (int b = 0; b < kTileBlocks; ++b) {
      const int64_t kb = tile * kTileBlocks + b;
      if (kb >= blocks) break;
      if constexpr (kParts == 1) {
        block_product<T, kParts, kM, kN, kTileM, kTileBlocks>(x_stage(tile), x_rows, wm0, code_stage(tile), wn0, b, w,
                                                              scales[b], part);
      } else {
        block_product<T, kParts, kM, kN, kTileM, kTileBlocks>(x_stage(tile), x_rows, wm0, code_stage(tile), wn0, b, w,
                                                              scales[b], span);
        if (ends_span(w, kb)) fold_span(w, col0, kb, span, part);
      }
      if (ends_chunk(w, kb)) {
#pragma unroll
        for (int i = 0; i < kM; ++i)
#pragma unroll
          for (int j = 0; j < kN; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              total[i][j][e] = __fadd_rn(total[i][j][e], chunk_value(w, part[i][j][e], column_scales[j][e & 1]));
              part[i][j][e] = 0.0f;
            }
      }
    }
  }
  __pipeline_wait_prior(0);  // the empty groups

  for_each_output<kM, kN>(col0, w.n, m0 + wm0, m,
                          [&](int i, int j, int e, int64_t r, int64_t col) { out[r * ldo + col] = total[i][j][e]; });
}

template <DType T, int kParts>
__global__ __launch_bounds__(kTileThreads, 1) void quant_tiled(const __nv_bfloat16* xb, int64_t ldq, int64_t m,
                                                               QuantOperand w, float* out, int64_t ldo) {
  quant_tile<T, kParts>(xb, ldq, m * ldq, m, w, out, ldo, blockIdx.x * int64_t(QuantTile<T, kParts>::kTileM));
}

// Grid x: the groups' row tiles, in group order; `rows`, x's rows, sets the terms apart.
template <DType T, int kParts>
__global__ __launch_bounds__(kTileThreads, 1) void grouped_quant_tiled(const __nv_bfloat16* xb, int64_t ldq,
                                                                       int64_t rows, const int64_t* offsets, int groups,
                                                                       GroupWeights weights, QuantOperand w, float* out,
                                                                       int64_t ldo) {
  GroupTile tile;
  if (!find_tile(offsets, groups, QuantTile<T, kParts>::kTileM, blockIdx.x, tile)) return;
  w.codes = static_cast<const unsigned char*>(weights.data[tile.group]);
  w.scales = weights.scales[tile.group];
  quant_tile<T, kParts>(xb + tile.row0 * ldq, ldq, rows * ldq, tile.group_rows, w, out + tile.row0 * ldo, ldo,
                        tile.first);
}

// ---------------------------------------------------------------------------------------------
// Many rows, fast precision, on Hopper's warpgroup tensor cores (sm_90a, warpgroup_mma.h): a
// 128 x 128 output tile per CTA of two warpgroups, each 64 rows by the 128 weight rows, k-tiles of
// 2 blocks (64 inputs). x arrives split in step_order, so a k-tile row holds the block's two steps
// one after the other, each step's 16 inputs in block_product's slots; it streams into 128-byte-
// swizzled tiles through a ring of stages beside the tile's raw codes (stage_codes). Each k-tile's
// codes become bf16 operands (code_pair, scaled_pair: the same values block_product makes) in one
// of two swizzled weight tiles, written by the threads, while the products of the k-tile before
// run; then four m64n128k16 products (block 0's steps, block 1's). The arithmetic is quant_tile's
// in fast precision (a fresh partial per chunk, times the row's scale for one group per row), so
// the bits are the same. Exact precision keeps quant_tile.

constexpr int kQuantWarpgroupTileM = 128, kQuantWarpgroupTileN = 128, kQuantWarpgroupThreads = 256;
static_assert(kTileBlocks * kBlockK * 2 == kSwizzleRowBytes, "a k-tile row is one swizzled row");

template <DType T>
struct QuantWarpgroupTile {
  static constexpr int kTileBytes = kQuantWarpgroupTileM * kSwizzleRowBytes;  // x's tile, and a weight tile
  static constexpr int kCodeBytes = kQuantWarpgroupTileN * code_stride<T>(kTileBlocks);
  static constexpr int kStageBytes = kTileBytes + kCodeBytes;  // x, then the codes
  static_assert(kStageBytes % kSwizzleAtomBytes == 0, "each stage's x tile stays 1024-byte aligned");
  static constexpr int kScaleBytes = kQuantWarpgroupTileN * 4;
  // Alignment room, two weight tiles, as many stages as fit (at most 6), the columns' chunk scales.
  static constexpr int kStages =
      std::min(6, (227 * 1024 - kSwizzleAtomBytes - 2 * kTileBytes - kScaleBytes) / kStageBytes);
  static constexpr int kSharedBytes = kSwizzleAtomBytes + 2 * kTileBytes + kStages * kStageBytes + kScaleBytes;
};
static_assert(QuantWarpgroupTile<DType::kQ8>::kStages >= 3 && QuantWarpgroupTile<DType::kQ4>::kStages >= 3);

// The tile of rows [m0, m0 + 128) of x [m, k] (one term, step order) by the 128 weight rows from
// blockIdx.y. Built for sm_90a only: elsewhere it traps (taken only where DeviceLimits::
// warpgroup_mma says the GPU and the build have it).
template <DType T>
__device__ __forceinline__ void quant_warpgroup_tile(const __nv_bfloat16* xb, int64_t ldq, int64_t m,
                                                     const QuantOperand& w, float* out, int64_t ldo, int64_t m0) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#else
  using Shape = QuantWarpgroupTile<T>;
  constexpr int kStages = Shape::kStages, kTile = Shape::kTileBytes, kStride = code_stride<T>(kTileBlocks);
  constexpr int kUnits = kSwizzleRowBytes / 16;
  constexpr int kLoads = kQuantWarpgroupTileM * kUnits / kQuantWarpgroupThreads;
  extern __shared__ __align__(128) unsigned char quant_warpgroup_shared[];
  const uint32_t window = shared_address(quant_warpgroup_shared);
  const uint32_t pad = (kSwizzleAtomBytes - window % kSwizzleAtomBytes) % kSwizzleAtomBytes;
  unsigned char* weights = quant_warpgroup_shared + pad;  // two weight tiles, then the ring
  unsigned char* ring = weights + 2 * kTile;
  float* column_scales = reinterpret_cast<float*>(ring + kStages * Shape::kStageBytes);
  const uint32_t weights_address = window + pad, ring_address = weights_address + 2 * kTile;

  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int64_t n0 = blockIdx.y * int64_t(kQuantWarpgroupTileN);
  const int64_t blocks = ceil_div(w.k, kBlockK), tiles = ceil_div(blocks, kTileBlocks);
  for (int c = tid; c < kQuantWarpgroupTileN; c += kQuantWarpgroupThreads)
    column_scales[c] = w.scale_chunks ? scale_of(w, n0 + c, 0) : 1.0f;

  // k-tile t into stage t % kStages: x's 16-byte units into their swizzled places (zeros past the
  // rows and past the padded row), the codes as stage_codes lays them out. Every call commits a
  // group, empty past the last tile.
  auto stage = [&](int64_t t) {
    if (t < tiles) {
      unsigned char* at = ring + int(t % kStages) * Shape::kStageBytes;
      const int64_t k0 = t * kTileBlocks * kBlockK;
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int id = tid + i * kQuantWarpgroupThreads, row = id / kUnits, unit = id % kUnits;
        const bool valid = m0 + row < m && k0 + 8 * unit < ldq;
        const __nv_bfloat16* src = xb + (m0 + row) * ldq + k0 + 8 * unit;
        __pipeline_memcpy_async(at + swizzled_unit_offset(row, unit), valid ? src : xb, 16, valid ? 0 : 16);
      }
      stage_codes<T, kQuantWarpgroupTileN, kTileBlocks, kQuantWarpgroupThreads>(at + kTile, w, n0, t * kTileBlocks);
    }
    __pipeline_commit();
  };

  // Thread (row, block) of k-tile t: its weight row's 32 codes as the two steps' operands, step s
  // of the block in units 4 block + 2 s (slots 2 u .. 2 u + 1 of lane u's codes) and + 1 (slots
  // 2 u + 8 ..), into weight tile t % 2. Zeros for a block past the last.
  const bool bf16_scale = w.scale_dtype == DType::kBF16;
  auto make_operands = [&](int64_t t) {
    const int row = tid / kTileBlocks, block = tid % kTileBlocks;
    const int64_t kb = t * kTileBlocks + block;
    const unsigned char* codes = ring + int(t % kStages) * Shape::kStageBytes + kTile + row * kStride +
                                 block * kBlockBytes<T>;
    const float scale = w.scale_codes && kb < blocks ? scale_of(w, n0 + row, kb) : 0.0f;
    const uint32_t s2 = (__float_as_uint(scale) >> 16) * 0x00010001u;
    uint32_t unit_words[4][4];  // [2 s + half][lane's run u]
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t words[2];
      if constexpr (T == DType::kQ4) {
        words[0] = *reinterpret_cast<const uint32_t*>(codes + 4 * u);
        words[1] = 0;
      } else {
        const uint2 pair = *reinterpret_cast<const uint2*>(codes + 8 * u);
        words[0] = pair.x, words[1] = pair.y;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t v = code_pair<T>(words, i);
        if (w.scale_codes) v = scaled_pair(v, scale, s2, bf16_scale);
        unit_words[i][u] = kb < blocks ? v : 0u;
      }
    }
    unsigned char* tile = weights + int(t % 2) * kTile;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      *reinterpret_cast<uint4*>(tile + swizzled_unit_offset(row, 4 * block + i)) =
          make_uint4(unit_words[i][0], unit_words[i][1], unit_words[i][2], unit_words[i][3]);
  };
  static_assert(kTileBlocks * kQuantWarpgroupTileN == kQuantWarpgroupThreads, "one (row, block) per thread");

  float part[64], total[64];
#pragma unroll
  for (int e = 0; e < 64; ++e) part[e] = total[e] = 0.0f;
  constexpr int kTilesPerChunk = kBlocksPerChunk / kTileBlocks;
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) stage(s);
  for (int64_t t = 0; t < tiles; ++t) {
    __pipeline_wait_prior(kStages - 3);  // tile t has landed (this thread's copies)
    __syncthreads();  // ... every thread's; every warpgroup is done with tile t - 2 and its weight tile
    stage(t + kStages - 2);
    make_operands(t);
    fence_shared_for_async_proxy();  // x's copies and the operands, where the products read them
    __syncthreads();
    const uint32_t x_at = ring_address + uint32_t(t % kStages) * Shape::kStageBytes;
    const uint32_t w_at = weights_address + uint32_t(t % 2) * kTile;
    warpgroup_pin(part);
    warpgroup_fence();
#pragma unroll
    for (int s = 0; s < kTileBlocks * 2; ++s) {  // block 0's two steps, then block 1's
      const bool fresh = t % kTilesPerChunk == 0 && s == 0;  // the chunk's first product
      warpgroup_mma_128(part, swizzled_descriptor(x_at + warpgroup * (kTile / 2) + 32 * s),
                        swizzled_descriptor(w_at + 32 * s), !fresh);
    }
    warpgroup_commit();
    warpgroup_close_or_go_on((t + 1) % kTilesPerChunk == 0 || t + 1 == tiles, part, total,
                             [&](int e, float partial) {
                               return chunk_value(w, partial, column_scales[warpgroup_column(e)]);
                             });
  }
  __pipeline_wait_prior(0);  // the empty groups
  store_warpgroup_tile(total, out, ldo, m, w.n, m0 + warpgroup * 64, n0);
#endif
}

template <DType T>
__global__ __launch_bounds__(kQuantWarpgroupThreads, 1) void quant_warpgroup(const __nv_bfloat16* xb, int64_t ldq,
                                                                             int64_t m, QuantOperand w, float* out,
                                                                             int64_t ldo) {
  quant_warpgroup_tile<T>(xb, ldq, m, w, out, ldo, blockIdx.x * int64_t(kQuantWarpgroupTileM));
}

// Grid x: the groups' row tiles, in group order.
template <DType T>
__global__ __launch_bounds__(kQuantWarpgroupThreads, 1) void grouped_quant_warpgroup(
    const __nv_bfloat16* xb, int64_t ldq, int64_t rows, const int64_t* offsets, int groups, GroupWeights weights,
    QuantOperand w, float* out, int64_t ldo) {
  GroupTile tile;
  if (!find_tile(offsets, groups, kQuantWarpgroupTileM, blockIdx.x, tile)) return;
  w.codes = static_cast<const unsigned char*>(weights.data[tile.group]);
  w.scales = weights.scales[tile.group];
  quant_warpgroup_tile<T>(xb + tile.row0 * ldq, ldq, tile.group_rows, w, out + tile.row0 * ldo, ldo, tile.first);
}

// ---------------------------------------------------------------------------------------------
// Host side. Grids put the chunks (skinny) or row tiles (tiled) in x and weight-row blocks in y.


template <DType T, int kParts, int kM>
void launch_skinny(const float* x, int64_t ldx, int64_t m, const QuantOperand& w, float* partial, int* counters,
                   float* out, int64_t ldo, Device& device, cudaStream_t stream) {
  constexpr auto kernel = quant_skinny<T, kParts, kM>;
  constexpr int bytes = skinny_shared_bytes<T>(kParts, 16 * kM);
  device.allow_shared_memory<kernel>(bytes);
  const dim3 grid(unsigned(ceil_div(w.k, kChunk)), unsigned(ceil_div(w.n, kSkinnyCols)));
  kernel<<<grid, kSkinnyWarps * 32, bytes, stream>>>(x, ldx, m, w, partial, out, ldo, counters);
  M1_CUDA_CHECK_LAUNCH();
}

template <DType T, int kParts, int kM>
void launch_grouped_skinny(const float* x, int64_t ldx, int64_t rows, const int64_t* offsets, const GroupedProduct& p,
                           QuantOperand w, float* partial, DeviceScratch& scratch, Device& device,
                           cudaStream_t stream) {
  constexpr auto kernel = grouped_quant_skinny<T, kParts, kM>;
  constexpr int bytes = skinny_shared_bytes<T>(kParts, 16 * kM);
  device.allow_shared_memory<kernel>(bytes);
  for_each_launch(p.w, [&](int64_t first, int count, const GroupWeights& weights) {
    const dim3 grid(unsigned(ceil_div(w.k, kChunk)), unsigned(ceil_div(w.n, kSkinnyCols)),
                    unsigned(grouped_tiles(rows, count, 16 * kM)));
    int* counters = fold_counters(scratch, partial, int64_t(grid.y) * grid.z);
    kernel<<<grid, kSkinnyWarps * 32, bytes, stream>>>(x, ldx, rows, offsets + first, count, weights, w, partial,
                                                       p.out, p.ldo, counters);
    M1_CUDA_CHECK_LAUNCH();
  });
}

// Calls launch.template operator()<kM>() for the skinny tiles of `rows` rows (at most 64).
template <class Launch>
void with_row_tiles(int64_t rows, Launch launch) {
  switch (ceil_div(rows, 16)) {
    case 1: return launch.template operator()<1>();
    case 2: return launch.template operator()<2>();
    case 3: return launch.template operator()<3>();
    default: return launch.template operator()<4>();
  }
  static_assert(4 * 16 == kSkinnyMaxRows);
}

// A tiled kernel (Kernel: kTileM rows by kTileN weight rows a CTA, `bytes` of dynamic shared
// memory) over rows [0, m) of x's terms.
template <auto Kernel, int kTileM, int kThreads>
void launch_tiles(const __nv_bfloat16* xb, int64_t ldq, int64_t m, const QuantOperand& w, float* out, int64_t ldo,
                  int bytes, Device& device, cudaStream_t stream) {
  device.allow_shared_memory<Kernel>(bytes);
  const dim3 grid(unsigned(ceil_div(m, kTileM)), unsigned(ceil_div(w.n, kTileN)));
  Kernel<<<grid, kThreads, bytes, stream>>>(xb, ldq, m, w, out, ldo);
  M1_CUDA_CHECK_LAUNCH();
}

// One grouped product through a tiled kernel, its groups' rows in tiles of kTileM.
template <auto Kernel, int kTileM, int kThreads>
void launch_grouped_tiles(const __nv_bfloat16* xb, int64_t ldq, int64_t rows, const int64_t* offsets,
                          const GroupedProduct& p, const QuantOperand& w, int bytes, Device& device,
                          cudaStream_t stream) {
  device.allow_shared_memory<Kernel>(bytes);
  for_each_launch(p.w, [&](int64_t first, int count, const GroupWeights& weights) {
    const dim3 grid(unsigned(grouped_tiles(rows, count, kTileM)), unsigned(ceil_div(w.n, kTileN)));
    Kernel<<<grid, kThreads, bytes, stream>>>(xb, ldq, rows, offsets + first, count, weights, w, p.out, p.ldo);
    M1_CUDA_CHECK_LAUNCH();
  });
}

// Many rows: x split into its terms once, then the plain product (`plain`, into out) or each
// grouped one (`grouped`, its groups' rows at `offsets`) through the tiles: the warpgroup tiles in
// fast precision where the device has them (x in step order), else quant_tile's (block order).
template <DType T, int kParts>
void tiled_products(const float* x, int64_t ldx, int64_t rows, int64_t k, const int64_t* offsets,
                    std::span<const GroupedProduct> grouped, const QuantOperand* plain, float* out, int64_t ldo,
                    GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const int64_t ldq = padded_row(k);
  __nv_bfloat16* xb = scratch.get<__nv_bfloat16>(size_t(kParts * rows * ldq));
  auto run = [&]<auto Plain, auto Grouped, int kTileM, int kThreads>(int bytes) {
    if (plain) return launch_tiles<Plain, kTileM, kThreads>(xb, ldq, rows, *plain, out, ldo, bytes, device, stream);
    for (const GroupedProduct& p : grouped)
      launch_grouped_tiles<Grouped, kTileM, kThreads>(xb, ldq, rows, offsets, p,
                                                      operand(p.w[0], operands, all_aligned16(p.w)), bytes, device,
                                                      stream);
  };
  if constexpr (kParts == 1) {
    if (device.limits().warpgroup_mma) {
      launch_split_to_bf16<1, XOrder::kSteps>(x, ldx, rows, k, xb, ldq, stream);
      return run.template operator()<quant_warpgroup<T>, grouped_quant_warpgroup<T>, kQuantWarpgroupTileM,
                                     kQuantWarpgroupThreads>(QuantWarpgroupTile<T>::kSharedBytes);
    }
  }
  using Shape = QuantTile<T, kParts>;
  launch_split_to_bf16<kParts, XOrder::kBlocks>(x, ldx, rows, k, xb, ldq, stream);
  run.template operator()<quant_tiled<T, kParts>, grouped_quant_tiled<T, kParts>, Shape::kTileM, kTileThreads>(
      Shape::kSharedBytes);
}

template <DType T, int kParts>
void matmul_quantized(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& weight, float* out, int64_t ldo,
                      GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const QuantOperand w = operand(weight, operands, aligned16(weight.data));
  const int64_t chunks = ceil_div(w.k, kChunk);
  if (m > kSkinnyMaxRows || !skinny_partials_fit(chunks, m, w.n, device))
    return tiled_products<T, kParts>(x, ldx, m, w.k, nullptr, {}, &w, out, ldo, operands, scratch, device, stream);
  if (quantized_streams(m, x, ldx, std::span(&weight, 1), operands, device)) {
    const PlainProduct piece{weight, out, ldo};
    return quantized_stream_matmul(x, ldx, m, std::span(&piece, 1), operands, scratch, device, stream);
  }
  float* partial = chunks > 1 ? scratch.get<float>(size_t(chunks * m * w.n)) : nullptr;
  int* counters = fold_counters(scratch, partial, ceil_div(w.n, kSkinnyCols));
  with_row_tiles(m, [&]<int kM>() {
    launch_skinny<T, kParts, kM>(x, ldx, m, w, partial, counters, out, ldo, device, stream);
  });
}

template <DType T, int kParts>
void grouped_quantized(const float* x, int64_t ldx, const int64_t* offsets, std::span<const GroupedProduct> products,
                       int64_t rows, int64_t group_rows, GemmOperands operands, DeviceScratch& scratch,
                       Device& device, cudaStream_t stream) {
  const DeviceMatrix& first = products[0].w[0];
  const int64_t groups = int64_t(products[0].w.size());
  const int64_t chunks = ceil_div(first.cols, kChunk);
  const int64_t tile_rows = ceil_div(group_rows, 16) * 16;
  const bool skinny = group_rows <= kSkinnyMaxRows && skinny_grid_fits(rows, groups, tile_rows) &&
                      skinny_partials_fit(chunks, rows, first.rows, device);
  if (!skinny)  // x's terms once for every product
    return tiled_products<T, kParts>(x, ldx, rows, first.cols, offsets, products, nullptr, nullptr, 0, operands,
                                     scratch, device, stream);
  // int4's 16-row ring with fp32 operands passes a 160 KB GPU's shared memory: 8-row tiles there.
  const int64_t stream_rows = tallest_stream_tile(products, group_rows, rows, quantized_stream_max_rows(first.dtype),
                                                  [&](int64_t tile, const GroupedProduct& p) {
                                                    return quantized_streams(tile, x, ldx, p.w, operands, device);
                                                  });
  if (stream_rows > 0)
    return quantized_stream_grouped(x, ldx, rows, offsets, stream_rows, products, operands, scratch, device, stream);
  float* partial = chunks > 1 ? scratch.get<float>(size_t(chunks * rows * first.rows)) : nullptr;
  for (const GroupedProduct& p : products) {  // one set of partials, summed before the next product's
    const QuantOperand w = operand(p.w[0], operands, all_aligned16(p.w));
    with_row_tiles(tile_rows, [&]<int kM>() {
      launch_grouped_skinny<T, kParts, kM>(x, ldx, rows, offsets, p, w, partial, scratch, device, stream);
    });
  }
}

}  // namespace

void check_quantized(const DeviceMatrix& w, const char* what) {
  if (w.dtype != DType::kQ8 && w.dtype != DType::kQ4) fail("{}: dtype {} is not a quantized type", what, dtype_name(w.dtype));
  if (w.scales == nullptr) fail("{}: {} weights [{}, {}] without scales", what, dtype_name(w.dtype), w.rows, w.cols);
  if (!is_float(w.scale_dtype)) fail("{}: scales of dtype {} (expected BF16, F16 or F32)", what, dtype_name(w.scale_dtype));
  if (w.group_size <= 0 || (w.group_size % 32 != 0 && w.group_size < w.cols))
    fail("{}: group size {} is neither a multiple of 32 nor the whole row of {}", what, w.group_size, w.cols);
}

void quantized_matmul(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
                      GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  check_quantized(w, "matmul");
  with_kind(w.dtype, operands, [&]<DType T, int kParts>() {
    matmul_quantized<T, kParts>(x, ldx, m, w, out, ldo, operands, scratch, device, stream);
  });
}

void quantized_grouped_matmuls(const float* x, int64_t ldx, const int64_t* offsets,
                               std::span<const GroupedProduct> products, int64_t rows, int64_t group_rows,
                               GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const DeviceMatrix& first = products[0].w[0];
  check_quantized(first, "grouped matmul");
  with_kind(first.dtype, operands, [&]<DType T, int kParts>() {
    grouped_quantized<T, kParts>(x, ldx, offsets, products, rows, group_rows, operands, scratch, device, stream);
  });
}

}  // namespace m1::cuda
