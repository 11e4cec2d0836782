// Continuous batching: requests that share steps get exactly what they get alone, in every
// arrival pattern; cancellation, limits and accounting hold.

#include <gtest/gtest.h>

#include <thread>

#include "m1/backends.h"
#include "m1/engine.h"
#include "m1/generation.h"
#include "lexer_bound.h"
#include "sampling_checks.h"
#include "schema_validator.h"
#include "test_support.h"

namespace m1 {
namespace {

const std::string kModel = std::string(M1_SOURCE_DIR) + "/tests/data/golden/odd-f32";

struct Outcome {
  std::vector<std::vector<int32_t>> tokens;  // per choice
  std::vector<std::string> text, finish, error;
  std::vector<char> request_fault;
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

// Drains a stream to its kDone.
Outcome collect(RequestStream& stream, int n) {
  Outcome o;
  o.tokens.resize(size_t(n));
  o.text.resize(size_t(n));
  o.finish.resize(size_t(n));
  o.error.resize(size_t(n));
  o.request_fault.resize(size_t(n));
  for (;;) {
    auto e = stream.next(std::chrono::seconds(60));
    if (!e) ADD_FAILURE() << "stream stalled";
    if (!e) return o;
    if (e->kind == GenerationEvent::Kind::kDone) {
      o.prompt_tokens = e->prompt_tokens;
      o.completion_tokens = e->completion_tokens;
      return o;
    }
    size_t c = size_t(e->choice);
    if (e->kind == GenerationEvent::Kind::kToken) o.tokens[c].push_back(e->token.id);
    if (e->kind == GenerationEvent::Kind::kFinish) {
      EXPECT_TRUE(o.finish[c].empty()) << "two finishes for choice " << c;
      o.finish[c] = e->finish_reason;
      o.error[c] = e->error;
      o.request_fault[c] = e->request_fault;
    }
    o.text[c] += e->text;
  }
}

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = create_backend(BackendOptions{"cpu", 2});
    model_ = Model::load(kModel, *backend_);
    tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::load(kModel + "/tokenizer.json"));
  }

  GenerationRequest request(int first_token, int length, int64_t max_tokens, float temperature = 0) {
    GenerationRequest r;
    for (int i = 0; i < length; ++i) r.prompt.push_back((first_token + 37 * i) % 600);
    r.max_tokens = max_tokens;
    r.sampling.temperature = temperature;
    r.sampling.seed = uint64_t(first_token);
    return r;
  }

