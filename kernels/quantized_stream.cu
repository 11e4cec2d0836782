// int8 / int4 products of a few rows with codes, scales and x streamed through shared memory
// (quantized_stream.h).
//
// The skinny kernels of quantized_matmul.cu give each CTA one chunk of 64 weight rows: 16 KB of
// int8 codes, 8 KB of int4, copied in, multiplied, written, left; an SM has bytes in flight only
// between a CTA's launch and its first barrier. Here one CTA of 8 warps per SM stays for the whole
// product (bf16_stream.cu does the same for BF16 weights):
//
// - Work units are (tile of rows, column block of 128 weight rows, chunk), in that order; CTA i of
//   G takes units [i U / G, (i + 1) U / G) (cta_units).
// - A stage is one unit: the block's codes for the chunk (36 KB int8, 18 KB int4) and the chunk of
//   x's rows in fp32, copied by cp.async into a ring of kStages, and the block's scales for the
//   chunk's 8 blocks, loaded into registers when the stage is issued and stored into the ring after
//   the current stage is multiplied, so no load from device memory waits inside a stage.
// - Warp i owns weight rows [16 i, 16 i + 16) (two mma column tiles), as a skinny warp does: the
//   same block_product calls in the same order on the same operands, the scales the same values
//   (read from the ring instead of device memory), the chunk's partial written where the skinny
//   kernel writes it, and the CTA that completes a column block's chunks folds them (leave_unit).
//   So the bits are the skinny kernel's.

#include "quantized_stream.h"

#include <cuda_pipeline.h>

#include <algorithm>
#include <cstdint>
#include <span>

#include "launch.h"
#include "m1/error.h"
#include "matmul_common.cuh"
#include "quantized_common.cuh"
#include "quantized_matmul.h"

