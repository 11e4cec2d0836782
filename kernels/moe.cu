// Top-k mixture of SwiGLU experts on the GPU (DESIGN.md §1 "MoE"), the device twin of
// src/cpu/moe.cpp: fp32 router logits on the batch-invariant matmul, one warp per token for the
// softmax and top-k, tokens grouped by expert on the device (a stable counting sort) so each
// expert's weights stream once per step, expert products on the grouped matmul, and a weighted
// sum in rank order. Every step is per row, so a row's output never depends on the rows beside
// it, and nothing waits for the device: the launches are sized from the row count alone.

#include "moe.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string_view>

#include "cuda_check.h"
#include "elementwise.h"
#include "launch.h"
#include "m1/error.h"
#include "matmul.h"

namespace m1::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRouteWarps = 4;  // tokens per routing block
// Steps of at most this many rows route and group their tokens in one launch (route_and_group).
constexpr int64_t kOneLaunchRouteRows = 64;
constexpr int kCombineThreads = 256;
constexpr int kPlaceThreads = 256;
// Each routing warp keeps its token's probabilities in shared memory.
constexpr int64_t kMaxExperts = 2048;
// Slots one grouping warp ranks, 32 at a time in slot order.
constexpr int64_t kGroupTile = 1024;

// Token t's routing, by one warp; p: the warp's `experts` floats of shared memory. The
// exponentials are summed by one lane in index order, like the CPU; the top k are k warp-wide
// arg-max passes, each taking the highest probability and, among equals, the lowest index, then
// striking it out.
__device__ __forceinline__ void route_token(const float* __restrict__ logits, int64_t t, int experts, int top_k,
                                            float* p, int32_t* __restrict__ chosen, float* __restrict__ weights) {
  const int lane = int(threadIdx.x) % kWarp;
  const float* row = logits + t * experts;

  float max_logit = -INFINITY;
  for (int e = lane; e < experts; e += kWarp) max_logit = fmaxf(max_logit, row[e]);
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    max_logit = fmaxf(max_logit, __shfl_xor_sync(0xffffffffu, max_logit, offset));
  for (int e = lane; e < experts; e += kWarp) p[e] = expf(row[e] - max_logit);
  __syncwarp();
  float total = 0.0f;
  if (lane == 0)
    for (int e = 0; e < experts; ++e) total += p[e];
  total = __shfl_sync(0xffffffffu, total, 0);
  // From here on each lane touches only its own experts e = lane (mod 32).
  for (int e = lane; e < experts; e += kWarp) p[e] /= total;

  int32_t* chosen_row = chosen + t * top_k;
  float* weight_row = weights + t * top_k;
  float kept = 0.0f;
  for (int r = 0; r < top_k; ++r) {
    // Probabilities are >= 0 and struck-out ones -1, so the start value loses to every expert;
    // only non-finite logits leave the index at INT_MAX, which the grouping sets apart.
    float best = -2.0f;
    int best_index = INT_MAX;
    for (int e = lane; e < experts; e += kWarp)
      if (p[e] > best) best = p[e], best_index = e;
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
      if (other > best || (other == best && other_index < best_index)) best = other, best_index = other_index;
    }
    if (best_index != INT_MAX && best_index % kWarp == lane) p[best_index] = -1.0f;
    kept += best;
    if (lane == 0) chosen_row[r] = best_index, weight_row[r] = best;
  }
  if (lane == 0)
    for (int r = 0; r < top_k; ++r) weight_row[r] /= kept;
}

// One warp per token.
__global__ void route_kernel(const float* __restrict__ logits, int64_t rows, int experts, int top_k,
                             int32_t* __restrict__ chosen, float* __restrict__ weights) {
  extern __shared__ float warp_probs[];
  const int warp = int(threadIdx.x) / kWarp;
  const int64_t t = int64_t(blockIdx.x) * kRouteWarps + warp;
  if (t >= rows) return;  // a whole warp leaves together; the kernel has no block-wide barrier
  route_token(logits, t, experts, top_k, warp_probs + warp * experts, chosen, weights);
}

