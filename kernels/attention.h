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
  // K/V tiles each prefill CTA keeps in flight plus the one in use: 0 takes plan_prefill's choice;
  // 2 or 3 force it (benchmarks compare them; the bits are the same).
  int kv_stages = 0;
};

// How a step's prefill rows are cut: per kv head `ctas` CTAs of `warps` warps (16 query vectors
// each), each streaming its keys through `stages` shared K/V tiles. Narrow CTAs (2 warps) when the
// full width (8 warps fast, 4 exact) would leave SMs idle; 3 stages where they cost no occupancy.
// A row's bits depend on neither. `stages` 0 chooses; 2 or 3 forces (more than the GPU's shared
// memory allows fails). No prefill rows: ctas 0.
struct PrefillPlan {
  int warps = 0, stages = 0;
  int64_t ctas = 0;
};
PrefillPlan plan_prefill(std::span<const AttentionSegment> segments, int64_t heads, int64_t kv_heads, int64_t d,
                         bool bf16_operands, const DeviceLimits& limits, int stages = 0);

void softmax_attention(const AttentionArgs& args, DeviceScratch& scratch, Device& device, cudaStream_t stream);

}  // namespace m1::cuda
