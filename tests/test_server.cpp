// m1-serve end to end: the real executable on a tiny random model, driven over HTTP on
// 127.0.0.1. One server process serves every test of ServerTest; the shutdown tests start their
// own. Random models write random text, so results are compared with other paths (m1-generate,
// the tokenizer, sequential runs), never with fixed text.

#include <gtest/gtest.h>

#include <future>

#include "m1/chat.h"
#include "m1/tokenizer.h"
#include "schema_validator.h"
#include "server_harness.h"

namespace {

using namespace m1::testing;

const std::string kKey = "test-key";
const int kContext = 1024;

// UTF-8 text split into characters.
std::vector<std::string> characters(const std::string& text) {
  std::vector<std::string> chars;
  for (const char c : text) {
    if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) chars.emplace_back();
    chars.back() += c;
  }
  return chars;
}

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = make_model("shared");
    server_ = new ServerProcess(dir_, {"--api-key", kKey, "--max-batch", "8", "--max-context", std::to_string(kContext),
                                       "--max-body-mb", "1"});
    tokenizer_ = new m1::Tokenizer(m1::Tokenizer::load(dir_ / "tiny" / "tokenizer.json"));
  }
  static void TearDownTestSuite() {
    server_->signal(SIGTERM);
    EXPECT_EQ(server_->wait(), 0) << server_->log();
    delete server_;
    delete tokenizer_;
    fs::remove_all(dir_);
  }

  Client client() const { return Client(server_->port(), kKey); }
  std::string generate(const std::string& flags) const {
    const CommandResult r = run_command(kBinDir + "/m1-generate --model " + (dir_ / "tiny").string() + " --threads 1 " + flags);
    EXPECT_EQ(r.status, 0) << r.err;
    return r.out.substr(0, r.out.size() - 1);  // m1-generate ends the text with a newline
  }
  size_t chat_prompt_tokens(const ordered_json& messages, const ordered_json& tools = ordered_json::array()) const {
    return m1::encode_chat(*tokenizer_, m1::render_chat(m1::parse_chat_messages(messages), m1::parse_chat_tools(tools), true))
        .size();
  }

  static fs::path dir_;
  static ServerProcess* server_;
  static m1::Tokenizer* tokenizer_;
};

fs::path ServerTest::dir_;
ServerProcess* ServerTest::server_ = nullptr;
m1::Tokenizer* ServerTest::tokenizer_ = nullptr;

TEST_F(ServerTest, ServesHealthAndTheModelList) {
  const Reply health = Client(server_->port(), "").get("/health");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(health.json["status"], "ok");
  const Reply models = client().get("/v1/models");
  EXPECT_EQ(models.status, 200);
  EXPECT_EQ(models.json["object"], "list");
  EXPECT_EQ(models.json["data"][0]["id"], "tiny");
}

