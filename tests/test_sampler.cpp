#include "m1/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "m1/error.h"

namespace m1 {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> logits_from_probs(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(float(std::log(p)));
  return logits;
}

// Deterministic pseudo-random logits in [0, spread), quantised so that ties occur.
std::vector<float> random_logits(size_t size, uint32_t seed, float spread = 10.0f) {
  std::mt19937 rng(seed);
  std::vector<float> logits(size);
  for (float& logit : logits) logit = float(rng() % 1000) * spread / 1000.0f;
  return logits;
}

int32_t sample_once(const SamplingParams& params, std::vector<float> logits,
                    std::vector<int32_t> prompt = {}) {
  return Sampler(params, prompt).sample(logits).id;
}

// How often each id is drawn in `draws` samples from one sampler (the row is copied each time,
// since sample() may use it as scratch).
std::vector<int> draw_counts(const SamplingParams& params, const std::vector<float>& logits,
                             int draws) {
  Sampler sampler(params, {});
  std::vector<int> counts(logits.size());
  for (int i = 0; i < draws; ++i) {
    std::vector<float> row = logits;
    ++counts[sampler.sample(row).id];
  }
  return counts;
}

std::set<int32_t> drawn_ids(const std::vector<int>& counts) {
  std::set<int32_t> ids;
  for (size_t id = 0; id < counts.size(); ++id)
    if (counts[id] > 0) ids.insert(int32_t(id));
  return ids;
}

// Each count within 5 standard errors of its binomial expectation.
void expect_frequencies(const std::vector<int>& counts, const std::vector<double>& probs) {
  const double draws = std::accumulate(counts.begin(), counts.end(), 0.0);
  const double total = std::accumulate(probs.begin(), probs.end(), 0.0);
  for (size_t id = 0; id < probs.size(); ++id) {
    const double p = probs[id] / total;
    const double expected = draws * p;
    EXPECT_NEAR(counts[id], expected, 5 * std::sqrt(expected * (1 - p)) + 1) << "id " << id;
  }
}

// log-softmax in double, the reference for reported log-probabilities.
std::vector<double> log_softmax(const std::vector<float>& logits) {
  const double max = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float logit : logits) sum += std::exp(logit - max);
  std::vector<double> result;
  for (float logit : logits) result.push_back(logit - max - std::log(sum));
  return result;
}

const std::vector<double> kFourProbs = {0.5, 0.3, 0.15, 0.05};

TEST(Sampler, GreedyPicksArgmaxWithLowestIdOnTies) {
  SamplingParams params;
  params.temperature = 0;
  EXPECT_EQ(sample_once(params, {1.0f, 3.0f, 3.0f, 2.0f}), 1);
  EXPECT_EQ(sample_once(params, {kNegInf, -5.0f, kNegInf}), 1);
  EXPECT_EQ(sample_once(params, {0.0f, 0.0f, 0.0f}), 0);
}

TEST(Sampler, TopKOfOneEqualsGreedyAtAnyTemperature) {
  for (uint32_t seed = 1; seed <= 20; ++seed) {
    const std::vector<float> logits = random_logits(1000, seed);
    SamplingParams greedy;
    greedy.temperature = 0;
    const int32_t best = sample_once(greedy, logits);
    for (float temperature : {0.1f, 1.0f, 2.0f}) {
      SamplingParams params;
      params.temperature = temperature;
      params.top_k = 1;
      params.seed = seed;
      EXPECT_EQ(sample_once(params, logits), best) << "temperature " << temperature;
    }
  }
}

TEST(Sampler, TopKOnlyEverPicksTheKBest) {
  const std::vector<float> logits = random_logits(100, 7, 2.0f);  // flat: many plausible ids
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  SamplingParams params;
  params.top_k = 5;
  params.seed = 3;
  EXPECT_EQ(drawn_ids(draw_counts(params, logits, 5000)),
            std::set<int32_t>(order.begin(), order.begin() + 5));
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
  const std::vector<float> logits = logits_from_probs(kFourProbs);
  const auto nucleus = [&](float top_p) {
    SamplingParams params;
    params.top_p = top_p;
    return drawn_ids(draw_counts(params, logits, 4000));
  };
  EXPECT_EQ(nucleus(0.45f), (std::set<int32_t>{0}));
  // 0.5 + 0.3 reaches 0.8 exactly: the third token is not needed.
  EXPECT_EQ(nucleus(0.8f), (std::set<int32_t>{0, 1}));
  EXPECT_EQ(nucleus(0.81f), (std::set<int32_t>{0, 1, 2}));
  EXPECT_EQ(nucleus(0.96f), (std::set<int32_t>{0, 1, 2, 3}));
}

