// m1-serve: the OpenAI-compatible HTTP server. Listens at once, loads the model on a thread of
// its own (answering 503 meanwhile), and on SIGTERM or SIGINT stops taking requests, gives
// those in flight a bounded grace period, and exits 0.

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "api_server.h"
#include "parallel_flags.h"
#include "model_service.h"

namespace {

using namespace m1::server;

struct Options {
  ModelOptions model;
  HttpOptions http;
  std::string host = "127.0.0.1";
  int port = 8080;
  double max_body_mb = 8;
  double max_state_mb = 0;
  double cache_mb = 4096, cache_dir_mb = 16384;
  double shutdown_grace_s = 5;
  size_t http_threads = 0;
  std::string precision = "fast";
  m1::ParallelFlags parallel;
  std::string quantize;
  int64_t group_size = 0;
  bool quantize_lm_head = false;
};

// Lifecycle lines go to stderr in a fixed form: scripts and tests read them.
template <class... Args>
void announce(fmt::format_string<Args...> format, Args&&... args) {
  fmt::print(stderr, "m1-serve: {}\n", fmt::format(format, std::forward<Args>(args)...));
  std::fflush(stderr);
}

sigset_t shutdown_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

// Loads the model in the background; the main thread watches for it and for signals.
class ModelLoader {
 public:
  enum class State { kLoading, kReady, kFailed };

  ModelLoader(const ModelOptions& options, ApiServer& server) : thread_([this, &options, &server] {
    load(options, server);
  }) {}
  ~ModelLoader() { thread_.join(); }

  State state() const { return state_.load(); }

 private:
  void load(const ModelOptions& options, ApiServer& server) {
    try {
      const auto start = std::chrono::steady_clock::now();
      model_ = std::make_unique<ModelService>(options);
      server.set_model(*model_);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      announce("model '{}' ready ({}, context {} tokens, loaded in {:.1f} s)", model_->served().name,
               model_->backend_name(), model_->served().max_context, seconds);
      state_.store(State::kReady);
    } catch (const std::exception& error) {
      announce("cannot load the model: {}", error.what());
      state_.store(State::kFailed);
    }
  }

