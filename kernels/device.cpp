#include "device.h"

#include <algorithm>
#include <cstdlib>
#include <string_view>

#include <cuda_runtime.h>

#include "cuda_check.h"
#include "m1/error.h"

namespace m1::cuda {

namespace {

constexpr size_t kDefaultSharedBytes = 48 * 1024;

}  // namespace

Device::Device(int index) : index_(index) {
  DeviceGuard guard(index);
  M1_CUDA_CHECK(cudaDeviceGetAttribute(&limits_.sms, cudaDevAttrMultiProcessorCount, index));
  M1_CUDA_CHECK(cudaDeviceGetAttribute(&limits_.shared_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  // M1_WGMMA: 0 (or unset) none, 1 all, or one family of the warpgroup kernels.
  const char* wgmma = std::getenv("M1_WGMMA");
  const std::string_view choice = wgmma ? wgmma : "0";
  if (choice != "0" && choice != "1" && choice != "products" && choice != "attention")
    fail("M1_WGMMA: expected 0, 1, products or attention, not '{}'", choice);
  const bool available = choice != "0" && warpgroup_mma_available(index);
  limits_.warpgroup_mma = available && choice != "attention";
  limits_.warpgroup_attention = available && choice != "products";
}

bool warpgroup_mma_available(int index) {
#ifdef M1_CUDA_SM90A
  int major = 0, minor = 0;
  M1_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
  M1_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
  return major == 9 && minor == 0;
#else
  (void)index;
  return false;
#endif
}

Device Device::current() {
  int index = 0;
  M1_CUDA_CHECK(cudaGetDevice(&index));
  return Device(index);
}

void Device::allow(const void* kernel, size_t bytes) {
  size_t& allowed = allowed_.try_emplace(kernel, kDefaultSharedBytes).first->second;
  if (bytes <= allowed) return;
  // Raised straight to the most a block may opt into: the attribute is the GPU's, and every Device
  // of the GPU (ranks sharing it) then sets the same value, so one never lowers it below what
  // another's launches rely on. (The attribute only permits; a launch uses what it asks for.)
  const size_t raised = std::max(bytes, size_t(std::max(limits_.shared_per_block, 0)));
  M1_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(raised)));
  allowed = raised;
}

DeviceGuard::DeviceGuard(int index) {
  // Failures are left to the calls made under the guard, which report them (a destructor may
  // hold a guard, and must not throw).
  if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  if (previous_ != index) cudaSetDevice(index);
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  // Errors are ignored: a destructor cannot report them.
  if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
}

}  // namespace m1::cuda
