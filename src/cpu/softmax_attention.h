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

// One query head of one sequence: `count` query rows at positions pos0.. attend to cache rows
// [0, pos0 + i] of their key/value head.
struct AttentionHead {
  const float* q;
  int64_t q_stride;
  const float* keys;  // cache row t of this head's keys at keys + t * kv_stride
  const float* values;
  int64_t kv_stride;
  float* out;
  int64_t out_stride;
  int64_t count, pos0, d;
};

// scratch: reused scores buffer.
void attention_head(const AttentionHead& h, std::vector<float>& scratch);
// The oracle: double accumulation, plain two-pass softmax.
void attention_head_reference(const AttentionHead& h);

}  // namespace m1::cpu