TEST(Sampler, TopPRenormalisesWithinTheNucleus) {
  SamplingParams params;
  params.top_p = 0.8f;
  const std::vector<int> counts = draw_counts(params, logits_from_probs(kFourProbs), 20000);
  expect_frequencies(counts, {0.5, 0.3, 0, 0});
}

TEST(Sampler, TopPBoundaryIsInclusiveAndTiesGoToLowerIds) {
  const std::vector<float> equal(4, 0.0f);  // exactly 0.25 each
  SamplingParams params;
  params.top_p = 0.5f;
  EXPECT_EQ(drawn_ids(draw_counts(params, equal, 2000)), (std::set<int32_t>{0, 1}));
  params.top_p = 0.75f;
  EXPECT_EQ(drawn_ids(draw_counts(params, equal, 2000)), (std::set<int32_t>{0, 1, 2}));
}

TEST(Sampler, TopPLooksPastTheNearTopTokensWhenNeeded) {
  // One clear favourite and 200,063 tokens far below it that together still hold ~2% of the
  // mass: a nucleus of 0.999 must include some of them.
  std::vector<float> logits(200064, -32.2f);
  logits[0] = 0.0f;
  SamplingParams params;
  params.temperature = 2.0f;
  params.top_p = 0.999f;
  const std::vector<int> counts = draw_counts(params, logits, 500);
  EXPECT_GT(500 - counts[0], 0);
  EXPECT_LT(500 - counts[0], 30);
}

TEST(Sampler, MinPDropsTokensBelowTheThreshold) {
  const std::vector<float> logits = logits_from_probs(kFourProbs);
  const auto kept = [&](float min_p) {
    SamplingParams params;
    params.min_p = min_p;
    return drawn_ids(draw_counts(params, logits, 4000));
  };
  EXPECT_EQ(kept(0.2f), (std::set<int32_t>{0, 1, 2}));  // drops p < 0.1
  EXPECT_EQ(kept(0.5f), (std::set<int32_t>{0, 1}));     // drops p < 0.25
  EXPECT_EQ(kept(1.0f), (std::set<int32_t>{0}));
}

TEST(Sampler, MinPAppliesAfterTopKAndTopP) {
  const std::vector<float> logits = logits_from_probs(kFourProbs);
  SamplingParams params;
  params.top_p = 0.9f;  // keeps 0.5, 0.3, 0.15
  params.min_p = 0.4f;  // then drops p < 0.2
  expect_frequencies(draw_counts(params, logits, 20000), {0.5, 0.3, 0, 0});
  params = {};
  params.top_k = 3;
  params.min_p = 0.2f;  // drops p < 0.1: nothing more than top-k did
  expect_frequencies(draw_counts(params, logits, 20000), {0.5, 0.3, 0.15, 0});
}

TEST(Sampler, FrequenciesMatchTheDistribution) {
  const std::vector<double> probs = {0.4, 0.25, 0.15, 0.1, 0.06, 0.04};
  SamplingParams params;
  params.seed = 11;
  expect_frequencies(draw_counts(params, logits_from_probs(probs), 20000), probs);
}

TEST(Sampler, TemperatureReshapesTheDistribution) {
  const std::vector<double> probs = {0.6, 0.3, 0.1};
  SamplingParams params;
  params.temperature = 0.5f;  // p^(1/T) = p^2
  expect_frequencies(draw_counts(params, logits_from_probs(probs), 20000), {0.36, 0.09, 0.01});
  params.temperature = 2.0f;  // p^(1/2)
  expect_frequencies(draw_counts(params, logits_from_probs(probs), 20000),
                     {std::sqrt(0.6), std::sqrt(0.3), std::sqrt(0.1)});
}

