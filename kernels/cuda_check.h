#pragma once
// Turns CUDA failures into m1::Error with the failing call's text, so a tool prints one
// line and the server answers 500 for that step instead of crashing.

#include <cuda_runtime.h>

namespace m1::cuda {

void check(cudaError_t status, const char* call);

}  // namespace m1::cuda

#define M1_CUDA_CHECK(call) ::m1::cuda::check((call), #call)
// After a kernel launch: a bad configuration shows up as the launch's error.
#define M1_CUDA_CHECK_LAUNCH() ::m1::cuda::check(cudaGetLastError(), "kernel launch")
