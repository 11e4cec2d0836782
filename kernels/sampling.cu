#include "sampling.h"

#include <algorithm>
#include <climits>
#include <cstdint>

#include "fast_exp.h"
#include "launch.h"
#include "m1/error.h"

// One block per draw (a block loops over draws when there are more than it has slots). The kept
// set of top-k / top-p is found without sorting the vocabulary: a quickselect on the candidates,
// compacted into a per-block id buffer, whose pivot passes sum the weights in a fixed order; the
// last survivors (at most one per thread) are sorted in shared memory. The draw then walks the
// kept ids in id order with block-wide prefix sums. Every sum has a fixed order, so the same
// inputs give the same bits on every run.

namespace m1::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kRun = 16;  // consecutive ids per thread in the passes that keep id order
constexpr uint32_t kFullMask = 0xFFFFFFFFu;
// The bitmap of seen ids lives in shared memory: 2^20 ids take 128 KB of it.
constexpr int64_t kMaxVocab = int64_t(1) << 20;

// A token's place in the order "higher logit first, lower id first on ties", as one integer that
// grows with rank: the logit's order-preserving bits above the complemented id. -0 counts as +0,
// as the host's float compares have it. Never 0 (the complemented id has its top bit set), so 0
// stands for "none".
__device__ uint64_t rank_of(float logit, int32_t id) {
  const int32_t bits = __float_as_int(__fadd_rn(logit, 0.0f));
  const uint32_t ordered = uint32_t(bits ^ ((bits >> 31) & 0x7FFFFFFF)) ^ 0x80000000u;
  return (uint64_t(ordered) << 32) | uint32_t(~id);
}
__device__ float logit_of(uint64_t rank) {
  const int32_t ordered = int32_t(uint32_t(rank >> 32) ^ 0x80000000u);
  return __int_as_float(ordered ^ ((ordered >> 31) & 0x7FFFFFFF));
}
__device__ int32_t id_of(uint64_t rank) { return int32_t(~uint32_t(rank)); }

__device__ float higher(float a, float b) { return a < b ? b : a; }  // std::max's choice

__device__ int lane() { return int(threadIdx.x) % 32; }
__device__ int warp() { return int(threadIdx.x) / 32; }

struct Sum {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <class T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <class T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Butterfly reduction: every lane combines the same pairs in the same order, so all get the same
// bits.
template <class T, class Op>
__device__ T warp_reduce(T value, Op op) {
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// The block's reduction, returned to every thread. All threads must call it.
template <class T, class Op>
__device__ T block_reduce(T value, Op op) {
  __shared__ T warp_results[kWarps];
  value = warp_reduce(value, op);
  if (lane() == 0) warp_results[warp()] = value;
  __syncthreads();
  value = warp_reduce(warp_results[lane()], op);
  __syncthreads();  // warp_results is free again
  return value;
}

// Sum of `value` over the threads before this one, in thread order; `total` gets the block's sum.
template <class T>
__device__ T block_exclusive_sum(T value, T& total) {
  __shared__ T warp_totals[kWarps];
  T inclusive = value;
  for (int offset = 1; offset < 32; offset *= 2) {
    const T below = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane() >= offset) inclusive += below;
  }
  T exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
  if (lane() == 0) exclusive = T(0);
  if (lane() == 31) warp_totals[warp()] = inclusive;
  __syncthreads();
  T before = T(0);
  total = T(0);
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp()) before = total;
    total += warp_totals[w];
  }
  __syncthreads();  // warp_totals is free again
  return before + exclusive;
}

// Sorts one (rank, weight) pair per thread, highest rank first, and returns the sorted arrays.
struct Sorted {
  const uint64_t* ranks;
  const float* weights;
};
__device__ Sorted block_sort_descending(uint64_t rank, float weight) {
  __shared__ uint64_t ranks[kThreads];
  __shared__ float weights[kThreads];
  const int i = int(threadIdx.x);
  ranks[i] = rank;
  weights[i] = weight;
  __syncthreads();
  for (int size = 2; size <= kThreads; size *= 2) {  // bitonic
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const int partner = i ^ stride;
      if (partner > i && (ranks[i] < ranks[partner]) == ((i & size) == 0)) {
        const uint64_t r = ranks[i];
        ranks[i] = ranks[partner];
        ranks[partner] = r;
        const float w = weights[i];
        weights[i] = weights[partner];
        weights[partner] = w;
      }
      __syncthreads();
    }
  }
  return {ranks, weights};
}