  // The same request through the one-sequence generation loop.
  std::vector<int32_t> alone(const GenerationRequest& r) {
    GenerationParams p;
    p.sampling = r.sampling;
    p.max_tokens = r.max_tokens;
    p.stop = r.stop;
    return generate(*model_, *tokenizer_, r.prompt, p, [](std::string_view) {}).tokens;
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

// The model is not shared between threads: expected results are computed before the engine
// (whose thread drives the model) exists.
TEST_F(EngineTest, ConcurrentRequestsMatchSequentialResults) {
  std::vector<GenerationRequest> requests;
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < 7; ++i) {
    requests.push_back(request(11 * i + 1, 5 + 23 * i, 6 + i, i % 2 ? 0.9f : 0.0f));
    expected.push_back(alone(requests.back()));
  }
  Engine engine(*model_, *tokenizer_, EngineOptions{4, 0, 48, 64});
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (auto& r : requests) streams.push_back(engine.submit(r));
  for (size_t i = 0; i < requests.size(); ++i) {
    Outcome o = collect(*streams[i], 1);
    EXPECT_EQ(o.tokens[0], expected[i]) << "request " << i;
    EXPECT_EQ(o.finish[0], "length");
    EXPECT_EQ(o.prompt_tokens, int64_t(requests[i].prompt.size()));
    EXPECT_EQ(o.completion_tokens, requests[i].max_tokens);
  }
  EngineStats s = engine.stats();
  EXPECT_EQ(s.requests_started, 7);
  EXPECT_EQ(s.requests_finished, 7);
  EXPECT_EQ(s.running, 0);
  EXPECT_EQ(s.waiting, 0);
  EXPECT_EQ(s.time_to_first_token.count, 7);
}

TEST_F(EngineTest, ChoicesForkFromOnePrefill) {
  GenerationRequest r = request(5, 40, 12, 1.0f);
  r.n = 3;
  std::vector<std::vector<int32_t>> expected;
  for (int c = 0; c < 3; ++c) {
    GenerationRequest single = r;
    single.n = 1;
    single.sampling.seed = r.sampling.seed + uint64_t(c);
    expected.push_back(alone(single));
  }
  Engine engine(*model_, *tokenizer_, EngineOptions{8, 0, 512, 64});
  Outcome o = collect(*engine.submit(r), 3);
  for (int c = 0; c < 3; ++c) EXPECT_EQ(o.tokens[size_t(c)], expected[size_t(c)]) << "choice " << c;
  EXPECT_NE(o.tokens[0], o.tokens[1]);
  EXPECT_EQ(o.completion_tokens, 36);
}

TEST_F(EngineTest, StopStringsAndEndTokensFinishWithStop) {
  Engine engine(*model_, *tokenizer_, EngineOptions{});
  GenerationRequest r = request(3, 30, 20);
  Outcome free_run = collect(*engine.submit(r), 1);
  ASSERT_GE(free_run.tokens[0].size(), 10u);
  r.end_tokens = {free_run.tokens[0][4]};
  Outcome ended = collect(*engine.submit(r), 1);
  EXPECT_EQ(ended.finish[0], "stop");
  EXPECT_EQ(ended.tokens[0], std::vector<int32_t>(free_run.tokens[0].begin(), free_run.tokens[0].begin() + 5));
  GenerationRequest s = request(3, 30, 20);
  std::string text = free_run.text[0];
  ASSERT_GE(text.size(), 6u);
  s.stop = {text.substr(3, 2)};
  Outcome stopped = collect(*engine.submit(s), 1);
  EXPECT_EQ(stopped.finish[0], "stop");
  EXPECT_EQ(stopped.text[0], text.substr(0, text.find(s.stop[0])));
}

TEST_F(EngineTest, CancelledRequestsEndAndFreeTheirPlace) {
  Engine engine(*model_, *tokenizer_, EngineOptions{1, 0, 64, 8});
  auto slow = engine.submit(request(1, 10, 100000 / 2));
  auto queued = engine.submit(request(2, 10, 5));
  queued->cancel();
  slow->cancel();
  EXPECT_EQ(collect(*slow, 1).finish[0], "cancelled");
  EXPECT_EQ(collect(*queued, 1).finish[0], "cancelled");
  Outcome after = collect(*engine.submit(request(3, 10, 4)), 1);
  EXPECT_EQ(after.finish[0], "length");
  EngineStats s = engine.stats();
  EXPECT_EQ(s.requests_started, 3);
  EXPECT_EQ(s.requests_cancelled, 2);
  EXPECT_EQ(s.requests_finished, 1);
}

TEST_F(EngineTest, RejectsImpossibleOptions) {
  EXPECT_THROW(Engine(*model_, *tokenizer_, EngineOptions{0, 0, 64, 8}), Error);
  EXPECT_THROW(Engine(*model_, *tokenizer_, EngineOptions{4, 0, 0, 8}), Error);
  EXPECT_THROW(Engine(*model_, *tokenizer_, EngineOptions{4, 0, 64, 0}), Error);
  EXPECT_THROW(Engine(*model_, *tokenizer_, EngineOptions{4, model_->config().max_position_embeddings + 1, 64, 8}), Error);
}

TEST_F(EngineTest, RejectsWhatCanNeverRun) {
  Engine engine(*model_, *tokenizer_, EngineOptions{2, 64, 64, 1});
  EXPECT_THROW(engine.submit(GenerationRequest{}), Error);
  EXPECT_THROW(engine.submit(request(1, 64, 5)), Error);  // no room left in a 64-token context
  GenerationRequest too_many = request(1, 5, 5);
  too_many.n = 3;
  EXPECT_THROW(engine.submit(too_many), Error);
  GenerationRequest bad = request(1, 5, 5);
  bad.sampling.top_p = 0;
  EXPECT_THROW(engine.submit(bad), Error);
  // The context bounds generation: 60 prompt tokens leave 4.
  Outcome o = collect(*engine.submit(request(1, 60, 50)), 1);
  EXPECT_EQ(o.tokens[0].size(), 4u);
  EXPECT_EQ(o.finish[0], "length");
}

TEST_F(EngineTest, BackendSamplingMatchesSampleRow) {
  for (int64_t vocab : {1, 7, 1000, 50000}) {
    const SamplingCase c = sampling_case(vocab, 17 + uint64_t(vocab));
    Buffer logits(*backend_, c.rows, c.vocab);
    std::copy(c.logits.begin(), c.logits.end(), logits.mat().data);  // the CPU backend's memory is the host's
    SCOPED_TRACE(vocab);
    expect_matches_sample_row(*backend_, logits.mat(), c);
  }
}

TEST_F(EngineTest, FullQueueIsBusy) {
  Engine engine(*model_, *tokenizer_, EngineOptions{1, 0, 64, 1});
  auto running = engine.submit(request(1, 10, 5000));
  // Wait until the first is admitted so the queue holds exactly what we add next.
  while (engine.stats().waiting > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto queued = engine.submit(request(2, 10, 5));
  EXPECT_THROW(engine.submit(request(3, 10, 5)), EngineBusy);
  running->cancel();
  EXPECT_EQ(collect(*queued, 1).finish[0], "length");
}

// A schema whose documents a random model finishes in a few dozen tokens.
const char* kSmallSchema = R"({"type": "object", "properties": {
    "mood": {"enum": ["calm", "busy", "odd"]}, "level": {"type": "integer", "minimum": -5, "maximum": 99},
    "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    "note": {"type": "string", "maxLength": 6}},
    "required": ["mood", "level", "flags"], "additionalProperties": false})";

