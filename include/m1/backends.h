#pragma once
// Making backends: the device and precision a tool or the server asked for, and with tensor
// parallelism one backend per rank, joined by the collectives of their group. The library that
// defines these (backends/, m1_backends) is the one place that knows every backend.

#include <memory>
#include <string>
#include <vector>

#include "m1/backend.h"

namespace m1 {

struct BackendOptions {
  std::string device = "cpu";  // "cpu", or "cuda" in a build with the CUDA backend
  int threads = 0;             // CPU worker threads, over all ranks; 0: one per core
  Precision precision = Precision::kFast;  // the tools' default too: see README, Correctness
  // Run the naive reference kernels (the oracle the fast kernels are tested against).
  bool reference_kernels = false;
  // CUDA: replay decode steps as CUDA graphs (the environment's M1_CUDA_GRAPHS=0 turns them off).
  bool cuda_graphs = true;
  // Ranks of the tensor-parallel group: on the CPU, thread groups (one per NUMA node where the
  // machine has several); on CUDA, one per GPU of `gpus` (default 0..N-1; a GPU listed more than
  // once is shared by those ranks).
  int tensor_parallel = 1;
  std::vector<int> gpus{};
  // CUDA collectives: "auto" (NCCL when every rank has a GPU of its own, else "peer"), "nccl", or
  // "peer" (our one-shot kernels over the ranks' device buffers, which also serve ranks sharing a
  // GPU). The CPU's ranks always use shared memory.
  std::string collectives = "auto";
  // CUDA: time each collective of an eagerly run step on the device (CUDA events around it), for
  // collective_stats() (m1-bench's share of a step). The CPU's ranks always time theirs.
  bool time_collectives = false;
  // CPU, one rank: read the weights in place from the checkpoint's mapped file pages (shared with
  // the page cache) instead of copying them into huge pages at load, which decode about 10% and
  // prefill about 15% faster (README, CPU speed).
  bool map_weights = false;
};

// One backend per rank, in rank order. Throws m1::Error for an unknown device, one this build or
// machine lacks, a GPU index that does not exist, or more ranks than GPUs.
std::vector<std::unique_ptr<Backend>> create_backends(const BackendOptions& options);
// The one backend of an options.tensor_parallel == 1 group.
std::unique_ptr<Backend> create_backend(const BackendOptions& options);

// The backends as the pointers Model takes, in rank order.
std::vector<Backend*> rank_pointers(const std::vector<std::unique_ptr<Backend>>& backends);
// A group's description: its one backend's name, or the ranks' names.
std::string group_name(const std::vector<std::unique_ptr<Backend>>& backends);

Precision parse_precision(const std::string& name);  // "exact" or "fast"; throws m1::Error otherwise
// "0,2,3" as GPU indices; throws m1::Error naming `option` otherwise.
std::vector<int> parse_gpu_list(const std::string& text, const std::string& option = "--gpus");

}  // namespace m1
