#include "cuda_group.h"

#include <algorithm>
#include <cstdlib>
#include <set>
#include <string_view>

#include <cuda_runtime.h>

#include "communicator.h"
#include "cuda_backend.h"
#include "cuda_check.h"
#include "device.h"
#include "m1/error.h"

namespace m1::cuda {
namespace {

// The GPU of each rank: those listed, or 0..ranks-1.
std::vector<int> rank_gpus(const BackendOptions& o, int count) {
  const int ranks = o.tensor_parallel;
  std::vector<int> gpus = o.gpus;
  if (gpus.empty()) {
    if (ranks > count)
      fail("--tensor-parallel {} needs {} GPUs, and this machine has {} (--gpus can list a GPU more than once to put "
           "several ranks on it)",
           ranks, ranks, count);
    for (int r = 0; r < ranks; ++r) gpus.push_back(r);
  }
  if (int(gpus.size()) != ranks)
    fail("--gpus lists {} GPUs for --tensor-parallel {}: give one per rank", gpus.size(), ranks);
  for (int gpu : gpus)
    if (gpu < 0 || gpu >= count)
      fail("--gpus: GPU {} does not exist (this machine has {} GPU{}, 0 to {})", gpu, count, count == 1 ? "" : "s",
           count - 1);
  return gpus;
}

std::vector<std::unique_ptr<Communicator>> communicators(const std::string& requested, const std::vector<int>& gpus) {
  const bool shared = std::set<int>(gpus.begin(), gpus.end()).size() < gpus.size();
  std::string kind = requested;
  if (kind == "auto") kind = gpus.size() == 1 ? "none" : shared ? "peer" : "nccl";
  if (kind == "peer") return make_peer_communicators(gpus);
  if (kind == "nccl") return make_nccl_communicators(gpus);
  return std::vector<std::unique_ptr<Communicator>>(gpus.size());
}

}  // namespace

std::vector<std::unique_ptr<Backend>> create_cuda_backends(const BackendOptions& options) {
  if (options.reference_kernels) fail("device 'cuda': reference kernels run on the CPU only");
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) fail("device 'cuda': no usable CUDA device ({})", cudaGetErrorString(status));
  if (count == 0) fail("device 'cuda': no usable CUDA device (none found)");
  const std::vector<int> gpus = rank_gpus(options, count);
  std::vector<std::string> names;
  for (int gpu : gpus) {
    cudaDeviceProp properties{};
    M1_CUDA_CHECK(cudaGetDeviceProperties(&properties, gpu));
    // bf16 tensor cores (wmma on __nv_bfloat16) need compute capability 8.0.
    if (properties.major < 8)
      fail("device 'cuda': no usable CUDA device (GPU {}, {}, has compute capability {}.{}; m1 needs 8.0 or newer)",
           gpu, properties.name, properties.major, properties.minor);
    names.push_back(properties.name);
  }
  // M1_CUDA_GRAPHS=0: a switch for comparing against (or ruling out) graph replay from any tool.
  const char* graphs_env = std::getenv("M1_CUDA_GRAPHS");
  const bool graphs = options.cuda_graphs && !(graphs_env && std::string_view(graphs_env) == "0");
  std::vector<std::unique_ptr<Communicator>> joined = communicators(options.collectives, gpus);
  const int ranks = int(gpus.size());
  std::vector<std::unique_ptr<Backend>> backends;
  for (int r = 0; r < ranks; ++r) {
    const DeviceGuard current(gpus[size_t(r)]);  // a backend is made on its GPU
    backends.push_back(std::make_unique<CudaBackend>(options.precision, DeviceInfo{"cuda", gpus[size_t(r)], r, ranks},
                                                     names[size_t(r)], graphs, std::move(joined[size_t(r)]),
                                                     options.time_collectives));
  }
  return backends;
}

}  // namespace m1::cuda