// Grouping. The (token, rank) slots, slot = token * top_k + rank, are sorted by expert into
// "bins", stably, so each expert's slots keep ascending token order: bins [0, held) are the
// experts held here, bin `held` the slots of experts held elsewhere (expert parallel), bin
// `held + 1` the slots routing could not place. Three steps, all in integers and without atomics, so the order
// never varies: rank_slots counts each tile of kGroupTile slots per bin, place_tiles turns the
// counts into where each tile's part of each bin starts, place_slots puts every slot there.

struct Bins {
  int experts;  // of the router
  int first;    // the first expert held
  int held;     // experts held

  __device__ __forceinline__ int count() const { return held + 2; }
  __device__ __forceinline__ int of(int32_t expert) const {
    if (expert >= first && expert < first + held) return expert - first;
    return expert >= 0 && expert < experts ? held : held + 1;
  }
};

// position_of for a slot whose expert is held elsewhere, and for one without an expert.
constexpr int64_t kElsewhere = -2, kNowhere = -1;

// One warp per tile, 32 slots at a time in slot order: rank[s] = the slots of s's bin before s
// in its tile; tile_counts[tile][bin] = the tile's slots per bin.
// Tile `tile`, by one warp; count: bins ints of shared memory.
__device__ __forceinline__ void rank_tile(const int32_t* __restrict__ chosen, int64_t slots, Bins bin_of,
                                          int32_t* __restrict__ rank, int32_t* __restrict__ tile_counts, int64_t tile,
                                          int32_t* count) {
  const int lane = int(threadIdx.x) % kWarp, bins = bin_of.count();
  for (int b = lane; b < bins; b += kWarp) count[b] = 0;
  __syncwarp();
  const int64_t first = tile * kGroupTile, end = std::min(first + kGroupTile, slots);
  for (int64_t s0 = first; s0 < end; s0 += kWarp) {
    const int64_t s = s0 + lane;
    const bool live = s < end;
    const int bin = live ? bin_of.of(chosen[s]) : -1;
    const unsigned same = __match_any_sync(0xffffffffu, bin);
    const int before = __popc(same & ((1u << lane) - 1u));
    if (live) rank[s] = count[bin] + before;
    __syncwarp();
    if (live && before == 0) count[bin] += __popc(same);  // one lane per bin
    __syncwarp();
  }
  int32_t* counts = tile_counts + tile * bins;
  for (int b = lane; b < bins; b += kWarp) counts[b] = count[b];
}

__global__ __launch_bounds__(kWarp) void rank_slots(const int32_t* __restrict__ chosen, int64_t slots, Bins bin_of,
                                                    int32_t* __restrict__ rank, int32_t* __restrict__ tile_counts) {
  __shared__ int32_t count[kMaxExperts + 2];
  rank_tile(chosen, slots, bin_of, rank, tile_counts, blockIdx.x, count);
}

// One warp: per bin, the tile counts become exclusive running sums over the tiles in order (the
// bin's slots in earlier tiles), and begin[bin] = the slots of all lower bins.
__device__ __forceinline__ void place_tile_counts(int32_t* __restrict__ tile_counts, int64_t tiles, int bins,
                                                  int64_t* __restrict__ begin) {
  const int lane = int(threadIdx.x) % kWarp;
  int64_t carry = 0;
  for (int b0 = 0; b0 < bins; b0 += kWarp) {
    const int b = b0 + lane;
    int64_t total = 0;
    if (b < bins)
      for (int64_t t = 0; t < tiles; ++t) {
        int32_t& count = tile_counts[t * bins + b];
        const int32_t here = count;
        count = int32_t(total);
        total += here;
      }
    int64_t inclusive = total;
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const int64_t below = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += below;
    }
    if (b < bins) begin[b] = carry + inclusive - total;
    carry += __shfl_sync(0xffffffffu, inclusive, kWarp - 1);
  }
}

__global__ __launch_bounds__(kWarp) void place_tiles(int32_t* __restrict__ tile_counts, int64_t tiles, int bins,
                                                     int64_t* __restrict__ begin) {
  place_tile_counts(tile_counts, tiles, bins, begin);
}

