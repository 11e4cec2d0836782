// Batch-invariant products out = x w^T on int8 / int4 weights (see quantized_matmul.h): the
// packed codes stream from device memory into shared memory (cp.async), each warp turns the codes
// it needs into bf16 tensor-core operands in registers, and mma.m16n8k16 multiplies them with the
// bf16 terms of x, accumulating in fp32.
//
// The operand order. The inner dimension is cut into blocks of 32 inputs. Lane t (of the 4 lanes
// sharing an mma row) takes 8 consecutive codes of a block, codes c_0..c_7 at inputs 8t..8t+7:
// one 32-bit word of int4 codes, two of int8. A block makes two mma steps of 16 inputs; in step
// s the lane's slots (2t, 2t+1) hold inputs (8t+2s, 8t+2s+4) and slots (2t+8, 2t+9) inputs
// (8t+2s+1, 8t+2s+5): the pairs (c_i, c_{i+4}) that shifting and masking a word of int4 codes
// yields at once. x's bf16 terms are stored in the same order (block_order: 0 4 1 5 2 6 3 7 in
// each run of 8), so one 16-byte load gives a lane all its x operands of a block. A step holds
// inputs of one block, so of one scale group (group sizes are multiples of 32, or the whole row).
//
// The arithmetic, the same sequence of fp32 operations for every output element in every kernel
// here: the inner dimension is cut into chunks of kChunk (8 blocks); a chunk's blocks, in order,
// each in its two steps, in order, each step multiplying the terms of x last to first (lo, mid,
// hi), accumulate on the tensor cores into
//   kBf16 (fast): a fresh partial per chunk, with bf16(code * scale) as operands (several groups
//     per row: code * scale in fp32, rounded to nearest even), or with the codes (one scale per
//     row), the chunk's partial then times the row's scale;
//   kFp32 (exact): a fresh span sum per run of blocks inside one chunk and one scale group, with
//     the codes as operands (exact in bf16) and x as three terms that sum to it; at the run's end
//     partial = fmaf(span, scale, partial), the chunk's partial starting at 0.
// The chunk partials are added, in chunk order, to a total that starts at 0 (round to nearest).
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
#include "warp_mma.h"

