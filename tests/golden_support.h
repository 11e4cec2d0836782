#pragma once
// The golden models of tests/data/golden (a prompt and its float64 reference logits), and what the CPU
// (test_golden) and CUDA (test_cuda_backend) tests do alike with them: read them, feed them, and
// check that batching and forking sequences change no logit.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "m1/model.h"

namespace m1::testing {

// The golden models live in tests/data/golden of the source tree. M1_GOLDEN_DIR in the environment
// overrides it: a GPU machine runs binaries built elsewhere (scripts/gpu-check.sh carries the golden
// vectors beside them).
inline std::string golden_root() {
  const char* env = std::getenv("M1_GOLDEN_DIR");
  return std::string(env ? env : M1_SOURCE_DIR "/tests/data/golden") + "/";
}

struct Golden {
  std::vector<int32_t> tokens, greedy;
  std::vector<float> logits;  // [tokens, vocab]
};

inline Golden read_golden(const std::string& dir) {
  Golden g;
  std::ifstream meta(dir + "/golden.json");
  auto j = nlohmann::json::parse(meta);
  g.tokens = j["tokens"].get<std::vector<int32_t>>();
  g.greedy = j["greedy_continuation"].get<std::vector<int32_t>>();
  std::ifstream raw(dir + "/golden_logits.f32", std::ios::binary);
  raw.seekg(0, std::ios::end);
  g.logits.resize(size_t(raw.tellg()) / sizeof(float));
  raw.seekg(0);
  raw.read(reinterpret_cast<char*>(g.logits.data()), std::streamsize(g.logits.size() * sizeof(float)));
  return g;
}

// Logits of every position of `tokens` fed to a fresh sequence in chunks of the given sizes (the
// last size repeats until the tokens are used up).
inline std::vector<float> run_chunked(Model& model, const std::vector<int32_t>& tokens,
                                      const std::vector<int64_t>& sizes) {
  auto seq = model.new_sequence();
  std::vector<float> all;
  StepLogits out;
  size_t pos = 0, next = 0;
  while (pos < tokens.size()) {
    const size_t n = std::min<size_t>(size_t(sizes[std::min(next++, sizes.size() - 1)]), tokens.size() - pos);
    BatchEntry e{seq.get(), std::span(tokens).subspan(pos, n), LogitsFor::kAll};
    model.forward({&e, 1}, out);
    for (int64_t i = 0; i < out.rows(0); ++i) all.insert(all.end(), out.row(0, i).begin(), out.row(0, i).end());
    pos += n;
  }
  EXPECT_EQ(seq->length(), int64_t(tokens.size()));
  return all;
}

// Two sequences of different lengths (the tokens and a part of them) prefilled in one step, then
// decoding together: each gets exactly the logits it gets alone.
inline void expect_batched_matches_solo(Model& model, const std::vector<int32_t>& tokens) {
  const std::vector<int32_t> b(tokens.begin() + 17, tokens.begin() + 140);
  auto solo = [&](const std::vector<int32_t>& prompt, int32_t next) {
    auto seq = model.new_sequence();
    StepLogits out;
    BatchEntry e{seq.get(), prompt, LogitsFor::kAll};
    model.forward({&e, 1}, out);
    std::vector<float> logits(out.row(0, 0).begin(), out.row(0, out.rows(0) - 1).end());
    BatchEntry d{seq.get(), std::span(&next, 1), LogitsFor::kLast};
    model.forward({&d, 1}, out);
    logits.insert(logits.end(), out.row(0, 0).begin(), out.row(0, 0).end());
    return logits;
  };
  const std::vector<float> solo_a = solo(tokens, 5), solo_b = solo(b, 9);

  auto seq_a = model.new_sequence(), seq_b = model.new_sequence();
  StepLogits out;
  BatchEntry prefill[2] = {{seq_a.get(), tokens, LogitsFor::kAll}, {seq_b.get(), b, LogitsFor::kAll}};
  model.forward(prefill, out);
  std::vector<float> batched_a(out.row(0, 0).begin(), out.row(0, out.rows(0) - 1).end());
  std::vector<float> batched_b(out.row(1, 0).begin(), out.row(1, out.rows(1) - 1).end());
  int32_t next_a = 5, next_b = 9;
  BatchEntry decode[2] = {{seq_b.get(), std::span(&next_b, 1), LogitsFor::kLast},
                          {seq_a.get(), std::span(&next_a, 1), LogitsFor::kLast}};
  model.forward(decode, out);
  batched_b.insert(batched_b.end(), out.row(0, 0).begin(), out.row(0, 0).end());
  batched_a.insert(batched_a.end(), out.row(1, 0).begin(), out.row(1, 0).end());
  EXPECT_EQ(batched_a, solo_a);
  EXPECT_EQ(batched_b, solo_b);
}

// A sequence forked after 100 tokens reports the original's size and continues exactly like it.
inline void expect_clone_continues_identically(Model& model, const std::vector<int32_t>& tokens) {
  auto seq = model.new_sequence();
  StepLogits out;
  const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + 100);
  BatchEntry e{seq.get(), prompt, LogitsFor::kNone};
  model.forward({&e, 1}, out);
  auto fork = seq->clone();
  EXPECT_EQ(fork->length(), 100);
  EXPECT_EQ(fork->bytes(), seq->bytes());
  const std::vector<int32_t> rest(tokens.begin() + 100, tokens.begin() + 130);
  BatchEntry a{seq.get(), rest, LogitsFor::kAll}, b{fork.get(), rest, LogitsFor::kAll};
  model.forward({&a, 1}, out);
  const std::vector<float> original(out.row(0, 0).begin(), out.row(0, 29).end());
  model.forward({&b, 1}, out);
  const std::vector<float> forked(out.row(0, 0).begin(), out.row(0, 29).end());
  EXPECT_EQ(original, forked);
}

// A test of the golden model its parameter names; the test loads model_ on the backend it wants.
class GoldenModelTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = golden_root() + GetParam();
    golden_ = read_golden(dir_);
  }
  std::vector<float> run_chunked(const std::vector<int64_t>& sizes) {
    return m1::testing::run_chunked(*model_, golden_.tokens, sizes);
  }

  std::string dir_;
  Golden golden_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;  // after backend_: destroyed first
};

}  // namespace m1::testing