TEST(Sampler, SameSeedGivesTheSameTokens) {
  const std::vector<float> logits = random_logits(5000, 5, 3.0f);
  const auto sequence = [&](uint64_t seed) {
    SamplingParams params;
    params.seed = seed;
    params.top_p = 0.95f;
    Sampler sampler(params, {});
    std::vector<int32_t> ids;
    for (int i = 0; i < 100; ++i) {
      std::vector<float> row = logits;
      ids.push_back(sampler.sample(row).id);
    }
    return ids;
  };
  EXPECT_EQ(sequence(42), sequence(42));
  EXPECT_NE(sequence(42), sequence(43));
}

TEST(Sampler, DrawsFollowTheSplitmix64Stream) {
  // With 2^16 equally likely tokens the draw is the top 16 bits of each generator output, so the
  // tokens can be checked against splitmix64's published outputs for seed 1234567.
  const uint64_t outputs[] = {6457827717110365317ULL, 3203168211198807973ULL,
                              9817491932198370423ULL, 4593380528125082431ULL,
                              16408922859458223821ULL};
  SamplingParams params;
  params.seed = 1234567;
  Sampler sampler(params, {});
  for (uint64_t output : outputs) {
    std::vector<float> row(1 << 16, 0.0f);
    EXPECT_EQ(sampler.sample(row).id, int32_t(output >> 48));
  }
}

TEST(Sampler, TruncatedDrawsArePinned) {
  // Regression pins: the weights, sums and selections use no libm and no standard-library
  // arrangement, so these tokens should come out the same on every machine and compiler.
  const std::vector<float> logits = random_logits(1000, 21, 8.0f);
  const auto sequence = [&](const SamplingParams& params) {
    Sampler sampler(params, {});
    std::vector<int32_t> ids;
    for (int i = 0; i < 12; ++i) {
      std::vector<float> row = logits;
      ids.push_back(sampler.sample(row).id);
    }
    return ids;
  };
  SamplingParams nucleus;
  nucleus.temperature = 0.8f;
  nucleus.top_p = 0.9f;
  nucleus.seed = 7;
  EXPECT_EQ(sequence(nucleus),
            (std::vector<int32_t>{378, 15, 844, 543, 434, 229, 444, 334, 105, 400, 73, 928}));
  SamplingParams top_k;
  top_k.temperature = 1.3f;
  top_k.top_k = 40;
  top_k.min_p = 0.05f;
  top_k.seed = 8;
  EXPECT_EQ(sequence(top_k),
            (std::vector<int32_t>{514, 514, 586, 449, 27, 395, 836, 377, 29, 420, 522, 619}));
}

TEST(Sampler, TheDrawWalksKeptTokensInIdOrder) {
  // Kept: id 5 (weight 1) and id 2 (weight 1/3). u = 0.2 aims at 0.2 * 4/3 of the mass, inside
  // id 2's share when the walk starts at the lower id (a device reproduces that order with a
  // prefix sum, where best-first would need a sort).
  std::vector<float> logits(8, kNegInf);
  logits[2] = std::log(0.25f);
  logits[5] = std::log(0.75f);
  DrawRequest request;
  request.params.top_k = 2;
  request.uniform = 0.2;
  SampleScratch scratch;
  EXPECT_EQ(sample_row(logits, request, scratch).id, 2);
  request.uniform = 0.3;  // past id 2's quarter
  EXPECT_EQ(sample_row(logits, request, scratch).id, 5);
}

// Greedy choice between two logits, with `history` accepted as generated before sampling.
int32_t greedy_after(SamplingParams params, std::vector<float> logits,
                     std::vector<int32_t> prompt, std::vector<int32_t> history = {}) {
  params.temperature = 0;
  Sampler sampler(params, prompt);
  for (int32_t id : history) sampler.accept(id);
  return sampler.sample(logits).id;
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  SamplingParams params;
  // 2.0 / p against 1.5: flips above p = 4/3.
  params.repetition_penalty = 1.3f;
  EXPECT_EQ(greedy_after(params, {2.0f, 1.5f}, {0}), 0);
  params.repetition_penalty = 1.4f;
  EXPECT_EQ(greedy_after(params, {2.0f, 1.5f}, {0}), 1);
  // -1.0 * p against -1.2: flips above p = 1.2.
  params.repetition_penalty = 1.1f;
  EXPECT_EQ(greedy_after(params, {-1.0f, -1.2f}, {0}), 0);
  params.repetition_penalty = 1.3f;
  EXPECT_EQ(greedy_after(params, {-1.0f, -1.2f}, {0}), 1);
  // Generated tokens count too, and a penalty below 1 rewards repetition.
  params.repetition_penalty = 1.4f;
  EXPECT_EQ(greedy_after(params, {2.0f, 1.5f}, {}, {0}), 1);
  params.repetition_penalty = 0.5f;
  EXPECT_EQ(greedy_after(params, {1.5f, 2.0f}, {0}), 0);
}