namespace m1::cuda {
namespace {

constexpr int kBlockK = 32;                        // inputs per block
constexpr int kBlocksPerChunk = kChunk / kBlockK;  // 8

// Bytes of one weight row's block of codes; a lane reads a quarter of them (8 codes).
template <DType T>
constexpr int kBlockBytes = T == DType::kQ4 ? 16 : 32;

// Shared-memory row stride of `blocks` blocks of codes, padded so that the 8 rows of an mma
// column tile, read by 4 lanes each, fall in distinct banks: stride / kBlockBytes odd.
template <DType T>
constexpr int code_stride(int blocks) {
  return kBlockBytes<T> * (blocks % 2 ? blocks : blocks + 1);
}

// A quantized weight as the kernels read it; the grouped kernels swap in each group's codes and
// scales.
struct QuantOperand {
  const unsigned char* codes;
  const void* scales;
  DType scale_dtype;
  int64_t n, k, group_size, groups;
  int64_t row_bytes;
  bool vec;          // rows 16-byte aligned: 16-byte copies (else 4-byte ones)
  bool scale_codes;   // fast, several groups: operands bf16(code * scale)
  bool scale_chunks;  // fast, one group: each chunk's partial times the row's scale
};

// Scale group of block kb (a block never straddles two).
__device__ __forceinline__ int64_t group_of(const QuantOperand& w, int64_t kb) {
  return std::min(kb * kBlockK / w.group_size, w.groups - 1);
}

// The scale of weight row `row` for block kb; 0 for rows past the last (their codes are zeros
// and their outputs never stored).
__device__ __forceinline__ float scale_of(const QuantOperand& w, int64_t row, int64_t kb) {
  return row < w.n ? load_scale(w.scales, w.scale_dtype, row * w.groups + group_of(w, kb)) : 0.0f;
}

// Whether block kb ends a run of one chunk and one scale group (exact precision's spans), and
// whether it ends a chunk.
__device__ __forceinline__ bool ends_span(const QuantOperand& w, int64_t kb) {
  const int64_t end = (kb + 1) * kBlockK;
  return end >= w.k || (kb + 1) % kBlocksPerChunk == 0 || end % w.group_size == 0;
}
__device__ __forceinline__ bool ends_chunk(const QuantOperand& w, int64_t kb) {
  return (kb + 1) * kBlockK >= w.k || (kb + 1) % kBlocksPerChunk == 0;
}

// ---------------------------------------------------------------------------------------------
// Codes to operands. A bf16 pair is a 32-bit word, the first value in the low half.

__device__ __forceinline__ uint32_t bf16x2_sub(uint32_t a, uint32_t b) {
  const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// Codes (c_i, c_{i+4}) of a lane's 8 as bf16 values (exact). int4: the nibbles under the bf16
// exponent of 128 make 128 + u, and 136 less is u - 8 = q. int8: the bytes under the fp32 exponent
// of 2^23 make 2^23 + u, and 2^23 + 128 less is q.
template <DType T>
__device__ __forceinline__ uint32_t code_pair(const uint32_t (&words)[2], int i) {
  if constexpr (T == DType::kQ4) {
    const uint32_t biased = ((words[0] >> (4 * i)) & 0x000F000Fu) | 0x43004300u;
    return bf16x2_sub(biased, 0x43084308u);
  } else {
    const float lo = __uint_as_float(0x4B000000u | ((words[0] >> (8 * i)) & 0xFFu)) - 8388736.0f;
    const float hi = __uint_as_float(0x4B000000u | ((words[1] >> (8 * i)) & 0xFFu)) - 8388736.0f;
    return bf16_pair(lo, hi);
  }
}

// A pair of codes times one scale, rounded to bf16: a bf16 product when the scale is bf16 (`s2`,
// the scale in both halves), else in fp32 (code * scale exact for F16 scales, rounded once for F32
// ones, as the reference does) and rounded.
__device__ __forceinline__ uint32_t scaled_pair(uint32_t codes, float s, uint32_t s2, bool bf16_scale) {
  if (bf16_scale) return bf16x2_mul(codes, s2);
  return bf16_pair(__fmul_rn(__uint_as_float(codes << 16), s), __fmul_rn(__uint_as_float(codes & 0xFFFF0000u), s));
}

// ---------------------------------------------------------------------------------------------
// Shared-memory staging (cp.async)

// Codes of weight rows [n0, n0 + kRows) for blocks [kb0, kb0 + kBlocks), rows `code_stride` bytes
// apart; zeros past each row's codes (codes u = 0, multiplied by x's zero padding) and for rows
// past the last.
template <DType T, int kRows, int kBlocks, int kThreads>
__device__ __forceinline__ void stage_codes(unsigned char* dst, const QuantOperand& w, int64_t n0, int64_t kb0) {
  constexpr int kUnits = kBlocks * kBlockBytes<T> / 16, kStride = code_stride<T>(kBlocks);
  for (int i = threadIdx.x; i < kRows * kUnits; i += kThreads) {
    const int row = i / kUnits, u = i % kUnits;
    const int64_t r = n0 + row, byte = kb0 * kBlockBytes<T> + 16 * u;
    unsigned char* d = dst + row * kStride + 16 * u;
    const unsigned char* src = w.codes + r * w.row_bytes + byte;
    if (w.vec) {
      const bool valid = r < w.n && byte < w.row_bytes;
      __pipeline_memcpy_async(d, valid ? src : w.codes, 16, valid ? 0 : 16);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const bool valid = r < w.n && byte + 4 * q < w.row_bytes;
        __pipeline_memcpy_async(d + 4 * q, valid ? src + 4 * q : w.codes, 4, valid ? 0 : 4);
      }
    }
  }
}

// x's kParts bf16 terms (block order), rows [0, rows) of kRows, inputs [k0, k0 + 32 kBlocks):
// term q's row r at (q kRows + r) 64 kBlocks bytes, its 16-byte units swizzled (u ^ 4 on odd
// rows, so the two rows a quarter-warp reads fall in distinct banks). Rows past `rows` are not
// copied (read_x gives zeros); inputs past the padded row, zeros.
template <int kParts, int kRows, int kBlocks, int kThreads>
__device__ __forceinline__ void stage_x(unsigned char* dst, const __nv_bfloat16* xb, int64_t ldq, int64_t term_stride,
                                        int64_t rows, int64_t k0) {
  constexpr int kUnits = kBlocks * 4;
  const int64_t valid_rows = std::min<int64_t>(rows, kRows);
  for (int64_t i = threadIdx.x; i < kParts * valid_rows * kUnits; i += kThreads) {
    const int64_t qr = i / kUnits, q = qr / valid_rows, r = qr % valid_rows;
    const int u = int(i % kUnits);
    const bool valid = k0 + 8 * u < ldq;
    unsigned char* d = dst + ((q * kRows + r) * kUnits + (u ^ ((r & 1) << 2))) * 16;
    const __nv_bfloat16* src = xb + q * term_stride + r * ldq + k0 + 8 * u;
    __pipeline_memcpy_async(d, valid ? src : xb, 16, valid ? 0 : 16);
  }
}

// The same staging from fp32 x (rows ldx apart, inputs [k0, k0 + 32 kBlocks) of k), each thread
// splitting runs of 8 values into their terms (as split_to_bf16, the same bits): the skinny
// kernels' way, which saves a launch and a round trip through memory.
template <int kParts, int kRows, int kBlocks, int kThreads>
__device__ __forceinline__ void stage_x_from_fp32(unsigned char* dst, const float* x, int64_t ldx, int64_t rows,
                                                  int64_t k0, int64_t k) {
  constexpr int kUnits = kBlocks * 4;
  const int64_t valid_rows = std::min<int64_t>(rows, kRows);
  for (int64_t i = threadIdx.x; i < valid_rows * kUnits; i += kThreads) {
    const int64_t r = i / kUnits;
    const int u = int(i % kUnits);
    uint16_t terms[kParts][8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t c = k0 + 8 * u + e;
      __nv_bfloat16 t[kParts];
      bf16_terms<kParts>(c < k ? x[r * ldx + c] : 0.0f, t);
#pragma unroll
      for (int q = 0; q < kParts; ++q) terms[q][block_order(e)] = *reinterpret_cast<const uint16_t*>(&t[q]);
    }
#pragma unroll
    for (int q = 0; q < kParts; ++q) {
      uint4 packed;
      packed.x = terms[q][0] | uint32_t(terms[q][1]) << 16, packed.y = terms[q][2] | uint32_t(terms[q][3]) << 16;
      packed.z = terms[q][4] | uint32_t(terms[q][5]) << 16, packed.w = terms[q][6] | uint32_t(terms[q][7]) << 16;
      *reinterpret_cast<uint4*>(dst + ((q * kRows + r) * kUnits + (u ^ ((r & 1) << 2))) * 16) = packed;
    }
  }
}

// The 16-byte unit (8 values) of staged x row `row` (of term q's kRows) a lane reads for a block.
template <int kRows, int kBlocks>
__device__ __forceinline__ uint4 read_x(const unsigned char* xs, int q, int row, int rows, int block, int t) {
  constexpr int kUnits = kBlocks * 4;
  if (row >= rows) return make_uint4(0, 0, 0, 0);
  const int u = (4 * block + t) ^ ((row & 1) << 2);
  return *reinterpret_cast<const uint4*>(xs + ((q * kRows + row) * kUnits + u) * 16);
}

// ---------------------------------------------------------------------------------------------
// One block for one warp: its kM row tiles (16 rows of x from row wm0) by kN column tiles (8 weight
// rows from wn0), both steps, every term, into acc. b_scale: per column tile, the lane's weight
// row's scale for this block (used when w.scale_codes).

template <DType T, int kParts, int kM, int kN, int kXRows, int kBlocks>
__device__ __forceinline__ void block_product(const unsigned char* xs, int x_rows, int wm0, const unsigned char* cs,
                                              int wn0, int block, const QuantOperand& w, const float (&b_scale)[kN],
                                              float (&acc)[kM][kN][4]) {
  constexpr int kStride = code_stride<T>(kBlocks);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bool bf16_scale = w.scale_dtype == DType::kBF16;

  uint32_t b[kN][4];
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const unsigned char* at = cs + (wn0 + 8 * j + g) * kStride + block * kBlockBytes<T> + t * (kBlockBytes<T> / 4);
    uint32_t words[2];
    if constexpr (T == DType::kQ4) {
      words[0] = *reinterpret_cast<const uint32_t*>(at);
      words[1] = 0;
    } else {
      const uint2 pair = *reinterpret_cast<const uint2*>(at);
      words[0] = pair.x, words[1] = pair.y;
    }
    const uint32_t s2 = (__float_as_uint(b_scale[j]) >> 16) * 0x00010001u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      b[j][i] = code_pair<T>(words, i);
      if (w.scale_codes) b[j][i] = scaled_pair(b[j][i], b_scale[j], s2, bf16_scale);
    }
  }
  uint32_t a[kParts][kM][8];
#pragma unroll
  for (int q = 0; q < kParts; ++q)
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      const uint4 top = read_x<kXRows, kBlocks>(xs, q, wm0 + 16 * i + g, x_rows, block, t);
      const uint4 bottom = read_x<kXRows, kBlocks>(xs, q, wm0 + 16 * i + g + 8, x_rows, block, t);
      a[q][i][0] = top.x, a[q][i][1] = top.y, a[q][i][2] = top.z, a[q][i][3] = top.w;
      a[q][i][4] = bottom.x, a[q][i][5] = bottom.y, a[q][i][6] = bottom.z, a[q][i][7] = bottom.w;
    }
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int q = kParts - 1; q >= 0; --q)
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        const uint32_t frag[4] = {a[q][i][2 * s], a[q][i][4 + 2 * s], a[q][i][2 * s + 1], a[q][i][4 + 2 * s + 1]};
#pragma unroll
        for (int j = 0; j < kN; ++j) mma_bf16(acc[i][j], frag, b[j][2 * s], b[j][2 * s + 1]);
      }
}