  std::unique_ptr<ModelService> model_;
  std::atomic<State> state_{State::kLoading};
  std::thread thread_;
};

// Blocks until SIGTERM or SIGINT, or until loading the model fails.
void wait_for_shutdown(const ModelLoader& loader) {
  const sigset_t signals = shutdown_signals();
  const timespec poll = {0, 100'000'000};
  while (loader.state() != ModelLoader::State::kFailed) {
    if (const int signal = sigtimedwait(&signals, nullptr, &poll); signal > 0) {
      announce("{} received: shutting down", signal == SIGINT ? "SIGINT" : "SIGTERM");
      return;
    }
  }
}

int serve(const Options& o) {
  ApiServer server(o.http);
  const int port = server.bind(o.host, o.port);
  announce("listening on http://{}:{}", o.host, port);
  std::thread http([&server] { server.listen(); });
  ModelLoader loader(o.model, server);
  wait_for_shutdown(loader);

  const ModelLoader::State state = loader.state();
  if (state == ModelLoader::State::kLoading) {
    // A checkpoint load cannot be interrupted; there is nothing in flight to wait for either.
    announce("exiting before the model finished loading");
    std::_Exit(0);
  }
  if (state == ModelLoader::State::kReady)
    server.drain(std::chrono::milliseconds(int64_t(o.shutdown_grace_s * 1000)));
  server.stop();
  http.join();
  announce("stopped");
  return state == ModelLoader::State::kReady ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"m1-serve: OpenAI-compatible HTTP server for MiniMax-M1 checkpoints"};
  Options o;
  m1::EngineOptions& engine = o.model.engine;
  app.add_option("--model", o.model.dir, "Checkpoint directory (config.json, safetensors, tokenizer.json)")->required();
  app.add_option("--served-model-name", o.model.served_name, "Model id clients use (default: the directory's name)");
  app.add_option("--host", o.host, "Address to listen on")->capture_default_str();
  app.add_option("--port", o.port, "Port to listen on (0: any free port)")->capture_default_str()->check(CLI::Range(0, 65535));
  app.add_option("--api-key", o.http.api_key, "Require Authorization: Bearer KEY on every endpoint but /health");
  app.add_option("--max-batch", engine.max_batch, "Sequences decoded together (each choice counts)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-context", engine.max_context, "Prompt + generated tokens per sequence (0: the model's maximum)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--step-tokens", engine.step_tokens, "New tokens per forward step (decode tokens + prefill chunks)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-queue", engine.max_queue, "Requests waiting for a place before new ones get 503")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-state-mb", o.max_state_mb, "MiB of sequence state (KV caches, lightning states) admitted requests may hold at their largest; more wait in the queue (0: no limit)")->capture_default_str()->check(CLI::NonNegativeNumber);
  m1::PrefixCacheOptions& cache = engine.cache;
  app.add_option("--cache-mb", o.cache_mb, "MiB of memory for prefix-cache snapshots (prompt states later requests resume from); 0 turns the cache off")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--cache-every", cache.every, "Also snapshot every N tokens of a long prompt (0: only near its end)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--cache-dir", cache.dir, "Also keep snapshots of long prefixes as files in DIR, found again after a restart");
  app.add_option("--cache-dir-mb", o.cache_dir_mb, "MiB of snapshot files in --cache-dir")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--cache-min-tokens", cache.min_disk_tokens, "Only prefixes of at least N tokens go to --cache-dir")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--threads", o.model.backend.threads, "CPU compute threads (0: one per core)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--device", o.model.backend.device, "cpu or cuda (a build with the CUDA backend and a GPU)")->capture_default_str();
  m1::add_parallel_flags(app, o.model.backend, o.parallel);
  app.add_option("--precision", o.precision, "fast (bf16 matrix operands where the CPU multiplies bf16, fp32 accumulation) or exact (fp32 throughout)")->capture_default_str();
  app.add_option("--http-threads", o.http_threads, "Connections served at once (0: max(64, 4 x max-batch))")->capture_default_str();
  app.add_option("--max-grammar-states", o.model.max_grammar_states, "Lexer states one request's response_format or strict tools may build while its output is matched (each a row of transitions); past them the request gets a 400")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--max-body-mb", o.max_body_mb, "Largest request body in MiB")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--shutdown-grace", o.shutdown_grace_s, "Seconds in-flight requests get to finish at shutdown")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--quantize", o.quantize, "Quantize weights while loading: int8 (a scale per row) or int4 (a scale per group)");
  app.add_option("--group-size", o.group_size, "--quantize int4: inputs per scale, a multiple of 32 (default 32)");
  app.add_flag("--quantize-lm-head", o.quantize_lm_head, "--quantize the LM head too (kept in its stored type by default)");
  CLI11_PARSE(app, argc, argv);

  spdlog::set_default_logger(spdlog::stderr_color_mt("m1-serve"));  // stdout stays free for tools
  // Signals are taken by sigtimedwait on the main thread: block them before any thread starts.
  const sigset_t signals = shutdown_signals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  try {
    o.model.backend.precision = m1::parse_precision(o.precision);
    o.model.load = m1::parse_load_options(o.quantize, o.group_size, o.quantize_lm_head, o.model.backend.threads);
    o.parallel.apply(o.model.backend, o.model.load.shard);
    o.http.max_body_bytes = size_t(o.max_body_mb * 1024 * 1024);
    engine.max_state_bytes = int64_t(o.max_state_mb * 1024 * 1024);
    cache.max_bytes = int64_t(o.cache_mb * 1024 * 1024);
    cache.dir_max_bytes = int64_t(o.cache_dir_mb * 1024 * 1024);
    if (!cache.dir.empty() && cache.max_bytes == 0)
      m1::fail("--cache-dir needs the prefix cache: --cache-mb 0 turns it off");
    o.http.threads = o.http_threads > 0 ? o.http_threads : size_t(std::max<int64_t>(64, 4 * engine.max_batch));
    return serve(o);
  } catch (const std::exception& error) {
    announce("{}", error.what());
    return 1;
  }
}
