#pragma once
// Decode steps recorded once as CUDA graphs and replayed, so a step costs one graph launch instead
// of a few hundred kernel launches (batch-1 decode of a small model is otherwise launch-bound).
//
// The backend brackets each step with begin() and end() and routes every call through mode():
//   kEager   launch as usual;
//   kRecord  launch under stream capture: nothing runs yet, the launches become the graph;
//   kReplay  launch nothing: only stage the call's host data, the recorded graph does the work.
// Host data a step's kernels read (token ids, segment descriptors) is staged into one pinned
// buffer at offsets fixed by the order of the calls, and copied to one device buffer right before
// the graph runs; so a replay sees this step's data at the addresses the recording baked in.
// A step is recorded the second time its key (batch, states, memory epoch) is seen in a row, the
// first run having grown every scratch buffer to size. Each call also adds its arguments to a
// signature; a replay whose signature differs from the recording's runs nothing and reports it,
// and the caller makes the calls again eagerly.

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <vector>

#include <cuda_runtime.h>

namespace m1::cuda {

class StepGraphs {
 public:
  enum class Mode { kEager, kRecord, kReplay };
  struct Stats {
    int64_t eager = 0, recorded = 0, replayed = 0, rejected = 0;  // steps
    int64_t kernels = 0;  // kernel launches of the step recorded last (0 before the first)
  };

  StepGraphs(cudaStream_t stream, bool enabled);
  ~StepGraphs();
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;

  // Starts a step; an empty key means the step cannot be a graph (it runs eagerly).
  void begin(std::vector<uint64_t> key);
  Mode mode() const { return mode_; }
  bool enabled() const { return enabled_; }
  // Record and replay: copies `bytes` of host data into the stage and returns the device address
  // it will have when the step runs. Throws m1::Error when the stage is full.
  void* stage(const void* host, size_t bytes);
  // Record and replay: adds a call's arguments to the step's signature.
  void note(std::initializer_list<uint64_t> values);
  // Ends the step: records and launches, or checks the signature and launches. False when nothing
  // ran (a replay whose calls differ from the recording's, or a capture that failed): the caller
  // must make the step's calls again, now eagerly.
  bool end();
  // After an exception inside the step: true when nothing of it ran (record or replay).
  bool abandon();
  const Stats& stats() const { return stats_; }

 private:
  struct Recording {
    cudaGraphExec_t exec = nullptr;  // null: the key failed to record once, so it runs eagerly
    uint64_t signature = 0;
  };
  void launch(const Recording& recording);
  void destroy(cudaGraphExec_t exec);  // errors ignored: it is released either way
  void forget_all();

  cudaStream_t stream_;
  bool enabled_;
  Mode mode_ = Mode::kEager;
  std::vector<uint64_t> key_;  // this step's, and until the next begin() the previous step's
  std::map<std::vector<uint64_t>, Recording> recordings_;
  uint64_t epoch_ = 0;  // memory epoch the recordings were made in
  uint64_t signature_ = 0;
  size_t staged_ = 0;
  std::byte* host_stage_ = nullptr;  // pinned
  std::byte* device_stage_ = nullptr;
  cudaEvent_t stage_copied_ = nullptr;  // the host stage may be rewritten once this has passed
  Stats stats_;
};

}  // namespace m1::cuda
