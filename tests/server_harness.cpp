// The end-to-end harness's process handling and HTTP client (server_harness.h), compiled once for
// every server test instead of in each of them.
#include "server_harness.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <regex>

#include <httplib.h>

#include "m1/backends.h"
#include "m1/model.h"

extern char** environ;

namespace m1::testing {

int64_t cpu_state_bytes(const fs::path& dir, int64_t tokens) {
  const ModelConfig c = load_config(dir / "config.json");
  const std::unique_ptr<Backend> backend = create_backend(BackendOptions{"cpu", 1});
  const DType kv_dtype = Model::load(dir, *backend)->new_sequence()->kv_dtype();
  const int64_t lightning = c.lightning_layers() * c.num_attention_heads * c.head_dim * c.head_dim;
  const int64_t kv = c.softmax_layers() * 2 * c.num_key_value_heads * c.head_dim * tokens;
  return 4 * lightning + kv * dtype_bits(kv_dtype) / 8;
}

fs::path make_model(const std::string& name, const std::string& mkmodel_flags) {
  const fs::path dir = fs::temp_directory_path() / ("m1-server-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(dir);
  const CommandResult r =
      run_command(kBinDir + "/m1-mkmodel --preset tiny --out " + (dir / "tiny").string() + " " + mkmodel_flags);
  EXPECT_EQ(r.status, 0) << r.err;
  return dir;
}

namespace {

// Pointers into `strings`, null-terminated.
std::vector<char*> argv(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace

ServerProcess::ServerProcess(const fs::path& dir, const std::vector<std::string>& flags, const std::string& binary)
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

ServerProcess::~ServerProcess() {
  if (signal(SIGKILL)) wait();
}

int ServerProcess::wait(std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (pid_ > 0) {
    if (reap()) break;
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(20ms);
  }
  return exit_code_;
}

int64_t ServerProcess::resident_kib() const {
  if (pid_ <= 0) return -1;
  const std::string status = read_file("/proc/" + std::to_string(pid_) + "/status");
  const size_t at = status.find("VmRSS:");
  return at == std::string::npos ? -1 : std::stoll(status.substr(at + 6));
}

bool ServerProcess::reap() {
  int status = 0;
  if (pid_ <= 0 || ::waitpid(pid_, &status, WNOHANG) != pid_) return false;
  pid_ = -1;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return true;
}

int ServerProcess::wait_for_line() {
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

namespace {

httplib::Client connect(int port, const std::string& key, std::chrono::milliseconds read_timeout) {
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(read_timeout);
  if (!key.empty()) client.set_bearer_token_auth(key.c_str());
  return client;
}

Reply reply(const httplib::Result& result) {
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

}  // namespace

Reply Client::get(const std::string& path) const {
  httplib::Client client = connect(port_, key_, read_timeout_);
  return reply(client.Get(path.c_str()));
}

Reply Client::post_raw(const std::string& path, const std::string& body, const std::string& content_type) const {
  httplib::Client client = connect(port_, key_, read_timeout_);
  return reply(client.Post(path.c_str(), body, content_type.c_str()));
}

Stream Client::stream(const std::string& path, const ordered_json& body,
                      const std::function<bool(const ordered_json&)>& keep_reading) const {
  httplib::Client client = connect(port_, key_, read_timeout_);
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

}  // namespace m1::testing
