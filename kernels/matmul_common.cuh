#pragma once
// What every batch-invariant product kernel shares (kernels/matmul.cu for float weights,
// kernels/bf16_stream.cu for BF16 weights streamed at few rows, kernels/quantized_matmul.cu for
// int8/int4 ones): the chunk of the inner dimension each partial sum covers, the chunk partials of
// the skinny kernels and their sum in chunk order, the bf16 tensor-core fragments, x as bf16
// terms, and the grouped launches' tiles. Included by those files only; everything here has
// internal linkage, each including file its own copy.

#include <algorithm>
#include <cstdint>
#include <span>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "device_scratch.h"
#include "device_types.h"
#include "launch.h"
#include "matmul.h"

namespace m1::cuda {
namespace {

constexpr int kChunk = kMatmulChunk;

// Element i of a vector of scales stored as F32, F16 or BF16, in fp32 (exact).
__device__ __forceinline__ float load_scale(const void* scales, DType dtype, int64_t i) {
  if (dtype == DType::kF32) return static_cast<const float*>(scales)[i];
  const uint16_t bits = static_cast<const uint16_t*>(scales)[i];
  if (dtype == DType::kF16) return __half2float(__ushort_as_half(bits));
  return __uint_as_float(uint32_t(bits) << 16);
}

// out[r][n] = sum over chunks c, in order, of partial[c][r][n], for every row r, or when given
// for rows [*first_row, *end_row) (a grouped product's rows, known on the device alone).
__global__ void sum_partials(const float* partial, int64_t chunks, int64_t m, int64_t n, float* out, int64_t ldo,
                             const int64_t* first_row, const int64_t* end_row) {
  const int64_t plane = m * n;
  const int64_t begin = first_row ? *first_row * n : 0, end = end_row ? *end_row * n : plane;
  for (int64_t i = begin + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < end;
       i += int64_t(gridDim.x) * blockDim.x) {
    float total = 0.0f;
#pragma unroll 8
    for (int64_t c = 0; c < chunks; ++c) total = __fadd_rn(total, partial[c * plane + i]);
    const int64_t r = i / n;
    out[r * ldo + (i - r * n)] = total;
  }
}

inline void launch_sum_partials(const float* partial, int64_t chunks, int64_t m, int64_t n, float* out, int64_t ldo,
                                cudaStream_t stream, const int64_t* first_row = nullptr,
                                const int64_t* end_row = nullptr) {
  sum_partials<<<grid_for(m * n, 256), 256, 0, stream>>>(partial, chunks, m, n, out, ldo, first_row, end_row);
  M1_CUDA_CHECK_LAUNCH();
}

// Where a skinny kernel puts a chunk's partial: straight into the output when the inner
// dimension is one chunk (0 + partial, as the reduction would), else into the partials, planes of
// `plane_rows` rows, one per chunk.
__device__ __forceinline__ void write_partial(float v, int64_t r, int64_t col, int64_t plane_rows, int64_t n,
                                              float* partial, float* out, int64_t ldo) {
  if (gridDim.x == 1)
    out[r * ldo + col] = __fadd_rn(0.0f, v);
  else
    partial[(blockIdx.x * plane_rows + r) * n + col] = v;
}

// The CTA that completes a column block's chunks adds their partials, in chunk order, into out,
// so no second launch is needed. Each CTA, after writing the partials of the `done` chunks it
// computed for the block, adds `done` to the block's counter (zero before the launch); the one
// that brings it to `chunks` reads every chunk's partials and sets the counter back to zero, so the
// next launch on the stream, or the next replay of a graph, finds it there. `partial` and `out`
// start at the CTA's first row, as its writes did; `rows` rows from there, columns
// [n0, n0 + cols) below n. The sum is sum_partials' to the bit. Every thread of the CTA calls it.
__device__ __forceinline__ void fold_when_complete(int* counter, int done, int64_t chunks, const float* partial,
                                                   int64_t plane_rows, int64_t rows, int64_t n0, int cols, int64_t n,
                                                   float* out, int64_t ldo) {
  __shared__ int fold_last;
  __threadfence();  // this thread's partials reach every SM before the count says they are there
  __syncthreads();
  if (threadIdx.x == 0) fold_last = atomicAdd(counter, done) == int(chunks) - done;
  __syncthreads();
  if (!fold_last) return;
  __threadfence();  // the other CTAs' partials are read after their counts
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int64_t r = i / cols, col = n0 + i % cols;
    if (col >= n) continue;
    // Eight loads in flight at a time (not one L2 round trip per chunk), added in chunk order.
    float total = 0.0f;
    for (int64_t c0 = 0; c0 < chunks; c0 += 8) {
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = c0 + j < chunks ? __ldcg(partial + ((c0 + j) * plane_rows + r) * n + col) : 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (c0 + j < chunks) total = __fadd_rn(total, v[j]);
    }
    out[r * ldo + col] = total;
  }
  if (threadIdx.x == 0) *counter = 0;
}

// fold_when_complete for a skinny launch whose CTAs compute one chunk (grid x) of one column
// block (its counter: blockIdx.z * gridDim.y + blockIdx.y of `counters`).
__device__ __forceinline__ void fold_chunk_partials(int* counters, const float* partial, int64_t plane_rows,
                                                    int64_t rows, int64_t n0, int cols, int64_t n, float* out,
                                                    int64_t ldo) {
  fold_when_complete(counters + blockIdx.z * gridDim.y + blockIdx.y, 1, gridDim.x, partial, plane_rows, rows, n0, cols,
                     n, out, ldo);
}

// The counters fold_chunk_partials needs for a grid of `blocks` column blocks (y times z), when
// there are partials to fold.
inline int* fold_counters(DeviceScratch& scratch, bool partials, int64_t blocks) {
  return partials ? scratch.counters(blocks) : nullptr;
}

// Whether a skinny product's chunk partials (none for a single chunk, which goes straight to out)
// fit the device's budget for them; both kinds of kernel give the same bits.
inline bool skinny_partials_fit(int64_t chunks, int64_t m, int64_t n, const Device& device) {
  return chunks == 1 || size_t(chunks) * size_t(m) * size_t(n) * sizeof(float) <= device.limits().partial_bytes;
}

// ---------------------------------------------------------------------------------------------
// BF16 weights on the tensor cores (matmul.cu, bf16_stream.cu): wmma m16n16k16, x's bf16 terms as
// matrix_a, the weights as matrix_b, a chunk in steps of 16 in increasing k.

using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>;
using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// Tensor-core steps of 16 that a chunk starting at c0 takes: those that start before k.
__device__ __forceinline__ int chunk_steps(int64_t c0, int64_t k) {
  return int(std::min<int64_t>(kChunk / 16, (k - c0 + 15) / 16));
}

// ---------------------------------------------------------------------------------------------
// x as bf16 terms, the largest first. One term: x rounded (nearest even). Three: hi = bf16(x),
// mid = bf16(x - hi) and lo = x - hi - mid, 8 significant bits each, summing to x exactly (an
// infinite x keeps zero mid and lo, so its products stay infinite, not NaN).
template <int kParts>
__device__ __forceinline__ void bf16_terms(float v, __nv_bfloat16 (&terms)[kParts]) {
  static_assert(kParts == 1 || kParts == 3);
  terms[0] = __float2bfloat16_rn(v);
  if constexpr (kParts == 3) {
    const float rest = isfinite(v) ? __fsub_rn(v, __bfloat162float(terms[0])) : 0.0f;
    terms[1] = __float2bfloat16_rn(rest);
    terms[2] = __float2bfloat16_rn(__fsub_rn(rest, __bfloat162float(terms[1])));
  }
}

// Eight consecutive values of x as their kParts bf16 terms, 16 bytes per term: term q's at
// dst + q * term_stride (16-byte aligned), in order.
template <int kParts>
__device__ __forceinline__ void store_bf16_terms_x8(const float (&v)[8], __nv_bfloat16* dst, int64_t term_stride) {
  uint32_t bits[kParts][8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    __nv_bfloat16 t[kParts];
    bf16_terms<kParts>(v[e], t);
#pragma unroll
    for (int q = 0; q < kParts; ++q) bits[q][e] = *reinterpret_cast<const uint16_t*>(&t[q]);
  }
#pragma unroll
  for (int q = 0; q < kParts; ++q)
    *reinterpret_cast<uint4*>(dst + q * term_stride) =
        make_uint4(bits[q][0] | bits[q][1] << 16, bits[q][2] | bits[q][3] << 16, bits[q][4] | bits[q][5] << 16,
                   bits[q][6] | bits[q][7] << 16);
}

// The run of 8 values in the quantized kernels' operand order (quantized_matmul.cu): value e at
// position 2 (e % 4) + e / 4, i.e. 0 4 1 5 2 6 3 7.
__host__ __device__ constexpr int block_order(int e) { return 2 * (e & 3) + (e >> 2); }

// The quantized kernels' 32 inputs of a block in the order of their two tensor-core steps (the
// warpgroup kernels' k-tiles, quantized_matmul.cu): input 8 t + p (t, p < 8) of the block is
// slot 2 t + 8 ((p % 4) % 2) + p / 4 of step (p % 4) / 2, as block_product's fragments place it.
__host__ __device__ constexpr int step_order(int c) {
  const int t = c / 8, p = c % 8;
  return 16 * ((p % 4) / 2) + 2 * t + 8 * ((p % 4) % 2) + p / 4;
}

// Where split_to_bf16 puts each value of a row: in order; each run of 8 in block_order (the
// quantized kernels' fragments); or each block of 32 in step_order (their warpgroup tiles).
enum class XOrder { kNatural, kBlocks, kSteps };

// x's kParts bf16 terms, each [m, ldb] and the next right after it, rows padded with zeros to
// `ldb`, a multiple of 8 (of 32 for XOrder::kSteps), so every row is 16-byte aligned, in `kOrder`.
template <int kParts, XOrder kOrder>
__global__ void split_to_bf16(const float* x, int64_t ldx, int64_t m, int64_t k, __nv_bfloat16* out, int64_t ldb) {
  const int64_t term = m * ldb;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < term; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / ldb, c = i - r * ldb;
    const int e = int(c & 7), b = int(c & 31);
    const int64_t at = kOrder == XOrder::kBlocks  ? i - e + block_order(e)
                       : kOrder == XOrder::kSteps ? i - b + step_order(b)
                                                  : i;
    __nv_bfloat16 terms[kParts];
    bf16_terms<kParts>(c < k ? x[r * ldx + c] : 0.0f, terms);
#pragma unroll
    for (int q = 0; q < kParts; ++q) out[q * term + at] = terms[q];
  }
}

