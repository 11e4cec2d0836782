// m1-bench: the engine's long-context latency. For the hybrid model and its all-lightning and
// all-softmax variants, at each context length: chunked prefill, decode per token at that depth,
// the per-sequence state and the peak memory; printed as a table, written as JSON and an SVG chart.

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "bench_measure.h"
#include "bench_models.h"
#include "bench_report.h"
#include "child_process.h"
#include "latency_chart.h"
#include "m1/backends.h"
#include "m1/error.h"
#include "m1/model.h"
#include "m1/synthetic.h"
#include "parallel_flags.h"
#include "read_bandwidth.h"
#include "token_count.h"

namespace fs = std::filesystem;
using namespace m1::bench;

namespace {

struct Options {
  fs::path model;
  std::string synthetic;
  int64_t layers = 0;
  std::string dtype;  // --synthetic only; default bf16
  std::string device = "cpu", precision = "fast";
  int threads = 0;
  std::vector<std::string> contexts{"1k", "4k", "16k", "32k"};
  std::string prefill_tokens = "0";
  int64_t prefill_chunk = 512, decode_tokens = 16, repeats = 3, decode_batch = 1;
  std::vector<std::string> variants = variant_names();
  fs::path json, svg;
  bool measure_bandwidth = false;
  m1::BackendOptions backend;  // the tensor-parallel group (device, threads and precision come from above)
  m1::ParallelFlags parallel;
  m1::ShardOptions shard;
  std::string quantize;
  int64_t group_size = 0;
  bool quantize_lm_head = false;
};

// The model under test, as the command line chose it.
struct BaseModel {
  m1::ModelConfig config;
  std::optional<fs::path> dir;  // its checkpoint; none: random weights built in memory
  m1::DType dtype = m1::DType::kBF16;
  std::string label;  // for the report: "synthetic PRESET" or the directory
};

int64_t token_count_option(const std::string& option, const std::string& text, int64_t min) {
  const std::optional<int64_t> count = parse_token_count(text);
  if (!count || *count < min)
    m1::fail("{}: '{}' is not a token count of at least {} (expected e.g. 512, 4k or 1m)", option, text, min);
  return *count;
}

// Ascending and without repeats, so every line of the chart runs left to right. Context 0 only
// makes sense as the depth before a timed --prefill-tokens.
std::vector<int64_t> parse_contexts(const Options& o, int64_t extra_prefill) {
  if (o.contexts.empty()) m1::fail("--contexts: no context lengths given");
  std::vector<int64_t> contexts;
  for (const std::string& text : o.contexts) contexts.push_back(token_count_option("--contexts", text, extra_prefill > 0 ? 0 : 1));
  std::sort(contexts.begin(), contexts.end());
  contexts.erase(std::unique(contexts.begin(), contexts.end()), contexts.end());
  return contexts;
}

m1::DType parse_dtype(const std::string& text) {
  const std::optional<m1::DType> dtype = m1::dtype_from_option(text);
  if (!dtype) m1::fail("--dtype: '{}' is not one of bf16, f16, f32", text);
  return *dtype;
}

BaseModel synthetic_model(const Options& o) {
  const std::vector<std::string> names = m1::preset_names();
  if (std::find(names.begin(), names.end(), o.synthetic) == names.end())
    m1::fail("--synthetic: preset '{}' is unknown (expected one of {})", o.synthetic, fmt::join(names, ", "));
  const m1::ModelConfig preset = m1::preset(o.synthetic).config;
  return {o.layers > 0 ? with_layers(preset, o.layers) : preset, std::nullopt, parse_dtype(o.dtype.empty() ? "bf16" : o.dtype), "synthetic " + o.synthetic};
}

BaseModel checkpoint_model(const Options& o) {
  if (o.layers > 0 || !o.dtype.empty()) m1::fail("--layers and --dtype shape a --synthetic model, not a --model checkpoint");
  std::error_code ec;
  if (!fs::is_directory(o.model, ec)) m1::fail("--model: {} is not a directory", o.model.string());
  m1::ModelConfig config = m1::load_config(o.model / "config.json");
  const m1::DType dtype = checkpoint_dtype(m1::Checkpoint::open(o.model), config);
  return {std::move(config), o.model, dtype, o.model.string()};
}

BaseModel base_model(const Options& o) {
  if (o.model.empty() == o.synthetic.empty()) m1::fail("give exactly one of --model DIR or --synthetic PRESET");
  return o.model.empty() ? synthetic_model(o) : checkpoint_model(o);
}

// Builds the backend once up front, so a device this build lacks fails before any weights are made.
// In a child of its own: CUDA does not survive a fork, so this process must never initialise it.
std::string backend_description(const m1::BackendOptions& options) {
  try {
    return run_in_child([&] { return nlohmann::json(m1::group_name(m1::create_backends(options))); }).get<std::string>();
  } catch (const m1::Error& e) {
    m1::fail("--device: {}", e.what());
  }
}

m1::BackendOptions backend_options(Options& o) {
  m1::BackendOptions options = o.backend;
  options.device = o.device;
  options.threads = o.threads;
  options.time_collectives = true;  // for the share of a step in collectives (CUDA: of eager steps)
  try {
    options.precision = m1::parse_precision(o.precision);
  } catch (const m1::Error& e) {
    m1::fail("--precision: {}", e.what());
  }
  o.parallel.apply(options, o.shard);
  return options;
}

VariantWeights variant_weights(const BaseModel& base, const m1::ModelConfig& config) {
  return base.dir ? checkpoint_or_random(*base.dir, base.config, config) : random_in_memory(config, base.dtype);
}

// One measurement in its own process (so its peak RSS is its own), the weights shared from here.
Measurement measure_in_child(const m1::BackendOptions& backend_options, const m1::LoadOptions& load,
                             const m1::ModelConfig& config, VariantWeights& weights, const MeasureSpec& spec) {
  const nlohmann::json result = run_in_child([&] {
    const auto backends = m1::create_backends(backend_options);
    // Moves the child's copy of the weights; the parent's stays for the next context.
    m1::Model model(config, std::move(weights.checkpoint), m1::rank_pointers(backends), load);
    Measurement m = measure(model, spec);
    m.peak_rss_bytes = peak_rss_bytes();
    return nlohmann::json(m);
  });
  return result.get<Measurement>();
}

struct Sweep {
  std::vector<BenchResult> results;
  std::optional<double> read_bandwidth;
};

Sweep run_sweep(const Options& o, const BaseModel& base, const m1::BackendOptions& backend, const m1::LoadOptions& load,
                const std::vector<int64_t>& contexts, int64_t extra_prefill) {
  Sweep sweep;
  const size_t total = o.variants.size() * contexts.size();
  for (const std::string& variant : o.variants) {
    const m1::ModelConfig config = variant_config(base.config, variant);
    VariantWeights weights = variant_weights(base, config);
    if (o.measure_bandwidth && !sweep.read_bandwidth) sweep.read_bandwidth = weight_read_bandwidth(weights.checkpoint, o.threads);
    const uint64_t bytes_per_token = decode_weight_bytes(config, weights.checkpoint, load);
    const uint64_t bytes_per_step = decode_weight_bytes(config, weights.checkpoint, load, o.decode_batch);
    for (int64_t context : contexts) {
      std::fprintf(stderr, "m1-bench: [%zu/%zu] %s at context %s\n", sweep.results.size() + 1, total, variant.c_str(),
                   format_token_count(context).c_str());
      const MeasureSpec spec{context, extra_prefill, o.decode_tokens, o.repeats, o.prefill_chunk, o.decode_batch};
      sweep.results.push_back(
          {variant, weights.random, bytes_per_token, bytes_per_step, measure_in_child(backend, load, config, weights, spec)});
    }
  }
  return sweep;
}

nlohmann::ordered_json options_json(const Options& o, const std::vector<int64_t>& contexts, int64_t extra_prefill) {
  return {{"contexts", contexts},         {"prefill_tokens", extra_prefill}, {"prefill_chunk", o.prefill_chunk},
          {"decode_tokens", o.decode_tokens}, {"decode_batch", o.decode_batch}, {"repeats", o.repeats},          {"variants", o.variants},
          {"device", o.device},           {"precision", o.precision},        {"threads", o.threads},
          {"measure_bandwidth", o.measure_bandwidth}, {"tensor_parallel", o.backend.tensor_parallel},
          {"gpus", o.backend.gpus},       {"collectives", o.backend.collectives},
          {"moe_parallel", m1::moe_parallel_name(o.shard.moe)}, {"quantize", o.quantize},
          {"group_size", o.group_size},   {"quantize_lm_head", o.quantize_lm_head}};
}

void write_file(const fs::path& path, const std::string& text, const std::string& option) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out.flush()) m1::fail("{}: cannot write {}", option, path.string());
}

