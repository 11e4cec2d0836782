#pragma once
// The CUDA backends of a tensor-parallel group: one per rank on the GPUs the options name, joined
// by the communicator the options choose.

#include <memory>
#include <vector>

#include "m1/backends.h"

namespace m1::cuda {

// Throws m1::Error when no usable CUDA device is present, a GPU index does not exist, there are
// more ranks than GPUs without a list, or the options ask for what the CUDA backend does not
// offer (the reference kernels). options.threads is ignored.
std::vector<std::unique_ptr<Backend>> create_cuda_backends(const BackendOptions& options);

}  // namespace m1::cuda