// Slot s sits at position begin[bin] + (its bin's slots in earlier tiles) + rank[s]: token_at
// names the row of x each position takes, position_of where each slot's expert output lands
// (kElsewhere, kNowhere: none here).
__device__ __forceinline__ void place_slot(const int32_t* __restrict__ chosen, const int32_t* __restrict__ rank,
                                           const int32_t* __restrict__ tile_counts, const int64_t* __restrict__ begin,
                                           int64_t s, Bins bin_of, int top_k, int64_t* __restrict__ token_at,
                                           int64_t* __restrict__ position_of) {
  const int bins = bin_of.count(), bin = bin_of.of(chosen[s]);
  const int64_t p = begin[bin] + tile_counts[s / kGroupTile * bins + bin] + rank[s];
  token_at[p] = s / top_k;
  position_of[s] = bin < bin_of.held ? p : bin == bin_of.held ? kElsewhere : kNowhere;
}

__global__ void place_slots(const int32_t* __restrict__ chosen, const int32_t* __restrict__ rank,
                            const int32_t* __restrict__ tile_counts, const int64_t* __restrict__ begin, int64_t slots,
                            Bins bin_of, int top_k, int64_t* __restrict__ token_at, int64_t* __restrict__ position_of) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < slots) place_slot(chosen, rank, tile_counts, begin, s, bin_of, top_k, token_at, position_of);
}

// Routing and grouping of a few rows (decode) in one launch of one CTA: its warps route the
// tokens (warp w tokens w, w + kRouteWarps, ...), warp 0 ranks the single tile of slots and
// places it, and every thread places slots. Each step is route_kernel's, rank_slots', place_tiles'
// and place_slots' code on the same data, so the same results; the CTA's barriers stand in for
// the launches between them.
__global__ __launch_bounds__(kRouteWarps * kWarp) void route_and_group(
    const float* __restrict__ logits, int64_t rows, int experts, int top_k, int32_t* __restrict__ chosen,
    float* __restrict__ weights, Bins bin_of, int32_t* __restrict__ rank, int32_t* __restrict__ tile_counts,
    int64_t* __restrict__ begin, int64_t* __restrict__ token_at, int64_t* __restrict__ position_of) {
  extern __shared__ float warp_probs[];
  __shared__ int32_t count[kMaxExperts + 2];
  const int warp = int(threadIdx.x) / kWarp;
  for (int64_t t = warp; t < rows; t += kRouteWarps)
    route_token(logits, t, experts, top_k, warp_probs + warp * experts, chosen, weights);
  __syncthreads();
  const int64_t slots = rows * top_k;
  if (warp == 0) {
    rank_tile(chosen, slots, bin_of, rank, tile_counts, 0, count);
    place_tile_counts(tile_counts, 1, bin_of.count(), begin);
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < slots; s += blockDim.x)
    place_slot(chosen, rank, tile_counts, begin, s, bin_of, top_k, token_at, position_of);
}

// out[t] = sum over ranks r, in rank order, of weight[t, r] * down[position of slot (t, r)]: a
// fixed order of fused multiply-adds per element and no atomics, so the sum is deterministic. A
// slot without an expert makes its row NaN; one whose expert is held elsewhere adds nothing.
__global__ void combine_kernel(const float* __restrict__ down, const float* __restrict__ weights,
                               const int64_t* __restrict__ position_of, int64_t rows, int64_t hidden, int top_k,
                               float* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * hidden) return;
  const int64_t t = i / hidden, c = i % hidden;
  float sum = 0.0f;
  for (int r = 0; r < top_k; ++r) {
    const int64_t slot = t * top_k + r, p = position_of[slot];
    if (p != kElsewhere) sum = p == kNowhere ? NAN : fmaf(weights[slot], down[p * hidden + c], sum);
  }
  out[i] = sum;
}

