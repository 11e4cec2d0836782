#include "m1/engine.h"

#include <malloc.h>

#include <algorithm>

#include <spdlog/spdlog.h>

#include "m1/prefill.h"
#include "m1/stop.h"

namespace m1 {

using Clock = std::chrono::steady_clock;

namespace {

std::string mib(int64_t bytes) { return fmt::format("{:.2f} MiB", double(bytes) / (1 << 20)); }

}  // namespace

void LatencyHistogram::observe(double seconds) {
  for (size_t i = 0; i < kBounds.size(); ++i) at_most[i] += seconds <= kBounds[i];
  ++count;
  sum += seconds;
}

std::optional<GenerationEvent> RequestStream::next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (!ready_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return std::nullopt;
  GenerationEvent e = std::move(events_.front());
  events_.pop_front();
  return e;
}

void RequestStream::push(GenerationEvent e) {
  {
    std::lock_guard lock(mutex_);
    events_.push_back(std::move(e));
  }
  ready_.notify_one();
}

// One choice of a request: its own state (forked from the prompt's), sampler, detokenizer.
struct Engine::Sequence {
  Sequence(std::unique_ptr<SequenceState> state, const SamplingParams& sampling, const GenerationRequest& request,
           const Tokenizer& tokenizer)
      : state(std::move(state)), sampler(sampling, request.prompt, request.logit_bias), decoder(tokenizer), stop(request.stop) {}

  std::unique_ptr<SequenceState> state;
  Sampler sampler;
  std::optional<GrammarMatcher> matcher;  // with the request's grammar
  std::vector<uint32_t> allowed;          // the matcher's mask for the next draw
  IncrementalDecoder decoder;
  StopMatcher stop;
  int32_t last_token = -1;
  int64_t generated = 0;
  bool finished = false;
  Clock::time_point last_token_time;
};

struct Engine::Request {
  GenerationRequest params;
  std::shared_ptr<RequestStream> stream;
  Clock::time_point submitted;
  int64_t max_new_tokens = 0;  // max_tokens, clamped to the context
  int64_t state_bytes = 0;     // its choices' state at their largest, reserved while admitted
  std::unique_ptr<SequenceState> prompt_state;
  int64_t prefilled = 0;  // prompt tokens consumed
  int64_t cached = 0;     // ... of which the prefix cache gave
  int64_t snapshot_at = 0;  // where the prefill stops next for a snapshot (0: nowhere)
  std::vector<Sequence> choices;  // created when the prompt is done
  int64_t generated = 0;          // over all choices
  bool admitted = false;          // holds places in the batch
  bool ended = false;

