// Causal grouped-query softmax attention (DESIGN.md §1) in five kernels:
//   rope_append   rotates q and k in place and appends this step's k and v to the bf16 caches;
//   prefill       flash attention for segments of several rows: a CTA takes 64 query vectors (128
//                 in fast precision; position-major, all query heads of one kv head) and streams K/V
//                 tiles through shared memory with an online softmax, one per chunk of keys at fixed
//                 absolute positions, folded left to right; when few CTAs would run, a CTA takes
//                 one chunk and writes its state to scratch instead;
//   fold          folds those chunk states in the same order (prefill rows);
//   decode        split-K for one-row segments: a CTA takes a range of cache rows for one kv head
//                 and writes a partial (max, sum, acc) to scratch;
//   combine       merges a decode row's partials in a fixed order.
// Products run on bf16 tensor cores (mma.m16n8k16, fp32 accumulation; the fast wide prefill CTAs
// on Hopper's warpgroup products where DeviceLimits::warpgroup_attention allows, with the same
// bits). The cache is bf16 already; q and the softmax weights are fp32. Exact precision splits
// each into a bf16 high part and a bf16 remainder and multiplies twice: 16 significant bits per
// operand, fp32-grade results at twice the products. Fast precision (DESIGN.md §4) rounds them to
// bf16 once: one product each.
// A row's arithmetic depends only on its own segment: work is cut per segment, key tiles sit at
// fixed absolute positions, and keys a row must not see contribute exact zeros.

#include "attention.h"

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>

#include "cuda_check.h"
#include "launch.h"
#include "m1/error.h"
#include "warp_mma.h"
#include "warpgroup_mma.h"

namespace m1::cuda {
namespace {

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kRopeThreads = 128;
constexpr int kCombineWarps = 8;
constexpr int kCombineChunk = 1024;  // split weights in shared memory at a time; a multiple of kCombineWarps
constexpr int kMaxHeadDim = 256;
constexpr float kLog2e = 1.4426950408889634f;

// How q and the softmax weights (fp32) enter the bf16 products.
enum class Operands {
  kSplit,    // a bf16 high part and its bf16 remainder, two products each (exact precision)
  kRounded,  // rounded to bf16 once, one product each (fast precision)
};
__host__ __device__ constexpr int query_parts(Operands operands) { return operands == Operands::kSplit ? 2 : 1; }

// Prefill CTAs take 16 query vectors per warp. Fast precision keeps one bf16 part of q in shared
// memory, which leaves room for 8 warps: each K/V tile brought in then serves 128 query vectors.
// A step whose CTAs would leave SMs idle (one rank's 8 query heads under tensor parallelism, a
// short prompt) takes CTAs of kNarrowPrefillWarps instead, 2 or 4 times as many: each warp walks
// the same key tiles in the same order either way (tiles past a row's last key add exact zeros),
// so a row's bits do not depend on the width.
__host__ __device__ constexpr int prefill_warps(Operands operands) { return operands == Operands::kRounded ? 8 : 4; }
constexpr int kNarrowPrefillWarps = 2;

// Shared-memory geometry for head dims up to D: rows padded by 16 bytes so the eight rows an
// ldmatrix phase reads fall in distinct banks; K/V tiles of kKeys rows (16 per decode warp).
template <int D>
struct Geometry {
  static constexpr int kPitch = D + 8;             // bf16 elements per shared row
  static constexpr int kKeys = D <= 128 ? 64 : 32;  // keys per tile; 256-wide rows halve it to fit
  static constexpr int kDecodeWarps = kKeys / 16;
  static constexpr size_t kTileBytes = size_t(kKeys) * kPitch * 2;
  static constexpr size_t kStageBytes = 2 * kTileBytes;  // one K tile and one V tile
  // The query block (a prefill CTA's or 16 decode query vectors) once per bf16 part, then the
  // stages: `stages` for prefill, 2 for decode.
  static constexpr size_t prefill_bytes(Operands o, int warps, int stages) {
    return query_parts(o) * size_t(16 * warps) * kPitch * 2 + size_t(stages) * kStageBytes;
  }
  static constexpr size_t decode_bytes(Operands o) { return query_parts(o) * size_t(16) * kPitch * 2 + 2 * kStageBytes; }
  // The decode CTA's closing merge reuses the stages: per warp 16 rows of D floats plus max,
  // sum and merge weight.
  static_assert(size_t(kDecodeWarps) * 16 * (D + 3) * 4 <= 2 * kStageBytes);
  // Two stages fit a GPU of 160 KB per block (an A100 allows 163 KB), which a third may not.
  static_assert(prefill_bytes(Operands::kSplit, prefill_warps(Operands::kSplit), 2) <= 160 * 1024 &&
                prefill_bytes(Operands::kRounded, prefill_warps(Operands::kRounded), 2) <= 160 * 1024 &&
                decode_bytes(Operands::kSplit) <= 160 * 1024);
};

// How the prefill CTA's query block and its K/V tiles lie in shared memory.
enum class Tiles {
  kPitched,   // rows of D + 8 bf16 (ldmatrix without bank conflicts), for the mma.sync kernels
  kSwizzled,  // the warpgroup products' operands: per 64 columns a block of 128-byte rows in the
              // 128-byte swizzle (warpgroup_mma.h), blocks one after another, 1024-byte aligned
};
template <int D, Tiles T>
struct TileLayout {
  static constexpr int kKeys = T == Tiles::kPitched ? Geometry<D>::kKeys : 64;  // keys per K/V tile
  static constexpr int kRowElements = T == Tiles::kPitched ? Geometry<D>::kPitch : D;
  // Element (r, c) of a tile of `rows` rows.
  __host__ __device__ static constexpr int offset(int rows, int r, int c) {
    if constexpr (T == Tiles::kPitched) return r * Geometry<D>::kPitch + c;
    return (c / 64) * rows * 64 + (swizzled_unit_offset(r, c % 64 / 8) + c % 8 * 2) / 2;
  }
};
// The warpgroup prefill (Tiles::kSwizzled): fast precision, 8 warps (two warpgroups of 64 query
// vectors), head dims 65..128 (one m64n128 product covers a row's values).
constexpr int kWarpgroupPrefillDim = 128;
constexpr int kWarpgroupPrefillWarps = 8;
// Its shared memory: the query block, `stages` K/V stages, the folded state (a float per
// accumulator of each thread; it does not fit the registers beside the products'), and room to
// align the first two to the swizzle's 1024 bytes.
constexpr size_t warpgroup_prefill_bytes(int stages) {
  constexpr int D = kWarpgroupPrefillDim, kThreads = kWarpgroupPrefillWarps * 32;
  constexpr int kQueryRows = kWarpgroupPrefillWarps * 16;
  return size_t(kQueryRows) * D * 2 + size_t(stages) * 2 * 64 * D * 2 + size_t(kThreads) * (D / 2) * 4 +
         kSwizzleAtomBytes;
}
static_assert(warpgroup_prefill_bytes(3) <= 227 * 1024);

// Keys per decode split, from the context length alone so a row's arithmetic never depends on the
// rest of the step: short contexts cut finer to spread one sequence over more SMs; both sizes are
// multiples of every key tile.
constexpr int64_t kFineSplitMaxKeys = 16384;  // contexts up to this many keys split every 256
__host__ __device__ constexpr int64_t decode_split_keys(int64_t keys) { return keys <= kFineSplitMaxKeys ? 256 : 512; }
__host__ __device__ constexpr int64_t decode_splits(int64_t keys) { return ceil_div(keys, decode_split_keys(keys)); }
// Launch slots of a decode row: the most splits any length up to its capacity needs (the split
// count drops where splits widen, so both sides of that point are candidates). Slots past the
// row's own splits exit at once.
__host__ __device__ constexpr int64_t decode_slots(const AttentionSegment& s) {
  if (s.count != 1) return 0;
  const int64_t room = s.capacity > s.pos0 + 1 ? s.capacity : s.pos0 + 1;
  const int64_t finer = decode_splits(room < kFineSplitMaxKeys ? room : kFineSplitMaxKeys);
  const int64_t coarser = decode_splits(room);
  return finer > coarser ? finer : coarser;
}
__host__ __device__ constexpr int64_t prefill_tiles(int64_t count, int64_t group, int rows_per_cta) {
  return count > 1 ? ceil_div(count * group, rows_per_cta) : 0;
}

// --- Warp-level building blocks -------------------------------------------------------------

// 16 bytes global -> shared without passing through registers; `valid` false writes zeros.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most one committed group is still in flight, or none.
__device__ __forceinline__ void copy_async_wait_all_but_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void copy_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ uint32_t bits(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }

// (x0, x1) as a bf16 pair and the pair of what that rounding left over.
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& high, uint32_t& low) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  high = bits(h);
  low = bf16_pair(x0 - __low2float(h), x1 - __high2float(h));
}