TEST_F(ServerTest, GreedyChatEqualsGenerate) {
  const ordered_json request = chat_request("Tell me about lightning attention.", 32);
  const Reply reply = client().post("/v1/chat/completions", request);
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_EQ(reply.json["object"], "chat.completion");
  EXPECT_TRUE(reply.json["id"].get<std::string>().starts_with("chatcmpl-"));
  const ordered_json& message = reply.json["choices"][0]["message"];
  EXPECT_EQ(message["role"], "assistant");
  EXPECT_TRUE(message["reasoning_content"].is_null());
  EXPECT_EQ(message["content"], generate("--chat 'Tell me about lightning attention.' --temperature 0 --max-tokens 32"));
  const ordered_json& usage = reply.json["usage"];
  EXPECT_EQ(usage["prompt_tokens"], chat_prompt_tokens(request["messages"]));
  EXPECT_EQ(usage["total_tokens"], usage["prompt_tokens"].get<int>() + usage["completion_tokens"].get<int>());
  EXPECT_EQ(reply.json["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(usage["completion_tokens"], 32);
}

TEST_F(ServerTest, GreedyCompletionEqualsGenerate) {
  const Reply reply = client().post("/v1/completions", completion_request("Once upon a time", 32));
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_EQ(reply.json["object"], "text_completion");
  EXPECT_EQ(text_of(reply.json), generate("--prompt 'Once upon a time' --temperature 0 --max-tokens 32"));
  EXPECT_EQ(reply.json["usage"]["prompt_tokens"], tokenizer_->encode("Once upon a time").size());
}

TEST_F(ServerTest, StreamsEqualWholeResponses) {
  for (const auto& [path, request] : {std::pair{"/v1/chat/completions", chat_request("Stream this, please.", 24)},
                                      std::pair{"/v1/completions", completion_request("Stream this", 24)}}) {
    const Reply whole = client().post(path, request);
    const Stream stream = client().stream(path, streamed(request));
    ASSERT_TRUE(stream.done()) << path;
    const std::vector<ordered_json> chunks = stream.chunks();
    if (std::string(path) == "/v1/chat/completions") {
      EXPECT_EQ(chunks.front()["object"], "chat.completion.chunk");
      EXPECT_EQ(chunks.front()["choices"][0]["delta"]["role"], "assistant");
    }
    EXPECT_EQ(text_of(stream), text_of(whole.json)) << path;
    EXPECT_EQ(finish_of(stream), whole.json["choices"][0]["finish_reason"]) << path;
    EXPECT_TRUE(chunks.back()["choices"].empty());
    EXPECT_EQ(chunks.back()["usage"], whole.json["usage"]) << path;
  }
}

// Token boundaries come from the legacy logprobs' text offsets; the stop string straddles one.
TEST_F(ServerTest, StopStringsAcrossTokensAreNeverEmitted) {
  ordered_json request = completion_request("The weather today", 24);
  request["logprobs"] = 0;
  const Reply free_run = client().post("/v1/completions", request);
  ASSERT_EQ(free_run.status, 200) << free_run.body;
  const std::vector<std::string> chars = characters(text_of(free_run.json));
  const ordered_json& offsets = free_run.json["choices"][0]["logprobs"]["text_offset"];
  std::string stop;
  for (size_t k = 1; k + 1 < offsets.size() && stop.empty(); ++k) {
    const int64_t boundary = offsets[k];
    if (offsets[k - 1] < boundary && boundary < offsets[k + 1]) stop = chars[size_t(boundary) - 1] + chars[size_t(boundary)];
  }
  ASSERT_FALSE(stop.empty()) << "no token boundary between two non-empty tokens";
  const std::string text = text_of(free_run.json);
  const std::string expected = text.substr(0, text.find(stop));

  request.erase("logprobs");
  request["stop"] = {stop};
  const Reply stopped = client().post("/v1/completions", request);
  EXPECT_EQ(text_of(stopped.json), expected);
  EXPECT_EQ(stopped.json["choices"][0]["finish_reason"], "stop");
  const Stream stream = client().stream("/v1/completions", streamed(request));
  EXPECT_EQ(text_of(stream), expected);
  EXPECT_EQ(finish_of(stream), "stop");
}

TEST_F(ServerTest, ChoicesAreReproducibleWithASeed) {
  ordered_json request = chat_request("Give me two answers.", 8);
  request["n"] = 2;
  request["temperature"] = 0.9;
  request["seed"] = 11;
  const Reply first = client().post("/v1/chat/completions", request);
  ASSERT_EQ(first.status, 200) << first.body;
  ASSERT_EQ(first.json["choices"].size(), 2u);
  EXPECT_EQ(first.json["choices"][1]["index"], 1);
  EXPECT_LE(first.json["usage"]["completion_tokens"], 16);
  const Reply again = client().post("/v1/chat/completions", request);
  EXPECT_EQ(again.json["choices"], first.json["choices"]);

  const Stream stream = client().stream("/v1/chat/completions", streamed(request));
  for (int index : {0, 1}) {
    EXPECT_EQ(text_of(stream, index), first.json["choices"][index]["message"]["content"]) << index;
    EXPECT_EQ(finish_of(stream, index), first.json["choices"][index]["finish_reason"]) << index;
  }
}

// Greedy decoding is batch-invariant: sixteen requests at once, streamed or not, chat or not,
// each get what they got alone.
TEST_F(ServerTest, ConcurrentRequestsEqualSequentialOnes) {
  struct Case {
    std::string path;
    ordered_json request;
    bool stream;
  };
  std::vector<Case> cases;
  for (int i = 0; i < 16; ++i) {
    const std::string prompt = "Request number " + std::to_string(i);
    const bool chat = i % 2 == 0;
    cases.push_back({chat ? "/v1/chat/completions" : "/v1/completions",
                     chat ? chat_request(prompt, 24) : completion_request(prompt, 24), i % 4 < 2});
  }
  const auto answer = [&](const Case& c) {
    return c.stream ? text_of(client().stream(c.path, streamed(c.request))) : text_of(client().post(c.path, c.request).json);
  };
  std::vector<std::string> sequential;
  for (const Case& c : cases) sequential.push_back(answer(c));
  std::vector<std::future<std::string>> concurrent;
  for (const Case& c : cases) concurrent.push_back(std::async(std::launch::async, answer, c));
  for (size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(concurrent[i].get(), sequential[i]) << "request " << i;
}

TEST_F(ServerTest, DisconnectingMidStreamCancelsTheRequest) {
  const int64_t cancelled_before =
      metric(client().get("/metrics").body, "m1_engine_requests_total{outcome=\"cancelled\"}");
  ordered_json request = completion_request("A very long story", kContext - 10);
  size_t chunks = 0;
  client().stream("/v1/completions", streamed(request), [&](const ordered_json&) { return ++chunks < 3; });
  EXPECT_EQ(chunks, 3u);
  std::string metrics;
  eventually([&] {
    metrics = client().get("/metrics").body;
    return metric(metrics, "m1_engine_requests_total{outcome=\"cancelled\"}") > cancelled_before;
  });
  EXPECT_EQ(metric(metrics, "m1_engine_requests_total{outcome=\"cancelled\"}"), cancelled_before + 1) << metrics;
  EXPECT_EQ(metric(metrics, "m1_requests_running"), 0);
}

TEST_F(ServerTest, ClientErrorsAreOpenAiErrors) {
  struct Case {
    std::string name, path, body;
    int status;
    std::string type, param;
  };
  const std::string chat = "/v1/chat/completions";
  const std::string user = R"("messages": [{"role": "user", "content": "hi"}])";
  const std::vector<Case> cases = {
      {"malformed JSON", chat, "{\"messages\": [", 400, "invalid_request_error", ""},
      {"not an object", chat, "[]", 400, "invalid_request_error", ""},
      {"missing messages", chat, "{}", 400, "invalid_request_error", "messages"},
      {"unknown role", chat, R"({"messages": [{"role": "robot", "content": "hi"}]})", 400, "invalid_request_error",
       "messages[0].role"},
      {"wrong type", chat, "{" + user + R"(, "temperature": "warm"})", 400, "invalid_request_error", "temperature"},
      {"bad temperature", chat, "{" + user + R"(, "temperature": 9})", 400, "invalid_request_error", "temperature"},
      {"bad top_p", chat, "{" + user + R"(, "top_p": 1.5})", 400, "invalid_request_error", "top_p"},
      {"max_tokens zero", chat, "{" + user + R"(, "max_tokens": 0})", 400, "invalid_request_error", "max_tokens"},
      {"max_tokens past the context", chat, "{" + user + R"(, "max_tokens": 5000})", 400, "invalid_request_error",
       "max_tokens"},
      {"prompt past the context", chat,
       ordered_json{{"messages", {{{"role", "user"}, {"content", std::string(6000, 'z')}}}}}.dump(), 400,
       "invalid_request_error", "messages"},
      {"n zero", chat, "{" + user + R"(, "n": 0})", 400, "invalid_request_error", "n"},
      {"invalid UTF-8", chat, "{\"messages\": [{\"role\": \"user\", \"content\": \"\xc3\x28\"}]}", 400,
       "invalid_request_error", "messages[0].content"},
      {"JSON schema with an unsupported keyword", chat,
       "{" + user + R"(, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema":
           {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}}}})",
       400, "invalid_request_error", "response_format"},
      {"JSON schema with a pattern whose automaton explodes", chat,
       "{" + user + R"(, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema":
           {"type": "string", "pattern": "^[ab]*a[ab]{18}$"}}}})",
       400, "invalid_request_error", "response_format"},
      {"a strict tool with an unsupported keyword", chat,
       "{" + user + R"(, "tools": [{"type": "function", "function": {"name": "f", "strict": true,
           "parameters": {"type": "object", "patternProperties": {}}}}]})",
       400, "invalid_request_error", "tools"},
      {"logit_bias out of range", chat, "{" + user + R"(, "logit_bias": {"5": 101}})", 400, "invalid_request_error",
       "logit_bias"},
      {"unknown tool", chat,
       "{" + user + R"(, "tools": [{"type": "function", "function": {"name": "f"}}],
           "tool_choice": {"type": "function", "function": {"name": "g"}}})",
       400, "invalid_request_error", "tool_choice"},
      {"unknown model", chat, "{" + user + R"(, "model": "gpt-4o"})", 404, "not_found_error", "model"},
      {"several prompts", "/v1/completions", R"({"prompt": ["a", "b"]})", 400, "invalid_request_error", "prompt"},
      {"echo", "/v1/completions", R"({"prompt": "a", "echo": true})", 400, "invalid_request_error", "echo"},
      {"token id out of range", "/detokenize", R"({"tokens": [-1]})", 400, "invalid_request_error", "tokens"},
      {"unknown path", "/v1/embeddings", "{}", 404, "not_found_error", ""},
      {"wrong method", "/v1/models", "{}", 405, "invalid_request_error", ""},
      {"body too large", chat, "{\"messages\": \"" + std::string(1536 * 1024, 'a') + "\"}", 413,
       "invalid_request_error", ""},
  };
  for (const Case& c : cases) {
    const Reply reply = client().post_raw(c.path, c.body);
    EXPECT_EQ(reply.status, c.status) << c.name << ": " << reply.body;
    const ordered_json& error = reply.json["error"];
    EXPECT_EQ(error["type"], c.type) << c.name;
    EXPECT_FALSE(error["message"].get<std::string>().empty()) << c.name;
    EXPECT_EQ(error["param"], c.param.empty() ? ordered_json(nullptr) : ordered_json(c.param)) << c.name;
    EXPECT_TRUE(error.contains("code")) << c.name;
  }
  for (const std::string& key : {std::string(), std::string("wrong-key")}) {
    const Reply refused = Client(server_->port(), key).post("/v1/chat/completions", chat_request("hi", 4));
    EXPECT_EQ(refused.status, 401);
    EXPECT_EQ(refused.json["error"]["type"], "authentication_error");
  }
  EXPECT_EQ(client().get("/health").status, 200) << "the server survived every error";
}