  bool prefilling() const { return choices.empty(); }
  bool all_finished() const {
    return !choices.empty() && std::all_of(choices.begin(), choices.end(), [](const Sequence& s) { return s.finished; });
  }
};

Engine::Engine(Model& model, const Tokenizer& tokenizer, EngineOptions options)
    : model_(model), tokenizer_(tokenizer), options_(options) {
  const int64_t model_max = model.config().max_position_embeddings;
  if (options_.max_batch < 1) fail("max_batch must be at least 1, got {}", options_.max_batch);
  if (options_.step_tokens < 1) fail("step_tokens must be at least 1, got {}", options_.step_tokens);
  if (options_.max_queue < 1) fail("max_queue must be at least 1, got {}", options_.max_queue);
  if (options_.max_context < 0) fail("max_context must be 0 (the model's) or more, got {}", options_.max_context);
  if (options_.max_context > model_max)
    fail("max_context {} is more than the model's max_position_embeddings {}", options_.max_context, model_max);
  if (options_.max_state_bytes < 0)
    fail("max_state_bytes must be 0 (no limit) or more, got {}", options_.max_state_bytes);
  max_context_ = options_.max_context > 0 ? options_.max_context : model_max;
  state_cost_ = measure_state_cost(model);
  prefill_alignment_ = std::max<int64_t>(1, model.backend().prefill_alignment());
  if (options_.cache.max_bytes > 0) cache_ = std::make_unique<PrefixCache>(model, options_.cache);
  if (options_.max_state_bytes > 0 && state_bytes(max_context_, 1) > options_.max_state_bytes)
    fail("max_state_bytes: {} cannot hold the state of one sequence of the whole context of {} tokens ({}); "
         "raise it or lower max_context",
         mib(options_.max_state_bytes), max_context_, mib(state_bytes(max_context_, 1)));
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
  for (auto& r : running_) end_request(*r, "cancelled");
  for (auto& r : waiting_) end_request(*r, "cancelled");
}

std::shared_ptr<RequestStream> Engine::submit(GenerationRequest params) {
  const int64_t prompt = int64_t(params.prompt.size());
  if (prompt == 0) fail("prompt: empty (at least one token is needed)");
  if (prompt >= max_context_)
    fail("prompt: {} tokens leave no room to generate within the context of {} tokens", prompt, max_context_);
  for (int32_t t : params.prompt)
    if (t < 0 || t >= model_.config().vocab_size) fail("prompt: token id {} is out of range", t);
  if (params.max_tokens < 1) fail("max_tokens must be at least 1, got {}", params.max_tokens);
  if (params.n < 1 || params.n > options_.max_batch)
    fail("n must be between 1 and the server's batch size {}, got {}", options_.max_batch, params.n);
  validate(params.sampling);
  check_logit_bias(params.logit_bias, model_.config().vocab_size);
  const int64_t max_new_tokens = std::min(params.max_tokens, max_context_ - prompt);
  const int64_t bytes = state_bytes(prompt + max_new_tokens, params.n);
  if (options_.max_state_bytes > 0 && bytes > options_.max_state_bytes)
    fail("n: {} choices of up to {} tokens need {} of sequence state, more than the server's limit of {}", params.n,
         prompt + max_new_tokens, mib(bytes), mib(options_.max_state_bytes));

  auto r = std::make_unique<Request>();
  r->stream = std::make_shared<RequestStream>();
  r->submitted = Clock::now();
  r->max_new_tokens = max_new_tokens;
  r->state_bytes = bytes;
  r->params = std::move(params);
  auto stream = r->stream;
  {
    std::lock_guard lock(mutex_);
    if (int64_t(waiting_.size()) >= options_.max_queue)
      throw EngineBusy(fmt::format("the server is busy: {} requests are waiting; retry later", waiting_.size()));
    waiting_.push_back(std::move(r));
    stats_.waiting = int64_t(waiting_.size());
    ++stats_.requests_started;
  }
  wake_.notify_one();
  return stream;
}

EngineStats Engine::stats() const {
  EngineStats s;
  {
    std::lock_guard lock(mutex_);
    s = stats_;
  }
  if (cache_) s.cache = cache_->stats();
  return s;
}

void Engine::loop() {
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !waiting_.empty() || !running_.empty(); });
      if (stopping_) return;
    }
    admit();
    step();
    retire_finished();
  }
}

// Measured on a scratch state rather than computed here: how a state is laid out, and so what
// it costs, is the backend's business (SequenceState::bytes).
Engine::StateCost Engine::measure_state_cost(const Model& model) {
  const auto state = model.new_sequence();
  const int64_t fixed = int64_t(state->bytes());
  state->advance(1);
  return {fixed, int64_t(state->bytes()) - fixed};
}

int64_t Engine::state_bytes(int64_t tokens, int sequences) const {
  return sequences * (state_cost_.fixed + state_cost_.per_token * tokens);
}

// Moves waiting requests into the batch in order of arrival, while their choices fit the batch
// and their state fits the budget.
void Engine::admit() {
  drop_cancelled_waiting();
  for (auto& r : take_admissible()) start_prefill(std::move(r));
}

void Engine::drop_cancelled_waiting() {
  std::vector<std::unique_ptr<Request>> dropped;
  {
    std::lock_guard lock(mutex_);
    for (auto it = waiting_.begin(); it != waiting_.end();)
      if ((*it)->stream->cancelled()) {
        dropped.push_back(std::move(*it));
        it = waiting_.erase(it);
      } else {
        ++it;
      }
  }
  for (auto& r : dropped) end_request(*r, "cancelled");
}

std::vector<std::unique_ptr<Engine::Request>> Engine::take_admissible() {
  int64_t sequences = 0;
  for (auto& r : running_) sequences += r->params.n;
  std::vector<std::unique_ptr<Request>> admitted;
  std::lock_guard lock(mutex_);
  const auto fits = [&](const Request& r) {
    const bool state_fits =
        options_.max_state_bytes == 0 || stats_.state_bytes + r.state_bytes <= options_.max_state_bytes;
    return sequences + r.params.n <= options_.max_batch && state_fits;
  };
  while (!waiting_.empty() && fits(*waiting_.front())) {
    auto r = std::move(waiting_.front());
    waiting_.pop_front();
    sequences += r->params.n;
    r->admitted = true;
    stats_.prompt_tokens += int64_t(r->params.prompt.size());
    stats_.running += r->params.n;
    stats_.state_bytes += r->state_bytes;
    admitted.push_back(std::move(r));
  }
  stats_.waiting = int64_t(waiting_.size());
  return admitted;
}

