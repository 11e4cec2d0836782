#pragma once
// The command-line flags of the backend group, the same in m1-generate, m1-serve and m1-bench: those
// of tensor parallelism (--tensor-parallel N, --gpus 0,2,..., --collectives, --moe-parallel) and
// --mmap, where the CPU's weights live.

#include <string>

#include <CLI/CLI.hpp>

#include "m1/backends.h"
#include "m1/sharding.h"

namespace m1 {

struct ParallelFlags {
  std::string gpus;
  std::string moe = moe_parallel_name(ShardOptions{}.moe);

  // Call after parsing: the flags' text into the options (throws m1::Error naming the flag).
  void apply(BackendOptions& backend, ShardOptions& shard) const {
    if (!gpus.empty()) backend.gpus = parse_gpu_list(gpus, "--gpus");
    try {
      shard.moe = parse_moe_parallel(moe);
    } catch (const Error& e) {
      fail("--moe-parallel: {}", e.what());
    }
  }
};

inline void add_parallel_flags(CLI::App& app, BackendOptions& backend, ParallelFlags& flags) {
  app.add_option("--tensor-parallel", backend.tensor_parallel,
                 "Ranks to split the model over: GPUs with --device cuda, thread groups (one per NUMA node) on the CPU")
      ->capture_default_str();
  app.add_option("--gpus", flags.gpus, "--device cuda: the GPU of each rank, e.g. 0,2 (default 0..N-1; a GPU listed twice is shared)");
  app.add_option("--collectives", backend.collectives,
                 "--device cuda: auto (NCCL across GPUs, else peer), nccl, or peer (our one-shot kernels)")
      ->capture_default_str();
  app.add_option("--moe-parallel", flags.moe, "Split experts' intermediate dimension over ranks (tensor) or whole experts (expert)")
      ->capture_default_str();
  app.add_flag("--mmap", backend.map_weights,
               "--device cpu: read the weights in place from the checkpoint's mapped files instead of copying them into "
               "huge pages at load (less memory, shared with the page cache; slower)");
}

}  // namespace m1
