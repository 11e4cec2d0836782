// Batch-invariant dense products out = x w^T (see matmul.h).
//
// Every output element is the same fixed sequence of fp32 operations in every kernel here: the
// inner dimension is cut into chunks of kChunk values; a chunk's products are summed into a fresh
// partial, and the partials are added to a total that starts at 0, in chunk order, with
// round-to-nearest adds. Within a chunk, BF16 weights take tensor-core steps of 16 in increasing
// k, x entering each step as bf16 terms, the smallest first: one, x rounded (kBf16), or three whose
// sum is x exactly (kFp32: fp32 products on the tensor cores); F32 and F16 weights run fmaf in
// increasing k on the fp32 cores (x rounded first under kBf16 only for BF16 weights). A fresh
// partial per chunk also keeps the tensor cores' truncating accumulation to 48 steps at most.
// The kernels differ only in which thread computes which element when, so the rows beside a row
// never change its result.
//
// "Skinny" kernels (decode, few rows) give each CTA one chunk of one block of outputs, so even a
// single row spreads the weight matrix over the whole GPU and streams it at memory bandwidth; a
// second kernel adds the chunk partials in order. "Tiled" kernels (prefill) keep a CTA's output
// tile in registers along the whole inner dimension, closing each chunk as they pass its end.
//
// Each kernel's work is a __device__ body that two entry points share: the plain one (one
// product) and the grouped one (one product per group of rows, each group with its own weights,
// a CTA finding its group and rows in device memory), so a grouped row runs the very code a plain
// call runs on it. The pieces the products on quantized weights share with these (the chunk, its
// partials and their sum, x's bf16 terms, the grouped launches' tiles) are in matmul_common.cuh.

#include "matmul.h"

#include <mma.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include "bf16_stream.h"
#include "elementwise.h"
#include "launch.h"
#include "m1/error.h"
#include "matmul_common.cuh"
#include "quantized_matmul.h"
#include "quantized_stream.h"
#include "warp_mma.h"
#include "warpgroup_mma.h"

namespace m1::cuda {
namespace {

using namespace nvcuda;

// A weight as the fp32-core kernels store and read it: F32 or F16 (BF16 weights take the tensor
// cores in either operand mode).
template <DType T>
using Stored = std::conditional_t<T == DType::kF32, float, uint16_t>;

template <DType T>
__device__ __forceinline__ float widen(Stored<T> v) {
  static_assert(T == DType::kF32 || T == DType::kF16);
  if constexpr (T == DType::kF32)
    return v;
  else
    return __half2float(__ushort_as_half(v));
}

// Elements [k, k + 8) of a row of 16-bit values, zero past `bound`. vec: the row start is
// 16-byte aligned and bound % 8 == 0, so the eight are wholly inside or outside.
__device__ __forceinline__ uint4 load_16bit_x8(const uint16_t* row, int64_t k, int64_t bound, bool vec) {
  if (vec) return k < bound ? *reinterpret_cast<const uint4*>(row + k) : make_uint4(0, 0, 0, 0);
  uint32_t h[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) h[e] = k + e < bound ? row[k + e] : 0u;
  return make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);
}

// Elements [k, k + 8) of a row as fp32, zero past `bound`. vec: the row start is 16-byte aligned
// and bound is a multiple of the values per 16 bytes.
template <DType T>
__device__ __forceinline__ void load_f32_x8(const Stored<T>* row, int64_t k, int64_t bound, bool vec, float (&v)[8]) {
  if constexpr (T == DType::kF32) {
    if (vec) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float4 f = k + 4 * h < bound ? *reinterpret_cast<const float4*>(row + k + 4 * h) : make_float4(0, 0, 0, 0);
        v[4 * h] = f.x, v[4 * h + 1] = f.y, v[4 * h + 2] = f.z, v[4 * h + 3] = f.w;
      }
      return;
    }
  } else {
    if (vec) {
      const uint4 u = load_16bit_x8(row, k, bound, true);
      const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        v[2 * e] = widen<T>(uint16_t(words[e] & 0xffff));
        v[2 * e + 1] = widen<T>(uint16_t(words[e] >> 16));
      }
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = k + e < bound ? widen<T>(row[k + e]) : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// F32 and F16 weights, few rows: CTA (block of 64 outputs, one chunk). The chunk of 64 weight
// rows is staged in shared memory in its stored dtype (rows padded to an odd number of words, so a
// warp reading one column of 32 rows hits 32 banks); thread (column, group) runs the fmaf chain of
// its column for rows group, group + 4, ...

constexpr int kF32SkinnyThreads = 256;
constexpr int kF32SkinnyCols = 64;
constexpr int kF32SkinnyGroups = kF32SkinnyThreads / kF32SkinnyCols;
constexpr int kF32SkinnyMaxRows = 32;

template <DType T>
constexpr int kF32SkinnyStride = T == DType::kF32 ? kChunk + 1 : kChunk + 2;

template <DType T>
constexpr int f32_skinny_shared_bytes(int64_t m) {
  return int(kF32SkinnyCols * kF32SkinnyStride<T> * sizeof(Stored<T>) + m * kChunk * sizeof(float));
}

template <DType T, int kRowsPerThread>
__device__ __forceinline__ void f32_skinny_block(const float* x, int64_t ldx, int64_t m, const Stored<T>* w, int64_t n,
                                                 int64_t k, bool w_vec, float* partial, int64_t plane_rows, float* out,
                                                 int64_t ldo, int* counters) {
  using S = Stored<T>;
  constexpr int kStride = kF32SkinnyStride<T>;
  extern __shared__ __align__(16) unsigned char f32_skinny_shared[];
  S* ws = reinterpret_cast<S*>(f32_skinny_shared);
  float* xs = reinterpret_cast<float*>(f32_skinny_shared + kF32SkinnyCols * kStride * sizeof(S));

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t n0 = blockIdx.y * int64_t(kF32SkinnyCols), c0 = blockIdx.x * int64_t(kChunk);
  const int klen = int(std::min<int64_t>(kChunk, k - c0));

  // Weights: warp w stages rows w, w + 8, ...; in the aligned case all its 16-byte loads are
  // issued before the first store, so many are in flight.
  constexpr int kRowsPerWarp = kF32SkinnyCols / (kF32SkinnyThreads / 32);
  if (w_vec) {
    constexpr int kPerVector = 16 / sizeof(S);
    constexpr int kVectorsPerLane = kChunk / kPerVector / 32;
    uint4 staged[kRowsPerWarp][kVectorsPerLane];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t row = n0 + warp + i * (kF32SkinnyThreads / 32);
#pragma unroll
      for (int p = 0; p < kVectorsPerLane; ++p) {
        const int kk = (p * 32 + lane) * kPerVector;
        staged[i][p] = row < n && kk < klen ? *reinterpret_cast<const uint4*>(w + row * k + c0 + kk) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int row = warp + i * (kF32SkinnyThreads / 32);
#pragma unroll
      for (int p = 0; p < kVectorsPerLane; ++p) {
        const int kk = (p * 32 + lane) * kPerVector;
        // Word-aligned: kStride * sizeof(S) is a whole number of words, and kk is even.
        uint32_t* dst = reinterpret_cast<uint32_t*>(ws + row * kStride + kk);
        dst[0] = staged[i][p].x, dst[1] = staged[i][p].y, dst[2] = staged[i][p].z, dst[3] = staged[i][p].w;
      }
    }
  } else {
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int row = warp + i * (kF32SkinnyThreads / 32);
      const bool valid = n0 + row < n;
      for (int kk = lane; kk < kChunk; kk += 32) ws[row * kStride + kk] = valid && kk < klen ? w[(n0 + row) * k + c0 + kk] : S(0);
    }
  }
  for (int i = tid; i < m * kChunk; i += kF32SkinnyThreads) {
    const int r = i / kChunk, kk = i % kChunk;
    xs[i] = kk < klen ? x[r * ldx + c0 + kk] : 0.0f;
  }
  __syncthreads();

  const int col = tid % kF32SkinnyCols, group = tid / kF32SkinnyCols;
  float part[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) part[i] = 0.0f;
  const S* wcol = ws + col * kStride;
  for (int kk = 0; kk < klen; ++kk) {
    const float wv = widen<T>(wcol[kk]);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = group + i * kF32SkinnyGroups;
      if (r < m) part[i] = fmaf(xs[r * kChunk + kk], wv, part[i]);
    }
  }
  if (n0 + col < n) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = group + i * kF32SkinnyGroups;
      if (r < m) write_partial(part[i], r, n0 + col, plane_rows, n, partial, out, ldo);
    }
  }
  if (partial) fold_chunk_partials(counters, partial, plane_rows, m, n0, kF32SkinnyCols, n, out, ldo);
}

