#pragma once
// Where each weight of a model comes from: the checkpoint's tensor as stored, the packed tensors of
// a compressed-tensors checkpoint (both read in place), or a quantized copy made while loading (the
// source's pages given back at once, so only the quantized copies stay in memory). Reports its
// progress on stderr while it quantizes.

#include <chrono>
#include <cstdint>
#include <set>
#include <string>

#include "m1/config.h"
#include "m1/model.h"
#include "m1/quantize.h"
#include "m1/safetensors.h"
#include "m1/weights.h"

namespace m1 {

class WeightLoader {
 public:
  WeightLoader(const ModelConfig& config, const Checkpoint& checkpoint, const LoadOptions& options);

  struct Loaded {
    Weight host;             // what to upload
    QuantizedWeight copy;    // the quantized copy `host` points into, when one was made
  };
  // The host weight of `spec`, checked against the config. Throws m1::Error naming the tensor.
  Loaded load(const WeightSpec& spec);
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
  std::set<std::string> used_;
  int64_t quantized_ = 0, to_quantize_ = 0;
  uint64_t read_bytes_ = 0, held_bytes_ = 0;
  std::chrono::steady_clock::time_point start_, last_report_;
};

}  // namespace m1