// A required call puts the start of a tool block after the generation prompt; a named one
// writes the call up to its arguments. The random model never completes the call, so what the
// forcing wrote comes back as content, as the parser keeps unfinished tool blocks.
TEST_F(ServerTest, ToolChoiceForcesACall) {
  ordered_json request = chat_request("What is the weather in Paris?", 40);
  request["tools"] = ordered_json::parse(R"([{"type": "function", "function": {"name": "get_weather",
      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}}}}])");
  const size_t base = chat_prompt_tokens(request["messages"], request["tools"]);
  const std::string opening = R"({"name": "get_weather", "arguments": )";
  const size_t block_tokens = tokenizer_->encode("<tool_calls>\n").size();
  const size_t opening_tokens = tokenizer_->encode(opening, m1::AddedTokens::kLiteral).size();

  const auto prompt_tokens = [&](const ordered_json& tool_choice) {
    request["tool_choice"] = tool_choice;
    const Reply reply = client().post("/v1/chat/completions", request);
    EXPECT_EQ(reply.status, 200) << reply.body;
    return reply;
  };
  EXPECT_EQ(prompt_tokens("none").json["usage"]["prompt_tokens"], base);
  EXPECT_EQ(prompt_tokens("auto").json["usage"]["prompt_tokens"], base);
  EXPECT_EQ(prompt_tokens("required").json["usage"]["prompt_tokens"], base + block_tokens);
  const Reply named = prompt_tokens({{"type", "function"}, {"function", {{"name", "get_weather"}}}});
  EXPECT_EQ(named.json["usage"]["prompt_tokens"], base + block_tokens + opening_tokens);
  // The call the model completes follows the function's schema.
  const ordered_json& choice = named.json["choices"][0];
  ASSERT_EQ(choice["finish_reason"], "tool_calls") << named.body;
  EXPECT_EQ(choice["message"]["tool_calls"][0]["function"]["name"], "get_weather");
  const SchemaValidator validator(nlohmann::json::parse(request["tools"][0]["function"]["parameters"].dump()));
  EXPECT_EQ(validator.check_text(choice["message"]["tool_calls"][0]["function"]["arguments"]), "") << named.body;
}

