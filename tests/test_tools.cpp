// The command-line tools end to end: m1-mkmodel writes loadable, deterministic checkpoints;
// m1-generate reproduces the goldens and fails clearly on bad input; m1-tokenize round-trips.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "m1/model.h"
#include "m1/synthetic.h"
#include "test_support.h"

namespace m1 {
namespace {

namespace fs = std::filesystem;
const std::string kBin = M1_BIN_DIR;
const std::string kSourceDir = M1_SOURCE_DIR;

using m1::testing::CommandResult;
using m1::testing::read_file;
using Result = CommandResult;

Result run(const std::string& command, const std::string& stdin_text = "") {
  return m1::testing::run_command(command, stdin_text);
}

std::string tool(const std::string& name) { return kBin + "/" + name; }

class ToolsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("m1-tools-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // m1-mkmodel with extra arguments into dir_/name; asserts success.
  fs::path make(const std::string& name, const std::string& args = "") {
    fs::path out = dir_ / name;
    Result r = run(tool("m1-mkmodel") + " --preset tiny --out " + out.string() + " " + args);
    EXPECT_EQ(r.status, 0) << r.err;
    return out;
  }

  fs::path dir_;
};

std::vector<float> prompt_logits(const fs::path& model_dir, const std::vector<int32_t>& tokens) {
  auto backend = create_backend(BackendOptions{"cpu", 2});
  auto model = Model::load(model_dir, *backend);
  auto seq = model->new_sequence();
  StepLogits out;
  BatchEntry e{seq.get(), tokens, LogitsFor::kAll};
  model->forward({&e, 1}, out);
  return std::vector<float>(out.row(0, 0).begin(), out.row(0, out.rows(0) - 1).end());
}

void expect_failure(const Result& r, const std::string& names) {
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find(names), std::string::npos) << "stderr: " << r.err;
}

TEST_F(ToolsTest, MkmodelIsDeterministicForASeed) {
  fs::path a = make("a", "--seed 7"), b = make("b", "--seed 7"), c = make("c", "--seed 8");
  EXPECT_EQ(read_file(a / "model.safetensors"), read_file(b / "model.safetensors"));
  EXPECT_NE(read_file(a / "model.safetensors"), read_file(c / "model.safetensors"));
  EXPECT_EQ(read_file(a / "tokenizer.json"), read_file(b / "tokenizer.json"));
}

TEST_F(ToolsTest, ShardedCheckpointGivesTheSameLogits) {
  fs::path single = make("single", "--seed 3"), sharded = make("sharded", "--seed 3 --shard-size 0.2");
  EXPECT_TRUE(fs::exists(sharded / "model.safetensors.index.json"));
  int shards = 0;
  for (const auto& entry : fs::directory_iterator(sharded)) shards += entry.path().extension() == ".safetensors";
  EXPECT_GE(shards, 3);
  std::vector<int32_t> tokens{1, 50, 300, 2000, 7};
  EXPECT_EQ(prompt_logits(single, tokens), prompt_logits(sharded, tokens));
}

// m1-bench builds random models in memory: they are the ones m1-mkmodel writes.
TEST_F(ToolsTest, InMemoryRandomModelMatchesTheWrittenOne) {
  fs::path written = make("w", "--seed 9");
  ModelConfig config = load_config(written / "config.json");
  auto backend = create_backend(BackendOptions{"cpu", 2});
  Model model(config, random_checkpoint(config, DType::kBF16, 9), *backend);
  std::vector<int32_t> tokens{4, 8, 15, 16, 23, 42};
  auto seq = model.new_sequence();
  StepLogits out;
  BatchEntry e{seq.get(), tokens, LogitsFor::kAll};
  model.forward({&e, 1}, out);
  EXPECT_EQ(std::vector<float>(out.row(0, 0).begin(), out.row(0, 5).end()), prompt_logits(written, tokens));
}

TEST_F(ToolsTest, MkmodelAppliesOverrides) {
  fs::path m = make("m", "--layers 10 --dtype f16 --set rope_theta=5000 --set num_key_value_heads=4");
  auto config = nlohmann::json::parse(read_file(m / "config.json"));
  EXPECT_EQ(config["num_hidden_layers"], 10);
  EXPECT_EQ(config["attn_type_list"], nlohmann::json({0, 0, 0, 0, 0, 0, 0, 1, 0, 0}));
  EXPECT_EQ(config["rope_theta"], 5000);
  EXPECT_EQ(config["num_key_value_heads"], 4);
  EXPECT_EQ(config["torch_dtype"], "float16");
  auto lightning = nlohmann::json::parse(read_file(make("l", "--attention lightning") / "config.json"));
  EXPECT_EQ(lightning["attn_type_list"], nlohmann::json({0, 0, 0, 0}));
  auto softmax = nlohmann::json::parse(read_file(make("s", "--attention softmax --dtype f32") / "config.json"));
  EXPECT_EQ(softmax["attn_type_list"], nlohmann::json({1, 1, 1, 1}));
}

// Random weights keep activations O(1) through depth: logits of a deep model are neither
// vanishing nor exploding.
TEST_F(ToolsTest, RandomWeightsKeepLogitsOrderOne) {
  fs::path deep = make("deep", "--layers 24");
  std::vector<float> logits = prompt_logits(deep, {5, 17, 900, 33, 1200, 64, 2});
  double sum = 0, squares = 0;
  for (float v : logits) {
    ASSERT_TRUE(std::isfinite(v));
    sum += v;
    squares += double(v) * v;
  }
  const double mean = sum / double(logits.size()), stdev = std::sqrt(squares / double(logits.size()) - mean * mean);
  EXPECT_GT(stdev, 0.2);
  EXPECT_LT(stdev, 5.0);
}

TEST_F(ToolsTest, MkmodelRejectsBadArguments) {
  expect_failure(run(tool("m1-mkmodel") + " --preset huge --out " + (dir_ / "x").string()), "preset 'huge'");
  expect_failure(run(tool("m1-mkmodel") + " --set num_key_value_heads=3 --out " + (dir_ / "x").string()),
                 "num_key_value_heads");
  expect_failure(run(tool("m1-mkmodel") + " --set attn_type_list=[0,1] --out " + (dir_ / "x").string()),
                 "attn_type_list");
  expect_failure(run(tool("m1-mkmodel") + " --dtype int8 --out " + (dir_ / "x").string()), "--dtype");
  fs::path m = make("m");
  expect_failure(run(tool("m1-mkmodel") + " --preset tiny --out " + m.string()), "--force");
}

std::string ids_csv(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) {
    if (!s.empty()) s += ',';
    s += std::to_string(id);
  }
  return s;
}

