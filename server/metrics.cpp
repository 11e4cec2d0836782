#include "metrics.h"

#include <fmt/format.h>

namespace m1::server {
namespace {

void header(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

void single(std::string& out, std::string_view name, std::string_view type, std::string_view help, int64_t value) {
  header(out, name, type, help);
  out += fmt::format("{} {}\n", name, value);
}

void histogram(std::string& out, std::string_view name, std::string_view help, const LatencyHistogram& h) {
  header(out, name, "histogram", help);
  for (size_t i = 0; i < h.kBounds.size(); ++i)
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, h.kBounds[i], h.at_most[i]);
  out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, h.count, name, h.sum, name, h.count);
}

}  // namespace

void ResponseCounter::count(int status) {
  std::lock_guard lock(mutex_);
  ++counts_[status];
}

std::map<int, int64_t> ResponseCounter::by_status() const {
  std::lock_guard lock(mutex_);
  return counts_;
}

std::string prometheus_text(const std::map<int, int64_t>& responses_by_status, const EngineStats& engine) {
  std::string out;
  header(out, "m1_requests_total", "counter", "HTTP requests answered, by status code.");
  for (const auto& [status, count] : responses_by_status)
    out += fmt::format("m1_requests_total{{status=\"{}\"}} {}\n", status, count);
  single(out, "m1_prompt_tokens_total", "counter", "Prompt tokens taken into the batch.", engine.prompt_tokens);
  single(out, "m1_generation_tokens_total", "counter", "Tokens generated.", engine.generated_tokens);
  single(out, "m1_requests_waiting", "gauge", "Requests queued for a place in the batch.", engine.waiting);
  single(out, "m1_requests_running", "gauge", "Sequences in the batch (each choice counts).", engine.running);
  single(out, "m1_state_bytes", "gauge", "Sequence-state bytes reserved by the requests in the batch, at their largest.",
         engine.state_bytes);

  header(out, "m1_engine_requests_total", "counter", "Engine requests by outcome; started counts every accepted one.");
  for (const auto& [outcome, count] : {std::pair{"started", engine.requests_started},
                                       {"finished", engine.requests_finished},
                                       {"cancelled", engine.requests_cancelled},
                                       {"failed", engine.requests_failed},
                                       {"refused", engine.requests_refused}})
    out += fmt::format("m1_engine_requests_total{{outcome=\"{}\"}} {}\n", outcome, count);

  const PrefixCacheStats& c = engine.cache;
  single(out, "m1_prefix_cache_hits_total", "counter", "Requests that resumed from a cached prefix of their prompt.", c.hits);
  single(out, "m1_prefix_cache_misses_total", "counter", "Requests that found no cached prefix of their prompt.", c.misses);
  single(out, "m1_prefix_cache_hit_tokens_total", "counter", "Prompt tokens resumed from the cache instead of prefilled.",
         c.hit_tokens);
  single(out, "m1_prefix_cache_snapshots", "gauge", "Snapshots held in memory.", c.snapshots);
  single(out, "m1_prefix_cache_bytes", "gauge", "Bytes of snapshots held in memory (shared KV rows counted once).", c.bytes);
  single(out, "m1_prefix_cache_evictions_total", "counter", "Snapshots dropped from memory for the budget.", c.evictions);
  single(out, "m1_prefix_cache_disk_hits_total", "counter", "Cache hits read from a snapshot file.", c.disk_hits);
  single(out, "m1_prefix_cache_disk_files", "gauge", "Snapshot files in the cache directory.", c.disk_files);
  single(out, "m1_prefix_cache_disk_bytes", "gauge", "Bytes of snapshot files in the cache directory.", c.disk_bytes);
  single(out, "m1_prefix_cache_disk_writes_total", "counter", "Snapshot files written.", c.disk_writes);
  single(out, "m1_prefix_cache_disk_rejected_total", "counter",
         "Snapshot files deleted as damaged or made for another model, backend or precision.", c.disk_rejected);

  histogram(out, "m1_time_to_first_token_seconds", "Time from arrival to the first generated token.",
            engine.time_to_first_token);
  histogram(out, "m1_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
            engine.inter_token_latency);
  return out;
}

}  // namespace m1::server