// The token the model opens its reasoning with, biased away so that the random model answers at
// once (as a client that wants no reasoning does).
ordered_json no_reasoning(const m1::Tokenizer& tokenizer) {
  return {{std::to_string(*tokenizer.token_id("<think>")), -100}};
}

const char* kAnswerSchema = R"({"type": "object", "properties": {
    "answer": {"enum": ["yes", "no", "maybe"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    "source": {"anyOf": [{"type": "null"}, {"type": "string", "format": "date"}]}},
    "required": ["answer", "confidence", "tags", "source"], "additionalProperties": false})";

// response_format json_schema through chat and completions, whole and streamed, n > 1, and all
// of them at once: every output that ends with "stop" is a valid document, each the same as alone.
TEST_F(ServerTest, JsonSchemaResponsesAreValid) {
  const SchemaValidator validator(nlohmann::json::parse(kAnswerSchema));
  const ordered_json format = {{"type", "json_schema"},
                               {"json_schema", {{"name", "answer"}, {"schema", ordered_json::parse(kAnswerSchema)}, {"strict", true}}}};
  struct Case {
    std::string path;
    ordered_json request;
    bool stream;
  };
  std::vector<Case> cases;
  for (int i = 0; i < 6; ++i) {
    const bool chat = i % 3 != 2;
    ordered_json request = chat ? chat_request("Answer in JSON, please " + std::to_string(i), 120)
                                : completion_request("JSON: " + std::to_string(i), 120);
    request["response_format"] = format;
    request["temperature"] = 1.0;
    request["seed"] = 100 + i;
    request["n"] = i == 0 ? 3 : 1;
    if (chat) request["logit_bias"] = no_reasoning(*tokenizer_);
    cases.push_back({chat ? "/v1/chat/completions" : "/v1/completions", request, i % 2 == 1});
  }
  const auto answer = [&](const Case& c) {
    std::vector<std::pair<std::string, std::string>> choices;  // (text, finish reason)
    if (c.stream) {
      const Stream stream = client().stream(c.path, streamed(c.request));
      for (int k = 0; k < c.request["n"].get<int>(); ++k) choices.emplace_back(text_of(stream, k), finish_of(stream, k));
    } else {
      const Reply reply = client().post(c.path, c.request);
      EXPECT_EQ(reply.status, 200) << reply.body;
      for (size_t k = 0; k < reply.json["choices"].size(); ++k)
        choices.emplace_back(text_of(reply.json, k), reply.json["choices"][k]["finish_reason"]);
    }
    return choices;
  };
  std::vector<std::vector<std::pair<std::string, std::string>>> sequential;
  for (const Case& c : cases) sequential.push_back(answer(c));
  std::vector<std::future<std::vector<std::pair<std::string, std::string>>>> concurrent;
  for (const Case& c : cases) concurrent.push_back(std::async(std::launch::async, answer, c));
  int documents = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(concurrent[i].get(), sequential[i]) << "request " << i;
    for (const auto& [text, finish] : sequential[i]) {
      if (finish == "length") continue;
      EXPECT_EQ(finish, "stop");
      EXPECT_EQ(validator.check_text(text), "") << "request " << i << ": " << text;
      ++documents;
    }
  }
  EXPECT_GE(documents, 6) << "too few documents finished to check";
}