// The draw's view of its row: the raw logits, and the penalised ones that its own penalties give.
struct Row {
  const float* logits;
  int32_t vocab;
  bool penalised;
  const uint32_t* seen_bits;       // shared: bit id set when id is seen
  const int32_t* counts;           // sorted (id, count) pairs, interleaved
  int64_t count_pairs;
  float repetition, frequency, presence;

  __device__ float raw(int32_t id) const { return logits[id]; }

  // As apply_penalties in src/sampler.cpp: repetition over the seen ids, then frequency and
  // presence over the generated ones (a subset of the seen).
  __device__ float penalised_logit(int32_t id) const {
    float logit = logits[id];
    if (!penalised || ((seen_bits[id >> 5] >> (id & 31)) & 1u) == 0) return logit;
    if (repetition != 1.0f) logit = logit > 0 ? __fdiv_rn(logit, repetition) : __fmul_rn(logit, repetition);
    int64_t lo = 0, hi = count_pairs;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (counts[2 * mid] < id) lo = mid + 1; else hi = mid;
    }
    if (lo < count_pairs && counts[2 * lo] == id)
      logit = __fsub_rn(logit, __fadd_rn(__fmul_rn(frequency, float(counts[2 * lo + 1])), presence));
    return logit;
  }
};

// The finite raw logits, ranked: the candidates of the top log-probabilities.
struct FiniteRaw {
  Row row;
  uint64_t rank_floor = 0;  // only ranks at least this

  __device__ bool at(int32_t id, uint64_t& rank, float& weight) const {
    const float logit = row.raw(id);
    rank = rank_of(logit, id);
    weight = 0.0f;
    return rank >= rank_floor && logit != -__int_as_float(0x7F800000);
  }
};

// Penalised tokens with their weights exp((logit - max) / temperature), the weight positive and
// at least `floor`, the rank at least `rank_floor` (tested first: it needs no exponential).
struct Weighted {
  Row row;
  float max, temperature;
  float floor = 0.0f;
  uint64_t rank_floor = 0;

  __device__ bool at(int32_t id, uint64_t& rank, float& weight) const {
    const float logit = row.penalised_logit(id);
    rank = rank_of(logit, id);
    if (rank < rank_floor) {
      weight = 0.0f;
      return false;
    }
    weight = exp_nonpositive(__fdiv_rn(__fsub_rn(logit, max), temperature));
    return weight > 0.0f && weight >= floor;
  }
};

// Sum of the candidates' weights and their count, over the whole row.
struct Totals {
  double mass;
  int64_t count;
};
template <class Candidates>
__device__ Totals row_totals(const Candidates& candidates) {
  double mass = 0.0;
  int64_t count = 0;
  for (int32_t id = int32_t(threadIdx.x); id < candidates.row.vocab; id += kThreads) {
    uint64_t rank;
    float weight;
    if (candidates.at(id, rank, weight)) {
      mass += weight;
      ++count;
    }
  }
  return {block_reduce(mass, Sum{}), block_reduce(count, Sum{})};
}

// Writes the candidates among `ids` (the row's ids when `ids` is null, else ids[0, n)) to `out`
// in their order and returns how many. `out` may be `ids`: every tile is read before it is
// written, and nothing is written past what has been read.
template <class Candidates>
__device__ int64_t compact(const Candidates& candidates, const int32_t* ids, int64_t n, int32_t* out) {
  int64_t written = 0;
  for (int64_t base = 0; base < n; base += int64_t(kThreads) * kRun) {
    const int64_t first = base + int64_t(threadIdx.x) * kRun;
    int32_t run[kRun];
    uint32_t kept = 0;
    int count = 0;
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      run[j] = 0;
      if (first + j < n) {
        run[j] = ids ? ids[first + j] : int32_t(first + j);
        uint64_t rank;
        float weight;
        if (candidates.at(run[j], rank, weight)) {
          kept |= 1u << j;
          ++count;
        }
      }
    }
    int total;
    int64_t at = written + block_exclusive_sum(count, total);  // its barrier orders reads before writes
#pragma unroll
    for (int j = 0; j < kRun; ++j)
      if (kept & (1u << j)) out[at++] = run[j];
    written += total;
  }
  __syncthreads();  // the ids written are visible to every thread
  return written;
}

