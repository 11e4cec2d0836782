#include "cpu/numa.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <thread>

#include "m1/error.h"

namespace m1::cpu {
namespace {

int parse_cpu(const std::string& text, const std::string& list) {
  size_t used = 0;
  int value = -1;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
  }
  if (text.empty() || used != text.size() || value < 0) fail("CPU list '{}': '{}' is not a CPU number", list, text);
  return value;
}

}  // namespace

std::vector<int> parse_cpu_list(const std::string& text) {
  std::vector<int> cpus;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    while (!item.empty() && std::isspace(static_cast<unsigned char>(item.back()))) item.pop_back();
    if (item.empty()) continue;
    const size_t dash = item.find('-');
    const int first = parse_cpu(item.substr(0, dash), text);
    const int last = dash == std::string::npos ? first : parse_cpu(item.substr(dash + 1), text);
    if (last < first) fail("CPU list '{}': range {} runs backwards", text, item);
    for (int c = first; c <= last; ++c) cpus.push_back(c);
  }
  return cpus;
}

std::vector<NumaNode> numa_nodes(const std::filesystem::path& root) {
  std::vector<NumaNode> nodes;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.size() < 5 || name.rfind("node", 0) != 0 ||
        !std::all_of(name.begin() + 4, name.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
      continue;
    std::ifstream in(entry.path() / "cpulist");
    std::string list;
    if (!std::getline(in, list)) continue;
    NumaNode node{std::stoi(name.substr(4)), parse_cpu_list(list)};
    if (!node.cpus.empty()) nodes.push_back(std::move(node));
  }
  std::sort(nodes.begin(), nodes.end(), [](const NumaNode& a, const NumaNode& b) { return a.id < b.id; });
  return nodes;
}

std::vector<RankPlacement> place_ranks(const std::vector<NumaNode>& nodes, int ranks, int threads) {
  std::vector<RankPlacement> placement(static_cast<size_t>(ranks));
  if (nodes.size() < 2) {
    const int total = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
    for (int r = 0; r < ranks; ++r) placement[size_t(r)].threads = std::max(1, total / ranks);
    return placement;
  }
  // Rank r on node r mod nodes; the ranks of one node split its cores into contiguous groups.
  const int node_count = int(nodes.size());
  for (int r = 0; r < ranks; ++r) {
    const NumaNode& node = nodes[size_t(r % node_count)];
    const int sharing = (ranks - r % node_count + node_count - 1) / node_count;  // ranks on this node
    const int slot = r / node_count, cores = int(node.cpus.size());
    const int begin = cores * slot / sharing, end = std::max(begin + 1, cores * (slot + 1) / sharing);
    RankPlacement& p = placement[size_t(r)];
    p.node = node.id;
    p.cpus.assign(node.cpus.begin() + std::min(begin, cores - 1), node.cpus.begin() + std::min(end, cores));
    p.threads = threads > 0 ? std::max(1, threads / ranks) : int(p.cpus.size());
  }
  return placement;
}

void pin_current_thread(const std::vector<int>& cpus) {
  if (cpus.empty()) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus)
    if (c < CPU_SETSIZE) CPU_SET(c, &set);
  if (const int error = pthread_setaffinity_np(pthread_self(), sizeof(set), &set); error != 0)
    fail("cannot pin a thread to CPUs {}..{} (error {})", cpus.front(), cpus.back(), error);
}

}  // namespace m1::cpu