void check_matrix(const DeviceMatrix& m, int64_t rows, int64_t cols, std::string_view what, int64_t expert) {
  if (m.data == nullptr || m.rows != rows || m.cols != cols)
    fail("MoE: {} of expert {} is [{}, {}], expected [{}, {}]", what, expert, m.rows, m.cols, rows, cols);
}

struct MoeBuffers {
  float* logits;          // [rows, experts]
  int32_t* chosen;        // [slots]: expert of slot (t, r) = t * k + r
  float* weights;         // [slots]
  int32_t* rank;          // [slots]: see rank_slots
  int32_t* tile_counts;   // [tiles, bins]
  int64_t* begin;         // [bins + 1]: held expert e's rows of the grouped matmuls start at begin[e]
  int64_t* token_at;      // [slots]
  int64_t* position_of;   // [slots]
  float* gathered;        // [slots, hidden]: x rows in expert order (unless read in place); later the down products
  float* gate;            // [slots, ffn]
  float* up;              // [slots, ffn]
};

// The buffers of one call, in one scratch allocation (see carve_scratch).
MoeBuffers carve(ScratchCarver& carver, int64_t rows, int64_t experts, int64_t bins, int64_t slots, int64_t hidden,
                 int64_t ffn) {
  MoeBuffers b;
  b.logits = carver.take<float>(rows * experts);
  b.chosen = carver.take<int32_t>(slots);
  b.weights = carver.take<float>(slots);
  b.rank = carver.take<int32_t>(slots);
  b.tile_counts = carver.take<int32_t>(ceil_div(slots, kGroupTile) * bins);
  b.begin = carver.take<int64_t>(bins);
  b.token_at = carver.take<int64_t>(slots);
  b.position_of = carver.take<int64_t>(slots);
  b.gathered = carver.take<float>(slots * hidden);
  b.gate = carver.take<float>(slots * ffn);
  b.up = carver.take<float>(slots * ffn);
  return b;
}

// The grouping kernels, from b.chosen to b.begin, b.token_at and b.position_of.
void group_by_expert(const MoeBuffers& b, int64_t slots, Bins bins, int64_t top_k, cudaStream_t stream) {
  const int64_t tiles = ceil_div(slots, kGroupTile);
  rank_slots<<<unsigned(tiles), kWarp, 0, stream>>>(b.chosen, slots, bins, b.rank, b.tile_counts);
  M1_CUDA_CHECK_LAUNCH();
  place_tiles<<<1, kWarp, 0, stream>>>(b.tile_counts, tiles, bins.held + 2, b.begin);
  M1_CUDA_CHECK_LAUNCH();
  place_slots<<<unsigned(ceil_div(slots, kPlaceThreads)), kPlaceThreads, 0, stream>>>(
      b.chosen, b.rank, b.tile_counts, b.begin, slots, bins, int(top_k), b.token_at, b.position_of);
  M1_CUDA_CHECK_LAUNCH();
}

}  // namespace

void route(const float* logits, int64_t rows, int64_t experts, int64_t top_k, int32_t* chosen, float* weights,
           cudaStream_t stream) {
  if (experts < 1 || experts > kMaxExperts) fail("MoE: {} experts (supported: 1 to {})", experts, kMaxExperts);
  if (top_k < 1 || top_k > experts) fail("MoE: top_k {} with {} experts", top_k, experts);
  if (rows == 0) return;
  const int64_t blocks = ceil_div(rows, kRouteWarps);
  if (blocks > INT_MAX) fail("MoE: {} rows is too many to route in one launch", rows);
  const size_t shared = size_t(kRouteWarps) * size_t(experts) * sizeof(float);
  route_kernel<<<unsigned(blocks), kRouteWarps * kWarp, shared, stream>>>(logits, rows, int(experts), int(top_k),
                                                                          chosen, weights);
  M1_CUDA_CHECK_LAUNCH();
}