__device__ __forceinline__ void split_to_shared(float x, uint16_t* high, uint16_t* low) {
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  __nv_bfloat16 l = __float2bfloat16_rn(x - __bfloat162float(h));
  *high = *reinterpret_cast<uint16_t*>(&h);
  *low = *reinterpret_cast<uint16_t*>(&l);
}

__device__ __forceinline__ uint16_t to_bf16_bits(float x) {
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  return *reinterpret_cast<uint16_t*>(&h);
}

// One element of a shared query block: split into `high` and `low`, or only rounded into `high`.
// The rounding is the split's high part, so both precisions share it.
template <Operands O>
__device__ __forceinline__ void store_query(float x, uint16_t* high, uint16_t* low) {
  if constexpr (O == Operands::kSplit)
    split_to_shared(x, high, low);
  else
    *high = to_bf16_bits(x);
}

// --- Finding a CTA's work -------------------------------------------------------------------

// The work item `target` when each segment owns work(segment) consecutive items: the segment, the
// item's index within it, and the items before the segment. Every lane of the warp must call it.
struct Located {
  int segment = -1;
  int64_t local = 0, before = 0;
};

template <class Work>
__device__ Located locate(const AttentionSegment* segments, int n, int64_t target, Work work) {
  const int lane = threadIdx.x & 31;
  int64_t before = 0;
  for (int base = 0; base < n; base += 32) {
    const int i = base + lane;
    const int64_t mine = i < n ? work(segments[i]) : 0;
    int64_t inclusive = mine;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int64_t other = __shfl_up_sync(kFullWarp, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    const int64_t total = __shfl_sync(kFullWarp, inclusive, 31);
    if (target < before + total) {
      const int owner = __ffs(__ballot_sync(kFullWarp, target < before + inclusive)) - 1;
      const int64_t earlier = before + __shfl_sync(kFullWarp, inclusive - mine, owner);
      return {base + owner, target - earlier, earlier};
    }
    before += total;
  }
  return {};
}

// Sum of work(segment) over segments [0, end). Every lane of the warp must call it.
template <class Work>
__device__ int64_t work_before(const AttentionSegment* segments, int end, Work work) {
  const int lane = threadIdx.x & 31;
  int64_t total = 0;
  for (int base = 0; base < end; base += 32) {
    int64_t part = base + lane < end ? work(segments[base + lane]) : 0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) part += __shfl_xor_sync(kFullWarp, part, offset);
    total += part;
  }
  return total;
}

// --- RoPE and cache append --------------------------------------------------------------------

struct RopeParams {
  float* q;
  int64_t q_stride;
  float* k;
  int64_t k_stride;
  const float* v;
  int64_t v_stride;
  int heads, kv_heads, d, rotary_dim;
  double theta;
  const AttentionSegment* segments;
  int segment_count;
};

// One CTA per row of the step. Angles in double (as the CPU oracle) so positions near 1M keep
// their accuracy; the rotation itself in fp32, unfused like the oracle.
__global__ void __launch_bounds__(kRopeThreads) rope_append_kernel(RopeParams p) {
  const Located at = locate(p.segments, p.segment_count, blockIdx.x, [](const AttentionSegment& s) { return s.count; });
  const AttentionSegment seg = p.segments[at.segment];
  const int64_t row = seg.row + at.local, pos = seg.pos0 + at.local;
  const int half = p.rotary_dim / 2, kv_width = p.kv_heads * p.d;
  __shared__ float cos_table[kMaxHeadDim / 2], sin_table[kMaxHeadDim / 2];
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const double angle = double(pos) * pow(p.theta, -2.0 * double(j) / double(p.rotary_dim));
    cos_table[j] = float(cos(angle));
    sin_table[j] = float(sin(angle));
  }
  __syncthreads();
  float* q = p.q + row * p.q_stride;
  float* k = p.k + row * p.k_stride;
  const float* v = p.v + row * p.v_stride;
  uint16_t* keys = seg.keys + pos * kv_width;
  uint16_t* values = seg.values + pos * kv_width;
  // One thread owns a pair (j, j + half), so the in-place update has no races.
  for (int i = threadIdx.x; i < p.heads * half; i += blockDim.x) {
    float* x = q + (i / half) * p.d + i % half;
    const float a = x[0], b = x[half], c = cos_table[i % half], s = sin_table[i % half];
    x[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    x[half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
  for (int i = threadIdx.x; i < p.kv_heads * half; i += blockDim.x) {
    const int offset = (i / half) * p.d + i % half;
    float* x = k + offset;
    const float a = x[0], b = x[half], c = cos_table[i % half], s = sin_table[i % half];
    const float first = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    const float second = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    x[0] = first;
    x[half] = second;
    keys[offset] = to_bf16_bits(first);
    keys[offset + half] = to_bf16_bits(second);
  }
  const int passed = p.d - p.rotary_dim;  // dims past the rotary part, copied as they are
  for (int i = threadIdx.x; i < p.kv_heads * passed; i += blockDim.x) {
    const int offset = (i / passed) * p.d + p.rotary_dim + i % passed;
    keys[offset] = to_bf16_bits(k[offset]);
  }
  for (int i = threadIdx.x; i < kv_width; i += blockDim.x) values[i] = to_bf16_bits(v[i]);
}

// --- One warp's online softmax over one K/V tile ------------------------------------------------

// Running state of the 16 query vectors of one warp: lane l holds rows l / 4 and l / 4 + 8.
// `max` is in log2 units of the scaled score; `sum` is this lane's share of the row sum.
template <int D>
struct RowState {
  float acc[D / 8][4];
  float max[2];
  float sum[2];

  __device__ void clear() {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
    max[0] = max[1] = -INFINITY;
    sum[0] = sum[1] = 0.0f;
  }
};

// The softmax step of a key tile, shared by both forms of the prefill: scores s (this lane's rows
// l / 4 and l / 4 + 8 of its warp's 16, keys key0 + 8n + 2t and + 1) become weights in log2 units,
// masked keys -inf and so weighing exactly zero; the running max and row sums of `state` move on,
// `rescale` is what acc must be scaled by, and the weights leave as bf16 operands (high + low
// parts, or rounded): the score layout of n-tiles 2kk and 2kk+1 is the a-operand layout of keys
// 16kk..16kk+15.
template <int D, int kTiles, Operands O>
__device__ __forceinline__ void weigh_scores(float (&s)[kTiles][4], int64_t key0, bool masked,
                                             const int64_t (&limit)[2], float scale_log2, RowState<D>& state,
                                             float (&rescale)[2], uint32_t (&ph)[kTiles / 2][4],
                                             uint32_t (&pl)[kTiles / 2][4]) {
  const int t = threadIdx.x & 3;
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < kTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[n][e] * scale_log2;
      if (masked && key0 + 8 * n + 2 * t + (e & 1) > limit[e >> 1]) x = -INFINITY;
      s[n][e] = x;
      tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
    }
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFullWarp, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFullWarp, tile_max[r], 2));
    const float new_max = fmaxf(state.max[r], tile_max[r]);
    // A row that has seen no visible key yet keeps max -inf; base 0 then avoids -inf - -inf.
    base[r] = new_max == -INFINITY ? 0.0f : new_max;
    rescale[r] = exp2f(state.max[r] - base[r]);
    state.max[r] = new_max;
  }
  float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < kTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[n][e] = exp2f(s[n][e] - base[e >> 1]);
      tile_sum[e >> 1] += s[n][e];
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) state.sum[r] = state.sum[r] * rescale[r] + tile_sum[r];

