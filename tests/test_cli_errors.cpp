// Bad input on the command line of every tool: missing and invalid options, missing, unreadable
// and corrupt checkpoint files, bad tokenizer files. Each is refused with a non-zero exit status
// and a message naming what is wrong (the option, the file, the tensor), never a crash. The
// cases test_tools and test_bench already cover are not repeated (docs/bad-input.md lists all).

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include <httplib.h>

#include "test_support.h"

namespace {

namespace fs = std::filesystem;
using m1::testing::CommandResult;
using m1::testing::read_file;
using m1::testing::run_command;

const std::string kBin = M1_BIN_DIR;

class CliErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("m1-cli-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A tiny random model in dir_/name.
  fs::path model(const std::string& name, const std::string& flags = "") const {
    const fs::path out = dir_ / name;
    const CommandResult r = run_command(kBin + "/m1-mkmodel --preset tiny --out " + out.string() + " " + flags);
    EXPECT_EQ(r.status, 0) << r.err;
    return out;
  }

  // Runs a tool (a server gets 20 s to give up) and expects it refused, naming `what`.
  static void expect_refused(const std::string& tool, const std::string& args, const std::string& what,
                             const std::string& stdin_text = "") {
    const CommandResult r = run_command("timeout 20 " + kBin + "/" + tool + " " + args, stdin_text);
    EXPECT_GT(r.status, 0) << tool << " " << args << " (-1: it crashed)";
    EXPECT_NE(r.status, 124) << tool << " " << args << ": did not exit";
    EXPECT_NE(r.err.find(what), std::string::npos) << tool << " " << args << ": " << r.err;
  }

  fs::path dir_;
};

// Rewrites the first occurrence of `from` in a file with `to`, of the same length.
void patch_file(const fs::path& path, const std::string& from, const std::string& to) {
  ASSERT_EQ(from.size(), to.size());
  std::string bytes = read_file(path);
  const size_t at = bytes.find(from);
  ASSERT_NE(at, std::string::npos) << from;
  bytes.replace(at, from.size(), to);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// Checkpoint faults every tool that loads a model meets the same way: one per directory.
struct BrokenModel {
  std::string name, what;  // the directory, and what the message must name
  std::function<void(const fs::path&)> break_it;
  bool in_tokenizer = false;  // m1-bench reads no tokenizer
};

std::vector<BrokenModel> broken_models() {
  return {
      {"no_config", "config.json: cannot open", [](const fs::path& m) { fs::remove(m / "config.json"); }},
      {"config_not_json", "config.json: not valid JSON",
       [](const fs::path& m) { std::ofstream(m / "config.json") << "{\"hidden_size\": "; }},
      {"config_shape_mismatch", "has shape [2320,64] but the config needs [2320,128]",
       [](const fs::path& m) { patch_file(m / "config.json", "\"hidden_size\": 64,", "\"hidden_size\":128,"); }},
      {"no_weights", "no model.safetensors.index.json or model.safetensors",
       [](const fs::path& m) { fs::remove(m / "model.safetensors"); }},
      {"weights_truncated", "file truncated?",
       [](const fs::path& m) { fs::resize_file(m / "model.safetensors", fs::file_size(m / "model.safetensors") / 2); }},
      {"weights_header_cut", "truncated or not a safetensors file",
       [](const fs::path& m) { fs::resize_file(m / "model.safetensors", 100); }},
      {"weights_a_directory", "model.safetensors: not a regular file",
       [](const fs::path& m) {
         fs::remove(m / "model.safetensors");
         fs::create_directory(m / "model.safetensors");
       }},
      {"weights_integer_dtype", "has dtype \"I16\"; weights must be BF16, F16 or F32",
       [](const fs::path& m) { patch_file(m / "model.safetensors", "\"dtype\":\"BF16\"", "\"dtype\": \"I16\""); }},
      {"tokenizer_not_json", "tokenizer.json: not valid JSON",
       [](const fs::path& m) { std::ofstream(m / "tokenizer.json") << "garbage"; }, true},
      {"no_tokenizer", "tokenizer.json: cannot open", [](const fs::path& m) { fs::remove(m / "tokenizer.json"); }, true},
      {"unknown_end_of_turn", "the end-of-turn token '<nope>' is not in tokenizer.json",
       [](const fs::path& m) { std::ofstream(m / "tokenizer_config.json") << R"({"eos_token": "<nope>"})"; }, true},
      {"tokenizer_config_not_json", "tokenizer_config.json: not a JSON object",
       [](const fs::path& m) { std::ofstream(m / "tokenizer_config.json") << "{\"eos_token\": "; }, true},
      {"config_a_directory", "config.json: not a regular file",
       [](const fs::path& m) {
         fs::remove(m / "config.json");
         fs::create_directory(m / "config.json");
       }},
  };
}

TEST_F(CliErrorTest, GenerateRefusesBadOptions) {
  const std::string m = model("m").string();
  expect_refused("m1-generate", "--prompt hi", "--model is required");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --bogus", "--bogus");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --max-tokens lots", "--max-tokens");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --threads -2", "--threads");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --prefill-chunk 0", "--prefill-chunk");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --system terse", "--system needs --chat");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --temperature 5", "temperature must be in [0, 2]");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --max-tokens 1 --logits-out " + (dir_ / "no/such/dir/x").string(),
                 "--logits-out: cannot write");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --prompt-cache-ro", "--prompt-cache-ro needs --prompt-cache");
  expect_refused("m1-generate", "--model " + m + " --prompt hi --prompt-cache x --logits-out y", "give one of them");
}

