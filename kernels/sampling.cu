#include "sampling.h"

#include <algorithm>
#include <climits>
#include <cstdint>

#include "fast_exp.h"
#include "launch.h"
#include "m1/error.h"

// Kernels over many blocks, so that a draw reads its row a small, fixed number of times, and one
// block per draw only for what is left at the end. The scan spreads every draw's row over many
// small blocks, one per fixed chunk of ids: NaN, raw maximum, the exp-sum against the chunk's
// maximum, the penalised argmax and, when the draw asks for alternatives, the chunk's best finite
// raw logits. The combine, one block for all draws, folds the chunks in a fixed order into each
// draw's status and log-normaliser, finishes the greedy draws that report no alternatives, and
// lists the others for the selection. The weighing, for the random draws, sums each chunk's weights
// at the draw's temperature (all, near-top, min-p's) and, for a nucleus draw (top-p, top-k or
// both), fills the histogram of the first digit of its candidates' keys. Nucleus passes narrow the
// cut-off digit by digit (three for each of a draw's searches, see Nucleus below) and sum each
// chunk's part of the nucleus. The selection, one block per listed draw (a block loops over draws
// when there are more than it has slots), merges the chunks' alternatives and draws: from the
// chunks' kept masses it finds the one chunk where the running mass passes the target and walks
// only that chunk in id order. A top-p whose nucleus reaches below the near-top floor (a flat row
// at top-p near 1), and top-k with top-p whose k best reach below it, find their kept set in the
// selection block instead (a quickselect on the candidates, compacted into a per-block id buffer,
// whose pivot passes sum the weights in a fixed order; the last survivors, at most one per
// thread, are sorted in shared memory), then walk the kept ids in id order with block-wide prefix
// sums. Every sum has a fixed order or is exact, so the same inputs give the same bits on every
// run, whatever the batch. "Penalised" logits below are the processed ones: biases, penalties,
// then the draw's own mask (masked ids -inf).

namespace m1::cuda {
namespace {

constexpr int kThreads = 1024;  // the combine's and the selection's blocks
constexpr int kWarps = kThreads / 32;
constexpr int kRun = 16;  // consecutive ids per thread in the passes that keep id order
constexpr uint32_t kFullMask = 0xFFFFFFFFu;
// The selection's bitmap of seen and biased ids lives in shared memory: 2^20 ids take 128 KB of it.
constexpr int64_t kMaxVocab = int64_t(1) << 20;
// The scan: small blocks, each over a fixed chunk of ids (so the sums' order, and with it their
// bits, never depends on the batch), about 100 blocks for one draw at the model's vocabulary.
constexpr int kScanThreads = 256;
constexpr int kScanIdsPerThread = 8;
constexpr int32_t kChunk = kScanThreads * kScanIdsPerThread;
static_assert(kMaxVocab / kChunk <= kThreads, "the selection folds a row's chunks with a thread each");

// A float's bits as an int32 that orders as the value does (NaN aside): negative floats are
// sign-magnitude, so their magnitude bits are flipped. Mapping twice gives the bits back.
__device__ int32_t ordered_bits(int32_t bits) { return bits ^ ((bits >> 31) & 0x7FFFFFFF); }

// A token's place in the order "higher logit first, lower id first on ties", as one integer that
// grows with rank: the logit's order-preserving bits above the complemented id. -0 counts as +0,
// as the host's float compares have it. Never 0 (the complemented id has its top bit set), so 0
// stands for "none".
__device__ uint64_t rank_of(float logit, int32_t id) {
  const uint32_t ordered = uint32_t(ordered_bits(__float_as_int(__fadd_rn(logit, 0.0f)))) ^ 0x80000000u;
  return (uint64_t(ordered) << 32) | uint32_t(~id);
}
__device__ float logit_of(uint64_t rank) {
  return __int_as_float(ordered_bits(int32_t(uint32_t(rank >> 32) ^ 0x80000000u)));
}
__device__ int32_t id_of(uint64_t rank) { return int32_t(~uint32_t(rank)); }

__device__ float higher(float a, float b) { return a < b ? b : a; }  // std::max's choice

__device__ int lane() { return int(threadIdx.x) % 32; }
__device__ int warp() { return int(threadIdx.x) / 32; }

// A load that other blocks' writes of this launch reach (volatile: not served from a stale L1
// line), for data a block reads after last_to_arrive.
template <class T>
__device__ T load_fresh(const T* address) {
  return *static_cast<const volatile T*>(address);
}

// Whether this block is the last of `blocks` to arrive at `counter`. Every thread's global writes
// and atomics before the call are visible to the block that is (the fence-then-count pattern of
// the CUDA programming guide). All the block's threads must call it.
__device__ bool last_to_arrive(uint32_t* counter, uint32_t blocks) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == blocks - 1;
  __syncthreads();
  return last;
}

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

// The block's reduction, returned to every thread. All `Threads` threads must call it.
template <int Threads = kThreads, class T, class Op>
__device__ T block_reduce(T value, Op op) {
  constexpr int warps = Threads / 32;
  __shared__ T warp_results[warps];
  value = warp_reduce(value, op);
  if (lane() == 0) warp_results[warp()] = value;
  __syncthreads();
  if constexpr (warps == 32) {
    value = warp_reduce(warp_results[lane()], op);
  } else {
    value = warp_results[0];
    for (int w = 1; w < warps; ++w) value = op(value, warp_results[w]);
  }
  __syncthreads();  // warp_results is free again
  return value;
}

// Sum of `value` over the threads before this one, in thread order; `total` gets the block's sum.
// All `Threads` threads must call it.
template <int Threads = kThreads, class T>
__device__ T block_exclusive_sum(T value, T& total) {
  constexpr int warps = Threads / 32;
  __shared__ T warp_totals[warps];
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
  for (int w = 0; w < warps; ++w) {
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

// The draw's view of its row: the raw logits, and the processed ones its own biases, penalties
// and mask give.
struct Row {
  const float* logits;
  int32_t vocab;
  bool penalised;
  bool touched;               // some ids have biases or penalties
  const uint32_t* touched_bits;  // shared: bit (id - bits_first) set when id is seen or biased
  int32_t bits_first;         // a multiple of 32: the first id the bitmap covers
  const int32_t* counts;      // sorted (id, count) pairs, interleaved
  int64_t count_pairs;
  const int32_t* seen;        // sorted seen ids
  int64_t seen_count;
  const TokenBias* biases;    // sorted by id
  int64_t bias_count;
  const uint32_t* allowed;    // the mask, or null
  float repetition, frequency, presence;

  __device__ Row(const float* all_logits, int32_t vocab_size, const DeviceDraw& draw, const int32_t* generated_counts,
                 const int32_t* all_seen, const TokenBias* all_biases, const uint32_t* all_allowed,
                 const uint32_t* bits, int32_t first)
      : logits(all_logits + draw.row * int64_t(vocab_size)),
        vocab(vocab_size),
        penalised(draw.seen_count > 0 && (draw.repetition_penalty != 1.0f || draw.presence_penalty != 0.0f ||
                                          draw.frequency_penalty != 0.0f)),
        touched(penalised || draw.bias_count > 0),
        touched_bits(bits),
        bits_first(first),
        counts(generated_counts + 2 * draw.counts_begin),
        count_pairs(draw.counts_count),
        seen(all_seen + draw.seen_begin),
        seen_count(draw.seen_count),
        biases(all_biases + draw.bias_begin),
        bias_count(draw.bias_count),
        allowed(draw.allowed_begin >= 0 ? all_allowed + draw.allowed_begin : nullptr),
        repetition(draw.repetition_penalty),
        frequency(draw.frequency_penalty),
        presence(draw.presence_penalty) {}

  __device__ float raw(int32_t id) const { return logits[id]; }

  // As process() in src/sampler.cpp: the bias, then repetition over the seen ids, frequency and
  // presence over the generated ones (a subset of the seen), then the mask. `id` must lie in the
  // bitmap's range.
  __device__ float penalised_logit(int32_t id) const { return penalised_logit(id, logits[id]); }
  __device__ float penalised_logit(int32_t id, float logit) const {
    if (allowed != nullptr && ((allowed[id >> 5] >> (id & 31)) & 1u) == 0) return -__int_as_float(0x7F800000);
    if (!touched || ((touched_bits[(id - bits_first) >> 5] >> (id & 31)) & 1u) == 0) return logit;
    if (bias_count > 0) {
      int64_t lo = 0, hi = bias_count;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (biases[mid].id < id) lo = mid + 1; else hi = mid;
      }
      if (lo < bias_count && biases[lo].id == id) logit = __fadd_rn(logit, biases[lo].bias);
      if (!penalised || !contains(seen, seen_count, id)) return logit;  // the bit was the bias's
    }
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

  __device__ static bool contains(const int32_t* ids, int64_t n, int32_t id) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ids[mid] < id) lo = mid + 1; else hi = mid;
    }
    return lo < n && ids[lo] == id;
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
    weight = weight_of(logit);
    return weight > 0.0f && weight >= floor;
  }
  __device__ float weight_of(float logit) const {
    return exp_nonpositive(__fdiv_rn(__fsub_rn(logit, max), temperature));
  }
};

