// The server's OpenAI layer without a model: request bodies become engine requests or precise
// 400s; generation events become the OpenAI response and stream shapes (reasoning, tool calls,
// logprobs, usage); the HTTP side answers correctly while the model is still loading.

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <future>
#include <thread>

#include <httplib.h>

#include "api_error.h"
#include "api_server.h"
#include "client_connection.h"
#include "completion_output.h"
#include "json_body.h"
#include "metrics.h"
#include "openai_request.h"

namespace m1::server {
namespace {

const std::string kTokenizer = std::string(M1_SOURCE_DIR) + "/tests/data/golden/odd-f32/tokenizer.json";

class ServerApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { tokenizer_ = new Tokenizer(Tokenizer::load(kTokenizer)); }
  static void TearDownTestSuite() { delete tokenizer_; }

  ServedModel served() const {
    return {.tokenizer = tokenizer_, .name = "tiny", .end_of_turn = *tokenizer_->token_id("<end_of_sentence>"),
            .max_context = 4096, .max_choices = 4};
  }
  ordered_json chat_body(const std::string& extra_fields = "{}") const {
    ordered_json body = {{"messages", {{{"role", "user"}, {"content", "What is the weather in Paris?"}}}}};
    body.update(ordered_json::parse(extra_fields));
    return body;
  }
  // The 400 (or other ApiError) a request body earns.
  ApiError chat_error(const ordered_json& body) const {
    try {
      parse_chat_request(body, served());
    } catch (const ApiError& error) {
      return error;
    }
    ADD_FAILURE() << "accepted: " << body.dump();
    return invalid_request("");
  }
  std::vector<int32_t> encode(const std::string& text, AddedTokens added) const {
    return tokenizer_->encode(text, added);
  }

  static Tokenizer* tokenizer_;
};

Tokenizer* ServerApiTest::tokenizer_ = nullptr;

ordered_json with_field(ordered_json body, const std::string& key, ordered_json value) {
  body[key] = std::move(value);
  return body;
}

const char* kWeatherTool = R"({"tools": [{"type": "function", "function": {"name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]})";

GenerationEvent token(int32_t id, std::string text, int choice = 0) {
  GenerationEvent e;
  e.kind = GenerationEvent::Kind::kToken;
  e.choice = choice;
  e.token.id = id;
  e.token.logprob = -0.5f;
  e.token.top = {{id, -0.5f}, {id + 1, -1.5f}};
  e.text = std::move(text);
  return e;
}

GenerationEvent finish(std::string reason, std::string text = "", int choice = 0) {
  GenerationEvent e;
  e.kind = GenerationEvent::Kind::kFinish;
  e.choice = choice;
  e.finish_reason = std::move(reason);
  e.text = std::move(text);
  return e;
}

GenerationEvent done(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens = 0) {
  GenerationEvent e;
  e.kind = GenerationEvent::Kind::kDone;
  e.prompt_tokens = prompt_tokens;
  e.completion_tokens = completion_tokens;
  e.cached_tokens = cached_tokens;
  return e;
}

// A turn that thinks, answers and calls a tool, one token per piece, then ends its turn.
std::vector<GenerationEvent> thinking_tool_turn(int32_t end_of_turn) {
  return {token(10, "<think>"), token(11, "Paris is"), token(12, " in France."), token(13, "</think>"),
          token(14, "\n\nLet me check."), token(15, "<tool_calls>"),
          token(16, "\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"), token(17, "</tool_calls>"),
          token(end_of_turn, ""), finish("stop"), done(20, 9, 16)};
}

ResponseMeta meta() { return {"chatcmpl-test", 1700000000, "tiny"}; }

// --- Request bodies ----------------------------------------------------------------------------

TEST_F(ServerApiTest, BodyErrorsNameWhatIsWrong) {
  const auto error_of = [](std::string_view body) {
    try {
      parse_json_body(body);
    } catch (const ApiError& error) {
      return error;
    }
    return invalid_request("accepted");
  };
  EXPECT_EQ(error_of(R"({"messages": [)").what(), std::string("malformed JSON: ") +
                                                     "parse error at line 1, column 15: syntax error while parsing "
                                                     "value - unexpected end of input; expected '[', '{', or a literal");
  const ApiError utf8 = error_of("{\"messages\": [{\"role\": \"user\"}, {\"content\": \"ok\xff\"}]}");
  EXPECT_EQ(utf8.param, "messages[1].content");
  EXPECT_EQ(utf8.status, 400);
  EXPECT_EQ(error_of(R"({"a": "\ud800"})").param, "a");  // a lone surrogate has no UTF-8 form
  EXPECT_EQ(error_of("[1, 2]").what(), std::string("request body: must be a JSON object"));
  EXPECT_NE(std::string(error_of(std::string(100, '[') + std::string(100, ']')).what()).find("nests deeper"),
            std::string::npos);
}

