// Faults a running server must survive: its checkpoint going away, a request whose computation
// fails (alone, or with its forward step), capacity running out (queue and sequence-state
// budget), and client errors the other server tests leave out.

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <fstream>
#include <future>
#include <stdexcept>

#include "m1/engine.h"
#include "forwarding_backend.h"
#include "lexer_bound.h"
#include "m1/model.h"
#include "server_harness.h"

namespace m1 {
namespace {

using namespace m1::testing;

// Writes NaN over the embedding of `token`: every sequence holding it gets NaN logits, which the
// sampler refuses. Rows are independent in every kernel, so no other sequence sees the NaN.
void poison_embedding(const fs::path& model_dir, int32_t token) {
  std::fstream file(model_dir / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  uint64_t header_bytes = 0;
  file.read(reinterpret_cast<char*>(&header_bytes), sizeof header_bytes);
  std::string header(header_bytes, '\0');
  file.read(header.data(), std::streamsize(header_bytes));
  const ordered_json embedding = ordered_json::parse(header)["model.embed_tokens.weight"];
  ASSERT_EQ(embedding["dtype"], "BF16");
  const int64_t hidden = embedding["shape"][1];
  const std::vector<uint16_t> nan(size_t(hidden), 0x7FC0);  // bf16 quiet NaN
  file.seekp(std::streamoff(sizeof header_bytes + header_bytes + embedding["data_offsets"][0].get<uint64_t>() +
                            uint64_t(token * hidden) * sizeof(uint16_t)));
  file.write(reinterpret_cast<const char*>(nan.data()), std::streamsize(nan.size() * sizeof(uint16_t)));
  ASSERT_TRUE(file.flush());
}

class ServerFaultTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = make_model(::testing::UnitTest::GetInstance()->current_test_info()->name()); }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
};

// The weights are mapped and the tokenizer is in memory: a checkpoint that goes away (made
// unreadable, renamed, deleted) after the start changes nothing for the running server.
TEST_F(ServerFaultTest, ServesOnWhenTheCheckpointGoesAway) {
  ServerProcess server(dir_, {"--max-context", "512"});
  const Client client(server.port());
  const std::vector<std::pair<std::string, ordered_json>> requests = {
      {"/v1/chat/completions", chat_request("Are you still there?", 24)},
      {"/v1/completions", completion_request("Still there", 24)}};
  std::vector<std::string> before;
  for (const auto& [path, body] : requests) before.push_back(text_of(client.post(path, body).json));

  const fs::path model = dir_ / "tiny", moved = dir_ / "moved";
  fs::permissions(model, fs::perms::none);
  fs::rename(model, moved);
  fs::permissions(moved, fs::perms::owner_all);
  fs::remove_all(moved);
  ASSERT_FALSE(fs::exists(moved));

  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& [path, body] = requests[i];
    const Reply whole = client.post(path, body);
    ASSERT_EQ(whole.status, 200) << whole.body;
    EXPECT_EQ(text_of(whole.json), before[i]) << path;
    EXPECT_EQ(text_of(client.stream(path, streamed(body))), before[i]) << path;
  }
  EXPECT_EQ(client.post("/tokenize", {{"prompt", "Hello"}}).status, 200);
  EXPECT_EQ(client.get("/health").status, 200);
  EXPECT_TRUE(server.running());
}

