#include "bench_report.h"

#include <chrono>
#include <ctime>
#include <fstream>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "token_count.h"

namespace m1::bench {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;

// "hybrid checkpoint, lightning random, ...": where each variant's weights came from.
std::string weights_line(const std::vector<BenchResult>& results) {
  std::vector<std::string> entries;
  std::set<std::string> seen;
  for (const BenchResult& r : results)
    if (seen.insert(r.variant).second) entries.push_back(r.variant + (r.random_weights ? " random" : " checkpoint"));
  return fmt::format("{}", fmt::join(entries, ", "));
}

void print_header(std::FILE* out, const RunInfo& info, const std::vector<BenchResult>& results) {
  const auto& o = info.options;
  fmt::print(out, "# m1-bench {} | {} | {}\n", info.date, info.cpu, info.backend);
  fmt::print(out, "# model: {} ({}) | {}\n", info.model, info.dtype, describe_shape(info.config));
  const int64_t batch = o["decode_batch"].get<int64_t>();
  fmt::print(out, "# weights: {} | medians of {} repeats, prefill chunk {}, {} decode tokens{}\n", weights_line(results),
             o["repeats"].get<int64_t>(), o["prefill_chunk"].get<int64_t>(), o["decode_tokens"].get<int64_t>(),
             batch > 1 ? fmt::format(" in steps of {} sequences (decode ms/tok: per step; tok/s: all of them)", batch) : "");
  if (info.read_bandwidth) fmt::print(out, "# weight read bandwidth: {:.1f} GB/s\n", *info.read_bandwidth / 1e9);
}

nlohmann::ordered_json result_json(const BenchResult& r) {
  const Measurement& m = r.measurement;
  const Summary s = summarize(m);
  nlohmann::ordered_json j;
  j["variant"] = r.variant;
  j["weights"] = r.random_weights ? "random" : "checkpoint";
  j["context"] = m.context;
  j["prefill_tokens"] = m.prefill_tokens;
  j["decode_batch"] = m.decode_batch;
  j["prefill_ms"] = s.prefill_ms;
  j["prefill_tokens_per_s"] = s.prefill_tokens_per_s;
  j["decode_ms_per_token"] = s.decode_ms_per_token;
  j["decode_tokens_per_s"] = s.decode_tokens_per_s;
  j["prefill_collective_share"] = s.prefill_collective_share;
  j["decode_collective_share"] = s.decode_collective_share;
  j["state_bytes"] = m.state_bytes;
  j["kv_dtype"] = m.kv_dtype;
  j["peak_rss_bytes"] = m.peak_rss_bytes;
  j["weight_bytes_per_token"] = r.weight_bytes_per_token;
  j["weight_bytes_per_step"] = r.weight_bytes_per_step;
  j["repeats"] = {{"prefill_ms", m.prefill_ms}, {"decode_ms_per_token", m.decode_ms_per_token}};
  return j;
}

}  // namespace

void print_table(std::FILE* out, const RunInfo& info, const std::vector<BenchResult>& results) {
  print_header(out, info, results);
  fmt::print(out, "{:<10} {:>7} {:>7} {:>11} {:>13} {:>13} {:>12} {:>10} {:>10} {:>12} {:>9}\n", "variant", "context",
             "prefill", "prefill ms", "prefill tok/s", "decode ms/tok", "decode tok/s", "MB/token", "state MiB",
             "peak RSS MiB", "coll %");
  for (const BenchResult& r : results) {
    const Measurement& m = r.measurement;
    const Summary s = summarize(m);
    // The share of a step in collectives: of the timed prefill, then of the decode steps.
    const std::string collectives = fmt::format("{:.0f}/{:.0f}", 100 * s.prefill_collective_share,
                                                100 * s.decode_collective_share);
    fmt::print(out, "{:<10} {:>7} {:>7} {:>11.2f} {:>13.1f} {:>13.3f} {:>12.1f} {:>10.1f} {:>10.2f} {:>12.1f} {:>9}\n",
               r.variant, format_token_count(m.context), format_token_count(m.prefill_tokens), s.prefill_ms,
               s.prefill_tokens_per_s, s.decode_ms_per_token, s.decode_tokens_per_s, double(r.weight_bytes_per_token) / 1e6,
               double(m.state_bytes) / kMiB, double(m.peak_rss_bytes) / kMiB, collectives);
  }
}

nlohmann::ordered_json report_json(const RunInfo& info, const std::vector<BenchResult>& results) {
  nlohmann::ordered_json j;
  j["tool"] = "m1-bench";
  j["date"] = info.date;
  j["machine"] = {{"cpu", info.cpu}, {"backend", info.backend}, {"threads", info.threads}};
  j["model"] = {{"source", info.model}, {"dtype", info.dtype}, {"config", config_to_json(info.config)}};
  j["options"] = info.options;
  if (info.read_bandwidth) j["read_bandwidth_bytes_per_s"] = *info.read_bandwidth;
  j["results"] = nlohmann::ordered_json::array();
  for (const BenchResult& r : results) j["results"].push_back(result_json(r));
  return j;
}

std::string describe_shape(const ModelConfig& c) {
  return fmt::format("{} layers ({} lightning, {} softmax), hidden {}, {} heads x {} ({} kv), {} experts top-{} of {}, vocab {}",
                     c.num_hidden_layers, c.lightning_layers(), c.softmax_layers(), c.hidden_size, c.num_attention_heads,
                     c.head_dim, c.num_key_value_heads, c.num_local_experts, c.num_experts_per_tok, c.intermediate_size,
                     c.vocab_size);
}

std::string cpu_model_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

std::string utc_date() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

}  // namespace m1::bench
