#pragma once
// What the end-to-end server tests share: m1-serve as a child process on a tiny random model,
// an HTTP client that reads whole responses and Server-Sent Events streams, and helpers that
// build requests and read responses and /metrics.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "m1/config.h"
#include "test_support.h"

namespace m1::testing {

namespace fs = std::filesystem;
using nlohmann::ordered_json;
using namespace std::chrono_literals;

inline const std::string kBinDir = M1_BIN_DIR;

// A scratch directory holding a tiny random model in DIR/tiny.
fs::path make_model(const std::string& name, const std::string& mkmodel_flags = "");

// One sequence's state of `tokens` tokens as m1-serve holds the model in `dir` by default (the CPU
// backend, fast precision): fp32 lightning states, and 2 * g * d values per token and softmax
// layer of the KV cache's type (bf16 where the CPU multiplies bf16, asked of a state of the model
// loaded here). What the engine's state budget (--max-state-mb) counts.
int64_t cpu_state_bytes(const fs::path& dir, int64_t tokens);

// m1-serve as a child process serving DIR/tiny, its output (stderr and stdout) in DIR/serve.log;
// the port is read from its listening line. A process that cannot be started, or that exits before
// it listens, is a test failure; the object then holds no process and signals nothing, ever: a
// pid <= 0 given to kill() would reach a process group, or as root every process on the machine.
class ServerProcess {
 public:
  ServerProcess(const fs::path& dir, const std::vector<std::string>& flags, const std::string& binary = kBinDir + "/m1-serve");
  ~ServerProcess();
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  int port() const { return port_; }
  std::string log() const { return read_file(log_); }

  // Sends `signal` to the child while it runs; false (nothing sent) when there is none.
  bool signal(int signal) const { return pid_ > 0 && ::kill(pid_, signal) == 0; }
  // Waits for the exit; returns the exit code, or -1 after `limit`, on a crash, or with no child.
  int wait(std::chrono::seconds limit = 15s);
  // True while the process has not exited (or crashed).
  bool running() { return pid_ > 0 && !reap(); }
  // Resident memory in KiB (VmRSS of /proc/PID/status); -1 when unreadable.
  int64_t resident_kib() const;

 private:
  // Collects the child's exit if it has exited; the object then holds no process.
  bool reap();
  int wait_for_line();

  fs::path log_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
  int port_ = 0;
};

struct Reply {
  int status = 0;  // 0: no response (connection failed or timed out), see `error`
  ordered_json json;
  std::string body;
  std::string retry_after;
  std::string error;
};

// The events of a Server-Sent Events stream; "[DONE]" is kept as a JSON string. A response that
// is not a stream (an error status) keeps its body in `reply`.
struct Stream {
  std::vector<ordered_json> events;
  Reply reply;
  bool done() const { return !events.empty() && events.back() == "[DONE]"; }
  std::vector<ordered_json> chunks() const {
    std::vector<ordered_json> chunks(events.begin(), events.end() - (done() ? 1 : 0));
    return chunks;
  }
};

// HTTP to 127.0.0.1:PORT, a new connection per request (server_harness.cpp holds the httplib client).
class Client {
 public:
  explicit Client(int port, std::string key = "") : port_(port), key_(std::move(key)) {}

  // A client that gives up on a response after `timeout` (a client that goes away).
  Client with_read_timeout(std::chrono::milliseconds timeout) const {
    Client impatient = *this;
    impatient.read_timeout_ = timeout;
    return impatient;
  }

  Reply get(const std::string& path) const;
  Reply post(const std::string& path, const ordered_json& body) const { return post_raw(path, body.dump()); }
  Reply post_raw(const std::string& path, const std::string& body,
                 const std::string& content_type = "application/json") const;

  // Reads an SSE response; `keep_reading` may end it early (the client then disconnects).
  Stream stream(const std::string& path, const ordered_json& body,
                const std::function<bool(const ordered_json&)>& keep_reading = {}) const;

 private:
  int port_;
  std::string key_;
  std::chrono::milliseconds read_timeout_ = 60s;
};

inline ordered_json chat_request(const std::string& text, int max_tokens) {
  return {{"model", "tiny"},
          {"messages", {{{"role", "user"}, {"content", text}}}},
          {"temperature", 0},
          {"max_tokens", max_tokens}};
}

inline ordered_json completion_request(const std::string& prompt, int max_tokens) {
  return {{"model", "tiny"}, {"prompt", prompt}, {"temperature", 0}, {"max_tokens", max_tokens}};
}

inline ordered_json streamed(ordered_json request) {
  request["stream"] = true;
  request["stream_options"] = {{"include_usage", true}};
  return request;
}

// The text of one choice of a whole response (chat content or completion text).
inline std::string text_of(const ordered_json& response, size_t index = 0) {
  const ordered_json& choice = response["choices"][index];
  return choice.contains("message") ? choice["message"]["content"].get<std::string>() : choice["text"].get<std::string>();
}

// A stream's text for one choice, chunks concatenated.
inline std::string text_of(const Stream& stream, int index = 0) {
  std::string text;
  for (const ordered_json& chunk : stream.chunks())
    for (const ordered_json& choice : chunk["choices"])
      if (choice["index"] == index)
        text += choice.contains("delta") ? choice["delta"].value("content", "") : choice["text"].get<std::string>();
  return text;
}

inline std::string finish_of(const Stream& stream, int index = 0) {
  for (const ordered_json& chunk : stream.chunks())
    for (const ordered_json& choice : chunk["choices"])
      if (choice["index"] == index && !choice["finish_reason"].is_null()) return choice["finish_reason"];
  return "";
}

// Polls `condition` every 20 ms until `limit`; true once it holds.
inline bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds limit = 5s) {
  for (auto deadline = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < deadline;) {
    if (condition()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return condition();
}

// A sample's value in Prometheus text (`name` with its labels); -1 when absent.
inline int64_t metric(const std::string& metrics_text, const std::string& name) {
  const size_t at = metrics_text.find("\n" + name + " ");
  return at == std::string::npos ? -1 : std::stoll(metrics_text.substr(at + name.size() + 2));
}

// /metrics once the engine is idle: nothing running or waiting.
inline std::string idle_metrics(const Client& client, std::chrono::milliseconds limit = 5s) {
  std::string text;
  EXPECT_TRUE(eventually(
      [&] {
        text = client.get("/metrics").body;
        return metric(text, "m1_requests_running") == 0 && metric(text, "m1_requests_waiting") == 0;
      },
      limit))
      << text;
  return text;
}

inline int64_t engine_requests(const std::string& metrics_text, const std::string& outcome) {
  return metric(metrics_text, "m1_engine_requests_total{outcome=\"" + outcome + "\"}");
}

// Every request the engine started has ended one way or another and released its state.
inline void expect_balanced(const std::string& metrics_text) {
  EXPECT_EQ(engine_requests(metrics_text, "started"), engine_requests(metrics_text, "finished") +
                                                          engine_requests(metrics_text, "cancelled") +
                                                          engine_requests(metrics_text, "failed") +
                                                          engine_requests(metrics_text, "refused"))
      << metrics_text;
  EXPECT_EQ(metric(metrics_text, "m1_state_bytes"), 0) << metrics_text;
}

}  // namespace m1::testing