namespace m1::cuda {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kCols = 16 * kWarps;  // weight rows (output columns) per column block
constexpr int kStages = 4;
constexpr int kXRows = 16;                                 // x's terms: one mma row tile
constexpr int kScalesPerStage = kCols * kBlocksPerChunk;   // a scale per weight row and block
constexpr int kScalesPerThread = kScalesPerStage / kThreads;
static_assert(kScalesPerStage % kThreads == 0);

template <DType T>
constexpr int kCodeStage = kCols * code_stride<T>(kBlocksPerChunk);  // bytes

// The rings of codes, of x's fp32 rows (max_rows per stage, and as many of up's when the product
// applies SwiGLU: inputs 2) and of scales, then x's terms for the stage being multiplied.
template <DType T>
constexpr int shared_bytes(int parts, int64_t max_rows, int inputs) {
  return int(kStages * (kCodeStage<T> + inputs * max_rows * kChunk * 4 + kScalesPerStage * 4) +
             parts * kXRows * kChunk * 2);
}

// Each cap's plain ring fits the 227 KB a block may take on an H100 or H200 (with fp32 operands;
// int4 with SwiGLU's second input too, at bf16 operands); a tile that does not is halved.
static_assert(shared_bytes<DType::kQ4>(3, quantized_stream_max_rows(DType::kQ4), 1) <= 227 * 1024 &&
              shared_bytes<DType::kQ4>(1, quantized_stream_max_rows(DType::kQ4), 2) <= 227 * 1024 &&
              shared_bytes<DType::kQ8>(3, quantized_stream_max_rows(DType::kQ8), 1) <= 227 * 1024);

template <DType T, int kParts, class Tiles>
__device__ __forceinline__ void stream_quantized(const Tiles& tiles, QuantOperand w, int max_rows, int inputs,
                                                 int* counters) {
  extern __shared__ __align__(16) unsigned char quant_stream_shared[];
  unsigned char* code_ring = quant_stream_shared;
  float* x_ring = reinterpret_cast<float*>(code_ring + kStages * kCodeStage<T>);
  const int x_stage = inputs * max_rows * kChunk;  // floats: x's rows, then up's
  float* scale_ring = x_ring + kStages * x_stage;
  unsigned char* xs = reinterpret_cast<unsigned char*>(scale_ring + kStages * kScalesPerStage);

  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t n = w.n, k = w.k, chunks = ceil_div(k, kChunk), per_tile = ceil_div(n, kCols) * chunks;
  const UnitRun run = cta_units(tiles.count() * per_tile);
  const int64_t units = run.last - run.first;
  if (units == 0) return;  // the whole CTA, before any barrier

  // Stage t is unit run.first + t. Its scales: entry row * kBlocksPerChunk + block of the stage.
  TileCursor<Tiles> issuing, computing;
  QuantOperand wi = w, wc = w;  // with the issued / computed tile's codes and scales
  float pending[kScalesPerThread] = {};
  auto issue = [&](int64_t t) {
    if (t < units) {
      const int64_t u = run.first + t, n0 = u % per_tile / chunks * kCols, c = u % chunks;
      const StreamTile& tile = issuing.at(tiles, u / per_tile);
      wi.codes = static_cast<const unsigned char*>(tile.w);
      wi.scales = tile.scales;
      stage_codes<T, kCols, kBlocksPerChunk, kThreads>(code_ring + t % kStages * kCodeStage<T>, wi, n0,
                                                        c * kBlocksPerChunk);
      float* x_dst = x_ring + t % kStages * x_stage;
      for (int i = tid; i < (tile.up ? 2 : 1) * tile.rows * (kChunk / 4); i += kThreads) {
        const int r = i / (kChunk / 4) % int(tile.rows), kk = i % (kChunk / 4) * 4;
        const bool second = i >= tile.rows * (kChunk / 4), inside = c * kChunk + kk < k;
        const float* src = second ? tile.up + r * tile.ldx : x_row(tile, r);
        __pipeline_memcpy_async(x_dst + ((second ? max_rows : 0) + r) * kChunk + kk, inside ? src + c * kChunk + kk : src,
                                16, inside ? 0 : 16);
      }
#pragma unroll
      for (int i = 0; i < kScalesPerThread; ++i) {
        const int e = tid + i * kThreads, row = e / kBlocksPerChunk;
        const int64_t kb = c * kBlocksPerChunk + e % kBlocksPerChunk;
        pending[i] = kb * kBlockK < k ? scale_of(wi, n0 + row, kb) : 0.0f;
      }
    }
    __pipeline_commit();  // an empty group past the end keeps the wait count uniform
  };
  auto stash = [&](int64_t t) {
    if (t >= units) return;
#pragma unroll
    for (int i = 0; i < kScalesPerThread; ++i) scale_ring[t % kStages * kScalesPerStage + tid + i * kThreads] = pending[i];
  };

  for (int s = 0; s < kStages - 1; ++s) {
    issue(s);
    stash(s);
  }
  for (int64_t t = 0; t < units; ++t) {
    __pipeline_wait_prior(kStages - 2);  // stage t has landed (this thread's copies)
    __syncthreads();                     // ... every thread's, its scales too; stage t - 1's buffers are free
    issue(t + kStages - 1);

    const int buf = int(t % kStages);
    const int64_t u = run.first + t, n0 = u % per_tile / chunks * kCols, c = u % chunks;
    const int64_t kb0 = c * kBlocksPerChunk, col0 = n0 + 16 * warp;
    const StreamTile& tile = computing.at(tiles, u / per_tile);
    wc.codes = static_cast<const unsigned char*>(tile.w);
    wc.scales = tile.scales;
    const int blocks = int(std::min<int64_t>(kBlocksPerChunk, ceil_div(k - kb0 * kBlockK, kBlockK)));

    const float* x_src = x_ring + buf * x_stage;
    stage_x_from_fp32<kParts, kXRows, kBlocksPerChunk, kThreads>(xs, x_src, kChunk, tile.rows, 0, k - c * kChunk,
                                                                 tile.up ? x_src + max_rows * kChunk : nullptr);
    __syncthreads();

    const float* table = scale_ring + buf * kScalesPerStage;
    const auto staged = [&](int64_t row, int64_t kb) { return table[(row - n0) * kBlocksPerChunk + (kb - kb0)]; };
    float scales[kBlocksPerChunk][2], column_scales[2][2];
#pragma unroll
    for (int b = 0; b < kBlocksPerChunk; ++b) block_scales<2>(wc, col0, kb0 + b, scales[b], staged);
    chunk_scales(wc, col0, kb0, column_scales, staged);

    const unsigned char* cs = code_ring + buf * kCodeStage<T>;
    float part[1][2][4];
    warp_chunk<T, kParts, 1, kXRows>(xs, int(tile.rows), cs, 16 * warp, wc, col0, kb0, blocks, scales, staged, part);
    for_each_output<1, 2>(col0, n, 0, tile.rows, [&](int i, int j, int e, int64_t r, int64_t col) {
      write_unit_partial(tile, c, r, col, n, chunk_value(wc, part[i][j][e], column_scales[j][e & 1]));
    });
    stash(t + kStages - 1);
    leave_unit(tile, u, run, chunks, counters, kCols, n);
  }
}

template <DType T, int kParts>
__global__ __launch_bounds__(kThreads, 1) void quant_stream_plain(PieceTiles tiles, QuantOperand w, int* counters) {
  stream_quantized<T, kParts>(tiles, w, int(tiles.rows), 1, counters);
}

template <DType T, int kParts>
__global__ __launch_bounds__(kThreads, 1) void quant_stream_grouped(GroupedTiles tiles, QuantOperand w,
                                                                    int* counters) {
  stream_quantized<T, kParts>(tiles, w, int(tiles.tile_rows), tiles.up ? 2 : 1, counters);
}

}  // namespace

