// m1-bench end to end on the tiny preset: the JSON carries every figure of every run, the state
// sizes follow DESIGN.md §2, the SVG is well-formed with a line per variant per panel, and bad
// arguments fail with one line naming the option at fault.

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "test_support.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kBench = std::string(M1_BIN_DIR) + "/m1-bench";

using m1::testing::read_file;
using Result = m1::testing::CommandResult;

Result run_bench(const std::string& args) { return m1::testing::run_command(kBench + " " + args); }

// True when every element opened in `svg` is closed, in order (comments and attributes aside,
// the SVG writer emits nothing a tag scanner would misread).
bool tags_balanced(const std::string& svg) {
  std::vector<std::string> open;
  for (size_t at = svg.find('<'); at != std::string::npos; at = svg.find('<', at + 1)) {
    const size_t end = svg.find('>', at);
    if (end == std::string::npos) return false;
    const std::string tag = svg.substr(at + 1, end - at - 1);
    const std::string name = tag.substr(tag[0] == '/', tag.find_first_of(" />", 1) - (tag[0] == '/'));
    if (tag[0] == '/') {
      if (open.empty() || open.back() != name) return false;
      open.pop_back();
    } else if (tag.back() != '/') {
      open.push_back(name);
    }
  }
  return open.empty();
}

size_t occurrences(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// One sweep over three variants and two contexts, shared by the tests that read its output.
class BenchSweep : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("m1-bench-test-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    result_ = run_bench("--synthetic tiny --contexts 64,128 --decode-tokens 4 --repeats 2 --threads 2 "
                        "--variants hybrid,lightning,softmax --json " + (dir_ / "out.json").string() +
                        " --svg " + (dir_ / "out.svg").string());
    report_ = json::parse(read_file(dir_ / "out.json"), nullptr, false);
    svg_ = read_file(dir_ / "out.svg");
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  // state_bytes by context, for one variant.
  static std::map<int64_t, int64_t> state_bytes(const std::string& variant) {
    std::map<int64_t, int64_t> bytes;
    for (const json& r : report_["results"])
      if (r["variant"] == variant) bytes[r["context"].get<int64_t>()] = r["state_bytes"].get<int64_t>();
    return bytes;
  }

  static inline fs::path dir_;
  static inline Result result_;
  static inline json report_;
  static inline std::string svg_;
};

TEST_F(BenchSweep, RunsAndPrintsATable) {
  ASSERT_EQ(result_.status, 0) << result_.err;
  EXPECT_NE(result_.out.find("variant"), std::string::npos);
  EXPECT_EQ(occurrences(result_.out, "\nsoftmax "), 2u) << result_.out;
  EXPECT_NE(result_.err.find("[6/6]"), std::string::npos) << "progress lines: " << result_.err;
}

TEST_F(BenchSweep, JsonHasEveryFigureOfEveryRun) {
  ASSERT_FALSE(report_.is_discarded());
  ASSERT_EQ(report_["results"].size(), 6u);
  for (const json& r : report_["results"]) {
    for (const char* field : {"prefill_ms", "prefill_tokens_per_s", "decode_ms_per_token", "state_bytes",
                              "peak_rss_bytes", "weight_bytes_per_token"}) {
      ASSERT_TRUE(r.contains(field) && r[field].is_number()) << field << " in " << r.dump();
      EXPECT_GT(r[field].get<double>(), 0) << field << " in " << r.dump();
    }
    EXPECT_TRUE(r["variant"] == "hybrid" || r["variant"] == "lightning" || r["variant"] == "softmax");
    EXPECT_TRUE(r["context"] == 64 || r["context"] == 128);
    EXPECT_EQ(r["weights"], "random");
    EXPECT_EQ(r["repeats"]["prefill_ms"].size(), 2u);
    EXPECT_EQ(r["repeats"]["decode_ms_per_token"].size(), 2u);
  }
  EXPECT_TRUE(report_["machine"].contains("cpu"));
  EXPECT_TRUE(report_["model"]["config"].contains("attn_type_list"));
}

