// Tests of config.json parsing: the golden and real configs, the defaults, every validation error
// (an m1::Error, one line, naming the file and the field) and the config_to_json round trip.

#include "m1/config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <cstdlib>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "m1/error.h"
#include "test_support.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using m1::testing::expect_error;

const std::string kSourceDir = M1_SOURCE_DIR;
const std::string kSource = "under-test/config.json";  // the `source` every parse_config call names
constexpr double kAlpha = 3.5565588200778455;

// The smallest valid config: only the required fields (H = 16, h = 2, so d = 8).
json minimal_config() {
  return {{"architectures", json::array({"MiniMaxM1ForCausalLM"})},
          {"vocab_size", 32},
          {"hidden_size", 16},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 2},
          {"intermediate_size", 24},
          {"num_local_experts", 4},
          {"num_experts_per_tok", 2},
          {"attn_type_list", json::array({0, 1})}};
}

// minimal_config() with fields set (or replaced) by `changes`.
json config_with(const json& changes) {
  json j = minimal_config();
  j.update(changes);
  return j;
}

json config_without(const std::string& field) {
  json j = minimal_config();
  j.erase(field);
  return j;
}

m1::ModelConfig parse(const json& j) { return m1::parse_config(j, kSource); }

void expect_config_error(const json& j, const std::string& field) {
  expect_error([&] { parse(j); }, {kSource, field});
}

// A file in a fresh directory, removed with it.
class TempFile {
 public:
  explicit TempFile(const std::string& contents) {
    dir_ = fs::temp_directory_path() / ("m1-test-config-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    std::ofstream(path()) << contents;
  }
  ~TempFile() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  fs::path path() const { return dir_ / "config.json"; }

 private:
  fs::path dir_;
};

void expect_same_config(const m1::ModelConfig& a, const m1::ModelConfig& b) {
  EXPECT_EQ(a.architecture, b.architecture);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.rotary_dim, b.rotary_dim);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_local_experts, b.num_local_experts);
  EXPECT_EQ(a.num_experts_per_tok, b.num_experts_per_tok);
  EXPECT_EQ(a.shared_intermediate_size, b.shared_intermediate_size);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.postnorm, b.postnorm);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.linear_attention_alpha, b.linear_attention_alpha);
  EXPECT_EQ(a.linear_attention_beta, b.linear_attention_beta);
  EXPECT_EQ(a.full_attention_alpha, b.full_attention_alpha);
  EXPECT_EQ(a.full_attention_beta, b.full_attention_beta);
  EXPECT_EQ(a.mlp_alpha, b.mlp_alpha);
  EXPECT_EQ(a.mlp_beta, b.mlp_beta);
  EXPECT_EQ(a.attn_type_list, b.attn_type_list);
}

void expect_round_trip(const m1::ModelConfig& c) {
  json written = json::parse(m1::config_to_json(c).dump());
  expect_same_config(m1::parse_config(written, "round-trip"), c);
}

// The layernorm alpha/beta of the MiniMax-M1 family: alpha = 3.5565588200778455, beta = 1.
void expect_m1_layernorm_scales(const m1::ModelConfig& c) {
  EXPECT_EQ(c.linear_attention_alpha, kAlpha);
  EXPECT_EQ(c.full_attention_alpha, kAlpha);
  EXPECT_EQ(c.mlp_alpha, kAlpha);
  EXPECT_EQ(c.linear_attention_beta, 1.0);
  EXPECT_EQ(c.full_attention_beta, 1.0);
  EXPECT_EQ(c.mlp_beta, 1.0);
}

m1::ModelConfig tiny_bf16() { return m1::load_config(kSourceDir + "/tests/data/golden/tiny-bf16/config.json"); }
m1::ModelConfig odd_f32() { return m1::load_config(kSourceDir + "/tests/data/golden/odd-f32/config.json"); }
m1::ModelConfig real_m1() { return m1::load_config(kSourceDir + "/data/minimax-m1/config.json"); }

// ---- valid configs ----

TEST(ConfigGolden, TinyBf16ParsesWithItsValues) {
  m1::ModelConfig c = tiny_bf16();
  EXPECT_EQ(c.architecture, "MiniMaxM1ForCausalLM");
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_hidden_layers, 8);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.rotary_dim, 8);
  EXPECT_EQ(c.intermediate_size, 96);
  EXPECT_EQ(c.num_local_experts, 4);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.lightning_layers(), 7);
  EXPECT_EQ(c.softmax_layers(), 1);
  EXPECT_FALSE(c.is_lightning(7));
  EXPECT_EQ(c.kind_index(7), 0);
  EXPECT_EQ(c.kind_index(6), 6);
  EXPECT_TRUE(c.postnorm);
  EXPECT_EQ(c.rope_theta, 1e7);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.max_position_embeddings, 10240000);
  expect_m1_layernorm_scales(c);
}