void moe(const MoeArgs& a, MoeWorkspace& ws, Device& device, cudaStream_t stream) {
  const int64_t rows = a.rows, hidden = a.hidden, experts = a.router.rows, k = a.top_k;
  if (rows < 0 || hidden < 1) fail("MoE: bad activation shape [{}, {}]", rows, hidden);
  if (a.router.data == nullptr || a.router.cols != hidden)
    fail("MoE: router is [{}, {}], expected {} columns", a.router.rows, a.router.cols, hidden);
  const int64_t held = int64_t(a.w1.size());
  if (held < 1 || int64_t(a.w3.size()) != held || int64_t(a.w2.size()) != held || a.first_expert < 0 ||
      a.first_expert + held > experts)
    fail("MoE: experts [{}, {}) of the router's {} held, with {}, {}, {} in w1, w3, w2", a.first_expert,
         a.first_expert + held, experts, a.w1.size(), a.w3.size(), a.w2.size());
  if (k < 1 || k > experts) fail("MoE: top_k {} with {} experts", k, experts);
  if (experts > kMaxExperts) fail("MoE: {} experts (supported: 1 to {})", experts, kMaxExperts);
  const int64_t ffn = a.w1[0].rows;
  for (int64_t e = 0; e < held; ++e) {
    check_matrix(a.w1[size_t(e)], ffn, hidden, "w1", a.first_expert + e);
    check_matrix(a.w3[size_t(e)], ffn, hidden, "w3", a.first_expert + e);
    check_matrix(a.w2[size_t(e)], hidden, ffn, "w2", a.first_expert + e);
  }
  if (rows == 0) return;
  // Ranks and tile counts are int32; INT_MAX slots is far beyond any step.
  if (rows > INT_MAX / k) fail("MoE: {} rows of {} experts each is too many slots", rows, k);
  const int64_t slots = rows * k;

  const Bins bins{int(experts), int(a.first_expert), int(held)};
  const MoeBuffers b = carve_scratch(
      ws.device, [&](ScratchCarver& carver) { return carve(carver, rows, experts, held + 2, slots, hidden, ffn); });

  // Routing is always fp32, whatever the expert products use.
  matmul(a.x, hidden, rows, a.router, b.logits, experts, GemmOperands::kFp32, ws.matmul, device, stream);
  if (rows <= kOneLaunchRouteRows && slots <= kGroupTile) {
    route_and_group<<<1, kRouteWarps * kWarp, size_t(kRouteWarps) * size_t(experts) * sizeof(float), stream>>>(
        b.logits, rows, int(experts), int(k), b.chosen, b.weights, bins, b.rank, b.tile_counts, b.begin, b.token_at,
        b.position_of);
    M1_CUDA_CHECK_LAUNCH();
  } else {
    route(b.logits, rows, experts, k, b.chosen, b.weights, stream);
    group_by_expert(b, slots, bins, k, stream);
  }
  // Every expert's gate and up products of x's rows in expert order (in one call: one launch that
  // reads the rows in place when they stream, else the rows gathered and one bf16 copy of them for
  // both), then every down product of their SwiGLU (applied as the streamed kernels stage the
  // rows, else one pass over all slots) into the gathered rows' buffer, which the stream has
  // finished reading by then. An expert takes each token at most once, so it has at most `rows`
  // rows. Rows past begin[held] (slots without an expert held here) may go through SwiGLU unset
  // and are never read.
  const GroupedProduct gate_and_up[] = {{a.w1, b.gate, ffn}, {a.w3, b.up, ffn}};
  grouped_matmuls_of_rows(a.x, hidden, b.token_at, b.gathered, b.begin, gate_and_up, slots, rows, a.operands, ws.matmul,
                          device, stream);
  float* down = b.gathered;
  grouped_matmul_swiglu(b.gate, b.up, ffn, b.begin, a.w2, slots, rows, down, hidden, a.operands, ws.matmul, device,
                        stream);

  const int64_t blocks = ceil_div(rows * hidden, kCombineThreads);
  if (blocks > INT_MAX) fail("MoE: {} x {} outputs is too many for one launch", rows, hidden);
  combine_kernel<<<unsigned(blocks), kCombineThreads, 0, stream>>>(down, b.weights, b.position_of, rows, hidden,
                                                                   int(k), a.out);
  M1_CUDA_CHECK_LAUNCH();
}

}  // namespace m1::cuda
