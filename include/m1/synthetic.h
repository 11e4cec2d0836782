#pragma once
// Random models for tests, demos and benchmarks: the named shape presets and deterministic
// random weights scaled so activations stay O(1) through depth.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "m1/config.h"
#include "m1/dtype.h"
#include "m1/safetensors.h"
#include "m1/weights.h"

namespace m1 {

struct Preset {
  std::string name;
  ModelConfig config;
  // Merges of the real tokenizer to keep (vocabulary = 256 bytes + merges + 64 added tokens);
  // -1 keeps the whole tokenizer (vocabulary 200,064).
  int64_t tokenizer_merges = -1;
};

// tiny (unit tests), demo (quick start), bench (CPU benchmarks), m1 (the real model's shape;
// choose its depth with with_layers). Throws m1::Error for an unknown name.
Preset preset(const std::string& name);
std::vector<std::string> preset_names();

// The real model's pattern: every 8th layer softmax; a model of fewer than 8 layers gets its last
// layer softmax so both kinds are present.
std::vector<int> hybrid_attention(int64_t layers);

// Fills `out` with tensor `spec` in `dtype`: norms near 1, embeddings N(0, 1), matrices
// N(0, 1/fan_in). Depends only on (seed, spec.name), whatever the thread count.
void fill_random_weight(const WeightSpec& spec, DType dtype, uint64_t seed, std::span<std::byte> out);

// Every tensor `config` needs, stored as `dtype`, in checkpoint order.
std::vector<TensorSpec> checkpoint_tensors(const ModelConfig& config, DType dtype);
// Fills any tensor of checkpoint_tensors(config, dtype) with its random values.
TensorFiller random_weights(const ModelConfig& config, DType dtype, uint64_t seed);
// The same weights m1-mkmodel writes for this seed, held in memory instead of on disk.
Checkpoint random_checkpoint(const ModelConfig& config, DType dtype, uint64_t seed);

}  // namespace m1