// The prompt's state is allocated, or resumed from the prefix cache, on the loop thread; when that
// fails, the request fails alone.
void Engine::start_prefill(std::unique_ptr<Request> r) {
  try {
    if (cache_) {
      PrefixCache::Hit hit = cache_->restore(r->params.cache_scope, r->params.prompt);
      r->prompt_state = std::move(hit.state);
      r->prefilled = r->cached = hit.tokens;
      r->snapshot_at = cache_->next_snapshot(r->prefilled, int64_t(r->params.prompt.size()));
    }
    if (!r->prompt_state) r->prompt_state = model_.new_sequence();
  } catch (const std::exception& error) {
    fail_alone(*r, error);
    return;
  }
  running_.push_back(std::move(r));
}

// One entry of a step: a choice decoding its next token, or a prefill chunk (choice -1).
struct Engine::Slot {
  Request* request;
  int choice;
};

void Engine::step() {
  // Cancelled requests leave before the step.
  for (auto& r : running_)
    if (r->stream->cancelled() && !r->ended) end_request(*r, "cancelled");
  retire_finished();

  std::vector<BatchEntry> batch;
  std::vector<Slot> slots;
  plan_step(batch, slots);
  if (batch.empty() || !run_forward(batch, slots)) return;
  keep_snapshots(slots);
  take_logits(slots);
}

// Every decoding choice gets its next token; prefills share what is left of the token budget, in
// chunks cut where a cut changes no sum (m1/prefill.h) and that stop at the cache's snapshot points.
void Engine::plan_step(std::vector<BatchEntry>& batch, std::vector<Slot>& slots) {
  int64_t budget = options_.step_tokens;
  for (auto& r : running_) {
    if (r->prefilling()) continue;
    for (size_t c = 0; c < r->choices.size(); ++c) {
      Sequence& s = r->choices[c];
      if (s.finished) continue;
      batch.push_back({s.state.get(), std::span(&s.last_token, 1), LogitsFor::kLast});
      slots.push_back({r.get(), int(c)});
      --budget;
    }
  }
  for (auto& r : running_) {
    if (!r->prefilling() || budget <= 0) continue;
    const int64_t prompt = int64_t(r->params.prompt.size());
    const int64_t end = prefill_chunk_end(r->prefilled, prompt, budget, prefill_alignment_, r->snapshot_at);
    const int64_t rest = prompt - r->prefilled, n = end - r->prefilled;
    // A step's budget that reached no cut on the alignment: the sums may now differ from a cold
    // prefill's by rounding, so this prompt leaves no more snapshots.
    if (end < prompt && end % prefill_alignment_ != 0) r->snapshot_at = 0;
    batch.push_back({r->prompt_state.get(), std::span(r->params.prompt).subspan(size_t(r->prefilled), size_t(n)),
                     n == rest ? LogitsFor::kLast : LogitsFor::kNone});
    slots.push_back({r.get(), -1});
    r->prefilled += n;
    budget -= n;
  }
}

// False when the step failed. The model checks every entry before it touches any state
// (Model::check_batch), and submit() refused what the model would reject, so a step throws only
// on an internal error or a failed allocation, part way through its layers: by then the layers
// before have advanced the lightning states (and KV caches) of every entry, so no entry can be
// retried alone without copies of all their states, taken before every step, which would cost
// more than the steps themselves. The step's requests fail with the error; the engine goes on
// with the others and with new ones.
bool Engine::run_forward(std::span<const BatchEntry> batch, std::span<const Slot> slots) {
  try {
    model_.forward(batch, logits_);
  } catch (const std::exception& error) {
    spdlog::error("forward step of {} sequences failed: {}", batch.size(), error.what());
    for (const Slot& s : slots) end_request(*s.request, "failed", fmt::format("internal error: {}", error.what()));
    return false;
  }
  std::lock_guard lock(mutex_);
  ++stats_.steps;
  return true;
}