TEST_F(ServerApiTest, ChatRequestDefaults) {
  const CompletionJob job = parse_chat_request(chat_body(), served());
  const std::vector<ChatMessage> messages = {{"user", "What is the weather in Paris?", {}, {}, {}}};
  EXPECT_EQ(job.generation.prompt, encode_chat(*tokenizer_, render_chat(messages, {}, true)));
  EXPECT_EQ(job.generation.max_tokens, 4096 - int64_t(job.generation.prompt.size()));  // the rest of the context
  EXPECT_EQ(job.generation.end_tokens, std::vector<int32_t>{served().end_of_turn});
  EXPECT_EQ(job.generation.n, 1);
  EXPECT_FALSE(job.stream);
  EXPECT_FALSE(job.output.tool_calls);  // no tools, nothing to parse
  EXPECT_TRUE(job.output.reasoning);
  // No seed: each request draws its own.
  EXPECT_NE(parse_chat_request(chat_body(), served()).generation.sampling.seed, job.generation.sampling.seed);
}

TEST_F(ServerApiTest, ChatRequestFields) {
  const CompletionJob job = parse_chat_request(
      chat_body(R"({"model": "tiny", "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": -1,
                    "min_p": 0.1, "presence_penalty": 0.2, "frequency_penalty": 0.3, "repetition_penalty": 1.1,
                    "seed": 42, "stop": "END", "n": 2, "stream": true, "stream_options": {"include_usage": true},
                    "logprobs": true, "top_logprobs": 3})"),
      served());
  const SamplingParams& s = job.generation.sampling;
  EXPECT_EQ(job.generation.max_tokens, 7);
  EXPECT_FLOAT_EQ(s.temperature, 0.5f);
  EXPECT_FLOAT_EQ(s.top_p, 0.9f);
  EXPECT_EQ(s.top_k, 0);
  EXPECT_FLOAT_EQ(s.min_p, 0.1f);
  EXPECT_FLOAT_EQ(s.presence_penalty, 0.2f);
  EXPECT_FLOAT_EQ(s.frequency_penalty, 0.3f);
  EXPECT_FLOAT_EQ(s.repetition_penalty, 1.1f);
  EXPECT_EQ(s.seed, 42u);
  EXPECT_EQ(s.top_logprobs, 3);
  EXPECT_EQ(job.generation.stop, std::vector<std::string>{"END"});
  EXPECT_EQ(job.generation.n, 2);
  EXPECT_TRUE(job.stream && job.include_usage && job.logprobs);
}

