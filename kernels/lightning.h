#pragma once
// Lightning (linear) attention of DESIGN.md §1 on the GPU, batched over sequences and heads:
//   o_t = sum_{j<=t} exp(-s (t-j)) (q_t . k_j) v_j, with q, k, v the SiLU of the projection's
// output (applied by the kernels as they load it), and a fp32 d x d state per head carried
// across steps. Segments of one token take the decode kernel (state read and written once);
// longer ones the chunked prefill kernel (state kept on chip across blocks), on tensor cores with
// bf16 operands when the caller allows them, else in fp32.

#include <cstdint>
#include <span>

#include <cuda_runtime.h>

#include "device.h"

namespace m1::cuda {

// One sequence's rows [row, row + count) of the step; `state` is this layer's heads x d x d
// fp32 state in device memory (head h at state + h*d*d, row a holds S[a][:]), updated in place.
// When d is a multiple of 4, a decode segment's state must be 16-byte aligned.
struct LightningSegment {
  int64_t row = 0, count = 0;
  float* state = nullptr;
};

struct LightningArgs {
  const float* qkv = nullptr;  // row t: per head [q | k | v], d floats each, before SiLU
  int64_t qkv_stride = 0;      // floats between rows (heads * 3d)
  float* out = nullptr;        // row t: heads x d
  int64_t out_stride = 0;
  int64_t heads = 0, d = 0;
  const float* decay = nullptr;  // device: s per head
  std::span<const LightningSegment> segments;       // host copy: the launcher picks kernels by count
  const LightningSegment* device_segments = nullptr;  // the same descriptors in device memory
  // Whether prefill products may round their operands to bf16 (fp32 accumulation, fp32 state):
  // the fast precision of DESIGN.md §4. Decode is fp32 either way.
  bool bf16_operands = false;
};

void lightning_attention(const LightningArgs& args, Device& device, cudaStream_t stream);

}  // namespace m1::cuda