#pragma unroll
  for (int kk = 0; kk < kTiles / 2; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float* pair = &s[2 * kk + (i >> 1)][2 * (i & 1)];
      if constexpr (O == Operands::kSplit)
        split_pair(pair[0], pair[1], ph[kk][i], pl[kk][i]);
      else
        ph[kk][i] = bf16_pair(pair[0], pair[1]);
    }
}

// Folds keys [key0, key0 + 8 kTiles) (rows of `keys`/`values` in shared memory) into the state of
// the warp's 16 query vectors (rows of q_high, and of q_low when split). A row sees key t iff
// t <= its limit; `masked` false promises that every key of the tile is visible to every row. Only
// the first `d` columns are read, in steps of 16 (padding columns are zero).
template <int D, int kTiles, Operands O>
__device__ __forceinline__ void attend_tile(const uint16_t* q_high, const uint16_t* q_low, const uint16_t* keys,
                                            const uint16_t* values, int d, int64_t key0, bool masked,
                                            const int64_t (&limit)[2], float scale_log2, RowState<D>& state) {
  static_assert(kTiles % 2 == 0);
  constexpr int P = Geometry<D>::kPitch;
  const int lane = threadIdx.x & 31;

  // Scores: s = q k^T, q as high + low parts or rounded.
  float s[kTiles][4];
#pragma unroll
  for (int n = 0; n < kTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    if (ks * 16 >= d) break;
    uint32_t qh[4], ql[4];
    const int q_offset = (lane & 15) * P + ks * 16 + (lane >> 4) * 8;
    load_matrices(qh, q_high + q_offset);
    if constexpr (O == Operands::kSplit) load_matrices(ql, q_low + q_offset);
#pragma unroll
    for (int np = 0; np < kTiles / 2; ++np) {
      // Matrices: keys 16np+0..7 at dims +0 and +8, then keys 16np+8..15 at dims +0 and +8.
      uint32_t b[4];
      load_matrices(b, keys + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * P + ks * 16 + ((lane >> 3) & 1) * 8);
      if constexpr (O == Operands::kSplit) mma_bf16(s[2 * np], ql, b[0], b[1]);
      mma_bf16(s[2 * np], qh, b[0], b[1]);
      if constexpr (O == Operands::kSplit) mma_bf16(s[2 * np + 1], ql, b[2], b[3]);
      mma_bf16(s[2 * np + 1], qh, b[2], b[3]);
    }
  }

  float rescale[2];
  uint32_t ph[kTiles / 2][4], pl[kTiles / 2][4];
  weigh_scores<D, kTiles, O>(s, key0, masked, limit, scale_log2, state, rescale, ph, pl);

  // acc = acc * rescale + p v. The tile's p v is summed from zero on the tensor cores and added to
  // acc in rounded fp32: tensor cores truncate as they accumulate, and an acc fed through them tile
  // after tile drifts toward zero (2e-3 over the 16K tiles of a 1M-token context on an H100).
#pragma unroll
  for (int np = 0; np < D / 16; ++np) {
    if (np * 16 >= d) break;
    float part[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < kTiles / 2; ++kk) {
      // Matrices (transposed): keys +0..7 and +8..15 at dims 16np, then the same at dims 16np+8.
      uint32_t b[4];
      load_matrices_transposed(b, values + (kk * 16 + (lane & 15)) * P + np * 16 + (lane >> 4) * 8);
      if constexpr (O == Operands::kSplit) mma_bf16(part[0], pl[kk], b[0], b[1]);
      mma_bf16(part[0], ph[kk], b[0], b[1]);
      if constexpr (O == Operands::kSplit) mma_bf16(part[1], pl[kk], b[2], b[3]);
      mma_bf16(part[1], ph[kk], b[2], b[3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        state.acc[2 * np + j][e] = __fmaf_rn(state.acc[2 * np + j][e], rescale[e >> 1], part[j][e]);
  }
}

// attend_tile's arithmetic on the warpgroup tensor cores (wgmma, sm_90a), fast precision: the
// warpgroup's 64 query vectors (its query block of 64 swizzled rows at shared-window address q,
// 64-column blocks q_block bytes apart) against a K/V stage of 64 keys (swizzled, 64-column blocks
// 8 KB apart). Each output gets the same sequence of products, roundings and adds as attend_tile
// gives it: scores chained over the 16-column steps from zero, then per tile p v summed over
// the four 16-key steps from zero and added as acc * rescale + p v. The products run on the
// columns past d too, where attend_tile stops: q's and the keys' padding columns are zero, so the
// score steps past d add exact zeros (which leave a sum's bits alone, and a branch between the
// products would make ptxas fence each one), and the values' padding gives output columns that
// are not written.
template <int D>
__device__ __forceinline__ void attend_tile_warpgroup(uint32_t q, uint32_t q_block, uint32_t keys, uint32_t values,
                                                      int64_t key0, bool masked, const int64_t (&limit)[2],
                                                      float scale_log2, RowState<D>& state) {
  static_assert(D == kWarpgroupPrefillDim);
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for sm_90a only; the planner takes it only where DeviceLimits::warpgroup_attention says so
#else
  constexpr uint32_t kKvBlock = 64 * kSwizzleRowBytes;  // 64 keys of one 64-column block
  float s[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
  float(&scores)[32] = reinterpret_cast<float(&)[32]>(s);
  warpgroup_fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint32_t column = ks / 4 * q_block + ks % 4 * 32, key_column = ks / 4 * kKvBlock + ks % 4 * 32;
    warpgroup_mma_64(scores, swizzled_descriptor(q + column), swizzled_descriptor(keys + key_column), 1);
  }
  warpgroup_commit();
  warpgroup_pin(scores);
  warpgroup_wait<0>();
  warpgroup_pin(scores);

  float rescale[2];
  uint32_t p[4][4], unused[4][4];
  weigh_scores<D, 8, Operands::kRounded>(s, key0, masked, limit, scale_log2, state, rescale, p, unused);

  float part[64];
#pragma unroll
  for (int e = 0; e < 64; ++e) part[e] = 0.0f;
  warpgroup_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    warpgroup_mma_128_registers(part, p[kk], n_major_swizzled_descriptor(values + kk * 16 * kSwizzleRowBytes, kKvBlock),
                                1);
  warpgroup_commit();
  warpgroup_pin(part);
  warpgroup_wait<0>();
  warpgroup_pin(part);
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) state.acc[n][e] = __fmaf_rn(state.acc[n][e], rescale[e >> 1], part[4 * n + e]);
#endif
}

// Row sums from the four lanes that share a row.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullWarp, x, 1);
  return x + __shfl_xor_sync(kFullWarp, x, 2);
}

// --- Folding a row's chunks -------------------------------------------------------------------

// A prefill row's keys are cut into chunks of chunk_keys at absolute positions 0, chunk_keys, ...
// Each chunk is an online softmax from a fresh state; the row's result folds the chunks' states
// left to right, in registers as one CTA walks them, or from scratch (fold_kernel) when CTAs took a
// chunk each. Both go through these two functions, so a row's bits do not depend on which did it.
// A row within one chunk gets exactly the bits of one online softmax over its keys.

// The weights that fold a chunk's state (max_b, its row sum sum_b) into the state of the chunks
// before it (max_a, sum_a), which it updates: each side scaled by 2^(its max - the larger max). An
// empty side (max -inf: no key visible to the row) is dropped exactly: weight 0, the other side 1.
struct FoldWeights {
  float a, b;
};
__device__ __forceinline__ FoldWeights fold_weights(float& max_a, float& sum_a, float max_b, float sum_b) {
  if (max_b == -INFINITY) return {1.0f, 0.0f};
  if (max_a == -INFINITY) {
    max_a = max_b;
    sum_a = sum_b;
    return {0.0f, 1.0f};
  }
  const float max = fmaxf(max_a, max_b);
  const FoldWeights w{exp2f(max_a - max), exp2f(max_b - max)};
  sum_a = __fmaf_rn(sum_a, w.a, __fmul_rn(sum_b, w.b));
  max_a = max;
  return w;
}
// One accumulated value of the folded state (after fold_weights).
__device__ __forceinline__ float fold_value(float a, float b, FoldWeights w) {
  if (w.b == 0.0f) return a;
  if (w.a == 0.0f) return b;
  return __fmaf_rn(a, w.a, __fmul_rn(b, w.b));
}

// The folded state of the chunks a CTA has walked, for the warp's 16 query vectors (lane l: rows
// l / 4 and l / 4 + 8, as RowState); `sum` is the whole row's. The accumulated values live in
// registers, or (kSharedStride > 0) in shared memory from `column` on, value i of this thread at
// column[i * kSharedStride]: the warpgroup prefill's registers hold the products instead.
template <int D, int kSharedStride = 0>
struct FoldedState {
  float own[kSharedStride > 0 ? 1 : D / 8][4] = {};
  float* column = nullptr;
  float max[2] = {-INFINITY, -INFINITY};
  float sum[2] = {0.0f, 0.0f};

  FoldedState() = default;
  __device__ explicit FoldedState(float* shared_column) : column(shared_column) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) column[i * kSharedStride] = 0.0f;
  }
  __device__ float& acc(int n, int e) {
    if constexpr (kSharedStride > 0)
      return column[(4 * n + e) * kSharedStride];
    else
      return own[n][e];
  }

  // Folds a chunk's state in and leaves the chunk's cleared for the next one. Every lane calls it.
  __device__ void fold(RowState<D>& chunk) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const FoldWeights w = fold_weights(max[r], sum[r], chunk.max[r], quad_sum(chunk.sum[r]));
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) acc(n, e) = fold_value(acc(n, e), chunk.acc[n][e], w);
    }
    chunk.clear();
  }
};

