#pragma once
// The checkpoint layout of a MiniMax-M1 model: the name, shape and role of every tensor a config
// needs, in one place, for the loader and for m1-mkmodel.

#include <cstdint>
#include <string>
#include <vector>

#include "m1/config.h"

namespace m1 {

enum class WeightRole {
  kEmbed, kFinalNorm, kLmHead,
  kInputNorm, kPostNorm,
  kQkv, kOutputGate, kOutProj, kAttnNorm,  // lightning attention
  kQ, kK, kV, kO,                          // softmax attention
  kRouter, kW1, kW2, kW3,                  // experts: gate, down, up
  kSharedGate, kSharedUp, kSharedDown, kCoefficient,
};

struct WeightSpec {
  std::string name;
  std::vector<int64_t> shape;
  WeightRole role;
  int64_t layer = -1, expert = -1;
};

// In checkpoint order. The LM head is absent when embeddings are tied.
std::vector<WeightSpec> weight_specs(const ModelConfig& config);

bool is_norm(WeightRole role);

// Whether --quantize quantizes a weight of this role: the expert matrices (routed and shared) and
// the attention projections; the LM head only when asked (`lm_head`). Embeddings, norms, the
// router and the shared-expert coefficient keep their stored type.
bool quantized_by_default(WeightRole role, bool lm_head);
// The module a weight belongs to: its name without ".weight" (compressed-tensors' tensor prefix).
std::string module_name(const WeightSpec& spec);

}  // namespace m1