int run(Options& o) {
  const int64_t extra_prefill = token_count_option("--prefill-tokens", o.prefill_tokens, 0);
  const std::vector<int64_t> contexts = parse_contexts(o, extra_prefill);
  const BaseModel base = base_model(o);
  const m1::BackendOptions backend = backend_options(o);
  m1::LoadOptions load = m1::parse_load_options(o.quantize, o.group_size, o.quantize_lm_head, o.threads);
  load.shard = o.shard;
  m1::plan_shards(base.config, backend.tensor_parallel, o.shard.moe);  // a split the model refuses fails here, once

  RunInfo info;
  info.date = utc_date();
  info.cpu = cpu_model_name();
  info.backend = backend_description(backend);
  info.threads = o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  info.model = base.label;
  info.dtype = std::string(m1::dtype_name(base.dtype));
  if (load.quantize)
    info.dtype += fmt::format(", quantized to {}{}{}", o.quantize, o.quantize == "int4" ? fmt::format(" (group {})", load.quantize->group_size) : "",
                              o.quantize_lm_head ? " with the LM head" : "");
  info.config = base.config;
  info.options = options_json(o, contexts, extra_prefill);

  Sweep sweep = run_sweep(o, base, backend, load, contexts, extra_prefill);
  info.read_bandwidth = sweep.read_bandwidth;
  print_table(stdout, info, sweep.results);
  if (!o.json.empty()) write_file(o.json, report_json(info, sweep.results).dump(2) + "\n", "--json");
  if (!o.svg.empty())
    write_file(o.svg, latency_chart_svg(sweep.results, fmt::format("m1-bench: {} ({}), {}", info.model, info.dtype, info.backend)),
               "--svg");
  return 0;
}

