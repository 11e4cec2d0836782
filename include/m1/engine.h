#pragma once
// Continuous batching: requests from many clients share every forward step. A request joins as
// soon as there is room, its prompt is prefilled in chunks alongside other sequences' decode
// tokens, and it leaves the batch the step it finishes. Knows nothing of HTTP.

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "m1/error.h"
#include "m1/model.h"
#include "m1/prefix_cache.h"
#include "m1/sampler.h"
#include "m1/structured_output.h"
#include "m1/tokenizer.h"

namespace m1 {

struct EngineOptions {
  int64_t max_batch = 16;       // sequences decoding together (each choice of n counts)
  int64_t max_context = 0;      // prompt + generated tokens per sequence; 0: the model's maximum
  int64_t step_tokens = 512;    // new tokens per forward step (decode tokens + prefill chunks)
  int64_t max_queue = 256;      // requests waiting for a place; more are refused
  // Sequence state (lightning states and KV caches, as SequenceState::bytes counts them) that
  // admitted requests may hold at their largest; requests beyond it wait in the queue. 0: no limit.
  int64_t max_state_bytes = 0;
  // Snapshots of prompts' states that later requests resume from (cache.max_bytes 0: off).
  PrefixCacheOptions cache = {};
};

struct GenerationRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_tokens = 256;
  std::vector<std::string> stop;
  std::vector<int32_t> end_tokens;  // end of turn; not part of the text
  int n = 1;                        // independent choices sharing the prompt
  std::vector<TokenBias> logit_bias;
  // What the output must be (compile_output_grammar); null: anything. Each choice follows it with
  // a matcher of its own, on the engine thread, whose mask the sampler applies; a choice ends
  // with "stop" once its output is whole and nothing more may follow.
  std::shared_ptr<OutputGrammar> grammar;
  // Requests resume from each other's cached prompt states only within one scope (the server
  // makes it of the API key and cache_salt).
  std::string cache_scope;
};

// What a request's stream yields, in order per choice: tokens, then one finish per choice, then
// one kDone for the whole request.
struct GenerationEvent {
  enum class Kind { kToken, kFinish, kDone } kind = Kind::kToken;
  int choice = 0;
  // kToken: the token, its logprob and alternatives, and the text that became final with it
  // (stop strings removed, incomplete UTF-8 held back). A token may carry no text, and the last
  // kToken may carry none while the kFinish carries the held-back remainder.
  SampledToken token;
  std::string text;
  // kFinish: "stop", "length", "cancelled" or "error" (with `error`).
  std::string finish_reason, error;
  // kFinish "error": the request's own parameters caused it (m1::RequestError: e.g. its output
  // format outgrew the matcher's bound), not the engine or the model.
  bool request_fault = false;
  // kDone: totals; cached_tokens of the prompt were not prefilled but resumed from the cache.
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
};

// The consumer's end of one request. Thread-safe.
class RequestStream {
 public:
  // The next event, waiting up to `timeout`; nullopt on timeout.
  std::optional<GenerationEvent> next(std::chrono::milliseconds timeout);
  // Stops generating (e.g. the client went away); the stream then finishes with "cancelled".
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

 private:
  friend class Engine;
  void push(GenerationEvent e);

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<GenerationEvent> events_;
  std::atomic<bool> cancelled_{false};
};

// Cumulative counts of observations at most each bound (seconds), as Prometheus histograms.
struct LatencyHistogram {
  static constexpr std::array<double, 12> kBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                     0.1,   0.25,   0.5,   1.0,  2.5,   10.0};
  std::array<int64_t, kBounds.size()> at_most{};
  int64_t count = 0;
  double sum = 0;
  void observe(double seconds);
};

struct EngineStats {
  // A request starts when accepted into the queue and ends finished, cancelled, failed or refused
  // (failed by its own parameters: m1::RequestError).
  int64_t requests_started = 0, requests_finished = 0, requests_cancelled = 0, requests_failed = 0,
          requests_refused = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  int64_t waiting = 0, running = 0;  // requests queued; sequences in the batch
  int64_t state_bytes = 0;           // reserved by the admitted requests for their largest state
  int64_t steps = 0;
  LatencyHistogram time_to_first_token, inter_token_latency;
  PrefixCacheStats cache;
};

class Engine {
 public:
  Engine(Model& model, const Tokenizer& tokenizer, EngineOptions options);
  ~Engine();  // finishes every request with "cancelled"
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request. Throws m1::Error for a request that can never run (empty prompt, prompt
  // too long for the context, bad sampling parameters, more state than max_state_bytes) and
  // EngineBusy when the queue is full.
  std::shared_ptr<RequestStream> submit(GenerationRequest request);

  EngineStats stats() const;
  const EngineOptions& options() const { return options_; }
  int64_t max_context() const { return max_context_; }

 private:
  struct Request;
  struct Sequence;
  struct Slot;
  // Bytes of one sequence's state: a fixed part (lightning states) and a part per token (KV).
  struct StateCost {
    int64_t fixed = 0, per_token = 0;
  };
  static StateCost measure_state_cost(const Model& model);
  int64_t state_bytes(int64_t tokens, int sequences) const;
  void loop();
  void admit();
  void drop_cancelled_waiting();
  std::vector<std::unique_ptr<Request>> take_admissible();
  void start_prefill(std::unique_ptr<Request> r);
  void step();
  void plan_step(std::vector<BatchEntry>& batch, std::vector<Slot>& slots);
  bool run_forward(std::span<const BatchEntry> batch, std::span<const Slot> slots);
  void keep_snapshots(std::span<const Slot> slots);
  void take_logits(std::span<const Slot> slots);
  void start_choices(Request& r);
  const std::shared_ptr<const TokenVocabulary>& vocabulary();
  void emit_token(Request& r, size_t choice, SampledToken token);
  void finish_choice(Request& r, size_t choice, const std::string& reason);
  void fail_alone(Request& r, const std::exception& error);
  void end_request(Request& r, const std::string& outcome, const std::string& error = {});
  void count_end(const Request& r, const std::string& outcome);
  void retire_finished();

  Model& model_;
  const Tokenizer& tokenizer_;
  EngineOptions options_;
  int64_t max_context_;
  StateCost state_cost_;
  int64_t prefill_alignment_;
  std::unique_ptr<PrefixCache> cache_;  // null when off

  mutable std::mutex mutex_;  // guards waiting_, stopping_ and stats_
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Request>> waiting_;
  bool stopping_ = false;
  EngineStats stats_;

  // Owned by the loop thread.
  std::vector<std::unique_ptr<Request>> running_;
  std::shared_ptr<const TokenVocabulary> vocabulary_;  // built for the first request with a grammar
  StepLogits logits_;
  std::thread thread_;
};

// Thrown by Engine::submit when the queue is full: retry later.
class EngineBusy : public Error {
 public:
  using Error::Error;
};

}  // namespace m1
