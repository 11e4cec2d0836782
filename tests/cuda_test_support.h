#pragma once
// CUDA tests run on a machine with a GPU and skip, saying why, everywhere else. Their device
// memory lives in m1::cuda::DeviceArray (kernels/device_array.h).

#include <string>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "cuda_check.h"
#include "device.h"
#include "device_array.h"

namespace m1::test {

using cuda::DeviceArray;

// Empty when a CUDA device is usable, else the reason it is not.
inline std::string cuda_unavailable_reason() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device";
  return {};
}

// The current GPU as the kernel launchers take it (its limits and shared-memory opt-ins), for
// tests that call them directly; without a GPU, a stand-in for the tests of what launchers refuse
// before they launch.
inline cuda::Device& test_device() {
  static cuda::Device device =
      cuda_unavailable_reason().empty() ? cuda::Device::current() : cuda::Device(0, cuda::DeviceLimits{});
  return device;
}

// What `calls` launches on `stream`, captured once as a CUDA graph, replayed by launch().
class CapturedGraph {
 public:
  template <class Calls>
  CapturedGraph(cudaStream_t stream, Calls calls) : stream_(stream) {
    cudaGraph_t graph = nullptr;
    M1_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    calls();
    M1_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    const cudaError_t status = cudaGraphInstantiate(&exec_, graph, 0);
    cudaGraphDestroy(graph);
    M1_CUDA_CHECK(status);
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  ~CapturedGraph() {
    cudaStreamSynchronize(stream_);
    cudaGraphExecDestroy(exec_);
  }
  void launch() { M1_CUDA_CHECK(cudaGraphLaunch(exec_, stream_)); }

 private:
  cudaStream_t stream_;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace m1::test

#define M1_REQUIRE_CUDA()                                                     \
  do {                                                                        \
    if (std::string why = ::m1::test::cuda_unavailable_reason(); !why.empty()) \
      GTEST_SKIP() << why;                                                    \
  } while (0)