void define_options(CLI::App& app, Options& o) {
  app.add_option("--model", o.model, "Checkpoint directory (config.json + safetensors)");
  app.add_option("--synthetic", o.synthetic, "Random weights in memory, in the shape of a preset: tiny, demo, bench, m1");
  app.add_option("--layers", o.layers, "--synthetic: number of layers (hybrid pattern: every 8th softmax)")->check(CLI::PositiveNumber);
  app.add_option("--dtype", o.dtype, "--synthetic: weight dtype: bf16 (default), f16 or f32");
  app.add_option("--device", o.device, "cpu or cuda")->capture_default_str();
  app.add_option("--precision", o.precision, "fast (bf16 matrix operands where the CPU multiplies bf16, fp32 accumulation) or exact (fp32 throughout)")->capture_default_str();
  app.add_option("--threads", o.threads, "CPU threads (0: one per core)")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--contexts", o.contexts, "Context lengths: 512, 4k, 1m, ...")->delimiter(',')->capture_default_str();
  app.add_option("--prefill-tokens", o.prefill_tokens,
                 "0: time the prefill of each context; N: build the context untimed, then time prefilling N more")
      ->capture_default_str();
  app.add_option("--prefill-chunk", o.prefill_chunk, "Prompt tokens per forward step")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--decode-tokens", o.decode_tokens, "Tokens decoded at each depth")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--decode-batch", o.decode_batch,
                 "Sequences decoded together at each depth, one token each per step (tok/s counts them all)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(4096)));
  app.add_option("--repeats", o.repeats, "Timed repeats (medians are reported)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--variants", o.variants, "hybrid (the model's own layers), lightning, softmax (every layer)")
      ->delimiter(',')
      ->check(CLI::IsMember(variant_names()))
      ->capture_default_str();
  app.add_option("--json", o.json, "Write the results as JSON to FILE");
  app.add_option("--svg", o.svg, "Draw latency against context as an SVG chart to FILE");
  app.add_flag("--measure-bandwidth", o.measure_bandwidth, "Also measure how fast --threads threads read the weights");
  m1::add_parallel_flags(app, o.backend, o.parallel);
  app.add_option("--quantize", o.quantize, "Quantize weights while loading: int8 (a scale per row) or int4 (a scale per group)");
  app.add_option("--group-size", o.group_size, "--quantize int4: inputs per scale, a multiple of 32 (default 32)");
  app.add_flag("--quantize-lm-head", o.quantize_lm_head, "--quantize the LM head too (kept in its stored type by default)");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"m1-bench: prefill and decode latency against context length, hybrid vs lightning vs softmax"};
  Options o;
  define_options(app, o);
  spdlog::set_default_logger(spdlog::stderr_logger_mt("m1-bench"));  // stdout carries the table
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fprintf(stderr, "m1-bench: %s\n", e.what());
    return 1;
  }
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "m1-bench: %s\n", e.what());
    return 1;
  }
}