template <DType T, int kRowsPerThread>
__global__ __launch_bounds__(kF32SkinnyThreads) void matmul_f32_skinny(const float* x, int64_t ldx, int64_t m,
                                                                      const Stored<T>* w, int64_t n, int64_t k,
                                                                      bool w_vec, float* partial, float* out,
                                                                      int64_t ldo, int* counters) {
  f32_skinny_block<T, kRowsPerThread>(x, ldx, m, w, n, k, w_vec, partial, m, out, ldo, counters);
}

// Grid z: tiles of up to kRowsPerThread * kF32SkinnyGroups rows of a group; the partials have one
// row per row of x.
template <DType T, int kRowsPerThread>
__global__ __launch_bounds__(kF32SkinnyThreads) void grouped_f32_skinny(const float* x, int64_t ldx, int64_t rows,
                                                                       const int64_t* offsets, int groups,
                                                                       GroupWeights weights, int64_t n, int64_t k,
                                                                       bool w_vec, float* partial, float* out,
                                                                       int64_t ldo, int* counters) {
  GroupTile t;
  if (!find_tile(offsets, groups, kRowsPerThread * kF32SkinnyGroups, blockIdx.z, t)) return;
  const int64_t r0 = t.row0 + t.first;
  f32_skinny_block<T, kRowsPerThread>(x + r0 * ldx, ldx, t.rows, static_cast<const Stored<T>*>(weights.data[t.group]),
                                      n, k, w_vec, partial ? partial + r0 * n : nullptr, rows, out + r0 * ldo, ldo,
                                      counters);
}

// ---------------------------------------------------------------------------------------------
// F32 and F16 weights, many rows: 64 x 64 output tile per CTA of 256 threads, 4 x 4 outputs per
// thread, k-tiles of 32 staged in shared memory as fp32 (k-major, so a thread reads its 4 rows or
// columns as one float4), the next k-tile fetched into registers while the current one is
// multiplied.

constexpr int kF32TileM = 64, kF32TileN = 64, kF32TileK = 32, kF32TileThreads = 256;
static_assert(kChunk % kF32TileK == 0, "a chunk must be whole k-tiles");

// The tile of rows [m0, m0 + kF32TileM) of x [m, k].
template <DType T>
__device__ __forceinline__ void f32_tile(const float* x, int64_t ldx, int64_t m, bool x_vec, const Stored<T>* w,
                                         int64_t n, int64_t k, bool w_vec, float* out, int64_t ldo, int64_t m0) {
  __shared__ __align__(16) float xs[2][kF32TileK][kF32TileM];
  __shared__ __align__(16) float ws[2][kF32TileK][kF32TileN];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n0 = blockIdx.y * int64_t(kF32TileN);
  // Loader: tile row (of x and of w) and which 8 of the k-tile's 32 values.
  const int load_row = tid % 64, load_k = (tid / 64) * 8;
  const bool x_row = m0 + load_row < m, w_row = n0 + load_row < n;
  const float* x_src = x + (x_row ? (m0 + load_row) * ldx : 0);
  const Stored<T>* w_src = w + (w_row ? (n0 + load_row) * k : 0);

  float xv[8], wv[8];
  auto fetch = [&](int64_t k0) {
    if (x_row)
      load_f32_x8<DType::kF32>(x_src, k0 + load_k, k, x_vec, xv);
    else
      for (float& v : xv) v = 0.0f;
    if (w_row)
      load_f32_x8<T>(w_src, k0 + load_k, k, w_vec, wv);
    else
      for (float& v : wv) v = 0.0f;
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      xs[buf][load_k + e][load_row] = xv[e];
      ws[buf][load_k + e][load_row] = wv[e];
    }
  };

  float part[4][4], total[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) part[i][j] = total[i][j] = 0.0f;

  const int64_t tiles = ceil_div(k, kF32TileK);
  constexpr int kTilesPerChunk = kChunk / kF32TileK;
  fetch(0);
  stash(0);
  __syncthreads();
  for (int64_t t = 0; t < tiles; ++t) {
    const int buf = int(t & 1);
    if (t + 1 < tiles) fetch((t + 1) * kF32TileK);
#pragma unroll
    for (int kk = 0; kk < kF32TileK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&xs[buf][kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&ws[buf][kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = fmaf(av[i], bv[j], part[i][j]);
    }
    if ((t + 1) % kTilesPerChunk == 0 || t + 1 == tiles) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          total[i][j] = __fadd_rn(total[i][j], part[i][j]);
          part[i][j] = 0.0f;
        }
    }
    if (t + 1 < tiles) stash(buf ^ 1);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = m0 + ty * 4 + i;
    if (r >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = n0 + tx * 4 + j;
      if (c < n) out[r * ldo + c] = total[i][j];
    }
  }
}

template <DType T>
__global__ __launch_bounds__(kF32TileThreads) void matmul_f32_tiled(const float* x, int64_t ldx, int64_t m, bool x_vec,
                                                                   const Stored<T>* w, int64_t n, int64_t k, bool w_vec,
                                                                   float* out, int64_t ldo) {
  f32_tile<T>(x, ldx, m, x_vec, w, n, k, w_vec, out, ldo, blockIdx.x * int64_t(kF32TileM));
}

// Grid x: the groups' row tiles, in group order.
template <DType T>
__global__ __launch_bounds__(kF32TileThreads) void grouped_f32_tiled(const float* x, int64_t ldx,
                                                                    const int64_t* offsets, int groups, bool x_vec,
                                                                    GroupWeights weights, int64_t n, int64_t k,
                                                                    bool w_vec, float* out, int64_t ldo) {
  GroupTile t;
  if (!find_tile(offsets, groups, kF32TileM, blockIdx.x, t)) return;
  f32_tile<T>(x + t.row0 * ldx, ldx, t.group_rows, x_vec, static_cast<const Stored<T>*>(weights.data[t.group]), n, k,
              w_vec, out + t.row0 * ldo, ldo, t.first);
}

// ---------------------------------------------------------------------------------------------
// BF16 weights: wmma m16n16k16, the kParts bf16 terms of x (split_to_bf16) as matrix_a, weights
// as matrix_b, in every kernel; each step multiplies the terms last to first (lo, mid, hi).

// (FragA, FragB, FragC and chunk_steps: matmul_common.cuh, shared with bf16_stream.cu.)

// Few rows: CTA (block of 64 outputs, one chunk) of 4 warps, warp i owning outputs
// [16 i, 16 i + 16) of the block. Each warp stages its own 16 weight rows (512 bytes of a chunk
// each: one 16-byte load per lane per row, all 16 in flight); the CTA stages the chunk of x's
// fp32 rows as their bf16 terms (split as split_to_bf16 splits them, so the same bits without its
// launch: x is a few rows, read from L2 by every CTA at little cost beside the weights) and walks
// them 16 at a time. The last CTA of a column block adds its chunk partials (fold_chunk_partials).

constexpr int kBf16SkinnyWarps = 4;
constexpr int kBf16SkinnyCols = 16 * kBf16SkinnyWarps;
constexpr int kBf16SkinnyMaxRows = 64;
constexpr int kBf16Stride = kChunk + 8;  // a multiple of 8 (wmma), rows 16-byte aligned, banks staggered

int bf16_skinny_shared_bytes(int parts, int64_t rows16) {
  return int((kBf16SkinnyCols + parts * rows16) * kBf16Stride * sizeof(__nv_bfloat16) +
             kBf16SkinnyWarps * 256 * sizeof(float));
}

