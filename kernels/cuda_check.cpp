#include "cuda_check.h"

#include "m1/error.h"

namespace m1::cuda {

void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) fail("CUDA error {} ({}) in {}", cudaGetErrorName(status), cudaGetErrorString(status), call);
}

}  // namespace m1::cuda
