#pragma once
// Backend::sample against m1::sample_row, the reference draw: the cases every backend must
// reproduce (several draws on one row with their own penalties, truncations, log-probabilities,
// rows with no distribution).

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "m1/backend.h"
#include "m1/backends.h"
#include "m1/error.h"
#include "m1/sampler.h"

namespace m1 {

struct SamplingCase {
  int64_t rows = 0, vocab = 0;
  std::vector<float> logits;  // rows x vocab; row 1 has masked tokens, row 2 a NaN
  std::vector<int32_t> seen;
  std::vector<std::pair<int32_t, int32_t>> counts;
  std::vector<DrawRequest> draws;
};

inline SamplingCase sampling_case(int64_t vocab, uint64_t seed) {
  SamplingCase c;
  c.rows = 3;
  c.vocab = vocab;
  std::mt19937_64 rng(seed);
  c.logits.resize(size_t(c.rows * vocab));
  // Quantised, so that ties occur; a few masked tokens in row 1.
  for (float& logit : c.logits) logit = float(rng() % 2000) / 100.0f - 10.0f;
  for (int64_t i = 0; i < vocab; i += 3) c.logits[size_t(vocab + i)] = -std::numeric_limits<float>::infinity();
  c.logits[size_t(2 * vocab + vocab / 2)] = std::numeric_limits<float>::quiet_NaN();
  c.logits[0] = 10.5f;  // row 0's best is seen and generated: the penalties must move the greedy choice
  for (int32_t id = 0; id < int32_t(vocab); id += 5) c.seen.push_back(id);
  for (size_t i = 0; i < c.seen.size(); i += 2) c.counts.emplace_back(c.seen[i], int32_t(i % 3 + 1));

  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const auto draw = [&](int64_t row, float temperature, int top_k, float top_p, float min_p, bool penalties) {
    DrawRequest d;
    d.row = row;
    d.params.temperature = temperature;
    d.params.top_k = top_k;
    d.params.top_p = top_p;
    d.params.min_p = min_p;
    d.params.top_logprobs = int(rng() % 6);
    d.uniform = uniform(rng);
    if (penalties) {
      d.params.repetition_penalty = 1.3f;
      d.params.presence_penalty = 0.5f;
      d.params.frequency_penalty = 0.25f;
      d.seen = c.seen;
      d.generated_counts = c.counts;
    }
    c.draws.push_back(d);
  };
  for (int64_t row = 0; row < 2; ++row) {
    draw(row, 0.0f, 0, 1.0f, 0.0f, false);
    draw(row, 0.0f, 0, 1.0f, 0.0f, true);  // the same row, penalised for this draw only
    draw(row, 1.0f, 0, 1.0f, 0.0f, false);
    draw(row, 0.7f, 40, 1.0f, 0.05f, false);
    draw(row, 1.2f, 0, 0.9f, 0.0f, true);
    draw(row, 0.9f, 8, 0.5f, 0.02f, true);
  }
  draw(2, 1.0f, 0, 1.0f, 0.0f, false);  // NaN: no distribution
  return c;
}

// `logits` holds c.logits on the backend's device.
inline void expect_matches_sample_row(Backend& backend, const Mat& logits, const SamplingCase& c) {
  const std::vector<DrawOutcome> outcomes = backend.sample(logits, c.draws);
  ASSERT_EQ(outcomes.size(), c.draws.size());
  SampleScratch scratch;
  for (size_t i = 0; i < c.draws.size(); ++i) {
    const DrawRequest& d = c.draws[i];
    std::vector<float> row(c.logits.begin() + d.row * c.vocab, c.logits.begin() + (d.row + 1) * c.vocab);
    DrawOutcome expected;
    try {
      expected.token = sample_row(row, d, scratch);
    } catch (const Error& error) {
      expected.error = error.what();
    }
    EXPECT_EQ(outcomes[i].error, expected.error) << "draw " << i;
    if (!expected.error.empty()) continue;
    const SampledToken& got = outcomes[i].token;
    EXPECT_EQ(got.id, expected.token.id) << "draw " << i;
    EXPECT_NEAR(got.logprob, expected.token.logprob, 1e-5) << "draw " << i;
    ASSERT_EQ(got.top.size(), expected.token.top.size()) << "draw " << i;
    for (size_t t = 0; t < got.top.size(); ++t) {
      EXPECT_EQ(got.top[t].first, expected.token.top[t].first) << "draw " << i << " alternative " << t;
      EXPECT_NEAR(got.top[t].second, expected.token.top[t].second, 1e-5) << "draw " << i << " alternative " << t;
    }
  }
  EXPECT_EQ(outcomes.back().error, "logits contain NaN");
  // Draw 1's penalties are its own: draw 0 on the same row still sees the raw best.
  EXPECT_EQ(outcomes[0].token.id, 0);
  if (c.vocab > 1) {
    EXPECT_NE(outcomes[1].token.id, 0);
  }

  DrawRequest outside;
  outside.row = c.rows;
  EXPECT_THROW(backend.sample(logits, {&outside, 1}), Error);
}

}  // namespace m1