// x: m rows of fp32, ldx apart.
template <int kParts>
__device__ __forceinline__ void bf16_skinny_block(const float* x, int64_t ldx, int64_t m, const uint16_t* w, int64_t n,
                                                  int64_t k, bool w_vec, float* partial, int64_t plane_rows, float* out,
                                                  int64_t ldo, int* counters) {
  extern __shared__ __align__(128) unsigned char bf16_skinny_shared[];
  const int64_t rows16 = (m + 15) / 16 * 16;
  __nv_bfloat16* ws = reinterpret_cast<__nv_bfloat16*>(bf16_skinny_shared);
  __nv_bfloat16* xs = ws + kBf16SkinnyCols * kBf16Stride;  // term q's rows from xs + q * rows16 * kBf16Stride
  float* stage = reinterpret_cast<float*>(xs + kParts * rows16 * kBf16Stride);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t n0 = blockIdx.y * int64_t(kBf16SkinnyCols), c0 = blockIdx.x * int64_t(kChunk);

  uint4 staged[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t row = n0 + warp * 16 + i;
    const int64_t kk = c0 + lane * 8;
    staged[i] = row < n ? load_16bit_x8(w + row * k, kk, k, w_vec) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) *reinterpret_cast<uint4*>(ws + (warp * 16 + i) * kBf16Stride + lane * 8) = staged[i];
  for (int64_t i = tid; i < rows16 * (kChunk / 8); i += kBf16SkinnyWarps * 32) {
    const int64_t r = i / (kChunk / 8), kk = (i % (kChunk / 8)) * 8;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = r < m && c0 + kk + e < k ? x[r * ldx + c0 + kk + e] : 0.0f;
    store_bf16_terms_x8<kParts>(v, xs + r * kBf16Stride + kk, rows16 * kBf16Stride);
  }
  __syncthreads();

  const int steps = chunk_steps(c0, k);
  float* my_stage = stage + warp * 256;
  const int64_t col0 = n0 + warp * 16;
  for (int64_t r0 = 0; r0 < rows16; r0 += 16) {
    FragC part;
    wmma::fill_fragment(part, 0.0f);
    for (int s = 0; s < steps; ++s) {
      FragB b;
      wmma::load_matrix_sync(b, ws + warp * 16 * kBf16Stride + s * 16, kBf16Stride);
#pragma unroll
      for (int q = kParts - 1; q >= 0; --q) {
        FragA a;
        wmma::load_matrix_sync(a, xs + (q * rows16 + r0) * kBf16Stride + s * 16, kBf16Stride);
        wmma::mma_sync(part, a, b, part);
      }
    }
    wmma::store_matrix_sync(my_stage, part, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int64_t r = r0 + e / 16, col = col0 + e % 16;
      if (r < m && col < n) write_partial(my_stage[e], r, col, plane_rows, n, partial, out, ldo);
    }
    __syncwarp();
  }
  if (partial) fold_chunk_partials(counters, partial, plane_rows, m, n0, kBf16SkinnyCols, n, out, ldo);
}

template <int kParts>
__global__ __launch_bounds__(kBf16SkinnyWarps * 32) void matmul_bf16_skinny(const float* x, int64_t ldx, int64_t m,
                                                                          const uint16_t* w, int64_t n, int64_t k,
                                                                          bool w_vec, float* partial, float* out,
                                                                          int64_t ldo, int* counters) {
  bf16_skinny_block<kParts>(x, ldx, m, w, n, k, w_vec, partial, m, out, ldo, counters);
}

// Grid z: tiles of up to tile_rows (a multiple of 16, at most kBf16SkinnyMaxRows) rows of a group.
template <int kParts>
__global__ __launch_bounds__(kBf16SkinnyWarps * 32) void grouped_bf16_skinny(const float* x, int64_t ldx, int64_t rows,
                                                                           const int64_t* offsets, int groups,
                                                                           int64_t tile_rows, GroupWeights weights,
                                                                           int64_t n, int64_t k, bool w_vec,
                                                                           float* partial, float* out, int64_t ldo,
                                                                           int* counters) {
  GroupTile t;
  if (!find_tile(offsets, groups, tile_rows, blockIdx.z, t)) return;
  const int64_t r0 = t.row0 + t.first;
  bf16_skinny_block<kParts>(x + r0 * ldx, ldx, t.rows, static_cast<const uint16_t*>(weights.data[t.group]), n, k, w_vec,
                            partial ? partial + r0 * n : nullptr, rows, out + r0 * ldo, ldo, counters);
}

// Many rows: a kTileM x 128 output tile per CTA of 8 warps, each warp 32 rows by the columns its
// place across gives it (kTileM 128: 4 down, 2 across, 2 x 4 fragments each; kTileM 32, for few
// rows whose skinny partials would not fit: 8 across, 2 x 1 fragments, two CTAs per SM). k-tiles
// of 64 of each term of x and of the weights stream into a ring of stages in dynamic shared
// memory (cp.async), stages - 1 tiles in flight while one is multiplied, with one barrier per
// k-tile: the bytes in flight per SM, not one tile's latency, set the pace.

constexpr int kBf16TileN = 128, kBf16TileK = 64, kBf16TileThreads = 256;
constexpr int kBf16TileStride = kBf16TileK + 8;  // 144-byte rows: a fragment's 8 row reads hit distinct banks
static_assert(kChunk % kBf16TileK == 0, "a chunk must be whole k-tiles");

template <int kTileM>
struct Bf16Tile {
  static_assert(kTileM == 32 || kTileM == 128);
  static constexpr int kWarpsN = kBf16TileThreads / 32 / (kTileM / 32), kFragsN = kBf16TileN / 16 / kWarpsN;
  static constexpr int kAElements = kTileM * kBf16TileStride, kBElements = kBf16TileN * kBf16TileStride;
  static constexpr int kUnits = kBf16TileK / 8;  // 16-byte units per row of a k-tile
  static constexpr int kALoads = (kTileM * kUnits + kBf16TileThreads - 1) / kBf16TileThreads;  // per thread and term
  static constexpr int kBLoads = kBf16TileN * kUnits / kBf16TileThreads;
  static constexpr int kMinBlocks = kTileM == 128 ? 1 : 2;  // CTAs per SM the registers must allow
  static constexpr int stage_bytes(int parts) { return (parts * kAElements + kBElements) * 2; }
  // As many stages (at most 4) as fit kMinBlocks times in an SM's 227 KB: 4 for one term of x,
  // 3 for three (216 KB at 128 rows, 95 KB at 32).
  static constexpr int stages(int parts) {
    return stage_bytes(parts) * 4 * kMinBlocks <= 227 * 1024 ? 4 : 3;
  }
  // The ring of [terms of x..., weights] k-tiles; the epilogue stages 8 warps' fragments there.
  static constexpr int shared_bytes(int parts) { return stages(parts) * stage_bytes(parts); }
  static_assert(shared_bytes(1) >= 8 * 256 * sizeof(float));
  static_assert(shared_bytes(3) * kMinBlocks <= 227 * 1024, "the ring must fit the SM kMinBlocks times");
};