TEST(Sampler, PresencePenaltySubtractsOnceForGeneratedTokens) {
  SamplingParams params;
  params.presence_penalty = 0.4f;  // 1.0 - 0.4 > 0.5
  EXPECT_EQ(greedy_after(params, {1.0f, 0.5f}, {}, {0, 0, 0}), 0);
  params.presence_penalty = 0.6f;  // 1.0 - 0.6 < 0.5
  EXPECT_EQ(greedy_after(params, {1.0f, 0.5f}, {}, {0}), 1);
  // The prompt does not count for presence and frequency.
  params.presence_penalty = 2.0f;
  EXPECT_EQ(greedy_after(params, {1.0f, 0.5f}, {0}), 0);
  params.presence_penalty = -0.6f;  // negative: encourages the token
  EXPECT_EQ(greedy_after(params, {0.5f, 1.0f}, {}, {0}), 0);
}

TEST(Sampler, FrequencyPenaltyScalesWithTheCount) {
  SamplingParams params;
  params.frequency_penalty = 0.15f;  // 1.0 - 3 * 0.15 = 0.55 > 0.5
  EXPECT_EQ(greedy_after(params, {1.0f, 0.5f}, {}, {0, 0, 0}), 0);
  params.frequency_penalty = 0.2f;   // 1.0 - 3 * 0.2 = 0.4 < 0.5
  EXPECT_EQ(greedy_after(params, {1.0f, 0.5f}, {}, {0, 0, 0}), 1);
  params.presence_penalty = 0.2f;    // with presence: 1.0 - 0.2 - 2 * 0.2 = 0.4 < 0.5
  EXPECT_EQ(greedy_after(params, {1.0f, 0.5f}, {}, {0, 0}), 1);
}

TEST(Sampler, SampleRecordsItsOwnChoices) {
  SamplingParams params;
  params.temperature = 0;
  params.frequency_penalty = 0.2f;
  Sampler sampler(params, {});
  std::vector<int32_t> ids;
  for (int i = 0; i < 4; ++i) {
    std::vector<float> row = {1.0f, 0.9f};
    ids.push_back(sampler.sample(row).id);
  }
  // 1.0 vs 0.9 -> 0; 0.8 vs 0.9 -> 1; 0.8 vs 0.7 -> 0; 0.6 vs 0.7 -> 1.
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 1, 0, 1}));
}

TEST(Sampler, LogprobIsTheRawLogSoftmax) {
  const std::vector<float> logits = random_logits(1000, 9, 8.0f);
  const std::vector<double> reference = log_softmax(logits);
  SamplingParams params;
  params.temperature = 0.7f;
  params.top_p = 0.9f;
  params.repetition_penalty = 1.5f;
  params.presence_penalty = 1.0f;
  params.seed = 2;
  std::vector<int32_t> prompt(50);
  std::iota(prompt.begin(), prompt.end(), 0);
  Sampler sampler(params, prompt);
  for (int i = 0; i < 50; ++i) {
    std::vector<float> row = logits;
    const SampledToken token = sampler.sample(row);
    EXPECT_NEAR(token.logprob, reference[token.id], 1e-5);
  }
  params.temperature = 0;
  std::vector<float> row = logits;
  const SampledToken greedy = Sampler(params, {}).sample(row);
  EXPECT_NEAR(greedy.logprob, *std::max_element(reference.begin(), reference.end()), 1e-5);
}

TEST(Sampler, TopAlternativesAreTheBestRawLogprobsInOrder) {
  std::vector<float> logits = random_logits(3000, 4, 3.0f);  // many ties
  const std::vector<double> reference = log_softmax(logits);
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  SamplingParams params;
  params.top_logprobs = 20;
  params.repetition_penalty = 2.0f;  // penalties must not change what is reported
  const SampledToken token = Sampler(params, order).sample(logits);
  ASSERT_EQ(token.top.size(), 20u);
  for (size_t i = 0; i < token.top.size(); ++i) {
    EXPECT_EQ(token.top[i].first, order[i]) << i;
    EXPECT_NEAR(token.top[i].second, reference[order[i]], 1e-5) << i;
  }
}

