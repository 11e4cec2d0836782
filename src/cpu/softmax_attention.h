#pragma once
// Softmax attention pieces of one sequence: partial NeoX RoPE, and causal attention of query
// rows against the KV cache (scale 1/sqrt(d)).

#include <cstdint>
#include <vector>

#include "m1/backend.h"

namespace m1::cpu {

// Rotates the first r dims of every head of `rows` rows of x in place (dim j pairs with
// j + r/2), row i being at position pos0 + i. Angles are computed in double.
void apply_rope(float* x, int64_t rows, int64_t stride, int64_t heads, int64_t d, int64_t rotary_dim,
                double theta, int64_t pos0);

// The query heads that share one key/value head (grouped-query attention), for `count` query
// rows of one sequence at positions pos0..: row i attends to cache rows [0, pos0 + i].
struct AttentionGroup {
  const float* q;      // row i, head h of the group at q + i * q_stride + h * d
  int64_t q_stride;
  int64_t heads;       // query heads in the group
  const float* keys;   // cache row t of the group's keys at keys + t * kv_stride
  const float* values;
  int64_t kv_stride;
  float* out;          // laid out like q
  int64_t out_stride;
  int64_t count, pos0, d;
};

// Reused buffers of one thread.
struct AttentionScratch {
  std::vector<float> q, keys_t, scores, partial, acc, max, sum, rescale;
};

// Flash-style: for each tile of keys at fixed absolute positions, scores of every query vector of
// the group against the tile, then the weighted values, both as register-tiled matrix products,
// folded into running online-softmax sums. A row's result does not depend on how the prompt was
// chunked or which rows share its block.
void attention_group(const AttentionGroup& g, AttentionScratch& scratch);
// The oracle: double accumulation, plain two-pass softmax, head by head.
void attention_group_reference(const AttentionGroup& g);

}  // namespace m1::cpu
