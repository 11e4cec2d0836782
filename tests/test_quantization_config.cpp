// compressed-tensors quantization_config: what llm-compressor writes parses, every scheme m1 does
// not implement is refused naming its field, and targets pick a module's group as
// compressed-tensors does.

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "m1/config.h"
#include "m1/quantization_config.h"
#include "test_support.h"

namespace m1 {
namespace {

using nlohmann::json;
using testing::expect_error;

const std::string kSource = "under-test/config.json";

// What llm-compressor writes for W4A16 (group 128), lm_head ignored.
json llm_compressor_w4a16() {
  return json::parse(R"({
    "config_groups": {"group_0": {
      "input_activations": null, "output_activations": null, "targets": ["Linear"],
      "weights": {"actorder": null, "block_structure": null, "dynamic": false, "group_size": 128, "num_bits": 4,
                  "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": true, "type": "int"}}},
    "format": "pack-quantized", "global_compression_ratio": 1.9, "ignore": ["lm_head"], "kv_cache_scheme": null,
    "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {}, "version": "0.9.1"})");
}

QuantizationConfig parse(const json& q) { return parse_quantization_config(q, kSource); }

TEST(QuantizationConfigTest, ParsesWhatLlmCompressorWrites) {
  const QuantizationConfig c = parse(llm_compressor_w4a16());
  ASSERT_EQ(c.groups.size(), 1u);
  EXPECT_EQ(c.groups[0].name, "group_0");
  EXPECT_EQ(c.groups[0].num_bits, 4);
  EXPECT_EQ(c.groups[0].group_size, 128);
  EXPECT_EQ(c.ignore, std::vector<std::string>{"lm_head"});
  json channel = llm_compressor_w4a16();
  channel["config_groups"]["group_0"]["weights"].update({{"num_bits", 8}, {"strategy", "channel"}, {"group_size", nullptr}});
  const QuantizationConfig c8 = parse(channel);
  EXPECT_EQ(c8.groups[0].num_bits, 8);
  EXPECT_EQ(c8.groups[0].group_size, 0);
}

// Within config.json, and back through config_to_json.
TEST(QuantizationConfigTest, RoundTripsThroughConfigJson) {
  json config = json::parse(testing::read_file(M1_SOURCE_DIR "/tests/data/golden/tiny-bf16/config.json"));
  config["quantization_config"] = llm_compressor_w4a16();
  const ModelConfig c = parse_config(config, kSource);
  ASSERT_TRUE(c.quantization);
  const nlohmann::ordered_json written = config_to_json(c);
  const ModelConfig again = parse_config(json::parse(written.dump()), "written");
  ASSERT_TRUE(again.quantization);
  EXPECT_EQ(config_to_json(again), written);
  EXPECT_EQ(written["quantization_config"]["format"], "pack-quantized");
  EXPECT_EQ(written["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"], 128);
}

TEST(QuantizationConfigTest, TargetsChooseTheGroup) {
  json q = llm_compressor_w4a16();
  q["config_groups"]["attention"] = q["config_groups"]["group_0"];
  q["config_groups"]["attention"]["targets"] = {"re:.*self_attn\\..*"};
  q["config_groups"]["attention"]["weights"].update({{"num_bits", 8}, {"strategy", "channel"}});
  q["config_groups"]["one"] = q["config_groups"]["attention"];
  q["config_groups"]["one"]["targets"] = {"model.layers.3.self_attn.q_proj"};
  const QuantizationConfig c = parse(q);
  EXPECT_EQ(find_group(c, "model.layers.0.self_attn.qkv_proj")->name, "attention");            // a regex beats "Linear"
  EXPECT_EQ(find_group(c, "model.layers.3.self_attn.q_proj")->name, "one");                     // a name beats a regex
  EXPECT_EQ(find_group(c, "model.layers.0.block_sparse_moe.experts.1.w2")->name, "group_0");    // "Linear"
  q["config_groups"].erase("group_0");
  EXPECT_EQ(find_group(parse(q), "lm_head"), nullptr);
  // Matched from the start of the name, as Python's re.match.
  q["config_groups"]["attention"]["targets"] = {"re:self_attn"};
  EXPECT_EQ(find_group(parse(q), "model.layers.0.self_attn.qkv_proj"), nullptr);
}

// A pathological regular expression is bounded: an error, not a hang.
TEST(QuantizationConfigTest, CostlyTargetIsAnError) {
  json q = llm_compressor_w4a16();
  q["config_groups"]["group_0"]["targets"] = {"re:(\\w+\\s?)*$"};
  const QuantizationConfig c = parse(q);
  expect_error([&] { find_group(c, std::string(40, 'a') + "!"); }, {"target", "cannot be matched"});
}

struct BadQuantization {
  std::string name;
  std::function<void(json&)> change;
  std::string field;  // what the message must name
};

void PrintTo(const BadQuantization& c, std::ostream* os) { *os << c.name; }

class QuantizationConfigError : public ::testing::TestWithParam<BadQuantization> {};

TEST_P(QuantizationConfigError, NamesTheField) {
  json config = json::parse(testing::read_file(M1_SOURCE_DIR "/tests/data/golden/tiny-bf16/config.json"));
  json q = llm_compressor_w4a16();
  GetParam().change(q);
  config["quantization_config"] = q;
  expect_error([&] { parse_config(config, kSource); }, {kSource, GetParam().field});
}

std::vector<BadQuantization> bad_quantizations() {
  auto weights = [](json changes) { return [changes](json& q) { q["config_groups"]["group_0"]["weights"].update(changes); }; };
  auto top = [](json changes) { return [changes](json& q) { q.update(changes); }; };
  const std::string w = "quantization_config.config_groups.group_0.weights.";
  return {
      {"QuantMethodFp8", top({{"quant_method", "fp8"}}), "quantization_config.quant_method: \"fp8\" is not implemented"},
      {"QuantMethodAwq", top({{"quant_method", "awq"}}), "quantization_config.quant_method: \"awq\" is not implemented"},
      {"QuantMethodMissing", [](json& q) { q.erase("quant_method"); }, "quantization_config.quant_method: missing"},
      {"FormatFloatQuantized", top({{"format", "float-quantized"}}), "quantization_config.format: \"float-quantized\" is not implemented"},
      {"FormatIntQuantized", top({{"format", "int-quantized"}}), "quantization_config.format"},
      {"FormatMarlin24", top({{"format", "marlin-24"}}), "quantization_config.format"},
      {"NotFinallyCompressed", top({{"quantization_status", "frozen"}}), "quantization_config.quantization_status"},
      {"KvCacheScheme", top({{"kv_cache_scheme", {{"num_bits", 8}}}}), "quantization_config.kv_cache_scheme"},
      {"Sparse24", top({{"sparsity_config", {{"format", "sparse-24-bitmask"}}}}), "quantization_config.sparsity_config"},
      {"Transforms", top({{"transform_config", {{"config_groups", json::object()}}}}), "quantization_config.transform_config"},
      {"NoGroups", top({{"config_groups", json::object()}}), "quantization_config.config_groups: missing or empty"},
      {"TwoBits", weights({{"num_bits", 2}}), w + "num_bits: 2 is not implemented"},
      {"ThreeBits", weights({{"num_bits", 3}}), w + "num_bits: 3 is not implemented"},
      {"Fp8Weights", weights({{"type", "float"}, {"num_bits", 8}}), w + "type: \"float\" is not implemented"},
      {"ZeroPoints", weights({{"symmetric", false}}), w + "symmetric: false (zero points) is not implemented"},
      {"ActOrderGroup", weights({{"actorder", "group"}}), w + "actorder: \"group\" (g_idx activation ordering) is not implemented"},
      {"ActOrderTrue", weights({{"actorder", true}}), w + "actorder"},
      {"DynamicWeights", weights({{"dynamic", true}}), w + "dynamic"},
      {"TensorStrategy", weights({{"strategy", "tensor"}}), w + "strategy: \"tensor\" is not implemented"},
      {"BlockStrategy", weights({{"strategy", "block"}, {"block_structure", {128, 128}}}), w + "block_structure"},
      {"GroupSize16", weights({{"group_size", 16}}), w + "group_size: 16 is not implemented"},
      {"GroupSizeMissing", weights({{"group_size", nullptr}}), w + "group_size: null is not a group size"},
      {"GroupSizeNegative", weights({{"group_size", -1}}), w + "group_size"},
      {"ActivationsQuantized", [](json& q) { q["config_groups"]["group_0"]["input_activations"] = {{"num_bits", 8}}; },
       "quantization_config.config_groups.group_0.input_activations: an object (activation quantization"},
      {"NoWeights", [](json& q) { q["config_groups"]["group_0"]["weights"] = nullptr; }, "group_0.weights: missing"},
      {"NoTargets", [](json& q) { q["config_groups"]["group_0"].erase("targets"); }, "group_0.targets: missing"},
      {"TargetsNotStrings", [](json& q) { q["config_groups"]["group_0"]["targets"] = {1}; }, "group_0.targets: must be a list of strings"},
      {"TargetBadRegex", [](json& q) { q["config_groups"]["group_0"]["targets"] = {"Linear", "re:(unclosed"}; },
       "group_0.targets[1]: \"re:(unclosed\" is not a regular expression"},
      {"IgnoreBadRegex", top({{"ignore", {"re:[z-a]"}}}), "quantization_config.ignore[0]"},
      {"NotAnObject", [](json& q) { q = json::array({1}); }, "quantization_config must be an object"},
  };
}

INSTANTIATE_TEST_SUITE_P(Unimplemented, QuantizationConfigError, ::testing::ValuesIn(bad_quantizations()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace m1