// --- Shared pieces of the two attention kernels -----------------------------------------------

struct AttendParams {
  const float* q;
  int64_t q_stride;
  float* out;
  int64_t out_stride;
  int kv_heads, group, d;
  float scale_log2;
  const AttentionSegment* segments;
  int segment_count;
  int64_t work_items;       // prefill: tiles of all segments; decode: split slots of all segments
  int stages;               // prefill: K/V stages in shared memory (decode: always 2)
  float* partial_acc;       // decode: [heads][slots][d]; split prefill: [chunk of the window][kv head][vector][d]
  float* partial_stats;     // decode: [heads][slots][max, sum]; split prefill: the same [..][max, sum]
  // Prefill: keys per chunk. Split prefill (window > 0): this launch's chunks [first_chunk,
  // first_chunk + window), one per CTA (blockIdx.z), and the folded state of the chunks before them
  // ([kv head][vector], as the partials; the stats in two copies, one read and one written by
  // each window), which fold_kernel reads and writes.
  int64_t chunk_keys;
  int64_t first_chunk, window;
  float* folded_acc;
  float* folded_stats;
};

// Copies cache rows [t0, t0 + kKeys) of one kv head into a shared K and V tile; rows at or past
// `end` are filled with zeros (they may be unwritten memory, and a zero weight times NaN is NaN).
template <int D, Tiles T = Tiles::kPitched>
__device__ __forceinline__ void load_kv_tile(const AttentionSegment& seg, int64_t kv_width, int64_t head_offset, int d,
                                             int64_t t0, int64_t end, uint16_t* keys, uint16_t* values) {
  using L = TileLayout<D, T>;
  constexpr int kKeys = L::kKeys;
  const int chunks = d / 8;  // 16-byte pieces per row
  for (int i = threadIdx.x; i < kKeys * chunks; i += blockDim.x) {
    const int r = i / chunks, c = (i % chunks) * 8;
    const bool valid = t0 + r < end;
    const int64_t src = (valid ? t0 + r : 0) * kv_width + head_offset + c;
    copy_async_16(keys + L::offset(kKeys, r, c), seg.keys + src, valid);
    copy_async_16(values + L::offset(kKeys, r, c), seg.values + src, valid);
  }
  copy_async_commit();
}

// Streams cache rows [begin, end) of one kv head through `stage_count` (2 or 3) shared stages,
// kKeys rows at a time, copying tiles stage_count - 1 ahead of the one in use, and calls
// attend(keys, values, t0) for each tile once every thread's copies have landed. One barrier per
// tile: after it every thread has its copies of this tile and is done with the last one, whose
// stage then takes the next copy. Ends on a barrier, so the stages are free for the caller. All
// threads of the CTA must call it. Swizzled tiles feed the warpgroup products, which read shared
// memory through the async proxy: each thread fences its landed copies (and its earlier stores)
// into it before the barrier.
template <int D, Tiles T = Tiles::kPitched, class Attend>
__device__ __forceinline__ void stream_kv(const AttentionSegment& seg, int64_t kv_width, int64_t head_offset, int d,
                                          int64_t begin, int64_t end, uint16_t* stages, int stage_count,
                                          Attend attend) {
  using L = TileLayout<D, T>;
  constexpr int kKeys = L::kKeys, kTile = kKeys * L::kRowElements, kStage = 2 * kTile;
  const int tiles = int(ceil_div(end - begin, kKeys));
  // Tile j into stage j % stage_count; past the last tile an empty group keeps the wait count uniform.
  const auto copy = [&](int j) {
    if (j >= tiles) return copy_async_commit();
    uint16_t* stage = stages + (j % stage_count) * kStage;
    load_kv_tile<D, T>(seg, kv_width, head_offset, d, begin + int64_t(j) * kKeys, end, stage, stage + kTile);
  };
  for (int j = 0; j < stage_count - 1; ++j) copy(j);
  for (int j = 0; j < tiles; ++j) {
    // Tiles j + 1 .. j + stage_count - 2 may stay in flight.
    if (stage_count == 3)
      copy_async_wait_all_but_one();
    else
      copy_async_wait_all();
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (T == Tiles::kSwizzled) fence_shared_for_async_proxy();
#endif
    __syncthreads();
    copy(j + stage_count - 1);  // into the stage of tile j - 1
    const uint16_t* keys = stages + (j % stage_count) * kStage;
    attend(keys, keys + kTile, begin + int64_t(j) * kKeys);
  }
  __syncthreads();
}

// Zeroes the columns [d, D) of every row of `stage_count` stages once: the copies never write them
// and the tensor cores read them in 16-column steps.
template <int D, Tiles T = Tiles::kPitched>
__device__ __forceinline__ void clear_padding(uint16_t* stages, int stage_count, int d) {
  using L = TileLayout<D, T>;
  constexpr int kKeys = L::kKeys, kTile = kKeys * L::kRowElements;
  const int rows = stage_count * 2 * kKeys, width = D - d;
  for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
    const int row = i / width;
    stages[row / kKeys * kTile + L::offset(kKeys, row % kKeys, d + i % width)] = 0;
  }
}

