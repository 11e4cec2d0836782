// Chooses and builds the backends a tool or the server asked for: the device, and with tensor
// parallelism one backend per rank.

#include "m1/backends.h"

#include <sstream>

#include <fmt/format.h>

#include "cpu/cpu_group.h"
#include "m1/error.h"
#ifdef M1_HAVE_CUDA
#include "cuda_group.h"
#endif

namespace m1 {
namespace {

// More ranks than this is a typing error, not a machine.
constexpr int kMaxRanks = 1024;

}  // namespace

std::vector<std::unique_ptr<Backend>> create_backends(const BackendOptions& options) {
  if (options.threads < 0) fail("threads must be 0 (one per core) or more, got {}", options.threads);
  if (options.tensor_parallel < 1 || options.tensor_parallel > kMaxRanks)
    fail("--tensor-parallel must be between 1 and {}, got {}", kMaxRanks, options.tensor_parallel);
  if (options.collectives != "auto" && options.collectives != "nccl" && options.collectives != "peer")
    fail("--collectives '{}' is unknown (expected auto, nccl or peer)", options.collectives);
  if (options.map_weights && (options.device != "cpu" || options.tensor_parallel != 1))
    fail("--mmap reads weights in place on --device cpu with one rank (the ranks of a CPU group copy theirs into their NUMA node)");
  if (options.device == "cpu") {
    if (!options.gpus.empty()) fail("--gpus chooses GPUs for --device cuda, not cpu");
    if (options.collectives != "auto")
      fail("--collectives {} is for --device cuda (CPU ranks reduce through shared memory)", options.collectives);
    return cpu::create_cpu_backends(options.tensor_parallel, options.threads, options.precision,
                                    options.reference_kernels, options.map_weights);
  }
  if (options.device == "cuda") {
#ifdef M1_HAVE_CUDA
    return cuda::create_cuda_backends(options);
#else
    fail("device 'cuda': this build of m1 has no CUDA backend (it was configured without nvcc); use --device cpu");
#endif
  }
  fail("device '{}' is unknown (expected cpu or cuda)", options.device);
}

std::unique_ptr<Backend> create_backend(const BackendOptions& options) {
  if (options.tensor_parallel != 1)
    fail("create_backend makes the backend of one rank; {} ranks need create_backends", options.tensor_parallel);
  return std::move(create_backends(options).front());
}

std::vector<Backend*> rank_pointers(const std::vector<std::unique_ptr<Backend>>& backends) {
  std::vector<Backend*> pointers;
  for (const auto& b : backends) pointers.push_back(b.get());
  return pointers;
}

std::string group_name(const std::vector<std::unique_ptr<Backend>>& backends) {
  if (backends.size() == 1) return backends.front()->name();
  std::string names;
  for (const auto& b : backends) names += (names.empty() ? "" : "; ") + b->name();
  return fmt::format("tensor parallel {}: {}", backends.size(), names);
}

Precision parse_precision(const std::string& name) {
  if (name == "exact") return Precision::kExact;
  if (name == "fast") return Precision::kFast;
  fail("precision '{}' is unknown (expected exact or fast)", name);
}

std::vector<int> parse_gpu_list(const std::string& text, const std::string& option) {
  std::vector<int> gpus;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t used = 0;
    long value = -1;
    try {
      value = std::stol(item, &used);
    } catch (const std::exception&) {
    }
    if (item.empty() || used != item.size() || value < 0 || value > 1023)
      fail("{}: '{}' is not a GPU index (expected a list like 0,1,2,3)", option, item);
    gpus.push_back(int(value));
  }
  if (gpus.empty()) fail("{}: no GPU given (expected a list like 0,1,2,3)", option);
  return gpus;
}

}  // namespace m1