std::shared_ptr<OutputGrammar> small_grammar() {
  OutputFormat format;
  format.document = OutputFormat::Document::kSchema;
  format.schema = nlohmann::ordered_json::parse(kSmallSchema);
  format.schema_what = "schema";
  return compile_output_grammar(format);
}

// Every constrained output that ends with "stop" is a valid document; those cut by max_tokens end
// with "length". Choices and requests sharing steps keep their own masks: the same outputs as
// each alone.
TEST_F(EngineTest, ConstrainedOutputsAreValidAndBatchInvariant) {
  const testing::SchemaValidator validator(nlohmann::json::parse(kSmallSchema));
  const int32_t end = *tokenizer_->token_id("<end_of_sentence>");
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 6; ++i) {
    GenerationRequest r = request(7 * i + 2, 9 + 5 * i, 80, i % 3 == 0 ? 0.0f : 1.0f);
    r.end_tokens = {end};
    if (i != 4) r.grammar = small_grammar();  // one unconstrained request shares the steps
    r.n = i == 1 ? 3 : 1;
    requests.push_back(r);
  }
  std::vector<Outcome> alone_outcomes;
  {
    Engine engine(*model_, *tokenizer_, EngineOptions{1, 0, 512, 64});
    for (GenerationRequest& r : requests) {
      GenerationRequest single = r;
      single.n = 1;
      for (int c = 0; c < r.n; ++c) {
        single.sampling.seed = r.sampling.seed + uint64_t(c);
        alone_outcomes.push_back(collect(*engine.submit(single), 1));
      }
    }
  }
  Engine engine(*model_, *tokenizer_, EngineOptions{8, 0, 96, 64});
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (auto& r : requests) streams.push_back(engine.submit(r));
  size_t k = 0;
  int documents = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const Outcome o = collect(*streams[i], requests[i].n);
    for (int c = 0; c < requests[i].n; ++c, ++k) {
      SCOPED_TRACE(fmt::format("request {} choice {}", i, c));
      EXPECT_EQ(o.tokens[size_t(c)], alone_outcomes[k].tokens[0]);
      if (!requests[i].grammar) continue;
      if (o.finish[size_t(c)] == "stop") {
        ++documents;
        EXPECT_EQ(validator.check_text(o.text[size_t(c)]), "") << o.text[size_t(c)];
      } else {
        EXPECT_EQ(o.finish[size_t(c)], "length");
      }
    }
  }
  EXPECT_GE(documents, 4) << "too few documents finished to check";
}

// A request whose output format needs more lexer states than its bound allows fails alone, as its
// own fault (finish "error", request_fault, counted as refused), mid-generation; a request sharing
// its steps gets what it gets alone.
TEST_F(EngineTest, AGrammarPastItsBoundFailsAloneAsTheRequestsFault) {
  const int32_t end = *tokenizer_->token_id("<end_of_sentence>");
  OutputFormat format;
  format.document = OutputFormat::Document::kSchema;
  format.schema = nlohmann::ordered_json::parse(kSmallSchema);
  format.max_lexer_states = testing::least_lexer_bound(format);
  GenerationRequest bounded = request(3, 10, 40);
  bounded.end_tokens = {end};
  bounded.grammar = compile_output_grammar(format);
  GenerationRequest other = request(8, 12, 40, 1.0f);
  other.end_tokens = {end};
  other.grammar = small_grammar();
  Engine alone(*model_, *tokenizer_, EngineOptions{});
  const Outcome expected = collect(*alone.submit(other), 1);

  Engine engine(*model_, *tokenizer_, EngineOptions{8, 0, 96, 64});
  const auto bounded_stream = engine.submit(bounded);
  const auto other_stream = engine.submit(other);
  const Outcome refused = collect(*bounded_stream, 1);
  EXPECT_EQ(refused.finish[0], "error");
  EXPECT_TRUE(refused.request_fault[0]);
  EXPECT_NE(refused.error[0].find(fmt::format("needs more than {} lexer states", format.max_lexer_states)),
            std::string::npos)
      << refused.error[0];
  const Outcome shared = collect(*other_stream, 1);
  EXPECT_EQ(shared.tokens[0], expected.tokens[0]);
  EXPECT_EQ(shared.finish[0], expected.finish[0]);
  EXPECT_FALSE(shared.request_fault[0]);
  const EngineStats stats = engine.stats();
  EXPECT_EQ(stats.requests_refused, 1);
  EXPECT_EQ(stats.requests_failed, 0);
}

