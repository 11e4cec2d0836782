#pragma once
// Picks the next token from a row of logits: penalties, temperature, top-k, top-p, min-p, and a
// seeded random draw that gives the same tokens for the same seed on every machine. A Sampler holds
// one sequence's state (random stream, token counts); the draw itself is a pure function of the row
// and a DrawRequest, so a backend can run it where the logits are (Backend::sample).

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace m1 {

// Constants of the draw, shared with the device sampler (kernels/sampling.cu), which must make the
// same choices bit for bit.
// top_p arrives as a float and the probabilities come from float logits, so a nucleus that reaches
// top_p within that rounding counts as reaching it: 0.5 + 0.3 reaches 0.8.
constexpr double kTopPSlack = 1e-6;
// The share of the mass a top-p draw keeps: top_p less the slack.
constexpr double top_p_fraction(float top_p) { return top_p * (1.0 - kTopPSlack); }

// Tokens with at least this weight relative to the best token's (about e^-16). When they already
// hold the top-p mass, the nucleus lies among them and the rest of the vocabulary is skipped.
constexpr float kNearTopWeight = 1e-7f;
constexpr int kMaxTopLogprobs = 20;
// OpenAI's range for a logit bias.
constexpr float kMaxLogitBias = 100.0f;

// A bias added to one token's logit (OpenAI's logit_bias).
struct TokenBias {
  int32_t id = 0;
  float bias = 0.0f;
};

struct SamplingParams {
  float temperature = 1.0f;         // 0: greedy (argmax, lowest id on ties)
  float top_p = 1.0f;               // (0, 1]
  int top_k = 0;                    // 0: off
  float min_p = 0.0f;               // [0, 1]: drop tokens below min_p * p(max)
  float presence_penalty = 0.0f;    // OpenAI: logit -= presence * [count > 0], generated tokens
  float frequency_penalty = 0.0f;   // OpenAI: logit -= frequency * count, generated tokens
  float repetition_penalty = 1.0f;  // HF/vLLM: logit /= p if > 0 else *= p, prompt + generated
  uint64_t seed = 0;
  int top_logprobs = 0;             // how many alternatives to report (0..kMaxTopLogprobs)
};

// Throws m1::Error naming the first parameter out of range (e.g. "top_p must be in (0, 1]").
void validate(const SamplingParams& params);
// Whether any of the penalties changes the logits.
bool has_penalties(const SamplingParams& params);
// Sorts biases by id and throws m1::Error naming the first one out of range: an id outside
// [0, vocab), one given twice, or a bias outside [-100, 100].
void check_logit_bias(std::vector<TokenBias>& biases, int64_t vocab);

struct SampledToken {
  int32_t id = -1;
  float logprob = 0.0f;                          // of `id` under the model's raw distribution
  std::vector<std::pair<int32_t, float>> top;    // top_logprobs best (id, logprob), best first;
                                                 // masked (-inf) tokens are left out
};

// Everything one draw needs besides its row of logits. The spans point into the Sampler that made
// the request (and the caller's mask) and stay valid until its next accept().
//
// The logits are processed in this order: biases added, then penalties, then tokens outside
// `allowed` set to -inf; the draw is from what is left. Log-probabilities stay those of the raw
// row.
struct DrawRequest {
  int64_t row = 0;                // which row of a step's logits
  SamplingParams params;          // the seed is not used: `uniform` is the draw's randomness
  double uniform = 0.0;           // in [0, 1); unused when temperature is 0
  std::span<const int32_t> seen;  // sorted unique prompt + generated ids (repetition penalty)
  std::span<const std::pair<int32_t, int32_t>> generated_counts;  // sorted (id, count)
  std::span<const TokenBias> logit_bias;  // sorted by id, unique, ids < vocab
  // Empty: every token may be drawn; else ceil(vocab / 32) words, bit id % 32 of word id / 32
  // set when token id may be (a grammar's mask).
  std::span<const uint32_t> allowed;
};

// A draw's result, or why its row has no distribution (NaN, all -inf, +inf, an id outside the
// vocabulary): one bad row fails its own request, not the others of a batch.
struct DrawOutcome {
  SampledToken token;
  std::string error;  // empty when the token is valid
};

// Why `request` cannot draw from a row of `vocab` logits (an id its penalties or biases touch lies
// outside the row, a mask of another size), or empty: checked before a draw, by every backend,
// with the same words.
std::string penalty_ids_error(const DrawRequest& request, int64_t vocab);

// The error of a draw whose mask and penalties leave no token with a finite logit.
inline constexpr const char* kNothingAllowed = "no token the output's grammar allows has a finite logit";

// Reused buffers of sample_row.
struct SampleScratch {
  std::vector<float> weights;          // exp((logit - max) / temperature) per token
  std::vector<float> seen_raw_logits;  // logits of the seen ids before the penalties
  std::vector<float> bias_raw_logits;  // logits of the biased ids before their biases
  std::vector<int32_t> candidates;
};

// The draw on the host, the reference every backend's sampling matches: biases, penalties, the
// mask, temperature, top-k, min-p, top-p, then the inverse-CDF draw with `uniform` over the kept
// tokens in id order.
// Log-probabilities are those of the raw logits (before penalties, temperature and truncation),
// as OpenAI-compatible servers report them. `logits` (the full vocabulary) is used as scratch.
// Throws m1::Error when the row has no distribution.
SampledToken sample_row(std::span<float> logits, const DrawRequest& request, SampleScratch& scratch);

// One per sequence: owns the random stream and the token counts that penalties need.
class Sampler {
 public:
  // `logit_bias` as check_logit_bias leaves it.
  Sampler(const SamplingParams& params, std::span<const int32_t> prompt, std::vector<TokenBias> logit_bias = {});
  // The request for this sequence's next draw from `row` of a step's logits; takes the next
  // number of the random stream when the draw is random.
  DrawRequest next_draw(int64_t row = 0);
  // Records a token as generated (sample() does this for its own choice).
  void accept(int32_t id);
  // next_draw, sample_row on a host row (used as scratch) and accept, in one.
  SampledToken sample(std::span<float> logits);

 private:
  double next_uniform();

  SamplingParams params_;
  uint64_t rng_state_;
  std::vector<int32_t> seen_;
  std::vector<std::pair<int32_t, int32_t>> generated_counts_;
  std::vector<TokenBias> logit_bias_;
  SampleScratch scratch_;
};

}  // namespace m1
