#include "cuda_check.h"

#include "m1/error.h"

namespace m1::cuda {

void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) fail("CUDA error {} ({}) in {}", cudaGetErrorName(status), cudaGetErrorString(status), call);
}

void check(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) fail("cuBLAS error {} in {}", cublasGetStatusName(status), call);
}

}  // namespace m1::cuda
