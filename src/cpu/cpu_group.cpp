#include "cpu/cpu_group.h"

#include "cpu/cpu_backend.h"
#include "cpu/numa.h"
#include "cpu/shared_memory_group.h"

namespace m1::cpu {

std::vector<std::unique_ptr<Backend>> create_cpu_backends(int ranks, int threads, Precision precision,
                                                          bool reference_kernels, bool map_weights) {
  std::vector<std::unique_ptr<Backend>> backends;
  if (ranks == 1) {
    backends.push_back(std::make_unique<CpuBackend>(threads, precision, reference_kernels, map_weights));
    return backends;
  }
  const std::vector<RankPlacement> placement = place_ranks(numa_nodes(), ranks, threads);
  auto group = std::make_shared<SharedMemoryGroup>(ranks);
  for (int r = 0; r < ranks; ++r) {
    const RankPlacement& p = placement[size_t(r)];
    backends.push_back(
        std::make_unique<CpuBackend>(CpuRank{DeviceInfo{"cpu", p.node, r, ranks}, p, group}, precision, reference_kernels));
  }
  return backends;
}

}  // namespace m1::cpu