// Sum of the candidates' weights over the whole row.
__device__ double row_mass(const Weighted& candidates) {
  double mass = 0.0;
  for (int32_t id = int32_t(threadIdx.x); id < candidates.row.vocab; id += kThreads) {
    uint64_t rank;
    float weight;
    if (candidates.at(id, rank, weight)) mass += weight;
  }
  return block_reduce(mass, Sum{});
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

// The inverse-CDF walk of src/sampler.cpp's pick over the kept ids in [begin, end), `carried` the
// kept mass before `begin`: the first kept id, in id order, at which the running sum exceeds
// `target` (the last kept id of the range when rounding leaves none; -1 when it keeps none).
__device__ int32_t walk_in_id_order(const Weighted& kept, double target, double carried, int32_t begin,
                                    int32_t end) {
  int32_t last_kept = -1;
  for (int64_t base = begin; base < end; base += int64_t(kThreads) * kRun) {
    const int64_t first = base + int64_t(threadIdx.x) * kRun;
    float weights[kRun];
    double run_mass = 0.0;
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      weights[j] = 0.0f;
      uint64_t rank;
      if (first + j < end && kept.at(int32_t(first + j), rank, weights[j])) {
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

// The inverse-CDF draw of src/sampler.cpp's pick over the whole row: target = uniform * the kept
// mass.
__device__ int32_t draw_in_id_order(const Weighted& kept, double uniform) {
  return walk_in_id_order(kept, uniform * row_mass(kept), 0.0, 0, kept.row.vocab);
}

// One chunk of one draw's row, as the scan leaves it.
struct ChunkPartial {
  double exp_sum;        // of exp(logit - the chunk's maximum) over its raw logits
  uint64_t best;         // the highest rank of its penalised logits
  int32_t max_ordered;   // its raw maximum, as order-preserving bits (NaN above +inf)
  uint32_t nan;          // 1 when it holds a NaN
};

// One chunk of one draw's penalised row at the draw's temperature, as the weighing leaves it.
struct ChunkWeights {
  double mass;       // of its positive weights
  double near_mass;  // of its weights of at least kNearTopWeight
  double kept_mass;  // of its positive weights of at least the draw's min_p
  int32_t near_count;
};

// One draw's row, as the combine leaves it for the selection.
struct RowSummary {
  double log_norm;       // log(sum(exp(logit))) of the raw row
  uint64_t best;         // the highest rank of the penalised row: its maximum and its argmax
  int32_t nucleus_slot;  // of a nucleus draw: its first search's slot (histograms, search states)
};

// The multi-block nucleus: the kept set of a random draw with top-p (MiniMax-M1's recommended
// sampling), top-k, or both. Its cut-off is found by a radix select over the keys of its
// candidates, the order-preserving bits of their penalised logits: each pass, over every chunk of
// the row at once, adds the candidates' weights (and counts) into a histogram of the next digit of
// the key (among those whose key starts with the digits found so far); the draw's last block to
// add its part reads the histogram from the top and keeps the bucket where the running mass
// (top-p) or count (top-k) reaches the target. After the last digit the cut-off is one logit
// value; among the tokens tied on it, the lowest ids are kept (sample_row's order), as many as the
// target needs. A draw with both makes two searches, as gather_top_k then keep_nucleus do: the
// top-k one, whose kept mass (exact, from the histograms) sets the top-p target, then the top-p
// one among the keys above its cut-off, with the ties it kept on the cut-off added to the
// histograms apart. The histograms' sums are exact (FixedMass), so the order in which the blocks
// add them never shows: the passes give the same bits on every run.
__device__ __host__ constexpr bool nucleus_draw(const DeviceDraw& draw) {
  return draw.temperature != 0.0f && (draw.top_k > 0 || draw.top_p < 1.0f);
}
// The searches a nucleus draw makes, each in slots of its own (histograms and search states).
__device__ __host__ constexpr int searches_of(const DeviceDraw& draw) {
  return draw.top_k > 0 && draw.top_p < 1.0f ? 2 : 1;
}
constexpr int kDigits = 3;
// The passes after the weighing: the digits of a draw's searches (the weighing makes the first
// search's first), then pass kPasses, which sums each chunk's part of the nucleus.
constexpr int kPasses = 2 * kDigits;
__device__ __host__ constexpr int digit_bits(int digit) { return digit < 2 ? 11 : 10; }
constexpr int kBuckets = 1 << 11;
static_assert(digit_bits(0) + digit_bits(1) + digit_bits(2) == 32, "the digits cover the key");

// An exact sum of weights of at least 2^-24 (kNearTopWeight and above). Each such float is a whole
// number of 2^-47 units, at most 2^47 of them; the sum keeps their high and low parts apart, so a
// million of them fit without overflow and integer adds give the same bits in any order.
constexpr int kFixedSplit = 24;
struct FixedMass {
  unsigned long long high, low;  // high * 2^24 + low units of 2^-47

  __device__ static FixedMass of(float weight) {
    const auto units = (unsigned long long)(weight * 0x1p47f);
    return {units >> kFixedSplit, units & ((1ull << kFixedSplit) - 1)};
  }
  __device__ FixedMass operator+(const FixedMass& other) const { return {high + other.high, low + other.low}; }
  __device__ FixedMass times(int64_t n) const { return {high * (unsigned long long)n, low * (unsigned long long)n}; }
  // Rounded once to a double.
  __device__ double value() const { return (double(high) * 0x1p24 + double(low)) * 0x1p-47; }
};

// One digit's buckets: the candidates' exact mass and their count.
struct Histogram {
  unsigned long long high[kBuckets];
  unsigned long long low[kBuckets];
  uint32_t count[kBuckets];

  __device__ FixedMass mass(int bucket) const { return {load_fresh(&high[bucket]), load_fresh(&low[bucket])}; }
  // What a search measures the bucket by: its mass, or its count as that many units.
  __device__ FixedMass measure(int bucket, bool by_count) const {
    return by_count ? FixedMass{0, count_of(bucket)} : mass(bucket);
  }
  __device__ uint32_t count_of(int bucket) const { return load_fresh(&count[bucket]); }
};

// A nucleus draw's histograms, one per digit, and how many of its blocks have added theirs to
// each: the last to arrive narrows the search. Zeroed before the weighing.
struct NucleusWork {
  Histogram histograms[kDigits];
  uint32_t arrived[kDigits];
};

// A nucleus draw's search, after some digits of the cut-off key.
struct Nucleus {
  // The measure the nucleus reaches: top_p_fraction * the row's (or top-k's kept) mass, or
  // (by_count) top_k units.
  double target;
  int32_t by_count;
  FixedMass above;        // measure of the candidates whose keys are above the bucket found
  FixedMass above_mass;   // their mass (the same as `above` unless by_count)
  uint32_t bucket_count;  // the candidates in that bucket
  uint32_t prefix;        // the key's top `bits` bits found so far
  int32_t bits;
  float floor;            // the candidates' least weight
  int32_t fast;           // 0: the floor is below 2^-24, and the selection finds the cut-off alone
  // A search among what an earlier one kept (top-p among top-k's): candidates have keys above
  // floor_key, and of the tokens on it the floor_ties that it kept (the lowest ids), each of
  // weight floor_tie_weight, count apart from the passes. floor_ties 0: no earlier search.
  uint32_t floor_key;
  uint32_t floor_ties;
  float floor_tie_weight;
};

// One chunk of a nucleus draw's row after the last digit.
struct ChunkNucleus {
  double above_mass;  // of its candidates whose keys are above the cut-off key
  int32_t ties;       // its candidates whose key is the cut-off key
};

__device__ uint32_t key_of(uint64_t rank) { return uint32_t(rank >> 32); }
// The key's top `bits` bits.
__device__ uint32_t key_prefix(uint32_t key, int bits) { return bits == 0 ? 0u : key >> (32 - bits); }

// The search before its first digit: the target and the candidates' floor, from the row's chunks
// folded in a fixed order.
template <int Threads>
__device__ Nucleus start_nucleus(const DeviceDraw& draw, const ChunkWeights* chunks, int32_t count) {
  double mass = 0.0, near_mass = 0.0;
  int64_t near_count = 0;
  for (int32_t c = int32_t(threadIdx.x); c < count; c += Threads) {
    mass += load_fresh(&chunks[c].mass);
    near_mass += load_fresh(&chunks[c].near_mass);
    near_count += load_fresh(&chunks[c].near_count);
  }
  mass = block_reduce<Threads>(mass, Sum{});
  near_mass = block_reduce<Threads>(near_mass, Sum{});
  near_count = block_reduce<Threads>(near_count, Sum{});
  Nucleus nucleus{};
  if (draw.top_k > 0) {
    // gather_top_k: the k best of the tokens with weight (min-p applies after).
    nucleus.target = FixedMass{0, (unsigned long long)draw.top_k}.value();
    nucleus.by_count = 1;
    nucleus.floor = 0.0f;
    nucleus.fast = 1;
    // Under top-p, the k best's mass must be exact: they must all be near-top tokens (a prefix
    // of the order, so that the near-top ones alone give the cut-off).
    if (draw.top_p < 1.0f) {
      nucleus.floor = kNearTopWeight;
      nucleus.fast = near_count >= draw.top_k;
    }
    return nucleus;
  }
  nucleus.target = top_p_fraction(draw.top_p) * mass;
  // gather_above_floor's floor: min-p, and the near-top floor when the near-top tokens hold the
  // nucleus.
  nucleus.floor = draw.min_p;
  if (near_mass >= nucleus.target) nucleus.floor = higher(nucleus.floor, kNearTopWeight);
  nucleus.fast = nucleus.floor >= kNearTopWeight;
  return nucleus;
}

// The candidates' least weight in the first digit's histogram: every floor a fast search can have
// is at least this, and its candidates are those of the histogram's that reach it. A top-k
// search counts every token with weight, whose masses it does not use, unless top-p follows.
__device__ float first_digit_floor(const DeviceDraw& draw) {
  if (draw.top_k > 0) return draw.top_p < 1.0f ? kNearTopWeight : 0.0f;
  return higher(draw.min_p, kNearTopWeight);
}

// The top-p search among what a top-k search kept (gather_top_k, then keep_nucleus): the target
// is top_p_fraction * the kept mass (exact: the kept tokens are near-top ones), the candidates
// those kept that reach min-p.
__device__ Nucleus nucleus_within(const Nucleus& kept, const Weighted& candidates, const DeviceDraw& draw) {
  const float tie_weight = candidates.weight_of(logit_of(uint64_t(kept.prefix) << 32));
  const unsigned long long above = (kept.above.high << kFixedSplit) + kept.above.low;  // a count
  const unsigned long long wanted = (unsigned long long)draw.top_k - above;
  const unsigned long long ties = wanted < kept.bucket_count ? wanted : kept.bucket_count;
  Nucleus nucleus{};
  nucleus.target = top_p_fraction(draw.top_p) * (kept.above_mass + FixedMass::of(tie_weight).times(int64_t(ties))).value();
  nucleus.floor = higher(draw.min_p, kNearTopWeight);
  nucleus.fast = 1;
  nucleus.floor_key = kept.prefix;
  nucleus.floor_ties = uint32_t(ties);
  nucleus.floor_tie_weight = tie_weight;
  return nucleus;
}

// The sum of `mass` over the threads before this one, in any order (integer adds).
template <int Threads>
__device__ FixedMass exclusive_mass(const FixedMass& mass) {
  unsigned long long total_high, total_low;
  const unsigned long long high = block_exclusive_sum<Threads>(mass.high, total_high);
  return {high, block_exclusive_sum<Threads>(mass.low, total_low)};
}

// The search after `digit`: the highest bucket of `histogram` (the candidates that share the
// digits found so far) where the running measure from the top reaches the target; the lowest
// non-empty one when rounding leaves the whole row short of it. Every thread gets the result.
template <int Threads>
__device__ Nucleus narrow(Nucleus nucleus, const Histogram& histogram, int digit) {
  const int buckets = 1 << digit_bits(digit);
  const int per_thread = (buckets + Threads - 1) / Threads;  // consecutive buckets, from the top
  const int top = buckets - 1 - int(threadIdx.x) * per_thread;
  FixedMass own{}, own_mass{};
  for (int j = 0; j < per_thread; ++j)
    if (top - j >= 0) {
      own = own + histogram.measure(top - j, nucleus.by_count);
      own_mass = own_mass + histogram.mass(top - j);
    }
  const FixedMass before = exclusive_mass<Threads>(own), mass_before = exclusive_mass<Threads>(own_mass);
  FixedMass running = nucleus.above + before, running_mass = nucleus.above_mass + mass_before;
  int crossing = -1, lowest = INT_MAX;
  FixedMass above_crossing[2]{}, above_lowest[2]{};  // measure, mass
  for (int j = 0; j < per_thread; ++j) {
    const int b = top - j;
    if (b < 0 || histogram.count_of(b) == 0) continue;
    const FixedMass through = running + histogram.measure(b, nucleus.by_count);
    if (crossing < 0 && through.value() >= nucleus.target) {
      crossing = b;
      above_crossing[0] = running;
      above_crossing[1] = running_mass;
    }
    lowest = b;
    above_lowest[0] = running;
    above_lowest[1] = running_mass;
    running = through;
    running_mass = running_mass + histogram.mass(b);
  }
  int chosen = block_reduce<Threads>(crossing, Max{});
  const bool reached = chosen >= 0;
  if (!reached) chosen = block_reduce<Threads>(lowest, Min{});
  __shared__ FixedMass above[2];
  if (reached ? crossing == chosen : lowest == chosen)
    for (int i = 0; i < 2; ++i) above[i] = reached ? above_crossing[i] : above_lowest[i];
  __syncthreads();
  nucleus.above = above[0];
  nucleus.above_mass = above[1];
  nucleus.bucket_count = histogram.count_of(chosen);
  nucleus.prefix = (nucleus.prefix << digit_bits(digit)) | uint32_t(chosen);
  nucleus.bits += digit_bits(digit);
  __syncthreads();  // `above` is free again
  return nucleus;
}

// A block's histogram of one digit in shared memory, added to the draw's at the end (integer
// adds: the same sums whatever the order).
template <int Threads>
__device__ void clear_histogram(Histogram& histogram) {
  for (int b = int(threadIdx.x); b < kBuckets; b += Threads) {
    histogram.high[b] = 0;
    histogram.low[b] = 0;
    histogram.count[b] = 0;
  }
  __syncthreads();
}
__device__ void add_to_histogram(Histogram& histogram, int bucket, float weight) {
  const FixedMass mass = FixedMass::of(weight);
  atomicAdd(&histogram.high[bucket], mass.high);
  atomicAdd(&histogram.low[bucket], mass.low);
  atomicAdd(&histogram.count[bucket], 1u);
}
// The ties an earlier search kept on its cut-off key, which the passes leave out, added to the
// draw's histogram of `digit` when their key shares the digits found so far and they reach the
// floor: by the last block to arrive, before it narrows. All the block's threads must call it.
__device__ void add_floor_ties(Histogram& histogram, const Nucleus& search, int digit) {
  if (threadIdx.x == 0 && search.floor_ties > 0 && search.floor_tie_weight >= search.floor &&
      key_prefix(search.floor_key, search.bits) == search.prefix) {
    const int shift = 32 - search.bits - digit_bits(digit);
    const int bucket = int((search.floor_key >> shift) & uint32_t((1 << digit_bits(digit)) - 1));
    const FixedMass mass = FixedMass::of(search.floor_tie_weight).times(search.floor_ties);
    atomicAdd(&histogram.high[bucket], mass.high);
    atomicAdd(&histogram.low[bucket], mass.low);
    atomicAdd(&histogram.count[bucket], search.floor_ties);
  }
  __syncthreads();
}
template <int Threads>
__device__ void flush_histogram(const Histogram& block, Histogram& draw) {
  __syncthreads();
  for (int b = int(threadIdx.x); b < kBuckets; b += Threads) {
    if (block.count[b] == 0) continue;
    atomicAdd(&draw.high[b], block.high[b]);
    atomicAdd(&draw.low[b], block.low[b]);
    atomicAdd(&draw.count[b], block.count[b]);
  }
}

// The first index of the sorted `ids[0, n)` that is not below `id`.
__device__ int64_t lower_bound(const int32_t* ids, int64_t n, int32_t id) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (ids[mid] < id) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The seen ids (of a penalised draw) and the biased ids of [first, end) in `bits` (one bit per id,
// from `first`, kChunk of them at most). All the block's Threads threads must call it.
template <int Threads>
__device__ void mark_touched(const Row& row, int32_t first, int32_t end, uint32_t* bits) {
  for (int word = int(threadIdx.x); word < (end - first + 31) / 32; word += Threads) bits[word] = 0;
  __syncthreads();
  if (row.penalised) {
    const int64_t last = lower_bound(row.seen, row.seen_count, end);
    for (int64_t i = lower_bound(row.seen, row.seen_count, first) + threadIdx.x; i < last; i += Threads)
      atomicOr(&bits[(row.seen[i] - first) >> 5], 1u << (row.seen[i] & 31));
  }
  for (int64_t i = threadIdx.x; i < row.bias_count; i += Threads) {
    const int32_t id = row.biases[i].id;
    if (id >= first && id < end) atomicOr(&bits[(id - first) >> 5], 1u << (id & 31));
  }
  __syncthreads();
}

// Writes the `count` highest ranks of the block, best first, to `out`, stopping after the first
// 0 (fewer ranks than `count`). `ranks` is each thread's own, sorted in place; 0 stands for none.
template <int Threads, int PerThread>
__device__ void block_top_ranks(uint64_t (&ranks)[PerThread], int count, uint64_t* out) {
#pragma unroll
  for (int i = 0; i < PerThread; ++i)  // highest first: a sorting network on registers
#pragma unroll
    for (int j = 0; j + 1 < PerThread - i; ++j)
      if (ranks[j] < ranks[j + 1]) {
        const uint64_t r = ranks[j];
        ranks[j] = ranks[j + 1];
        ranks[j + 1] = r;
      }
  for (int place = 0; place < count; ++place) {
    const uint64_t top = block_reduce<Threads>(ranks[0], Max{});
    if (threadIdx.x == 0) out[place] = top;
    if (top == 0) break;
    if (ranks[0] == top) {  // ranks are unique (the id is part of them): one thread pops its head
#pragma unroll
      for (int j = 0; j + 1 < PerThread; ++j) ranks[j] = ranks[j + 1];
      ranks[PerThread - 1] = 0;
    }
  }
}

// What the passes over chunks (the scan and the weighing) read of every draw's row.
struct ChunkedRows {
  const float* logits;
  int32_t vocab;
  int32_t chunks;  // per row
  const DeviceDraw* draws;
  const int32_t* seen;
  const int32_t* generated_counts;
  const TokenBias* biases;
  const uint32_t* allowed;

  __device__ Row row(const DeviceDraw& draw, const uint32_t* bits, int32_t first) const {
    return Row(logits, vocab, draw, generated_counts, seen, biases, allowed, bits, first);
  }

  // Block (draw, chunk)'s draw and the ids [first, end) of its chunk.
  struct Place {
    int64_t draw;
    int32_t chunk, first, end;
  };
  __device__ Place place() const {
    const int32_t chunk = int32_t(blockIdx.x % chunks);
    const int32_t first = chunk * kChunk;
    return {int64_t(blockIdx.x / chunks), chunk, first, first + kChunk < vocab ? first + kChunk : vocab};
  }
};

struct ScanParams : ChunkedRows {
  ChunkPartial* partials;  // [draws, chunks]
  uint64_t* tops;          // [draws, chunks, kMaxTopLogprobs]: the chunks' best finite raw ranks
};

// Block (draw, chunk) over ids [chunk * kChunk, + kChunk): one read of each logit.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(ScanParams p) {
  __shared__ uint32_t touched_bits[kChunk / 32];
  const auto [d, chunk, first, end] = p.place();
  const DeviceDraw draw = p.draws[d];
  const Row row = p.row(draw, touched_bits, first);
  if (row.touched) mark_touched<kScanThreads>(row, first, end, touched_bits);  // the same for the whole block

  float logits[kScanIdsPerThread];
  uint32_t nan = 0;
  int32_t max_ordered = INT_MIN;
  uint64_t best = 0;
#pragma unroll
  for (int j = 0; j < kScanIdsPerThread; ++j) {
    const int32_t id = first + j * kScanThreads + int32_t(threadIdx.x);
    logits[j] = -__int_as_float(0x7F800000);
    if (id >= end) continue;
    logits[j] = row.raw(id);
    const int32_t bits = __float_as_int(logits[j]);
    nan |= uint32_t((bits & 0x7FFFFFFF) > 0x7F800000);
    max_ordered = ordered_bits(bits) > max_ordered ? ordered_bits(bits) : max_ordered;
    const uint64_t rank = rank_of(row.penalised_logit(id, logits[j]), id);
    best = rank > best ? rank : best;
  }
  nan = block_reduce<kScanThreads>(nan, Max{});
  max_ordered = block_reduce<kScanThreads>(max_ordered, Max{});
  best = block_reduce<kScanThreads>(best, Max{});
  const float chunk_max = __int_as_float(ordered_bits(max_ordered));
  // Only a finite maximum gives weights (-inf everywhere: none; +inf or NaN: no distribution).
  const bool weighted = fabsf(chunk_max) < __int_as_float(0x7F800000);
  double exp_sum = 0.0;
#pragma unroll
  for (int j = 0; j < kScanIdsPerThread; ++j)
    if (weighted) exp_sum += exp_nonpositive(logits[j] - chunk_max);
  exp_sum = block_reduce<kScanThreads>(exp_sum, Sum{});
  if (threadIdx.x == 0) p.partials[blockIdx.x] = {exp_sum, best, max_ordered, nan};
  if (draw.top_logprobs > 0) {  // the same for the whole block
    uint64_t finite[kScanIdsPerThread];  // ranks of the finite logits, 0 for the masked ones
#pragma unroll
    for (int j = 0; j < kScanIdsPerThread; ++j) {
      const int32_t id = first + j * kScanThreads + int32_t(threadIdx.x);
      finite[j] = logits[j] == -__int_as_float(0x7F800000) ? 0 : rank_of(logits[j], id);
    }
    block_top_ranks<kScanThreads>(finite, draw.top_logprobs, p.tops + int64_t(blockIdx.x) * kMaxTopLogprobs);
  }
}

struct CombineParams {
  const float* logits;
  int32_t vocab;
  int32_t chunks;
  const DeviceDraw* draws;
  int64_t draw_count;
  const ChunkPartial* partials;
  RowSummary* summaries;
  DrawResult* results;
  int32_t* selection_count;  // how many draws the selection has
  int32_t* selection_draws;  // which, in draw order
};

// One block: a warp per draw folds its chunks, lanes over chunks in a fixed order.
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineParams p) {
  for (int64_t d = warp(); d < p.draw_count; d += kWarps) {
    const ChunkPartial* partials = p.partials + d * p.chunks;
    uint32_t nan = 0;
    int32_t max_ordered = INT_MIN;
    uint64_t best = 0;
    for (int32_t c = lane(); c < p.chunks; c += 32) {
      nan |= partials[c].nan;
      max_ordered = partials[c].max_ordered > max_ordered ? partials[c].max_ordered : max_ordered;
      best = partials[c].best > best ? partials[c].best : best;
    }
    nan = warp_reduce(nan, Max{});
    max_ordered = warp_reduce(max_ordered, Max{});
    best = warp_reduce(best, Max{});
    // checked_max's order: NaN, then all -inf, then +inf.
    const float raw_max = __int_as_float(ordered_bits(max_ordered));
    const float infinity = __int_as_float(0x7F800000);
    // Then a mask (and penalties) that leave no finite logit.
    const int32_t status = nan ? kDrawNan : raw_max == -infinity ? kDrawAllMasked
                                          : raw_max == infinity   ? kDrawPositiveInf
                                          : logit_of(best) == -infinity ? kDrawNothingAllowed
                                                                  : kDrawOk;
    double exp_sum = 0.0;  // rescaled from each chunk's maximum to the row's
    for (int32_t c = lane(); c < p.chunks && status == kDrawOk; c += 32) {
      const double chunk_max = double(__int_as_float(ordered_bits(partials[c].max_ordered)));
      if (partials[c].exp_sum > 0.0) exp_sum += partials[c].exp_sum * exp(chunk_max - double(raw_max));
    }
    exp_sum = warp_reduce(exp_sum, Sum{});
    if (lane() != 0) continue;
    const DeviceDraw& draw = p.draws[d];
    DrawResult& result = p.results[d];
    const double log_norm = double(raw_max) + log(exp_sum);
    p.summaries[d] = {log_norm, best, -1};
    result.status = status;
    if (status == kDrawOk && draw.temperature == 0.0f && draw.top_logprobs == 0) {
      result.id = id_of(best);
      result.logprob = float(double(p.logits[draw.row * int64_t(p.vocab) + id_of(best)]) - log_norm);
      result.top_count = 0;
    }
  }
  __syncthreads();  // every status is written
  int32_t listed = 0, nuclei = 0;
  for (int64_t base = 0; base < p.draw_count; base += kThreads) {
    const int64_t d = base + threadIdx.x;
    const bool selects = d < p.draw_count && p.results[d].status == kDrawOk &&
                         (p.draws[d].temperature != 0.0f || p.draws[d].top_logprobs > 0);
    int32_t total;
    const int32_t at = listed + block_exclusive_sum(int32_t(selects), total);
    if (selects) p.selection_draws[at] = int32_t(d);
    listed += total;
    // Every nucleus draw's first slot, a slot per search, as the host counted them (whatever the
    // status).
    const int32_t slots = d < p.draw_count && nucleus_draw(p.draws[d]) ? searches_of(p.draws[d]) : 0;
    const int32_t slot = nuclei + block_exclusive_sum(slots, total);
    if (slots > 0) p.summaries[d].nucleus_slot = slot;
    nuclei += total;
  }
  if (threadIdx.x == 0) *p.selection_count = listed;
}

struct WeighParams : ChunkedRows {
  const RowSummary* summaries;
  const DrawResult* results;  // their status
  ChunkWeights* weights;      // [draws, chunks]
  NucleusWork* nuclei;        // [nucleus slots]
  Nucleus* searches;          // [nucleus slots, kDigits]: each search after each digit
};

// Block (draw, chunk) of the random draws whose rows have a distribution: the chunk's weights
// exp((penalised logit - penalised maximum) / temperature), the bits src/sampler.cpp computes,
// summed with and without the near-top floor and min-p; for a nucleus draw, the histogram of the
// first digit of its candidates' keys, which the draw's last block to finish narrows the search by.
__global__ void __launch_bounds__(kScanThreads) weigh_kernel(WeighParams p) {
  __shared__ uint32_t touched_bits[kChunk / 32];
  __shared__ Histogram histogram;
  const auto [d, chunk, first, end] = p.place();
  const DeviceDraw draw = p.draws[d];
  if (draw.temperature == 0.0f || p.results[d].status != kDrawOk) return;  // the whole block
  const Weighted weighted{p.row(draw, touched_bits, first), logit_of(p.summaries[d].best), draw.temperature};
  if (weighted.row.touched) mark_touched<kScanThreads>(weighted.row, first, end, touched_bits);
  const bool nucleus = nucleus_draw(draw);  // the same for the whole block
  if (nucleus) clear_histogram<kScanThreads>(histogram);
  const float histogram_floor = first_digit_floor(draw);
  double mass = 0.0, near_mass = 0.0, kept_mass = 0.0;
  int32_t near_count = 0;
#pragma unroll
  for (int j = 0; j < kScanIdsPerThread; ++j) {
    const int32_t id = first + j * kScanThreads + int32_t(threadIdx.x);
    uint64_t rank;
    float weight;
    if (id >= end || !weighted.at(id, rank, weight)) continue;
    mass += weight;
    if (weight >= kNearTopWeight) {
      near_mass += weight;
      ++near_count;
    }
    if (weight >= draw.min_p) kept_mass += weight;
    if (nucleus && weight >= histogram_floor)
      add_to_histogram(histogram, int(key_of(rank) >> (32 - digit_bits(0))), weight);
  }
  mass = block_reduce<kScanThreads>(mass, Sum{});
  near_mass = block_reduce<kScanThreads>(near_mass, Sum{});
  kept_mass = block_reduce<kScanThreads>(kept_mass, Sum{});
  near_count = block_reduce<kScanThreads>(near_count, Sum{});
  if (threadIdx.x == 0) p.weights[blockIdx.x] = {mass, near_mass, kept_mass, near_count};
  if (!nucleus) return;
  const int64_t slot = p.summaries[d].nucleus_slot;
  NucleusWork& work = p.nuclei[slot];
  flush_histogram<kScanThreads>(histogram, work.histograms[0]);
  if (!last_to_arrive(&work.arrived[0], uint32_t(p.chunks))) return;
  Nucleus search = start_nucleus<kScanThreads>(draw, p.weights + d * p.chunks, p.chunks);
  if (search.fast) search = narrow<kScanThreads>(search, work.histograms[0], 0);
  if (threadIdx.x == 0) p.searches[slot * kDigits] = search;  // the selection reads whether it is fast
}

struct NucleusParams : ChunkedRows {
  const RowSummary* summaries;
  const DrawResult* results;    // their status
  NucleusWork* nuclei;          // [nucleus slots]: a draw's searches' consecutive slots
  Nucleus* searches;            // [nucleus slots, kDigits]: each search after each digit
  ChunkNucleus* chunk_nuclei;   // [draws, chunks]
  // 1 .. kPasses - 1: the digit pass (p / kDigits: of which search, p % kDigits: which digit);
  // kPasses: the chunks' nuclei.
  int32_t pass;
};

// Block (draw, chunk) of a nucleus draw whose search is fast: adds the chunk's candidates that
// share the digits found so far to the next digit's histogram (the draw's last block to finish
// narrows the search by it) or, after the last digit of the draw's last search, sums the chunk's
// part of the nucleus.
__global__ void __launch_bounds__(kScanThreads) nucleus_kernel(NucleusParams p) {
  __shared__ uint32_t touched_bits[kChunk / 32];
  __shared__ Histogram histogram;
  const auto [d, chunk, first, end] = p.place();
  const DeviceDraw draw = p.draws[d];
  if (!nucleus_draw(draw) || p.results[d].status != kDrawOk) return;  // the whole block
  const int searches = searches_of(draw);
  const bool last = p.pass == kPasses;
  if (!last && p.pass >= searches * kDigits) return;  // a search this draw does not make
  const int64_t slot = p.summaries[d].nucleus_slot;
  // The first search's first digit says whether the passes find this nucleus (only then are the
  // later states written).
  if (!p.searches[slot * kDigits].fast) return;  // the whole block
  const int64_t search_slot = slot + (last ? searches - 1 : p.pass / kDigits);
  const int digit = last ? kDigits : p.pass % kDigits;
  // The state after the digit before (a second search's first digit: its start).
  Nucleus* const states = p.searches + search_slot * kDigits;
  const Nucleus search = states[digit == 0 ? 0 : digit - 1];

  Weighted candidates{p.row(draw, touched_bits, first), logit_of(p.summaries[d].best), draw.temperature};
  candidates.floor = search.floor;
  if (candidates.row.touched) mark_touched<kScanThreads>(candidates.row, first, end, touched_bits);
  const int shift = last ? 0 : 32 - search.bits - digit_bits(digit);
  if (!last) clear_histogram<kScanThreads>(histogram);
  double above_mass = 0.0;
  int32_t ties = 0;
#pragma unroll
  for (int j = 0; j < kScanIdsPerThread; ++j) {
    const int32_t id = first + j * kScanThreads + int32_t(threadIdx.x);
    if (id >= end) continue;
    const float logit = candidates.row.penalised_logit(id);
    const uint32_t key = key_of(rank_of(logit, id));
    const uint32_t found = key_prefix(key, search.bits);
    if (found < search.prefix) continue;  // below the cut-off: no exponential
    if (!last && (found > search.prefix || (search.floor_ties > 0 && key <= search.floor_key))) continue;
    const float weight = candidates.weight_of(logit);
    if (!(weight > 0.0f && weight >= candidates.floor)) continue;
    if (!last) {
      add_to_histogram(histogram, int((key >> shift) & uint32_t((1 << digit_bits(digit)) - 1)), weight);
    } else if (found > search.prefix) {
      if (weight >= draw.min_p) above_mass += weight;  // top-k's candidates are kept when they reach min-p
    } else {
      ++ties;
    }
  }
  if (!last) {
    NucleusWork& work = p.nuclei[search_slot];
    flush_histogram<kScanThreads>(histogram, work.histograms[digit]);
    if (!last_to_arrive(&work.arrived[digit], uint32_t(p.chunks))) return;
    add_floor_ties(work.histograms[digit], search, digit);
    const Nucleus narrowed = narrow<kScanThreads>(search, work.histograms[digit], digit);
    if (threadIdx.x == 0) {
      states[digit] = narrowed;
      if (search_slot == slot && digit == kDigits - 1 && searches == 2)
        p.searches[(slot + 1) * kDigits] = nucleus_within(narrowed, candidates, draw);
    }
    return;
  }
  above_mass = block_reduce<kScanThreads>(above_mass, Sum{});
  ties = block_reduce<kScanThreads>(ties, Sum{});
  if (threadIdx.x == 0) p.chunk_nuclei[blockIdx.x] = {above_mass, ties};
}

// A draw's weights over its whole row, its chunks folded in a fixed order.
struct RowWeights {
  double mass, near_mass;
  int64_t near_count;
};
__device__ RowWeights fold_chunk_weights(const ChunkWeights* chunks, int32_t count) {
  const bool mine = int32_t(threadIdx.x) < count;  // a thread per chunk
  const ChunkWeights none{0.0, 0.0, 0.0, 0};
  const ChunkWeights& c = mine ? chunks[threadIdx.x] : none;
  return {block_reduce(c.mass, Sum{}), block_reduce(c.near_mass, Sum{}), block_reduce(int64_t(c.near_count), Sum{})};
}

// The inverse-CDF draw over the kept tokens: the chunk where the running mass passes uniform * the
// kept mass, found from the chunks' kept masses (`mass`: thread c's chunk c's, 0 past the last),
// then the walk through that chunk alone.
__device__ int32_t draw_by_chunks(const Weighted& candidates, double uniform, double mass) {
  const int32_t c = int32_t(threadIdx.x);  // a thread per chunk
  double total;
  const double before = block_exclusive_sum(mass, total);
  const double target = uniform * total;
  // Only a chunk with weight may hold the crossing: the prefix sums' rounding can put an empty
  // chunk's running mass past the target first.
  const int32_t crossing = block_reduce(mass > 0.0 && before + mass > target ? c : INT_MAX, Min{});
  // When rounding leaves no chunk past the target: the last chunk with weight, whose last
  // weighted id the walk returns.
  const int32_t chosen = crossing != INT_MAX ? crossing : block_reduce(mass > 0.0 ? c : -1, Max{});
  const double carried = block_reduce(c == chosen ? before : 0.0, Sum{});
  const int32_t first = chosen * kChunk;
  const int32_t end = first + kChunk < candidates.row.vocab ? first + kChunk : candidates.row.vocab;
  return walk_in_id_order(candidates, target, carried, first, end);
}

// The id of the n-th (from 1) candidate in id order among the chunk's ids [first, end) whose key
// is `key`.
__device__ int32_t nth_with_key(const Weighted& candidates, uint32_t key, int32_t first, int32_t end, int64_t n) {
  constexpr int kPerThread = kChunk / kThreads;
  static_assert(kChunk % kThreads == 0, "a chunk's ids spread evenly over the block");
  int32_t matches[kPerThread];
  int count = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int32_t id = first + int32_t(threadIdx.x) * kPerThread + j;
    uint64_t rank;
    float weight;
    if (id < end && candidates.at(id, rank, weight) && key_of(rank) == key) matches[count++] = id;
  }
  int total;
  const int64_t before = block_exclusive_sum(count, total);
  int32_t found = -1;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j)
    if (j < count && before + j + 1 == n) found = matches[j];
  return block_reduce(found, Max{});
}

// The draw of a nucleus that the passes found: the candidates above the cut-off key, and of those
// on it the fewest, lowest ids that bring the measure to the target (all of them when none do);
// of those, the ones that reach min-p.
__device__ int32_t draw_from_nucleus(Weighted kept, const Nucleus& search, float min_p, const ChunkNucleus* chunks,
                                     int32_t count, double uniform) {
  kept.floor = search.floor;
  const uint64_t cut_rank = uint64_t(search.prefix) << 32;
  const float tie_weight = kept.weight_of(logit_of(cut_rank));
  const FixedMass tie_measure = search.by_count ? FixedMass{0, 1} : FixedMass::of(tie_weight);
  // The fewest ties that reach the target: the running measure only grows, so a binary search.
  int64_t lo = 1, hi = search.bucket_count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if ((search.above + tie_measure.times(mid)).value() >= search.target) hi = mid; else lo = mid + 1;
  }
  const int64_t needed = lo;
  // The chunk that holds the last tie kept, and that tie's id.
  const int32_t c = int32_t(threadIdx.x);  // a thread per chunk
  const int64_t ties = c < count ? chunks[c].ties : 0;
  int64_t all_ties;
  const int64_t before = block_exclusive_sum(ties, all_ties);
  const int32_t holder = block_reduce(ties > 0 && before < needed && needed <= before + ties ? c : INT_MAX, Min{});
  const int64_t before_holder = block_reduce(c == holder ? before : int64_t(0), Sum{});
  const int32_t first = holder * kChunk;
  const int32_t end = first + kChunk < kept.row.vocab ? first + kChunk : kept.row.vocab;
  const int32_t last_tie = nth_with_key(kept, search.prefix, first, end, needed - before_holder);
  kept.rank_floor = cut_rank | uint32_t(~last_tie);
  kept.floor = higher(kept.floor, min_p);
  const int64_t kept_ties =
      tie_weight < kept.floor ? 0 : c < holder ? ties : c == holder ? needed - before_holder : 0;
  const double mass = c < count ? chunks[c].above_mass + double(tie_weight) * double(kept_ties) : 0.0;
  return draw_by_chunks(kept, uniform, mass);
}