TEST(ConfigGolden, OddF32ParsesWithItsValues) {
  m1::ModelConfig c = odd_f32();
  EXPECT_EQ(c.vocab_size, 700);
  EXPECT_EQ(c.hidden_size, 96);
  EXPECT_EQ(c.num_hidden_layers, 5);
  EXPECT_EQ(c.num_attention_heads, 6);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 24);
  EXPECT_EQ(c.rotary_dim, 12);
  EXPECT_EQ(c.intermediate_size, 80);
  EXPECT_EQ(c.num_local_experts, 6);
  EXPECT_EQ(c.num_experts_per_tok, 3);
  EXPECT_EQ(c.attn_type_list, (std::vector<int>{0, 1, 0, 0, 1}));
  EXPECT_EQ(c.lightning_layers(), 3);
  EXPECT_EQ(c.softmax_layers(), 2);
  EXPECT_EQ(c.kind_index(3), 2);
  EXPECT_EQ(c.kind_index(4), 1);
  expect_m1_layernorm_scales(c);
}

TEST(ConfigGolden, RealMiniMaxM1ParsesWithItsValues) {
  m1::ModelConfig c = real_m1();
  EXPECT_EQ(c.vocab_size, 200064);
  EXPECT_EQ(c.hidden_size, 6144);
  EXPECT_EQ(c.num_hidden_layers, 80);
  EXPECT_EQ(c.lightning_layers(), 70);
  EXPECT_EQ(c.softmax_layers(), 10);
  EXPECT_EQ(c.num_attention_heads, 64);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.rotary_dim, 64);
  EXPECT_EQ(c.intermediate_size, 9216);
  EXPECT_EQ(c.num_local_experts, 32);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_FALSE(c.is_lightning(15));
  EXPECT_EQ(c.kind_index(15), 1);   // the second softmax layer
  EXPECT_EQ(c.kind_index(16), 14);  // lightning layers 0-6 and 8-14 come before it
  EXPECT_EQ(c.kind_index(79), 9);
  EXPECT_TRUE(c.postnorm);
  EXPECT_FALSE(c.tie_word_embeddings);
  expect_m1_layernorm_scales(c);
}

TEST(ConfigDefaults, OptionalFieldsAbsentTakeTheDocumentedDefaults) {
  m1::ModelConfig c = parse(minimal_config());
  EXPECT_EQ(c.head_dim, 8);  // H / h
  EXPECT_EQ(c.rotary_dim, 8);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.shared_intermediate_size, 0);
  EXPECT_EQ(c.max_position_embeddings, 4096 * 32);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_FALSE(c.postnorm);
  EXPECT_FALSE(c.tie_word_embeddings);
  for (double scale : {c.linear_attention_alpha, c.linear_attention_beta, c.full_attention_alpha,
                       c.full_attention_beta, c.mlp_alpha, c.mlp_beta})
    EXPECT_EQ(scale, 1.0);
}

TEST(ConfigDefaults, NullFieldsCountAsAbsent) {
  m1::ModelConfig c = parse(config_with({{"head_dim", nullptr}, {"postnorm", nullptr}, {"rope_theta", nullptr}}));
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_FALSE(c.postnorm);
  EXPECT_EQ(c.rope_theta, 1e6);
}

TEST(ConfigValid, TextO1ArchitectureIsAccepted) {
  json j = config_with({{"architectures", json::array({"MiniMaxText01ForCausalLM"})}});
  EXPECT_EQ(parse(j).architecture, "MiniMaxText01ForCausalLM");
}

TEST(ConfigValid, ExplicitHeadDimNeedNotDivideHiddenSize) {
  m1::ModelConfig c = parse(config_with({{"hidden_size", 18}, {"head_dim", 6}}));
  EXPECT_EQ(c.head_dim, 6);
  EXPECT_EQ(c.rotary_dim, 6);
}

TEST(ConfigValid, SharedExpertWithSigmoidModeIsAccepted) {
  m1::ModelConfig c = parse(config_with({{"shared_intermediate_size", 8}, {"shared_moe_mode", "sigmoid"}}));
  EXPECT_EQ(c.shared_intermediate_size, 8);
}

// ---- invalid configs: each names the source and the field at fault ----

struct BadConfig {
  std::string name;   // the test's name
  json config;
  std::string field;  // what the message must name
};

void PrintTo(const BadConfig& c, std::ostream* os) { *os << c.name; }

class ConfigError : public ::testing::TestWithParam<BadConfig> {};

TEST_P(ConfigError, NamesSourceAndField) { expect_config_error(GetParam().config, GetParam().field); }

