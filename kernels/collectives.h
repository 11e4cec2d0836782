#pragma once
// The kernels of the CUDA ranks' collectives. Sums always add the ranks' values in rank order,
// element by element, so every rank gets the same bits and an element's sum does not depend on
// how many elements the call carried (batch invariance at every N).
//
// "Peer" kernels work on buffers every rank can read (ranks on one GPU, or on GPUs with peer
// access): one-shot, each call writes this rank's data into its buffer, meets the other ranks at
// a barrier of flags in device memory, and reads theirs. The flags count calls on the device, so
// the kernels replay correctly from CUDA graphs. Every rank launches the same calls in the same
// order; a barrier that waits too long (a rank that never comes) traps instead of hanging.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

namespace m1::cuda {

constexpr int kMaxPeerRanks = 16;
constexpr int kPeerBlocks = 8;  // blocks of every peer kernel: few, so peers' other kernels keep the GPU

// Every rank's buffers, as the device sees them.
struct PeerTable {
  float* buffers[kMaxPeerRanks] = {};  // each rank's 2 x capacity floats (two halves, used in turn)
  uint32_t* flags[kMaxPeerRanks] = {};  // each rank's [kPeerBlocks][kMaxPeerRanks] arrival flags
  int64_t capacity = 0;                // floats per half
};

// One rank's place: its counters ([kPeerBlocks], in its device memory) count its calls.
struct PeerRank {
  int rank = 0, world = 1;
  uint32_t* counters = nullptr;
};

// data [count <= capacity] = the sum over ranks of their data, in rank order.
void peer_all_reduce(const PeerTable& table, const PeerRank& me, float* data, int64_t count, cudaStream_t stream);

// Rank 0's out [rows, total] gets each rank r's part [rows, widths[r]] at column offsets[r]; the
// largest rows * widths[r] must fit the capacity. Other ranks pass out = nullptr.
struct ColumnSplit {
  int64_t widths[kMaxPeerRanks] = {}, offsets[kMaxPeerRanks] = {};
  int64_t total = 0;
};
void peer_gather_columns(const PeerTable& table, const PeerRank& me, const float* part, int64_t rows,
                         const ColumnSplit& split, float* out, cudaStream_t stream);

// data [count] = the sum of gathered [world, count] over its rows, in row order.
void sum_in_rank_order(const float* gathered, int world, int64_t count, float* data, cudaStream_t stream);

// out [rows, split.total] from parts [rows, widths[r]] laid one after another in `gathered`.
void place_columns(const float* gathered, int world, int64_t rows, const ColumnSplit& split, float* out,
                   cudaStream_t stream);

}  // namespace m1::cuda
