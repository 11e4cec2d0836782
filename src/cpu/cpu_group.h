#pragma once
// The CPU backends of a tensor-parallel group: one thread group per rank, placed on the machine's
// NUMA nodes, joined by one shared-memory group for their collectives.

#include <memory>
#include <vector>

#include "m1/backend.h"

namespace m1::cpu {

// `ranks` backends sharing `threads` threads (0: one per core); one rank is today's plain backend.
// `map_weights`: a group of one reads its weights in place (ranks of a larger group always copy).
std::vector<std::unique_ptr<Backend>> create_cpu_backends(int ranks, int threads, Precision precision,
                                                          bool reference_kernels, bool map_weights = false);

}  // namespace m1::cpu