// Lightning layers hold a fixed state; each softmax layer caches 2 * g * d values per token, of
// the KV cache's type: BF16 in fast precision on a CPU that multiplies bf16 (a bf16 checkpoint's
// attention rounds its operands there anyway), else F32.
TEST_F(BenchSweep, StateBytesFollowTheDesign) {
  const json& config = report_["model"]["config"];
  // The backend names the precision it computes in: "fast" only where the CPU multiplies bf16.
  const bool fast = report_["machine"]["backend"].get<std::string>().find("fast precision") != std::string::npos;
  const std::string kv_dtype = fast ? "BF16" : "F32";
  for (const json& r : report_["results"]) EXPECT_EQ(r["kv_dtype"], kv_dtype) << r.dump();
  const int64_t value_bytes = kv_dtype == "BF16" ? 2 : 4;
  const int64_t per_token_per_layer =
      2 * config["num_key_value_heads"].get<int64_t>() * config["head_dim"].get<int64_t>() * value_bytes;
  const int64_t layers = config["num_hidden_layers"].get<int64_t>();
  const std::vector<int> types = config["attn_type_list"].get<std::vector<int>>();
  const int64_t hybrid_softmax_layers = std::count(types.begin(), types.end(), 1);

  auto lightning = state_bytes("lightning"), softmax = state_bytes("softmax"), hybrid = state_bytes("hybrid");
  EXPECT_EQ(lightning[64], lightning[128]);
  EXPECT_EQ(softmax[128] - softmax[64], 64 * per_token_per_layer * layers);
  EXPECT_EQ(softmax[64], 64 * per_token_per_layer * layers);
  EXPECT_EQ(hybrid[128] - hybrid[64], 64 * per_token_per_layer * hybrid_softmax_layers);
}

TEST_F(BenchSweep, SvgIsWellFormedWithALinePerVariantPerPanel) {
  ASSERT_EQ(svg_.rfind("<svg", 0), 0u) << svg_.substr(0, 100);
  EXPECT_TRUE(tags_balanced(svg_));
  EXPECT_EQ(occurrences(svg_, "<polyline"), 3u * 2u);
  for (const char* label : {"hybrid", "lightning", "softmax", "prefill latency", "decode"})
    EXPECT_NE(svg_.find(label), std::string::npos) << label;
}

class BenchErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("m1-bench-errors-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Fails with exit status 1 and a single stderr line that names `option`.
  void expect_rejected(const std::string& args, const std::string& option) {
    const Result r = run_bench(args);
    EXPECT_EQ(r.status, 1) << args;
    EXPECT_NE(r.err.find(option), std::string::npos) << args << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << args << ": " << r.err;
  }

  fs::path dir_;
};

// Over CPU ranks the report gives each step's share in collectives.
// m1-bench run with `flags` and --json into a fresh directory (removed after): its result and the
// report (discarded when the file is not JSON).
struct JsonRun {
  Result result;
  json report;
};
JsonRun run_bench_json(const std::string& flags) {
  static int runs = 0;
  const fs::path dir =
      fs::temp_directory_path() / ("m1-bench-json-" + std::to_string(::getpid()) + "-" + std::to_string(runs++));
  fs::create_directories(dir);
  JsonRun run{run_bench(flags + " --json " + (dir / "out.json").string()), {}};
  run.report = json::parse(read_file(dir / "out.json"), nullptr, false);
  fs::remove_all(dir);
  return run;
}

TEST(BenchTensorParallel, ReportsTheShareOfCollectives) {
  const auto [r, report] =
      run_bench_json("--synthetic tiny --tensor-parallel 2 --contexts 64 --decode-tokens 3 --repeats 1 --variants hybrid");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("coll %"), std::string::npos) << r.out;
  ASSERT_FALSE(report.is_discarded());
  EXPECT_EQ(report["options"]["tensor_parallel"], 2);
  for (const char* share : {"prefill_collective_share", "decode_collective_share"}) {
    const double value = report["results"][0][share].get<double>();
    EXPECT_GT(value, 0) << share;
    EXPECT_LT(value, 1) << share;
  }
}

