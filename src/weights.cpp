#include "m1/weights.h"

#include <fmt/format.h>

#include "m1/backend.h"

namespace m1 {

std::vector<WeightSpec> weight_specs(const ModelConfig& c) {
  const int64_t H = c.hidden_size, F = c.intermediate_size;
  const int64_t hd = c.num_attention_heads * c.head_dim, gd = c.num_key_value_heads * c.head_dim;
  std::vector<WeightSpec> specs;
  using R = WeightRole;
  auto add = [&](std::string name, std::vector<int64_t> shape, WeightRole role, int64_t layer = -1, int64_t expert = -1) {
    specs.push_back(WeightSpec{std::move(name), std::move(shape), role, layer, expert});
  };
  add("model.embed_tokens.weight", {c.vocab_size, H}, R::kEmbed);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    add(p + "input_layernorm.weight", {H}, R::kInputNorm, l);
    if (c.is_lightning(l)) {
      add(p + "self_attn.qkv_proj.weight", {3 * hd, H}, R::kQkv, l);
      add(p + "self_attn.output_gate.weight", {hd, H}, R::kOutputGate, l);
      add(p + "self_attn.norm.weight", {hd}, R::kAttnNorm, l);
      add(p + "self_attn.out_proj.weight", {H, hd}, R::kOutProj, l);
    } else {
      add(p + "self_attn.q_proj.weight", {hd, H}, R::kQ, l);
      add(p + "self_attn.k_proj.weight", {gd, H}, R::kK, l);
      add(p + "self_attn.v_proj.weight", {gd, H}, R::kV, l);
      add(p + "self_attn.o_proj.weight", {H, hd}, R::kO, l);
    }
    add(p + "post_attention_layernorm.weight", {H}, R::kPostNorm, l);
    add(p + "block_sparse_moe.gate.weight", {c.num_local_experts, H}, R::kRouter, l);
    for (int64_t e = 0; e < c.num_local_experts; ++e) {
      const std::string ep = fmt::format("{}block_sparse_moe.experts.{}.", p, e);
      add(ep + "w1.weight", {F, H}, R::kW1, l, e);
      add(ep + "w2.weight", {H, F}, R::kW2, l, e);
      add(ep + "w3.weight", {F, H}, R::kW3, l, e);
    }
    if (c.shared_intermediate_size > 0) {
      add(p + "shared_mlp.gate_proj.weight", {F, H}, R::kSharedGate, l);
      add(p + "shared_mlp.up_proj.weight", {F, H}, R::kSharedUp, l);
      add(p + "shared_mlp.down_proj.weight", {H, F}, R::kSharedDown, l);
      add(p + "coefficient.weight", {1, H}, R::kCoefficient, l);
    }
  }
  add("model.norm.weight", {H}, R::kFinalNorm);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, H}, R::kLmHead);
  return specs;
}

bool is_norm(WeightRole role) {
  return role == WeightRole::kFinalNorm || role == WeightRole::kInputNorm || role == WeightRole::kPostNorm ||
         role == WeightRole::kAttnNorm;
}

bool quantized_by_default(WeightRole role, bool lm_head) {
  using R = WeightRole;
  switch (role) {
    case R::kQkv: case R::kOutputGate: case R::kOutProj:
    case R::kQ: case R::kK: case R::kV: case R::kO:
    case R::kW1: case R::kW2: case R::kW3:
    case R::kSharedGate: case R::kSharedUp: case R::kSharedDown:
      return true;
    case R::kLmHead:
      return lm_head;
    default:
      return false;
  }
}

std::string module_name(const WeightSpec& spec) {
  constexpr std::string_view kSuffix = ".weight";
  const std::string& n = spec.name;
  return n.size() > kSuffix.size() && n.ends_with(kSuffix) ? n.substr(0, n.size() - kSuffix.size()) : n;
}

Weight host_weight(const TensorView& t) {
  return Weight{t.data, t.weight_dtype(), t.shape.size() == 2 ? t.shape[0] : 1, t.shape.empty() ? 1 : t.shape.back()};
}

}  // namespace m1