// The scales block_product needs for block kb of the lane's column tiles (zeros when unused).
template <int kN>
__device__ __forceinline__ void block_scales(const QuantOperand& w, int64_t col0, int64_t kb, float (&s)[kN]) {
  const int g = int(threadIdx.x % 32) / 4;
#pragma unroll
  for (int j = 0; j < kN; ++j) s[j] = w.scale_codes ? scale_of(w, col0 + 8 * j + g, kb) : 0.0f;
}

template <int kM, int kN>
__device__ __forceinline__ void zero(float (&acc)[kM][kN][4]) {
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int j = 0; j < kN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
}

// Exact precision, at a span's end: partial = fmaf(span, scale of its column, partial), span = 0.
// Element e of a column tile is weight row col0 + 8 j + 2 t + (e & 1).
template <int kM, int kN>
__device__ __forceinline__ void fold_span(const QuantOperand& w, int64_t col0, int64_t kb, float (&span)[kM][kN][4],
                                          float (&part)[kM][kN][4]) {
  const int t = int(threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const float s[2] = {scale_of(w, col0 + 8 * j + 2 * t, kb), scale_of(w, col0 + 8 * j + 2 * t + 1, kb)};
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        part[i][j][e] = __fmaf_rn(span[i][j][e], s[e & 1], part[i][j][e]);
        span[i][j][e] = 0.0f;
      }
  }
}

