// The collectives' kernels (collectives.h): one-shot all-reduce and column gather over peer
// buffers with a flag barrier per block, and the rank-order sum and column placement that the
// NCCL path runs after NCCL has moved the data.

#include "collectives.h"

#include <algorithm>

#include "cuda_check.h"
#include "launch.h"
#include "m1/error.h"

namespace m1::cuda {
namespace {

constexpr int kThreads = 512;
// A barrier polls this many times (sleeping ~0.1 us between polls: some seconds in all) before it
// gives up on the other ranks and traps, which fails the rank's stream rather than hanging it.
constexpr uint64_t kMaxPolls = uint64_t(1) << 27;

// The half of the buffers a call uses: calls alternate, so a rank that runs ahead writes the half
// its peers finished reading a call earlier (they must have arrived at the barrier in between).
__device__ __forceinline__ int64_t half_offset(uint32_t call, int64_t capacity) { return (call & 1u) * capacity; }

// Block `block` of rank `rank` has written its part of call `call` and waits until the same block
// of every rank has. Thread p < world tells rank p and waits for rank p.
__device__ void arrive_and_wait(const PeerTable& t, int rank, int world, uint32_t call) {
  __syncthreads();  // the block's writes come first...
  const int block = int(blockIdx.x), p = int(threadIdx.x);
  if (p < world) {
    __threadfence_system();  // ...and are visible to every rank before the flag is
    volatile uint32_t* theirs = t.flags[p] + block * kMaxPeerRanks;
    theirs[rank] = call;
    const volatile uint32_t* mine = t.flags[rank] + block * kMaxPeerRanks;
    for (uint64_t polls = 0; mine[p] != call; ++polls) {
      if (polls == kMaxPolls) __trap();
      __nanosleep(100);
    }
    __threadfence_system();
  }
  __syncthreads();
}

// The i handled by this block: the same set on every rank, for the same count.
template <class Fn>
__device__ __forceinline__ void for_block_elements(int64_t count, Fn fn) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < count; i += int64_t(kPeerBlocks) * kThreads) fn(i);
}

__device__ __forceinline__ float load_peer(const float* p) { return *static_cast<const volatile float*>(p); }

__global__ __launch_bounds__(kThreads) void peer_all_reduce_kernel(PeerTable t, PeerRank me, float* data,
                                                                   int64_t count) {
  const uint32_t call = me.counters[blockIdx.x] + 1;
  const int64_t half = half_offset(call, t.capacity);
  float* mine = t.buffers[me.rank] + half;
  for_block_elements(count, [&](int64_t i) { mine[i] = data[i]; });
  arrive_and_wait(t, me.rank, me.world, call);
  for_block_elements(count, [&](int64_t i) {
    float sum = load_peer(t.buffers[0] + half + i);
    for (int r = 1; r < me.world; ++r) sum += load_peer(t.buffers[r] + half + i);
    data[i] = sum;
  });
  if (threadIdx.x == 0) me.counters[blockIdx.x] = call;
}

__global__ __launch_bounds__(kThreads) void peer_gather_kernel(PeerTable t, PeerRank me, const float* part,
                                                               int64_t rows, ColumnSplit split, float* out) {
  const uint32_t call = me.counters[blockIdx.x] + 1;
  const int64_t half = half_offset(call, t.capacity);
  float* mine = t.buffers[me.rank] + half;
  for_block_elements(rows * split.widths[me.rank], [&](int64_t i) { mine[i] = part[i]; });
  arrive_and_wait(t, me.rank, me.world, call);
  if (me.rank == 0)
    for (int r = 0; r < me.world; ++r) {
      const int64_t width = split.widths[r], offset = split.offsets[r];
      const float* theirs = t.buffers[r] + half;
      for_block_elements(rows * width, [&](int64_t i) {
        out[(i / width) * split.total + offset + i % width] = load_peer(theirs + i);
      });
    }
  if (threadIdx.x == 0) me.counters[blockIdx.x] = call;
}

__global__ void sum_rows_kernel(const float* gathered, int world, int64_t count, float* data) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    float sum = gathered[i];
    for (int r = 1; r < world; ++r) sum += gathered[r * count + i];
    data[i] = sum;
  }
}

__global__ void place_columns_kernel(const float* gathered, int world, int64_t rows, ColumnSplit split, float* out) {
  const int64_t n = rows * split.total;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / split.total, column = i % split.total;
    int r = 0;
    while (r + 1 < world && split.offsets[r + 1] <= column) ++r;
    // Rank r's part starts after the parts of the ranks before it, rows * offsets[r] floats in.
    out[i] = gathered[rows * split.offsets[r] + row * split.widths[r] + column - split.offsets[r]];
  }
}

void check_rank(const PeerRank& me) {
  if (me.world < 1 || me.world > kMaxPeerRanks || me.rank < 0 || me.rank >= me.world)
    fail("peer collectives: rank {} of {} (at most {} ranks)", me.rank, me.world, kMaxPeerRanks);
}

}  // namespace

void peer_all_reduce(const PeerTable& table, const PeerRank& me, float* data, int64_t count, cudaStream_t stream) {
  check_rank(me);
  if (count > table.capacity) fail("peer all-reduce: {} floats exceed the buffers' {}", count, table.capacity);
  peer_all_reduce_kernel<<<kPeerBlocks, kThreads, 0, stream>>>(table, me, data, count);
  M1_CUDA_CHECK_LAUNCH();
}

void peer_gather_columns(const PeerTable& table, const PeerRank& me, const float* part, int64_t rows,
                         const ColumnSplit& split, float* out, cudaStream_t stream) {
  check_rank(me);
  for (int r = 0; r < me.world; ++r)
    if (rows * split.widths[r] > table.capacity)
      fail("peer gather: {} x {} floats exceed the buffers' {}", rows, split.widths[r], table.capacity);
  peer_gather_kernel<<<kPeerBlocks, kThreads, 0, stream>>>(table, me, part, rows, split, out);
  M1_CUDA_CHECK_LAUNCH();
}

void sum_in_rank_order(const float* gathered, int world, int64_t count, float* data, cudaStream_t stream) {
  if (count == 0) return;
  sum_rows_kernel<<<grid_for(count, 256), 256, 0, stream>>>(gathered, world, count, data);
  M1_CUDA_CHECK_LAUNCH();
}

void place_columns(const float* gathered, int world, int64_t rows, const ColumnSplit& split, float* out,
                   cudaStream_t stream) {
  if (rows * split.total == 0) return;
  place_columns_kernel<<<grid_for(rows * split.total, 256), 256, 0, stream>>>(gathered, world, rows, split, out);
  M1_CUDA_CHECK_LAUNCH();
}

}  // namespace m1::cuda
