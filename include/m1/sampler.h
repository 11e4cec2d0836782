#pragma once
// Picks the next token from a row of logits: penalties, temperature, top-k, top-p, min-p, and a
// seeded random draw that gives the same tokens for the same seed on every machine.

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace m1 {

struct SamplingParams {
  float temperature = 1.0f;         // 0: greedy (argmax, lowest id on ties)
  float top_p = 1.0f;               // (0, 1]
  int top_k = 0;                    // 0: off
  float min_p = 0.0f;               // [0, 1]: drop tokens below min_p * p(max)
  float presence_penalty = 0.0f;    // OpenAI: logit -= presence * [count > 0], generated tokens
  float frequency_penalty = 0.0f;   // OpenAI: logit -= frequency * count, generated tokens
  float repetition_penalty = 1.0f;  // HF/vLLM: logit /= p if > 0 else *= p, prompt + generated
  uint64_t seed = 0;
  int top_logprobs = 0;             // how many alternatives to report (0..20)
};

// Throws m1::Error naming the first parameter out of range (e.g. "top_p must be in (0, 1]").
void validate(const SamplingParams& params);

struct SampledToken {
  int32_t id = -1;
  float logprob = 0.0f;                          // of `id` under the model's raw distribution
  std::vector<std::pair<int32_t, float>> top;    // top_logprobs best (id, logprob), best first;
                                                 // masked (-inf) tokens are left out
};

// One per sequence: owns the random stream and the token counts that penalties need.
class Sampler {
 public:
  Sampler(const SamplingParams& params, std::span<const int32_t> prompt);
  // Chooses a token from `logits` (one row, the full vocabulary); the row is used as scratch.
  // Log-probabilities are those of the raw logits (before penalties, temperature and
  // truncation), as OpenAI-compatible servers report them.
  SampledToken sample(std::span<float> logits);
  // Records a token as generated (sample() does this for its own choice).
  void accept(int32_t id);

 private:
  bool penalties_active() const;
  void apply_penalties(std::span<float> logits);
  float raw_logit(int32_t id, std::span<const float> logits) const;  // undoes apply_penalties
  int32_t draw(std::span<const float> logits);
  double next_uniform();

  SamplingParams params_;
  uint64_t rng_state_;
  std::vector<int32_t> seen_;            // sorted unique prompt + generated ids (repetition)
  std::vector<std::pair<int32_t, int32_t>> generated_counts_;  // sorted (id, count)
  std::vector<float> seen_raw_logits_;   // scratch: logits of seen_ before the penalties
  std::vector<float> weights_;           // scratch: exp((logit - max) / temperature) per token
  std::vector<int32_t> candidates_;      // scratch, reused across calls
};

}  // namespace m1