// Prefills that reached a snapshot point leave a snapshot in the prefix cache.
void Engine::keep_snapshots(std::span<const Slot> slots) {
  for (const Slot& s : slots) {
    Request& r = *s.request;
    if (s.choice >= 0 || r.ended || r.snapshot_at == 0 || r.prefilled != r.snapshot_at) continue;
    cache_->keep(r.params.cache_scope, r.params.prompt, *r.prompt_state);
    r.snapshot_at = cache_->next_snapshot(r.prefilled, int64_t(r.params.prompt.size()));
  }
}

// Every slot with logits gets its tokens in one Backend::sample call: a decoding choice its next
// token, a consumed prompt the first token of each of its choices (forked here).
void Engine::take_logits(std::span<const Slot> slots) {
  struct Owner {
    Request* request;
    size_t choice;
  };
  std::vector<Owner> owners;
  std::vector<DrawRequest> draws;
  for (size_t i = 0; i < slots.size(); ++i) {
    Request& r = *slots[i].request;
    // A prefill chunk before the last has no logits; a request may have failed at an earlier slot.
    if (logits_.rows(i) == 0 || r.ended) continue;
    size_t first = size_t(slots[i].choice), last = first + 1;
    if (slots[i].choice < 0) {
      try {
        start_choices(r);
      } catch (const std::exception& error) {
        fail_alone(r, error);  // e.g. a failed fork
        continue;
      }
      first = 0, last = r.choices.size();
    }
    try {
      for (size_t c = first; c < last; ++c) {
        Sequence& s = r.choices[c];
        DrawRequest draw = s.sampler.next_draw(logits_.first_row(i));
        if (s.matcher) {
          s.matcher->fill_mask(s.allowed, r.params.end_tokens);
          draw.allowed = s.allowed;
        }
        owners.push_back({&r, c});
        draws.push_back(draw);
      }
    } catch (const std::exception& error) {
      fail_alone(r, error);  // e.g. a grammar whose lexer grows past its bound
      while (!owners.empty() && owners.back().request == &r) {
        owners.pop_back();
        draws.pop_back();
      }
    }
  }
  if (draws.empty()) return;
  std::vector<DrawOutcome> outcomes;
  try {
    outcomes = model_.backend().sample(logits_.device(), draws);
  } catch (const std::exception& error) {
    spdlog::error("sampling {} tokens failed: {}", draws.size(), error.what());
    for (const Owner& d : owners)
      if (!d.request->ended) end_request(*d.request, "failed", fmt::format("internal error: {}", error.what()));
    return;
  }
  for (size_t k = 0; k < owners.size(); ++k) {
    Request& r = *owners[k].request;
    if (r.ended) continue;
    try {
      if (!outcomes[k].error.empty()) throw Error(outcomes[k].error);  // e.g. logits with NaN
      emit_token(r, owners[k].choice, std::move(outcomes[k].token));
    } catch (const std::exception& error) {
      fail_alone(r, error);
    }
  }
}

// The prompt is consumed: fork its state into the request's n choices.
void Engine::start_choices(Request& r) {
  const int n = r.params.n;
  for (int c = 0; c < n; ++c) {
    SamplingParams sampling = r.params.sampling;
    sampling.seed += uint64_t(c);  // distinct but reproducible streams per choice
    auto state = c + 1 < n ? r.prompt_state->clone() : std::move(r.prompt_state);
    Sequence& s = r.choices.emplace_back(std::move(state), sampling, r.params, tokenizer_);
    if (r.params.grammar) {
      s.matcher.emplace(r.params.grammar, vocabulary());
      s.allowed.resize(size_t(vocabulary()->words()));
    }
  }
}

const std::shared_ptr<const TokenVocabulary>& Engine::vocabulary() {
  if (!vocabulary_) vocabulary_ = std::make_shared<const TokenVocabulary>(tokenizer_, model_.config().vocab_size);
  return vocabulary_;
}