// The context bounds one-shot generation too: a prompt that fills it is refused, and generation
// stops at its end.
TEST_F(CliErrorTest, GenerateKeepsWithinTheContext) {
  const std::string m = model("short", "--set max_position_embeddings=12").string();
  expect_refused("m1-generate", "--model " + m + " --prompt-ids 1,2,3,4,5,6,7,8,9,10,11,12", "context of 12 tokens");
  const CommandResult r =
      run_command(kBin + "/m1-generate --model " + m + " --prompt-ids 1,2,3,4,5,6,7,8,9,10 --max-tokens 50 --ignore-eos");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("generated 2 tokens"), std::string::npos) << r.err;
}

TEST_F(CliErrorTest, EveryModelLoaderNamesTheBrokenFile) {
  for (const BrokenModel& broken : broken_models()) {
    SCOPED_TRACE(broken.name);
    const fs::path m = model(broken.name);
    broken.break_it(m);
    expect_refused("m1-generate", "--model " + m.string() + " --prompt hi", broken.what);
    expect_refused("m1-serve", "--port 0 --model " + m.string(), broken.what);
    if (!broken.in_tokenizer)
      expect_refused("m1-bench", "--contexts 64 --decode-tokens 1 --repeats 1 --model " + m.string(), broken.what);
  }
}

TEST_F(CliErrorTest, AMissingShardIsNamed) {
  const fs::path m = model("sharded", "--shard-size 0.2");
  const std::string shard = "model-00002-of-00006.safetensors";
  ASSERT_TRUE(fs::remove(m / shard));
  expect_refused("m1-generate", "--model " + m.string() + " --prompt hi", "shard \"" + shard + "\" listed in");
}

// Permissions do not stop root, so as root the tool runs as nobody, from a copy in the test's own
// directory: the build tree may sit under a directory nobody cannot enter (a clone in /root, or in
// a 0700 temporary directory).
TEST_F(CliErrorTest, UnreadableFilesAreNamed) {
  fs::permissions(dir_, fs::perms::owner_all | fs::perms::others_read | fs::perms::others_exec);
  std::string generate = kBin + "/m1-generate";
  if (::geteuid() == 0) {
    if (run_command("command -v runuser").status != 0) GTEST_SKIP() << "root without runuser: permissions do not apply";
    const fs::path copy = dir_ / "m1-generate";
    fs::copy_file(generate, copy, fs::copy_options::overwrite_existing);
    fs::permissions(copy, fs::perms::owner_all | fs::perms::others_read | fs::perms::others_exec);
    ASSERT_EQ(run_command("runuser -u nobody -- test -x " + copy.string()).status, 0)
        << "nobody cannot run " << copy << " (is " << dir_.parent_path() << " closed to others?)";
    generate = "runuser -u nobody -- " + copy.string();
  }
  for (const char* file : {"config.json", "model.safetensors", "tokenizer.json"}) {
    SCOPED_TRACE(file);
    const fs::path m = model(std::string("unreadable_") + file);
    fs::permissions(m / file, fs::perms::none);
    const CommandResult r = run_command(generate + " --model " + m.string() + " --prompt hi");
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find((m / file).string() + ": cannot open"), std::string::npos) << r.err;
  }
}