TEST_F(ServerApiTest, ChatRequestErrors) {
  struct Case {
    const char* fields;
    const char* param;
  };
  for (const Case& c : std::vector<Case>{
           {R"({"temperature": "hot"})", "temperature"},
           {R"({"temperature": 2.5})", "temperature"},
           {R"({"top_p": 0})", "top_p"},
           {R"({"max_tokens": 0})", "max_tokens"},
           {R"({"max_tokens": 100000})", "max_tokens"},
           {R"({"n": 0})", "n"},
           {R"({"n": 5})", "n"},
           {R"({"stop": [1]})", "stop"},
           {R"({"top_logprobs": 2})", "top_logprobs"},
           {R"({"logprobs": true, "top_logprobs": 21})", "top_logprobs"},
           {R"({"stream_options": {"include_usage": true}})", "stream_options"},
           {R"({"response_format": {"type": "json"}})", "response_format"},
           {R"({"response_format": {"type": "json_schema"}})", "response_format"},
           {R"({"response_format": {"type": 1}})", "response_format"},
           {R"({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes", "schema": {}}}})",
            "response_format"},
           {R"({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}})", "response_format"},
           {R"({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "not": {}}}}})",
            "response_format"},
           {R"({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": []}}}})",
            "response_format"},
           {R"({"logit_bias": [1]})", "logit_bias"},
           {R"({"logit_bias": {"x": 1}})", "logit_bias"},
           {R"({"logit_bias": {"1": "high"}})", "logit_bias"},
           {R"({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]})", "tools"},
           {R"({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
               "tool_choice": "required"})", "tools"},
           {R"({"tool_choice": "required"})", "tool_choice"},
           {R"({"messages": [{"role": "robot", "content": "hi"}]})", "messages[0].role"},
           {R"({"messages": []})", "messages"},
       }) {
    const ApiError error = chat_error(chat_body(c.fields));
    EXPECT_EQ(error.status, 400) << c.fields;
    EXPECT_EQ(error.type, "invalid_request_error") << c.fields;
    EXPECT_EQ(error.param, c.param) << c.fields << ": " << error.what();
  }
  const ApiError model = chat_error(chat_body(R"({"model": "gpt-4o"})"));
  EXPECT_EQ(model.status, 404);
  EXPECT_EQ(model.code, "model_not_found");
  ordered_json long_prompt = chat_body();
  long_prompt["messages"][0]["content"] = std::string(20000, 'x');
  EXPECT_EQ(chat_error(long_prompt).param, "messages");
}

TEST_F(ServerApiTest, ToolChoiceNoneStillShowsTheTools) {
  const CompletionJob none = parse_chat_request(with_field(chat_body(kWeatherTool), "tool_choice", "none"), served());
  const CompletionJob automatic = parse_chat_request(chat_body(kWeatherTool), served());
  EXPECT_EQ(none.generation.prompt, automatic.generation.prompt);
  EXPECT_FALSE(none.output.tool_calls);
  EXPECT_TRUE(automatic.output.tool_calls);
  EXPECT_TRUE(automatic.forced_output.empty());
}

// `required` and a named function write the start of the call into the prompt, and the output
// parser reads the same text first.
TEST_F(ServerApiTest, ToolChoiceForcingExtendsThePrompt) {
  const std::vector<int32_t> base = parse_chat_request(chat_body(kWeatherTool), served()).generation.prompt;
  const CompletionJob required =
      parse_chat_request(with_field(chat_body(kWeatherTool), "tool_choice", "required"), served());
  std::vector<int32_t> expected = base;
  for (int32_t id : encode("<tool_calls>\n", AddedTokens::kMatch)) expected.push_back(id);
  EXPECT_EQ(required.generation.prompt, expected);
  EXPECT_EQ(required.forced_output, "<tool_calls>\n");

  const CompletionJob named = parse_chat_request(
      with_field(chat_body(kWeatherTool), "tool_choice",
                 {{"type", "function"}, {"function", {{"name", "get_weather"}}}}),
      served());
  const std::string opening = R"({"name": "get_weather", "arguments": )";
  for (int32_t id : encode(opening, AddedTokens::kLiteral)) expected.push_back(id);
  EXPECT_EQ(named.generation.prompt, expected);
  EXPECT_EQ(named.forced_output, "<tool_calls>\n" + opening);

  // The model only has to finish the call.
  ResponseCollector collector(named, *tokenizer_, meta());
  for (const GenerationEvent& e : {token(20, "{\"city\": \"Paris\"}}\n"), token(21, "</tool_calls>"), finish("stop"),
                                   done(40, 2)})
    collector.add(e);
  const ordered_json message = collector.response()["choices"][0]["message"];
  ASSERT_EQ(message["tool_calls"].size(), 1u);
  EXPECT_EQ(message["tool_calls"][0]["function"]["name"], "get_weather");
  EXPECT_EQ(message["tool_calls"][0]["function"]["arguments"], R"({"city": "Paris"})");
  EXPECT_EQ(collector.response()["choices"][0]["finish_reason"], "tool_calls");
}

