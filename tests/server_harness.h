#pragma once
// What the end-to-end server tests share: m1-serve as a child process on a tiny random model,
// an HTTP client that reads whole responses and Server-Sent Events streams, and helpers that
// build requests and read responses and /metrics.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "m1/config.h"
#include "test_support.h"

extern char** environ;

namespace m1::testing {

namespace fs = std::filesystem;
using nlohmann::ordered_json;
using namespace std::chrono_literals;

inline const std::string kBinDir = M1_BIN_DIR;

// A scratch directory holding a tiny random model in DIR/tiny.
inline fs::path make_model(const std::string& name, const std::string& mkmodel_flags = "") {
  const fs::path dir = fs::temp_directory_path() / ("m1-server-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(dir);
  const CommandResult r =
      run_command(kBinDir + "/m1-mkmodel --preset tiny --out " + (dir / "tiny").string() + " " + mkmodel_flags);
  EXPECT_EQ(r.status, 0) << r.err;
  return dir;
}

// One sequence's state of `tokens` tokens as the CPU backend holds it (fp32 lightning states and
// KV cache): what the engine's state budget (--max-state-mb) counts.
inline int64_t cpu_state_bytes(const ModelConfig& c, int64_t tokens) {
  const int64_t lightning = c.lightning_layers() * c.num_attention_heads * c.head_dim * c.head_dim;
  const int64_t kv = c.softmax_layers() * 2 * c.num_key_value_heads * c.head_dim * tokens;
  return 4 * (lightning + kv);
}

// m1-serve as a child process serving DIR/tiny, its output (stderr and stdout) in DIR/serve.log;
// the port is read from its listening line. A process that cannot be started, or that exits before
// it listens, is a test failure; the object then holds no process and signals nothing, ever: a
// pid <= 0 given to kill() would reach a process group, or as root every process on the machine.
class ServerProcess {
 public:
  ServerProcess(const fs::path& dir, const std::vector<std::string>& flags, const std::string& binary = kBinDir + "/m1-serve")
      : log_(dir / "serve.log") {
    std::vector<std::string> args = {binary, "--model", (dir / "tiny").string(), "--port", "0", "--threads", "1"};
    args.insert(args.end(), flags.begin(), flags.end());
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 2, log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&files, 2, 1);
    pid_t pid = 0;
    const int error = posix_spawn(&pid, args[0].c_str(), &files, nullptr, argv(args).data(), environ);
    posix_spawn_file_actions_destroy(&files);
    if (error != 0) {
      ADD_FAILURE() << "cannot start " << binary << ": " << std::strerror(error);
      return;
    }
    pid_ = pid;
    port_ = wait_for_line();
  }
  ~ServerProcess() {
    if (signal(SIGKILL)) wait();
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  int port() const { return port_; }
  std::string log() const { return read_file(log_); }

  // Sends `signal` to the child while it runs; false (nothing sent) when there is none.
  bool signal(int signal) const { return pid_ > 0 && ::kill(pid_, signal) == 0; }
  // Waits for the exit; returns the exit code, or -1 after `limit`, on a crash, or with no child.
  int wait(std::chrono::seconds limit = 15s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (pid_ > 0) {
      if (reap()) break;
      if (std::chrono::steady_clock::now() > deadline) return -1;
      std::this_thread::sleep_for(20ms);
    }
    return exit_code_;
  }
  // True while the process has not exited (or crashed).
  bool running() { return pid_ > 0 && !reap(); }
  // Resident memory in KiB (VmRSS of /proc/PID/status); -1 when unreadable.
  int64_t resident_kib() const {
    if (pid_ <= 0) return -1;
    const std::string status = read_file("/proc/" + std::to_string(pid_) + "/status");
    const size_t at = status.find("VmRSS:");
    return at == std::string::npos ? -1 : std::stoll(status.substr(at + 6));
  }

 private:
  // Pointers into `strings`, null-terminated.
  static std::vector<char*> argv(std::vector<std::string>& strings) {
    std::vector<char*> out;
    for (std::string& s : strings) out.push_back(s.data());
    out.push_back(nullptr);
    return out;
  }

  // Collects the child's exit if it has exited; the object then holds no process.
  bool reap() {
    int status = 0;
    if (pid_ <= 0 || ::waitpid(pid_, &status, WNOHANG) != pid_) return false;
    pid_ = -1;
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    return true;
  }

  int wait_for_line() {
    const std::regex listening("m1-serve: listening on http://127\\.0\\.0\\.1:(\\d+)");
    for (int i = 0; i < 500; ++i) {
      std::smatch match;
      const std::string text = log();
      if (std::regex_search(text, match, listening) && text.find("ready") != std::string::npos)
        return std::stoi(match[1]);
      if (reap()) {
        ADD_FAILURE() << "m1-serve exited with status " << exit_code_ << " before it listened: " << log();
        return 0;
      }
      std::this_thread::sleep_for(20ms);
    }
    ADD_FAILURE() << "m1-serve did not start: " << log();
    return 0;
  }

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

class Client {
 public:
  explicit Client(int port, std::string key = "") : port_(port), key_(std::move(key)) {}

  // A client that gives up on a response after `timeout` (a client that goes away).
  Client with_read_timeout(std::chrono::milliseconds timeout) const {
    Client impatient = *this;
    impatient.read_timeout_ = timeout;
    return impatient;
  }

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
    Stream stream;
    std::string pending;
    request.response_handler = [&](const httplib::Response& response) {
      stream.reply.status = response.status;
      stream.reply.retry_after = response.get_header_value("Retry-After");
      return true;
    };
    request.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
      if (stream.reply.status != 200) {
        stream.reply.body.append(data, size);
        return true;
      }
      pending.append(data, size);
      for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
        const std::string event = pending.substr(0, end);
        pending.erase(0, end + 2);
        EXPECT_TRUE(event.starts_with("data: ")) << event;
        const std::string data_text = event.substr(6);
        stream.events.push_back(data_text == "[DONE]" ? ordered_json("[DONE]")
                                                      : ordered_json::parse(data_text, nullptr, false));
        EXPECT_FALSE(stream.events.back().is_discarded()) << event;
        if (keep_reading && !keep_reading(stream.events.back())) return false;
      }
      return true;
    };
    if (const httplib::Result result = client.send(request); !result) stream.reply.error = httplib::to_string(result.error());
    stream.reply.json = ordered_json::parse(stream.reply.body, nullptr, false);
    return stream;
  }

 private:
  httplib::Client connect() const {
    httplib::Client client("127.0.0.1", port_);
    client.set_read_timeout(read_timeout_);
    if (!key_.empty()) client.set_bearer_token_auth(key_.c_str());
    return client;
  }
  static Reply reply(const httplib::Result& result) {
    Reply r;
    if (!result) {
      r.error = httplib::to_string(result.error());
      return r;
    }
    r.status = result->status;
    r.body = result->body;
    r.retry_after = result->get_header_value("Retry-After");
    r.json = ordered_json::parse(result->body, nullptr, false);
    return r;
  }

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