TEST_F(ToolsTest, GenerateLogitsMatchTheGolden) {
  const std::string golden = kSourceDir + "/tests/data/golden/tiny-bf16";
  auto meta = nlohmann::json::parse(read_file(golden + "/golden.json"));
  std::vector<int32_t> tokens = meta["tokens"];
  fs::path logits_file = dir_ / "logits.f32";
  Result r = run(tool("m1-generate") + " --model " + golden + " --prompt-ids " + ids_csv(tokens) +
              " --max-tokens 32 --temperature 0 --prefill-chunk 100 --ignore-eos --precision exact --logits-out " + logits_file.string());
  ASSERT_EQ(r.status, 0) << r.err;
  std::string got = read_file(logits_file), want = read_file(golden + "/golden_logits.f32");
  ASSERT_EQ(got.size(), want.size());
  const float* g = reinterpret_cast<const float*>(got.data());
  const float* w = reinterpret_cast<const float*>(want.data());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size() / 4; ++i) {
    ASSERT_TRUE(std::isfinite(g[i]));
    diff += (double(g[i]) - w[i]) * (double(g[i]) - w[i]);
    norm += double(w[i]) * w[i];
  }
  EXPECT_LE(std::sqrt(diff / norm), 1e-4);
  EXPECT_NE(r.err.find("generated 32 tokens"), std::string::npos) << r.err;
}

