// m1-serve end to end: the real executable on a tiny random model, driven over HTTP on
// 127.0.0.1. One server process serves every test of ServerTest; the shutdown tests start their
// own. Random models write random text, so results are compared with other paths (m1-generate,
// the tokenizer, sequential runs), never with fixed text.

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <regex>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "m1/chat.h"
#include "m1/tokenizer.h"

extern char** environ;

namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;
using namespace std::chrono_literals;

const std::string kBin = M1_BIN_DIR;
const std::string kKey = "test-key";
const int kContext = 1024;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Runs a command line, returning its stdout; fails the test on a non-zero exit.
std::string run(const std::string& command) {
  std::string out;
  FILE* pipe = ::popen(command.c_str(), "r");
  char buffer[4096];
  for (size_t n; (n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0;) out.append(buffer, n);
  EXPECT_EQ(::pclose(pipe), 0) << command;
  return out;
}

// A scratch directory holding a tiny random model.
fs::path make_model(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("m1-server-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(dir);
  run(kBin + "/m1-mkmodel --preset tiny --out " + (dir / "tiny").string() + " 2>/dev/null");
  return dir;
}

// m1-serve as a child process, its stderr in a file; the port is read from its listening line.
class ServerProcess {
 public:
  ServerProcess(const fs::path& dir, const std::vector<std::string>& flags) : log_(dir / "serve.log") {
    std::vector<std::string> args = {kBin + "/m1-serve", "--model", (dir / "tiny").string(), "--port", "0",
                                      "--threads", "1"};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 2, log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    EXPECT_EQ(posix_spawn(&pid_, argv[0], &files, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&files);
    port_ = wait_for_line();
  }
  ~ServerProcess() {
    if (pid_ <= 0) return;
    signal(SIGKILL);
    wait();
  }

  int port() const { return port_; }
  std::string log() const { return read_file(log_); }

  void signal(int signal) const { ::kill(pid_, signal); }
  // Waits for the exit; returns the exit code, or -1 after `limit` or on a crash.
  int wait(std::chrono::seconds limit = 15s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      if (std::chrono::steady_clock::now() > deadline) return -1;
      std::this_thread::sleep_for(20ms);
    }
  }

 private:
  int wait_for_line() {
    const std::regex listening("m1-serve: listening on http://127\\.0\\.0\\.1:(\\d+)");
    for (int i = 0; i < 500; ++i) {
      std::smatch match;
      const std::string text = log();
      if (std::regex_search(text, match, listening) && text.find("ready") != std::string::npos)
        return std::stoi(match[1]);
      std::this_thread::sleep_for(20ms);
    }
    ADD_FAILURE() << "m1-serve did not start: " << log();
    return 0;
  }

  fs::path log_;
  pid_t pid_ = -1;
  int port_ = 0;
};

struct Reply {
  int status = 0;  // 0: no response (connection failed)
  ordered_json json;
  std::string body;
  std::string retry_after;
};

// The events of a Server-Sent Events stream; "[DONE]" is kept as a JSON string.
struct Stream {
  std::vector<ordered_json> events;
  bool done() const { return !events.empty() && events.back() == "[DONE]"; }
  std::vector<ordered_json> chunks() const {
    std::vector<ordered_json> chunks(events.begin(), events.end() - (done() ? 1 : 0));
    return chunks;
  }
};

class Client {
 public:
  explicit Client(int port, std::string key = kKey) : port_(port), key_(std::move(key)) {}

  Reply get(const std::string& path) const {
    httplib::Client client = connect();
    return reply(client.Get(path.c_str()));
  }
  Reply post(const std::string& path, const ordered_json& body) const { return post_raw(path, body.dump()); }
  Reply post_raw(const std::string& path, const std::string& body) const {
    httplib::Client client = connect();
    return reply(client.Post(path.c_str(), body, "application/json"));
  }

  // Reads an SSE response; `keep_reading` may end it early (the client then disconnects).
  Stream stream(const std::string& path, const ordered_json& body,
                const std::function<bool(const ordered_json&)>& keep_reading = {}) const {
    httplib::Client client = connect();
    httplib::Request request;
    request.method = "POST";
    request.path = path;
    request.body = body.dump();
    request.set_header("Content-Type", "application/json");
    request.set_header("Authorization", "Bearer " + key_);
    Stream stream;
    std::string pending;
    request.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
      pending.append(data, size);
      for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
        const std::string event = pending.substr(0, end);
        pending.erase(0, end + 2);
        EXPECT_TRUE(event.starts_with("data: ")) << event;
        const std::string data_text = event.substr(6);
        stream.events.push_back(data_text == "[DONE]" ? ordered_json("[DONE]") : ordered_json::parse(data_text));
        if (keep_reading && !keep_reading(stream.events.back())) return false;
      }
      return true;
    };
    client.send(request);
    return stream;
  }

 private:
  httplib::Client connect() const {
    httplib::Client client("127.0.0.1", port_);
    client.set_read_timeout(60, 0);
    if (!key_.empty()) client.set_bearer_token_auth(key_.c_str());
    return client;
  }
  static Reply reply(const httplib::Result& result) {
    if (!result) return {};
    Reply r{result->status, {}, result->body, result->get_header_value("Retry-After")};
    r.json = ordered_json::parse(result->body, nullptr, false);
    return r;
  }

  int port_;
  std::string key_;
};

