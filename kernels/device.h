#pragma once
// One GPU as the kernel launchers see it: its limits, read once when a backend is made for it,
// and its kernels' opt-ins to more than the default 48 KB of dynamic shared memory, which CUDA
// keeps per device. Each backend holds its own; launchers that size grids by the device or need
// the opt-in take it. Used by one thread at a time, like the backend that holds it.

#include <cstddef>
#include <unordered_map>

namespace m1::cuda {

// The skinny products' chunk partials make a round trip through memory: chunks x m x n floats (m:
// every row of x in a grouped call). Past this many bytes (the LM head at batch 32 would take 615
// MB, a MoE's gate products at batch 64 113 MB) the tiled kernels, which keep their partials in
// registers and have n / 64 column tiles to spread over the GPU anyway, are the better choice.
inline constexpr size_t kDefaultPartialBytes = size_t(64) << 20;

struct DeviceLimits {
  int sms = 0;               // streaming multiprocessors
  int shared_per_block = 0;  // bytes of shared memory a block may opt into
  // Bytes of scratch one product's chunk partials may take (a budget of the device's memory, not
  // read from CUDA): past it a product takes kernels without partials, with the same bits.
  size_t partial_bytes = kDefaultPartialBytes;
  // Many-row products on the warpgroup tensor cores (wgmma): a Hopper GPU, kernels built for
  // sm_90a, and, until a GPU run has checked them against the mma.sync tiles bit for bit, M1_WGMMA=1
  // or M1_WGMMA=products (scripts/gpu-check.sh runs that check and both forms' speed).
  bool warpgroup_mma = false;
  // The fast flash prefill's wide CTAs on the warpgroup tensor cores: the same, with M1_WGMMA=1 or
  // M1_WGMMA=attention.
  bool warpgroup_attention = false;
};

// Whether GPU `index` can run the warpgroup products: compute capability 9.0 and this build's
// kernels compiled for sm_90a (CMAKE_CUDA_ARCHITECTURES 90a).
bool warpgroup_mma_available(int index);

class Device {
 public:
  // GPU `index` (its limits are read with it made current; the current device is restored).
  explicit Device(int index);
  // The current GPU of the calling thread.
  static Device current();
  // A device of the given limits, made without asking CUDA: for tests of what launchers refuse
  // before they touch the GPU.
  Device(int index, const DeviceLimits& limits) : index_(index), limits_(limits) {}

  int index() const { return index_; }
  const DeviceLimits& limits() const { return limits_; }
  // This GPU with the same limits but the warpgroup products and flash prefill on or off (on only
  // where warpgroup_mma_available): a benchmark's or test's other form of the same launches.
  Device with_warpgroup_mma(bool on) const {
    DeviceLimits limits = limits_;
    limits.warpgroup_mma = limits.warpgroup_attention = on && warpgroup_mma_available(index_);
    return Device(index_, limits);
  }

  // Raises `Kernel`'s dynamic shared-memory limit on this device to at least `bytes` (to the most a
  // block may opt into, so that Devices of one GPU agree). The attribute call is not free, so it
  // is made only when a launch needs more than the kernel was last allowed here (every kernel
  // starts at the default 48 KB). The device must be current.
  template <auto Kernel>
  void allow_shared_memory(size_t bytes) {
    allow(reinterpret_cast<const void*>(Kernel), bytes);
  }

 private:
  void allow(const void* kernel, size_t bytes);

  int index_ = 0;
  DeviceLimits limits_;
  std::unordered_map<const void*, size_t> allowed_;
};

// Makes GPU `index` current for the calling thread for its lifetime, and restores the one before.
// Never throws: a failure shows in the CUDA calls made under it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int index);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace m1::cuda