// max_tokens may cut a document short: the choice then ends with "length", as OpenAI's does.
TEST_F(ServerTest, MaxTokensCutsADocumentWithLength) {
  ordered_json request = completion_request("JSON:", 3);
  request["response_format"] = {{"type", "json_schema"}, {"json_schema", {{"name", "answer"}, {"schema", ordered_json::parse(kAnswerSchema)}}}};
  const Reply reply = client().post("/v1/completions", request);
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_EQ(reply.json["choices"][0]["finish_reason"], "length") << reply.body;
  EXPECT_EQ(text_of(reply.json).substr(0, 1), "{") << reply.body;
  const Stream stream = client().stream("/v1/completions", streamed(request));
  EXPECT_EQ(finish_of(stream), "length");
  EXPECT_EQ(text_of(stream), text_of(reply.json));
}

TEST_F(ServerTest, JsonObjectModeGivesAnObject) {
  ordered_json request = chat_request("An object, please.", 200);
  request["response_format"] = {{"type", "json_object"}};
  request["logit_bias"] = no_reasoning(*tokenizer_);
  // Short keys and values: bias the closing quote up so that strings end soon.
  request["logit_bias"][std::to_string(tokenizer_->encode("\"", m1::AddedTokens::kLiteral)[0])] = 8;
  const Reply reply = client().post("/v1/chat/completions", request);
  ASSERT_EQ(reply.status, 200) << reply.body;
  const std::string text = text_of(reply.json);
  EXPECT_EQ(text.substr(0, 1), "{") << text;
  if (reply.json["choices"][0]["finish_reason"] == "stop") {
    EXPECT_TRUE(nlohmann::json::parse(text).is_object()) << text;
  }
}

