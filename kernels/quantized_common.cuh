#pragma once
// What the products on int8 / int4 weights share (quantized_matmul.cu: skinny and tiled kernels;
// quantized_stream.cu: few rows streamed): the weight operand, the codes turned into bf16
// tensor-core operands, the staging of codes and of x's terms in shared memory, one block's
// product for one warp, the scales and the outputs. Included by those files only; everything here
// has internal linkage.
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

#include <cuda_pipeline.h>

#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>

#include "activations.cuh"
#include "device_types.h"
#include "launch.h"
#include "m1/dtype.h"
#include "matmul.h"
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
// kernels' way, which saves a launch and a round trip through memory. With `up` (rows ldx apart),
// the values are swiglu(x, up), as swiglu makes them.
template <int kParts, int kRows, int kBlocks, int kThreads>
__device__ __forceinline__ void stage_x_from_fp32(unsigned char* dst, const float* x, int64_t ldx, int64_t rows,
                                                  int64_t k0, int64_t k, const float* up = nullptr) {
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
      const float v = c >= k ? 0.0f : up ? swiglu_value(x[r * ldx + c], up[r * ldx + c]) : x[r * ldx + c];
      bf16_terms<kParts>(v, t);
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

// Where the kernels read a scale: scale(row, kb) is scale_of(w, row, kb), from device memory
// (GlobalScales) or from a copy the kernel staged in shared memory.
struct GlobalScales {
  const QuantOperand& w;
  __device__ float operator()(int64_t row, int64_t kb) const { return scale_of(w, row, kb); }
};

// The scales block_product needs for block kb of the lane's column tiles (zeros when unused).
template <int kN, class Scale = GlobalScales>
__device__ __forceinline__ void block_scales(const QuantOperand& w, int64_t col0, int64_t kb, float (&s)[kN],
                                             const Scale& scale) {
  const int g = int(threadIdx.x % 32) / 4;
#pragma unroll
  for (int j = 0; j < kN; ++j) s[j] = w.scale_codes ? scale(col0 + 8 * j + g, kb) : 0.0f;
}
template <int kN>
__device__ __forceinline__ void block_scales(const QuantOperand& w, int64_t col0, int64_t kb, float (&s)[kN]) {
  block_scales<kN>(w, col0, kb, s, GlobalScales{w});
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
template <int kM, int kN, class Scale = GlobalScales>
__device__ __forceinline__ void fold_span(const QuantOperand& w, int64_t col0, int64_t kb, float (&span)[kM][kN][4],
                                          float (&part)[kM][kN][4], const Scale& scale) {
  const int t = int(threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const float s[2] = {scale(col0 + 8 * j + 2 * t, kb), scale(col0 + 8 * j + 2 * t + 1, kb)};
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        part[i][j][e] = __fmaf_rn(span[i][j][e], s[e & 1], part[i][j][e]);
        span[i][j][e] = 0.0f;
      }
  }
}
template <int kM, int kN>
__device__ __forceinline__ void fold_span(const QuantOperand& w, int64_t col0, int64_t kb, float (&span)[kM][kN][4],
                                          float (&part)[kM][kN][4]) {
  fold_span(w, col0, kb, span, part, GlobalScales{w});
}

// The scales of the lane's columns (weight rows col0 + 8 j + 2 t, + 1) that multiply each chunk's
// partial: the rows' scales in fast precision with one group per row, else 1 (exact).
template <int kN, class Scale = GlobalScales>
__device__ __forceinline__ void chunk_scales(const QuantOperand& w, int64_t col0, int64_t kb, float (&s)[kN][2],
                                             const Scale& scale) {
  const int t = int(threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) s[j][c] = w.scale_chunks ? scale(col0 + 8 * j + 2 * t + c, kb) : 1.0f;
}
template <int kN>
__device__ __forceinline__ void chunk_scales(const QuantOperand& w, int64_t col0, float (&s)[kN][2]) {
  chunk_scales(w, col0, 0, s, GlobalScales{w});
}

// One warp's share of a chunk in the few-row kernels (skinny and streamed): its kM row tiles by two
// column tiles (weight rows col0 .. col0 + 15, at row wn0 of the staged codes cs), the chunk's
// `blocks` blocks from block kb0 in order, into a fresh part. scales: block_scales' per block;
// scale: where fold_span reads the scales (exact precision).
template <DType T, int kParts, int kM, int kXRows, class Scale>
__device__ __forceinline__ void warp_chunk(const unsigned char* xs, int x_rows, const unsigned char* cs, int wn0,
                                           const QuantOperand& w, int64_t col0, int64_t kb0, int blocks,
                                           const float (&scales)[kBlocksPerChunk][2], const Scale& scale,
                                           float (&part)[kM][2][4]) {
  float span[kM][2][4];
  zero(part);
  zero(span);
#pragma unroll
  for (int b = 0; b < kBlocksPerChunk; ++b) {
    if (b >= blocks) break;
    if constexpr (kParts == 1) {
      block_product<T, kParts, kM, 2, kXRows, kBlocksPerChunk>(xs, x_rows, 0, cs, wn0, b, w, scales[b], part);
    } else {
      block_product<T, kParts, kM, 2, kXRows, kBlocksPerChunk>(xs, x_rows, 0, cs, wn0, b, w, scales[b], span);
      if (ends_span(w, kb0 + b)) fold_span(w, col0, kb0 + b, span, part, scale);
    }
  }
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
// Host side.

inline QuantOperand operand(const DeviceMatrix& w, GemmOperands operands, bool vec) {
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
inline int64_t padded_row(int64_t k) { return ceil_div(k, kBlockK) * kBlockK; }

// Calls launch.template operator()<T, kParts>() for a quantized type and the operands' term count.
template <class Launch>
void with_kind(DType type, GemmOperands operands, Launch launch) {
  const bool fast = operands == GemmOperands::kBf16;
  if (type == DType::kQ4) {
    if (fast) return launch.template operator()<DType::kQ4, 1>();
    return launch.template operator()<DType::kQ4, 3>();
  }
  if (fast) return launch.template operator()<DType::kQ8, 1>();
  return launch.template operator()<DType::kQ8, 3>();
}

}  // namespace
}  // namespace m1::cuda