void Engine::emit_token(Request& r, size_t choice, SampledToken token) {
  Sequence& s = r.choices[choice];
  s.sampler.accept(token.id);
  GenerationEvent e;
  e.kind = GenerationEvent::Kind::kToken;
  e.choice = int(choice);
  e.token = std::move(token);
  const auto now = Clock::now();
  {
    std::lock_guard lock(mutex_);
    ++stats_.generated_tokens;
    if (s.generated == 0 && choice == 0)
      stats_.time_to_first_token.observe(std::chrono::duration<double>(now - r.submitted).count());
    if (s.generated > 0) stats_.inter_token_latency.observe(std::chrono::duration<double>(now - s.last_token_time).count());
  }
  s.last_token_time = now;
  s.last_token = e.token.id;
  ++s.generated;
  ++r.generated;
  const auto& ends = r.params.end_tokens;
  const bool end_of_turn = std::find(ends.begin(), ends.end(), e.token.id) != ends.end();
  if (s.matcher && !end_of_turn && !s.matcher->accept(e.token.id))
    fail("the output's grammar refused token {}, which its mask allowed", e.token.id);
  // A whole output that nothing may follow ends here, without drawing the end of turn.
  const bool complete = s.matcher && !end_of_turn && s.matcher->must_end();
  if (!end_of_turn) e.text = s.stop.push(s.decoder.push(e.token.id));
  r.stream->push(std::move(e));
  if (end_of_turn || s.stop.stopped() || complete)
    finish_choice(r, choice, "stop");
  else if (s.generated >= r.max_new_tokens)
    finish_choice(r, choice, "length");
}

// A choice ends normally ("stop" or "length"), releasing the text it held back.
void Engine::finish_choice(Request& r, size_t choice, const std::string& reason) {
  Sequence& s = r.choices[choice];
  GenerationEvent e;
  e.kind = GenerationEvent::Kind::kFinish;
  e.choice = int(choice);
  e.finish_reason = reason;
  s.finished = true;
  s.state.reset();
  if (!s.stop.stopped()) {
    e.text = s.stop.push(s.decoder.flush());  // held-back bytes may still complete a stop string
    if (s.stop.stopped())
      e.finish_reason = "stop";
    else
      e.text += s.stop.flush();
  }
  r.stream->push(std::move(e));
  if (r.all_finished()) end_request(r, "finished");
}

// A request that hit an error of its own fails; the others in the batch go on. One that its own
// parameters caused is refused (reported as the request's fault).
void Engine::fail_alone(Request& r, const std::exception& error) {
  if (dynamic_cast<const RequestError*>(&error) != nullptr) {
    spdlog::info("request refused: {}", error.what());
    end_request(r, "refused", error.what());
    return;
  }
  spdlog::error("request failed: {}", error.what());
  end_request(r, "failed", fmt::format("internal error: {}", error.what()));
}

// Closes a request: open choices finish with `outcome` ("cancelled"; "failed" or "refused",
// reported as finish reason "error" with the message), then kDone with the totals.
void Engine::end_request(Request& r, const std::string& outcome, const std::string& error) {
  if (r.ended) return;
  r.ended = true;
  count_end(r, outcome);
  for (int c = 0; c < r.params.n; ++c) {
    if (size_t(c) < r.choices.size() && r.choices[size_t(c)].finished) continue;
    GenerationEvent e;
    e.kind = GenerationEvent::Kind::kFinish;
    e.choice = c;
    e.finish_reason = outcome == "failed" || outcome == "refused" ? "error" : outcome;
    e.request_fault = outcome == "refused";
    e.error = error;
    r.stream->push(std::move(e));
  }
  r.choices.clear();  // frees the states now
  r.prompt_state.reset();
  GenerationEvent done;
  done.kind = GenerationEvent::Kind::kDone;
  done.prompt_tokens = int64_t(r.params.prompt.size());
  done.completion_tokens = r.generated;
  done.cached_tokens = r.cached;
  r.stream->push(std::move(done));
}

// Counted before the consumer can see the end (a failed or cancelled choice is one), so stats
// never lag a finished stream.
void Engine::count_end(const Request& r, const std::string& outcome) {
  std::lock_guard lock(mutex_);
  if (r.admitted) {
    stats_.running -= r.params.n;
    stats_.state_bytes -= r.state_bytes;
  }
  if (outcome == "cancelled")
    ++stats_.requests_cancelled;
  else if (outcome == "failed")
    ++stats_.requests_failed;
  else if (outcome == "refused")
    ++stats_.requests_refused;
  else
    ++stats_.requests_finished;
}

void Engine::retire_finished() {
  const size_t retired = std::erase_if(running_, [](const std::unique_ptr<Request>& r) { return r->ended; });
  // The batch has emptied: glibc keeps what the states and the server's buffers freed in its
  // arenas, so without a trim a burst of requests leaves the process at its peak footprint.
  if (retired > 0 && running_.empty()) ::malloc_trim(0);
}

}  // namespace m1