TEST_F(ServerApiTest, CompletionPrompts) {
  const auto prompt_of = [&](const char* body) {
    return parse_completion_request(ordered_json::parse(body), served()).generation.prompt;
  };
  EXPECT_EQ(prompt_of(R"({"prompt": "Hello world"})"), encode("Hello world", AddedTokens::kMatch));
  EXPECT_EQ(prompt_of(R"({"prompt": ["Hello world"]})"), encode("Hello world", AddedTokens::kMatch));
  EXPECT_EQ(prompt_of(R"({"prompt": [5, 6, 7]})"), (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(prompt_of(R"({"prompt": [[5, 6]]})"), (std::vector<int32_t>{5, 6}));
  for (const char* refused : {R"({"prompt": ["a", "b"]})", R"({"prompt": [1, 99999]})", R"({"prompt": ""})",
                              R"({"prompt": "a", "echo": true})", R"({"prompt": "a", "suffix": "b"})",
                              R"({"prompt": "a", "best_of": 2})", R"({"prompt": "a", "logprobs": 30})", R"({})"}) {
    EXPECT_THROW(parse_completion_request(ordered_json::parse(refused), served()), ApiError) << refused;
  }
  const CompletionJob job = parse_completion_request(ordered_json::parse(R"({"prompt": "a", "logprobs": 2})"), served());
  EXPECT_TRUE(job.logprobs);
  EXPECT_EQ(job.generation.sampling.top_logprobs, 2);
}

// Requests share cached prompt states only with the same API key and cache_salt.
TEST_F(ServerApiTest, CacheScopesSeparateKeysAndSalts) {
  const CompletionJob salted = parse_chat_request(
      ordered_json::parse(R"({"messages": [{"role": "user", "content": "hi"}], "cache_salt": "s1"})"), served());
  EXPECT_EQ(salted.cache_salt, "s1");
  EXPECT_FALSE(parse_completion_request(ordered_json::parse(R"({"prompt": "a"})"), served()).cache_salt);
  const std::string key = "0123456789abcdef";
  const std::vector<std::string> scopes = {cache_scope("", std::nullopt), cache_scope("", "s1"), cache_scope(key, std::nullopt),
                                           cache_scope(key, "s1"), cache_scope(key, "s2"), cache_scope("", key + "/s1")};
  for (size_t i = 0; i < scopes.size(); ++i)
    for (size_t j = i + 1; j < scopes.size(); ++j) EXPECT_NE(scopes[i], scopes[j]) << i << " and " << j;
}

// --- Responses -----------------------------------------------------------------------------------

TEST_F(ServerApiTest, ChatResponseSplitsReasoningContentAndToolCalls) {
  const CompletionJob job = parse_chat_request(chat_body(kWeatherTool), served());
  ResponseCollector collector(job, *tokenizer_, meta());
  for (const GenerationEvent& e : thinking_tool_turn(served().end_of_turn)) collector.add(e);
  const ordered_json response = collector.response();
  EXPECT_EQ(response["id"], "chatcmpl-test");
  EXPECT_EQ(response["object"], "chat.completion");
  EXPECT_EQ(response["model"], "tiny");
  const ordered_json& choice = response["choices"][0];
  EXPECT_EQ(choice["finish_reason"], "tool_calls");
  EXPECT_EQ(choice["message"]["role"], "assistant");
  EXPECT_EQ(choice["message"]["reasoning_content"], "Paris is in France.");
  EXPECT_EQ(choice["message"]["content"], "Let me check.");
  const ordered_json& call = choice["message"]["tool_calls"][0];
  EXPECT_EQ(call["type"], "function");
  EXPECT_EQ(call["function"]["name"], "get_weather");
  EXPECT_EQ(call["function"]["arguments"], R"({"city": "Paris"})");
  EXPECT_TRUE(call["id"].get<std::string>().starts_with("call_"));
  EXPECT_TRUE(choice["logprobs"].is_null());
  EXPECT_EQ(response["usage"], ordered_json::parse(R"({"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
                                                        "prompt_tokens_details": {"cached_tokens": 16}})"));
}

TEST_F(ServerApiTest, OnlyToolCallsMeansNullContent) {
  ResponseCollector collector(parse_chat_request(chat_body(kWeatherTool), served()), *tokenizer_, meta());
  for (const GenerationEvent& e : {token(1, "<tool_calls>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_calls>"),
                                   finish("stop"), done(1, 1)})
    collector.add(e);
  EXPECT_TRUE(collector.response()["choices"][0]["message"]["content"].is_null());
}

TEST_F(ServerApiTest, MalformedToolCallsStayContent) {
  ResponseCollector collector(parse_chat_request(chat_body(kWeatherTool), served()), *tokenizer_, meta());
  for (const GenerationEvent& e : {token(1, "<tool_calls>\n{\"name\": oops}\n</tool_calls>"), finish("stop"), done(1, 1)})
    collector.add(e);
  const ordered_json choice = collector.response()["choices"][0];
  EXPECT_EQ(choice["message"]["content"], "{\"name\": oops}\n");
  EXPECT_FALSE(choice["message"].contains("tool_calls"));
  EXPECT_EQ(choice["finish_reason"], "stop");
}

TEST_F(ServerApiTest, ChatStreamChunks) {
  const CompletionJob job = parse_chat_request(
      with_field(with_field(chat_body(kWeatherTool), "stream", true), "stream_options", {{"include_usage", true}}), served());
  ChunkStreamer streamer(job, *tokenizer_, meta());
  std::vector<ordered_json> chunks = streamer.opening();
  for (const GenerationEvent& e : thinking_tool_turn(served().end_of_turn))
    for (ordered_json& chunk : streamer.on_event(e)) chunks.push_back(std::move(chunk));

  EXPECT_EQ(chunks.front()["choices"][0]["delta"], ordered_json::parse(R"({"role": "assistant", "content": ""})"));
  std::string reasoning, content;
  std::vector<ordered_json> calls;
  for (const ordered_json& chunk : chunks) {
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    EXPECT_TRUE(chunk.contains("usage"));
    if (chunk["choices"].empty()) continue;
    const ordered_json& delta = chunk["choices"][0]["delta"];
    reasoning += delta.value("reasoning_content", "");
    content += delta.value("content", "");
    for (const ordered_json& call : delta.value("tool_calls", ordered_json::array())) calls.push_back(call);
  }
  EXPECT_EQ(reasoning, "Paris is in France.");
  EXPECT_EQ(content, "Let me check.");
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0]["index"], 0);
  EXPECT_EQ(calls[0]["function"]["arguments"], R"({"city": "Paris"})");
  const ordered_json& last_choice = chunks[chunks.size() - 2]["choices"][0];
  EXPECT_EQ(last_choice["finish_reason"], "tool_calls");
  EXPECT_EQ(last_choice["delta"], ordered_json::object());
  EXPECT_TRUE(chunks.back()["choices"].empty());
  EXPECT_EQ(chunks.back()["usage"]["total_tokens"], 29);
}