// The tile of rows [m0, m0 + kTileM) of x [m, k], its terms `term_stride` elements apart from xb.
template <int kParts, int kTileM>
__device__ __forceinline__ void bf16_tile(const __nv_bfloat16* xb, int64_t ldb, int64_t term_stride, int64_t m,
                                          const uint16_t* w, int64_t n, int64_t k, bool w_vec, float* out, int64_t ldo,
                                          int64_t m0) {
  using Shape = Bf16Tile<kTileM>;
  constexpr int kFragsN = Shape::kFragsN;
  extern __shared__ __align__(128) unsigned char bf16_tile_shared[];
  __nv_bfloat16* shared = reinterpret_cast<__nv_bfloat16*>(bf16_tile_shared);
  constexpr int kStages = Shape::stages(kParts), kUnits = Shape::kUnits;
  constexpr int kStage = kParts * Shape::kAElements + Shape::kBElements;  // one stage's elements
  auto a_tile = [&](int buf, int q) { return shared + buf * kStage + q * Shape::kAElements; };
  auto b_tile = [&](int buf) { return shared + buf * kStage + kParts * Shape::kAElements; };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / Shape::kWarpsN, warp_n = warp % Shape::kWarpsN;
  const int64_t n0 = blockIdx.y * int64_t(kBf16TileN);
  const int64_t tiles = ceil_div(k, kBf16TileK);

  // k-tile t into stage t % kStages: rows x kUnits groups of 8 values per operand, (row, group)
  // pairs dealt out over the threads, zeros past the rows and past the inner dimension (x's terms
  // are padded to ldb with zeros). Weights whose rows are not 16-byte units (w_vec false) are
  // loaded and stored by the thread instead; the barrier before the stage is read covers both.
  // Every call commits a group, empty past the last tile, so the wait count stays uniform.
  auto stage = [&](int64_t t) {
    if (t < tiles) {
      const int buf = int(t % kStages);
      const int64_t k0 = t * kBf16TileK;
#pragma unroll
      for (int i = 0; i < Shape::kALoads; ++i) {
        const int id = tid + i * kBf16TileThreads, row = id / kUnits, kk = (id % kUnits) * 8;
        if (id >= kTileM * kUnits) continue;
        const bool valid = m0 + row < m && k0 + kk < ldb;
#pragma unroll
        for (int q = 0; q < kParts; ++q) {
          const __nv_bfloat16* src = xb + q * term_stride + (m0 + row) * ldb + k0 + kk;
          __pipeline_memcpy_async(a_tile(buf, q) + row * kBf16TileStride + kk, valid ? src : xb, 16, valid ? 0 : 16);
        }
      }
#pragma unroll
      for (int i = 0; i < Shape::kBLoads; ++i) {
        const int id = tid + i * kBf16TileThreads, row = id / kUnits, kk = (id % kUnits) * 8;
        __nv_bfloat16* dst = b_tile(buf) + row * kBf16TileStride + kk;
        const uint16_t* w_row = w + (n0 + row) * k;
        if (w_vec) {
          const bool valid = n0 + row < n && k0 + kk < k;
          __pipeline_memcpy_async(dst, valid ? w_row + k0 + kk : w, 16, valid ? 0 : 16);
        } else {
          *reinterpret_cast<uint4*>(dst) =
              n0 + row < n ? load_16bit_x8(w_row, k0 + kk, k, false) : make_uint4(0, 0, 0, 0);
        }
      }
    }
    __pipeline_commit();
  };

  FragC part[2][kFragsN], total[2][kFragsN];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) {
      wmma::fill_fragment(part[i][j], 0.0f);
      wmma::fill_fragment(total[i][j], 0.0f);
    }

  constexpr int kTilesPerChunk = kChunk / kBf16TileK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) stage(s);
  for (int64_t t = 0; t < tiles; ++t) {
    __pipeline_wait_prior(kStages - 2);  // tile t has landed (this thread's copies)
    __syncthreads();  // ... every thread's, and every warp is done with tile t - 1, whose stage refills next
    stage(t + kStages - 1);
    const int buf = int(t % kStages);
#pragma unroll
    for (int s = 0; s < kBf16TileK / 16; ++s) {
      if (t * kBf16TileK + s * 16 >= k) break;  // the same steps as chunk_steps
      FragB b[kFragsN];
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
        wmma::load_matrix_sync(b[j], b_tile(buf) + (warp_n * kFragsN * 16 + j * 16) * kBf16TileStride + s * 16,
                               kBf16TileStride);
#pragma unroll
      for (int q = kParts - 1; q >= 0; --q) {
        FragA a[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(a[i], a_tile(buf, q) + (warp_m * 32 + i * 16) * kBf16TileStride + s * 16,
                                 kBf16TileStride);
#pragma unroll
        for (int j = 0; j < kFragsN; ++j)
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(part[i][j], a[i], b[j], part[i][j]);
      }
    }
    if ((t + 1) % kTilesPerChunk == 0 || t + 1 == tiles) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) {
#pragma unroll
          for (int e = 0; e < total[i][j].num_elements; ++e) total[i][j].x[e] = __fadd_rn(total[i][j].x[e], part[i][j].x[e]);
          wmma::fill_fragment(part[i][j], 0.0f);
        }
    }
  }
  __pipeline_wait_prior(0);  // the empty groups
  __syncthreads();           // every warp is done with the ring, whose space the fragments pass through next

  // Fragments go through shared memory so edge tiles can be stored with bounds checks.
  float* stage_out = reinterpret_cast<float*>(shared) + warp * 256;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kFragsN; ++j) {
      wmma::store_matrix_sync(stage_out, total[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t r0 = m0 + warp_m * 32 + i * 16, c0 = n0 + (warp_n * kFragsN + j) * 16;
      for (int e = lane; e < 256; e += 32) {
        const int64_t r = r0 + e / 16, c = c0 + e % 16;
        if (r < m && c < n) out[r * ldo + c] = stage_out[e];
      }
      __syncwarp();
    }
}

template <int kParts, int kTileM>
__global__ __launch_bounds__(kBf16TileThreads, Bf16Tile<kTileM>::kMinBlocks) void matmul_bf16_tiled(
    const __nv_bfloat16* xb, int64_t ldb, int64_t m, const uint16_t* w, int64_t n, int64_t k, bool w_vec, float* out,
    int64_t ldo) {
  bf16_tile<kParts, kTileM>(xb, ldb, m * ldb, m, w, n, k, w_vec, out, ldo, blockIdx.x * int64_t(kTileM));
}

// Grid x: the groups' row tiles, in group order; `rows`, x's rows, sets the terms apart.
template <int kParts, int kTileM>
__global__ __launch_bounds__(kBf16TileThreads, Bf16Tile<kTileM>::kMinBlocks) void grouped_bf16_tiled(
    const __nv_bfloat16* xb, int64_t ldb, int64_t rows, const int64_t* offsets, int groups, GroupWeights weights,
    int64_t n, int64_t k, bool w_vec, float* out, int64_t ldo) {
  GroupTile t;
  if (!find_tile(offsets, groups, kTileM, blockIdx.x, t)) return;
  bf16_tile<kParts, kTileM>(xb + t.row0 * ldb, ldb, rows * ldb, t.group_rows,
                            static_cast<const uint16_t*>(weights.data[t.group]), n, k, w_vec, out + t.row0 * ldo, ldo,
                            t.first);
}

// ---------------------------------------------------------------------------------------------
// Many rows on Hopper (sm_90a): the same 128 x 128 output tiles and the same fixed sequence per
// output as bf16_tile, on the warpgroup tensor cores (warpgroup_mma.h). Two warpgroups of 4 warps,
// each 64 rows by the 128 columns, one m64n128k16 product per 16 inputs and term of x (terms last
// to first, the chunk's first product not accumulating: the fresh partial), its partial closed
// into the total as each chunk ends. k-tiles of 64 inputs (one 128-byte swizzled row each) of
// every term of x and of the weights stream through a ring of stages; the products of a tile run
// while the next tiles land, and a stage is refilled once the products of the tile before its
// last one are done (each warpgroup waits for all but its newest group before the barrier).

constexpr int kWarpgroupTileM = 128, kWarpgroupTileN = 128, kWarpgroupTileK = 64, kWarpgroupThreads = 256;
static_assert(kWarpgroupTileK * 2 == kSwizzleRowBytes, "a k-tile row is one swizzled row");
static_assert(kChunk % kWarpgroupTileK == 0, "a chunk must be whole k-tiles");

struct WarpgroupTile {
  static constexpr int kTileBytes = kWarpgroupTileM * kSwizzleRowBytes;  // 16 KB: x's terms and the weights alike
  static_assert(kWarpgroupTileN == kWarpgroupTileM, "one tile size for both operands");
  static constexpr int stage_bytes(int parts) { return (parts + 1) * kTileBytes; }
  // Six stages for one term of x (192 KB), three for three; a tile's loads run stages - 2 tiles
  // ahead of its products.
  static constexpr int stages(int parts) { return std::min(6, (227 * 1024 - kSwizzleAtomBytes) / stage_bytes(parts)); }
  // The ring, and room to align it to the swizzle's 1024 bytes wherever dynamic memory starts.
  static constexpr int shared_bytes(int parts) { return stages(parts) * stage_bytes(parts) + kSwizzleAtomBytes; }
};
static_assert(WarpgroupTile::stages(3) >= 3 && WarpgroupTile::shared_bytes(1) <= 227 * 1024 &&
              WarpgroupTile::shared_bytes(3) <= 227 * 1024);

// The tile of rows [m0, m0 + 128) of x [m, k] (terms `term_stride` elements apart from xb) by the
// 128 weight rows from blockIdx.y. Built for sm_90a only: elsewhere it traps (the launchers take
// it only where DeviceLimits::warpgroup_mma says the GPU and the build have it).
template <int kParts>
__device__ __forceinline__ void bf16_warpgroup_tile(const __nv_bfloat16* xb, int64_t ldb, int64_t term_stride,
                                                    int64_t m, const uint16_t* w, int64_t n, int64_t k, bool w_vec,
                                                    float* out, int64_t ldo, int64_t m0) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#else
  constexpr int kStages = WarpgroupTile::stages(kParts), kTile = WarpgroupTile::kTileBytes;
  constexpr int kStage = WarpgroupTile::stage_bytes(kParts);
  constexpr int kUnits = kSwizzleRowBytes / 16;  // 16-byte units per row of a k-tile
  constexpr int kLoads = kWarpgroupTileM * kUnits / kWarpgroupThreads;  // per thread, operand and term
  extern __shared__ __align__(128) unsigned char warpgroup_shared[];
  const uint32_t window = shared_address(warpgroup_shared);
  const uint32_t pad = (kSwizzleAtomBytes - window % kSwizzleAtomBytes) % kSwizzleAtomBytes;
  unsigned char* ring = warpgroup_shared + pad;
  const uint32_t ring_address = window + pad;

  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int64_t n0 = blockIdx.y * int64_t(kWarpgroupTileN);
  const int64_t tiles = ceil_div(k, kWarpgroupTileK);

  // k-tile t into stage t % kStages: x's terms, then the weights, 16-byte units dealt out over the
  // threads into their swizzled places, zeros past the rows and past the inner dimension (x's
  // terms are padded to ldb with zeros). Every call commits a group, empty past the last tile.
  auto stage = [&](int64_t t) {
    if (t < tiles) {
      unsigned char* at = ring + int(t % kStages) * kStage;
      const int64_t k0 = t * kWarpgroupTileK;
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int id = tid + i * kWarpgroupThreads, row = id / kUnits, unit = id % kUnits, kk = unit * 8;
        const int offset = swizzled_unit_offset(row, unit);
        const bool x_valid = m0 + row < m && k0 + kk < ldb;
#pragma unroll
        for (int q = 0; q < kParts; ++q) {
          const __nv_bfloat16* src = xb + q * term_stride + (m0 + row) * ldb + k0 + kk;
          __pipeline_memcpy_async(at + q * kTile + offset, x_valid ? src : xb, 16, x_valid ? 0 : 16);
        }
        unsigned char* dst = at + kParts * kTile + offset;
        const uint16_t* w_row = w + (n0 + row) * k;
        if (w_vec) {
          const bool valid = n0 + row < n && k0 + kk < k;
          __pipeline_memcpy_async(dst, valid ? w_row + k0 + kk : w, 16, valid ? 0 : 16);
        } else {
          *reinterpret_cast<uint4*>(dst) = n0 + row < n ? load_16bit_x8(w_row, k0 + kk, k, false) : make_uint4(0, 0, 0, 0);
        }
      }
    }
    __pipeline_commit();
  };

  float part[64], total[64];
