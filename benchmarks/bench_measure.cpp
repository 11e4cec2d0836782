#include "bench_measure.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <random>

namespace m1::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Every variant and run sees the same prompt (the seed spells "m1bench").
constexpr uint64_t kPromptSeed = 0x6d31'6265'6e63'68ull;
// Decode steps of the warm-up: enough to page in the single-token paths.
constexpr size_t kWarmUpDecodeSteps = 2;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// Seconds the model's ranks have spent in collectives so far, summed over ranks.
double collective_seconds(const Model& model) {
  double seconds = 0;
  for (const Backend* b : model.rank_backends()) seconds += b->collective_stats().seconds;
  return seconds;
}

// Times fn; returns its wall time in ms and, through `share`, the ranks' mean share of it spent
// in collectives.
template <class Fn>
double timed_with_share(const Model& model, double& share, Fn&& fn) {
  const double before = collective_seconds(model);
  const auto start = Clock::now();
  fn();
  const double ms = ms_since(start);
  share = ms > 0 ? (collective_seconds(model) - before) * 1000 / (ms * model.ranks()) : 0;
  return ms;
}

// Deterministic pseudo-random valid token ids.
std::vector<int32_t> prompt_tokens(int64_t count, int64_t vocab) {
  std::mt19937_64 rng(kPromptSeed);
  std::uniform_int_distribution<int32_t> id(0, int32_t(vocab - 1));
  std::vector<int32_t> tokens(static_cast<size_t>(count));
  for (int32_t& t : tokens) t = id(rng);
  return tokens;
}

// Greedy draws from the step's first `rows` rows of logits, as the server makes them: only the
// token ids come back, and on a GPU this waits for the step to finish.
void draw_greedy(Model& model, const StepLogits& logits, size_t rows = 1) {
  std::vector<DrawRequest> draws(rows);
  for (size_t r = 0; r < rows; ++r) {
    draws[r].row = int64_t(r);
    draws[r].params.temperature = 0;
  }
  model.backend().sample(logits.device(), draws);
}

// Feeds `tokens` in chunks as the server does: logits only for the last position of the last
// chunk, from which the first token is drawn.
void prefill(Model& model, SequenceState& seq, std::span<const int32_t> tokens, int64_t chunk) {
  StepLogits logits;
  for (size_t pos = 0; pos < tokens.size(); pos += size_t(chunk)) {
    const size_t n = std::min(tokens.size() - pos, size_t(chunk));
    const LogitsFor wanted = pos + n == tokens.size() ? LogitsFor::kLast : LogitsFor::kNone;
    BatchEntry entry{&seq, tokens.subspan(pos, n), wanted};
    model.forward({&entry, 1}, logits);
  }
  if (!tokens.empty()) draw_greedy(model, logits);
}

// Decodes `tokens` one step each for every sequence of `batch` (each gets the same token), each
// step with a greedy draw per sequence (fixed ids go in: what is measured is the step, not the
// text); the median step in ms.
double decode_median_ms(Model& model, std::span<const std::unique_ptr<SequenceState>> batch,
                        std::span<const int32_t> tokens) {
  StepLogits logits;
  std::vector<double> steps;
  std::vector<BatchEntry> entries(batch.size());
  for (const int32_t& token : tokens) {
    for (size_t b = 0; b < batch.size(); ++b) entries[b] = BatchEntry{batch[b].get(), {&token, 1}, LogitsFor::kLast};
    const auto start = Clock::now();
    model.forward(entries, logits);
    draw_greedy(model, logits, batch.size());
    steps.push_back(ms_since(start));
  }
  return median(std::move(steps));
}

// `count` sequences at the state of `seq`: seq itself, then copies.
std::vector<std::unique_ptr<SequenceState>> replicate(std::unique_ptr<SequenceState> seq, int64_t count) {
  std::vector<std::unique_ptr<SequenceState>> batch;
  for (int64_t b = 1; b < count; ++b) batch.push_back(seq->clone());
  batch.insert(batch.begin(), std::move(seq));
  return batch;
}

// Runs every path once (thread pool, workspace at full chunk size, weights in cache) without
// paying for a long prefill twice.
void warm_up(Model& model, std::span<const int32_t> tokens, int64_t chunk, int64_t decode_batch) {
  auto seq = model.new_sequence();
  prefill(model, *seq, tokens.first(std::min(tokens.size(), size_t(chunk))), chunk);
  decode_median_ms(model, replicate(std::move(seq), decode_batch), tokens.first(std::min(tokens.size(), kWarmUpDecodeSteps)));
}

}  // namespace

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  const size_t mid = values.size() / 2;
  std::nth_element(values.begin(), values.begin() + std::ptrdiff_t(mid), values.end());
  if (values.size() % 2 == 1) return values[mid];
  return (values[mid] + *std::max_element(values.begin(), values.begin() + std::ptrdiff_t(mid))) / 2;
}

Summary summarize(const Measurement& m) {
  Summary s;
  s.prefill_ms = median(m.prefill_ms);
  s.prefill_tokens_per_s = s.prefill_ms > 0 ? double(m.prefill_tokens) * 1000 / s.prefill_ms : 0;
  s.decode_ms_per_token = median(m.decode_ms_per_token);
  s.decode_tokens_per_s = s.decode_ms_per_token > 0 ? double(m.decode_batch) * 1000 / s.decode_ms_per_token : 0;
  s.prefill_collective_share = median(m.prefill_collective_share);
  s.decode_collective_share = median(m.decode_collective_share);
  return s;
}

Measurement measure(Model& model, const MeasureSpec& spec) {
  const bool extra = spec.extra_prefill > 0;
  const int64_t untimed = extra ? spec.context : 0, timed = extra ? spec.extra_prefill : spec.context;
  const std::vector<int32_t> tokens = prompt_tokens(untimed + timed + spec.decode_tokens, model.config().vocab_size);
  const std::span<const int32_t> all(tokens);
  const auto decode = all.last(size_t(spec.decode_tokens));

  warm_up(model, all, spec.prefill_chunk, spec.decode_batch);
  auto base = model.new_sequence();
  prefill(model, *base, all.first(size_t(untimed)), spec.prefill_chunk);

  Measurement m;
  m.context = spec.context;
  m.prefill_tokens = timed;
  m.decode_batch = spec.decode_batch;
  for (int64_t r = 0; r < spec.repeats; ++r) {
    auto seq = base->clone();
    double share = 0;
    m.prefill_ms.push_back(
        timed_with_share(model, share, [&] { prefill(model, *seq, all.subspan(size_t(untimed), size_t(timed)), spec.prefill_chunk); }));
    m.prefill_collective_share.push_back(share);
    // Decode starts at depth `context`: after the timed prefill, or from the untimed context.
    auto at_depth = extra ? base->clone() : std::move(seq);
    m.state_bytes = at_depth->bytes();
    m.kv_dtype = std::string(dtype_name(at_depth->kv_dtype()));
    const auto batch = replicate(std::move(at_depth), spec.decode_batch);
    double median_ms = 0;
    timed_with_share(model, share, [&] { median_ms = decode_median_ms(model, batch, decode); });
    m.decode_ms_per_token.push_back(median_ms);
    m.decode_collective_share.push_back(share);
  }
  return m;
}

}  // namespace m1::bench