// Strict tools: the calls the model makes name a tool and hold arguments its schema accepts.
TEST_F(ServerTest, StrictToolCallsFollowTheirSchemas) {
  const char* parameters = R"({"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
      "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": false})";
  ordered_json request = chat_request("Weather?", 80);
  request["tools"] = {{{"type", "function"},
                       {"function", {{"name", "forecast"}, {"strict", true}, {"parameters", ordered_json::parse(parameters)}}}},
                      {{"type", "function"}, {"function", {{"name", "noop"}, {"strict", true}}}}};
  request["tool_choice"] = "required";
  request["temperature"] = 1.0;
  const SchemaValidator forecast(nlohmann::json::parse(parameters));
  int calls = 0;
  for (int seed = 0; seed < 4; ++seed) {
    request["seed"] = seed;
    const Reply reply = client().post("/v1/chat/completions", request);
    ASSERT_EQ(reply.status, 200) << reply.body;
    const ordered_json& choice = reply.json["choices"][0];
    if (choice["finish_reason"] == "length") continue;
    ASSERT_EQ(choice["finish_reason"], "tool_calls") << reply.body;
    for (const ordered_json& call : choice["message"]["tool_calls"]) {
      const std::string name = call["function"]["name"];
      const std::string arguments = call["function"]["arguments"];
      if (name == "forecast") EXPECT_EQ(forecast.check_text(arguments), "") << arguments;
      else EXPECT_EQ(name + arguments, "noop{}");
      ++calls;
    }
  }
  EXPECT_GE(calls, 2) << "too few calls finished to check";
}

TEST_F(ServerTest, LogitBiasSteersTheOutput) {
  ordered_json request = completion_request("Once", 5);
  const int32_t a = tokenizer_->encode("a", m1::AddedTokens::kLiteral)[0];
  request["logit_bias"] = {{std::to_string(a), 100}};
  const Reply reply = client().post("/v1/completions", request);
  ASSERT_EQ(reply.status, 200) << reply.body;
  EXPECT_EQ(text_of(reply.json), "aaaaa");
}

TEST_F(ServerTest, TokenizeAndDetokenize) {
  const Reply prompt = client().post("/tokenize", {{"prompt", "Hello <think> world"}});
  ASSERT_EQ(prompt.status, 200) << prompt.body;
  EXPECT_EQ(prompt.json["tokens"], tokenizer_->encode("Hello <think> world"));
  EXPECT_EQ(prompt.json["count"], prompt.json["tokens"].size());
  EXPECT_EQ(prompt.json["max_model_len"], kContext);
  const ordered_json messages = {{{"role", "user"}, {"content", "Hi <end_of_sentence>"}}};
  const Reply chat = client().post("/tokenize", {{"messages", messages}});
  EXPECT_EQ(chat.json["count"], chat_prompt_tokens(messages));
  const Reply text = client().post("/detokenize", {{"tokens", prompt.json["tokens"]}});
  EXPECT_EQ(text.json["prompt"], "Hello <think> world");
}