struct SelectParams {
  const float* logits;
  int32_t vocab;
  const DeviceDraw* draws;
  const uint64_t* tops;  // [draws, chunks, kMaxTopLogprobs]
  const int32_t* seen;
  const int32_t* generated_counts;
  const TokenBias* biases;
  const uint32_t* allowed;
  const RowSummary* summaries;
  const ChunkWeights* weights;  // [draws, chunks]
  const Nucleus* searches;         // [nucleus slots, kDigits]
  const ChunkNucleus* chunk_nuclei;  // [draws, chunks]
  int32_t chunks;
  const int32_t* selection_count;
  const int32_t* selection_draws;
  DrawResult* results;
  int32_t* buffers;  // one row of ids per block
};

// The draw's top log-probabilities and its token, from a row with a distribution. Of the row's
// chunks: `chunk_tops`, their best ranks when the draw asks for alternatives; `chunk_weights`,
// their weights when the draw is random; `chunk_nuclei`, their parts of the nucleus when the draw's
// passes found it.
__device__ void select_token(const SelectParams& p, const DeviceDraw& draw, const RowSummary& summary,
                             const uint64_t* chunk_tops, const ChunkWeights* chunk_weights,
                             const ChunkNucleus* chunk_nuclei, uint32_t* touched_bits, int32_t* buffer,
                             DrawResult& result) {
  const int32_t vocab = p.vocab;
  const Row row(p.logits, vocab, draw, p.generated_counts, p.seen, p.biases, p.allowed, touched_bits, 0);
  // A greedy draw's token is the combine's argmax.
  if (row.touched && draw.temperature != 0.0f) mark_touched<kThreads>(row, 0, vocab, touched_bits);
  const double log_norm = summary.log_norm;

  // The best finite raw logits: a merge of the chunks' lists, a thread on each list's head.
  int count = 0, taken = 0;  // alternatives found; entries of this thread's list among them
  while (count < draw.top_logprobs) {
    const uint64_t* list = chunk_tops + int64_t(threadIdx.x) * kMaxTopLogprobs;
    const uint64_t head = int32_t(threadIdx.x) < p.chunks && taken < draw.top_logprobs ? list[taken] : 0;
    const uint64_t top = block_reduce(head, Max{});
    if (top == 0) break;  // fewer finite logits than asked for
    taken += head == top;
    if (threadIdx.x == 0) {
      result.top_ids[count] = id_of(top);
      result.top_logprobs[count] = float(double(row.raw(id_of(top))) - log_norm);
    }
    ++count;
  }
  if (threadIdx.x == 0) result.top_count = count;

  int32_t chosen;
  if (draw.temperature == 0.0f) {
    chosen = id_of(summary.best);
  } else if (draw.top_k == 0 && draw.top_p == 1.0f) {
    // No truncation but min-p's: the kept tokens are those of the chunks' kept masses.
    Weighted kept{row, logit_of(summary.best), draw.temperature};
    kept.floor = draw.min_p;
    const int32_t c = int32_t(threadIdx.x);  // a thread per chunk
    chosen = draw_by_chunks(kept, draw.uniform, c < p.chunks ? chunk_weights[c].kept_mass : 0.0);
  } else if (nucleus_draw(draw) && p.searches[int64_t(summary.nucleus_slot) * kDigits].fast) {
    const int64_t final_slot = summary.nucleus_slot + searches_of(draw) - 1;  // the last search's
    chosen = draw_from_nucleus(Weighted{row, logit_of(summary.best), draw.temperature},
                               p.searches[final_slot * kDigits + kDigits - 1], draw.min_p, chunk_nuclei, p.chunks,
                               draw.uniform);
  } else {
    Weighted candidates{row, logit_of(summary.best), draw.temperature};
    const RowWeights weights = fold_chunk_weights(chunk_weights, p.chunks);
    const double top_p_share = top_p_fraction(draw.top_p);
    double mass;
    if (draw.top_k > 0) {
      // The k best of the near-top tokens when there are k of them, else of all (gather_top_k).
      if (weights.near_count >= draw.top_k) candidates.floor = kNearTopWeight;
      candidates.rank_floor = last_kept_rank(candidates, draw.top_k, 0.0, buffer);
      mass = row_mass(candidates);  // top-p measures against the top-k mass, before min-p
      candidates.floor = higher(candidates.floor, draw.min_p);
    } else {
      // gather_above_floor: the full mass; min-p, and the near-top floor when the near-top tokens
      // already hold the nucleus.
      mass = weights.mass;
      candidates.floor = draw.min_p;
      if (draw.top_p < 1.0f && weights.near_mass >= top_p_share * mass)
        candidates.floor = higher(candidates.floor, kNearTopWeight);
    }
    if (draw.top_p < 1.0f) candidates.rank_floor = last_kept_rank(candidates, 0, top_p_share * mass, buffer);
    chosen = draw_in_id_order(candidates, draw.uniform);
  }
  if (threadIdx.x == 0) {
    result.id = chosen;
    result.logprob = float(double(row.raw(chosen)) - log_norm);
  }
}