#pragma unroll
  for (int e = 0; e < 64; ++e) part[e] = total[e] = 0.0f;

  constexpr int kTilesPerChunk = kChunk / kWarpgroupTileK;
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) stage(s);
  for (int64_t t = 0; t < tiles; ++t) {
    __pipeline_wait_prior(kStages - 3);  // tile t has landed (this thread's copies) ...
    fence_shared_for_async_proxy();     // ... where the products read it
    __syncthreads();  // every thread's copies too; every warpgroup is done with tile t - 2, whose stage refills next
    stage(t + kStages - 2);
    const uint32_t at = ring_address + uint32_t(t % kStages) * kStage;
    // All four steps, also past k in the last tile: those add products of zeros (x's terms and the
    // weights are zero there), which leave each partial as it is, where chunk_steps stops.
    warpgroup_pin(part);
    warpgroup_fence();
#pragma unroll
    for (int s = 0; s < kWarpgroupTileK / 16; ++s) {
      const uint64_t b = swizzled_descriptor(at + kParts * kTile + 32 * s);
#pragma unroll
      for (int q = kParts - 1; q >= 0; --q) {
        const bool fresh = t % kTilesPerChunk == 0 && s == 0 && q == kParts - 1;  // the chunk's first product
        warpgroup_mma_128(part, swizzled_descriptor(at + q * kTile + warpgroup * (kTile / 2) + 32 * s), b, !fresh);
      }
    }
    warpgroup_commit();
    warpgroup_close_or_go_on((t + 1) % kTilesPerChunk == 0 || t + 1 == tiles, part, total,
                             [](int, float partial) { return partial; });
  }
  __pipeline_wait_prior(0);  // the empty groups
  store_warpgroup_tile(total, out, ldo, m, n, m0 + warpgroup * 64, n0);
#endif
}

template <int kParts>
__global__ __launch_bounds__(kWarpgroupThreads, 1) void matmul_bf16_warpgroup(const __nv_bfloat16* xb, int64_t ldb,
                                                                             int64_t m, const uint16_t* w, int64_t n,
                                                                             int64_t k, bool w_vec, float* out,
                                                                             int64_t ldo) {
  bf16_warpgroup_tile<kParts>(xb, ldb, m * ldb, m, w, n, k, w_vec, out, ldo, blockIdx.x * int64_t(kWarpgroupTileM));
}

// Grid x: the groups' row tiles, in group order; `rows`, x's rows, sets the terms apart.
template <int kParts>
__global__ __launch_bounds__(kWarpgroupThreads, 1) void grouped_bf16_warpgroup(
    const __nv_bfloat16* xb, int64_t ldb, int64_t rows, const int64_t* offsets, int groups, GroupWeights weights,
    int64_t n, int64_t k, bool w_vec, float* out, int64_t ldo) {
  GroupTile t;
  if (!find_tile(offsets, groups, kWarpgroupTileM, blockIdx.x, t)) return;
  bf16_warpgroup_tile<kParts>(xb + t.row0 * ldb, ldb, rows * ldb, t.group_rows,
                              static_cast<const uint16_t*>(weights.data[t.group]), n, k, w_vec, out + t.row0 * ldo,
                              ldo, t.first);
}

// ---------------------------------------------------------------------------------------------
// Host side. Grids put the unbounded count (chunks, row blocks) in x and output column blocks in
// y, which allows 65535 x 64 outputs: far more than any weight matrix has.

template <DType T, int kRowsPerThread>
void launch_f32_skinny_rows(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
                            float* partial, int* counters, Device& device, cudaStream_t stream) {
  constexpr auto kernel = matmul_f32_skinny<T, kRowsPerThread>;
  device.allow_shared_memory<kernel>(f32_skinny_shared_bytes<T>(kRowsPerThread * kF32SkinnyGroups));
  const int64_t chunks = ceil_div(w.cols, kChunk);
  const auto* weights = static_cast<const Stored<T>*>(w.data);
  const bool w_vec = aligned16(w.data) && w.cols % (16 / sizeof(Stored<T>)) == 0;
  const dim3 grid(unsigned(chunks), unsigned(ceil_div(w.rows, kF32SkinnyCols)));
  kernel<<<grid, kF32SkinnyThreads, f32_skinny_shared_bytes<T>(m), stream>>>(x, ldx, m, weights, w.rows, w.cols, w_vec,
                                                                            partial, out, ldo, counters);
  M1_CUDA_CHECK_LAUNCH();
}

template <DType T>
void launch_f32_skinny(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
                       float* partial, int* counters, Device& device, cudaStream_t stream) {
  if (m <= kF32SkinnyGroups)
    launch_f32_skinny_rows<T, 1>(x, ldx, m, w, out, ldo, partial, counters, device, stream);
  else if (m <= 2 * kF32SkinnyGroups)
    launch_f32_skinny_rows<T, 2>(x, ldx, m, w, out, ldo, partial, counters, device, stream);
  else if (m <= 4 * kF32SkinnyGroups)
    launch_f32_skinny_rows<T, 4>(x, ldx, m, w, out, ldo, partial, counters, device, stream);
  else
    launch_f32_skinny_rows<T, 8>(x, ldx, m, w, out, ldo, partial, counters, device, stream);
  static_assert(8 * kF32SkinnyGroups == kF32SkinnyMaxRows);
}

template <DType T>
void launch_f32_tiled(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
                      cudaStream_t stream) {
  const bool x_vec = aligned16(x) && ldx % 4 == 0 && w.cols % 4 == 0;
  const bool w_vec = aligned16(w.data) && w.cols % (16 / sizeof(Stored<T>)) == 0;
  const dim3 grid(unsigned(ceil_div(m, kF32TileM)), unsigned(ceil_div(w.rows, kF32TileN)));
  matmul_f32_tiled<T><<<grid, kF32TileThreads, 0, stream>>>(x, ldx, m, x_vec, static_cast<const Stored<T>*>(w.data),
                                                            w.rows, w.cols, w_vec, out, ldo);
  M1_CUDA_CHECK_LAUNCH();
}

template <DType T>
void matmul_f32(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
                DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const int64_t chunks = ceil_div(w.cols, kChunk);
  if (m > kF32SkinnyMaxRows || !skinny_partials_fit(chunks, m, w.rows, device)) {
    launch_f32_tiled<T>(x, ldx, m, w, out, ldo, stream);
    return;
  }
  float* partial = chunks > 1 ? scratch.get<float>(size_t(chunks * m * w.rows)) : nullptr;
  int* counters = fold_counters(scratch, partial, ceil_div(w.rows, kF32SkinnyCols));
  launch_f32_skinny<T>(x, ldx, m, w, out, ldo, partial, counters, device, stream);
}

// Products of at most this many rows per group that take the tiled kernels (their skinny partials
// would not fit) run in tiles of this height; more rows take 128-row tiles.
constexpr int64_t kBf16ShortTileRows = 32;