// --quantize counts the bytes a decode step reads as loaded: codes and scales of the quantized
// weights (int4 groups of 32: 4.5 bits each), the rest as stored.
TEST(BenchQuantized, WeightBytesPerTokenAreTheQuantizedOnes) {
  auto bytes = [&](const std::string& flags) {
    const auto [r, report] =
        run_bench_json("--synthetic tiny --contexts 64 --decode-tokens 2 --repeats 1 --threads 2 --variants hybrid " + flags);
    EXPECT_EQ(r.status, 0) << r.err;
    return report["results"][0]["weight_bytes_per_token"].get<double>();
  };
  const double bf16 = bytes(""), int8 = bytes("--quantize int8"), int4 = bytes("--quantize int4"),
               int4_head = bytes("--quantize int4 --quantize-lm-head");
  EXPECT_LT(int8, bf16);
  EXPECT_LT(int4, int8);
  EXPECT_LT(int4_head, int4);
  // The tiny preset's LM head: 2320 x 64 bf16 values, 4.5 bits each once quantized.
  EXPECT_NEAR(int4 - int4_head, 2320.0 * 64 * (2 - 4.5 / 8), 1.0);
}

// --decode-batch N decodes N sequences per step at each depth: the step's time is reported per
// token, and tokens/s counts every sequence of the step.
TEST(BenchDecodeBatch, StepsCarryEverySequenceAndCountThemAll) {
  const auto [r, report] = run_bench_json(
      "--synthetic tiny --contexts 64 --decode-tokens 3 --repeats 1 --threads 2 --variants hybrid --decode-batch 5");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("in steps of 5 sequences"), std::string::npos) << r.out;
  ASSERT_FALSE(report.is_discarded());
  EXPECT_EQ(report["options"]["decode_batch"], 5);
  const json& result = report["results"][0];
  EXPECT_EQ(result["decode_batch"], 5);
  const double ms = result["decode_ms_per_token"].get<double>(), per_s = result["decode_tokens_per_s"].get<double>();
  ASSERT_GT(ms, 0);
  EXPECT_NEAR(per_s, 5 * 1000 / ms, 1e-9 * per_s);
}

// A step of B sequences reads, beyond one sequence's weights, an embedding row per further
// sequence and the experts some token picked: E (1 - (1 - k / E)^B) of each layer's E in
// expectation when each token picks its top k uniformly, against k at batch 1.
TEST(BenchDecodeBatch, WeightBytesPerStepCountTheExpertsTheBatchPicks) {
  const auto [r, report] = run_bench_json(
      "--synthetic tiny --contexts 64 --decode-tokens 2 --repeats 1 --threads 2 --variants hybrid --decode-batch 5");
  ASSERT_EQ(r.status, 0) << r.err;
  ASSERT_FALSE(report.is_discarded());
  ASSERT_EQ(report["model"]["dtype"], "BF16");
  const json& c = report["model"]["config"];
  const double experts = c["num_local_experts"].get<double>(), top_k = c["num_experts_per_tok"].get<double>(),
               hidden = c["hidden_size"].get<double>();
  const double expert_bytes =
      c["num_hidden_layers"].get<double>() * experts * 3 * hidden * c["intermediate_size"].get<double>() * 2;
  const double embed_rows = c["tie_word_embeddings"].get<bool>() ? 0 : 4 * hidden * 2;
  const json& result = report["results"][0];
  const double token = result["weight_bytes_per_token"].get<double>(), step = result["weight_bytes_per_step"].get<double>();
  const double picked = 1 - std::pow(1 - top_k / experts, 5);
  EXPECT_NEAR(step, token + embed_rows + expert_bytes * (picked - top_k / experts), 1.0);
  EXPECT_GT(step, token);
}

TEST_F(BenchErrors, BadArgumentsNameTheOption) {
  expect_rejected("--synthetic huge", "--synthetic");
  expect_rejected("--synthetic tiny --contexts 64,lots", "--contexts");
  expect_rejected("--synthetic tiny --contexts 0", "--contexts");
  expect_rejected("--synthetic tiny --device tpu", "--device");
  expect_rejected("--model " + (dir_ / "nowhere").string(), "--model");
  expect_rejected("--synthetic tiny --variants hybrid,quadratic", "--variants");
  expect_rejected("--synthetic tiny --precision turbo", "--precision");
  expect_rejected("--synthetic tiny --dtype int8", "--dtype");
  expect_rejected("--synthetic tiny --tensor-parallel 3", "--tensor-parallel 3");
  expect_rejected("--synthetic tiny --tensor-parallel 2 --moe-parallel sideways", "--moe-parallel");
  expect_rejected("--synthetic tiny --quantize int2", "--quantize");
  expect_rejected("--synthetic tiny --decode-batch 0", "--decode-batch");
}

}  // namespace