TEST_F(ToolsTest, GenerateIsDeterministicAndStops) {
  fs::path m = make("m");
  const std::string base = tool("m1-generate") + " --model " + m.string() + " --prompt 'The quick brown fox' --ignore-eos --max-tokens 24";
  Result greedy = run(base + " --temperature 0");
  ASSERT_EQ(greedy.status, 0) << greedy.err;
  EXPECT_EQ(run(base + " --temperature 0").out, greedy.out);
  EXPECT_EQ(run(base + " --temperature 1.3 --top-k 1").out, greedy.out);
  Result seeded = run(base + " --temperature 1 --seed 11");
  EXPECT_EQ(run(base + " --temperature 1 --seed 11").out, seeded.out);
  EXPECT_NE(seeded.out, greedy.out);
  // A stop string taken from the greedy text ends the output just before it.
  std::string text = greedy.out.substr(0, greedy.out.size() - 1);  // without the final newline
  ASSERT_GT(text.size(), 8u);
  std::string stop = text.substr(text.size() / 2, 3);
  if (stop.find('\'') != std::string::npos) GTEST_SKIP() << "stop string would need shell quoting";
  Result stopped = run(base + " --temperature 0 --stop '" + stop + "'");
  EXPECT_EQ(stopped.out, text.substr(0, text.find(stop)) + "\n");
  EXPECT_NE(stopped.err.find("finish stop"), std::string::npos) << stopped.err;
}

TEST_F(ToolsTest, GenerateRejectsBadInput) {
  fs::path m = make("m");
  const std::string gen = tool("m1-generate") + " --model " + m.string();
  expect_failure(run(tool("m1-generate") + " --model " + (dir_ / "nowhere").string() + " --prompt hi"), "nowhere");
  expect_failure(run(gen + " --prompt hi --chat hi"), "exactly one of");
  expect_failure(run(gen + " --prompt-ids 1,x,3"), "--prompt-ids");
  expect_failure(run(gen + " --prompt-ids 1,999999"), "out of range");
  expect_failure(run(gen + " --prompt hi --top-p 1.5"), "top_p");
  expect_failure(run(gen + " --prompt hi --device tpu"), "tpu");
  expect_failure(run(gen + " --prompt hi --precision turbo"), "precision");
  expect_failure(run(gen + " --prompt hi --tensor-parallel 3"), "--tensor-parallel 3 does not divide the model's 4 attention heads");
  expect_failure(run(gen + " --prompt hi --tensor-parallel 0"), "--tensor-parallel must be between 1 and 1024, got 0");
  expect_failure(run(gen + " --prompt hi --tensor-parallel 2 --moe-parallel sideways"), "--moe-parallel: MoE split 'sideways'");
  expect_failure(run(gen + " --prompt hi --gpus 0,1"), "--gpus chooses GPUs for --device cuda");
  expect_failure(run(gen + " --prompt hi --device cuda --gpus 0,x"), "--gpus: 'x' is not a GPU index");
  expect_failure(run(gen + " --prompt hi --collectives nccl"), "--collectives nccl is for --device cuda");
  fs::remove(m / "tokenizer.json");
  expect_failure(run(gen + " --prompt hi"), "tokenizer.json");
}

