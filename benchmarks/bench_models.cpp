#include "bench_models.h"

#include <algorithm>
#include <cmath>

#include "m1/synthetic.h"
#include "m1/weights.h"

namespace m1::bench {
namespace {

// The seed m1-mkmodel uses by default: a synthetic model here is the one it would write.
constexpr uint64_t kWeightSeed = 0;

// Through config.json and back, so a changed config meets every check a loaded one does.
ModelConfig validated(const ModelConfig& config, const std::string& source) {
  return parse_config(nlohmann::json::parse(config_to_json(config).dump()), source);
}

}  // namespace

const std::vector<std::string>& variant_names() {
  static const std::vector<std::string> names{"hybrid", "lightning", "softmax"};
  return names;
}

ModelConfig with_layers(const ModelConfig& base, int64_t layers) {
  ModelConfig c = base;
  c.num_hidden_layers = layers;
  c.attn_type_list = hybrid_attention(layers);
  return validated(c, "--layers");
}

ModelConfig variant_config(const ModelConfig& base, const std::string& variant) {
  if (variant == "hybrid") return base;
  ModelConfig c = base;
  std::fill(c.attn_type_list.begin(), c.attn_type_list.end(), variant == "softmax" ? 1 : 0);
  return validated(c, "variant " + variant);
}

VariantWeights checkpoint_or_random(const std::filesystem::path& dir, const ModelConfig& stored, const ModelConfig& config) {
  Checkpoint checkpoint = Checkpoint::open(dir);
  if (config.attn_type_list == stored.attn_type_list) return {std::move(checkpoint), false};
  return random_in_memory(config, checkpoint_dtype(checkpoint, stored));
}

VariantWeights random_in_memory(const ModelConfig& config, DType dtype) {
  return {random_checkpoint(config, dtype, kWeightSeed), true};
}

DType checkpoint_dtype(const Checkpoint& checkpoint, const ModelConfig& config) {
  const WeightSpec embed = weight_specs(config).front();
  return checkpoint.require(embed.name, embed.shape).weight_dtype();
}

uint64_t decode_weight_bytes(const ModelConfig& config, const Checkpoint& checkpoint, const LoadOptions& load,
                             int64_t batch) {
  uint64_t dense = 0, experts = 0;
  for (const WeightSpec& spec : weight_specs(config)) {
    const uint64_t bytes = loaded_weight_bytes(config, checkpoint, spec, load);
    if (spec.role == WeightRole::kEmbed && !config.tie_word_embeddings)
      dense += bytes / uint64_t(spec.shape.front()) * uint64_t(batch);
    else if (spec.expert >= 0)
      experts += bytes;
    else
      dense += bytes;
  }
  if (batch == 1) return dense + experts * uint64_t(config.num_experts_per_tok) / uint64_t(config.num_local_experts);
  const double untouched = std::pow(1.0 - double(config.num_experts_per_tok) / double(config.num_local_experts), double(batch));
  return dense + uint64_t(std::llround(double(experts) * (1.0 - untouched)));
}

}  // namespace m1::bench