// The candidates that rank below `pivot`.
template <class Candidates>
struct RankBelow {
  Candidates inner;
  uint64_t pivot;
  __device__ bool at(int32_t id, uint64_t& rank, float& weight) const {
    return inner.at(id, rank, weight) && rank < pivot;
  }
};

// The rank of the last candidate kept by either goal: `k` > 0, the k best candidates (all of them
// when there are fewer); else the fewest best whose weights sum to at least `target_mass` (all of
// them when none do). Kept: the candidates whose rank is at least the one returned. `buffer`
// holds the row's ids.
template <class Candidates>
__device__ uint64_t last_kept_rank(Candidates candidates, int64_t k, double target_mass, int32_t* buffer) {
  const bool by_count = k > 0;
  if (by_count && k <= kThreads) {
    // Each thread's best candidate is a different token, so at least k tokens rank as high as the
    // k-th best of those: the candidates below it can go before any id is written.
    uint64_t best = 0;
    for (int32_t id = int32_t(threadIdx.x); id < candidates.row.vocab; id += kThreads) {
      uint64_t rank;
      float weight;
      if (candidates.at(id, rank, weight)) best = rank > best ? rank : best;
    }
    const uint64_t kth_best = block_sort_descending(best, 0.0f).ranks[k - 1];
    candidates.rank_floor = kth_best > candidates.rank_floor ? kth_best : candidates.rank_floor;
    __syncthreads();  // the sort's arrays are read before anything reuses them
  }
  int64_t n = compact(candidates, nullptr, candidates.row.vocab, buffer);
  double mass_before = 0.0;  // of the candidates already known to be kept (all rank above buffer's)
  for (;;) {
    if (by_count && n <= k) {
      uint64_t lowest = ~uint64_t(0);
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        uint64_t rank;
        float weight;
        candidates.at(buffer[i], rank, weight);
        lowest = rank < lowest ? rank : lowest;
      }
      return block_reduce(lowest, Min{});
    }
    if (n <= kThreads) break;
    uint64_t pivot_rank;
    float pivot_weight;
    candidates.at(buffer[n / 2], pivot_rank, pivot_weight);
    int64_t above = 0;
    double mass_above = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      uint64_t rank;
      float weight;
      candidates.at(buffer[i], rank, weight);
      if (rank > pivot_rank) {
        ++above;
        mass_above += weight;
      }
    }
    above = block_reduce(above, Sum{});
    bool keep_above;
    if (by_count) {
      if (above + 1 == k) return pivot_rank;
      keep_above = above >= k;
      if (!keep_above) k -= above + 1;
    } else {
      const double before = mass_before + block_reduce(mass_above, Sum{});
      keep_above = before >= target_mass;
      if (!keep_above) {
        const double through = before + pivot_weight;
        if (through >= target_mass || above + 1 == n) return pivot_rank;
        mass_before = through;
      }
    }
    if (keep_above) {
      Candidates above_pivot = candidates;
      above_pivot.rank_floor = pivot_rank + 1;
      n = compact(above_pivot, buffer, n, buffer);
    } else {
      n = compact(RankBelow<Candidates>{candidates, pivot_rank}, buffer, n, buffer);
    }
  }
  // At most one survivor per thread: sort them and read the boundary off.
  uint64_t rank = 0;
  float weight = 0.0f;
  if (int64_t(threadIdx.x) < n) candidates.at(buffer[threadIdx.x], rank, weight);
  const Sorted sorted = block_sort_descending(rank, weight);
  uint64_t result;
  if (by_count) {
    result = sorted.ranks[k - 1];
  } else {
    double mass_through;
    const double sorted_weight = int64_t(threadIdx.x) < n ? double(sorted.weights[threadIdx.x]) : 0.0;
    const double before = block_exclusive_sum(sorted_weight, mass_through);
    const bool reaches = int64_t(threadIdx.x) < n && mass_before + (before + sorted_weight) >= target_mass;
    const int first = block_reduce(reaches ? int(threadIdx.x) : INT_MAX, Min{});
    result = sorted.ranks[first == INT_MAX ? n - 1 : first];
  }
  __syncthreads();  // the sort's arrays are read before anything reuses them
  return result;
}

