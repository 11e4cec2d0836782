#pragma once
// Causal grouped-query softmax attention on the GPU (DESIGN.md §1): partial NeoX RoPE on q and k,
// this step's k and v appended to each sequence's bf16 KV cache, then flash-style attention
// (online softmax) for prefill rows and split-K attention over the cache for decode rows.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

#include "device.h"

#include "device_scratch.h"

namespace m1::cuda {

// One sequence's rows [row, row + count) at positions [pos0, pos0 + count). keys/values: this
// layer's cache, row t = kv_heads * d bf16 values (stored as raw uint16_t), with room for at
// least pos0 + count rows; rows [0, pos0) already hold the earlier tokens. `capacity` (0: just
// pos0 + count) sizes a decode row's share of the launch instead of its length, so that the same
// launch serves every length up to it (a decode step replayed as a CUDA graph).
struct AttentionSegment {
  int64_t row = 0, count = 0, pos0 = 0;
  uint16_t* keys = nullptr;
  uint16_t* values = nullptr;
  int64_t capacity = 0;
};

// Prefill choices a caller may force; zeros leave them to plan_prefill. The bits depend only on
// chunk_keys.
struct PrefillChoices {
  // K/V tiles each prefill CTA keeps in flight plus the one in use: 2 or 3 (more than the GPU's
  // shared memory allows fails).
  int kv_stages = 0;
  // Keys per chunk (a positive multiple of 64); 0: kPrefillChunkKeys. Tests shrink it to reach
  // several chunks at small depths.
  int64_t chunk_keys = 0;
  // Chunks per split launch: N > 0 splits with windows of N chunks, -1 never splits.
  int64_t split = 0;
};

struct AttentionArgs {
  float* q = nullptr;  // [rows, heads * d], rotated in place
  int64_t q_stride = 0;
  float* k = nullptr;  // [rows, kv_heads * d], rotated in place
  int64_t k_stride = 0;
  const float* v = nullptr;  // [rows, kv_heads * d]
  int64_t v_stride = 0;
  float* out = nullptr;  // [rows, heads * d]
  int64_t out_stride = 0;
  int64_t heads = 0, kv_heads = 0, d = 0, rotary_dim = 0;
  double rope_theta = 0;
  std::span<const AttentionSegment> segments;       // host copy
  const AttentionSegment* device_segments = nullptr;  // the same descriptors in device memory
  // Whether q and the softmax weights may enter the products rounded to bf16 once (fp32
  // accumulation, softmax in fp32): the fast precision of DESIGN.md §4. False carries each as a
  // bf16 high part and remainder, two products each, for fp32-grade results.
  bool bf16_operands = false;
  // What a caller may force in the prefill plan (benchmarks and tests): see PrefillChoices.
  PrefillChoices prefill = {};
};

// Keys per chunk of a prefill row's online softmax: a row's keys are cut at absolute positions
// 0, kPrefillChunkKeys, ..., each chunk's softmax runs from a fresh state, and the chunks' states
// fold left to right. A row within one chunk gets the bits of one softmax over its keys; deeper
// rows' bits depend on the chunk size, and on nothing else of the step.
inline constexpr int64_t kPrefillChunkKeys = 4096;
// Head dims above this take one chunk of any length: the folded state would not fit a CTA's
// registers beside the running one (ptxas, sm_90: d = 256 spills).
inline constexpr int64_t kMaxChunkedHeadDim = 128;

// How a step's prefill rows are cut: per kv head `ctas` CTAs of `warps` warps (16 query vectors
// each), each streaming its keys through `stages` shared K/V tiles. Narrow CTAs (2 warps) when the
// full width (8 warps fast, 4 exact) would leave SMs idle and rows are shallow; when they are
// deep, `window` > 0 splits their chunks over CTAs: ceil(chunks / window) launches of a CTA per
// (tile, chunk of the window), each followed by a fold of the window's chunk states (in
// scratch, within DeviceLimits::partial_bytes). 3 stages where they cost no occupancy. A row's
// bits depend on none of this. No prefill rows: ctas 0.
struct PrefillPlan {
  int warps = 0, stages = 0;
  int64_t ctas = 0;
  int64_t chunk_keys = 0;  // keys per chunk (kPrefillChunkKeys unless chosen)
  int64_t chunks = 0;      // the most chunks of any prefill row
  int64_t window = 0;      // chunks per split launch; 0: each CTA walks and folds all of its tile's
  // Fast wide CTAs at head dims 65..128 on a GPU with DeviceLimits::warpgroup_mma: the tiles'
  // products on the warpgroup tensor cores (wgmma), the same bits.
  bool warpgroup = false;
};
PrefillPlan plan_prefill(std::span<const AttentionSegment> segments, int64_t heads, int64_t kv_heads, int64_t d,
                         bool bf16_operands, const DeviceLimits& limits, const PrefillChoices& choices = {});

void softmax_attention(const AttentionArgs& args, DeviceScratch& scratch, Device& device, cudaStream_t stream);

}  // namespace m1::cuda