std::vector<BadConfig> missing_required_fields() {
  std::vector<BadConfig> cases;
  for (const char* field : {"architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "intermediate_size", "num_local_experts", "num_experts_per_tok", "attn_type_list"})
    cases.push_back({std::string("Missing_") + field, config_without(field), field});
  return cases;
}

std::vector<BadConfig> bad_values() {
  const json huge = int64_t(1) << 40;
  const json beyond_int64 = std::numeric_limits<uint64_t>::max();
  return {
      {"ArchitectureUnknown", config_with({{"architectures", json::array({"LlamaForCausalLM"})}}), "LlamaForCausalLM"},
      {"ArchitecturesNotAList", config_with({{"architectures", "MiniMaxM1ForCausalLM"}}), "architectures"},
      {"ArchitecturesEmptyList", config_with({{"architectures", json::array()}}), "architectures"},
      {"ArchitecturesNameNotString", config_with({{"architectures", json::array({7})}}), "architectures"},
      {"HiddenSizeString", config_with({{"hidden_size", "64"}}), "hidden_size"},
      {"HiddenSizeFloat", config_with({{"hidden_size", 64.5}}), "hidden_size"},
      {"HiddenSizeBool", config_with({{"hidden_size", true}}), "hidden_size"},
      {"HiddenSizeNegative", config_with({{"hidden_size", -64}}), "hidden_size"},
      {"HiddenSizeZero", config_with({{"hidden_size", 0}}), "hidden_size"},
      {"HiddenSizeHuge", config_with({{"hidden_size", huge}}), "hidden_size"},
      {"HiddenSizeBeyondInt64", config_with({{"hidden_size", beyond_int64}}), "hidden_size"},
      {"VocabSizeZero", config_with({{"vocab_size", 0}}), "vocab_size"},
      {"IntermediateSizeHuge", config_with({{"intermediate_size", huge}}), "intermediate_size"},
      {"NumAttentionHeadsZero", config_with({{"num_attention_heads", 0}}), "num_attention_heads"},
      {"NumLocalExpertsNegative", config_with({{"num_local_experts", -4}}), "num_local_experts"},
      {"NumHiddenLayersString", config_with({{"num_hidden_layers", "2"}}), "num_hidden_layers"},
      {"OneLayer", config_with({{"num_hidden_layers", 1}, {"attn_type_list", json::array({0})}}), "num_hidden_layers"},
      {"AttnTypeListShorterThanLayers", config_with({{"attn_type_list", json::array({0})}}), "attn_type_list"},
      {"AttnTypeListLongerThanLayers", config_with({{"attn_type_list", json::array({0, 1, 0})}}), "attn_type_list"},
      {"AttnTypeListNotAList", config_with({{"attn_type_list", "01"}}), "attn_type_list"},
      {"AttnTypeEntryTwo", config_with({{"attn_type_list", json::array({0, 2})}}), "attn_type_list[1]"},
      {"AttnTypeEntryString", config_with({{"attn_type_list", json::array({"x", 1})}}), "attn_type_list[0]"},
      {"AttnTypeEntryFloat", config_with({{"attn_type_list", json::array({0, 1.0})}}), "attn_type_list[1]"},
      {"AttnTypeEntryNegative", config_with({{"attn_type_list", json::array({-1, 1})}}), "attn_type_list[0]"},
      {"HeadsNotDivisibleByKvHeads", config_with({{"num_attention_heads", 4}, {"num_key_value_heads", 3}}),
       "num_key_value_heads"},
      {"KvHeadsZero", config_with({{"num_key_value_heads", 0}}), "num_key_value_heads"},
      {"ExpertsPerTokenMoreThanExperts", config_with({{"num_experts_per_tok", 5}}), "num_experts_per_tok"},
      {"HeadDimAbsentAndHiddenNotMultipleOfHeads", config_with({{"hidden_size", 18}, {"num_attention_heads", 4}}),
       "head_dim"},
      {"HeadDimZero", config_with({{"head_dim", 0}}), "head_dim"},
      {"HeadsTimesHeadDimHuge", config_with({{"num_attention_heads", 65536}, {"num_key_value_heads", 1},
                                             {"head_dim", 65536}}),
       "head_dim"},
      {"RotaryDimOdd", config_with({{"rotary_dim", 3}}), "rotary_dim"},
      {"RotaryDimAboveHeadDim", config_with({{"rotary_dim", 10}}), "rotary_dim"},
      {"RotaryDimZero", config_with({{"rotary_dim", 0}}), "rotary_dim"},
      {"HiddenActGelu", config_with({{"hidden_act", "gelu"}}), "hidden_act"},
      {"HiddenActNotString", config_with({{"hidden_act", 1}}), "hidden_act"},
      {"RmsNormEpsZero", config_with({{"rms_norm_eps", 0}}), "rms_norm_eps"},
      {"RmsNormEpsNegative", config_with({{"rms_norm_eps", -1e-5}}), "rms_norm_eps"},
      {"RmsNormEpsString", config_with({{"rms_norm_eps", "1e-5"}}), "rms_norm_eps"},
      {"RopeThetaZero", config_with({{"rope_theta", 0}}), "rope_theta"},
      {"PostnormString", config_with({{"postnorm", "yes"}}), "postnorm"},
      {"PostnormInteger", config_with({{"postnorm", 1}}), "postnorm"},
      {"TieWordEmbeddingsString", config_with({{"tie_word_embeddings", "false"}}), "tie_word_embeddings"},
      {"LayernormAlphaString", config_with({{"layernorm_mlp_alpha", "3.5"}}), "layernorm_mlp_alpha"},
      {"SharedExpertWithSoftmaxMode", config_with({{"shared_intermediate_size", 8}, {"shared_moe_mode", "softmax"}}),
       "shared_moe_mode"},
      {"SharedIntermediateSizeNegative", config_with({{"shared_intermediate_size", -1}}), "shared_intermediate_size"},
      {"MaxPositionEmbeddingsZero", config_with({{"max_position_embeddings", 0}}), "max_position_embeddings"},
      // Names from the file are quoted with escapes, so a newline in one keeps the message on one line.
      {"ArchitectureNameWithNewline", config_with({{"architectures", json::array({"Llama\nForCausalLM"})}}),
       "architectures"},
      {"HiddenActWithNewline", config_with({{"hidden_act", "ge\nlu"}}), "hidden_act"},
  };
}

std::string case_name(const ::testing::TestParamInfo<BadConfig>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(MissingField, ConfigError, ::testing::ValuesIn(missing_required_fields()), case_name);
INSTANTIATE_TEST_SUITE_P(BadValue, ConfigError, ::testing::ValuesIn(bad_values()), case_name);

TEST(ConfigErrorShape, NotAJsonObject) {
  for (const json& j : {json::array({1, 2}), json("config"), json(42), json()})
    expect_error([&] { parse(j); }, {kSource, "object"});
}

// Printing a deeply nested value recursively would overflow the stack; errors describe containers
// by kind instead. Run in a child process so a crash fails only this test.
TEST(ConfigErrorShapeDeathTest, DeeplyNestedValueGivesAnErrorNotACrash) {
  const size_t depth = 1000000;
  json j = minimal_config();
  j["hidden_size"] = json::parse(std::string(depth, '[') + std::string(depth, ']'));  // moved, never copied
  EXPECT_EXIT(
      {
        try {
          parse(j);
        } catch (const m1::Error&) {
          std::exit(0);
        }
        std::exit(1);
      },
      ::testing::ExitedWithCode(0), "");
}

// ---- load_config ----

TEST(LoadConfig, MissingFileNamesThePath) {
  fs::path path = fs::temp_directory_path() / "m1-test-config-no-such-dir" / "config.json";
  expect_error([&] { m1::load_config(path); }, {path.string()});
}

TEST(LoadConfig, FileThatIsNotJsonNamesThePath) {
  TempFile file("{\"vocab_size\": 32,");
  expect_error([&] { m1::load_config(file.path()); }, {file.path().string(), "JSON"});
}

TEST(LoadConfig, InvalidFieldNamesThePathAndField) {
  TempFile file(config_with({{"rotary_dim", 5}}).dump());
  expect_error([&] { m1::load_config(file.path()); }, {file.path().string(), "rotary_dim"});
}

TEST(LoadConfig, ValidFileParses) {
  TempFile file(minimal_config().dump(2));
  EXPECT_EQ(m1::load_config(file.path()).hidden_size, 16);
}

// ---- config_to_json ----

TEST(ConfigToJson, GoldenConfigsRoundTrip) {
  expect_round_trip(tiny_bf16());
  expect_round_trip(odd_f32());
  expect_round_trip(real_m1());
}

TEST(ConfigToJson, NonDefaultValuesRoundTrip) {
  expect_round_trip(parse(config_with({{"architectures", json::array({"MiniMaxText01ForCausalLM"})},
                                       {"shared_intermediate_size", 8},
                                       {"tie_word_embeddings", true},
                                       {"rms_norm_eps", 1.234567890123e-6},
                                       {"layernorm_linear_attention_beta", -0.1}})));
}

TEST(ConfigToJson, WritesTheHuggingFaceFieldNames) {
  nlohmann::ordered_json j = m1::config_to_json(tiny_bf16());
  EXPECT_EQ(j["architectures"], json::array({"MiniMaxM1ForCausalLM"}));
  EXPECT_EQ(j["model_type"], "minimax_m1");
  EXPECT_EQ(j["head_dim"], 16);
  EXPECT_EQ(j["layernorm_mlp_alpha"], kAlpha);
}

}  // namespace