// A request whose logits are NaN fails with a 500 (an error event when streamed) and a logged
// reason; the requests decoding beside it in the same steps finish as they would alone.
TEST_F(ServerFaultTest, ARequestThatFailsFailsAlone) {
  const int32_t poison = 1000;
  poison_embedding(dir_ / "tiny", poison);
  ServerProcess server(dir_, {"--max-context", "2048", "--max-batch", "8"});
  const Client client(server.port());
  std::vector<ordered_json> healthy;
  std::vector<std::string> alone;
  for (const std::string prompt : {"First healthy story", "Second healthy story", "Third healthy story"}) {
    healthy.push_back(streamed(completion_request(prompt, 2000)));
    alone.push_back(text_of(client.post("/v1/completions", completion_request(prompt, 2000)).json));
  }

  std::vector<std::future<std::string>> running;
  for (const ordered_json& request : healthy)
    running.push_back(std::async(std::launch::async, [&] { return text_of(client.stream("/v1/completions", request)); }));
  ASSERT_TRUE(eventually([&] { return metric(client.get("/metrics").body, "m1_requests_running") == 3; }));
  const ordered_json poisoned = {{"prompt", {5, poison, 7}}, {"max_tokens", 8}, {"temperature", 0}};
  const Reply failed = client.post("/v1/completions", poisoned);
  const Stream failed_stream = client.stream("/v1/completions", streamed(poisoned));
  EXPECT_EQ(metric(client.get("/metrics").body, "m1_requests_running"), 3) << "the healthy requests still run";

  EXPECT_EQ(failed.status, 500) << failed.body;
  EXPECT_EQ(failed.json["error"]["type"], "server_error");
  EXPECT_NE(failed.json["error"]["message"].get<std::string>().find("NaN"), std::string::npos) << failed.body;
  ASSERT_TRUE(failed_stream.done());
  EXPECT_EQ(failed_stream.chunks().back()["error"]["type"], "server_error");
  for (size_t i = 0; i < healthy.size(); ++i) EXPECT_EQ(running[i].get(), alone[i]) << "request " << i;
  EXPECT_NE(server.log().find("request failed: logits contain NaN"), std::string::npos) << server.log();
  const std::string metrics = idle_metrics(client);
  expect_balanced(metrics);
  EXPECT_EQ(engine_requests(metrics, "failed"), 2);
}

// A response_format whose matching needs more lexer states than --max-grammar-states allows, once
// generation is under way: a 400 naming response_format (an error event of that type when
// streamed), counted as refused, and the server serves on. The bound is the least one the format
// compiles under, so the first token's mask passes it.
TEST_F(ServerFaultTest, AGrammarPastTheServersBoundIsTheClientsError) {
  const ordered_json schema = ordered_json::parse(R"({"type": "object", "properties": {
      "id": {"type": "string", "pattern": "^[a-f0-9]{8}-x$"}}, "required": ["id"]})");
  OutputFormat format;  // what /v1/completions makes of the response_format below
  format.document = OutputFormat::Document::kSchema;
  format.schema = schema;
  const int32_t bound = least_lexer_bound(format);
  ServerProcess server(dir_, {"--max-context", "512", "--max-grammar-states", std::to_string(bound)});
  const Client client(server.port());
  ordered_json request = completion_request("An id", 24);
  request["response_format"] = {{"type", "json_schema"}, {"json_schema", {{"name", "id"}, {"schema", schema}}}};

  const Reply whole = client.post("/v1/completions", request);
  EXPECT_EQ(whole.status, 400) << whole.body;
  EXPECT_EQ(whole.json["error"]["type"], "invalid_request_error") << whole.body;
  EXPECT_EQ(whole.json["error"]["param"], "response_format") << whole.body;
  EXPECT_NE(whole.json["error"]["message"].get<std::string>().find(
                fmt::format("response_format: the output format needs more than {} lexer states", bound)),
            std::string::npos)
      << whole.body;
  const Stream stream = client.stream("/v1/completions", streamed(request));
  ASSERT_TRUE(stream.done());
  EXPECT_EQ(stream.chunks().back()["error"]["type"], "invalid_request_error");
  EXPECT_EQ(stream.chunks().back()["error"]["param"], "response_format");

  // A format that needs more states than the bound already to compile: refused before the engine.
  format.schema["properties"]["other"] = {{"type", "string"}, {"pattern", "^[0-9]+(ab|cd)*$"}};
  format.schema["properties"]["more"] = {{"type", "array"}, {"items", {{"type", "number"}}}};
  ASSERT_GT(least_lexer_bound(format), bound);
  request["response_format"]["json_schema"]["schema"] = format.schema;
  const Reply early = client.post("/v1/completions", request);
  EXPECT_EQ(early.status, 400) << early.body;
  EXPECT_EQ(early.json["error"]["param"], "response_format") << early.body;
  EXPECT_NE(early.json["error"]["message"].get<std::string>().find(
                fmt::format("response_format: the output format needs more than {} lexer states", bound)),
            std::string::npos)
      << early.body;

  EXPECT_EQ(client.post("/v1/completions", completion_request("Unconstrained", 8)).status, 200);
  const std::string metrics = idle_metrics(client);
  expect_balanced(metrics);
  EXPECT_EQ(engine_requests(metrics, "refused"), 2);
  EXPECT_EQ(engine_requests(metrics, "failed"), 0);
}