// --- Prefill --------------------------------------------------------------------------------

// Tiles::kSwizzled: the same rows, chunks and folds with the tile's products on the warpgroup
// tensor cores (attend_tile_warpgroup) and the folded state in shared memory; the same bits.
template <int D, Operands O, int W, Tiles T = Tiles::kPitched>
__global__ void __launch_bounds__(W * 32) prefill_kernel(AttendParams p) {
  static_assert(T == Tiles::kPitched ||
                (D == kWarpgroupPrefillDim && O == Operands::kRounded && W == kWarpgroupPrefillWarps));
  using L = TileLayout<D, T>;
  constexpr int kKeys = L::kKeys, kQueryRows = 16 * W, kQueryElements = kQueryRows * L::kRowElements;
  constexpr int kStageElements = 2 * kKeys * L::kRowElements;
  extern __shared__ __align__(16) uint16_t shared[];
  uint16_t* q_high = shared;
  // Swizzled tiles start at the shared window's first 1024-byte boundary.
  if constexpr (T == Tiles::kSwizzled)
    q_high += (kSwizzleAtomBytes - shared_address(shared) % kSwizzleAtomBytes) % kSwizzleAtomBytes / 2;
  uint16_t* q_low = q_high + kQueryElements;  // split operands only
  uint16_t* stages = q_high + query_parts(O) * kQueryElements;  // stage s: its keys' tile, then its values'

  // Latest tiles (longest rows) first, so the heavy CTAs do not trail the launch.
  const int group = p.group;
  const Located at = locate(p.segments, p.segment_count, p.work_items - 1 - blockIdx.x,
                            [group](const AttentionSegment& s) { return prefill_tiles(s.count, group, kQueryRows); });
  const AttentionSegment seg = p.segments[at.segment];
  const int kv_head = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t first = at.local * kQueryRows, end = min(first + kQueryRows, seg.count * group);
  // Query vector m of the segment is row m / group, query head kv_head * group + m % group.
  const int64_t head0 = int64_t(kv_head) * group;
  const int64_t kv_end = seg.pos0 + (end - 1) / group + 1;  // keys the last row sees
  const int64_t unmasked_through = seg.pos0 + first / group;  // keys every row sees
  const int64_t kv_width = int64_t(p.kv_heads) * p.d;

  clear_padding<D, T>(stages, p.stages, p.d);
  for (int i = threadIdx.x; i < kQueryRows * D; i += blockDim.x) {
    const int r = i / D, c = i % D;
    const int64_t m = first + r;
    float x = 0.0f;
    if (m < end && c < p.d) x = p.q[(seg.row + m / group) * p.q_stride + (head0 + m % group) * p.d + c];
    const int at = L::offset(kQueryRows, r, c);
    store_query<O>(x, q_high + at, q_low + at);
  }

  // This lane's two rows; rows past the segment borrow the last row's limit and are not written.
  int64_t limit[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t m = min(first + warp * 16 + (lane >> 2) + 8 * r, end - 1);
    limit[r] = seg.pos0 + m / group;
  }
  RowState<D> state;
  state.clear();
  using Folded = FoldedState<D, T == Tiles::kSwizzled ? W * 32 : 0>;
  Folded folded = [&] {
    if constexpr (T == Tiles::kSwizzled)
      return Folded(reinterpret_cast<float*>(stages + p.stages * kStageElements) + threadIdx.x);
    else
      return Folded();
  }();

  // All the keys the tile's rows see, chunk by chunk, or one chunk of them (split).
  int64_t begin = 0, stop = kv_end;
  if (p.window > 0) {
    begin = (p.first_chunk + blockIdx.z) * p.chunk_keys;
    if (begin >= kv_end) return;  // no row of this tile has keys there: the whole CTA leaves
    stop = min(begin + p.chunk_keys, kv_end);
  }
  const uint16_t* my_q_high = q_high + warp * 16 * L::kRowElements;  // the pitched form's
  const uint16_t* my_q_low = q_low + warp * 16 * L::kRowElements;
  stream_kv<D, T>(seg, kv_width, int64_t(kv_head) * p.d, p.d, begin, stop, stages, p.stages,
                  [&](const uint16_t* keys, const uint16_t* values, int64_t t0) {
                    if constexpr (D <= kMaxChunkedHeadDim)
                      if (t0 != begin && t0 % p.chunk_keys == 0) folded.fold(state);
                    const bool masked = t0 + kKeys - 1 > unmasked_through;
                    if constexpr (T == Tiles::kSwizzled)
                      attend_tile_warpgroup<D>(shared_address(q_high) + warp / 4 * 64 * kSwizzleRowBytes,
                                               kQueryRows * kSwizzleRowBytes, shared_address(keys),
                                               shared_address(values), t0, masked, limit, p.scale_log2, state);
                    else
                      attend_tile<D, kKeys / 8, O>(my_q_high, my_q_low, keys, values, p.d, t0, masked, limit,
                                                   p.scale_log2, state);
                  });
  folded.fold(state);

  const int g = lane >> 2, t = lane & 3;
  const int64_t vector0 = (p.work_items - 1 - blockIdx.x) * kQueryRows;  // the tile's first slot in the partials
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t m = first + warp * 16 + g + 8 * r;
    if (m >= end) continue;
    if (p.window > 0) {
      // This chunk's state, for fold_kernel.
      const int64_t slot = (int64_t(blockIdx.z) * p.kv_heads + kv_head) * p.work_items * kQueryRows + vector0 +
                           warp * 16 + g + 8 * r;
      if (t == 0) {
        p.partial_stats[2 * slot] = folded.max[r];
        p.partial_stats[2 * slot + 1] = folded.sum[r];
      }
      float* acc = p.partial_acc + slot * p.d;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const int c = n * 8 + 2 * t;
        if (c >= p.d) break;
        acc[c] = folded.acc(n, 2 * r);
        acc[c + 1] = folded.acc(n, 2 * r + 1);
      }
      continue;
    }
    const float inverse = 1.0f / folded.sum[r];
    float* out = p.out + (seg.row + m / group) * p.out_stride + (head0 + m % group) * p.d;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int c = n * 8 + 2 * t;
      if (c >= p.d) break;
      out[c] = folded.acc(n, 2 * r) * inverse;
      out[c + 1] = folded.acc(n, 2 * r + 1) * inverse;
    }
  }
}

