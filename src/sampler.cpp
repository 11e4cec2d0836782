#include "m1/sampler.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>

#include "fast_exp.h"
#include "m1/error.h"

namespace m1 {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();


// Highest logit first, lower id first on ties: a strict total order, so every selection below
// has one right answer however the candidates happen to be arranged.
struct HigherLogit {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

bool has_nan(std::span<const float> logits) {
  // On the bits, so that the loop vectorises: NaN is an all-ones exponent with a nonzero mantissa.
  uint32_t seen = 0;
  for (float logit : logits) seen |= (std::bit_cast<uint32_t>(logit) & 0x7FFFFFFFu) > 0x7F800000u;
  return seen != 0;
}

// Maps a float's bits to an int32 that orders as the value does (NaN aside): negative floats are
// sign-magnitude, so their magnitude bits are flipped. Mapping twice gives the bits back.
int32_t ordered_bits(int32_t bits) { return bits ^ ((bits >> 31) & 0x7FFFFFFF); }

float max_logit(std::span<const float> logits) {
  // An integer maximum, which the compiler vectorises; a float one it may not reorder.
  int32_t max = ordered_bits(std::bit_cast<int32_t>(kNegInf));
  for (float logit : logits) max = std::max(max, ordered_bits(std::bit_cast<int32_t>(logit)));
  return std::bit_cast<float>(ordered_bits(max));
}

// The row's maximum, after rejecting rows that have no distribution.
float checked_max(std::span<const float> logits) {
  if (logits.empty()) fail("logits row is empty");
  if (has_nan(logits)) fail("logits contain NaN");
  const float max = max_logit(logits);
  if (max == kNegInf) fail("logits are all -inf");
  if (std::isinf(max)) fail("logits contain +inf");
  return max;
}

// Every token's weight exp((logit - max) / temperature): 1 for the best token, 0 for masked ones.
void compute_weights(std::span<const float> logits, float max, float temperature,
                     std::span<float> weights) {
  for (size_t i = 0; i < logits.size(); ++i)
    weights[i] = exp_nonpositive((logits[i] - max) / temperature);
}

// Sum in double of the weights that are at least `floor`, in a fixed order, so every machine gets
// the same total. Weights are >= 0, so their bits compare as the values do, without an FP compare.
double sum_weights(std::span<const float> weights, float floor = 0.0f) {
  const uint32_t floor_bits = std::bit_cast<uint32_t>(floor);
  const auto counted = [&](float weight) {
    const uint32_t bits = std::bit_cast<uint32_t>(weight);
    return std::bit_cast<float>(bits >= floor_bits ? bits : 0u);
  };
  // Eight running sums: one would be a serial chain, which the compiler may not split.
  constexpr size_t kLanes = 8;
  std::array<double, kLanes> partial{};
  size_t i = 0;
  for (; i + kLanes <= weights.size(); i += kLanes)
    for (size_t lane = 0; lane < kLanes; ++lane) partial[lane] += counted(weights[i + lane]);
  for (; i < weights.size(); ++i) partial[0] += counted(weights[i]);
  double total = 0.0;
  for (double sum : partial) total += sum;
  return total;
}

// log(sum(exp(logits))) of the raw row; `weights` is scratch.
double log_normalizer(std::span<const float> logits, std::span<float> weights) {
  const float max = checked_max(logits);
  compute_weights(logits, max, 1.0f, weights);
  return max + std::log(sum_weights(weights));
}

// The `count` best finite tokens with their raw log-probabilities, best first.
std::vector<std::pair<int32_t, float>> top_alternatives(std::span<const float> logits, int count,
                                                        double log_norm) {
  const HigherLogit higher{logits.data()};
  std::vector<std::pair<int32_t, float>> best;  // (id, logit) until the end
  best.reserve(count + 1);
  for (int32_t id = 0; id < std::ssize(logits); ++id) {
    const bool full = std::ssize(best) == count;
    // Ids rise, so a later id that only ties the worst kept one loses to it.
    if (logits[id] == kNegInf || (full && logits[id] <= best.back().second)) continue;
    auto at = std::ranges::upper_bound(best, id, higher, &std::pair<int32_t, float>::first);
    best.insert(at, {id, logits[id]});
    if (std::ssize(best) > count) best.pop_back();
  }
  for (auto& [id, value] : best) value = float(double(value) - log_norm);
  return best;
}

int32_t argmax(std::span<const float> logits) {
  // The first of equal maxima: the lowest id.
  return int32_t(std::ranges::find(logits, max_logit(logits)) - logits.begin());
}

double total_weight(std::span<const int32_t> ids, std::span<const float> weights) {
  double total = 0.0;
  for (int32_t id : ids) total += weights[id];
  return total;
}

// Ids whose weight is positive and at least `floor`, in id order.
void gather_ids(std::span<const float> weights, float floor, std::vector<int32_t>& ids) {
  ids.clear();
  for (int32_t id = 0; id < std::ssize(weights); ++id)
    if (weights[id] > 0.0f && weights[id] >= floor) ids.push_back(id);
}

// Lomuto partition of ids[lo, hi) around its middle element: returns where that element ends up,
// with the ids that beat it before it. Hand-written rather than std::partition so that the
// arrangement, and with it the draw, is the same with every standard library.
size_t partition_around_middle(std::span<int32_t> ids, size_t lo, size_t hi, HigherLogit higher) {
  std::swap(ids[lo + (hi - lo) / 2], ids[hi - 1]);
  const int32_t pivot = ids[hi - 1];
  size_t at = lo;
  for (size_t i = lo; i + 1 < hi; ++i)
    if (higher(ids[i], pivot)) std::swap(ids[i], ids[at++]);
  std::swap(ids[at], ids[hi - 1]);
  return at;
}

// Keeps the k best ids (quickselect: linear on average, no sort).
void keep_best(std::vector<int32_t>& ids, size_t k, HigherLogit higher) {
  if (ids.size() <= k) return;
  size_t lo = 0, hi = ids.size();  // the k-th best lies in [lo, hi)
  for (;;) {
    const size_t at = partition_around_middle(ids, lo, hi, higher);
    if (at + 1 == k) break;
    if (at + 1 > k)
      hi = at;
    else
      lo = at + 1;
  }
  ids.resize(k);
}

// Top-k path: the k best tokens that min-p keeps. Returns the top-k mass that top-p measures.
double gather_top_k(std::span<const float> logits, std::span<const float> weights,
                    const SamplingParams& params, std::vector<int32_t>& candidates) {
  // The near-top tokens are a prefix of the order: if there are k of them, the k best are there.
  gather_ids(weights, kNearTopWeight, candidates);
  if (std::ssize(candidates) < params.top_k) gather_ids(weights, 0.0f, candidates);
  keep_best(candidates, params.top_k, HigherLogit{logits.data()});
  const double mass = total_weight(candidates, weights);
  std::erase_if(candidates, [&](int32_t id) { return weights[id] < params.min_p; });
  return mass;
}

// No top-k: the tokens that min-p keeps, skipping far-off tokens when the near-top ones already
// cover top-p. Min-p cuts a prefix of the sorted order, so filtering it before top-p leaves the
// same final set as applying it after, provided top-p measures against the full mass.
double gather_above_floor(std::span<const float> weights, const SamplingParams& params,
                          std::vector<int32_t>& candidates) {
  const double mass = sum_weights(weights);
  float floor = params.min_p;
  if (params.top_p < 1.0f && sum_weights(weights, kNearTopWeight) >= top_p_fraction(params.top_p) * mass)
    floor = std::max(floor, kNearTopWeight);
  gather_ids(weights, floor, candidates);
  return mass;
}

// Keeps what top-p keeps: the fewest best candidates whose weights sum to at least
// `target_mass` (at least one). A quickselect that follows the mass instead of a count.
void keep_nucleus(std::vector<int32_t>& candidates, std::span<const float> logits,
                  std::span<const float> weights, double target_mass) {
  const HigherLogit higher{logits.data()};
  size_t lo = 0, hi = candidates.size();  // the last token kept lies in [lo, hi)
  double mass_before = 0.0;               // of candidates[0, lo), which all beat the rest
  for (;;) {
    const size_t at = partition_around_middle(candidates, lo, hi, higher);
    const double before_pivot =
        mass_before + total_weight(std::span(candidates).subspan(lo, at - lo), weights);
    const double through_pivot = before_pivot + weights[candidates[at]];
    if (before_pivot >= target_mass) {
      hi = at;
    } else if (through_pivot >= target_mass || at + 1 == hi) {
      candidates.resize(at + 1);
      return;
    } else {
      mass_before = through_pivot;
      lo = at + 1;
    }
  }
}

// Inverse-CDF draw over the candidates in their order, with u in [0, 1).
int32_t pick(std::span<const int32_t> candidates, std::span<const float> weights, double u) {
  const double target = u * total_weight(candidates, weights);
  double cumulative = 0.0;
  for (int32_t id : candidates) {
    cumulative += weights[id];
    if (cumulative > target) return id;
  }
  return candidates.back();  // only when rounding puts target at the very top
}

// The same over every token in id order, when nothing is truncated: no candidate list to build.
int32_t pick_any(std::span<const float> weights, double u) {
  const double target = u * sum_weights(weights);
  double cumulative = 0.0;
  int32_t last_possible = 0;
  for (int32_t id = 0; id < std::ssize(weights); ++id) {
    if (weights[id] == 0.0f) continue;  // masked
    cumulative += weights[id];
    last_possible = id;
    if (cumulative > target) return id;
  }
  return last_possible;
}

// Applies the request's penalties to `logits` (the generated ids are a subset of the seen ones, so
// the seen ids are all the logits they touch).
void apply_penalties(std::span<float> logits, const DrawRequest& request) {
  const SamplingParams& p = request.params;
  if (p.repetition_penalty != 1.0f) {
    for (int32_t id : request.seen) {
      float& logit = logits[id];
      logit = logit > 0 ? logit / p.repetition_penalty : logit * p.repetition_penalty;
    }
  }
  for (auto [id, count] : request.generated_counts)
    logits[id] -= p.frequency_penalty * float(count) + p.presence_penalty;
}

// -inf for every token outside the mask.
void apply_mask(std::span<float> logits, std::span<const uint32_t> allowed) {
  for (size_t w = 0; w < allowed.size(); ++w) {
    const uint32_t bits = allowed[w];
    if (bits == 0xFFFFFFFFu) continue;
    const size_t first = w * 32, end = std::min(first + 32, logits.size());
    for (size_t i = first; i < end; ++i)
      if (((bits >> (i - first)) & 1u) == 0) logits[i] = kNegInf;
  }
}

bool penalised(const DrawRequest& request) { return has_penalties(request.params) && !request.seen.empty(); }

// Biases, penalties and the mask, in that order, keeping the raw logits of the ids the first two
// touch. Returns whether the row changed.
bool process(std::span<float> logits, const DrawRequest& request, SampleScratch& scratch) {
  if (const std::string error = penalty_ids_error(request, std::ssize(logits)); !error.empty()) throw Error(error);
  if (penalised(request)) {
    scratch.seen_raw_logits.resize(request.seen.size());
    for (size_t i = 0; i < request.seen.size(); ++i) scratch.seen_raw_logits[i] = logits[request.seen[i]];
  }
  scratch.bias_raw_logits.resize(request.logit_bias.size());
  for (size_t i = 0; i < request.logit_bias.size(); ++i) {
    float& logit = logits[request.logit_bias[i].id];
    scratch.bias_raw_logits[i] = logit;
    logit += request.logit_bias[i].bias;
  }
  if (penalised(request)) apply_penalties(logits, request);
  apply_mask(logits, request.allowed);
  return penalised(request) || !request.logit_bias.empty() || !request.allowed.empty();
}

// The logit of `id` before process().
float raw_logit(int32_t id, std::span<const float> logits, const DrawRequest& request, const SampleScratch& scratch) {
  const auto biased = std::ranges::lower_bound(request.logit_bias, id, {}, &TokenBias::id);
  if (biased != request.logit_bias.end() && biased->id == id)
    return scratch.bias_raw_logits[size_t(biased - request.logit_bias.begin())];
  if (penalised(request)) {
    const auto at = std::ranges::lower_bound(request.seen, id);
    if (at != request.seen.end() && *at == id) return scratch.seen_raw_logits[size_t(at - request.seen.begin())];
  }
  return logits[id];
}

int32_t draw(std::span<const float> logits, const DrawRequest& request, SampleScratch& scratch) {
  const SamplingParams& p = request.params;
  std::vector<float>& weights = scratch.weights;
  std::vector<int32_t>& candidates = scratch.candidates;
  compute_weights(logits, max_logit(logits), p.temperature, weights);
  if (p.top_k == 0 && p.top_p == 1.0f && p.min_p == 0.0f)  // no truncation
    return pick_any(weights, request.uniform);
  const double mass = p.top_k > 0 ? gather_top_k(logits, weights, p, candidates)
                                  : gather_above_floor(weights, p, candidates);
  if (p.top_p < 1.0f) keep_nucleus(candidates, logits, weights, top_p_fraction(p.top_p) * mass);
  // The kept set is defined by the order of logits; the draw walks it in id order, which a
  // device can reproduce with a prefix sum instead of a sort. Only top-k and top-p reorder the
  // ids gathered in id order.
  if (p.top_k > 0 || p.top_p < 1.0f) std::ranges::sort(candidates);
  return pick(candidates, weights, request.uniform);
}

}  // namespace

void validate(const SamplingParams& p) {
  // Written as !(in range) so that NaN fails every check. Temperature uses OpenAI's range.
  if (!(p.temperature >= 0 && p.temperature <= 2))
    fail("temperature must be in [0, 2], got {}", p.temperature);
  if (!(p.top_p > 0 && p.top_p <= 1)) fail("top_p must be in (0, 1], got {}", p.top_p);
  if (p.top_k < 0) fail("top_k must be >= 0, got {}", p.top_k);
  if (!(p.min_p >= 0 && p.min_p <= 1)) fail("min_p must be in [0, 1], got {}", p.min_p);
  if (!(p.presence_penalty >= -2 && p.presence_penalty <= 2))
    fail("presence_penalty must be in [-2, 2], got {}", p.presence_penalty);
  if (!(p.frequency_penalty >= -2 && p.frequency_penalty <= 2))
    fail("frequency_penalty must be in [-2, 2], got {}", p.frequency_penalty);
  if (!(p.repetition_penalty > 0 && p.repetition_penalty <= 2))
    fail("repetition_penalty must be in (0, 2], got {}", p.repetition_penalty);
  if (p.top_logprobs < 0 || p.top_logprobs > kMaxTopLogprobs)
    fail("top_logprobs must be in [0, {}], got {}", kMaxTopLogprobs, p.top_logprobs);
}

bool has_penalties(const SamplingParams& p) {
  return p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
}

std::string penalty_ids_error(const DrawRequest& request, int64_t vocab) {
  if (penalised(request) && request.seen.back() >= vocab)
    return fmt::format("token id {} is outside the vocabulary of {} logits", request.seen.back(), vocab);
  if (!request.logit_bias.empty() && request.logit_bias.back().id >= vocab)
    return fmt::format("token id {} is outside the vocabulary of {} logits", request.logit_bias.back().id, vocab);
  if (!request.allowed.empty() && std::ssize(request.allowed) != (vocab + 31) / 32)
    return fmt::format("an allowed-token mask of {} words does not fit {} logits", request.allowed.size(), vocab);
  return {};
}

void check_logit_bias(std::vector<TokenBias>& biases, int64_t vocab) {
  std::ranges::sort(biases, {}, &TokenBias::id);
  for (size_t i = 0; i < biases.size(); ++i) {
    const TokenBias& b = biases[i];
    if (b.id < 0 || b.id >= vocab) fail("logit_bias: token id {} is outside the vocabulary of {} tokens", b.id, vocab);
    if (i > 0 && biases[i - 1].id == b.id) fail("logit_bias: token id {} is given twice", b.id);
    if (!(b.bias >= -kMaxLogitBias && b.bias <= kMaxLogitBias))
      fail("logit_bias: the bias of token {} must be in [-100, 100], got {}", b.id, b.bias);
  }
}

SampledToken sample_row(std::span<float> logits, const DrawRequest& request, SampleScratch& scratch) {
  scratch.weights.resize(logits.size());
  const double log_norm = log_normalizer(logits, scratch.weights);
  SampledToken token;
  if (request.params.top_logprobs > 0) token.top = top_alternatives(logits, request.params.top_logprobs, log_norm);
  if (process(logits, request, scratch) && max_logit(logits) == kNegInf) fail("{}", kNothingAllowed);
  token.id = request.params.temperature == 0.0f ? argmax(logits) : draw(logits, request, scratch);
  token.logprob = float(double(raw_logit(token.id, logits, request, scratch)) - log_norm);
  return token;
}

Sampler::Sampler(const SamplingParams& params, std::span<const int32_t> prompt, std::vector<TokenBias> logit_bias)
    : params_(params), rng_state_(params.seed), seen_(prompt.begin(), prompt.end()), logit_bias_(std::move(logit_bias)) {
  validate(params);
  std::ranges::sort(seen_);
  seen_.erase(std::unique(seen_.begin(), seen_.end()), seen_.end());
  if (!seen_.empty() && seen_.front() < 0)
    fail("prompt token ids must be >= 0, got {}", seen_.front());
}

DrawRequest Sampler::next_draw(int64_t row) {
  DrawRequest request;
  request.row = row;
  request.params = params_;
  request.uniform = params_.temperature == 0.0f ? 0.0 : next_uniform();
  request.seen = seen_;
  request.generated_counts = generated_counts_;
  request.logit_bias = logit_bias_;
  return request;
}

SampledToken Sampler::sample(std::span<float> logits) {
  SampledToken token = sample_row(logits, next_draw(), scratch_);
  accept(token.id);
  return token;
}

void Sampler::accept(int32_t id) {
  if (id < 0) fail("token id must be >= 0, got {}", id);
  const auto seen_at = std::ranges::lower_bound(seen_, id);
  if (seen_at == seen_.end() || *seen_at != id) seen_.insert(seen_at, id);
  const auto count_at = std::ranges::lower_bound(generated_counts_, id,
                                                 {}, &std::pair<int32_t, int32_t>::first);
  if (count_at != generated_counts_.end() && count_at->first == id)
    ++count_at->second;
  else
    generated_counts_.insert(count_at, {id, 1});
}

double Sampler::next_uniform() {
  // splitmix64 (Steele, Lea, Flood 2014): fixed integer arithmetic, the same stream everywhere.
  uint64_t z = (rng_state_ += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return double(z >> 11) * 0x1.0p-53;  // top 53 bits: every value exact, in [0, 1)
}

}  // namespace m1