TEST_F(ServerApiTest, ChatLogprobs) {
  const CompletionJob job = parse_chat_request(chat_body(R"({"logprobs": true, "top_logprobs": 2})"), served());
  ResponseCollector collector(job, *tokenizer_, meta());
  const int32_t hello = encode("Hello", AddedTokens::kMatch).at(0);
  for (const GenerationEvent& e : {token(hello, tokenizer_->decode(std::vector<int32_t>{hello})),
                                   token(served().end_of_turn, ""), finish("stop"), done(5, 2)})
    collector.add(e);
  const ordered_json content = collector.response()["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 1u);  // the end of turn is no part of the text
  const std::string text = tokenizer_->token_bytes(hello);
  EXPECT_EQ(content[0]["token"], text);
  EXPECT_FLOAT_EQ(content[0]["logprob"].get<float>(), -0.5f);
  EXPECT_EQ(content[0]["bytes"].size(), text.size());
  EXPECT_EQ(content[0]["top_logprobs"].size(), 2u);
  EXPECT_EQ(content[0]["top_logprobs"][1]["token"], tokenizer_->decode(std::vector<int32_t>{hello + 1}));
}

TEST_F(ServerApiTest, CompletionLogprobsAndStream) {
  const CompletionJob job =
      parse_completion_request(ordered_json::parse(R"({"prompt": "a", "logprobs": 1, "stream": true})"), served());
  ChunkStreamer streamer(job, *tokenizer_, meta());
  EXPECT_TRUE(streamer.opening().empty());
  std::vector<ordered_json> chunks;
  for (const GenerationEvent& e : {token(1, "h\xc3\xa9"), token(2, "llo"), finish("length"), done(1, 2)})
    for (ordered_json& chunk : streamer.on_event(e)) chunks.push_back(std::move(chunk));
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[0]["object"], "text_completion");
  EXPECT_EQ(chunks[0]["choices"][0]["text"], "h\xc3\xa9");
  EXPECT_EQ(chunks[1]["choices"][0]["logprobs"]["text_offset"], ordered_json::array({2}));  // characters, not bytes
  EXPECT_EQ(chunks[1]["choices"][0]["logprobs"]["token_logprobs"].size(), 1u);
  EXPECT_EQ(chunks[2]["choices"][0]["finish_reason"], "length");
  EXPECT_FALSE(chunks[2].contains("usage"));
}

