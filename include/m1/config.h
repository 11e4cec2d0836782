#pragma once
// config.json of a MiniMax-M1 / MiniMax-Text-01 checkpoint: the hyper-parameters of DESIGN.md §1
// with their defaults, validated once so the rest of the engine can trust them.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "m1/quantization_config.h"

namespace m1 {

struct ModelConfig {
  std::string architecture;  // MiniMaxM1ForCausalLM or MiniMaxText01ForCausalLM
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;           // H
  int64_t num_hidden_layers = 0;     // L
  int64_t num_attention_heads = 0;   // h
  int64_t num_key_value_heads = 0;   // g (default h)
  int64_t head_dim = 0;              // d (default H / h)
  int64_t rotary_dim = 0;            // r (default d)
  int64_t intermediate_size = 0;     // F
  int64_t num_local_experts = 0;     // E
  int64_t num_experts_per_tok = 0;   // k
  int64_t shared_intermediate_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-5;
  double rope_theta = 1e6;
  bool postnorm = false;
  bool tie_word_embeddings = false;
  double linear_attention_alpha = 1, linear_attention_beta = 1;  // layernorm_linear_attention_*
  double full_attention_alpha = 1, full_attention_beta = 1;      // layernorm_full_attention_*
  double mlp_alpha = 1, mlp_beta = 1;                            // layernorm_mlp_*
  std::vector<int> attn_type_list;  // per layer: 0 lightning, 1 softmax
  // A compressed-tensors checkpoint's quantization_config (its packed weights are read in place).
  std::optional<QuantizationConfig> quantization;

  bool is_lightning(int64_t layer) const { return attn_type_list[size_t(layer)] == 0; }
  int64_t lightning_layers() const;
  int64_t softmax_layers() const;
  // Index of `layer` among the layers of its own kind (its slot in the sequence state).
  int64_t kind_index(int64_t layer) const;
};

// `source` names the file in error messages. Throws m1::Error on the first invalid field.
ModelConfig parse_config(const nlohmann::json& json, const std::string& source);
ModelConfig load_config(const std::filesystem::path& config_json);
// The config.json a Hugging Face checkpoint carries for these values (m1-mkmodel writes it).
nlohmann::ordered_json config_to_json(const ModelConfig& config);

}  // namespace m1
