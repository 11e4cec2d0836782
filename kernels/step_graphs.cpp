#include "step_graphs.h"

#include <cstring>
#include <vector>

#include "cuda_check.h"
#include "m1/error.h"
#include "memory_epoch.h"

namespace m1::cuda {
namespace {

// A decode step of 256 sequences through 80 layers stages about 2 MB of descriptors.
constexpr size_t kStageBytes = size_t(8) << 20;
// Staged pieces start on the alignment DeviceScratch gives, which kernels may rely on.
constexpr size_t kStageAlignment = 256;
// Recordings kept: batch compositions seen within one memory epoch.
constexpr size_t kMaxRecordings = 16;

uint64_t mix(uint64_t hash, uint64_t value) {
  // splitmix64's finaliser over the running hash and the value: order-sensitive.
  uint64_t z = hash ^ (value + 0x9E3779B97F4A7C15ULL + (hash << 6) + (hash >> 2));
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The kernel nodes of a recorded step: the launches a replay saves. 0 if CUDA cannot say.
int64_t kernel_nodes(cudaGraph_t graph) {
  size_t count = 0;
  if (cudaGraphGetNodes(graph, nullptr, &count) != cudaSuccess) return 0;
  std::vector<cudaGraphNode_t> nodes(count);
  if (count && cudaGraphGetNodes(graph, nodes.data(), &count) != cudaSuccess) return 0;
  int64_t kernels = 0;
  for (size_t i = 0; i < count; ++i) {
    cudaGraphNodeType type;
    if (cudaGraphNodeGetType(nodes[i], &type) == cudaSuccess && type == cudaGraphNodeTypeKernel) ++kernels;
  }
  return kernels;
}

}  // namespace

StepGraphs::StepGraphs(cudaStream_t stream, bool enabled) : stream_(stream), enabled_(enabled) {
  if (!enabled_) return;
  // Here rather than at the first graph step: pinned allocation may wait for the whole device,
  // which must never happen between the launches of a step (a peer rank's collective could be
  // waiting for this rank's next one).
  M1_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_stage_), kStageBytes, cudaHostAllocDefault));
  M1_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&device_stage_), kStageBytes));
  M1_CUDA_CHECK(cudaEventCreateWithFlags(&stage_copied_, cudaEventDisableTiming));
}

StepGraphs::~StepGraphs() {
  // Errors are ignored: a destructor cannot report them.
  abandon();
  forget_all();
  if (stage_copied_) cudaEventSynchronize(stage_copied_), cudaEventDestroy(stage_copied_);
  cudaFreeHost(host_stage_);
  cudaFree(device_stage_);
}

void StepGraphs::begin(std::vector<uint64_t> key) {
  abandon();  // a step whose caller threw past its end
  signature_ = 0;
  staged_ = 0;
  if (!enabled_ || key.empty()) {
    key_.clear();
    ++stats_.eager;
    return;
  }
  if (memory_epoch() != epoch_) {  // the recordings may point into memory that has moved
    forget_all();
    epoch_ = memory_epoch();
  }
  const auto found = recordings_.find(key);
  if (found != recordings_.end())
    mode_ = found->second.exec ? Mode::kReplay : Mode::kEager;
  else if (key == key_)  // the previous step's
    mode_ = Mode::kRecord;
  key_ = std::move(key);
  if (mode_ == Mode::kEager) {
    ++stats_.eager;
    return;
  }
  // The previous graph step's copy may still be reading the host stage.
  M1_CUDA_CHECK(cudaEventSynchronize(stage_copied_));
  if (mode_ == Mode::kRecord) {
    // Relaxed: other threads' CUDA calls (none expected) must not invalidate the capture.
    const cudaError_t status = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed);
    if (status != cudaSuccess) {
      mode_ = Mode::kEager;
      recordings_[key_] = Recording{};
      ++stats_.eager;
    }
  }
}

void* StepGraphs::stage(const void* host, size_t bytes) {
  const size_t at = (staged_ + kStageAlignment - 1) / kStageAlignment * kStageAlignment;
  if (at + bytes > kStageBytes) fail("CUDA graph step: its inputs exceed the {} MiB stage", kStageBytes >> 20);
  if (bytes) std::memcpy(host_stage_ + at, host, bytes);
  staged_ = at + bytes;
  note({at, bytes});
  return device_stage_ + at;
}

void StepGraphs::note(std::initializer_list<uint64_t> values) {
  for (uint64_t v : values) signature_ = mix(signature_, v);
}

bool StepGraphs::end() {
  const Mode mode = mode_;
  mode_ = Mode::kEager;
  if (mode == Mode::kEager) return true;
  if (mode == Mode::kRecord) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    bool ok = cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph;
    // Memory that moved during the capture may be baked into it.
    ok = ok && memory_epoch() == epoch_ && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    if (ok) stats_.kernels = kernel_nodes(graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();  // a failed capture leaves its error for the next check otherwise
    if (!ok) {
      recordings_[key_] = Recording{};
      ++stats_.rejected;
      return false;
    }
    if (recordings_.size() >= kMaxRecordings) forget_all();
    const Recording& recording = recordings_[key_] = Recording{exec, signature_};
    launch(recording);
    ++stats_.recorded;
    return true;
  }
  Recording& recording = recordings_.at(key_);
  if (recording.signature != signature_) {  // the staged pieces' places are part of it
    destroy(recording.exec);
    recording = Recording{};
    ++stats_.rejected;
    return false;
  }
  launch(recording);
  ++stats_.replayed;
  return true;
}

bool StepGraphs::abandon() {
  const Mode mode = mode_;
  mode_ = Mode::kEager;
  if (mode == Mode::kEager) return false;
  if (mode == Mode::kRecord) {
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
  }
  const auto found = recordings_.find(key_);
  if (found != recordings_.end()) destroy(found->second.exec);
  recordings_[key_] = Recording{};
  ++stats_.rejected;
  return true;
}

void StepGraphs::launch(const Recording& recording) {
  if (staged_)  // as the recording staged: the signatures matched
    M1_CUDA_CHECK(cudaMemcpyAsync(device_stage_, host_stage_, staged_, cudaMemcpyHostToDevice, stream_));
  M1_CUDA_CHECK(cudaEventRecord(stage_copied_, stream_));
  M1_CUDA_CHECK(cudaGraphLaunch(recording.exec, stream_));
}

void StepGraphs::destroy(cudaGraphExec_t exec) {
  if (!exec) return;
  cudaStreamSynchronize(stream_);  // a launch of it may still be running
  cudaGraphExecDestroy(exec);
}

void StepGraphs::forget_all() {
  for (auto& [key, recording] : recordings_) destroy(recording.exec);
  recordings_.clear();
}

}  // namespace m1::cuda
