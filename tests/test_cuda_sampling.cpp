// The CUDA sampler against m1::sample_row, the host reference, on fresh random rows: every mix
// of greedy, plain, top-k, top-p, min-p and penalties, with top log-probabilities; several draws
// of one row with their own penalties in one call; rows without a distribution; and the same
// through the backend's public Backend::sample, which packs the draws itself. Set M1_TEST_SEED to
// replay a failure; every test prints the seed it used.
//
// The chosen ids must be EQUAL to the host's. The weights are the same bits on both sides
// (fast_exp.h), only the order of the double sums differs, so a different id needs the draw's
// target within about 1e-15 (relative) of a boundary between two tokens: never in practice.
// Log-probabilities are compared within 1e-5 absolute (the log-normaliser's sum order differs).

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_support.h"
#include "device_scratch.h"
#include "m1/backend.h"
#include "m1/error.h"
#include "m1/sampler.h"
#include "sampling.h"
#include "test_support.h"

namespace m1::cuda {
namespace {

using test::DeviceArray;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLogprobTolerance = 1e-5f;

// One draw as the host sampler states it, with the penalty lists, biases and mask it points into.
struct TestDraw {
  DrawRequest request;
  std::vector<int32_t> seen;
  std::vector<std::pair<int32_t, int32_t>> counts;
  std::vector<TokenBias> biases;
  std::vector<uint32_t> allowed;
};

// Logits on a grid of quarter steps, so ties are common, with a fraction of masked (-inf) tokens
// (never the whole row).
std::vector<float> random_row(int64_t vocab, double masked_fraction, float scale) {
  auto& rng = testing::rng();
  std::normal_distribution<float> normal(0.0f, scale);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<float> row(static_cast<size_t>(vocab));
  for (float& logit : row) logit = unit(rng) < masked_fraction ? kNegInf : std::round(normal(rng) * 4.0f) / 4.0f;
  row[size_t(std::uniform_int_distribution<int64_t>(0, vocab - 1)(rng))] = scale;
  return row;
}

// A sorted sample of distinct ids, and counts for a subset of them (the generated tokens).
void random_penalty_lists(int64_t vocab, TestDraw& draw) {
  auto& rng = testing::rng();
  const int64_t wanted = std::min<int64_t>(vocab, 1 + int64_t(rng() % 300));
  for (int64_t i = 0; i < wanted; ++i) draw.seen.push_back(int32_t(rng() % uint64_t(vocab)));
  std::ranges::sort(draw.seen);
  draw.seen.erase(std::unique(draw.seen.begin(), draw.seen.end()), draw.seen.end());
  for (int32_t id : draw.seen)
    if (rng() % 2) draw.counts.push_back({id, int32_t(1 + rng() % 4)});
}

// Random biases in [-100, 100] on a sorted sample of ids.
void random_biases(int64_t vocab, TestDraw& draw) {
  auto& rng = testing::rng();
  std::vector<int32_t> ids;
  for (int i = 0; i < 1 + int(rng() % 40); ++i) ids.push_back(int32_t(rng() % uint64_t(vocab)));
  std::ranges::sort(ids);
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  for (int32_t id : ids) draw.biases.push_back({id, float(int(rng() % 801) - 400) / 4.0f});
}

// A mask allowing each token with probability `share` (at least one token).
void random_mask(int64_t vocab, double share, TestDraw& draw) {
  auto& rng = testing::rng();
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  draw.allowed.assign(size_t((vocab + 31) / 32), 0);
  for (int64_t id = 0; id < vocab; ++id)
    if (unit(rng) < share) draw.allowed[size_t(id / 32)] |= 1u << (id % 32);
  const int64_t one = int64_t(rng() % uint64_t(vocab));
  draw.allowed[size_t(one / 32)] |= 1u << (one % 32);
}

// The request with its lists.
DrawRequest with_lists(const TestDraw& draw) {
  DrawRequest request = draw.request;
  request.seen = draw.seen;
  request.generated_counts = draw.counts;
  request.logit_bias = draw.biases;
  request.allowed = draw.allowed;
  return request;
}

// The host's answer for one draw, or the status its error stands for.
DrawResult host_result(const std::vector<float>& row, const TestDraw& draw) {
  const DrawRequest request = with_lists(draw);
  std::vector<float> scratch_row = row;
  SampleScratch scratch;
  DrawResult result;
  try {
    const SampledToken token = sample_row(scratch_row, request, scratch);
    result.id = token.id;
    result.logprob = token.logprob;
    result.top_count = int32_t(token.top.size());
    for (size_t i = 0; i < token.top.size(); ++i) {
      result.top_ids[i] = token.top[i].first;
      result.top_logprobs[i] = token.top[i].second;
    }
  } catch (const Error& e) {
    // The status whose message the backend reports is the host's, word for word.
    result.status = -1;
    for (int32_t status : {kDrawNan, kDrawAllMasked, kDrawPositiveInf, kDrawNothingAllowed})
      if (e.what() == std::string(draw_status_message(status))) result.status = status;
  }
  return result;
}

// Every draw on the device in one call.
std::vector<DrawResult> device_results(const std::vector<float>& logits, int64_t vocab,
                                       const std::vector<TestDraw>& draws) {
  std::vector<DeviceDraw> device_draws;
  std::vector<int32_t> seen, counts;
  std::vector<TokenBias> biases;
  std::vector<uint32_t> allowed;
  for (const TestDraw& draw : draws) {
    const SamplingParams& p = draw.request.params;
    DeviceDraw d;
    d.row = draw.request.row;
    d.temperature = p.temperature;
    d.top_p = p.top_p;
    d.min_p = p.min_p;
    d.top_k = p.top_k;
    d.top_logprobs = p.top_logprobs;
    d.uniform = draw.request.uniform;
    d.presence_penalty = p.presence_penalty;
    d.frequency_penalty = p.frequency_penalty;
    d.repetition_penalty = p.repetition_penalty;
    d.seen_begin = int64_t(seen.size());
    d.seen_count = int64_t(draw.seen.size());
    d.counts_begin = int64_t(counts.size() / 2);
    d.counts_count = int64_t(draw.counts.size());
    seen.insert(seen.end(), draw.seen.begin(), draw.seen.end());
    for (auto [id, count] : draw.counts) {
      counts.push_back(id);
      counts.push_back(count);
    }
    d.bias_begin = int64_t(biases.size());
    d.bias_count = int64_t(draw.biases.size());
    biases.insert(biases.end(), draw.biases.begin(), draw.biases.end());
    if (!draw.allowed.empty()) {
      d.allowed_begin = int64_t(allowed.size());
      allowed.insert(allowed.end(), draw.allowed.begin(), draw.allowed.end());
    }
    device_draws.push_back(d);
  }
  DeviceArray<float> device_logits(logits);
  DeviceArray<DeviceDraw> device_draw_array(device_draws);
  DeviceArray<int32_t> device_seen(seen), device_counts(counts);
  DeviceArray<TokenBias> device_biases(biases);
  DeviceArray<uint32_t> device_allowed(allowed);
  DeviceArray<DrawResult> results(draws.size());
  DeviceScratch scratch(nullptr);
  SampleArgs args;
  args.logits = device_logits.get();
  args.vocab = vocab;
  args.draws = device_draws;
  args.device_draws = device_draw_array.get();
  args.seen = device_seen.get();
  args.generated_counts = device_counts.get();
  args.biases = device_biases.get();
  args.allowed = device_allowed.get();
  args.results = results.get();
  sample(args, scratch, test::test_device(), nullptr);
  M1_CUDA_CHECK(cudaDeviceSynchronize());
  return results.download();
}

std::string describe(const TestDraw& draw) {
  const SamplingParams& p = draw.request.params;
  return "row " + std::to_string(draw.request.row) + " temperature " + std::to_string(p.temperature) +
         " top_k " + std::to_string(p.top_k) + " top_p " + std::to_string(p.top_p) + " min_p " +
         std::to_string(p.min_p) + " penalties " + std::to_string(!draw.seen.empty()) + " biases " +
         std::to_string(draw.biases.size()) + " mask " + std::to_string(!draw.allowed.empty()) + " top_logprobs " +
         std::to_string(p.top_logprobs) + " uniform " + std::to_string(draw.request.uniform);
}

// Runs the draws on both sides and compares them draw by draw.
void expect_matches_host(const std::vector<float>& logits, int64_t vocab, const std::vector<TestDraw>& draws) {
  SCOPED_TRACE("seed " + std::to_string(testing::seed()));
  const std::vector<DrawResult> device = device_results(logits, vocab, draws);
  ASSERT_EQ(device.size(), draws.size());
  for (size_t i = 0; i < draws.size(); ++i) {
    SCOPED_TRACE("vocab " + std::to_string(vocab) + ", draw " + std::to_string(i) + ": " + describe(draws[i]));
    const int64_t row = draws[i].request.row;
    const DrawResult expected =
        host_result(std::vector<float>(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab), draws[i]);
    ASSERT_NE(expected.status, -1) << "the host failed for another reason";
    ASSERT_EQ(device[i].status, expected.status);
    if (expected.status != kDrawOk) continue;
    EXPECT_EQ(device[i].id, expected.id);
    EXPECT_TRUE(std::isfinite(device[i].logprob));
    EXPECT_NEAR(device[i].logprob, expected.logprob, kLogprobTolerance);
    ASSERT_EQ(device[i].top_count, expected.top_count);
    for (int j = 0; j < expected.top_count; ++j) {
      EXPECT_EQ(device[i].top_ids[j], expected.top_ids[j]) << "alternative " << j;
      EXPECT_TRUE(std::isfinite(device[i].top_logprobs[j]));
      EXPECT_NEAR(device[i].top_logprobs[j], expected.top_logprobs[j], kLogprobTolerance) << "alternative " << j;
    }
  }
}

// Every mix of the options over `rows` random rows, draws spread across the rows so that several
// read the same row with different penalties.
void check_every_mix(int64_t vocab, int64_t rows) {
  auto& rng = testing::rng();
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<float> logits;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = random_row(vocab, r % 2 ? 0.3 : 0.0, r % 3 == 2 ? 8.0f : 2.0f);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  const int top_logprobs_choices[] = {0, 5, 20};
  std::vector<TestDraw> draws;
  auto add = [&](SamplingParams params, bool penalised) {
    TestDraw draw;
    draw.request.row = int64_t(draws.size()) % rows;
    params.top_logprobs = top_logprobs_choices[draws.size() % 3];
    if (penalised) {
      params.repetition_penalty = 1.3f;
      params.frequency_penalty = 0.5f;
      params.presence_penalty = 0.75f;
      random_penalty_lists(vocab, draw);
    }
    draw.request.params = params;
    // A grammar's mask on every third draw (wide or narrow), biases on every fourth.
    if (draws.size() % 3 == 1) random_mask(vocab, draws.size() % 2 ? 0.6 : 0.01, draw);
    if (draws.size() % 4 == 2) random_biases(vocab, draw);
    // Near the top, but not within rounding of it: there the tokens of negligible weight at the
    // end of the id order would each be a right answer.
    draw.request.uniform = draws.size() % 7 == 3 ? 0.0 : draws.size() % 7 == 5 ? 0.999999 : unit(rng);
    draws.push_back(std::move(draw));
  };
  for (bool penalised : {false, true}) {
    SamplingParams greedy;
    greedy.temperature = 0.0f;
    add(greedy, penalised);
    for (int top_k : {0, 1, 40, int(vocab) + 3})
      for (float top_p : {0.5f, 0.9f, 1.0f})
        for (float min_p : {0.0f, 0.05f}) {
          SamplingParams p;
          p.temperature = top_k == 40 ? 0.7f : 1.0f;
          p.top_k = top_k;
          p.top_p = top_p;
          p.min_p = min_p;
          add(p, penalised);
        }
  }
  expect_matches_host(logits, vocab, draws);
}

TEST(CudaSampling, MatchesHostOnTinyVocabularies) {
  M1_REQUIRE_CUDA();
  check_every_mix(1, 1);
  check_every_mix(7, 3);
}

TEST(CudaSampling, MatchesHostOnMidSizedVocabularies) {
  M1_REQUIRE_CUDA();
  check_every_mix(1000, 3);
  check_every_mix(50000, 2);
}

TEST(CudaSampling, MatchesHostOnTheModelVocabulary) {
  M1_REQUIRE_CUDA();
  check_every_mix(200064, 3);
}

// A flat row: the nucleus and the top-k set hold most of the vocabulary, so the selection runs
// its partitioning passes instead of finishing among the first survivors.
TEST(CudaSampling, MatchesHostWhenTheKeptSetIsLarge) {
  M1_REQUIRE_CUDA();
  const int64_t vocab = 60001;
  auto& rng = testing::rng();
  std::uniform_real_distribution<float> small(-0.5f, 0.5f);
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (float& logit : logits) logit = std::round(small(rng) * 64.0f) / 64.0f;
  std::vector<TestDraw> draws;
  for (int top_k : {0, 5000, 30000})
    for (float top_p : {0.3f, 0.95f, 1.0f}) {
      TestDraw draw;
      draw.request.params.top_k = top_k;
      draw.request.params.top_p = top_p;
      draw.request.params.top_logprobs = 20;
      draw.request.uniform = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
      draws.push_back(std::move(draw));
    }
  expect_matches_host(logits, vocab, draws);
}

// More draws than the launch has blocks: blocks take several draws each.
TEST(CudaSampling, MatchesHostWithManyDraws) {
  M1_REQUIRE_CUDA();
  const int64_t vocab = 3001, rows = 400;
  std::vector<float> logits;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = random_row(vocab, 0.1, 3.0f);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  std::vector<TestDraw> draws(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    TestDraw& draw = draws[size_t(r)];
    draw.request.row = r;
    draw.request.params.top_k = int(r % 3) * 20;
    draw.request.params.top_p = r % 2 ? 0.8f : 1.0f;
    draw.request.params.top_logprobs = int(r % 4);
    draw.request.uniform = double(r) / double(rows);
  }
  expect_matches_host(logits, vocab, draws);
}

// Rows of awkward shapes, each the first row of its own call: all logits equal (one tie across
// the row, so the nucleus is cut by id), one dominant logit (a nucleus of one), most tokens -inf,
// and a dominant logit over a tail below the near-top floor (a top-p that needs the tail finds
// its nucleus in the single-block selection instead of the multi-block passes).
enum class RowShape { kRandom, kAllEqual, kDominant, kMostlyMasked, kFarTail };

std::vector<float> shaped_row(int64_t vocab, RowShape shape) {
  auto& rng = testing::rng();
  std::vector<float> row;
  switch (shape) {
    case RowShape::kRandom: return random_row(vocab, 0.1, 2.0f);
    case RowShape::kAllEqual: return std::vector<float>(size_t(vocab), 0.75f);
    case RowShape::kDominant:
      row = random_row(vocab, 0.0, 1.0f);
      row[size_t(rng() % uint64_t(vocab))] = 40.0f;
      return row;
    case RowShape::kMostlyMasked: return random_row(vocab, 0.97, 3.0f);
    case RowShape::kFarTail:
      // Weights near e^-17.5, all below kNearTopWeight: from 1000 tokens on, they hold more than
      // the 1e-5 of the mass that top-p 0.99999 leaves out.
      row = random_row(vocab, 0.0, 0.2f);
      for (float& logit : row) logit -= 17.5f;
      row[size_t(rng() % uint64_t(vocab))] = 0.0f;
      return row;
  }
  return row;
}

// The draws of a nucleus-heavy mix: MiniMax-M1's recommended top-p 0.95 at temperature 1, top-p
// 1, top-k 1, min-p near 1 alone and under top-p, a top-p that reaches into a far tail, top-k 50
// under min-p (more than some rows have tokens with weight), and top-k with top-p, alone and under
// min-p (two searches when the k best are near-top tokens, the selection's quickselect when they
// are not: the dominant and far-tail rows), each with a uniform from the seed's stream, near 0 or
// near 1; penalties, biases and a mask on some.
std::vector<TestDraw> awkward_draws(int64_t vocab) {
  auto& rng = testing::rng();
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  struct Mix {
    float top_p;
    int top_k;
    float min_p;
  };
  const Mix mixes[] = {{0.95f, 0, 0.0f},    {1.0f, 0, 0.0f},   {1.0f, 1, 0.0f},     {1.0f, 0, 0.999f},
                       {0.95f, 0, 0.9999f}, {0.5f, 0, 0.05f}, {0.99999f, 0, 0.0f}, {1.0f, 50, 0.3f},
                       {0.8f, 40, 0.0f},    {0.9f, 7, 0.2f}};
  std::vector<TestDraw> draws;
  for (const Mix& mix : mixes)
    for (double uniform : {unit(rng), unit(rng), 0.0, 0.999999}) {
      TestDraw draw;
      draw.request.params.top_p = mix.top_p;
      draw.request.params.top_k = mix.top_k;
      draw.request.params.min_p = mix.min_p;
      draw.request.params.top_logprobs = int(draws.size() % 3) * 2;
      draw.request.uniform = uniform;
      if (draws.size() % 5 == 1) {
        draw.request.params.repetition_penalty = 1.2f;
        draw.request.params.presence_penalty = 0.5f;
        random_penalty_lists(vocab, draw);
      }
      if (draws.size() % 6 == 2) random_biases(vocab, draw);
      if (draws.size() % 7 == 3) random_mask(vocab, 0.5, draw);
      draws.push_back(std::move(draw));
    }
  return draws;
}

TEST(CudaSampling, MatchesHostOnAwkwardRows) {
  M1_REQUIRE_CUDA();
  for (int64_t vocab : {1, 2, 31, 1000, 65537})
    for (RowShape shape : {RowShape::kRandom, RowShape::kAllEqual, RowShape::kDominant, RowShape::kMostlyMasked,
                           RowShape::kFarTail}) {
      SCOPED_TRACE("shape " + std::to_string(int(shape)));
      expect_matches_host(shaped_row(vocab, shape), vocab, awkward_draws(vocab));
    }
}

// MiniMax-M1's recommended draw (top-p 0.95, temperature 1) at the model's vocabulary, one row
// of each shape.
TEST(CudaSampling, MatchesHostOnAwkwardRowsOfTheModelVocabulary) {
  M1_REQUIRE_CUDA();
  const int64_t vocab = 200064;
  const RowShape shapes[] = {RowShape::kAllEqual, RowShape::kDominant, RowShape::kMostlyMasked, RowShape::kFarTail};
  std::vector<float> logits;
  for (RowShape shape : shapes) {
    const std::vector<float> row = shaped_row(vocab, shape);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  std::vector<TestDraw> draws;
  for (double uniform : {0.3, 0.97})
    for (int64_t row = 0; row < std::ssize(shapes); ++row) {
      TestDraw draw;
      draw.request.row = row;
      draw.request.params.top_p = 0.95f;
      draw.request.params.top_logprobs = 5;
      draw.request.uniform = uniform;
      draws.push_back(std::move(draw));
    }
  expect_matches_host(logits, vocab, draws);
}

// Rows without a distribution fail their own draws only, with checked_max's precedence: NaN, then
// all -inf, then +inf.
TEST(CudaSampling, ReportsRowsWithoutADistribution) {
  M1_REQUIRE_CUDA();
  const int64_t vocab = 1500;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::vector<std::vector<float>> rows(6, random_row(vocab, 0.2, 2.0f));
  rows[1][700] = nan;
  std::fill(rows[2].begin(), rows[2].end(), kNegInf);
  rows[3][vocab - 1] = inf;
  rows[4][3] = inf;
  rows[4][1400] = nan;  // NaN wins over +inf
  rows[5][0] = -nan;
  std::vector<float> logits;
  for (const auto& row : rows) logits.insert(logits.end(), row.begin(), row.end());
  std::vector<TestDraw> draws(rows.size() * 2);
  for (size_t i = 0; i < draws.size(); ++i) {
    draws[i].request.row = int64_t(i % rows.size());
    draws[i].request.params.temperature = i < rows.size() ? 0.0f : 1.0f;
    draws[i].request.params.top_logprobs = 3;
    draws[i].request.uniform = 0.5;
  }
  expect_matches_host(logits, vocab, draws);
  const std::vector<DrawResult> device = device_results(logits, vocab, draws);
  const int32_t expected[] = {kDrawOk, kDrawNan, kDrawAllMasked, kDrawPositiveInf, kDrawNan, kDrawNan};
  for (size_t i = 0; i < draws.size(); ++i) EXPECT_EQ(device[i].status, expected[i % rows.size()]) << "draw " << i;
}

// The same call twice gives the same bits.
TEST(CudaSampling, IsDeterministic) {
  M1_REQUIRE_CUDA();
  const int64_t vocab = 200064;
  const std::vector<float> logits = random_row(vocab, 0.05, 1.0f);  // flat enough for a wide nucleus
  // The three ways a wide nucleus is found: top-p alone and top-k with top-p in the passes, and a
  // top-k past the near-top tokens (about 190,000 here) with top-p in the selection block.
  const int top_ks[] = {0, 100000, 195000};
  std::vector<TestDraw> draws(std::size(top_ks));
  for (size_t i = 0; i < draws.size(); ++i) {
    draws[i].request.params.top_p = 0.9f;
    draws[i].request.params.top_k = top_ks[i];
    draws[i].request.params.top_logprobs = 20;
    draws[i].request.uniform = 0.3 * double(i) + 0.1;
  }
  const std::vector<DrawResult> first = device_results(logits, vocab, draws);
  const std::vector<DrawResult> second = device_results(logits, vocab, draws);
  const auto bits = [](float value) { return std::bit_cast<uint32_t>(value); };
  for (size_t i = 0; i < draws.size(); ++i) {
    SCOPED_TRACE("draw " + std::to_string(i));
    ASSERT_EQ(first[i].status, kDrawOk);
    EXPECT_EQ(second[i].status, kDrawOk);
    EXPECT_EQ(first[i].id, second[i].id);
    EXPECT_EQ(bits(first[i].logprob), bits(second[i].logprob));
    ASSERT_EQ(first[i].top_count, second[i].top_count);
    for (int j = 0; j < first[i].top_count; ++j) {
      EXPECT_EQ(first[i].top_ids[j], second[i].top_ids[j]);
      EXPECT_EQ(bits(first[i].top_logprobs[j]), bits(second[i].top_logprobs[j]));
    }
  }
}

// Backend::sample packs each draw's penalty lists into one upload, skips the draws whose
// penalties name ids outside the row, and unpacks the results: mixed draws at the model's
// vocabulary, several of them on one row (the n choices of a prompt) with their own penalties.
TEST(CudaSampling, BackendSampleMatchesHostOnMixedDraws) {
  M1_REQUIRE_CUDA();
  const int64_t vocab = 200064, rows = 2;
  std::vector<float> logits;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = random_row(vocab, r == 1 ? 0.2 : 0.0, 3.0f);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  auto& rng = testing::rng();
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<TestDraw> draws;
  auto add = [&](int64_t row, float temperature, int top_k, float top_p, float min_p, int top_logprobs,
                 bool penalised) {
    TestDraw draw;
    draw.request.row = row;
    draw.request.params.temperature = temperature;
    draw.request.params.top_k = top_k;
    draw.request.params.top_p = top_p;
    draw.request.params.min_p = min_p;
    draw.request.params.top_logprobs = top_logprobs;
    draw.request.uniform = unit(rng);
    if (penalised) {
      draw.request.params.repetition_penalty = 1.2f;
      draw.request.params.frequency_penalty = 0.4f;
      draw.request.params.presence_penalty = 0.6f;
      random_penalty_lists(vocab, draw);
    }
    draws.push_back(std::move(draw));
  };
  add(0, 0.0f, 0, 1.0f, 0.0f, 0, false);
  add(0, 0.0f, 0, 1.0f, 0.0f, 0, true);
  {  // the row's best token generated twice: its penalties must move this greedy choice
    TestDraw& draw = draws.back();
    const int32_t best = int32_t(std::ranges::max_element(logits.begin(), logits.begin() + vocab) - logits.begin());
    if (!std::ranges::binary_search(draw.seen, best)) draw.seen.insert(std::ranges::upper_bound(draw.seen, best), best);
    std::erase_if(draw.counts, [&](const auto& entry) { return entry.first == best; });
    draw.counts.insert(std::ranges::upper_bound(draw.counts, std::pair(best, 0)), {best, 2});
  }
  add(0, 1.0f, 0, 1.0f, 0.0f, 3, true);
  add(0, 0.8f, 0, 0.9f, 0.0f, 0, true);
  // Penalties on an id outside the row: this draw fails alone, the ones after it still match.
  add(0, 1.0f, 0, 1.0f, 0.0f, 0, true);
  draws.back().seen.push_back(int32_t(vocab));
  add(0, 0.7f, 50, 1.0f, 0.05f, 20, false);
  for (int choice = 0; choice < 3; ++choice) add(1, 1.0f, 0, 0.95f, 0.0f, 5, true);
  add(1, 0.0f, 0, 1.0f, 0.0f, 20, true);
  add(1, 1.0f, 0, 1.0f, 0.0f, 0, false);
  // A grammar's masks and logit biases, one choice of the same row with each.
  add(1, 0.9f, 0, 0.95f, 0.0f, 3, true);
  random_mask(vocab, 0.05, draws.back());
  random_biases(vocab, draws.back());
  add(1, 0.0f, 0, 1.0f, 0.0f, 0, false);
  random_mask(vocab, 0.5, draws.back());
  // Each draw's own lists, alive for as long as the requests point into them.
  for (TestDraw& draw : draws) draw.request = with_lists(draw);

  auto backend = create_backend(BackendOptions{"cuda", 0, Precision::kFast, false});
  Buffer device_logits(*backend, rows, vocab);
  M1_CUDA_CHECK(cudaDeviceSynchronize());  // the allocation is ordered on the backend's stream
  M1_CUDA_CHECK(cudaMemcpy(device_logits.mat().data, logits.data(), logits.size() * sizeof(float),
                           cudaMemcpyHostToDevice));
  std::vector<DrawRequest> requests;
  for (const TestDraw& draw : draws) requests.push_back(draw.request);
  const std::vector<DrawOutcome> outcomes = backend->sample(device_logits.mat(), requests);

  SCOPED_TRACE("seed " + std::to_string(testing::seed()));
  ASSERT_EQ(outcomes.size(), draws.size());
  SampleScratch scratch;
  for (size_t i = 0; i < draws.size(); ++i) {
    SCOPED_TRACE("draw " + std::to_string(i) + ": " + describe(draws[i]));
    const int64_t row = draws[i].request.row;
    std::vector<float> host_row(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab);
    DrawOutcome expected;
    try {
      expected.token = sample_row(host_row, draws[i].request, scratch);
    } catch (const Error& e) {
      expected.error = e.what();
    }
    EXPECT_EQ(outcomes[i].error, expected.error);
    if (!expected.error.empty()) continue;
    const SampledToken& got = outcomes[i].token;
    EXPECT_EQ(got.id, expected.token.id);
    EXPECT_TRUE(std::isfinite(got.logprob));
    EXPECT_NEAR(got.logprob, expected.token.logprob, kLogprobTolerance);
    ASSERT_EQ(got.top.size(), expected.token.top.size());
    for (size_t t = 0; t < got.top.size(); ++t) {
      EXPECT_EQ(got.top[t].first, expected.token.top[t].first) << "alternative " << t;
      EXPECT_TRUE(std::isfinite(got.top[t].second));
      EXPECT_NEAR(got.top[t].second, expected.token.top[t].second, kLogprobTolerance) << "alternative " << t;
    }
  }
  EXPECT_NE(outcomes[1].token.id, outcomes[0].token.id) << "the penalised greedy draw kept the raw best";
  EXPECT_NE(outcomes[4].error, "") << "the draw whose penalties leave the row";
}

// Grammar masks and logit biases with every kind of draw, at awkward sizes and the model's: masks
// of one token, of tokens whose logits are all -inf (no distribution left), and with penalties.
TEST(CudaSampling, MasksAndBiasesMatchHost) {
  M1_REQUIRE_CUDA();
  for (int64_t vocab : {int64_t(37), int64_t(3001), int64_t(200064)}) {
    std::vector<float> logits = random_row(vocab, 0.1, 3.0f);
    const int64_t masked_out = int64_t(std::ranges::find(logits, kNegInf) - logits.begin());
    std::vector<TestDraw> draws;
    auto& rng = testing::rng();
    for (int kind = 0; kind < 12; ++kind) {
      TestDraw draw;
      draw.request.params.temperature = kind % 3 == 0 ? 0.0f : 0.8f;
      draw.request.params.top_k = kind % 4 == 1 ? 20 : 0;
      draw.request.params.top_p = kind % 5 == 2 ? 0.7f : 1.0f;
      draw.request.params.top_logprobs = kind % 2 ? 5 : 0;
      draw.request.uniform = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
      if (kind == 0 || kind == 1) {  // one token allowed
        draw.allowed.assign(size_t((vocab + 31) / 32), 0);
        const int64_t only = int64_t(rng() % uint64_t(vocab));
        draw.allowed[size_t(only / 32)] |= 1u << (only % 32);
      } else if (kind == 2 && masked_out < vocab) {  // only a -inf token allowed
        draw.allowed.assign(size_t((vocab + 31) / 32), 0);
        draw.allowed[size_t(masked_out / 32)] |= 1u << (masked_out % 32);
      } else {
        random_mask(vocab, kind % 2 ? 0.3 : 0.9, draw);
      }
      if (kind % 3 == 1) random_biases(vocab, draw);
      if (kind >= 9) {
        draw.request.params.repetition_penalty = 1.3f;
        draw.request.params.frequency_penalty = 0.5f;
        random_penalty_lists(vocab, draw);
      }
      draws.push_back(std::move(draw));
    }
    expect_matches_host(logits, vocab, draws);
    if (masked_out < vocab) {
      EXPECT_EQ(device_results(logits, vocab, draws)[2].status, kDrawNothingAllowed);
    }
  }
}

// A masked draw gives the same bits alone as beside other draws (their masks never reach it).
TEST(CudaSampling, MaskedDrawsAreBatchInvariant) {
  M1_REQUIRE_CUDA();
  const int64_t vocab = 50001;
  std::vector<float> logits;
  for (int r = 0; r < 3; ++r) {
    const std::vector<float> row = random_row(vocab, 0.0, 2.0f);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  std::vector<TestDraw> draws(6);
  for (size_t i = 0; i < draws.size(); ++i) {
    draws[i].request.row = int64_t(i % 3);
    draws[i].request.params.top_p = 0.9f;
    draws[i].request.params.top_logprobs = 2;
    draws[i].request.uniform = 0.1 + 0.15 * double(i);
    random_mask(vocab, i % 2 ? 0.02 : 0.5, draws[i]);
    if (i % 2) random_biases(vocab, draws[i]);
  }
  const std::vector<DrawResult> together = device_results(logits, vocab, draws);
  for (size_t i = 0; i < draws.size(); ++i) {
    TestDraw alone = draws[i];
    const std::vector<float> row(logits.begin() + alone.request.row * vocab, logits.begin() + (alone.request.row + 1) * vocab);
    alone.request.row = 0;
    const DrawResult single = device_results(row, vocab, {alone})[0];
    EXPECT_EQ(single.status, together[i].status) << "draw " << i;
    EXPECT_EQ(single.id, together[i].id) << "draw " << i;
    EXPECT_EQ(std::bit_cast<uint32_t>(single.logprob), std::bit_cast<uint32_t>(together[i].logprob)) << "draw " << i;
  }
}

TEST(CudaSampling, RejectsTooManyTopLogprobs) {
  M1_REQUIRE_CUDA();
  std::vector<DeviceDraw> draws(1);
  draws[0].top_logprobs = kMaxTopLogprobs + 1;
  DeviceScratch scratch(nullptr);
  SampleArgs args;
  args.vocab = 10;
  args.draws = draws;
  testing::expect_error([&] { sample(args, scratch, test::test_device(), nullptr); }, {"top_logprobs"});
}

}  // namespace
}  // namespace m1::cuda
