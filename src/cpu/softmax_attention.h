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
  const void* keys;    // cache row t of the group's keys at element t * kv_stride, of kv_dtype
  const void* values;
  int64_t kv_stride;
  float* out;          // laid out like q
  int64_t out_stride;
  int64_t count, pos0, d;
  // Whether both products may round their operands to bf16 (fp32 accumulation, the softmax in
  // fp32): fast precision, where the CPU multiplies bf16 (bf16_products_available(), cpu/matmul.h).
  bool bf16_operands = false;
  // The cache's values: kF32, or kBF16 (raw bits; the fp32 form widens them as its products load
  // them, the bf16 form multiplies them as they are).
  DType kv_dtype = DType::kF32;
};

// Reused buffers of one thread.
struct AttentionScratch {
  std::vector<float> q, keys_t, scores, partial, rescale;
  std::vector<float> acc, max, sum;  // the bf16 form's running online-softmax state
  std::vector<float> folded, chunk;  // the fp32 form's chunk states (attention_chunk_state_floats)
  std::vector<uint32_t> qp, kr, vp, pp;  // the bf16 form's operands, as bf16 pairs

  // The bf16 form's online-softmax state: acc (queries x width) at zero, max at -inf, sum at zero.
  void start_running_sums(int64_t queries, int64_t width);
  // Each query vector's output: its accumulated values (rows `width` apart) over its weights' sum.
  void write_outputs(const AttentionGroup& g, int64_t width) const;
};

// Flash-style: for each tile of keys at fixed absolute positions, scores of every query vector of
// the group against the tile, then the weighted values, both as register-tiled matrix products,
// folded into running online-softmax sums. A row's result does not depend on how the prompt was
// chunked or which rows share its block.
//
// The fp32 form (every block in exact precision, and blocks of fewer than 16 query vectors, as a
// decode row's, in fast) walks the keys in chunks of kAttentionChunkKeys at absolute positions:
// each chunk's online softmax starts afresh, and a query's result folds the chunks' states left to
// right. So a deep row's chunks can be computed apart, on several threads, and folded after
// (attention_group_chunks, attention_fold_chunks) with the bits one task walking them gives. Rows
// that see one chunk's keys have the bits of a single pass.
void attention_group(const AttentionGroup& g, AttentionScratch& scratch);
constexpr int64_t kAttentionChunkKeys = 4096;
// The chunks of keys g's block walks in the fp32 form, and the floats one chunk's state takes
// (each query vector's max, then sums, then accumulated values: queries x (d + 2)).
int64_t attention_chunks(const AttentionGroup& g);
size_t attention_chunk_state_floats(const AttentionGroup& g);
// The fp32 form's states of chunks [first, end) of g's keys, chunk first + i at states + i *
// attention_chunk_state_floats(g). g.out is not written.
void attention_group_chunks(const AttentionGroup& g, int64_t first, int64_t end, AttentionScratch& scratch, float* states);
// Folds all attention_chunks(g) states (laid out as attention_group_chunks writes them) in order
// and writes g's outputs: the bits attention_group gives g in the fp32 form.
void attention_fold_chunks(const AttentionGroup& g, const float* states, AttentionScratch& scratch);
// The same with bf16 operands on AVX-512 BF16 (softmax_attention_bf16.cpp), which attention_group
// runs for blocks of at least 16 query vectors when g.bf16_operands is set and the CPU has it
// (fewer, as a decode row's, take the fp32 form). The same key tiles; each query vector's sums
// are its own lane's, so within this form a row gets the same bits alone or in any block.
void attention_group_bf16(const AttentionGroup& g, AttentionScratch& scratch);
// Whether attention_group takes the bf16 form for a block of `queries` query vectors.
bool attention_takes_bf16(int64_t queries, bool bf16_operands);
// The oracle: double accumulation, plain two-pass softmax, head by head.
void attention_group_reference(const AttentionGroup& g);

}  // namespace m1::cpu
