// BF16 products of a few rows with the weights streamed through shared memory (bf16_stream.h).
//
// The per-chunk skinny kernels of matmul.cu give each CTA one 32 KB piece of the weights: it
// copies the piece in, multiplies, writes its partials and leaves, so an SM has bytes in flight
// only while its CTAs are between launch and their first barrier, and one-row products ran at the
// latency limit (52% of the copy bandwidth on the H200, the same time as on the H100). Here one
// CTA per SM stays for the whole product and streams:
//
// - Work units are (tile of rows, column block of 128 weight rows, chunk), in that order;
//   CTA i of G takes units [i U / G, (i + 1) U / G), so the SMs' shares differ by one unit at most.
// - A stage is half a unit: the block's 128 weight rows over 128 inputs (32 KB) and those inputs
//   of the tile's rows of x in fp32, copied by cp.async into a ring of kStages stages, so
//   kStages - 1 stages are in flight while the CTA multiplies the one that has landed.
// - Warp i owns the block's columns [16 i, 16 i + 16): it splits nothing and reorders nothing. A
//   chunk's fresh partial takes its steps of 16 in increasing k over the chunk's two stages, x's
//   terms last to first, exactly as matmul.cu's kernels do; the chunk's partials go where theirs
//   go (straight to out for a single chunk), and the CTA that completes a column block's chunks
//   adds them in chunk order (fold_when_complete). So the bits are theirs.

#include "bf16_stream.h"

#include <cuda_pipeline.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <span>

#include <cuda_bf16.h>

#include "activations.cuh"
#include "launch.h"
#include "m1/error.h"
#include "matmul_common.cuh"