// One request runs; the next would fit the batch but not the state budget, so it waits; the one
// after finds the queue full and is told to come back.
TEST_F(ServerFaultTest, AFullStateBudgetQueuesThenAnswers503) {
  const int64_t context = 2048;
  const double budget_mb = 1.25 * double(cpu_state_bytes(dir_ / "tiny", context)) / (1 << 20);
  ServerProcess server(dir_, {"--max-batch", "8", "--max-queue", "1", "--max-context", std::to_string(context),
                              "--max-state-mb", std::to_string(budget_mb)});
  const Client client(server.port());
  std::future<Reply> queued;
  Reply busy;
  std::string during;
  client.stream("/v1/completions", streamed(completion_request("A long story", 2000)), [&](const ordered_json&) {
    queued = std::async(std::launch::async, [&] { return client.post("/v1/completions", completion_request("Next", 1000)); });
    eventually([&] { return metric(during = client.get("/metrics").body, "m1_requests_waiting") == 1; });
    busy = client.post("/v1/completions", completion_request("One too many", 4));
    return false;  // leaving cancels the long request, which frees the state the queued one waits for
  });
  EXPECT_EQ(metric(during, "m1_requests_waiting"), 1) << during;
  EXPECT_EQ(metric(during, "m1_requests_running"), 1) << during;
  EXPECT_GT(metric(during, "m1_state_bytes"), 0) << during;
  EXPECT_EQ(busy.status, 503) << busy.body;
  EXPECT_EQ(busy.json["error"]["type"], "server_busy");
  EXPECT_EQ(busy.retry_after, "1");
  EXPECT_EQ(queued.get().status, 200);
  const Reply too_many = client.post("/v1/completions", [] {
    ordered_json request = completion_request("Two long ones", 2000);
    request["n"] = 2;
    return request;
  }());
  EXPECT_EQ(too_many.status, 400) << too_many.body;
  EXPECT_EQ(too_many.json["error"]["param"], "n");
  expect_balanced(idle_metrics(client));
}

// Sends raw bytes to the server and returns what it answers within a second.
std::string send_raw(int port, const std::string& bytes) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  const timeval patience{1, 0};  // the answer comes at once, but the connection may stay open
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(uint16_t(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address), 0);
  EXPECT_EQ(::send(fd, bytes.data(), bytes.size(), 0), ssize_t(bytes.size()));
  std::string answer;
  char buffer[4096];
  for (ssize_t n; (n = ::recv(fd, buffer, sizeof buffer, 0)) > 0;) answer.append(buffer, size_t(n));
  ::close(fd);
  return answer;
}