ordered_json chat_request(const std::string& text, int max_tokens) {
  return {{"model", "tiny"},
          {"messages", {{{"role", "user"}, {"content", text}}}},
          {"temperature", 0},
          {"max_tokens", max_tokens}};
}

ordered_json completion_request(const std::string& prompt, int max_tokens) {
  return {{"model", "tiny"}, {"prompt", prompt}, {"temperature", 0}, {"max_tokens", max_tokens}};
}

ordered_json streamed(ordered_json request) {
  request["stream"] = true;
  request["stream_options"] = {{"include_usage", true}};
  return request;
}

// The text of choice 0 of a whole response (chat content or completion text).
std::string text_of(const ordered_json& response) {
  const ordered_json& choice = response["choices"][0];
  return choice.contains("message") ? choice["message"]["content"].get<std::string>() : choice["text"].get<std::string>();
}

// A stream's text for one choice, chunks concatenated.
std::string text_of(const Stream& stream, int index = 0) {
  std::string text;
  for (const ordered_json& chunk : stream.chunks())
    for (const ordered_json& choice : chunk["choices"])
      if (choice["index"] == index)
        text += choice.contains("delta") ? choice["delta"].value("content", "") : choice["text"].get<std::string>();
  return text;
}

std::string finish_of(const Stream& stream, int index = 0) {
  for (const ordered_json& chunk : stream.chunks())
    for (const ordered_json& choice : chunk["choices"])
      if (choice["index"] == index && !choice["finish_reason"].is_null()) return choice["finish_reason"];
  return "";
}

// UTF-8 text split into characters.
std::vector<std::string> characters(const std::string& text) {
  std::vector<std::string> chars;
  for (const char c : text) {
    if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) chars.emplace_back();
    chars.back() += c;
  }
  return chars;
}

// Polls `condition` every 20 ms for up to 5 s; true once it holds.
bool eventually(const std::function<bool()>& condition) {
  for (int i = 0; i < 250; ++i) {
    if (condition()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return false;
}

int64_t metric(const std::string& metrics_text, const std::string& name) {
  const size_t at = metrics_text.find("\n" + name + " ");
  return at == std::string::npos ? -1 : std::stoll(metrics_text.substr(at + name.size() + 2));
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

  Client client() const { return Client(server_->port()); }
  std::string generate(const std::string& flags) const {
    std::string text = run(kBin + "/m1-generate --model " + (dir_ / "tiny").string() + " --threads 1 " + flags + " 2>/dev/null");
    text.pop_back();  // m1-generate ends the text with a newline
    return text;
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
      {"JSON mode", chat, "{" + user + R"(, "response_format": {"type": "json_object"}})", 400, "invalid_request_error",
       "response_format"},
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
  ordered_json request = chat_request("What is the weather in Paris?", 12);
  request["tools"] = ordered_json::parse(R"([{"type": "function", "function": {"name": "get_weather",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])");
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
  const ordered_json& message = named.json["choices"][0]["message"];
  EXPECT_NE(message["content"].get<std::string>().find(opening), std::string::npos) << message.dump();
  EXPECT_FALSE(message.contains("tool_calls"));
  EXPECT_EQ(named.json["choices"][0]["finish_reason"], "length");
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
  client().post("/v1/completions", completion_request("Count me", 4));
  const Reply reply = client().get("/metrics");
  ASSERT_EQ(reply.status, 200);
  const std::string& text = reply.body;
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

TEST_F(OwnServerTest, SigtermLetsStreamsFinish) {
  ServerProcess server(dir_, {"--max-context", "4096", "--shutdown-grace", "60"});
  Reply during;
  const Stream stream = stream_through_sigterm(server, [&] {
    std::this_thread::sleep_for(300ms);  // the server notices a signal within 100 ms
    during = Client(server.port()).get("/v1/models");
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
