#pragma once
// The activations the kernels share (elementwise.cu's SwiGLU and gated norm, the streamed products
// that apply SwiGLU to x as they stage it), one definition so that every kernel computing them
// gives the same bits.

namespace m1::cuda {

// 1 / (1 + e^-v) through e^-|v|, which never overflows.
__device__ __forceinline__ float sigmoid(float v) {
  const float e = expf(-fabsf(v));
  const float inv = 1.0f / (1.0f + e);
  return v >= 0.0f ? inv : e * inv;
}

__device__ __forceinline__ float silu(float v) { return v * sigmoid(v); }

// SwiGLU of one element: silu(gate) * up.
__device__ __forceinline__ float swiglu_value(float gate, float up) { return silu(gate) * up; }

}  // namespace m1::cuda
