// Chooses and builds the backend a tool or server asked for.

#include "m1/backend.h"

#include "cpu/cpu_backend.h"
#include "m1/error.h"
#ifdef M1_HAVE_CUDA
#include "cuda_backend.h"
#endif

namespace m1 {

std::unique_ptr<Backend> create_backend(const BackendOptions& options) {
  if (options.threads < 0) fail("threads must be 0 (one per core) or more, got {}", options.threads);
  if (options.device == "cpu")
    return std::make_unique<cpu::CpuBackend>(options.threads, options.precision, options.reference_kernels);
  if (options.device == "cuda") {
#ifdef M1_HAVE_CUDA
    return cuda::create_cuda_backend(options);
#else
    fail("device 'cuda': this build of m1 has no CUDA backend (it was configured without nvcc); use --device cpu");
#endif
  }
  fail("device '{}' is unknown (expected cpu or cuda)", options.device);
}

Weight host_weight(const TensorView& t) {
  return Weight{t.data, t.weight_dtype(), t.shape.size() == 2 ? t.shape[0] : 1, t.shape.empty() ? 1 : t.shape.back()};
}

Precision parse_precision(const std::string& name) {
  if (name == "exact") return Precision::kExact;
  if (name == "fast") return Precision::kFast;
  fail("precision '{}' is unknown (expected exact or fast)", name);
}

}  // namespace m1
