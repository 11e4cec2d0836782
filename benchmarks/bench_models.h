#pragma once
// The models m1-bench compares: one set of dimensions with the model's own attention pattern
// (hybrid), or with every layer lightning, or every layer softmax; and where their weights come from.

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "m1/config.h"
#include "m1/dtype.h"
#include "m1/model.h"
#include "m1/safetensors.h"

namespace m1::bench {

const std::vector<std::string>& variant_names();  // hybrid, lightning, softmax

// `base` with `layers` layers in the real model's hybrid pattern, validated.
ModelConfig with_layers(const ModelConfig& base, int64_t layers);
// `base` with the attention pattern of a variant of variant_names(), validated.
ModelConfig variant_config(const ModelConfig& base, const std::string& variant);

struct VariantWeights {
  Checkpoint checkpoint;
  bool random = false;  // the checkpoint lacks this variant's attention tensors: random weights
};

// The checkpoint in `dir` when it has what `config` needs (same attention pattern as `stored`),
// else random weights of the checkpoint's dtype, built in memory.
VariantWeights checkpoint_or_random(const std::filesystem::path& dir, const ModelConfig& stored, const ModelConfig& config);
// Random weights of `dtype`, built in memory.
VariantWeights random_in_memory(const ModelConfig& config, DType dtype);

// The stored dtype of the model's embedding table (the checkpoint's dtype, for practical purposes).
DType checkpoint_dtype(const Checkpoint& checkpoint, const ModelConfig& config);

// Bytes of weights one decode step of `batch` sequences reads: every non-expert weight (of the
// embedding table only the rows of the step's tokens, unless it doubles as the LM head), the
// router, and of each layer's E experts those some token picked: top_k at batch 1, in expectation
// E (1 - (1 - top_k / E)^batch) when each token picks its top_k uniformly (so 27.8 of 32 at batch
// 32, top-2). Quantized weights count their codes and scales as loaded with `load`.
uint64_t decode_weight_bytes(const ModelConfig& config, const Checkpoint& checkpoint, const LoadOptions& load,
                             int64_t batch = 1);

}  // namespace m1::bench