// A model of 6 heads (2 KV heads, 6 experts) made with m1-mkmodel --set, split over 2 and 3 CPU
// ranks, both MoE splits: the same greedy text as one rank, and each rank's memory printed.
TEST_F(ToolsTest, GenerateOverRanksGivesTheSameText) {
  fs::path m = make("six", "--set num_attention_heads=6 --set num_key_value_heads=2 --set head_dim=16 "
                           "--set num_local_experts=6 --set intermediate_size=50");
  const std::string base = tool("m1-generate") + " --model " + m.string() +
                           " --prompt 'The quick brown fox' --ignore-eos --max-tokens 16 --temperature 0 --precision exact";
  const Result one = run(base);
  ASSERT_EQ(one.status, 0) << one.err;
  for (const std::string flags : {"--tensor-parallel 2", "--tensor-parallel 3", "--tensor-parallel 3 --moe-parallel expert"}) {
    const Result split = run(base + " " + flags);
    ASSERT_EQ(split.status, 0) << flags << ": " << split.err;
    EXPECT_EQ(split.out, one.out) << flags;
    EXPECT_NE(split.err.find("rank 1/"), std::string::npos) << flags << ": " << split.err;
    EXPECT_NE(split.err.find("MiB of weights"), std::string::npos) << flags << ": " << split.err;
  }
}

// --prompt-cache: the state after the prompt is saved, a longer prompt resumes from it, and the
// output is what it is without the cache; a file that cannot be used is replaced.
TEST_F(ToolsTest, GeneratePromptCacheResumesWithTheSameOutput) {
  fs::path m = make("m");
  std::string ids;
  for (int i = 0; i < 200; ++i) ids += (i ? "," : "") + std::to_string(300 + (i * 37) % 1500);
  const std::string gen = tool("m1-generate") + " --model " + m.string() + " --temperature 0 --max-tokens 8 --threads 1";
  const fs::path cache = dir_ / "prompt.m1snap";
  Result first = run(gen + " --prompt-ids " + ids + " --prompt-cache " + cache.string());
  ASSERT_EQ(first.status, 0) << first.err;
  EXPECT_NE(first.err.find("saved the state after 192 prompt tokens"), std::string::npos) << first.err;
  const std::string longer = ids + ",301,302,303,304,305";
  const Result plain = run(gen + " --prompt-ids " + longer);
  Result resumed = run(gen + " --prompt-ids " + longer + " --prompt-cache " + cache.string() + " --prompt-cache-ro");
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("resumed 192 of 205 prompt tokens"), std::string::npos) << resumed.err;
  EXPECT_EQ(resumed.out, plain.out);
  EXPECT_EQ(run(gen + " --prompt-ids " + ids + " --prompt-cache " + cache.string()).out, first.out);  // the same prompt again

  std::string bytes = read_file(cache);
  bytes[bytes.size() / 2] ^= 1;
  std::ofstream(cache, std::ios::binary) << bytes;
  Result damaged = run(gen + " --prompt-ids " + longer + " --prompt-cache " + cache.string());
  ASSERT_EQ(damaged.status, 0) << damaged.err;
  EXPECT_NE(damaged.err.find("not used: checksum mismatch"), std::string::npos) << damaged.err;
  EXPECT_NE(damaged.err.find("saved the state after 192 prompt tokens"), std::string::npos) << damaged.err;
  EXPECT_EQ(damaged.out, plain.out);
  Result other = run(gen + " --prompt-ids 7,8,9," + ids + " --prompt-cache " + cache.string() + " --prompt-cache-ro");
  EXPECT_NE(other.err.find("holds another prompt"), std::string::npos) << other.err;
}

