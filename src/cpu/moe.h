#pragma once
// Mixture of experts on the CPU: softmax routing over the router logits in fp32, top-k,
// renormalised weights, SwiGLU experts, weighted sum in rank order.

#include <cstdint>
#include <vector>

#include "cpu/matmul.h"
#include "cpu/threadpool.h"
#include "m1/backend.h"

namespace m1::cpu {

// For each of n rows of `logits` [n, experts]: the top_k experts by probability (ties: lower
// index first) and their probabilities renormalised to sum 1, best first.
void route(const float* logits, int64_t n, int64_t experts, int64_t top_k, int32_t* chosen, float* weights);

// Buffers reused across steps so the step loop does not allocate once warm.
struct MoeScratch {
  std::vector<float> logits, weights, gathered, gate, up, down;
  std::vector<int32_t> chosen;  // per (token * top_k + rank) slot
  std::vector<int64_t> expert_begin, slot_at, position_of, fill;
  std::vector<MatmulJob> jobs;
};

// Tokens are grouped by expert so each expert's weights stream once per step. Routing is always
// fp32; `operands` sets those of the expert products. Of the experts a row chose, only those
// `w` holds add to its output (see MoeWeights::first_expert).
void moe(ThreadPool& pool, const Mat& x, const MoeWeights& w, Mat out, Operands operands, MoeScratch& scratch);
// The oracle: token by token, reference matrix products.
void moe_reference(const Mat& x, const MoeWeights& w, Mat out, Operands operands);

}  // namespace m1::cpu