// The 4xx answers test_server and test_server_api leave out, over HTTP (docs/bad-input.md).
TEST_F(ServerFaultTest, RemainingClientErrorsAreOpenAiErrors) {
  struct Case {
    std::string name, path, body;
    int status;
    std::string param;
  };
  const std::string chat = "/v1/chat/completions", completions = "/v1/completions";
  const std::string user = R"("messages": [{"role": "user", "content": "hi"}])";
  const std::string deep_arguments = std::string(100, '[') + std::string(100, ']');
  const ordered_json deep_call = {{"messages",
                                   {{{"role", "assistant"},
                                     {"content", nullptr},
                                     {"tool_calls",
                                      {{{"id", "c1"},
                                        {"type", "function"},
                                        {"function", {{"name", "f"}, {"arguments", deep_arguments}}}}}}}}}};
  const std::vector<Case> cases = {
      {"messages not an array", chat, R"({"messages": "hi"})", 400, "messages"},
      {"tools malformed", chat, "{" + user + R"(, "tools": [1]})", 400, "tools[0]"},
      {"tool arguments nested too deep", chat, deep_call.dump(), 400, "messages[0].tool_calls[0].function.arguments"},
      {"tool_choice unknown", chat, "{" + user + R"(, "tool_choice": "sometimes"})", 400, "tool_choice"},
      {"tool_choice malformed", chat, "{" + user + R"(, "tool_choice": {"type": "x"}})", 400, "tool_choice"},
      {"top_k below -1", chat, "{" + user + R"(, "top_k": -2})", 400, "top_k"},
      {"min_p out of range", chat, "{" + user + R"(, "min_p": 1.5})", 400, "min_p"},
      {"presence_penalty out of range", chat, "{" + user + R"(, "presence_penalty": 3})", 400, "presence_penalty"},
      {"frequency_penalty out of range", chat, "{" + user + R"(, "frequency_penalty": -3})", 400, "frequency_penalty"},
      {"repetition_penalty out of range", chat, "{" + user + R"(, "repetition_penalty": 0})", 400, "repetition_penalty"},
      {"seed not an integer", chat, "{" + user + R"(, "seed": "x"})", 400, "seed"},
      {"max_completion_tokens zero", chat, "{" + user + R"(, "max_completion_tokens": 0})", 400, "max_completion_tokens"},
      {"seventeen stop strings", chat, "{" + user + R"(, "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]})",
       400, "stop"},
      {"stream_options not an object", chat, "{" + user + R"(, "stream": true, "stream_options": 1})", 400, "stream_options"},
      {"include_usage not a boolean", chat, "{" + user + R"(, "stream": true, "stream_options": {"include_usage": 1}})",
       400, "stream_options.include_usage"},
      {"response_format not an object", chat, "{" + user + R"(, "response_format": "json"})", 400, "response_format"},
      {"logit_bias id outside the vocabulary", chat, "{" + user + R"(, "logit_bias": {"99999999": 1}})", 400, "logit_bias"},
      {"logit_bias key not an id", chat, "{" + user + R"(, "logit_bias": {"five": 1}})", 400, "logit_bias"},
      {"response_format of an unknown type", chat, "{" + user + R"(, "response_format": {"type": "yaml"}})", 400,
       "response_format"},
      {"a schema no document satisfies", chat,
       "{" + user + R"(, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema":
           {"type": "integer", "minimum": 3, "maximum": 1}}}})",
       400, "response_format"},
      {"prompt missing", completions, "{}", 400, "prompt"},
      {"prompt of another type", completions, R"({"prompt": 5})", 400, "prompt"},
      {"prompt token out of range", completions, R"({"prompt": [1, 99999]})", 400, "prompt"},
      {"prompt empty", completions, R"({"prompt": ""})", 400, "prompt"},
      {"suffix", completions, R"({"prompt": "a", "suffix": "b"})", 400, "suffix"},
      {"best_of", completions, R"({"prompt": "a", "best_of": 2})", 400, "best_of"},
      {"logprobs above 20", completions, R"({"prompt": "a", "logprobs": 30})", 400, "logprobs"},
      {"tokenize without input", "/tokenize", "{}", 400, "prompt"},
      {"detokenize without tokens", "/detokenize", R"({"tokens": "x"})", 400, "tokens"},
      {"tokenize for another model", "/tokenize", R"({"model": "gpt-4o", "prompt": "a"})", 404, "model"},
  };
  ServerProcess server(dir_, {"--max-context", "1024"});
  const Client client(server.port());
  for (const Case& c : cases) {
    const Reply reply = client.post_raw(c.path, c.body);
    EXPECT_EQ(reply.status, c.status) << c.name << ": " << reply.body;
    EXPECT_EQ(reply.json["error"]["param"], c.param) << c.name << ": " << reply.body;
    EXPECT_FALSE(reply.json["error"]["message"].get<std::string>().empty()) << c.name;
  }

  const Reply too_large = client.post_raw("/v1/completions", std::string(9000, 'a'), "application/x-www-form-urlencoded");
  EXPECT_EQ(too_large.status, 413) << too_large.error;
  EXPECT_NE(too_large.body.find("form-encoded request body too large"), std::string::npos) << too_large.body;

  const std::string malformed = send_raw(server.port(), "NOT HTTP AT ALL\r\n\r\n");
  EXPECT_TRUE(malformed.starts_with("HTTP/1.1 400")) << malformed;
  EXPECT_NE(malformed.find("malformed HTTP request"), std::string::npos) << malformed;
  EXPECT_EQ(client.get("/health").status, 200);
}

// --- The engine when a forward step throws -------------------------------------------------------

// The CPU backend, except that a step holding the token `poison` throws in its softmax
// attention: after the lightning layers before it have updated the state of every entry.
class FaultyBackend final : public ForwardingBackend {
 public:
  explicit FaultyBackend(int32_t poison)
      : ForwardingBackend(create_backend(BackendOptions{"cpu", 1})), poison_(poison) {}

  std::string name() const override { return "faulty " + inner_->name(); }
  void embed(const Weight& table, int64_t first_token, std::span<const int32_t> tokens, Mat out) override {
    poisoned_ = std::find(tokens.begin(), tokens.end(), poison_) != tokens.end();
    inner_->embed(table, first_token, tokens, out);
  }
  void softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                         const AttentionParams& params, Mat out) override {
    if (poisoned_) throw std::runtime_error("injected fault");
    inner_->softmax_attention(q, k, v, segments, layer, params, out);
  }

 private:
  int32_t poison_;
  bool poisoned_ = false;
};