// The scales of the lane's columns (weight rows col0 + 8 j + 2 t, + 1) that multiply each chunk's
// partial: the rows' scales in fast precision with one group per row, else 1 (exact).
template <int kN>
__device__ __forceinline__ void chunk_scales(const QuantOperand& w, int64_t col0, float (&s)[kN][2]) {
  const int t = int(threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) s[j][c] = w.scale_chunks ? scale_of(w, col0 + 8 * j + 2 * t + c, 0) : 1.0f;
}

// A chunk's partial as it leaves the chunk: times its column's scale when w.scale_chunks.
__device__ __forceinline__ float chunk_value(const QuantOperand& w, float part, float scale) {
  return w.scale_chunks ? __fmul_rn(part, scale) : part;
}

// store(i, j, e, row, col) for each element e of the lane's accumulator tiles (i, j) that falls
// inside the product: row row0 + 16 i + g (+ 8 for e >= 2) below `rows`, weight row (column)
// col0 + 8 j + 2 t (+ 1 for odd e) below n.
template <int kM, int kN, class Store>
__device__ __forceinline__ void for_each_output(int64_t col0, int64_t n, int64_t row0, int64_t rows, Store store) {
  const int g = int(threadIdx.x % 32) / 4, t = int(threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t col = col0 + 8 * j + 2 * t + (e & 1);
      if (col >= n) continue;
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        const int64_t r = row0 + 16 * i + g + 8 * (e >> 1);
        if (r < rows) store(i, j, e, r, col);
      }
    }
}

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

  float part[kM][2][4], span[kM][2][4];
  zero(part);
  zero(span);