// One CTA per (prefill tile, kv head) of a split launch, a thread per (query vector, column):
// folds the window's chunk states into the state of the chunks before them, left to right with
// the prefill kernel's functions, up to the row's last chunk. A row whose last chunk is in the
// window gets its output; the others keep the folded state for the next window.
template <int W>
__global__ void __launch_bounds__(256) fold_kernel(AttendParams p) {
  constexpr int kQueryRows = 16 * W;
  const int group = p.group;
  const int64_t item = p.work_items - 1 - blockIdx.x;
  const Located at = locate(p.segments, p.segment_count, item,
                            [group](const AttentionSegment& s) { return prefill_tiles(s.count, group, kQueryRows); });
  const AttentionSegment seg = p.segments[at.segment];
  const int kv_head = blockIdx.y;
  const int64_t first = at.local * kQueryRows, end = min(first + kQueryRows, seg.count * group);
  const int64_t vectors = p.work_items * kQueryRows, head0 = int64_t(kv_head) * group;
  // Every column's thread of a row reads the row's folded max and sum, so each window writes them
  // to the other of two copies: one thread's store cannot overtake another's load.
  const int64_t round = p.first_chunk / p.window, copy = p.kv_heads * vectors * 2;
  const float* stats_in = p.folded_stats + ((round + 1) % 2) * copy;
  float* stats_out = p.folded_stats + (round % 2) * copy;
  for (int i = threadIdx.x; i < kQueryRows * p.d; i += blockDim.x) {
    const int r = i / p.d, c = i % p.d;
    const int64_t m = first + r;
    if (m >= end) break;
    const int64_t last_chunk = (seg.pos0 + m / group) / p.chunk_keys;
    if (last_chunk < p.first_chunk) continue;  // folded in an earlier window
    const int64_t slot = int64_t(kv_head) * vectors + item * kQueryRows + r;
    float max = -INFINITY, sum = 0.0f, acc = 0.0f;
    if (p.first_chunk > 0) {
      max = stats_in[2 * slot];
      sum = stats_in[2 * slot + 1];
      acc = p.folded_acc[slot * p.d + c];
    }
    const int64_t stop = min(last_chunk + 1, p.first_chunk + p.window);
    for (int64_t j = p.first_chunk; j < stop; ++j) {
      const int64_t part = ((j - p.first_chunk) * p.kv_heads + kv_head) * vectors + item * kQueryRows + r;
      const FoldWeights w = fold_weights(max, sum, p.partial_stats[2 * part], p.partial_stats[2 * part + 1]);
      acc = fold_value(acc, p.partial_acc[part * p.d + c], w);
    }
    if (stop == last_chunk + 1) {
      p.out[(seg.row + m / group) * p.out_stride + (head0 + m % group) * p.d + c] = acc * (1.0f / sum);
    } else {
      p.folded_acc[slot * p.d + c] = acc;  // this thread's own element
      if (c == 0) {  // every column's thread has the same max and sum
        stats_out[2 * slot] = max;
        stats_out[2 * slot + 1] = sum;
      }
    }
  }
}

// --- Decode ---------------------------------------------------------------------------------

// One CTA per (split, kv head, block of 16 query heads of the group). Each K/V tile of kKeys rows
// is shared out 16 keys per warp; the warps' states merge at the end into the split's partial.
template <int D, Operands O>
__global__ void __launch_bounds__(Geometry<D>::kDecodeWarps * 32) decode_kernel(AttendParams p) {
  using G = Geometry<D>;
  constexpr int P = G::kPitch, kKeys = G::kKeys, kWarps = G::kDecodeWarps;
  extern __shared__ __align__(16) uint16_t shared[];
  uint16_t* q_high = shared;
  uint16_t* q_low = q_high + 16 * P;  // split operands only
  uint16_t* stages = q_high + query_parts(O) * 16 * P;

  const Located at = locate(p.segments, p.segment_count, blockIdx.x,
                            [](const AttentionSegment& s) { return decode_slots(s); });
  const AttentionSegment seg = p.segments[at.segment];
  if (at.local >= decode_splits(seg.pos0 + 1)) return;  // a slot this length does not use: the whole CTA leaves
  const int kv_head = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t keys_total = seg.pos0 + 1, split_keys = decode_split_keys(keys_total);
  const int64_t begin = at.local * split_keys, end = min(begin + split_keys, keys_total);
  const int first_head = blockIdx.z * 16, heads_here = min(16, p.group - first_head);
  const int64_t head0 = int64_t(kv_head) * p.group + first_head;
  const int64_t kv_width = int64_t(p.kv_heads) * p.d;

  clear_padding<D>(stages, 2, p.d);
  for (int i = threadIdx.x; i < 16 * D; i += blockDim.x) {
    const int r = i / D, c = i % D;
    float x = 0.0f;
    if (r < heads_here && c < p.d) x = p.q[seg.row * p.q_stride + (head0 + r) * p.d + c];
    store_query<O>(x, q_high + r * P + c, q_low + r * P + c);
  }
  const int64_t limit[2] = {end - 1, end - 1};
  RowState<D> state;
  state.clear();

  // Warp w takes keys 16w..16w+15 of every tile.
  stream_kv<D>(seg, kv_width, int64_t(kv_head) * p.d, p.d, begin, end, stages, 2,
               [&](const uint16_t* keys, const uint16_t* values, int64_t t0) {
                 attend_tile<D, 2, O>(q_high, q_low, keys + warp * 16 * P, values + warp * 16 * P, p.d,
                                      t0 + warp * 16, t0 + kKeys > end, limit, p.scale_log2, state);
               });

  // Merge the warps in a fixed order. The stages are free now (stream_kv ended on a barrier).
  float* merged_acc = reinterpret_cast<float*>(stages);  // [warp][16][D]
  float* merged_max = merged_acc + kWarps * 16 * D;     // [warp][16]
  float* merged_sum = merged_max + kWarps * 16;
  float* merged_weight = merged_sum + kWarps * 16;       // [warp][16]: 2^(warp max - row max)
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    const float sum = quad_sum(state.sum[r]);
    if (t == 0) {
      merged_max[warp * 16 + row] = state.max[r];
      merged_sum[warp * 16 + row] = sum;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      float* dst = merged_acc + (warp * 16 + row) * D + n * 8 + 2 * t;
      dst[0] = state.acc[n][2 * r];
      dst[1] = state.acc[n][2 * r + 1];
    }
  }
  __syncthreads();
  const int64_t split = at.before + at.local;
  // Once per row: the warps' weights, and the split's max and sum.
  if (threadIdx.x < heads_here) {
    const int row = threadIdx.x;
    float max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) max = fmaxf(max, merged_max[w * 16 + row]);
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      // A warp whose keys were all past the end has max -inf and weighs zero.
      const float weight = exp2f(merged_max[w * 16 + row] - max);
      merged_weight[w * 16 + row] = weight;
      sum += weight * merged_sum[w * 16 + row];
    }
    const int64_t slot = (head0 + row) * p.work_items + split;
    p.partial_stats[2 * slot] = max;
    p.partial_stats[2 * slot + 1] = sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < heads_here * p.d; i += blockDim.x) {
    const int row = i / p.d, c = i % p.d;
    float acc = 0.0f;
    for (int w = 0; w < kWarps; ++w) acc += merged_weight[w * 16 + row] * merged_acc[(w * 16 + row) * D + c];
    p.partial_acc[((head0 + row) * p.work_items + split) * p.d + c] = acc;
  }
}

// One CTA per (decode row, query head): out = sum_s w_s acc_s / sum_s w_s sum_s with
// w_s = 2^(max_s - max), computed once per split into shared memory (kCombineChunk at a time).
// Warp w takes splits w, w + 8, ...; the warps then add up in order.
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(AttendParams p) {
  const Located at = locate(p.segments, p.segment_count, blockIdx.x,
                            [](const AttentionSegment& s) -> int64_t { return s.count == 1; });
  const int64_t first_split = work_before(p.segments, at.segment, [](const AttentionSegment& s) { return decode_slots(s); });
  const AttentionSegment seg = p.segments[at.segment];
  const int64_t splits = decode_splits(seg.pos0 + 1), head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, d = p.d;
  const float* stats = p.partial_stats + 2 * (head * p.work_items + first_split);
  const float* acc = p.partial_acc + (head * p.work_items + first_split) * d;

  __shared__ float warp_max[kCombineWarps];
  __shared__ float warp_sum[kCombineWarps];
  __shared__ __align__(16) float warp_acc[kCombineWarps][kMaxHeadDim];
  __shared__ float split_weight[kCombineChunk];
  float max = -INFINITY;
  for (int64_t s = threadIdx.x; s < splits; s += blockDim.x) max = fmaxf(max, stats[2 * s]);
  for (int offset = 16; offset > 0; offset >>= 1) max = fmaxf(max, __shfl_xor_sync(kFullWarp, max, offset));
  if (lane == 0) warp_max[warp] = max;
  __syncthreads();
  for (int w = 0; w < kCombineWarps; ++w) max = fmaxf(max, warp_max[w]);

  // Lane l owns columns 4l.. and 4(l + 32).. (d is a multiple of 8, so rows are 32-byte aligned).
  float4 part[2] = {make_float4(0, 0, 0, 0), make_float4(0, 0, 0, 0)};
  float sum = 0.0f;
  const int quads = d / 4;
  for (int64_t chunk = 0; chunk < splits; chunk += kCombineChunk) {
    const int here = int(min(int64_t(kCombineChunk), splits - chunk));
    for (int i = threadIdx.x; i < here; i += blockDim.x) split_weight[i] = exp2f(stats[2 * (chunk + i)] - max);
    __syncthreads();
    // Chunks start at multiples of kCombineWarps, so split s stays with warp s % kCombineWarps.
    for (int i = warp; i < here; i += kCombineWarps) {
      const int64_t s = chunk + i;
      const float weight = split_weight[i];
      sum += weight * stats[2 * s + 1];
      const float4* row = reinterpret_cast<const float4*>(acc + s * d);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c4 = lane + 32 * h;
        if (c4 >= quads) break;
        const float4 x = row[c4];
        part[h].x += weight * x.x;
        part[h].y += weight * x.y;
        part[h].z += weight * x.z;
        part[h].w += weight * x.w;
      }
    }
    __syncthreads();  // the next chunk overwrites the weights
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c4 = lane + 32 * h;
    if (c4 < quads) reinterpret_cast<float4*>(warp_acc[warp])[c4] = part[h];
  }
  if (lane == 0) warp_sum[warp] = sum;
  __syncthreads();
  float total_sum = 0.0f;
  for (int w = 0; w < kCombineWarps; ++w) total_sum += warp_sum[w];
  const float inverse = 1.0f / total_sum;
  float* out = p.out + seg.row * p.out_stride + head * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float total = 0.0f;
    for (int w = 0; w < kCombineWarps; ++w) total += warp_acc[w][c];
    out[c] = total * inverse;
  }
}