TEST(Sampler, TopAlternativesSkipMaskedTokens) {
  SamplingParams params;
  params.top_logprobs = 5;
  std::vector<float> logits = {kNegInf, 1.0f, kNegInf, 2.0f, kNegInf};
  const SampledToken token = Sampler(params, {}).sample(logits);
  ASSERT_EQ(token.top.size(), 2u);
  EXPECT_EQ(token.top[0].first, 3);
  EXPECT_EQ(token.top[1].first, 1);
}

TEST(Sampler, NegativeInfinityIsNeverChosen) {
  std::vector<float> logits(50, kNegInf);
  logits[3] = -30.0f;
  logits[17] = 0.0f;
  logits[42] = 0.5f;
  std::vector<SamplingParams> variants(4);
  for (SamplingParams& params : variants) params.temperature = 2.0f;
  variants[1].top_k = 10;
  variants[2].top_p = 0.999f;
  variants[3].presence_penalty = -2.0f;  // must not lift a masked token
  for (const SamplingParams& params : variants) {
    Sampler sampler(params, {});
    sampler.accept(0);
    std::set<int32_t> ids;
    for (int i = 0; i < 3000; ++i) {
      std::vector<float> row = logits;
      ids.insert(sampler.sample(row).id);
    }
    const std::set<int32_t> finite = {3, 17, 42};
    EXPECT_TRUE(std::includes(finite.begin(), finite.end(), ids.begin(), ids.end()));
    EXPECT_TRUE(ids.count(17) && ids.count(42));
  }
}

void expect_error(const std::function<void()>& call, const std::string& message) {
  try {
    call();
    ADD_FAILURE() << "no error; expected: " << message;
  } catch (const Error& error) {
    EXPECT_EQ(std::string(error.what()).substr(0, message.size()), message);
  }
}

TEST(Sampler, RejectsBadLogits) {
  for (float temperature : {0.0f, 1.0f}) {
    SamplingParams params;
    params.temperature = temperature;
    Sampler sampler(params, {});
    std::vector<float> with_nan = {1.0f, kNaN, 0.5f};
    expect_error([&] { sampler.sample(with_nan); }, "logits contain NaN");
    std::vector<float> all_masked = {kNegInf, kNegInf};
    expect_error([&] { sampler.sample(all_masked); }, "logits are all -inf");
    std::vector<float> empty;
    expect_error([&] { sampler.sample(empty); }, "logits row is empty");
  }
}

TEST(Sampler, RejectsTokenIdsOutsideTheVocabulary) {
  SamplingParams params;
  params.repetition_penalty = 1.2f;
  Sampler sampler(params, std::vector<int32_t>{7});
  std::vector<float> logits(4, 0.0f);
  expect_error([&] { sampler.sample(logits); }, "token id 7 is outside the vocabulary");
  expect_error([&] { Sampler(params, std::vector<int32_t>{-1}); }, "prompt token ids must be >= 0");
  expect_error([&] { sampler.accept(-2); }, "token id must be >= 0");
}

