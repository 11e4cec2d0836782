#pragma once
// Where each weight of a model comes from: the checkpoint's tensor as stored, the packed tensors of
// a compressed-tensors checkpoint (both read in place), or a quantized copy made while loading (the
// source's pages given back at once, so only the quantized copies stay in memory). Reports its
// progress on stderr while it quantizes. With tensor parallelism each rank loads its own slice of
// each weight (m1/sharding.h), on its own thread: the loader may be called from several at once.

#include <chrono>
#include <mutex>
#include <cstdint>
#include <set>
#include <string>

#include "m1/config.h"
#include "m1/model.h"
#include "m1/quantize.h"
#include "m1/safetensors.h"
#include "m1/sharding.h"
#include "m1/weights.h"

namespace m1 {

class WeightLoader {
 public:
  // `ranks`: how many ranks will load a slice of each weight (for the progress count).
  WeightLoader(const ModelConfig& config, const Checkpoint& checkpoint, const LoadOptions& options, int ranks = 1);

  struct Loaded {
    Weight host;             // what to upload
    QuantizedWeight copy;    // the quantized copy `host` points into, when one was made
    SlicedWeight part;       // the cut copy `host` points into, when one was made
  };
  // The host weight of `spec` (its `slice`, if given), checked against the config. Quantized at
  // load, a slice holds exactly the codes and scales of those rows and columns in the whole
  // tensor quantized: rows and whole groups are quantized on their own, and a column slice of a
  // weight with one scale per row is cut from its whole rows quantized. Throws m1::Error naming
  // the tensor.
  Loaded load(const WeightSpec& spec, const TensorSlice* slice = nullptr);
  // Gives back the checkpoint's pages of `spec` once the backend holds its own copy of what load()
  // returned straight from the checkpoint (nothing quantized or cut): with a group of one only,
  // since another rank may still read them.
  void release(const WeightSpec& spec);
  // The last progress line, and a warning if the checkpoint holds tensors nothing used.
  void finish();

  // Whether `spec` is read packed from the checkpoint, or will be quantized while loading.
  bool packed(const WeightSpec& spec) const;
  bool quantizes(const WeightSpec& spec) const;

 private:
  void report(bool last);

  const ModelConfig& config_;
  const Checkpoint& checkpoint_;
  LoadOptions options_;
  int ranks_ = 1;
  std::mutex mutex_;  // guards what follows
  std::set<std::string> used_;
  int64_t quantized_ = 0, to_quantize_ = 0;
  uint64_t read_bytes_ = 0, held_bytes_ = 0;
  std::chrono::steady_clock::time_point start_, last_report_;
};

}  // namespace m1
