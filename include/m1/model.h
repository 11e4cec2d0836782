#pragma once
// A MiniMax-M1 model bound to a backend: its weights, and the batched forward step.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <span>
#include <vector>

#include "m1/backend.h"
#include "m1/config.h"
#include "m1/quantize.h"
#include "m1/safetensors.h"
#include "m1/sharding.h"

namespace m1 {

struct WeightSpec;
class Lockstep;
class WeightLoader;

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
  ShardOptions shard;  // how a tensor-parallel group splits the model (ignored for one rank)
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

// The model on one backend, or split across the backends of a tensor-parallel group (one per
// rank, see m1/sharding.h). The engine sees one model either way: the ranks run each step in
// lockstep, each on a thread of its own, and meet in the backends' collectives.
class Model {
 public:
  // Reads DIR/config.json and the safetensors checkpoint, checks every tensor the config needs
  // (name, shape, dtype), and uploads the weights (each rank its own part of them, quantized at
  // load when `options` ask). Throws m1::Error naming the file at fault, or the dimension the
  // ranks do not divide.
  static std::unique_ptr<Model> load(const std::filesystem::path& dir, Backend& backend, const LoadOptions& options = {});
  static std::unique_ptr<Model> load(const std::filesystem::path& dir, std::span<Backend* const> ranks,
                                     const LoadOptions& options = {});
  Model(ModelConfig config, Checkpoint checkpoint, Backend& backend, const LoadOptions& options = {});
  // `ranks`: the group's backends in rank order (ranks[r]->device().rank == r).
  Model(ModelConfig config, Checkpoint checkpoint, std::span<Backend* const> ranks, const LoadOptions& options = {});
  ~Model();

  const ModelConfig& config() const { return config_; }
  // Rank 0's backend: a step's logits are there, and tokens are drawn there, once.
  Backend& backend() const;
  int ranks() const { return int(ranks_.size()); }
  const ShardPlan& plan() const { return plan_; }
  // The ranks' backends and the bytes of weights each holds (quantized codes and scales counted
  // as such), in rank order.
  std::vector<Backend*> rank_backends() const;
  std::vector<size_t> rank_weight_bytes() const;
  const Checkpoint& checkpoint() const { return checkpoint_; }
  // How the weights were loaded (quantized at load or not, the MoE split): part of what the
  // numbers depend on.
  const LoadOptions& load_options() const { return load_options_; }
  // What the numbers a sequence state holds depend on: rank 0's backend numerics, and the
  // group's size and MoE split when there are several ranks (a state of another N is foreign).
  std::string numerics() const;
  StateShape state_shape() const;
  std::unique_ptr<SequenceState> new_sequence() const;

  // Feeds every entry's tokens to its sequence in one batched step and advances the sequences.
  // Each state may appear once per step. A sequence's logits do not depend on the other entries.
  void forward(std::span<const BatchEntry> batch, StepLogits& out);

 private:
  struct Layer;
  struct Rank;
  void load_rank(Rank& rank, WeightLoader& loader);
  void attention(Rank& rank, const Layer& layer, int64_t index, const Mat& xn, Mat out);
  void mlp(Rank& rank, const Layer& layer, const Mat& xn, Mat out);
  void check_batch(std::span<const BatchEntry> batch) const;
  // One rank's whole step: begin_step, the calls, end_step (and the calls again if it asks).
  void rank_step(Rank& rank, int64_t n, int64_t m);
  void run_step(Rank& rank, int64_t n, int64_t m);
  // fn(rank) for every rank: on the caller's thread for one rank, else on the ranks' threads.
  void on_ranks(const std::function<void(Rank&)>& fn) const;

  ModelConfig config_;
  Checkpoint checkpoint_;  // keeps the mapped weights alive
  LoadOptions load_options_;
  ShardPlan plan_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::unique_ptr<Lockstep> lockstep_;  // the ranks' threads (none for one rank)
  // The step being run, shared by the ranks.
  std::vector<int32_t> tokens_;
  std::vector<int64_t> wanted_rows_;
  std::vector<int64_t> vocab_widths_;
};

// Bytes weight `spec` of `checkpoint` occupies once loaded with `options`: its codes and scales if
// it is (or will be) quantized, else its stored bytes.
uint64_t loaded_weight_bytes(const ModelConfig& config, const Checkpoint& checkpoint, const WeightSpec& spec,
                             const LoadOptions& options);

// Per-head lightning decay s of DESIGN.md §1 for `layer` of a model with `layers` layers.
std::vector<float> lightning_decay(int64_t heads, int64_t layer, int64_t layers);

}  // namespace m1
