#pragma once
// The machine's NUMA nodes and the cores of each, read from sysfs, and where the ranks of a
// tensor-parallel group go: one node per rank (ranks share a node's cores when there are more
// ranks than nodes), so that each rank's threads and weights stay in its node's memory.

#include <filesystem>
#include <string>
#include <vector>

namespace m1::cpu {

struct NumaNode {
  int id = 0;
  std::vector<int> cpus;
};

// "0-3,8,10-11" as a list of CPU numbers; throws m1::Error on anything else.
std::vector<int> parse_cpu_list(const std::string& text);

// The nodes under `root` (nodeN/cpulist) that have CPUs, by id; empty when it cannot be read.
std::vector<NumaNode> numa_nodes(const std::filesystem::path& root = "/sys/devices/system/node");

struct RankPlacement {
  int node = 0;           // the NUMA node (0 on a machine of one)
  std::vector<int> cpus;  // the cores its threads are pinned to; empty: not pinned (one node)
  int threads = 1;        // its thread group, the driving thread included
};

// Where each of `ranks` ranks runs, given `threads` threads in all (0: one per core). On a
// machine of one node nothing is pinned and the threads are shared out evenly.
std::vector<RankPlacement> place_ranks(const std::vector<NumaNode>& nodes, int ranks, int threads);

// Pins the calling thread to `cpus` (nothing when empty); throws m1::Error when the OS refuses.
void pin_current_thread(const std::vector<int>& cpus);

}  // namespace m1::cpu
