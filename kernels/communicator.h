#pragma once
// The collectives of a CUDA tensor-parallel group, as one rank sees them: queued on the rank's
// stream without waiting for the device, so that a decode step's collectives are captured in its
// CUDA graph. Sums add the ranks' values in rank order (collectives.h), whichever implementation.
//   peer: our one-shot kernels over the ranks' own device buffers; serves ranks that share a GPU
//         (which NCCL refuses) and GPUs with peer access.
//   nccl: NCCL moves the data (all-gather, send/receive), our kernel sums it: NCCL's own reduction
//         order follows the message size, and so the batch.

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace m1::cuda {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string name() const = 0;  // "peer" or "nccl"
  // data [count] (this rank's device memory) = the sum over ranks of their data.
  virtual void all_reduce_sum(float* data, int64_t count, cudaStream_t stream) = 0;
  // Rank 0's out [rows, sum of widths] gets each rank's part [rows, widths[rank]] at the columns
  // after the ranks' before it; the others pass out = nullptr.
  virtual void gather_columns(const float* part, int64_t rows, std::span<const int64_t> widths, float* out,
                              cudaStream_t stream) = 0;
};

// One communicator per rank, rank r's on GPU devices[r] (made current for each while it is set
// up). Peer: a GPU may appear more than once; distinct GPUs must reach each other's memory.
// `capacity` floats per rank per call (larger calls are split). Throws m1::Error otherwise.
std::vector<std::unique_ptr<Communicator>> make_peer_communicators(const std::vector<int>& devices,
                                                                   int64_t capacity = int64_t(4) << 20);
// NCCL: one distinct GPU per rank; libnccl.so.2 is loaded when first needed.
std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>& devices);

}  // namespace m1::cuda