struct Outcome {
  std::vector<int32_t> tokens;
  std::string finish, error;
};

// Drains a one-choice stream to its end.
Outcome collect(RequestStream& stream) {
  Outcome o;
  for (;;) {
    const auto e = stream.next(std::chrono::seconds(60));
    if (!e || e->kind == GenerationEvent::Kind::kDone) return o;
    if (e->kind == GenerationEvent::Kind::kToken) o.tokens.push_back(e->token.id);
    if (e->kind == GenerationEvent::Kind::kFinish) {
      o.finish = e->finish_reason;
      o.error = e->error;
    }
  }
}

class EngineFaultTest : public ServerFaultTest {
 protected:
  GenerationRequest request(std::vector<int32_t> prompt, int64_t max_tokens) const {
    GenerationRequest r;
    r.prompt = std::move(prompt);
    r.max_tokens = max_tokens;
    r.sampling.temperature = 0;
    return r;
  }
};

// The states of a step that threw cannot be trusted, so its requests fail; the engine serves
// the next ones exactly as before.
TEST_F(EngineFaultTest, AFailedForwardStepFailsItsRequestsAndTheEngineGoesOn) {
  const int32_t poison = 1000;
  FaultyBackend backend(poison);
  const auto model = Model::load(dir_ / "tiny", backend);
  const Tokenizer tokenizer = Tokenizer::load(dir_ / "tiny" / "tokenizer.json");
  Engine engine(*model, tokenizer, EngineOptions{.max_batch = 4, .max_context = 4096});
  const GenerationRequest healthy = request({11, 12, 13, 14}, 24);
  const Outcome before = collect(*engine.submit(healthy));
  ASSERT_EQ(before.finish, "length");

  const auto decoding = engine.submit(request({21, 22, 23}, 4000));
  ASSERT_TRUE(decoding->next(std::chrono::seconds(60)));  // its first token: it is in every step now
  const Outcome poisoned = collect(*engine.submit(request({31, poison, 33}, 8)));
  const Outcome beside = collect(*decoding);
  EXPECT_EQ(poisoned.finish, "error");
  EXPECT_EQ(poisoned.error, "internal error: injected fault");
  EXPECT_EQ(beside.finish, "error") << "it shared the failed step";

  EXPECT_EQ(collect(*engine.submit(healthy)).tokens, before.tokens);
  const EngineStats stats = engine.stats();
  EXPECT_EQ(stats.requests_failed, 2);
  EXPECT_EQ(stats.requests_finished, 2);
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.state_bytes, 0);
}

// A budget of one and a half whole-context sequences: a second one waits for the first.
TEST_F(EngineFaultTest, TheStateBudgetHoldsRequestsInTheQueue) {
  const auto backend = create_backend(BackendOptions{"cpu", 1});
  const auto model = Model::load(dir_ / "tiny", *backend);
  const Tokenizer tokenizer = Tokenizer::load(dir_ / "tiny" / "tokenizer.json");
  const int64_t context = 8192, sequence = cpu_state_bytes(dir_ / "tiny", context);
  const EngineOptions options{.max_batch = 4, .max_context = context, .max_queue = 1, .max_state_bytes = sequence * 3 / 2};
  EXPECT_THROW(Engine(*model, tokenizer, EngineOptions{.max_context = context, .max_state_bytes = sequence - 1}), Error);
  Engine engine(*model, tokenizer, options);

  const auto first = engine.submit(request({1, 2, 3}, context - 3));
  ASSERT_TRUE(first->next(std::chrono::seconds(60)));
  EXPECT_EQ(engine.stats().state_bytes, sequence);
  const auto second = engine.submit(request({4, 5, 6}, context - 3));
  EXPECT_EQ(engine.stats().waiting, 1);
  EXPECT_THROW(engine.submit(request({7}, 4)), EngineBusy);
  GenerationRequest two_choices = request({8}, context - 1);
  two_choices.n = 2;
  EXPECT_THROW(engine.submit(two_choices), Error);

  first->cancel();
  EXPECT_EQ(collect(*first).finish, "cancelled");
  EXPECT_EQ(collect(*second).finish, "length");
  EXPECT_EQ(engine.stats().state_bytes, 0);
}

}  // namespace
}  // namespace m1