template <int kParts, int kTileM>
void launch_bf16_tiled(const __nv_bfloat16* xb, int64_t ldb, int64_t m, const uint16_t* w, int64_t n, int64_t k,
                       bool w_vec, float* out, int64_t ldo, Device& device, cudaStream_t stream) {
  constexpr auto kernel = matmul_bf16_tiled<kParts, kTileM>;
  constexpr int bytes = Bf16Tile<kTileM>::shared_bytes(kParts);
  device.allow_shared_memory<kernel>(bytes);
  const dim3 grid(unsigned(ceil_div(m, kTileM)), unsigned(ceil_div(n, kBf16TileN)));
  kernel<<<grid, kBf16TileThreads, bytes, stream>>>(xb, ldb, m, w, n, k, w_vec, out, ldo);
  M1_CUDA_CHECK_LAUNCH();
}

template <int kParts>
void launch_bf16_warpgroup(const __nv_bfloat16* xb, int64_t ldb, int64_t m, const uint16_t* w, int64_t n, int64_t k,
                           bool w_vec, float* out, int64_t ldo, Device& device, cudaStream_t stream) {
  constexpr auto kernel = matmul_bf16_warpgroup<kParts>;
  constexpr int bytes = WarpgroupTile::shared_bytes(kParts);
  device.allow_shared_memory<kernel>(bytes);
  const dim3 grid(unsigned(ceil_div(m, kWarpgroupTileM)), unsigned(ceil_div(n, kWarpgroupTileN)));
  kernel<<<grid, kWarpgroupThreads, bytes, stream>>>(xb, ldb, m, w, n, k, w_vec, out, ldo);
  M1_CUDA_CHECK_LAUNCH();
}

template <int kParts>
void matmul_bf16(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
                 DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const int64_t k = w.cols, n = w.rows, ldb = (k + 7) / 8 * 8;
  const int64_t chunks = ceil_div(k, kChunk);
  const bool skinny = m <= kBf16SkinnyMaxRows && skinny_partials_fit(chunks, m, n, device);
  const auto* weights = static_cast<const uint16_t*>(w.data);
  const bool w_vec = aligned16(w.data) && k % 8 == 0;
  if (!skinny) {
    __nv_bfloat16* xb = scratch.get<__nv_bfloat16>(size_t(kParts * m * ldb));
    launch_split_to_bf16<kParts>(x, ldx, m, k, xb, ldb, stream);
    if (m <= kBf16ShortTileRows)
      launch_bf16_tiled<kParts, kBf16ShortTileRows>(xb, ldb, m, weights, n, k, w_vec, out, ldo, device, stream);
    else if (device.limits().warpgroup_mma)
      launch_bf16_warpgroup<kParts>(xb, ldb, m, weights, n, k, w_vec, out, ldo, device, stream);
    else
      launch_bf16_tiled<kParts, 128>(xb, ldb, m, weights, n, k, w_vec, out, ldo, device, stream);
    return;
  }
  if (bf16_streams(m, x, ldx, std::span(&w, 1), kParts, device)) {
    const PlainProduct piece{w, out, ldo};
    bf16_stream_matmul(x, ldx, m, std::span(&piece, 1), kParts, scratch, device, stream);
    return;
  }
  constexpr auto kernel = matmul_bf16_skinny<kParts>;
  device.allow_shared_memory<kernel>(bf16_skinny_shared_bytes(kParts, kBf16SkinnyMaxRows));
  const int64_t rows16 = (m + 15) / 16 * 16;
  const dim3 grid(unsigned(chunks), unsigned(ceil_div(n, kBf16SkinnyCols)));
  float* partial = chunks > 1 ? scratch.get<float>(size_t(chunks * m * n)) : nullptr;
  int* counters = fold_counters(scratch, partial, grid.y);
  kernel<<<grid, kBf16SkinnyWarps * 32, bf16_skinny_shared_bytes(kParts, rows16), stream>>>(x, ldx, m, weights, n, k,
                                                                                          w_vec, partial, out, ldo,
                                                                                          counters);
  M1_CUDA_CHECK_LAUNCH();
}

template <DType T, int kRowsPerThread>
void launch_grouped_f32_skinny_rows(const float* x, int64_t ldx, int64_t rows, const int64_t* offsets,
                                    const GroupedProduct& product, float* partial, DeviceScratch& scratch,
                                    Device& device, cudaStream_t stream) {
  constexpr int kTileRows = kRowsPerThread * kF32SkinnyGroups;
  constexpr auto kernel = grouped_f32_skinny<T, kRowsPerThread>;
  device.allow_shared_memory<kernel>(f32_skinny_shared_bytes<T>(kTileRows));
  const int64_t n = product.w[0].rows, k = product.w[0].cols;
  const bool w_vec = all_aligned16(product.w) && k % (16 / sizeof(Stored<T>)) == 0;
  for_each_launch(product.w, [&](int64_t first, int count, const GroupWeights& weights) {
    const dim3 grid(unsigned(ceil_div(k, kChunk)), unsigned(ceil_div(n, kF32SkinnyCols)),
                    unsigned(grouped_tiles(rows, count, kTileRows)));
    int* counters = fold_counters(scratch, partial, int64_t(grid.y) * grid.z);
    kernel<<<grid, kF32SkinnyThreads, f32_skinny_shared_bytes<T>(kTileRows), stream>>>(
        x, ldx, rows, offsets + first, count, weights, n, k, w_vec, partial, product.out, product.ldo, counters);
    M1_CUDA_CHECK_LAUNCH();
  });
}

template <DType T>
void launch_grouped_f32_skinny(const float* x, int64_t ldx, int64_t rows, const int64_t* offsets, int64_t group_rows,
                               const GroupedProduct& product, float* partial, DeviceScratch& scratch, Device& device,
                               cudaStream_t stream) {
  if (group_rows <= kF32SkinnyGroups)
    launch_grouped_f32_skinny_rows<T, 1>(x, ldx, rows, offsets, product, partial, scratch, device, stream);
  else if (group_rows <= 2 * kF32SkinnyGroups)
    launch_grouped_f32_skinny_rows<T, 2>(x, ldx, rows, offsets, product, partial, scratch, device, stream);
  else if (group_rows <= 4 * kF32SkinnyGroups)
    launch_grouped_f32_skinny_rows<T, 4>(x, ldx, rows, offsets, product, partial, scratch, device, stream);
  else
    launch_grouped_f32_skinny_rows<T, 8>(x, ldx, rows, offsets, product, partial, scratch, device, stream);
}

// The grouped entry points below run the products one after another on the stream, so one set of
// chunk partials (and of fold counters) serves them all: a launch's partials are summed before the
// next one's are written.

template <DType T>
void grouped_f32(const float* x, int64_t ldx, const int64_t* offsets, std::span<const GroupedProduct> products,
                 int64_t rows, int64_t group_rows, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const int64_t n = products[0].w[0].rows, k = products[0].w[0].cols, groups = int64_t(products[0].w.size());
  const int64_t chunks = ceil_div(k, kChunk);
  // The smallest skinny tile (one row per thread group) bounds the grid.
  const bool skinny = group_rows <= kF32SkinnyMaxRows && skinny_grid_fits(rows, groups, kF32SkinnyGroups) &&
                      skinny_partials_fit(chunks, rows, n, device);
  if (!skinny) {
    const bool x_vec = aligned16(x) && ldx % 4 == 0 && k % 4 == 0;
    for (const GroupedProduct& p : products) {
      const bool w_vec = all_aligned16(p.w) && k % (16 / sizeof(Stored<T>)) == 0;
      for_each_launch(p.w, [&](int64_t first, int count, const GroupWeights& weights) {
        const dim3 grid(unsigned(grouped_tiles(rows, count, kF32TileM)), unsigned(ceil_div(n, kF32TileN)));
        grouped_f32_tiled<T><<<grid, kF32TileThreads, 0, stream>>>(x, ldx, offsets + first, count, x_vec, weights, n,
                                                                   k, w_vec, p.out, p.ldo);
        M1_CUDA_CHECK_LAUNCH();
      });
    }
    return;
  }
  float* partial = chunks > 1 ? scratch.get<float>(size_t(chunks * rows * n)) : nullptr;
  for (const GroupedProduct& p : products)
    launch_grouped_f32_skinny<T>(x, ldx, rows, offsets, group_rows, p, partial, scratch, device, stream);
}