// The inverse-CDF draw of src/sampler.cpp's pick: target = uniform * the kept mass, then the
// first kept id, in id order, at which the running sum exceeds it (the last kept id when rounding
// leaves none).
__device__ int32_t draw_in_id_order(const Weighted& kept, double uniform) {
  const double target = uniform * row_totals(kept).mass;
  const int32_t vocab = kept.row.vocab;
  double carried = 0.0;
  int32_t last_kept = -1;
  for (int64_t base = 0; base < vocab; base += int64_t(kThreads) * kRun) {
    const int64_t first = base + int64_t(threadIdx.x) * kRun;
    float weights[kRun];
    double run_mass = 0.0;
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      weights[j] = 0.0f;
      uint64_t rank;
      if (first + j < vocab && kept.at(int32_t(first + j), rank, weights[j])) {
        run_mass += weights[j];
        last_kept = int32_t(first + j);
      } else {
        weights[j] = 0.0f;
      }
    }
    double tile_mass;
    double running = carried + block_exclusive_sum(run_mass, tile_mass);
    int32_t crossing = INT_MAX;
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      if (weights[j] == 0.0f) continue;
      running += weights[j];
      if (running > target && crossing == INT_MAX) crossing = int32_t(first + j);
    }
    crossing = block_reduce(crossing, Min{});
    if (crossing != INT_MAX) return crossing;
    carried += tile_mass;
  }
  return block_reduce(last_kept, Max{});
}

struct KernelParams {
  const float* logits;
  int32_t vocab;
  const DeviceDraw* draws;
  int64_t draw_count;
  const int32_t* seen;
  const int32_t* generated_counts;
  DrawResult* results;
  int32_t* buffers;  // one row of ids per block
};

__device__ void run_draw(const KernelParams& p, const DeviceDraw& draw, uint32_t* seen_bits,
                         int32_t* buffer, DrawResult& result) {
  const int32_t vocab = p.vocab;
  Row row{p.logits + draw.row * int64_t(vocab), vocab, false, seen_bits,
          p.generated_counts + 2 * draw.counts_begin, draw.counts_count,
          draw.repetition_penalty, draw.frequency_penalty, draw.presence_penalty};
  row.penalised = draw.seen_count > 0 && (draw.repetition_penalty != 1.0f || draw.presence_penalty != 0.0f ||
                                          draw.frequency_penalty != 0.0f);
  if (row.penalised) {
    for (int32_t word = int32_t(threadIdx.x); word < (vocab + 31) / 32; word += kThreads) seen_bits[word] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < draw.seen_count; i += kThreads) {
      const int32_t id = p.seen[draw.seen_begin + i];
      atomicOr(&seen_bits[id >> 5], 1u << (id & 31));
    }
    __syncthreads();
  }

  // The raw row: NaN, then all -inf, then +inf (checked_max's order); then its log-normaliser.
  uint32_t nan = 0;
  int32_t max_ordered = INT_MIN;
  for (int32_t id = int32_t(threadIdx.x); id < vocab; id += kThreads) {
    const int32_t bits = __float_as_int(row.raw(id));
    nan |= uint32_t((bits & 0x7FFFFFFF) > 0x7F800000);
    const int32_t ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF);
    max_ordered = ordered > max_ordered ? ordered : max_ordered;
  }
  nan = block_reduce(nan, Max{});
  max_ordered = block_reduce(max_ordered, Max{});
  const float raw_max = __int_as_float(max_ordered ^ ((max_ordered >> 31) & 0x7FFFFFFF));
  const float infinity = __int_as_float(0x7F800000);
  const int32_t status = nan ? kDrawNan : raw_max == -infinity ? kDrawAllMasked
                                        : raw_max == infinity   ? kDrawPositiveInf
                                                                : kDrawOk;
  if (status != kDrawOk) {
    if (threadIdx.x == 0) result.status = status;
    return;
  }
  double exp_sum = 0.0;
  uint64_t best = 0;  // of the penalised row: its maximum and the argmax
  for (int32_t id = int32_t(threadIdx.x); id < vocab; id += kThreads) {
    exp_sum += exp_nonpositive(row.raw(id) - raw_max);
    const uint64_t rank = rank_of(row.penalised_logit(id), id);
    best = rank > best ? rank : best;
  }
  const double log_norm = double(raw_max) + log(block_reduce(exp_sum, Sum{}));
  best = block_reduce(best, Max{});

  if (draw.top_logprobs > 0) {
    __shared__ int32_t top_ids[kMaxTopLogprobs];
    const FiniteRaw finite{row, last_kept_rank(FiniteRaw{row}, draw.top_logprobs, 0.0, buffer)};
    const int count = int(compact(finite, nullptr, vocab, top_ids));  // in id order
    if (int(threadIdx.x) < count) {
      const int32_t id = top_ids[threadIdx.x];
      const uint64_t rank = rank_of(row.raw(id), id);
      int place = 0;
      for (int j = 0; j < count; ++j) place += rank_of(row.raw(top_ids[j]), top_ids[j]) > rank;
      result.top_ids[place] = id;
      result.top_logprobs[place] = float(double(row.raw(id)) - log_norm);
    }
    if (threadIdx.x == 0) result.top_count = count;
    __syncthreads();  // top_ids is read before the next draw writes it
  } else if (threadIdx.x == 0) {
    result.top_count = 0;
  }

  int32_t chosen;
  if (draw.temperature == 0.0f) {
    chosen = id_of(best);
  } else {
    Weighted candidates{row, logit_of(best), draw.temperature};
    if (draw.top_k == 0 && draw.top_p == 1.0f && draw.min_p == 0.0f) {
      chosen = draw_in_id_order(candidates, draw.uniform);
    } else {
      const double top_p_fraction = draw.top_p * (1.0 - kTopPSlack);
      double mass;
      if (draw.top_k > 0) {
        // The k best of the near-top tokens when there are k of them, else of all (gather_top_k).
        Weighted near = candidates;
        near.floor = kNearTopWeight;
        if (row_totals(near).count >= draw.top_k) candidates.floor = kNearTopWeight;
        candidates.rank_floor = last_kept_rank(candidates, draw.top_k, 0.0, buffer);
        mass = row_totals(candidates).mass;  // top-p measures against the top-k mass, before min-p
        candidates.floor = higher(candidates.floor, draw.min_p);
      } else {
        // gather_above_floor: the full mass; min-p, and the near-top floor when the near-top
        // tokens already hold the nucleus.
        Weighted near = candidates;
        near.floor = kNearTopWeight;
        mass = row_totals(candidates).mass;
        candidates.floor = draw.min_p;
        if (draw.top_p < 1.0f && row_totals(near).mass >= top_p_fraction * mass)
          candidates.floor = higher(candidates.floor, kNearTopWeight);
      }
      if (draw.top_p < 1.0f) candidates.rank_floor = last_kept_rank(candidates, 0, top_p_fraction * mass, buffer);
      chosen = draw_in_id_order(candidates, draw.uniform);
    }
  }
  if (threadIdx.x == 0) {
    result.status = kDrawOk;
    result.id = chosen;
    result.logprob = float(double(row.raw(chosen)) - log_norm);
  }
}