// --- Host side ------------------------------------------------------------------------------

struct StepShape {
  int64_t rows = 0, decode_rows = 0, decode_slots = 0;
  PrefillPlan prefill;
};

template <int D, Operands O, int W, Tiles T = Tiles::kPitched>
void launch_prefill(const AttendParams& base, const PrefillPlan& plan, const AttentionArgs& a, Device& device,
                    cudaStream_t stream) {
  const size_t bytes =
      T == Tiles::kSwizzled ? warpgroup_prefill_bytes(plan.stages) : Geometry<D>::prefill_bytes(O, W, plan.stages);
  // The tiles need more than the default 48 KB of shared memory.
  device.allow_shared_memory<prefill_kernel<D, O, W, T>>(bytes);
  AttendParams p = base;
  p.work_items = plan.ctas;
  p.stages = plan.stages;
  if (plan.window == 0) {
    prefill_kernel<D, O, W, T><<<dim3(unsigned(plan.ctas), unsigned(a.kv_heads)), W * 32, bytes, stream>>>(p);
    M1_CUDA_CHECK_LAUNCH();
    return;
  }
  p.window = plan.window;
  for (p.first_chunk = 0; p.first_chunk < plan.chunks; p.first_chunk += plan.window) {
    prefill_kernel<D, O, W, T>
        <<<dim3(unsigned(plan.ctas), unsigned(a.kv_heads), unsigned(plan.window)), W * 32, bytes, stream>>>(p);
    M1_CUDA_CHECK_LAUNCH();
    fold_kernel<W><<<dim3(unsigned(plan.ctas), unsigned(a.kv_heads)), 256, 0, stream>>>(p);
    M1_CUDA_CHECK_LAUNCH();
  }
}

// Query vectors of a split prefill launch over all kv heads: each has a state (d accumulated
// values, its max and sum) per chunk of the window, and a folded one.
int64_t split_vectors(int64_t kv_heads, int64_t ctas, int warps) { return kv_heads * ctas * 16 * warps; }

// Scratch of a step: the decode rows' split partials, and a split prefill's chunk states (a
// window's) and folded states.
struct AttentionScratch {
  float *decode_acc, *decode_stats, *chunk_acc, *chunk_stats, *folded_acc, *folded_stats;
};
AttentionScratch carve_attention_scratch(DeviceScratch& scratch, const StepShape& shape, const AttentionArgs& a) {
  const int64_t vectors =
      shape.prefill.window > 0 ? split_vectors(a.kv_heads, shape.prefill.ctas, shape.prefill.warps) : 0;
  return carve_scratch(scratch, [&](ScratchCarver& c) {
    AttentionScratch s;
    s.decode_acc = c.take<float>(a.heads * shape.decode_slots * a.d);
    s.decode_stats = c.take<float>(a.heads * shape.decode_slots * 2);
    s.chunk_acc = c.take<float>(shape.prefill.window * vectors * a.d);
    s.chunk_stats = c.take<float>(shape.prefill.window * vectors * 2);
    s.folded_acc = c.take<float>(vectors * a.d);
    s.folded_stats = c.take<float>(2 * vectors * 2);  // two copies (fold_kernel)
    return s;
  });
}

template <int D, Operands O>
void launch_attention(const AttendParams& base, const StepShape& shape, const AttentionArgs& a,
                      DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  using G = Geometry<D>;
  device.allow_shared_memory<decode_kernel<D, O>>(G::decode_bytes(O));
  const AttentionScratch s = carve_attention_scratch(scratch, shape, a);
  if (shape.prefill.ctas > 0) {
    AttendParams p = base;
    p.partial_acc = s.chunk_acc;
    p.partial_stats = s.chunk_stats;
    p.folded_acc = s.folded_acc;
    p.folded_stats = s.folded_stats;
    if (shape.prefill.warpgroup) {
      if constexpr (D == kWarpgroupPrefillDim && O == Operands::kRounded)
        launch_prefill<D, O, kWarpgroupPrefillWarps, Tiles::kSwizzled>(p, shape.prefill, a, device, stream);
      else
        fail("softmax attention: the warpgroup prefill takes fast precision at head dims 65 to 128, not {}", a.d);
    } else if (shape.prefill.warps == kNarrowPrefillWarps) {
      launch_prefill<D, O, kNarrowPrefillWarps>(p, shape.prefill, a, device, stream);
    } else {
      launch_prefill<D, O, prefill_warps(O)>(p, shape.prefill, a, device, stream);
    }
  }
  if (shape.decode_rows > 0) {
    AttendParams p = base;
    p.work_items = shape.decode_slots;
    p.partial_acc = s.decode_acc;
    p.partial_stats = s.decode_stats;
    const unsigned head_blocks = unsigned(ceil_div(a.heads / a.kv_heads, 16));
    decode_kernel<D, O><<<dim3(unsigned(shape.decode_slots), unsigned(a.kv_heads), head_blocks),
                          G::kDecodeWarps * 32, G::decode_bytes(O), stream>>>(p);
    M1_CUDA_CHECK_LAUNCH();
    combine_kernel<<<dim3(unsigned(shape.decode_rows), unsigned(a.heads)), kCombineWarps * 32, 0, stream>>>(p);
    M1_CUDA_CHECK_LAUNCH();
  }
}

template <Operands O>
void launch_for_head_dim(const AttendParams& base, const StepShape& shape, const AttentionArgs& a,
                         DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (a.d <= 64)
    launch_attention<64, O>(base, shape, a, scratch, device, stream);
  else if (a.d <= 128)
    launch_attention<128, O>(base, shape, a, scratch, device, stream);
  else
    launch_attention<256, O>(base, shape, a, scratch, device, stream);
}

// Shared memory of a prefill CTA for head dim d.
size_t prefill_shared_bytes(int64_t d, Operands o, int warps, int stages, bool warpgroup) {
  if (warpgroup) return warpgroup_prefill_bytes(stages);
  if (d <= 64) return Geometry<64>::prefill_bytes(o, warps, stages);
  if (d <= 128) return Geometry<128>::prefill_bytes(o, warps, stages);
  return Geometry<256>::prefill_bytes(o, warps, stages);
}

}  // namespace