// One grouped product through a tiled kernel (Kernel: `bytes` of dynamic shared memory, kThreads a
// CTA), its groups' rows in tiles of kTileM, kTileN columns a CTA.
template <auto Kernel, int kTileM, int kTileN, int kThreads>
void launch_grouped_tiles(const __nv_bfloat16* xb, int64_t ldb, int64_t rows, const int64_t* offsets,
                          const GroupedProduct& p, bool w_vec, int bytes, Device& device, cudaStream_t stream) {
  device.allow_shared_memory<Kernel>(bytes);
  const int64_t n = p.w[0].rows, k = p.w[0].cols;
  for_each_launch(p.w, [&](int64_t first, int count, const GroupWeights& weights) {
    const dim3 grid(unsigned(grouped_tiles(rows, count, kTileM)), unsigned(ceil_div(n, kTileN)));
    Kernel<<<grid, kThreads, bytes, stream>>>(xb, ldb, rows, offsets + first, count, weights, n, k, w_vec, p.out, p.ldo);
    M1_CUDA_CHECK_LAUNCH();
  });
}

template <int kParts, int kTileM>
void launch_grouped_bf16_tiled(const __nv_bfloat16* xb, int64_t ldb, int64_t rows, const int64_t* offsets,
                               const GroupedProduct& p, bool w_vec, Device& device, cudaStream_t stream) {
  launch_grouped_tiles<grouped_bf16_tiled<kParts, kTileM>, kTileM, kBf16TileN, kBf16TileThreads>(
      xb, ldb, rows, offsets, p, w_vec, Bf16Tile<kTileM>::shared_bytes(kParts), device, stream);
}

template <int kParts>
void launch_grouped_bf16_warpgroup(const __nv_bfloat16* xb, int64_t ldb, int64_t rows, const int64_t* offsets,
                                   const GroupedProduct& p, bool w_vec, Device& device, cudaStream_t stream) {
  launch_grouped_tiles<grouped_bf16_warpgroup<kParts>, kWarpgroupTileM, kWarpgroupTileN, kWarpgroupThreads>(
      xb, ldb, rows, offsets, p, w_vec, WarpgroupTile::shared_bytes(kParts), device, stream);
}

template <int kParts>
void grouped_bf16(const float* x, int64_t ldx, const int64_t* offsets, std::span<const GroupedProduct> products,
                  int64_t rows, int64_t group_rows, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const int64_t n = products[0].w[0].rows, k = products[0].w[0].cols, groups = int64_t(products[0].w.size());
  const int64_t ldb = (k + 7) / 8 * 8, chunks = ceil_div(k, kChunk);
  const int64_t tile_rows = (group_rows + 15) / 16 * 16;
  const bool skinny = group_rows <= kBf16SkinnyMaxRows && skinny_grid_fits(rows, groups, tile_rows) &&
                      skinny_partials_fit(chunks, rows, n, device);
  if (!skinny) {  // x's terms once for every product
    __nv_bfloat16* xb = scratch.get<__nv_bfloat16>(size_t(kParts * rows * ldb));
    launch_split_to_bf16<kParts>(x, ldx, rows, k, xb, ldb, stream);
    for (const GroupedProduct& p : products) {
      const bool w_vec = all_aligned16(p.w) && k % 8 == 0;
      if (group_rows <= kBf16ShortTileRows)
        launch_grouped_bf16_tiled<kParts, kBf16ShortTileRows>(xb, ldb, rows, offsets, p, w_vec, device, stream);
      else if (device.limits().warpgroup_mma)
        launch_grouped_bf16_warpgroup<kParts>(xb, ldb, rows, offsets, p, w_vec, device, stream);
      else
        launch_grouped_bf16_tiled<kParts, 128>(xb, ldb, rows, offsets, p, w_vec, device, stream);
    }
    return;
  }
  constexpr auto skinny_kernel = grouped_bf16_skinny<kParts>;
  device.allow_shared_memory<skinny_kernel>(bf16_skinny_shared_bytes(kParts, kBf16SkinnyMaxRows));
  const int64_t stream_rows =
      tallest_stream_tile(products, group_rows, rows, kBf16StreamMaxRows, [&](int64_t tile, const GroupedProduct& p) {
        return bf16_streams(tile, x, ldx, p.w, kParts, device);
      });
  if (stream_rows > 0)
    return bf16_stream_grouped(x, ldx, rows, offsets, stream_rows, products, kParts, scratch, device, stream);
  float* partial = chunks > 1 ? scratch.get<float>(size_t(chunks * rows * n)) : nullptr;
  for (const GroupedProduct& p : products) {
    const bool w_vec = all_aligned16(p.w) && k % 8 == 0;
    for_each_launch(p.w, [&](int64_t first, int count, const GroupWeights& weights) {
      const dim3 grid(unsigned(chunks), unsigned(ceil_div(n, kBf16SkinnyCols)),
                      unsigned(grouped_tiles(rows, count, tile_rows)));
      int* counters = fold_counters(scratch, partial, int64_t(grid.y) * grid.z);
      skinny_kernel<<<grid, kBf16SkinnyWarps * 32, bf16_skinny_shared_bytes(kParts, tile_rows), stream>>>(
          x, ldx, rows, offsets + first, count, tile_rows, weights, n, k, w_vec, partial, p.out, p.ldo, counters);
      M1_CUDA_CHECK_LAUNCH();
    });
  }
}

}  // namespace

namespace {

// Throws unless every product's weights share product 0's group count, shape and dtype (and, when
// quantized, its scales' dtype and group size).
void check_grouped(std::span<const GroupedProduct> products) {
  const std::span<const DeviceMatrix> w0 = products[0].w;
  for (size_t i = 0; i < products.size(); ++i) {
    const std::span<const DeviceMatrix> w = products[i].w;
    if (w.size() != w0.size()) fail("grouped_matmul: product {} has {} groups, product 0 {}", i, w.size(), w0.size());
    for (size_t g = 0; g < w.size(); ++g) {
      if (w[g].data == nullptr || w[g].dtype != w0[0].dtype || w[g].rows != w0[0].rows || w[g].cols != w0[0].cols)
        fail("grouped_matmul: weights of product {} group {} are {} [{}, {}], product 0 group 0's {} [{}, {}]", i, g,
             dtype_name(w[g].dtype), w[g].rows, w[g].cols, dtype_name(w0[0].dtype), w0[0].rows, w0[0].cols);
      if (is_quantized(w[g].dtype) && (w[g].scales == nullptr || w[g].group_size != w0[0].group_size ||
                                       w[g].scale_dtype != w0[0].scale_dtype))
        fail("grouped_matmul: weights of product {} group {} have {} scales per {} inputs, product 0 group 0's {} per {}",
             i, g, w[g].scales ? dtype_name(w[g].scale_dtype) : "no", w[g].group_size, dtype_name(w0[0].scale_dtype),
             w0[0].group_size);
    }
  }
}

// The streamed kernels' grouped products (bf16_stream.h, quantized_stream.h) in the tallest tiles
// whose ring fits (int8 codes leave room for 4 rows with up's beside x's), when they take them;
// false when not. Of x's rows, or of swiglu(x, up) when `up` is given, or of the rows of x that
// `x_rows` names (read in place) when that is given.
bool stream_grouped(const float* x, const float* up, const int64_t* x_rows, int64_t ldx, const int64_t* offsets,
                    std::span<const GroupedProduct> products, int64_t rows, int64_t group_rows, GemmOperands operands,
                    DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (products[0].w.empty()) return false;
  const DeviceMatrix& first = products[0].w[0];
  const int64_t chunks = ceil_div(first.cols, kChunk);
  if (first.rows == 0 || first.cols == 0 || !skinny_partials_fit(chunks, rows, first.rows, device)) return false;
  group_rows = std::clamp<int64_t>(group_rows, 1, rows);
  if (first.dtype == DType::kBF16) {
    const int parts = operands == GemmOperands::kBf16 ? 1 : 3;
    const int64_t tile = tallest_stream_tile(products, group_rows, rows, kBf16StreamMaxRows,
                                             [&](int64_t t, const GroupedProduct& p) {
                                               return bf16_streams(t, x, ldx, p.w, parts, device, up);
                                             });
    if (tile == 0) return false;
    bf16_stream_grouped(x, ldx, rows, offsets, tile, products, parts, scratch, device, stream, up, x_rows);
    return true;
  }
  if (!is_quantized(first.dtype)) return false;
  check_quantized(first, "grouped matmul");
  const int64_t tile = tallest_stream_tile(products, group_rows, rows, quantized_stream_max_rows(first.dtype),
                                           [&](int64_t t, const GroupedProduct& p) {
                                             return quantized_streams(t, x, ldx, p.w, operands, device, up);
                                           });
  if (tile == 0) return false;
  quantized_stream_grouped(x, ldx, rows, offsets, tile, products, operands, scratch, device, stream, up, x_rows);
  return true;
}

}  // namespace

