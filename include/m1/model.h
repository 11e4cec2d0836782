#pragma once
// A MiniMax-M1 model bound to a backend: its weights, and the batched forward step.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <span>
#include <vector>

#include "m1/backend.h"
#include "m1/config.h"
#include "m1/quantize.h"
#include "m1/safetensors.h"

namespace m1 {

struct WeightSpec;

// How a model holds its weights. With `quantize`, weights stored as BF16/F16/F32 are quantized
// while they load (one at a time: only the quantized copies stay in memory): every expert matrix
// (routed and shared) and the attention projections (qkv, output gate, out_proj; q, k, v, o). The
// embeddings, norms and router keep their stored type, and so does the LM head unless
// `quantize_lm_head`. A compressed-tensors checkpoint's packed weights are read in place, without
// options.
struct LoadOptions {
  std::optional<QuantScheme> quantize;
  bool quantize_lm_head = false;
  int threads = 0;  // quantizing threads; 0: one per core
};

// The LoadOptions of the tools' flags: --quantize TYPE ("" for none), --group-size N (0: the
// default), --quantize-lm-head. Throws m1::Error naming the flag at fault.
LoadOptions parse_load_options(const std::string& quantize, int64_t group_size, bool quantize_lm_head, int threads);

// Which positions of an entry's new tokens need logits.
enum class LogitsFor { kNone, kLast, kAll };

// One sequence's part of a step: its new tokens (a prefill chunk, or one token to decode).
struct BatchEntry {
  SequenceState* state = nullptr;
  std::span<const int32_t> tokens;
  LogitsFor logits = LogitsFor::kLast;
};

// The logits of one step: for each entry, one row per position it asked for. They stay on the
// backend's device (valid until the model's next forward), where Backend::sample draws from them;
// row() copies them to the host on first use.
class StepLogits {
 public:
  int64_t vocab() const { return vocab_; }
  int64_t rows(size_t entry) const { return first_row_[entry + 1] - first_row_[entry]; }
  // Where entry's rows start in device().
  int64_t first_row(size_t entry) const { return first_row_[entry]; }
  const Mat& device() const { return device_; }
  // Row i of entry's logits on the host (the last position for LogitsFor::kLast).
  std::span<float> row(size_t entry, int64_t i);

 private:
  friend class Model;
  Backend* backend_ = nullptr;
  Mat device_;
  int64_t vocab_ = 0;
  std::vector<int64_t> first_row_;
  std::vector<float> host_;
  bool on_host_ = false;
};

class Model {
 public:
  // Reads DIR/config.json and the safetensors checkpoint, checks every tensor the config needs
  // (name, shape, dtype), and uploads the weights. Throws m1::Error naming the file at fault.
  static std::unique_ptr<Model> load(const std::filesystem::path& dir, Backend& backend, const LoadOptions& options = {});
  Model(ModelConfig config, Checkpoint checkpoint, Backend& backend, const LoadOptions& options = {});
  ~Model();

  const ModelConfig& config() const { return config_; }
  Backend& backend() const { return backend_; }
  const Checkpoint& checkpoint() const { return checkpoint_; }
  // How the weights were loaded (quantized at load or not): part of what the numbers depend on.
  const LoadOptions& load_options() const { return load_options_; }
  StateShape state_shape() const;
  std::unique_ptr<SequenceState> new_sequence() const;

  // Feeds every entry's tokens to its sequence in one batched step and advances the sequences.
  // Each state may appear once per step. A sequence's logits do not depend on the other entries.
  void forward(std::span<const BatchEntry> batch, StepLogits& out);

 private:
  struct Layer;
  struct Workspace;
  Weight* slot(const WeightSpec& spec);
  void attention(const Layer& layer, int64_t index, std::span<const Segment> segments, const Mat& xn, Mat out);
  void mlp(const Layer& layer, const Mat& xn, Mat out);
  void check_batch(std::span<const BatchEntry> batch) const;
  void run_step(int64_t n, int64_t m);
  void reserve_workspace(int64_t rows, int64_t logit_rows);

  ModelConfig config_;
  Checkpoint checkpoint_;  // keeps the mapped weights alive
  LoadOptions load_options_;
  std::vector<QuantizedWeight> quantized_;  // quantized copies the backend reads in place
  Backend& backend_;
  Weight embed_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
  std::unique_ptr<Workspace> ws_;
};

// Bytes weight `spec` of `checkpoint` occupies once loaded with `options`: its codes and scales if
// it is (or will be) quantized, else its stored bytes.
uint64_t loaded_weight_bytes(const ModelConfig& config, const Checkpoint& checkpoint, const WeightSpec& spec,
                             const LoadOptions& options);

// Per-head lightning decay s of DESIGN.md §1 for `layer` of a model with `layers` layers.
std::vector<float> lightning_decay(int64_t heads, int64_t layer, int64_t layers);

}  // namespace m1