__global__ void __launch_bounds__(kThreads) select_kernel(SelectParams p) {
  extern __shared__ uint32_t touched_bits[];
  int32_t* buffer = p.buffers + int64_t(blockIdx.x) * p.vocab;
  for (int32_t i = int32_t(blockIdx.x); i < *p.selection_count; i += int32_t(gridDim.x)) {
    __syncthreads();  // the previous draw is done with the shared arrays
    const int32_t d = p.selection_draws[i];
    const DeviceDraw draw = p.draws[d];
    select_token(p, draw, p.summaries[d], p.tops + int64_t(d) * p.chunks * kMaxTopLogprobs,
                 p.weights + int64_t(d) * p.chunks, p.chunk_nuclei + int64_t(d) * p.chunks, touched_bits, buffer,
                 p.results[d]);
  }
}

// The launches' working memory, in one scratch buffer.
struct Scratch {
  ChunkPartial* partials;  // [draws, chunks]
  ChunkWeights* weights;   // [draws, chunks]
  uint64_t* tops;          // [draws, chunks, kMaxTopLogprobs]
  RowSummary* summaries;   // [draws]
  int32_t* selection;      // the selection's draw count, then its draws
  int32_t* buffers;        // [selection blocks, vocab]
  NucleusWork* nuclei;     // [nucleus slots]
  Nucleus* searches;       // [nucleus slots, kDigits]
  ChunkNucleus* chunk_nuclei;  // [draws, chunks]
};

}  // namespace