__global__ void __launch_bounds__(kThreads) sample_kernel(KernelParams p) {
  extern __shared__ uint32_t seen_bits[];
  int32_t* buffer = p.buffers + int64_t(blockIdx.x) * p.vocab;
  for (int64_t d = blockIdx.x; d < p.draw_count; d += gridDim.x) {
    __syncthreads();  // the previous draw is done with the shared arrays
    const DeviceDraw draw = p.draws[d];
    run_draw(p, draw, seen_bits, buffer, p.results[d]);
  }
}

}  // namespace

void sample(const SampleArgs& args, DeviceScratch& scratch, cudaStream_t stream) {
  if (args.draws.empty()) return;
  if (args.vocab < 1 || args.vocab > kMaxVocab)
    fail("sampling vocab must be in [1, {}], got {}", kMaxVocab, args.vocab);
  for (const DeviceDraw& draw : args.draws)
    if (draw.top_logprobs < 0 || draw.top_logprobs > kMaxTopLogprobs)
      fail("top_logprobs must be in [0, {}], got {}", kMaxTopLogprobs, draw.top_logprobs);
  // Two blocks per multiprocessor keep it busy; more would only grow the id buffers.
  const int blocks = int(std::min<int64_t>(std::ssize(args.draws), 2 * int64_t(device_limits().sms)));
  KernelParams params{args.logits, int32_t(args.vocab), args.device_draws, std::ssize(args.draws),
                      args.seen, args.generated_counts, args.results,
                      scratch.get<int32_t>(size_t(blocks) * size_t(args.vocab))};
  const size_t shared_bytes = size_t(ceil_div(args.vocab, 32)) * sizeof(uint32_t);
  allow_shared_memory<sample_kernel>(shared_bytes);
  sample_kernel<<<blocks, kThreads, shared_bytes, stream>>>(params);
  M1_CUDA_CHECK_LAUNCH();
}

}  // namespace m1::cuda