TEST_F(ServerTest, MetricsAreInPrometheusFormat) {
  // A response is counted before it is written: once a client has its answer, the next /metrics
  // counts it (the /metrics reply before it is a 200 as well).
  const std::string before = client().get("/metrics").body;
  ASSERT_EQ(client().post("/v1/completions", completion_request("Count me", 4)).status, 200);
  ASSERT_EQ(client().post("/v1/completions", {{"prompt", "no model named"}, {"max_tokens", -1}}).status, 400);
  ASSERT_EQ(client().get("/v1/nowhere").status, 404);
  const Reply reply = client().get("/metrics");
  ASSERT_EQ(reply.status, 200);
  const std::string& text = reply.body;
  const auto count = [](const std::string& metrics, const std::string& name) { return std::max<int64_t>(metric(metrics, name), 0); };
  for (const auto& [status, more] : {std::pair{200, 2}, {400, 1}, {404, 1}}) {
    const std::string name = "m1_requests_total{status=\"" + std::to_string(status) + "\"}";
    EXPECT_EQ(count(text, name), count(before, name) + more) << name << "\n" << text;
  }
  for (const char* name : {"m1_requests_total", "m1_prompt_tokens_total", "m1_generation_tokens_total",
                           "m1_requests_waiting", "m1_requests_running", "m1_engine_requests_total",
                           "m1_time_to_first_token_seconds", "m1_inter_token_latency_seconds"}) {
    EXPECT_NE(text.find(std::string("# HELP ") + name + " "), std::string::npos) << name;
    EXPECT_NE(text.find(std::string("# TYPE ") + name + " "), std::string::npos) << name;
  }
  EXPECT_GT(metric(text, "m1_requests_total{status=\"200\"}"), 0);
  EXPECT_GE(metric(text, "m1_generation_tokens_total"), 4);
  const int64_t first_tokens = metric(text, "m1_time_to_first_token_seconds_count");
  EXPECT_GT(first_tokens, 0);
  EXPECT_EQ(metric(text, "m1_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), first_tokens);
}

// --- Servers configured for one test -------------------------------------------------------------

class OwnServerTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = make_model(::testing::UnitTest::GetInstance()->current_test_info()->name()); }
  void TearDown() override { fs::remove_all(dir_); }

  // Streams a long completion and sends SIGTERM once its first chunk arrived; `during_drain`
  // runs right after, while the server drains.
  static Stream stream_through_sigterm(ServerProcess& server, const std::function<void()>& during_drain = [] {}) {
    bool signalled = false;
    return Client(server.port())
        .stream("/v1/completions", streamed(completion_request("A long story", 4000)), [&](const ordered_json&) {
          if (!signalled) {
            server.signal(SIGTERM);
            during_drain();
          }
          signalled = true;
          return true;
        });
  }

  fs::path dir_;
};

// The engine and server stay one above a model split over two CPU ranks: requests answered together
// (batched in shared steps, n > 1 choices forking sequences) give one rank's greedy text.
TEST_F(OwnServerTest, TwoRanksAnswerAsOne) {
  ServerProcess server(dir_, {"--tensor-parallel", "2", "--precision", "exact", "--max-context", "4096"});
  const auto answer = [&](int i) {
    ordered_json request = completion_request("Request number " + std::to_string(i), 20);
    request["n"] = 2;
    const Reply reply = Client(server.port()).post("/v1/completions", request);
    EXPECT_EQ(reply.status, 200) << reply.body;
    EXPECT_EQ(text_of(reply.json, 1), text_of(reply.json, 0));
    return text_of(reply.json);
  };
  std::vector<std::future<std::string>> concurrent;
  for (int i = 0; i < 4; ++i) concurrent.push_back(std::async(std::launch::async, answer, i));
  for (int i = 0; i < 4; ++i) {
    const CommandResult alone = run_command(kBinDir + "/m1-generate --model " + (dir_ / "tiny").string() +
                                            " --threads 1 --precision exact --temperature 0 --max-tokens 20 --prompt "
                                            "'Request number " + std::to_string(i) + "'");
    ASSERT_EQ(alone.status, 0) << alone.err;
    EXPECT_EQ(concurrent[size_t(i)].get(), alone.out.substr(0, alone.out.size() - 1)) << "request " << i;
  }
  server.signal(SIGTERM);
  EXPECT_EQ(server.wait(), 0) << server.log();
  EXPECT_NE(server.log().find("tensor parallel 2"), std::string::npos) << server.log();
}

