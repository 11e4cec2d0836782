// Model::forward's step bracket (Backend::begin_step / end_step / abandon_step): when a backend
// reports that a step's calls did not run (a graph replay that failed its check, or an exception
// in the middle of a recording), the model makes them again, and the results are those of a
// backend that ran them the first time.

#include <gtest/gtest.h>

#include <cstring>
#include <stdexcept>

#include "forwarding_backend.h"
#include "m1/model.h"

namespace m1 {
namespace {

const std::string kModel = std::string(M1_SOURCE_DIR) + "/tests/data/golden/odd-f32";

// The CPU backend, playing a recording backend whose every step fails once: `kSkip` steps launch
// nothing (and end_step says so), `kThrow` steps throw at their first attention call (and
// abandon_step says nothing ran). The calls that would change a sequence's state or the step's
// results are the ones left out.
class PlayingBackend final : public ForwardingBackend {
 public:
  enum class Play { kPlain, kSkip, kThrow };
  PlayingBackend() : ForwardingBackend(create_backend(BackendOptions{"cpu", 2})) {}

  Play next = Play::kPlain;  // how the next step goes
  int reruns = 0;

  void begin_step(std::span<const Segment> segments, int64_t logit_rows) override {
    play_ = next;
    bracketed_ = true;
  }
  bool end_step() override {
    bracketed_ = false;
    const bool ran = play_ != Play::kSkip;
    play_ = Play::kPlain;
    reruns += !ran;
    return ran;
  }
  bool abandon_step() override {
    const bool nothing_ran = bracketed_ && play_ == Play::kThrow;
    bracketed_ = false;
    play_ = Play::kPlain;
    reruns += nothing_ran;
    return nothing_ran;
  }
  void embed(const Weight& table, int64_t first_token, std::span<const int32_t> tokens, Mat out) override {
    if (!skipped()) inner_->embed(table, first_token, tokens, out);
  }
  void matmul(const Mat& x, const Weight& w, Mat out, Rounding rounding) override {
    if (!skipped()) inner_->matmul(x, w, out, rounding);
  }
  void lightning_attention(Mat qkv, std::span<const Segment> segments, int64_t layer, const Weight& decay,
                           Mat out, Rounding rounding) override {
    if (play_ == Play::kThrow) throw std::runtime_error("capture failed");
    if (!skipped()) inner_->lightning_attention(qkv, segments, layer, decay, out, rounding);
  }
  void softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                         const AttentionParams& params, Mat out) override {
    if (!skipped()) inner_->softmax_attention(q, k, v, segments, layer, params, out);
  }
  void moe(const Mat& x, const MoeWeights& w, Mat out) override {
    if (!skipped()) inner_->moe(x, w, out);
  }

 private:
  bool skipped() const { return play_ == Play::kSkip; }
  Play play_ = Play::kPlain;
  bool bracketed_ = false;
};

// Logits of a prefill and eight decode steps of two sequences, with each step played as `plays`
// says in turn.
std::vector<float> run(Backend& backend, PlayingBackend* player, std::vector<PlayingBackend::Play> plays) {
  auto model = Model::load(kModel, backend);
  auto a = model->new_sequence(), b = model->new_sequence();
  const std::vector<int32_t> prompt_a{5, 17, 99, 4, 250, 31, 7}, prompt_b{61, 2, 140};
  std::vector<float> all;
  StepLogits logits;
  size_t steps = 0;
  auto step = [&](std::vector<BatchEntry> batch) {
    if (player) player->next = plays[steps++ % plays.size()];
    model->forward(batch, logits);
    for (size_t e = 0; e < batch.size(); ++e)
      for (int64_t i = 0; i < logits.rows(e); ++i) all.insert(all.end(), logits.row(e, i).begin(), logits.row(e, i).end());
  };
  step({{a.get(), prompt_a, LogitsFor::kAll}, {b.get(), prompt_b, LogitsFor::kLast}});
  for (int32_t t = 0; t < 8; ++t) {
    const int32_t token_a = 10 + t, token_b = 200 + t;
    step({{a.get(), std::span(&token_a, 1)}, {b.get(), std::span(&token_b, 1)}});
  }
  return all;
}

TEST(StepBracket, CallsThatDidNotRunAreMadeAgain) {
  auto plain = create_backend(BackendOptions{"cpu", 2});
  const std::vector<float> want = run(*plain, nullptr, {});
  using Play = PlayingBackend::Play;
  PlayingBackend player;
  const std::vector<float> got = run(player, &player, {Play::kSkip, Play::kPlain, Play::kThrow});
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
  EXPECT_EQ(player.reruns, 6);  // two of every three steps
}

// An exception the backend cannot take back (it says something ran) reaches the caller, and the
// sequence does not advance.
TEST(StepBracket, OtherExceptionsPropagate) {
  struct Failing final : ForwardingBackend {
    Failing() : ForwardingBackend(create_backend(BackendOptions{"cpu", 1})) {}
    void moe(const Mat&, const MoeWeights&, Mat) override { throw std::runtime_error("real fault"); }
  } failing;
  auto model = Model::load(kModel, failing);
  auto seq = model->new_sequence();
  const std::vector<int32_t> prompt{1, 2, 3};
  const BatchEntry entry{seq.get(), prompt};
  StepLogits logits;
  EXPECT_THROW(model->forward({&entry, 1}, logits), std::runtime_error);
  EXPECT_EQ(seq->length(), 0);
}

}  // namespace
}  // namespace m1