#pragma unroll
  for (int b = 0; b < kBlocksPerChunk; ++b) {
    if (b >= blocks) break;
    if constexpr (kParts == 1) {
      block_product<T, kParts, kM, 2, kRows, kBlocksPerChunk>(xs, int(m), 0, cs, 16 * warp, b, w, scales[b], part);
    } else {
      block_product<T, kParts, kM, 2, kRows, kBlocksPerChunk>(xs, int(m), 0, cs, 16 * warp, b, w, scales[b], span);
      if (ends_span(w, kb0 + b)) fold_span(w, col0, kb0 + b, span, part);
    }
  }
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
// Host side. Grids put the chunks (skinny) or row tiles (tiled) in x and weight-row blocks in y.

QuantOperand operand(const DeviceMatrix& w, GemmOperands operands, bool vec) {
  QuantOperand q{};
  q.codes = static_cast<const unsigned char*>(w.data);
  q.scales = w.scales;
  q.scale_dtype = w.scale_dtype;
  q.n = w.rows;
  q.k = w.cols;
  q.group_size = w.group_size;
  q.groups = ceil_div(w.cols, w.group_size);
  q.row_bytes = int64_t(row_bytes(w.dtype, w.cols));
  q.vec = vec && q.row_bytes % 16 == 0;
  const bool fast = operands == GemmOperands::kBf16;
  q.scale_codes = fast && q.groups > 1;
  q.scale_chunks = fast && q.groups == 1;
  return q;
}

// x's rows padded to whole blocks.
int64_t padded_row(int64_t k) { return ceil_div(k, kBlockK) * kBlockK; }

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

template <DType T, int kParts>
void launch_tiled(const __nv_bfloat16* xb, int64_t ldq, int64_t m, const QuantOperand& w, float* out, int64_t ldo,
                  Device& device, cudaStream_t stream) {
  using Shape = QuantTile<T, kParts>;
  constexpr auto kernel = quant_tiled<T, kParts>;
  device.allow_shared_memory<kernel>(Shape::kSharedBytes);
  const dim3 grid(unsigned(ceil_div(m, Shape::kTileM)), unsigned(ceil_div(w.n, kTileN)));
  kernel<<<grid, kTileThreads, Shape::kSharedBytes, stream>>>(xb, ldq, m, w, out, ldo);
  M1_CUDA_CHECK_LAUNCH();
}