void grouped_matmuls(const float* x, int64_t ldx, const int64_t* offsets, std::span<const GroupedProduct> products,
                     int64_t rows, int64_t group_rows, GemmOperands operands, DeviceScratch& scratch,
                     Device& device, cudaStream_t stream) {
  if (rows < 0) fail("grouped_matmul: {} rows", rows);
  if (products.empty()) return;
  check_grouped(products);
  const std::span<const DeviceMatrix> w0 = products[0].w;
  if (w0.empty() || rows == 0) return;
  const DeviceMatrix& first = w0[0];
  if (first.rows == 0) return;
  if (first.cols == 0) {  // an empty sum: zero chunks of partials add up to 0
    for (const GroupedProduct& p : products)
      launch_sum_partials(nullptr, 0, rows, first.rows, p.out, p.ldo, stream, offsets, offsets + w0.size());
    return;
  }
  // The bound only picks kernels, skinny for few rows per group and tiled for many, and a row's
  // bits do not depend on that choice: every kernel here runs the same sequence of operations for
  // each output element (see the top of this file), and a skinny tile of a group's rows splits
  // further when the bound was low. A group never has more rows than x.
  group_rows = std::clamp<int64_t>(group_rows, 1, rows);
  switch (first.dtype) {
    case DType::kF32: return grouped_f32<DType::kF32>(x, ldx, offsets, products, rows, group_rows, scratch, device, stream);
    case DType::kF16: return grouped_f32<DType::kF16>(x, ldx, offsets, products, rows, group_rows, scratch, device, stream);
    case DType::kBF16:
      if (operands == GemmOperands::kBf16)
        return grouped_bf16<1>(x, ldx, offsets, products, rows, group_rows, scratch, device, stream);
      return grouped_bf16<3>(x, ldx, offsets, products, rows, group_rows, scratch, device, stream);
    case DType::kQ8:
    case DType::kQ4:
      return quantized_grouped_matmuls(x, ldx, offsets, products, rows, group_rows, operands, scratch, device, stream);
    default: fail("grouped matmul: weights of dtype {} are not supported on the GPU", dtype_name(first.dtype));
  }
}

void grouped_matmul(const float* x, int64_t ldx, const int64_t* offsets, std::span<const DeviceMatrix> w,
                    int64_t rows, int64_t group_rows, float* out, int64_t ldo, GemmOperands operands,
                    DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const GroupedProduct product{w, out, ldo};
  grouped_matmuls(x, ldx, offsets, std::span(&product, 1), rows, group_rows, operands, scratch, device, stream);
}

void grouped_matmul_swiglu(float* gate, const float* up, int64_t ldx, const int64_t* offsets,
                           std::span<const DeviceMatrix> w, int64_t rows, int64_t group_rows, float* out, int64_t ldo,
                           GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (rows < 0) fail("grouped_matmul: {} rows", rows);
  const GroupedProduct product{w, out, ldo};
  const std::span products(&product, 1);
  check_grouped(products);
  if (w.empty() || rows == 0) return;
  if (stream_grouped(gate, up, nullptr, ldx, offsets, products, rows, group_rows, operands, scratch, device, stream))
    return;
  swiglu(gate, up, rows * ldx, stream);
  grouped_matmul(gate, ldx, offsets, w, rows, group_rows, out, ldo, operands, scratch, device, stream);
}

void matmul(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& w, float* out, int64_t ldo,
            GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (m < 0) fail("matmul: {} rows", m);
  if (m == 0 || w.rows == 0) return;
  if (w.cols == 0) {  // an empty sum
    M1_CUDA_CHECK(cudaMemset2DAsync(out, size_t(ldo) * sizeof(float), 0, size_t(w.rows) * sizeof(float), size_t(m), stream));
    return;
  }
  switch (w.dtype) {
    case DType::kF32: return matmul_f32<DType::kF32>(x, ldx, m, w, out, ldo, scratch, device, stream);
    case DType::kF16: return matmul_f32<DType::kF16>(x, ldx, m, w, out, ldo, scratch, device, stream);
    case DType::kBF16:
      if (operands == GemmOperands::kBf16) return matmul_bf16<1>(x, ldx, m, w, out, ldo, scratch, device, stream);
      return matmul_bf16<3>(x, ldx, m, w, out, ldo, scratch, device, stream);
    case DType::kQ8:
    case DType::kQ4: return quantized_matmul(x, ldx, m, w, out, ldo, operands, scratch, device, stream);
    default: fail("matmul: weights of dtype {} are not supported on the GPU", dtype_name(w.dtype));
  }
}

namespace {

// The products' weights cut into blocks of the fewest rows any has, as views into them (a block's
// rows, and its rows' scales, are contiguous), each with its outputs' columns: none when the
// weights differ in dtype, inputs or scales, some product's rows are not a multiple of that, or
// the blocks would pass kMaxStreamPieces.
std::vector<PlainProduct> row_blocks(std::span<const PlainProduct> products) {
  const DeviceMatrix& first = products[0].w;
  const bool quantized = is_quantized(first.dtype);
  int64_t n = first.rows;
  for (const PlainProduct& p : products) {
    if (p.w.dtype != first.dtype || p.w.cols != first.cols ||
        (quantized && (p.w.scale_dtype != first.scale_dtype || p.w.group_size != first.group_size)))
      return {};
    n = std::min(n, p.w.rows);
  }
  std::vector<PlainProduct> blocks;
  if (n <= 0) return blocks;
  for (const PlainProduct& p : products) {
    if (p.w.rows % n != 0 || int64_t(blocks.size()) + p.w.rows / n > kMaxStreamPieces) return {};
    const int64_t groups = quantized ? ceil_div(p.w.cols, p.w.group_size) : 0;
    for (int64_t r0 = 0; r0 < p.w.rows; r0 += n) {
      DeviceMatrix w = p.w;
      w.rows = n;
      w.data = static_cast<const std::byte*>(p.w.data) + size_t(r0) * row_bytes(p.w.dtype, p.w.cols);
      if (quantized)
        w.scales = static_cast<const std::byte*>(p.w.scales) + size_t(r0) * row_bytes(p.w.scale_dtype, groups);
      blocks.push_back({w, p.out + r0, p.ldo});
    }
  }
  return blocks;
}

// The streamed kernels' launch of all the products at once, when they take it.
bool stream_as_one(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> products,
                   GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (products.size() < 2 || m < 1) return false;
  const std::vector<PlainProduct> blocks = row_blocks(products);
  if (blocks.empty() || blocks[0].w.cols == 0) return false;
  const DeviceMatrix& w = blocks[0].w;
  if (!skinny_partials_fit(ceil_div(w.cols, kChunk), m * int64_t(blocks.size()), w.rows, device)) return false;
  std::vector<DeviceMatrix> weights;
  for (const PlainProduct& b : blocks) weights.push_back(b.w);
  if (w.dtype == DType::kBF16) {
    const int parts = operands == GemmOperands::kBf16 ? 1 : 3;
    if (!bf16_streams(m, x, ldx, weights, parts, device)) return false;
    bf16_stream_matmul(x, ldx, m, blocks, parts, scratch, device, stream);
    return true;
  }
  if (is_quantized(w.dtype) && quantized_streams(m, x, ldx, weights, operands, device)) {
    quantized_stream_matmul(x, ldx, m, blocks, operands, scratch, device, stream);
    return true;
  }
  return false;
}

}  // namespace

void grouped_matmuls_of_rows(const float* x, int64_t ldx, const int64_t* x_rows, float* gathered,
                             const int64_t* offsets, std::span<const GroupedProduct> products, int64_t rows,
                             int64_t group_rows, GemmOperands operands, DeviceScratch& scratch, Device& device,
                             cudaStream_t stream) {
  if (rows < 0) fail("grouped_matmul: {} rows", rows);
  if (products.empty() || rows == 0) return;
  check_grouped(products);
  if (stream_grouped(x, nullptr, x_rows, ldx, offsets, products, rows, group_rows, operands, scratch, device, stream))
    return;
  gather_rows(x, ldx, x_rows, rows, gathered, stream);
  grouped_matmuls(gathered, ldx, offsets, products, rows, group_rows, operands, scratch, device, stream);
}

void matmuls(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> products, GemmOperands operands,
             DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (m < 0) fail("matmuls: {} rows", m);
  if (stream_as_one(x, ldx, m, products, operands, scratch, device, stream)) return;
  for (const PlainProduct& p : products) matmul(x, ldx, m, p.w, p.out, p.ldo, operands, scratch, device, stream);
}

}  // namespace m1::cuda
