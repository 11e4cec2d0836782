#pragma once
// m1-bench's results as a table for people and a JSON document for scripts, both headed by what
// was run and where.

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_measure.h"
#include "m1/config.h"

namespace m1::bench {

struct BenchResult {
  std::string variant;
  bool random_weights = false;
  uint64_t weight_bytes_per_token = 0;  // read by one decode step of one sequence
  uint64_t weight_bytes_per_step = 0;   // read by one decode step of the run's batch (expected)
  Measurement measurement;
};

// What was run, and where.
struct RunInfo {
  std::string date;     // UTC, ISO 8601
  std::string cpu;      // model name from /proc/cpuinfo
  std::string backend;  // the backend's own description (device, threads, kernels)
  int threads = 0;
  std::string model;  // "synthetic PRESET" or the checkpoint directory
  std::string dtype;
  ModelConfig config;                     // the model's own, hybrid, config
  nlohmann::ordered_json options;         // the command line's settings
  std::optional<double> read_bandwidth;   // bytes per second, when measured
};

void print_table(std::FILE* out, const RunInfo& info, const std::vector<BenchResult>& results);
nlohmann::ordered_json report_json(const RunInfo& info, const std::vector<BenchResult>& results);

// One line naming the shape: layers by kind, widths, experts, vocabulary.
std::string describe_shape(const ModelConfig& config);
std::string cpu_model_name();
std::string utc_date();

}  // namespace m1::bench