namespace m1::cuda {
namespace {

using namespace nvcuda;

constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kCols = 16 * kWarps;         // weight rows (output columns) per column block
constexpr int kStageK = kChunk / 2;        // inputs per stage
constexpr int kStride = kStageK + 8;       // bf16 per staged row: rows 16-byte aligned, banks staggered
constexpr int kWStage = kCols * kStride;   // bf16 per weight stage
constexpr int kStages = 4;
static_assert(kChunk % kStageK == 0 && kStageK % 16 == 0);
constexpr int kStagesPerChunk = kChunk / kStageK;

// The ring of weights, the ring of x's fp32 rows (max_rows per stage, and as many of up's when the
// product applies SwiGLU: inputs 2), x's terms for the stage being multiplied (16 rows each, rows
// past the tile's zero), and each warp's 16 x 16 outputs.
constexpr int shared_bytes(int parts, int64_t max_rows, int inputs) {
  return int(kStages * (kWStage * 2 + inputs * max_rows * kStageK * 4) + parts * 16 * kStride * 2 + kWarps * 256 * 4);
}
static_assert(kBf16StreamMaxRows <= 16, "x's terms are one 16-row fragment tile");
static_assert(shared_bytes(3, kBf16StreamMaxRows, 2) <= 227 * 1024, "the widest ring fits an H100's block");

template <int kParts, class Tiles>
__device__ __forceinline__ void stream_products(const Tiles& tiles, int64_t n, int64_t k, int max_rows, int inputs,
                                                int* counters) {
  extern __shared__ __align__(128) unsigned char stream_shared[];
  __nv_bfloat16* w_ring = reinterpret_cast<__nv_bfloat16*>(stream_shared);
  float* x_ring = reinterpret_cast<float*>(w_ring + kStages * kWStage);
  const int x_stage = inputs * max_rows * kStageK;  // floats: x's rows, then up's
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(x_ring + kStages * x_stage);  // term q: 16 rows
  float* out_stage = reinterpret_cast<float*>(xs + kParts * 16 * kStride);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t chunks = ceil_div(k, kChunk), per_tile = ceil_div(n, kCols) * chunks;
  const UnitRun run = cta_units(tiles.count() * per_tile);
  const int64_t first = run.first, last = run.last;
  const int64_t stages = kStagesPerChunk * (last - first);
  if (stages == 0) return;  // the whole CTA, before any barrier

  // Stage t: unit first + t / kStagesPerChunk, its inputs from (t % kStagesPerChunk) * kStageK.
  TileCursor<Tiles> issuing, computing;
  auto issue = [&](int64_t t) {
    if (t < stages) {
      const int64_t u = first + t / kStagesPerChunk, b = u % per_tile / chunks, c = u % chunks;
      const StreamTile& tile = issuing.at(tiles, u / per_tile);
      const auto* weights = static_cast<const uint16_t*>(tile.w);
      const int64_t k0 = c * kChunk + t % kStagesPerChunk * kStageK, n0 = b * kCols;
      __nv_bfloat16* w_dst = w_ring + t % kStages * kWStage;
      for (int i = tid; i < kCols * (kStageK / 8); i += kThreads) {
        const int row = i / (kStageK / 8), kk = i % (kStageK / 8) * 8;
        const bool inside = n0 + row < n && k0 + kk < k;
        __pipeline_memcpy_async(w_dst + row * kStride + kk, inside ? weights + (n0 + row) * k + k0 + kk : weights, 16,
                                inside ? 0 : 16);
      }
      float* x_dst = x_ring + t % kStages * x_stage;
      for (int i = tid; i < (tile.up ? 2 : 1) * tile.rows * (kStageK / 4); i += kThreads) {
        const int r = i / (kStageK / 4) % int(tile.rows), kk = i % (kStageK / 4) * 4;
        const bool second = i >= tile.rows * (kStageK / 4), inside = k0 + kk < k;
        const float* src = second ? tile.up + r * tile.ldx : x_row(tile, r);
        __pipeline_memcpy_async(x_dst + ((second ? max_rows : 0) + r) * kStageK + kk, inside ? src + k0 + kk : src, 16,
                                inside ? 0 : 16);
      }
    }
    __pipeline_commit();  // an empty group past the end keeps the wait count uniform
  };

  // Rows of the terms past max_rows stay zero; the stages rewrite the others.
  for (int i = tid; i < kParts * 16 * kStride / 8; i += kThreads)
    reinterpret_cast<uint4*>(xs)[i] = make_uint4(0, 0, 0, 0);
  for (int s = 0; s < kStages - 1; ++s) issue(s);

  FragC part;
  wmma::fill_fragment(part, 0.0f);
  for (int64_t t = 0; t < stages; ++t) {
    __pipeline_wait_prior(kStages - 2);  // stage t has landed (this thread's copies)
    __syncthreads();                     // ... every thread's; and stage t - 1's buffers are free
    issue(t + kStages - 1);

    const int buf = int(t % kStages), half = int(t % kStagesPerChunk);
    const int64_t u = first + t / kStagesPerChunk, b = u % per_tile / chunks, c = u % chunks;
    const StreamTile& tile = computing.at(tiles, u / per_tile);

    // x's terms of this stage, as split_to_bf16 makes them (rows of other tiles' x zeroed), of
    // swiglu(x, up) as swiglu makes it when the product applies it.
    const float* x_src = x_ring + buf * x_stage;
    for (int i = tid; i < max_rows * (kStageK / 8); i += kThreads) {
      const int r = i / (kStageK / 8), kk = i % (kStageK / 8) * 8;
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float xv = r < tile.rows ? x_src[r * kStageK + kk + e] : 0.0f;
        v[e] = tile.up && r < tile.rows ? swiglu_value(xv, x_src[(max_rows + r) * kStageK + kk + e]) : xv;
      }
      store_bf16_terms_x8<kParts>(v, xs + r * kStride + kk, 16 * kStride);
    }
    __syncthreads();

    // The chunk's steps that fall in this stage.
    const int steps = std::clamp(chunk_steps(c * kChunk, k) - half * (kStageK / 16), 0, kStageK / 16);
    const __nv_bfloat16* w_tile = w_ring + buf * kWStage + warp * 16 * kStride;
    for (int s = 0; s < steps; ++s) {
      FragB wb;
      wmma::load_matrix_sync(wb, w_tile + s * 16, kStride);
#pragma unroll
      for (int q = kParts - 1; q >= 0; --q) {
        FragA xa;
        wmma::load_matrix_sync(xa, xs + q * 16 * kStride + s * 16, kStride);
        wmma::mma_sync(part, xa, wb, part);
      }
    }
    if (half != kStagesPerChunk - 1) continue;

    // The chunk is done: its partial out, as the per-chunk kernels write theirs.
    float* mine = out_stage + warp * 256;
    wmma::store_matrix_sync(mine, part, 16, wmma::mem_row_major);
    wmma::fill_fragment(part, 0.0f);
    __syncwarp();
    const int64_t col0 = b * kCols + warp * 16;
    for (int e = lane; e < tile.rows * 16; e += 32)
      if (col0 + e % 16 < n) write_unit_partial(tile, c, e / 16, col0 + e % 16, n, mine[e]);
    __syncwarp();
    leave_unit(tile, u, run, chunks, counters, kCols, n);
  }
}

template <int kParts>
__global__ __launch_bounds__(kThreads, 1) void bf16_stream_plain(PieceTiles tiles, int64_t n, int64_t k,
                                                                 int* counters) {
  stream_products<kParts>(tiles, n, k, int(tiles.rows), 1, counters);
}

template <int kParts>
__global__ __launch_bounds__(kThreads, 1) void bf16_stream_grouped_kernel(GroupedTiles tiles, int64_t n, int64_t k,
                                                                          int* counters) {
  stream_products<kParts>(tiles, n, k, int(tiles.tile_rows), tiles.up ? 2 : 1, counters);
}

template <int kParts>
void launch_plain(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> pieces, DeviceScratch& scratch,
                  Device& device, cudaStream_t stream) {
  constexpr auto kernel = bf16_stream_plain<kParts>;
  const int bytes = shared_bytes(kParts, m, 1);
  device.allow_shared_memory<kernel>(size_t(bytes));
  int* counters;
  int64_t units;
  const PieceTiles tiles = piece_tiles(x, ldx, m, pieces, kCols, scratch, counters, units);
  const int64_t grid = std::min<int64_t>(units, device.limits().sms);
  kernel<<<unsigned(grid), kThreads, bytes, stream>>>(tiles, pieces[0].w.rows, pieces[0].w.cols, counters);
  M1_CUDA_CHECK_LAUNCH();
}

template <int kParts>
void launch_grouped(const float* x, const float* up, int64_t ldx, int64_t rows, const int64_t* offsets,
                    int64_t tile_rows, std::span<const GroupedProduct> products, DeviceScratch& scratch,
                    Device& device, cudaStream_t stream, const int64_t* x_rows) {
  constexpr auto kernel = bf16_stream_grouped_kernel<kParts>;
  const int bytes = shared_bytes(kParts, tile_rows, up ? 2 : 1);
  device.allow_shared_memory<kernel>(size_t(bytes));
  const int64_t n = products[0].w[0].rows, k = products[0].w[0].cols;
  for_each_stream_launch(x, up, ldx, rows, offsets, tile_rows, products, kCols, scratch, device, x_rows,
                         [&](const GroupedTiles& tiles, int* counters, int64_t units) {
                           const int64_t grid = std::min<int64_t>(units, device.limits().sms);
                           kernel<<<unsigned(grid), kThreads, bytes, stream>>>(tiles, n, k, counters);
                           M1_CUDA_CHECK_LAUNCH();
                         });
}

}  // namespace

