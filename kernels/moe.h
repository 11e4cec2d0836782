#pragma once
// Top-k mixture of SwiGLU experts on the GPU: router logits and softmax routing in fp32, tokens
// grouped by expert so each expert's weights stream once per step, expert products on the
// batch-invariant grouped matmul, weighted sum in rank order. All of it is queued on the stream
// without waiting for the device, so a decode step can be captured in a CUDA graph.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

#include "device.h"

#include "device_scratch.h"
#include "device_types.h"

namespace m1::cuda {

struct MoeArgs {
  const float* x = nullptr;  // [rows, hidden], contiguous
  int64_t rows = 0, hidden = 0;
  DeviceMatrix router;                      // [experts, hidden]: every expert
  std::span<const DeviceMatrix> w1, w3, w2;  // per expert held: gate [F, H], up [F, H], down [H, F]
  // The experts held are [first_expert, first_expert + w1.size()); a row's output sums only the
  // experts it chose among them (expert parallel: the ranks' outputs are summed afterwards).
  int64_t first_expert = 0;
  int64_t top_k = 0;
  GemmOperands operands = GemmOperands::kFp32;  // of the expert products; routing is always fp32
  float* out = nullptr;  // [rows, hidden]
};

// Buffers reused across steps. The matmul scratch is the caller's (the backend shares its own, on
// the same stream), so it must outlive the workspace.
struct MoeWorkspace {
  MoeWorkspace(cudaStream_t stream, DeviceScratch& matmul) : device(stream), matmul(matmul) {}
  DeviceScratch device;   // routing results, grouping, gathered rows, expert activations
  DeviceScratch& matmul;  // scratch for the matmul calls
};

// A row that routing cannot place (non-finite router logits, from a non-finite row of x) comes
// out as NaN and leaves the other rows alone: the host never sees the choices to reject it.
void moe(const MoeArgs& args, MoeWorkspace& workspace, Device& device, cudaStream_t stream);

// The routing step alone (moe's first kernel, exposed for its test): for each of `rows` rows of
// fp32 `logits` [rows, experts], the top_k experts by softmax probability (ties: lower index
// first) and their probabilities renormalised to sum 1, best first, into `chosen` and `weights`
// [rows, top_k]. All pointers are device memory.
void route(const float* logits, int64_t rows, int64_t experts, int64_t top_k, int32_t* chosen, float* weights,
           cudaStream_t stream);

}  // namespace m1::cuda