// --prompt-cache over two CPU ranks: the sharded state is saved and resumed with the output of a
// cold run at N = 2; a file saved by one rank is foreign to two.
TEST_F(ToolsTest, GeneratePromptCacheResumesOverRanks) {
  fs::path m = make("m");
  std::string ids;
  for (int i = 0; i < 140; ++i) ids += (i ? "," : "") + std::to_string(300 + (i * 37) % 1500);
  const std::string gen = tool("m1-generate") + " --model " + m.string() + " --temperature 0 --max-tokens 6 --threads 2";
  const fs::path one = dir_ / "one.m1snap", two = dir_ / "two.m1snap";
  ASSERT_EQ(run(gen + " --prompt-ids " + ids + " --prompt-cache " + one.string()).status, 0);
  const std::string longer = ids + ",301,302,303";
  const Result cold = run(gen + " --tensor-parallel 2 --prompt-ids " + longer);
  ASSERT_EQ(cold.status, 0) << cold.err;
  Result first = run(gen + " --tensor-parallel 2 --prompt-ids " + ids + " --prompt-cache " + two.string());
  ASSERT_EQ(first.status, 0) << first.err;
  EXPECT_NE(first.err.find("saved the state after 128 prompt tokens"), std::string::npos) << first.err;
  Result resumed = run(gen + " --tensor-parallel 2 --prompt-ids " + longer + " --prompt-cache " + two.string());
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("resumed 128 of 143 prompt tokens"), std::string::npos) << resumed.err;
  EXPECT_EQ(resumed.out, cold.out);
  Result foreign = run(gen + " --tensor-parallel 2 --prompt-ids " + longer + " --prompt-cache " + one.string() +
                       " --prompt-cache-ro");
  ASSERT_EQ(foreign.status, 0) << foreign.err;
  EXPECT_NE(foreign.err.find("not used"), std::string::npos) << foreign.err;
  EXPECT_EQ(foreign.out, cold.out);
}

TEST_F(ToolsTest, GenerateChatStopsAtEndOfTurnOrLength) {
  fs::path m = make("m");
  Result r = run(tool("m1-generate") + " --model " + m.string() + " --chat hello --system 'be brief' --max-tokens 8 --seed 1");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(r.err.find("finish length") != std::string::npos || r.err.find("finish stop") != std::string::npos) << r.err;
}

TEST_F(ToolsTest, TokenizeRoundTrips) {
  const std::string tok = tool("m1-tokenize") + " --tokenizer " + kSourceDir + "/data/minimax-m1/tokenizer.json";
  Result enc = run(tok, "Hello world");
  ASSERT_EQ(enc.status, 0) << enc.err;
  EXPECT_EQ(nlohmann::json::parse(enc.out), nlohmann::json({19739, 2035}));
  Result dec = run(tok + " --decode", enc.out);
  ASSERT_EQ(dec.status, 0) << dec.err;
  EXPECT_EQ(dec.out.substr(0, 11), "Hello world");
  expect_failure(run(tool("m1-tokenize") + " --tokenizer " + (dir_ / "none.json").string(), "x"), "none.json");
}


// m1-mkmodel needs nothing beside it: copied alone to another directory and run from there, it
// writes the real tokenizer (the repository's data/minimax-m1, built into the binary) and its chat
// template.
TEST_F(ToolsTest, MkmodelCopiedAloneCarriesTheRealTokenizer) {
  const fs::path copy = dir_ / "bin" / "m1-mkmodel";
  fs::create_directories(copy.parent_path());
  fs::copy_file(tool("m1-mkmodel"), copy);
  const fs::path out = dir_ / "full";
  Result r = run("cd " + dir_.string() + " && " + copy.string() + " --preset tiny --tokenizer full --out " + out.string());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(read_file(out / "tokenizer.json")),
            nlohmann::json::parse(read_file(fs::path(kSourceDir) / "data/minimax-m1/tokenizer.json")));
  EXPECT_EQ(nlohmann::json::parse(read_file(out / "tokenizer_config.json")),
            nlohmann::json::parse(read_file(fs::path(kSourceDir) / "data/minimax-m1/tokenizer_config.json")));
  Result enc = run(tool("m1-tokenize") + " --model " + out.string(), "Hello world");
  ASSERT_EQ(enc.status, 0) << enc.err;
  EXPECT_EQ(nlohmann::json::parse(enc.out), nlohmann::json({19739, 2035}));
}

}  // namespace
}  // namespace m1
