#pragma once
// The CUDA backend: weights and activations in device memory, one stream per backend, and the
// kernels of kernels/*.h. Matrix products take the batch-invariant matmul; in fast precision the
// products that may round use bf16 tensor cores. A backend is one GPU (several ranks may share
// one, each with its own backend) and makes that GPU current for each call, from any thread.

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <cuda_runtime.h>

#include "attention.h"
#include "communicator.h"
#include "device.h"
#include "device_scratch.h"
#include "device_types.h"
#include "lightning.h"
#include "m1/backend.h"
#include "moe.h"
#include "sampling.h"
#include "step_graphs.h"

namespace m1::cuda {

// A non-blocking stream, destroyed after its work has run. The backend declares it first, so it
// outlives every member that still releases memory or graphs on it.
class OwnedStream {
 public:
  OwnedStream();
  ~OwnedStream();
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  operator cudaStream_t() const { return stream_; }  // implicit: passed wherever a cudaStream_t goes

 private:
  cudaStream_t stream_ = nullptr;
};

class CudaBackend final : public Backend {
 public:
  // `graphs`: replay decode steps as CUDA graphs (see step_graphs.h). `device.index` is the GPU,
  // which must be current while the backend is made; `communicator` joins the ranks of a group of
  // more than one (null for one rank).
  CudaBackend(Precision precision, const DeviceInfo& device, const std::string& device_name, bool graphs,
              std::unique_ptr<Communicator> communicator = nullptr, bool time_collectives = false);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override;
  // name() less the rank, GPU index and collectives, plus the kernels' arithmetic revision.
  std::string numerics() const override;
  void attach_thread() override;
  int64_t prefill_alignment() const override;
  void begin_step(std::span<const Segment> segments, int64_t logit_rows) override;
  bool end_step() override;
  bool abandon_step() override;
  const StepGraphs::Stats& graph_stats() const { return graphs_.stats(); }
  Weight upload(const Weight& host) override;
  Mat alloc(int64_t rows, int64_t cols) override;
  void free(Mat m) override;
  void to_host(const Mat& m, float* host) override;
  std::unique_ptr<SequenceState> new_state(const StateShape& shape) override;

  void embed(const Weight& table, int64_t first_token, std::span<const int32_t> tokens, Mat out) override;
  void gather_rows(const Mat& x, std::span<const int64_t> rows, Mat out) override;
  void rmsnorm(const Mat& x, const Weight& w, float eps, Mat out) override;
  void matmul(const Mat& x, const Weight& w, Mat out, Rounding rounding) override;
  void matmuls(const Mat& x, std::span<const Product> products, Rounding rounding) override;
  void rmsnorm_gated(const Mat& x, const Weight& w, float eps, const Mat& gate, Mat out) override;
  void row_sum_squares(const Mat& x, Mat sums) override;
  void rmsnorm_gated_split(const Mat& x, const Mat& sums, int64_t width, const Weight& w, float eps, const Mat& gate,
                           Mat out) override;
  void swiglu(Mat gate, const Mat& up) override;
  void add_scaled(const Mat& a, float alpha, const Mat& b, float beta, Mat out) override;
  void add_scaled_rmsnorm(const Mat& a, float alpha, const Mat& b, float beta, Mat out, const Weight& w, float eps,
                          Mat normed) override;
  void blend_sigmoid(Mat x, const Mat& y, const Mat& coef) override;
  void lightning_attention(Mat qkv, std::span<const Segment> segments, int64_t layer, const Weight& decay,
                           Mat out, Rounding rounding) override;
  void softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                         const AttentionParams& params, Mat out) override;
  void moe(const Mat& x, const MoeWeights& w, Mat out) override;
  std::vector<DrawOutcome> sample(const Mat& logits, std::span<const DrawRequest> draws) override;
  void all_reduce_sum(Mat x) override;
  void gather_columns(const Mat& part, std::span<const int64_t> widths, Mat out) override;
  void synchronize() override;
  // The collectives timed so far (see BackendOptions::time_collectives); waits for those pending.
  CollectiveStats collective_stats() const override;

 private:
  // fn(), a collective, between two timing events when collectives are timed and the step is eager.
  template <class Fn>
  void timed_collective(Fn&& fn);
  // Operands of a product that may round (or not) under this backend's precision.
  GemmOperands operands(Rounding rounding) const;
  // `bytes` of host memory copied into a new device allocation, freed with the backend.
  void* upload_bytes(const void* host, size_t bytes);
  // `bytes` of host data copied into `scratch`, in stream order (the host buffer may be reused
  // as soon as this returns); in a graph step, into the step's stage instead.
  void* upload_to(DeviceScratch& scratch, const void* host, size_t bytes);
  // In a graph step, adds a call's arguments to the step's signature; true when the step is a
  // replay, so the call launches nothing.
  template <class... Args>
  bool replaying(std::string_view call, const Args&... args);

  Device device_;  // first: the members after it are made on its GPU
  OwnedStream stream_;
  StepGraphs graphs_;
  bool graph_candidate_ = false;  // this step may be, or precede, a graph recording
  Precision precision_;
  std::string device_name_;
  std::unique_ptr<Communicator> communicator_;
  bool time_collectives_;
  struct EventPair {
    cudaEvent_t start = nullptr, end = nullptr;
  };
  mutable std::vector<EventPair> timed_, spare_events_;  // recorded, not yet read; read, for reuse
  mutable CollectiveStats collective_stats_;
  std::vector<void*> weights_;  // uploaded tensors, freed with the backend
  DeviceScratch index_scratch_;    // token ids and row indices
  DeviceScratch segment_scratch_;  // segment descriptors
  DeviceScratch matmul_scratch_;   // also the MoE's, so declared before moe_workspace_
  DeviceScratch attention_scratch_;
  DeviceScratch lightning_scratch_;  // what a prefill split into parts passes between its launches
  DeviceScratch sample_scratch_;  // the sampler's working rows
  DeviceScratch draw_scratch_;    // draw descriptors, penalty and bias lists, masks and results
  MoeWorkspace moe_workspace_;
  std::vector<LightningSegment> lightning_segments_;
  std::vector<AttentionSegment> attention_segments_;
  std::vector<DeviceMatrix> w1_, w3_, w2_;
  std::vector<DeviceDraw> device_draws_;
  std::vector<int32_t> seen_ids_, generated_counts_;
  std::vector<TokenBias> biases_;
  std::vector<uint32_t> allowed_words_;  // the masked draws' allowed-token bitmasks, one after another
  std::vector<size_t> draw_of_;  // which request each device draw serves
  std::vector<DrawResult> draw_results_;
};

}  // namespace m1::cuda