// A grammar cut by max_tokens ends with "length"; a whole one ends without the end token.
TEST_F(EngineTest, ConstrainedOutputsEndWhenWhole) {
  OutputFormat format;
  format.document = OutputFormat::Document::kSchema;
  format.schema = nlohmann::ordered_json::parse(R"({"enum": ["yes", "no"]})");
  GenerationRequest r = request(5, 12, 30);
  r.grammar = compile_output_grammar(format);
  Engine engine(*model_, *tokenizer_, EngineOptions{});
  const Outcome whole = collect(*engine.submit(r), 1);
  EXPECT_EQ(whole.finish[0], "stop");
  EXPECT_TRUE(whole.text[0] == "\"yes\"" || whole.text[0] == "\"no\"") << whole.text[0];
  r.max_tokens = 1;
  r.grammar = small_grammar();
  const Outcome cut = collect(*engine.submit(r), 1);
  EXPECT_EQ(cut.finish[0], "length");
  EXPECT_EQ(cut.text[0].substr(0, 1), "{");
}

// Masks and biases apply once, to the logits the ranks gather: over two CPU ranks constrained and
// biased requests sharing steps get the outputs they get on one (exact precision, where the ranks'
// logits differ from one rank's only in the order of the sums, far below any greedy margin here).
TEST_F(EngineTest, ConstrainedAndBiasedOutputsAreTheSameOverTwoRanks) {
  const int32_t end = *tokenizer_->token_id("<end_of_sentence>");
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 4; ++i) {
    GenerationRequest r = request(11 * i + 3, 7 + 4 * i, 80, i % 2 == 0 ? 1.0f : 0.0f);
    r.end_tokens = {end};
    if (i != 2) r.grammar = small_grammar();
    if (i >= 2) r.logit_bias = {{int32_t(60 + i), 30.0f}, {int32_t(61 + i), -100.0f}};
    requests.push_back(r);
  }
  auto outcomes = [&](Model& model) {
    Engine engine(model, *tokenizer_, EngineOptions{8, 0, 96, 64});
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (const GenerationRequest& r : requests) streams.push_back(engine.submit(r));
    std::vector<Outcome> out;
    for (auto& s : streams) out.push_back(collect(*s, 1));
    return out;
  };
  auto one_backend = create_backend(BackendOptions{"cpu", 2, Precision::kExact});
  auto one = Model::load(kModel, *one_backend);
  BackendOptions two_ranks{"cpu", 2, Precision::kExact};
  two_ranks.tensor_parallel = 2;
  auto backends = create_backends(two_ranks);
  auto two = Model::load(kModel, rank_pointers(backends));
  const std::vector<Outcome> want = outcomes(*one), got = outcomes(*two);
  const testing::SchemaValidator validator(nlohmann::json::parse(kSmallSchema));
  int documents = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(got[i].tokens, want[i].tokens);
    EXPECT_EQ(got[i].finish, want[i].finish);
    if (requests[i].grammar && got[i].finish[0] == "stop") {
      ++documents;
      EXPECT_EQ(validator.check_text(got[i].text[0]), "") << got[i].text[0];
    }
    if (!requests[i].logit_bias.empty()) {
      for (int32_t t : got[i].tokens[0]) EXPECT_NE(t, requests[i].logit_bias[1].id);
    }
  }
  EXPECT_GE(documents, 2) << "too few documents finished to check";
}

TEST_F(EngineTest, LogitBiasSteersEveryDraw) {
  Engine engine(*model_, *tokenizer_, EngineOptions{});
  GenerationRequest r = request(9, 10, 6);
  r.logit_bias = {{97, 100.0f}};  // 'a'
  const Outcome o = collect(*engine.submit(r), 1);
  EXPECT_EQ(o.tokens[0], std::vector<int32_t>(6, 97));
  GenerationRequest bad = request(9, 10, 6);
  bad.logit_bias = {{int32_t(model_->config().vocab_size), 1.0f}};
  testing::expect_error([&] { engine.submit(bad); }, {"logit_bias: token id 700 is outside the vocabulary"});
  bad.logit_bias = {{3, 101.0f}};
  testing::expect_error([&] { engine.submit(bad); }, {"logit_bias: the bias of token 3 must be in [-100, 100]"});
}

}  // namespace
}  // namespace m1