template <int kParts, XOrder kOrder = XOrder::kNatural>
void launch_split_to_bf16(const float* x, int64_t ldx, int64_t m, int64_t k, __nv_bfloat16* out, int64_t ldb,
                          cudaStream_t stream) {
  split_to_bf16<kParts, kOrder><<<grid_for(m * ldb, 256), 256, 0, stream>>>(x, ldx, m, k, out, ldb);
  M1_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------
// Grouped launches. A group's weights (and scales, for quantized weights) travel in the kernel's
// parameters, so nothing is uploaded per call; more groups than one launch holds take several
// launches.

constexpr int kLaunchGroups = 64;
struct GroupWeights {
  const void* data[kLaunchGroups];
  const void* scales[kLaunchGroups];
};

// Rows of one CTA of a grouped launch: group `group`'s rows [row0 + first, row0 + first + rows).
struct GroupTile {
  int group;
  int64_t row0, group_rows, first, rows;
};

// Work unit `index` of a grouped launch, counting each group's ceil(rows / tile_rows) tiles in
// group order; false past the last. Every thread of a CTA gets the same answer, so a CTA without
// work leaves as a whole, before any barrier.
__device__ bool find_tile(const int64_t* offsets, int groups, int64_t tile_rows, int64_t index, GroupTile& tile) {
  for (int g = 0; g < groups; ++g) {
    const int64_t row0 = offsets[g], rows = offsets[g + 1] - row0, tiles = ceil_div(rows, tile_rows);
    if (index < tiles) {
      const int64_t first = index * tile_rows;
      tile = {g, row0, rows, first, std::min(tile_rows, rows - first)};
      return true;
    }
    index -= std::max<int64_t>(tiles, 0);
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Streamed products (bf16_stream.cu, quantized_stream.cu): persistent CTAs, one per SM, each
// taking an equal run of work units (tile of rows, column block, chunk) of a plain product (one
// tile) or a grouped one (each group's rows in tiles, counted on the device).

// The units [first, last) of `units` that this CTA of the grid takes.
struct UnitRun {
  int64_t first, last;
};
__device__ __forceinline__ UnitRun cta_units(int64_t units) {
  return {blockIdx.x * units / gridDim.x, (blockIdx.x + 1) * units / gridDim.x};
}

// One tile of rows: its weights (and scales) and x, where its chunk partials go (chunk c's of row
// r, column j at partial[(c * plane_rows + r) * n + j]; none for one chunk) and its output rows.
struct StreamTile {
  const void* w;
  const void* scales;  // quantized weights' scales
  const float* x;
  const float* up;  // when given, the rows multiplied are swiglu(x, up) (activations.cuh), not x
  int64_t ldx, rows;
  float* partial;
  int64_t plane_rows;
  float* out;
  int64_t ldo;
  const int64_t* x_rows = nullptr;  // when given, the tile's row r is x's row x_rows[r] (not r)
};

// The tile's row r of x.
__device__ __forceinline__ const float* x_row(const StreamTile& tile, int64_t r) {
  return tile.x + (tile.x_rows ? tile.x_rows[r] : r) * tile.ldx;
}

// Plain products of the same rows of x whose weights share a shape (a product's weights, or
// blocks of rows of several products' weights): a tile each, in order. Piece i's chunk partials
// at partial + i * plane.
constexpr int kMaxStreamPieces = 12;
struct PieceTiles {
  const float* x;
  int64_t ldx, rows;
  int count_;
  const void* w[kMaxStreamPieces];
  const void* scales[kMaxStreamPieces];
  float* out[kMaxStreamPieces];
  int64_t ldo[kMaxStreamPieces];
  float* partial;
  int64_t plane;
  __device__ int64_t count() const { return count_; }
  __device__ StreamTile at(int64_t i) const {
    return {w[i], scales[i], x, nullptr, ldx, rows, partial ? partial + i * plane : nullptr, rows, out[i], ldo[i]};
  }
};

// The tiles of `pieces` (at most kMaxStreamPieces, weights of one shape) over x's m rows, with
// their chunk partials and fold counters (one per piece and column block of `cols` outputs) in
// `scratch`; `units` gets the launch's work units.
inline PieceTiles piece_tiles(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> pieces, int cols,
                              DeviceScratch& scratch, int*& counters, int64_t& units) {
  const int64_t n = pieces[0].w.rows, chunks = ceil_div(pieces[0].w.cols, kChunk), count = int64_t(pieces.size());
  const int64_t plane = chunks > 1 ? chunks * m * n : 0;
  PieceTiles tiles{x, ldx, m, int(count), {}, {}, {}, {}, nullptr, plane};
  tiles.partial = chunks > 1 ? scratch.get<float>(size_t(count * plane)) : nullptr;
  for (int64_t i = 0; i < count; ++i) {
    tiles.w[i] = pieces[size_t(i)].w.data;
    tiles.scales[i] = pieces[size_t(i)].w.scales;
    tiles.out[i] = pieces[size_t(i)].out;
    tiles.ldo[i] = pieces[size_t(i)].ldo;
  }
  counters = fold_counters(scratch, tiles.partial, count * ceil_div(n, cols));
  units = count * ceil_div(n, cols) * chunks;
  return tiles;
}

// Grouped products of the same rows (a MoE's gate and up) in one launch: each group's rows in tiles
// of tile_rows, in group order (find_tile), known on the device alone; the products' tiles one
// after the other. Product p's chunk partials at partial + p * partial_stride.
constexpr int kMaxStreamProducts = 2;
struct GroupedTiles {
  const float* x;
  const float* up;  // as StreamTile's, rows ldx apart like x's
  int64_t ldx, rows;
  const int64_t* offsets;
  int groups;
  int64_t tile_rows, n;
  int products;
  GroupWeights weights[kMaxStreamProducts];
  float* partial;
  int64_t partial_stride;
  float* out[kMaxStreamProducts];
  int64_t ldo[kMaxStreamProducts];
  const int64_t* x_rows;  // when given, row r of the call is x's row x_rows[r]
  __device__ int64_t product_tiles() const {
    int64_t tiles = 0;
    for (int g = 0; g < groups; ++g) tiles += std::max<int64_t>(ceil_div(offsets[g + 1] - offsets[g], tile_rows), 0);
    return tiles;
  }
  __device__ int64_t count() const { return products * product_tiles(); }
  __device__ StreamTile at(int64_t index) const {  // index < count()
    const int64_t per_product = product_tiles();
    const int p = int(index / per_product);
    GroupTile t{};
    find_tile(offsets, groups, tile_rows, index % per_product, t);
    const int64_t r0 = t.row0 + t.first;
    return {weights[p].data[t.group], weights[p].scales[t.group], x_rows ? x : x + r0 * ldx, up ? up + r0 * ldx : nullptr,
            ldx, t.rows, partial ? partial + p * partial_stride + r0 * n : nullptr, rows, out[p] + r0 * ldo[p], ldo[p],
            x_rows ? x_rows + r0 : nullptr};
  }
};

// The tile of the units a loop walks, looked up again only when it changes.
template <class Tiles>
struct TileCursor {
  int64_t index = -1;
  StreamTile tile{};
  __device__ const StreamTile& at(const Tiles& tiles, int64_t i) {
    if (i != index) {
      tile = tiles.at(i);
      index = i;
    }
    return tile;
  }
};

// Unit chunk c's partial v of the tile's row r, column col (below n): where the per-chunk skinny
// kernels put it (write_partial).
__device__ __forceinline__ void write_unit_partial(const StreamTile& tile, int64_t c, int64_t r, int64_t col,
                                                   int64_t n, float v) {
  if (tile.partial)
    tile.partial[(c * tile.plane_rows + r) * n + col] = v;
  else
    tile.out[r * tile.ldo + col] = __fadd_rn(0.0f, v);
}

// After unit u of the CTA's run, whose partials the whole CTA has written: if the next unit is in
// another column block (u / chunks names the tile and the block) or there is none, the CTA counts
// the block's chunks it computed, and the one that completes them folds them (fold_when_complete;
// counters: one per tile and column block of `cols` outputs). Every thread of the CTA calls it.
__device__ __forceinline__ void leave_unit(const StreamTile& tile, int64_t u, const UnitRun& run, int64_t chunks,
                                           int* counters, int cols, int64_t n) {
  if (!tile.partial || (u + 1 != run.last && (u + 1) / chunks == u / chunks)) return;
  const int done = int(u + 1 - std::max(run.first, u / chunks * chunks));
  const int64_t n0 = u % (ceil_div(n, cols) * chunks) / chunks * cols;
  fold_when_complete(counters + u / chunks, done, chunks, tile.partial, tile.plane_rows, tile.rows, n0, cols, n,
                     tile.out, tile.ldo);
}

// Grouped launches take the groups kLaunchGroups at a time. Their grids are sized from what the
// host knows: the groups' tiles of tile_rows rows number at most rows / tile_rows plus one per
// group that has rows (a group of c > 0 rows has ceil(c / tile_rows) <= c / tile_rows + 1), and
// at most `rows` groups have rows.
inline int64_t grouped_tiles(int64_t rows, int64_t groups, int64_t tile_rows) {
  return rows / tile_rows + std::min(groups, rows);
}

// Skinny grouped launches put the tiles in grid z, which stops at 65535.
inline bool skinny_grid_fits(int64_t rows, int64_t groups, int64_t tile_rows) {
  return grouped_tiles(rows, std::min<int64_t>(groups, kLaunchGroups), tile_rows) <= 65535;
}

inline GroupWeights group_weights(std::span<const DeviceMatrix> w, int64_t first, int64_t count) {
  GroupWeights g{};
  for (int64_t i = 0; i < count; ++i) {
    g.data[i] = w[size_t(first + i)].data;
    g.scales[i] = w[size_t(first + i)].scales;
  }
  return g;
}

// Every launch of a grouped product: launch(first group, group count, weights of those groups).
template <class Launch>
void for_each_launch(std::span<const DeviceMatrix> w, Launch launch) {
  const int64_t groups = int64_t(w.size());
  for (int64_t first = 0; first < groups; first += kLaunchGroups) {
    const int64_t count = std::min<int64_t>(kLaunchGroups, groups - first);
    launch(first, int(count), group_weights(w, first, count));
  }
}

inline bool all_aligned16(std::span<const DeviceMatrix> w) {
  return std::all_of(w.begin(), w.end(), [](const DeviceMatrix& m) { return aligned16(m.data); });
}

// The rows per tile a streamed grouped call takes (0: it does not stream). Groups of at most
// max_rows rows (the bound) stream whole; larger bounds stream too when the call has few rows in
// all (a decode step's experts: at most 64 slots), in tiles of max_rows, each tile reading its
// group's weights once, since most groups then have few rows although the bound cannot say so.
inline int64_t stream_tile_rows(int64_t group_rows, int64_t rows, int64_t max_rows) {
  return group_rows <= max_rows || rows <= 64 ? std::min(group_rows, max_rows) : 0;
}

// The tallest tile from stream_tile_rows down, by halves, in which streams(tile, product) holds
// for every product (the rings of taller tiles may not fit the device's shared memory); 0 when
// none does.
template <class Streams>
int64_t tallest_stream_tile(std::span<const GroupedProduct> products, int64_t group_rows, int64_t rows,
                            int64_t max_rows, Streams streams) {
  const auto all_stream = [&](int64_t tile) {
    return std::all_of(products.begin(), products.end(), [&](const GroupedProduct& p) { return streams(tile, p); });
  };
  int64_t tile = stream_tile_rows(group_rows, rows, max_rows);
  while (tile > 0 && !all_stream(tile)) tile /= 2;
  return tile;
}

// The launches of streamed grouped products (bf16_stream.cu, quantized_stream.cu) of x (the rows
// x_rows names, when given), or of swiglu(x, up) when `up` is given: launch(tiles, counters, units)
// for each, products kMaxStreamProducts at a time while their chunk partials fit together (else
// one at a time, sharing one set), groups kLaunchGroups at a time; `units` bounds the launch's work
// units (the tiles are counted on the device), so a grid needs no more CTAs. `cols`: outputs per
// column block.
template <class Launch>
void for_each_stream_launch(const float* x, const float* up, int64_t ldx, int64_t rows, const int64_t* offsets,
                            int64_t tile_rows, std::span<const GroupedProduct> products, int cols,
                            DeviceScratch& scratch, const Device& device, const int64_t* x_rows, Launch launch) {
  const int64_t n = products[0].w[0].rows, k = products[0].w[0].cols, chunks = ceil_div(k, kChunk);
  const int64_t groups = int64_t(products[0].w.size()), blocks = ceil_div(n, cols);
  const int64_t together = skinny_partials_fit(chunks, rows * kMaxStreamProducts, n, device) ? kMaxStreamProducts : 1;
  const int64_t plane = chunks > 1 ? chunks * rows * n : 0;
  float* partial = chunks > 1 ? scratch.get<float>(size_t(std::min<int64_t>(together, int64_t(products.size())) * plane))
                              : nullptr;
  for (size_t p0 = 0; p0 < products.size(); p0 += size_t(together)) {
    const int set = int(std::min<int64_t>(together, int64_t(products.size() - p0)));
    for (int64_t first = 0; first < groups; first += kLaunchGroups) {
      const int count = int(std::min<int64_t>(kLaunchGroups, groups - first));
      GroupedTiles tiles{x, up, ldx, rows, offsets + first, count, tile_rows, n, set, {}, partial, plane, {}, {}, x_rows};
      for (int i = 0; i < set; ++i) {
        const GroupedProduct& p = products[p0 + size_t(i)];
        tiles.weights[i] = group_weights(p.w, first, count);
        tiles.out[i] = p.out;
        tiles.ldo[i] = p.ldo;
      }
      const int64_t tiles_bound = set * grouped_tiles(rows, count, tile_rows);
      launch(tiles, fold_counters(scratch, partial, tiles_bound * blocks), tiles_bound * blocks * chunks);
    }
  }
}

}  // namespace
}  // namespace m1::cuda