TEST_F(OwnServerTest, SigtermLetsStreamsFinish) {
  ServerProcess server(dir_, {"--max-context", "4096", "--shutdown-grace", "60"});
  Reply during;
  const Stream stream = stream_through_sigterm(server, [&] {
    // The server notices a signal within 100 ms: ask until it stops answering 200. (A fixed wait
    // of 300 ms could outlast the tiny model's whole stream, after which the server has exited.)
    const auto until = std::chrono::steady_clock::now() + 2s;
    do {
      std::this_thread::sleep_for(10ms);
      during = Client(server.port()).get("/v1/models");
    } while (during.status == 200 && std::chrono::steady_clock::now() < until);
  });
  EXPECT_EQ(during.status, 503) << "new requests are refused while draining";
  EXPECT_TRUE(stream.done());
  EXPECT_EQ(finish_of(stream), "length");
  EXPECT_EQ(server.wait(), 0) << server.log();
}

TEST_F(OwnServerTest, SigtermCancelsStreamsThatOutlastTheGrace) {
  ServerProcess server(dir_, {"--max-context", "4096", "--shutdown-grace", "0"});
  const Stream stream = stream_through_sigterm(server);
  EXPECT_TRUE(stream.done());
  const std::vector<ordered_json> chunks = stream.chunks();
  ASSERT_FALSE(chunks.empty());
  EXPECT_EQ(chunks.back()["error"]["code"], "cancelled") << chunks.back().dump();
  EXPECT_EQ(server.wait(), 0) << server.log();
}

// A client that gives up on a whole (non-streaming) response cancels its request, as one that
// leaves a stream does: the generation stops, and the response is counted as 499.
TEST_F(OwnServerTest, LeavingBeforeAWholeResponseCancelsTheRequest) {
  // Deep enough that the tiny model is far from done when the client leaves.
  ServerProcess server(dir_, {"--max-context", "65536"});
  const Client client(server.port());
  const Reply gone = client.with_read_timeout(300ms).post("/v1/completions", completion_request("A long story", 65000));
  EXPECT_EQ(gone.status, 0) << "the response came before the client left: " << gone.body;
  std::string metrics;
  EXPECT_TRUE(eventually([&] {
    metrics = client.get("/metrics").body;
    return metric(metrics, "m1_requests_total{status=\"499\"}") == 1;
  })) << metrics;
  // The handler answers 499 at once; the engine ends the request at its next step.
  metrics = idle_metrics(client);
  EXPECT_EQ(metric(metrics, "m1_engine_requests_total{outcome=\"cancelled\"}"), 1) << metrics;
  const int64_t generated = metric(metrics, "m1_generation_tokens_total");
  EXPECT_LT(generated, 65000) << metrics;
  EXPECT_EQ(client.post("/v1/completions", completion_request("Next", 4)).status, 200);
  EXPECT_EQ(metric(client.get("/metrics").body, "m1_generation_tokens_total"), generated + 4);
}

// One request runs, one waits, and the next is told to come back.
TEST_F(OwnServerTest, AFullQueueAnswers503) {
  ServerProcess server(dir_, {"--max-batch", "1", "--max-queue", "1", "--max-context", "4096"});
  const Client client(server.port(), "");
  std::future<Reply> queued;
  Reply busy;
  int64_t waiting = 0;
  client.stream("/v1/completions", streamed(completion_request("A long story", 4000)), [&](const ordered_json&) {
    queued = std::async(std::launch::async, [&] { return client.post("/v1/completions", completion_request("Next", 4)); });
    eventually([&] { return (waiting = metric(client.get("/metrics").body, "m1_requests_waiting")) == 1; });
    busy = client.post("/v1/completions", completion_request("One too many", 4));
    return false;  // leaving cancels the long request, which lets the queued one run
  });
  EXPECT_EQ(waiting, 1);
  EXPECT_EQ(busy.status, 503) << busy.body;
  EXPECT_EQ(busy.json["error"]["type"], "server_busy");
  EXPECT_EQ(busy.retry_after, "1");
  EXPECT_EQ(queued.get().status, 200);
}

}  // namespace