TEST_F(ServerApiTest, CancelledAndFailedChoicesAreErrors) {
  const CompletionJob job = parse_chat_request(chat_body(), served());
  ResponseCollector collector(job, *tokenizer_, meta());
  collector.add(token(1, "a"));
  try {
    collector.add(finish("cancelled"));
    FAIL() << "a cancelled choice made a response";
  } catch (const ApiError& error) {
    EXPECT_EQ(error.status, 503);
  }
  ChunkStreamer streamer(job, *tokenizer_, meta());
  GenerationEvent failed = finish("error");
  failed.error = "boom";
  try {
    streamer.on_event(failed);
    FAIL() << "a failed choice made a chunk";
  } catch (const ApiError& error) {
    EXPECT_EQ(error.status, 500);
    EXPECT_NE(std::string(error.what()).find("boom"), std::string::npos);
  }
}

TEST_F(ServerApiTest, ErrorShape) {
  const ordered_json json = error_json(invalid_request("top_p must be in (0, 1]", "top_p"));
  EXPECT_EQ(json, ordered_json::parse(R"({"error": {"message": "top_p must be in (0, 1]",
      "type": "invalid_request_error", "param": "top_p", "code": null}})"));
  EXPECT_EQ(leading_parameter("messages[2].role: unknown role"), "messages[2].role");
  EXPECT_EQ(leading_parameter("n must be between 1 and 8"), "n");
}

TEST(ServerMetrics, PrometheusText) {
  EngineStats stats;
  stats.prompt_tokens = 12;
  stats.running = 2;
  stats.requests_cancelled = 1;
  stats.time_to_first_token.observe(0.003);
  stats.time_to_first_token.observe(0.2);
  stats.cache.hits = 3;
  stats.cache.hit_tokens = 4096;
  stats.cache.disk_rejected = 1;
  const std::string text = prometheus_text({{200, 5}, {400, 1}}, stats);
  for (const char* line : {"# TYPE m1_requests_total counter", "m1_requests_total{status=\"200\"} 5",
                           "m1_requests_total{status=\"400\"} 1", "m1_prompt_tokens_total 12", "m1_requests_running 2",
                           "# TYPE m1_requests_waiting gauge", "m1_engine_requests_total{outcome=\"cancelled\"} 1",
                           "# TYPE m1_time_to_first_token_seconds histogram",
                           "m1_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0",
                           "m1_time_to_first_token_seconds_bucket{le=\"0.005\"} 1",
                           "m1_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2",
                           "m1_time_to_first_token_seconds_count 2", "m1_inter_token_latency_seconds_count 0",
                           "# TYPE m1_prefix_cache_hits_total counter", "m1_prefix_cache_hits_total 3",
                           "m1_prefix_cache_hit_tokens_total 4096", "m1_prefix_cache_misses_total 0",
                           "# TYPE m1_prefix_cache_bytes gauge", "m1_prefix_cache_disk_rejected_total 1"})
    EXPECT_NE(text.find(std::string(line) + "\n"), std::string::npos) << line;
}

// --- The client's connection ---------------------------------------------------------------------