PrefillPlan plan_prefill(std::span<const AttentionSegment> segments, int64_t heads, int64_t kv_heads, int64_t d,
                         bool bf16_operands, const DeviceLimits& limits, const PrefillChoices& choices) {
  if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0)
    fail("softmax attention: {} query heads do not split into {} kv heads", heads, kv_heads);
  const int64_t chunk_keys = choices.chunk_keys == 0 ? kPrefillChunkKeys : choices.chunk_keys;
  if (chunk_keys <= 0 || chunk_keys % 64 != 0)
    fail("softmax attention: chunks of {} keys requested (a positive multiple of 64)", chunk_keys);
  if (choices.split < -1) fail("softmax attention: split of {} chunks per launch requested (-1, 0 or more)", choices.split);
  if (choices.split > 0 && d > kMaxChunkedHeadDim)
    fail("softmax attention: a split prefill needs a head dim of at most {}, not {}", kMaxChunkedHeadDim, d);
  const Operands o = bf16_operands ? Operands::kRounded : Operands::kSplit;
  const int64_t group = heads / kv_heads, width = prefill_warps(o);
  int64_t wide = 0, narrow = 0, chunks = 0;
  for (const AttentionSegment& s : segments) {
    wide += prefill_tiles(s.count, group, 16 * width);
    narrow += prefill_tiles(s.count, group, 16 * kNarrowPrefillWarps);
    if (s.count > 1) chunks = std::max(chunks, d <= kMaxChunkedHeadDim ? (s.pos0 + s.count - 1) / chunk_keys + 1 : 1);
  }
  PrefillPlan plan;
  plan.chunk_keys = chunk_keys;
  if (wide == 0) return plan;
  plan.chunks = chunks;
  const bool few = wide * kv_heads < limits.sms;
  if (choices.split > 0) {
    plan.window = choices.split;
  } else if (choices.split == 0 && few && chunks > 1) {
    // Enough (tile, chunk) CTAs for two rounds of the SMs, as far as the scratch budget holds a
    // window's chunk states beside the folded ones; fewer than two chunks a launch is not a split.
    const size_t chunk_bytes = size_t(split_vectors(kv_heads, wide, int(width)) * (d + 2)) * sizeof(float);
    const int64_t room = int64_t(limits.partial_bytes / std::max<size_t>(chunk_bytes, 1)) - 1;
    const int64_t window = std::min({chunks, ceil_div(2 * int64_t(limits.sms), wide * kv_heads), room});
    if (window >= 2) plan.window = window;
  }
  const bool narrowed = plan.window == 0 && few && narrow <= INT32_MAX;
  plan.warps = narrowed ? kNarrowPrefillWarps : width;
  plan.ctas = narrowed ? narrow : wide;
  plan.warpgroup = limits.warpgroup_attention && o == Operands::kRounded && plan.warps == kWarpgroupPrefillWarps &&
                   d > kWarpgroupPrefillDim / 2 && d <= kWarpgroupPrefillDim;
  if (plan.window > 65535)
    fail("softmax attention: split of {} chunks per launch exceeds the grid limit 65535", plan.window);
  const int stages = choices.kv_stages;
  if (stages == 0) {
    // Fast wide CTAs hold their SM by registers (ptxas, sm_90, with the folded state: 167, 237 and
    // 206 at d = 64, 128 and 256: one CTA of 256 threads), so a third stage costs them no
    // occupancy; the narrow and the exact CTAs share an SM by shared memory, and would lose CTAs
    // to it.
    const bool third = o == Operands::kRounded && plan.warps == width &&
                       prefill_shared_bytes(d, o, plan.warps, 3, plan.warpgroup) <=
                           size_t(std::max(limits.shared_per_block, 0));
    plan.stages = third ? 3 : 2;
  } else {
    if (stages != 2 && stages != 3) fail("softmax attention: {} K/V stages requested (2 or 3)", stages);
    const size_t bytes = prefill_shared_bytes(d, o, plan.warps, stages, plan.warpgroup);
    if (bytes > size_t(std::max(limits.shared_per_block, 0)))
      fail("softmax attention: {} K/V stages need {} bytes of shared memory per block, the GPU allows {}", stages,
           bytes, limits.shared_per_block);
    plan.stages = stages;
  }
  return plan;
}

void softmax_attention(const AttentionArgs& a, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (a.heads <= 0 || a.kv_heads <= 0 || a.heads % a.kv_heads != 0)
    fail("softmax attention: {} query heads do not split into {} kv heads", a.heads, a.kv_heads);
  if (a.d <= 0 || a.d > kMaxHeadDim || a.d % 8 != 0)
    fail("softmax attention: head dim {} unsupported (a multiple of 8, at most {})", a.d, kMaxHeadDim);
  if (a.rotary_dim < 0 || a.rotary_dim > a.d || a.rotary_dim % 2 != 0)
    fail("softmax attention: rotary dim {} must be even and at most the head dim {}", a.rotary_dim, a.d);
  if (a.heads > 65535) fail("softmax attention: {} query heads exceed the grid limit 65535", a.heads);
  if (a.segments.size() > size_t(INT32_MAX)) fail("softmax attention: too many segments ({})", a.segments.size());
  const int64_t group = a.heads / a.kv_heads;
  const Operands operands = a.bf16_operands ? Operands::kRounded : Operands::kSplit;
  StepShape shape;
  for (const AttentionSegment& s : a.segments) {
    if (s.count < 0 || s.pos0 < 0) fail("softmax attention: segment with count {} at position {}", s.count, s.pos0);
    if (s.capacity != 0 && s.capacity < s.pos0 + s.count)
      fail("softmax attention: capacity {} is less than the {} rows of the segment's cache", s.capacity, s.pos0 + s.count);
    if (s.count > 0 && (!s.keys || !s.values)) fail("softmax attention: segment without a KV cache");
    // The cache is read in 16-byte pieces.
    if (!aligned16(s.keys) || !aligned16(s.values))
      fail("softmax attention: KV cache not 16-byte aligned");
    shape.rows += s.count;
    if (s.count == 1) {
      ++shape.decode_rows;
      shape.decode_slots += decode_slots(s);
    }
  }
  if (shape.rows == 0) return;
  shape.prefill = plan_prefill(a.segments, a.heads, a.kv_heads, a.d, a.bf16_operands, device.limits(), a.prefill);
  if (shape.rows > INT32_MAX || shape.prefill.ctas > INT32_MAX || shape.decode_slots > INT32_MAX)
    fail("softmax attention: step of {} rows too large for one launch", shape.rows);
  const int segment_count = int(a.segments.size());

  RopeParams rope{a.q, a.q_stride, a.k, a.k_stride, a.v, a.v_stride, int(a.heads), int(a.kv_heads), int(a.d),
                  int(a.rotary_dim), a.rope_theta, a.device_segments, segment_count};
  rope_append_kernel<<<unsigned(shape.rows), kRopeThreads, 0, stream>>>(rope);
  M1_CUDA_CHECK_LAUNCH();

  AttendParams base{};
  base.q = a.q;
  base.q_stride = a.q_stride;
  base.out = a.out;
  base.out_stride = a.out_stride;
  base.kv_heads = int(a.kv_heads);
  base.group = int(group);
  base.d = int(a.d);
  base.scale_log2 = kLog2e / std::sqrt(float(a.d));
  base.segments = a.device_segments;
  base.segment_count = segment_count;
  base.chunk_keys = shape.prefill.chunk_keys;
  if (operands == Operands::kRounded)
    launch_for_head_dim<Operands::kRounded>(base, shape, a, scratch, device, stream);
  else
    launch_for_head_dim<Operands::kSplit>(base, shape, a, scratch, device, stream);
}

}  // namespace m1::cuda
