#pragma once
// Lightning (linear) attention of DESIGN.md §1 on the GPU, batched over sequences and heads:
//   o_t = sum_{j<=t} exp(-s (t-j)) (q_t . k_j) v_j, with q, k, v the SiLU of the projection's
// output (applied by the kernels as they load it), and a fp32 d x d state per head carried
// across steps. Segments of one token take the decode kernel (state read and written once);
// longer ones the chunked prefill kernel (state kept on chip across blocks), on tensor cores with
// bf16 operands when the caller allows them, else in fp32.

#include <cstdint>
#include <span>
#include <vector>

#include <cuda_runtime.h>

#include "device.h"
#include "device_scratch.h"

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
  // Whether the bf16 prefill may split segments into parts (lightning_prefill_parts). The bits are
  // the same either way; tests and benchmarks turn it off to compare.
  bool split_segments = true;
};

// `scratch` holds what a prefill split into parts passes between its launches (the blocks' state
// terms, the parts' starting states, their descriptors).
void lightning_attention(const LightningArgs& args, DeviceScratch& scratch, Device& device, cudaStream_t stream);

// Into how many slices of its value columns the decode kernel cuts each (row, head) of a call with
// `rows` one-token segments: halves while the doubled grid still fits the SMs once and each CTA
// keeps two warps. A row's bits are the same at any slicing (columns never mix, and each column
// sums its rows in an order fixed by d).
int lightning_decode_slices(int64_t rows, int64_t heads, int64_t d, int sms);

// How the bf16 prefill splits the segments of a call (those of more than one token) into parts of
// whole blocks of 64 tokens, each walked by CTAs of its own, when its (segment, head) CTAs would
// leave SMs idle: blocks per part for each segment, 0 where it stays whole. A segment's bits are
// the same split or whole (the kernels compose the state block by block either way), so the
// choice may depend on the whole call and the device.
std::vector<int64_t> lightning_prefill_parts(std::span<const LightningSegment> segments, int64_t heads, int64_t d,
                                             int sms);

}  // namespace m1::cuda