TEST_F(CliErrorTest, MkmodelRefusesBadOptions) {
  const std::string out = " --out " + (dir_ / "x").string();
  expect_refused("m1-mkmodel", "--preset tiny", "--out is required");
  expect_refused("m1-mkmodel", "--preset tiny --layers 0" + out, "--layers");
  expect_refused("m1-mkmodel", "--preset tiny --attention quadratic" + out, "--attention");
  expect_refused("m1-mkmodel", "--preset tiny --shard-size -1" + out, "--shard-size");
  expect_refused("m1-mkmodel", "--preset tiny --tokenizer lots" + out, "--tokenizer");
  expect_refused("m1-mkmodel", "--preset tiny --tokenizer-source " + (dir_ / "none.json").string() + out,
                 "none.json: cannot open");
  expect_refused("m1-mkmodel", "--preset tiny --set hidden_size" + out, "--set: expected FIELD=VALUE");
  expect_refused("m1-mkmodel", "--preset tiny --set 'rope_theta={'" + out, "rope_theta");
  expect_refused("m1-mkmodel", "--preset tiny --set vocab_size=10" + out, "--set vocab_size");
  std::ofstream(dir_ / "a_file") << "x";
  expect_refused("m1-mkmodel", "--preset tiny --out " + (dir_ / "a_file" / "sub").string(), "cannot create");
}

TEST_F(CliErrorTest, TokenizeRefusesBadInput) {
  const std::string m = " --model " + model("m").string();
  expect_refused("m1-tokenize", "", "--model or --tokenizer is required");
  expect_refused("m1-tokenize", m + " --tokenizer x.json", "--model excludes --tokenizer");
  expect_refused("m1-tokenize", m + " --bogus", "--bogus");
  expect_refused("m1-tokenize", " --model " + (dir_ / "nowhere").string(), "nowhere/tokenizer.json: cannot open");
  expect_refused("m1-tokenize", m + " --decode", "not valid JSON", "[1, x]");
  expect_refused("m1-tokenize", m + " --decode", "expected a JSON array of token ids", R"({"a": 1})");
  expect_refused("m1-tokenize", m + " --decode", "token id 1.5 is not an integer", "[1.5]");
  expect_refused("m1-tokenize", m + " --decode", "token id 99999 is out of range", "[1, 99999]");
  expect_refused("m1-tokenize", m + " --jsonl", "line 2: expected a JSON string", "\"ok\"\n42\n");
  expect_refused("m1-tokenize", m + " --jsonl --decode", "line 2: not valid JSON", "[1]\n[1,\n");
}

TEST_F(CliErrorTest, BenchRefusesBadOptions) {
  const std::string m = model("m").string(), quick = " --contexts 64 --decode-tokens 1 --repeats 1";
  expect_refused("m1-bench", "", "give exactly one of --model DIR or --synthetic PRESET");
  expect_refused("m1-bench", "--model " + m + " --synthetic tiny", "give exactly one of");
  expect_refused("m1-bench", "--model " + m + " --layers 2", "--layers and --dtype shape a --synthetic model");
  expect_refused("m1-bench", "--synthetic tiny" + quick + " --json " + (dir_ / "no/dir/x.json").string(), "--json: cannot write");
  expect_refused("m1-bench", "--synthetic tiny" + quick + " --svg " + (dir_ / "no/dir/x.svg").string(), "--svg: cannot write");
}

// bench_cuda checks its filters before it touches a GPU, so this runs on any build that has it.
TEST_F(CliErrorTest, BenchCudaRefusesFiltersThatLeaveNothing) {
  if (!fs::exists(fs::path(kBin) / "bench_cuda")) GTEST_SKIP() << "built without the CUDA backend";
  expect_refused("bench_cuda", "--only nothing", "--only 'nothing' and --skip '' leave no benchmark (names start with matmul");
  expect_refused("bench_cuda", "--only sampling --skip sampl", "leave no benchmark");
}