bool bf16_streams(int64_t rows, const float* x, int64_t ldx, std::span<const DeviceMatrix> weights, int parts,
                  const Device& device, const float* up) {
  if (rows < 1 || rows > kBf16StreamMaxRows || weights.empty() || device.limits().sms < 1) return false;
  const int64_t k = weights[0].cols;
  return aligned16(x) && (!up || aligned16(up)) && ldx % 4 == 0 && k % 8 == 0 && all_aligned16(weights) &&
         shared_bytes(parts, rows, up ? 2 : 1) <= device.limits().shared_per_block;
}

void bf16_stream_matmul(const float* x, int64_t ldx, int64_t m, std::span<const PlainProduct> pieces, int parts,
                        DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (parts == 1) return launch_plain<1>(x, ldx, m, pieces, scratch, device, stream);
  if (parts == 3) return launch_plain<3>(x, ldx, m, pieces, scratch, device, stream);
  fail("bf16_stream_matmul: {} terms of x", parts);
}

void bf16_stream_grouped(const float* x, int64_t ldx, int64_t rows, const int64_t* offsets, int64_t group_rows,
                         std::span<const GroupedProduct> products, int parts, DeviceScratch& scratch, Device& device,
                         cudaStream_t stream, const float* up, const int64_t* x_rows) {
  if (parts == 1)
    return launch_grouped<1>(x, up, ldx, rows, offsets, group_rows, products, scratch, device, stream, x_rows);
  if (parts == 3)
    return launch_grouped<3>(x, up, ldx, rows, offsets, group_rows, products, scratch, device, stream, x_rows);
  fail("bf16_stream_grouped: {} terms of x", parts);
}

}  // namespace m1::cuda