// A raw TCP client, so that the test decides when bytes arrive and when the connection closes.
class RawClient {
 public:
  explicit RawClient(int port) : socket_(::socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(uint16_t(port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(socket_, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0;
  }
  ~RawClient() { close(); }
  bool connected() const { return connected_; }
  bool send(const std::string& text) const { return ::send(socket_, text.data(), text.size(), MSG_NOSIGNAL) == ssize_t(text.size()); }
  void close() {
    if (socket_ >= 0) ::close(socket_);
    socket_ = -1;
  }

 private:
  int socket_;
  bool connected_ = false;
};

// A handler finds its own connection among the process's sockets: bytes the client sends after
// its request (a pipelined request) leave it connected; closing is noticed.
TEST(ClientConnection, NoticesAClientThatClosedButNotOneThatSentMore) {
  httplib::Server http;
  std::promise<void> started, pipelined;
  std::promise<bool> while_open;
  std::promise<bool> found, noticed;  // the socket was found while connected; the close, within 5 s
  http.Post("/wait", [&](const httplib::Request& request, httplib::Response& response) {
    found.set_value(find_connection_socket(request.local_addr, request.local_port, request.remote_addr,
                                           request.remote_port) >= 0);
    ClientConnection client(request);
    started.set_value();
    pipelined.get_future().wait();
    while_open.set_value(client.left());
    bool left = false;
    for (auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
         !left && std::chrono::steady_clock::now() < until;)
      if (!(left = client.left())) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    noticed.set_value(left);
    response.set_content("{}", "application/json");
  });
  const int port = http.bind_to_any_port("127.0.0.1");
  std::thread listener([&] { http.listen_after_bind(); });

  RawClient client(port);
  ASSERT_TRUE(client.connected());
  ASSERT_TRUE(client.send("POST /wait HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n"));
  started.get_future().wait();
  EXPECT_TRUE(found.get_future().get()) << "the handler's connection is not among the process's sockets";
  ASSERT_TRUE(client.send("GET /next HTTP/1.1\r\nHost: test\r\n\r\n"));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // on loopback the bytes are there by now
  pipelined.set_value();
  EXPECT_FALSE(while_open.get_future().get()) << "a pipelined request is not a client that left";
  client.close();
  EXPECT_TRUE(noticed.get_future().get()) << "closing the connection went unnoticed for 5 s";
  http.stop();
  listener.join();
}

TEST(ClientConnection, NoSocketHasAddressesNoConnectionUses) {
  EXPECT_EQ(find_connection_socket("127.0.0.1", 1, "127.0.0.1", 1), -1);
}

// --- HTTP without a model ------------------------------------------------------------------------

// m1-serve stops at once when its model fails to load: listen() may not have started yet.
TEST(ServerHttp, StopsBeforeListeningHasStarted) {
  for (int attempt = 0; attempt < 20; ++attempt) {
    HttpOptions options;
    options.threads = 1;
    ApiServer server(options);
    server.bind("127.0.0.1", 0);
    auto listening = std::async(std::launch::async, [&] { server.listen(); });
    server.stop();
    const bool ended = listening.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
    if (!ended) server.stop();  // listen() is running by now, so this one ends it
    ASSERT_TRUE(ended) << "listen() went on after stop(), attempt " << attempt;
  }
}

TEST(ServerHttp, AnswersWhileTheModelLoads) {
  ApiServer server(HttpOptions{.api_key = "k", .max_body_bytes = 1024, .threads = 4});
  const int port = server.bind("127.0.0.1", 0);
  std::thread listener([&] { server.listen(); });
  httplib::Client client("127.0.0.1", port);
  client.set_bearer_token_auth("k");
  const auto type_of = [](const httplib::Result& r) { return ordered_json::parse(r->body)["error"]["type"]; };

  auto health = client.Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 503);
  EXPECT_EQ(ordered_json::parse(health->body)["status"], "loading");
  auto models = client.Get("/v1/models");
  EXPECT_EQ(models->status, 503);
  EXPECT_EQ(models->get_header_value("Retry-After"), "1");
  auto chat = client.Post("/v1/chat/completions", "{}", "application/json");
  EXPECT_EQ(chat->status, 503);
  EXPECT_EQ(type_of(chat), "service_unavailable");
  auto unknown = client.Get("/v1/nothing");
  EXPECT_EQ(unknown->status, 404);
  EXPECT_EQ(type_of(unknown), "not_found_error");
  auto wrong_method = client.Get("/v1/chat/completions");
  EXPECT_EQ(wrong_method->status, 405);
  EXPECT_EQ(wrong_method->get_header_value("Allow"), "POST");
  auto too_large = client.Post("/v1/completions", std::string(2048, ' '), "application/json");
  EXPECT_EQ(too_large->status, 413);

  httplib::Client anonymous("127.0.0.1", port);
  EXPECT_EQ(anonymous.Get("/health")->status, 503);  // no key needed
  auto refused = anonymous.Get("/v1/models");
  EXPECT_EQ(refused->status, 401);
  EXPECT_EQ(type_of(refused), "authentication_error");

  server.stop();
  listener.join();
}

}  // namespace
}  // namespace m1::server