TEST_F(CliErrorTest, ServeRefusesBadOptions) {
  const std::string m = " --port 0 --model " + model("m").string();
  expect_refused("m1-serve", "--port 0", "--model is required");
  expect_refused("m1-serve", "--port 70000 --model x", "--port");
  expect_refused("m1-serve", m + " --max-batch 0", "--max-batch");
  expect_refused("m1-serve", m + " --max-state-mb -1", "--max-state-mb");
  expect_refused("m1-serve", m + " --max-grammar-states 0", "--max-grammar-states");
  expect_refused("m1-serve", m + " --precision turbo", "precision 'turbo' is unknown");
  expect_refused("m1-serve", m + " --device tpu", "device 'tpu' is unknown");
  expect_refused("m1-serve", m + " --tensor-parallel 3", "--tensor-parallel 3 does not divide the model's 4 attention heads");
  expect_refused("m1-serve", m + " --tensor-parallel 2 --collectives peer", "--collectives peer is for --device cuda");
  expect_refused("m1-serve", m + " --mmap --tensor-parallel 2", "--mmap reads weights in place on --device cpu with one rank");
  expect_refused("m1-serve", " --port 0 --model " + (dir_ / "nowhere").string(), "nowhere: model directory not found");
  expect_refused("m1-serve", m + " --max-context 20000000", "more than the model's max_position_embeddings");
  expect_refused("m1-serve", m + " --max-context 2048 --max-state-mb 0.1", "cannot hold the state of one sequence");
  expect_refused("m1-serve", m + " --host 203.0.113.5", "cannot listen on 203.0.113.5");
  expect_refused("m1-serve", m + " --cache-mb -1", "--cache-mb");
  expect_refused("m1-serve", m + " --cache-dir " + dir_.string() + " --cache-mb 0", "--cache-dir needs the prefix cache");
  std::ofstream(dir_ / "a_file") << "x";
  expect_refused("m1-serve", m + " --cache-dir " + (dir_ / "a_file").string(), "a_file: cannot use as the cache directory");
}

// --quantize and its companions, on every tool that loads a model, and m1-quantize's own faults.
TEST_F(CliErrorTest, QuantizeOptionsAreChecked) {
  const std::string m = model("m").string();
  const std::vector<std::pair<std::string, std::string>> tools = {
      {"m1-generate", "--model " + m + " --prompt hi"},
      {"m1-serve", "--port 0 --model " + m},
      {"m1-bench", "--contexts 64 --decode-tokens 1 --repeats 1 --model " + m}};
  for (const auto& [tool, args] : tools) {
    SCOPED_TRACE(tool);
    expect_refused(tool, args + " --quantize int3", "--quantize: 'int3' is not a quantization m1 implements (expected int8 or int4)");
    expect_refused(tool, args + " --quantize int4 --group-size 48", "--quantize: group size 48 is not a positive multiple of 32");
    expect_refused(tool, args + " --quantize int8 --group-size 64", "int8 has one scale per output row");
    expect_refused(tool, args + " --group-size 64", "--group-size: applies to --quantize int4, and no --quantize was given");
    expect_refused(tool, args + " --quantize-lm-head", "--quantize-lm-head: needs --quantize int8 or int4");
  }
  const std::string tied = model("tied", "--set tie_word_embeddings=true").string();
  expect_refused("m1-generate", "--model " + tied + " --prompt hi --quantize int8 --quantize-lm-head",
                 "--quantize-lm-head: this model ties its LM head to the embeddings");

  const std::string out = (dir_ / "q").string();
  expect_refused("m1-quantize", "--model " + m + " --out " + out, "--quantize is required");
  expect_refused("m1-quantize", "--model " + m + " --out " + out + " --quantize int2", "--quantize: 'int2' is not a quantization");
  expect_refused("m1-quantize", "--model " + (dir_ / "nowhere").string() + " --out " + out + " --quantize int8",
                 "--model: " + (dir_ / "nowhere").string() + " is not a directory");
  expect_refused("m1-quantize", "--model " + m + " --out " + m + " --quantize int8", "--out: " + m + " is the input directory");
  expect_refused("m1-quantize", "--model " + m + " --out " + model("full").string() + " --quantize int8", "exists and is not empty");
  ASSERT_EQ(run_command(kBin + "/m1-quantize --model " + m + " --out " + out + " --quantize int8").status, 0);
  expect_refused("m1-quantize", "--model " + out + " --out " + (dir_ / "twice").string() + " --quantize int4",
                 "is already quantized (config.json has a compressed-tensors quantization_config)");
  expect_refused("m1-generate", "--model " + out + " --prompt hi --quantize int4", "--quantize: the checkpoint is already quantized");
}

TEST_F(CliErrorTest, ServeRefusesAPortInUse) {
  httplib::Server holder;
  const int port = holder.bind_to_any_port("127.0.0.1");
  ASSERT_GT(port, 0);
  expect_refused("m1-serve", "--port " + std::to_string(port) + " --model " + model("m").string(),
                 "cannot listen on 127.0.0.1:" + std::to_string(port));
}

}  // namespace