template <DType T, int kParts>
void launch_grouped_tiled(const __nv_bfloat16* xb, int64_t ldq, int64_t rows, const int64_t* offsets,
                          const GroupedProduct& p, const QuantOperand& w, Device& device, cudaStream_t stream) {
  using Shape = QuantTile<T, kParts>;
  constexpr auto kernel = grouped_quant_tiled<T, kParts>;
  device.allow_shared_memory<kernel>(Shape::kSharedBytes);
  for_each_launch(p.w, [&](int64_t first, int count, const GroupWeights& weights) {
    const dim3 grid(unsigned(grouped_tiles(rows, count, Shape::kTileM)), unsigned(ceil_div(w.n, kTileN)));
    kernel<<<grid, kTileThreads, Shape::kSharedBytes, stream>>>(xb, ldq, rows, offsets + first, count, weights, w,
                                                                 p.out, p.ldo);
    M1_CUDA_CHECK_LAUNCH();
  });
}

template <DType T, int kParts>
void matmul_quantized(const float* x, int64_t ldx, int64_t m, const DeviceMatrix& weight, float* out, int64_t ldo,
                      GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const QuantOperand w = operand(weight, operands, aligned16(weight.data));
  const int64_t ldq = padded_row(w.k), chunks = ceil_div(w.k, kChunk);
  if (m > kSkinnyMaxRows || !skinny_partials_fit(chunks, m, w.n)) {
    __nv_bfloat16* xb = scratch.get<__nv_bfloat16>(size_t(kParts * m * ldq));
    launch_split_to_bf16<kParts, true>(x, ldx, m, w.k, xb, ldq, stream);
    return launch_tiled<T, kParts>(xb, ldq, m, w, out, ldo, device, stream);
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
  const int64_t ldq = padded_row(first.cols), chunks = ceil_div(first.cols, kChunk);
  const int64_t tile_rows = ceil_div(group_rows, 16) * 16;
  const bool skinny = group_rows <= kSkinnyMaxRows && skinny_grid_fits(rows, groups, tile_rows) &&
                      skinny_partials_fit(chunks, rows, first.rows);
  if (!skinny) {  // x's terms once for every product
    __nv_bfloat16* xb = scratch.get<__nv_bfloat16>(size_t(kParts * rows * ldq));
    launch_split_to_bf16<kParts, true>(x, ldx, rows, first.cols, xb, ldq, stream);
    for (const GroupedProduct& p : products)
      launch_grouped_tiled<T, kParts>(xb, ldq, rows, offsets, p, operand(p.w[0], operands, all_aligned16(p.w)), device, stream);
    return;
  }
  float* partial = chunks > 1 ? scratch.get<float>(size_t(chunks * rows * first.rows)) : nullptr;
  for (const GroupedProduct& p : products) {  // one set of partials, summed before the next product's
    const QuantOperand w = operand(p.w[0], operands, all_aligned16(p.w));
    with_row_tiles(tile_rows, [&]<int kM>() {
      launch_grouped_skinny<T, kParts, kM>(x, ldx, rows, offsets, p, w, partial, scratch, device, stream);
    });
  }
}

// Calls launch.template operator()<T, kParts>() for w's type and the operands' term count.
template <class Launch>
void with_kind(const DeviceMatrix& w, GemmOperands operands, Launch launch) {
  const bool fast = operands == GemmOperands::kBf16;
  if (w.dtype == DType::kQ4) {
    if (fast) return launch.template operator()<DType::kQ4, 1>();
    return launch.template operator()<DType::kQ4, 3>();
  }
  if (fast) return launch.template operator()<DType::kQ8, 1>();
  return launch.template operator()<DType::kQ8, 3>();
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
  with_kind(w, operands, [&]<DType T, int kParts>() {
    matmul_quantized<T, kParts>(x, ldx, m, w, out, ldo, operands, scratch, device, stream);
  });
}

void quantized_grouped_matmuls(const float* x, int64_t ldx, const int64_t* offsets,
                               std::span<const GroupedProduct> products, int64_t rows, int64_t group_rows,
                               GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  const DeviceMatrix& first = products[0].w[0];
  check_quantized(first, "grouped matmul");
  with_kind(first, operands, [&]<DType T, int kParts>() {
    grouped_quantized<T, kParts>(x, ldx, offsets, products, rows, group_rows, operands, scratch, device, stream);
  });
}

}  // namespace m1::cuda