TEST(Sampler, ValidateNamesTheParameterOutOfRange) {
  struct Case {
    std::function<void(SamplingParams&)> set;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](auto& p) { p.temperature = -0.1f; }, "temperature must be in [0, 2], got -0.1"},
      {[](auto& p) { p.temperature = 2.5f; }, "temperature must be in [0, 2], got 2.5"},
      {[](auto& p) { p.temperature = kNaN; }, "temperature must be in [0, 2], got nan"},
      {[](auto& p) { p.top_p = 0.0f; }, "top_p must be in (0, 1], got 0"},
      {[](auto& p) { p.top_p = 1.5f; }, "top_p must be in (0, 1], got 1.5"},
      {[](auto& p) { p.top_p = kNaN; }, "top_p must be in (0, 1], got nan"},
      {[](auto& p) { p.top_k = -1; }, "top_k must be >= 0, got -1"},
      {[](auto& p) { p.min_p = -0.5f; }, "min_p must be in [0, 1], got -0.5"},
      {[](auto& p) { p.min_p = 1.5f; }, "min_p must be in [0, 1], got 1.5"},
      {[](auto& p) { p.min_p = kNaN; }, "min_p must be in [0, 1], got nan"},
      {[](auto& p) { p.presence_penalty = -2.5f; }, "presence_penalty must be in [-2, 2], got -2.5"},
      {[](auto& p) { p.presence_penalty = kNaN; }, "presence_penalty must be in [-2, 2], got nan"},
      {[](auto& p) { p.frequency_penalty = 3.0f; }, "frequency_penalty must be in [-2, 2], got 3"},
      {[](auto& p) { p.frequency_penalty = kNaN; }, "frequency_penalty must be in [-2, 2], got nan"},
      {[](auto& p) { p.repetition_penalty = 0.0f; }, "repetition_penalty must be in (0, 2], got 0"},
      {[](auto& p) { p.repetition_penalty = 2.5f; }, "repetition_penalty must be in (0, 2], got 2.5"},
      {[](auto& p) { p.repetition_penalty = kNaN; }, "repetition_penalty must be in (0, 2], got nan"},
      {[](auto& p) { p.top_logprobs = -1; }, "top_logprobs must be in [0, 20], got -1"},
      {[](auto& p) { p.top_logprobs = 21; }, "top_logprobs must be in [0, 20], got 21"},
  };
  for (const Case& c : cases) {
    SamplingParams params;
    c.set(params);
    expect_error([&] { validate(params); }, c.message);
    expect_error([&] { Sampler(params, {}); }, c.message);
  }
}

TEST(Sampler, ValidateAcceptsTheRangeEnds) {
  SamplingParams low;
  low.temperature = 0;
  low.top_p = 1e-6f;
  low.min_p = 0;
  low.presence_penalty = low.frequency_penalty = -2;
  low.repetition_penalty = 1e-6f;
  low.top_logprobs = 0;
  EXPECT_NO_THROW(validate(low));
  SamplingParams high;
  high.temperature = 2;
  high.top_p = 1;
  high.top_k = 200064;
  high.min_p = 1;
  high.presence_penalty = high.frequency_penalty = 2;
  high.repetition_penalty = 2;
  high.top_logprobs = 20;
  EXPECT_NO_THROW(validate(high));
}

// A mask allowing exactly `ids` among `vocab` tokens.
std::vector<uint32_t> mask_of(size_t vocab, const std::vector<int32_t>& ids) {
  std::vector<uint32_t> mask((vocab + 31) / 32, 0);
  for (int32_t id : ids) mask[size_t(id) / 32] |= 1u << (id % 32);
  return mask;
}

SampledToken draw_with(const SamplingParams& params, std::vector<float> logits, double uniform,
                       std::span<const TokenBias> biases, std::span<const uint32_t> allowed,
                       std::span<const int32_t> seen = {}) {
  DrawRequest request;
  request.params = params;
  request.uniform = uniform;
  request.logit_bias = biases;
  request.allowed = allowed;
  request.seen = seen;
  SampleScratch scratch;
  return sample_row(logits, request, scratch);
}

TEST(Sampler, LogitBiasMovesTheDrawButNotTheLogprob) {
  const std::vector<float> logits = {3.0f, 1.0f, 0.0f, -2.0f};
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.top_logprobs = 2;
  const std::vector<TokenBias> up = {{3, 10.0f}};
  const SampledToken token = draw_with(greedy, logits, 0.0, up, {});
  EXPECT_EQ(token.id, 3);
  EXPECT_NEAR(token.logprob, log_softmax(logits)[3], 1e-6);  // the raw row's
  ASSERT_EQ(token.top.size(), 2u);
  EXPECT_EQ(token.top[0].first, 0);  // alternatives from the raw row too
  // -100 all but removes a token; every other draw of the row avoids it.
  const std::vector<TokenBias> down = {{0, -100.0f}};
  EXPECT_EQ(draw_with(greedy, logits, 0.0, down, {}).id, 1);
  SamplingParams random;
  for (double u = 0.0; u < 1.0; u += 0.01) EXPECT_NE(draw_with(random, logits, u, down, {}).id, 0) << u;
  // Through a Sampler, the biases go with every draw.
  Sampler sampler(greedy, {}, {{2, 5.0f}});
  std::vector<float> row = logits;
  EXPECT_EQ(sampler.sample(row).id, 2);
}