const char* draw_status_message(int32_t status) {
  switch (status) {
    case kDrawNan: return "logits contain NaN";
    case kDrawAllMasked: return "logits are all -inf";
    case kDrawPositiveInf: return "logits contain +inf";
    case kDrawNothingAllowed: return kNothingAllowed;
    default: fail("sample: the device returned unknown status {}", status);
  }
}

void sample(const SampleArgs& args, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (args.draws.empty()) return;
  if (args.vocab < 1 || args.vocab > kMaxVocab)
    fail("sampling vocab must be in [1, {}], got {}", kMaxVocab, args.vocab);
  // Draws that may need the selection, and those among them that are random (a row without a
  // distribution needs neither).
  int64_t selecting = 0, random_draws = 0, nucleus_slots = 0, two_searches = 0;
  for (const DeviceDraw& draw : args.draws) {
    if (draw.top_logprobs < 0 || draw.top_logprobs > kMaxTopLogprobs)
      fail("top_logprobs must be in [0, {}], got {}", kMaxTopLogprobs, draw.top_logprobs);
    selecting += draw.temperature != 0.0f || draw.top_logprobs > 0;
    random_draws += draw.temperature != 0.0f;
    if (nucleus_draw(draw)) nucleus_slots += searches_of(draw);
    two_searches += nucleus_draw(draw) && searches_of(draw) == 2;
  }
  const int64_t draw_count = std::ssize(args.draws);
  const int32_t chunks = int32_t(ceil_div(args.vocab, kChunk));
  const int64_t chunk_count = draw_count * chunks;
  if (chunk_count > INT_MAX) fail("sampling: {} draws are more than one launch holds", draw_count);
  // Two selection blocks per multiprocessor keep it busy; more would only grow the id buffers.
  const int blocks = int(std::min<int64_t>(selecting, 2 * int64_t(device.limits().sms)));

  const Scratch work = carve_scratch(scratch, [&](ScratchCarver& carver) {
    return Scratch{carver.take<ChunkPartial>(chunk_count), carver.take<ChunkWeights>(chunk_count),
                   carver.take<uint64_t>(chunk_count * kMaxTopLogprobs), carver.take<RowSummary>(draw_count),
                   carver.take<int32_t>(draw_count + 1), carver.take<int32_t>(blocks * args.vocab),
                   carver.take<NucleusWork>(nucleus_slots), carver.take<Nucleus>(nucleus_slots * kDigits),
                   carver.take<ChunkNucleus>(nucleus_slots > 0 ? chunk_count : 0)};
  });
  const int32_t vocab = int32_t(args.vocab);

  const ChunkedRows rows{args.logits, vocab, chunks, args.device_draws, args.seen, args.generated_counts, args.biases,
                         args.allowed};
  const ScanParams scan{rows, work.partials, work.tops};
  scan_kernel<<<int(chunk_count), kScanThreads, 0, stream>>>(scan);
  M1_CUDA_CHECK_LAUNCH();
  const CombineParams combine{args.logits, vocab, chunks, args.device_draws, draw_count, work.partials,
                              work.summaries, args.results, work.selection, work.selection + 1};
  combine_kernel<<<1, kThreads, 0, stream>>>(combine);
  M1_CUDA_CHECK_LAUNCH();
  if (nucleus_slots > 0)
    M1_CUDA_CHECK(cudaMemsetAsync(work.nuclei, 0, size_t(nucleus_slots) * sizeof(NucleusWork), stream));
  if (random_draws > 0) {
    const WeighParams weigh{rows, work.summaries, args.results, work.weights, work.nuclei, work.searches};
    weigh_kernel<<<int(chunk_count), kScanThreads, 0, stream>>>(weigh);
    M1_CUDA_CHECK_LAUNCH();
  }
  for (int32_t pass = 1; pass <= kPasses && nucleus_slots > 0; ++pass) {
    if (pass >= kDigits && pass < kPasses && two_searches == 0) continue;  // no draw makes a second search
    const NucleusParams nucleus{rows, work.summaries, args.results, work.nuclei, work.searches, work.chunk_nuclei,
                                pass};
    nucleus_kernel<<<int(chunk_count), kScanThreads, 0, stream>>>(nucleus);
    M1_CUDA_CHECK_LAUNCH();
  }
  if (blocks == 0) return;
  const SelectParams select{args.logits, vocab, args.device_draws, work.tops, args.seen, args.generated_counts,
                            args.biases, args.allowed, work.summaries, work.weights, work.searches,
                            work.chunk_nuclei, chunks, work.selection,
                            work.selection + 1, args.results, work.buffers};
  const size_t shared_bytes = size_t(ceil_div(args.vocab, 32)) * sizeof(uint32_t);
  device.allow_shared_memory<select_kernel>(shared_bytes);
  select_kernel<<<blocks, kThreads, shared_bytes, stream>>>(select);
  M1_CUDA_CHECK_LAUNCH();
}

}  // namespace m1::cuda