bool quantized_streams(int64_t rows, const float* x, int64_t ldx, std::span<const DeviceMatrix> weights,
                       GemmOperands operands, const Device& device, const float* up) {
  if (weights.empty() || rows < 1 || rows > quantized_stream_max_rows(weights[0].dtype) || device.limits().sms < 1)
    return false;
  const int parts = operands == GemmOperands::kBf16 ? 1 : 3;
  const int inputs = up ? 2 : 1;
  const int bytes = weights[0].dtype == DType::kQ4 ? shared_bytes<DType::kQ4>(parts, rows, inputs)
                                                   : shared_bytes<DType::kQ8>(parts, rows, inputs);
  return aligned16(x) && (!up || aligned16(up)) && ldx % 4 == 0 && weights[0].cols % 4 == 0 &&
         bytes <= device.limits().shared_per_block;
}

void quantized_stream_matmul(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> pieces,
                             GemmOperands operands, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  with_kind(pieces[0].w.dtype, operands, [&]<DType T, int kParts>() {
    constexpr auto kernel = quant_stream_plain<T, kParts>;
    const int bytes = shared_bytes<T>(kParts, m, 1);
    device.allow_shared_memory<kernel>(size_t(bytes));
    // Every piece's weights share a shape, scale dtype and group size; their codes and scales
    // travel in the tiles.
    bool aligned = true;
    for (const PlainProduct& p : pieces) aligned = aligned && aligned16(p.w.data);
    const QuantOperand w = operand(pieces[0].w, operands, aligned);
    int* counters;
    int64_t units;
    const PieceTiles tiles = piece_tiles(x, ldx, m, pieces, kCols, scratch, counters, units);
    const int64_t grid = std::min<int64_t>(units, device.limits().sms);
    kernel<<<unsigned(grid), kThreads, bytes, stream>>>(tiles, w, counters);
    M1_CUDA_CHECK_LAUNCH();
  });
}

void quantized_stream_grouped(const float* x, int64_t ldx, int64_t rows, const int64_t* offsets, int64_t group_rows,
                              std::span<const GroupedProduct> products, GemmOperands operands, DeviceScratch& scratch,
                              Device& device, cudaStream_t stream, const float* up, const int64_t* x_rows) {
  with_kind(products[0].w[0].dtype, operands, [&]<DType T, int kParts>() {
    constexpr auto kernel = quant_stream_grouped<T, kParts>;
    const int bytes = shared_bytes<T>(kParts, group_rows, up ? 2 : 1);
    device.allow_shared_memory<kernel>(size_t(bytes));
    // Every product's weights share a shape, scale dtype and group size; their codes and scales
    // travel in the tiles.
    bool aligned = true;
    for (const GroupedProduct& p : products) aligned = aligned && all_aligned16(p.w);
    const QuantOperand w = operand(products[0].w[0], operands, aligned);
    for_each_stream_launch(x, up, ldx, rows, offsets, group_rows, products, kCols, scratch, device, x_rows,
                           [&](const GroupedTiles& tiles, int* counters, int64_t units) {
                             const int64_t grid = std::min<int64_t>(units, device.limits().sms);
                             kernel<<<unsigned(grid), kThreads, bytes, stream>>>(tiles, w, counters);
                             M1_CUDA_CHECK_LAUNCH();
                           });
  });
}

}  // namespace m1::cuda