TEST(Sampler, BiasComesBeforeThePenalties) {
  // logit 1 + bias 1 = 2, then repetition 2: 1; without the bias first it would be 0.5 + 1.
  const std::vector<float> logits = {1.0f, 1.4f, 1.2f};
  SamplingParams params;
  params.temperature = 0;
  params.repetition_penalty = 2.0f;
  const std::vector<int32_t> seen = {0, 1};
  const std::vector<TokenBias> biases = {{0, 1.0f}};
  // 0: (1 + 1) / 2 = 1.0; 1: 1.4 / 2 = 0.7; 2: 1.2 unpenalised: 2 wins, where bias-after would give 0 1.5.
  EXPECT_EQ(draw_with(params, logits, 0.0, biases, {}, seen).id, 2);
}

TEST(Sampler, MaskLimitsEveryKindOfDraw) {
  const std::vector<float> logits = random_logits(1000, 11);
  std::vector<int32_t> ids = {3, 64, 65, 500, 999};
  const std::vector<uint32_t> mask = mask_of(logits.size(), ids);
  std::vector<SamplingParams> kinds(5);
  kinds[0].temperature = 0;
  kinds[1].top_k = 40;
  kinds[2].top_p = 0.5f;
  kinds[3].min_p = 0.2f;
  kinds[4].temperature = 1.7f;
  for (const SamplingParams& params : kinds)
    for (double u = 0.0; u < 1.0; u += 0.05) {
      const int32_t id = draw_with(params, logits, u, {}, mask).id;
      EXPECT_TRUE(std::ranges::find(ids, id) != ids.end()) << id;
    }
  // Greedy: the best allowed token.
  const int32_t best = *std::ranges::max_element(ids, {}, [&](int32_t id) { return logits[size_t(id)]; });
  EXPECT_EQ(draw_with(kinds[0], logits, 0.0, {}, mask).id, best);
  // Frequencies among the allowed ones follow their weights.
  SamplingParams plain;
  std::vector<int> counts(logits.size());
  std::mt19937_64 rng(5);
  for (int i = 0; i < 4000; ++i) ++counts[size_t(draw_with(plain, logits, std::uniform_real_distribution<double>()(rng), {}, mask).id)];
  std::vector<double> probs(logits.size(), 0.0);
  for (int32_t id : ids) probs[size_t(id)] = std::exp(double(logits[size_t(id)]));
  expect_frequencies(counts, probs);
}

TEST(Sampler, RefusesAMaskThatLeavesNothing) {
  std::vector<float> logits = {0.0f, kNegInf, 1.0f};
  SamplingParams params;
  const std::vector<uint32_t> only_masked = mask_of(3, {1});
  expect_error([&] { draw_with(params, logits, 0.5, {}, only_masked); }, kNothingAllowed);
  const std::vector<uint32_t> none = mask_of(3, {});
  params.temperature = 0;
  expect_error([&] { draw_with(params, logits, 0.5, {}, none); }, kNothingAllowed);
  const std::vector<uint32_t> too_long(2, ~0u);
  expect_error([&] { draw_with(params, logits, 0.5, {}, too_long); }, "an allowed-token mask of 2 words does not fit 3 logits");
  const std::vector<TokenBias> outside = {{3, 1.0f}};
  expect_error([&] { draw_with(params, logits, 0.5, outside, {}); }, "token id 3 is outside the vocabulary");
}

TEST(Sampler, CheckLogitBiasNamesTheBadEntry) {
  std::vector<TokenBias> fine = {{5, 1.0f}, {2, -100.0f}, {9, 100.0f}};
  check_logit_bias(fine, 10);
  EXPECT_EQ(fine[0].id, 2);  // sorted
  const auto refuse = [](std::vector<TokenBias> biases, const std::string& message) {
    expect_error([&] { check_logit_bias(biases, 10); }, message);
  };
  refuse({{10, 1.0f}}, "logit_bias: token id 10 is outside the vocabulary of 10 tokens");
  refuse({{-1, 1.0f}}, "logit_bias: token id -1 is outside");
  refuse({{1, 1.0f}, {1, 2.0f}}, "logit_bias: token id 1 is given twice");
  refuse({{1, 100.5f}}, "logit_bias: the bias of token 1 must be in [-100, 100], got 100.5");
  refuse({{1, kNaN}}, "logit_bias: the bias of token 1 must be in [-100, 100], got nan");
}

}  // namespace
}  // namespace m1
