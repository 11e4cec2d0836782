#pragma once
// Token sampling on the GPU, the device twin of m1::sample_row (src/sampler.cpp): logit biases,
// penalties, the allowed-token mask of a grammar, temperature, top-k, top-p, min-p and the
// inverse-CDF draw, plus the raw log-probabilities the API reports, so only token ids and a few
// numbers per draw cross to the host.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

#include "device.h"

#include "device_scratch.h"
#include "m1/sampler.h"

namespace m1::cuda {

// One draw from one row of the logits, as m1::DrawRequest describes it. Several draws may read
// the same row (the n choices of one prompt); each sees the row as it was, penalties its own.
struct DeviceDraw {
  int64_t row = 0;
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;
  float min_p = 0.0f;
  int32_t top_k = 0;
  int32_t top_logprobs = 0;  // 0..kMaxTopLogprobs
  double uniform = 0.0;      // in [0, 1)
  float presence_penalty = 0.0f, frequency_penalty = 0.0f, repetition_penalty = 1.0f;
  // Ranges of the penalty lists below: seen ids [seen_begin, seen_begin + seen_count) and
  // generated (id, count) pairs [counts_begin, counts_begin + counts_count). Ids are < vocab
  // (the host checks).
  int64_t seen_begin = 0, seen_count = 0;
  int64_t counts_begin = 0, counts_count = 0;
  // The draw's biases [bias_begin, bias_begin + bias_count) of SampleArgs::biases, sorted by id.
  int64_t bias_begin = 0, bias_count = 0;
  // Where its mask starts in SampleArgs::allowed (ceil(vocab / 32) words), or -1 for none.
  int64_t allowed_begin = -1;
};

enum DrawStatus : int32_t { kDrawOk = 0, kDrawNan = 1, kDrawAllMasked = 2, kDrawPositiveInf = 3, kDrawNothingAllowed = 4 };

// The error a draw with a failed status reports, in m1::sample_row's words.
const char* draw_status_message(int32_t status);

struct DrawResult {
  int32_t status = kDrawOk;  // anything else: the row has no distribution, the rest is unset
  int32_t id = -1;
  float logprob = 0.0f;       // of id under the raw logits
  int32_t top_count = 0;      // alternatives filled, best first (masked tokens left out)
  int32_t top_ids[kMaxTopLogprobs];
  float top_logprobs[kMaxTopLogprobs];
};

struct SampleArgs {
  const float* logits = nullptr;  // device: [rows, vocab]
  int64_t vocab = 0;
  std::span<const DeviceDraw> draws;             // host copy: sizes the launch
  const DeviceDraw* device_draws = nullptr;      // the same in device memory
  const int32_t* seen = nullptr;                 // device: every draw's sorted unique seen ids
  const int32_t* generated_counts = nullptr;     // device: every draw's sorted (id, count) pairs, interleaved
  const TokenBias* biases = nullptr;             // device: every draw's biases
  const uint32_t* allowed = nullptr;             // device: every masked draw's allowed-token words
  DrawResult* results = nullptr;                 // device: one per draw
};

// Queues the draws on `stream` (no host synchronisation once `scratch` has grown to the batch):
// `scratch` holds every draw's per-chunk partial results and the selection's rows of ids.
void sample(const SampleArgs& args, DeviceScratch& scratch, Device& device, cudaStream_t stream);

}  // namespace m1::cuda
