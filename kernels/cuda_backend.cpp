#include "cuda_backend.h"

#include <algorithm>

#include "cuda_check.h"
#include "cuda_state.h"
#include "elementwise.h"
#include "m1/error.h"
#include "matmul.h"

namespace m1::cuda {
namespace {

CudaState& cuda_state(SequenceState* s) { return *static_cast<CudaState*>(s); }

DeviceMatrix device_matrix(const Weight& w) { return DeviceMatrix{w.data, w.dtype, w.rows, w.cols}; }

cudaStream_t make_stream() {
  cudaStream_t stream = nullptr;
  M1_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return stream;
}

}  // namespace

CudaBackend::CudaBackend(Precision precision, const std::string& device_name)
    : stream_(make_stream()),
      precision_(precision),
      device_name_(device_name),
      index_scratch_(stream_),
      segment_scratch_(stream_),
      matmul_scratch_(stream_),
      attention_scratch_(stream_),
      moe_workspace_(stream_, matmul_scratch_) {}

CudaBackend::~CudaBackend() {
  // Errors are ignored: a destructor cannot report them (a failed step has reported its own).
  cudaStreamSynchronize(stream_);
  for (void* p : weights_) cudaFree(p);
  for (auto& [host, copy] : decays_) cudaFree(copy.device);
  cudaStreamDestroy(stream_);
}

std::string CudaBackend::name() const {
  return fmt::format("cuda ({}, {} precision)", device_name_, precision_ == Precision::kFast ? "fast" : "exact");
}

GemmOperands CudaBackend::operands(Rounding rounding) const {
  return precision_ == Precision::kFast && rounding == Rounding::kAllowed ? GemmOperands::kBf16 : GemmOperands::kFp32;
}

Weight CudaBackend::upload(const TensorView& t) {
  const DType dtype = t.weight_dtype();
  void* device = nullptr;
  M1_CUDA_CHECK(cudaMalloc(&device, std::max<size_t>(t.nbytes, 1)));
  weights_.push_back(device);
  // On the backend's stream: a pageable copy may still be landing when cudaMemcpy returns, and
  // the stream (non-blocking) would not wait for the default stream.
  M1_CUDA_CHECK(cudaMemcpyAsync(device, t.data, t.nbytes, cudaMemcpyHostToDevice, stream_));
  return Weight{device, dtype, t.shape.size() == 2 ? t.shape[0] : 1, t.shape.back()};
}

Mat CudaBackend::alloc(int64_t rows, int64_t cols) {
  void* p = nullptr;
  M1_CUDA_CHECK(cudaMallocAsync(&p, size_t(std::max<int64_t>(rows * cols, 1)) * sizeof(float), stream_));
  return Mat{static_cast<float*>(p), rows, cols};
}

void CudaBackend::free(Mat m) { cudaFreeAsync(m.data, stream_); }

void CudaBackend::to_host(const Mat& m, float* host) {
  M1_CUDA_CHECK(cudaMemcpyAsync(host, m.data, size_t(m.size()) * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  M1_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::unique_ptr<SequenceState> CudaBackend::new_state(const StateShape& shape) {
  return std::make_unique<CudaState>(shape, stream_);
}

void* CudaBackend::upload_to(DeviceScratch& scratch, const void* host, size_t bytes) {
  void* device = scratch.get(std::max<size_t>(bytes, 1));
  if (bytes) M1_CUDA_CHECK(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_));
  return device;
}

const float* CudaBackend::device_decay(std::span<const float> decay) {
  DecayCopy& copy = decays_[decay.data()];
  const bool same = copy.host.size() == decay.size() && std::equal(decay.begin(), decay.end(), copy.host.begin());
  if (same) return copy.device;
  if (copy.host.size() != decay.size()) {
    M1_CUDA_CHECK(cudaStreamSynchronize(stream_));  // a queued kernel may still read the old copy
    cudaFree(copy.device);
    copy.device = nullptr;
    copy.host.clear();
    M1_CUDA_CHECK(cudaMalloc(&copy.device, std::max<size_t>(decay.size(), 1) * sizeof(float)));
  }
  copy.host.assign(decay.begin(), decay.end());
  // Stream-ordered after every kernel that read the previous values.
  M1_CUDA_CHECK(cudaMemcpyAsync(copy.device, copy.host.data(), decay.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
  return copy.device;
}

void CudaBackend::embed(const Weight& table, std::span<const int32_t> tokens, Mat out) {
  const auto* ids = static_cast<const int32_t*>(upload_to(index_scratch_, tokens.data(), tokens.size_bytes()));
  cuda::embed(device_matrix(table), ids, int64_t(tokens.size()), out.data, stream_);
}

void CudaBackend::gather_rows(const Mat& x, std::span<const int64_t> rows, Mat out) {
  const auto* ids = static_cast<const int64_t*>(upload_to(index_scratch_, rows.data(), rows.size_bytes()));
  cuda::gather_rows(x.data, x.cols, ids, int64_t(rows.size()), out.data, stream_);
}

void CudaBackend::rmsnorm(const Mat& x, const Weight& w, float eps, Mat out) {
  cuda::rmsnorm(x.data, x.rows, x.cols, device_matrix(w), eps, out.data, stream_);
}

void CudaBackend::matmul(const Mat& x, const Weight& w, Mat out, Rounding rounding) {
  cuda::matmul(x.data, x.cols, x.rows, device_matrix(w), out.data, out.cols, operands(rounding), matmul_scratch_, stream_);
}

void CudaBackend::silu(Mat x) { cuda::silu(x.data, x.size(), stream_); }

void CudaBackend::sigmoid_gate(const Mat& gate, Mat x) { cuda::sigmoid_gate(gate.data, x.data, x.size(), stream_); }

void CudaBackend::swiglu(Mat gate, const Mat& up) { cuda::swiglu(gate.data, up.data, gate.size(), stream_); }

void CudaBackend::add_scaled(const Mat& a, float alpha, const Mat& b, float beta, Mat out) {
  cuda::add_scaled(a.data, alpha, b.data, beta, out.data, out.size(), stream_);
}

void CudaBackend::blend_sigmoid(Mat x, const Mat& y, const Mat& coef) {
  cuda::blend_sigmoid(x.data, y.data, coef.data, x.rows, x.cols, stream_);
}

void CudaBackend::lightning_attention(const Mat& qkv, std::span<const Segment> segments, int64_t layer,
                                      std::span<const float> decay, Mat out) {
  const int64_t heads = int64_t(decay.size());
  lightning_segments_.clear();
  for (const Segment& seg : segments)
    lightning_segments_.push_back(LightningSegment{seg.row, seg.count, cuda_state(seg.state).lightning(layer)});
  LightningArgs args;
  args.qkv = qkv.data;
  args.qkv_stride = qkv.cols;
  args.out = out.data;
  args.out_stride = out.cols;
  args.heads = heads;
  args.d = out.cols / heads;
  args.decay = device_decay(decay);
  args.segments = lightning_segments_;
  args.device_segments = static_cast<const LightningSegment*>(
      upload_to(segment_scratch_, lightning_segments_.data(), lightning_segments_.size() * sizeof(LightningSegment)));
  cuda::lightning_attention(args, stream_);
}

void CudaBackend::softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                                    const AttentionParams& p, Mat out) {
  attention_segments_.clear();
  for (const Segment& seg : segments) {
    CudaState& state = cuda_state(seg.state);
    state.reserve(state.length() + seg.count);
    attention_segments_.push_back(AttentionSegment{seg.row, seg.count, state.length(), state.keys(layer), state.values(layer)});
  }
  AttentionArgs args;
  args.q = q.data;
  args.q_stride = q.cols;
  args.k = k.data;
  args.k_stride = k.cols;
  args.v = v.data;
  args.v_stride = v.cols;
  args.out = out.data;
  args.out_stride = out.cols;
  args.heads = p.heads;
  args.kv_heads = p.kv_heads;
  args.d = p.head_dim;
  args.rotary_dim = p.rotary_dim;
  args.rope_theta = p.rope_theta;
  args.segments = attention_segments_;
  args.device_segments = static_cast<const AttentionSegment*>(
      upload_to(segment_scratch_, attention_segments_.data(), attention_segments_.size() * sizeof(AttentionSegment)));
  cuda::softmax_attention(args, attention_scratch_, stream_);
}

void CudaBackend::moe(const Mat& x, const MoeWeights& w, Mat out) {
  auto to_device = [](const std::vector<Weight>& from, std::vector<DeviceMatrix>& to) {
    to.clear();
    for (const Weight& e : from) to.push_back(device_matrix(e));
  };
  to_device(w.w1, w1_);
  to_device(w.w3, w3_);
  to_device(w.w2, w2_);
  MoeArgs args;
  args.x = x.data;
  args.rows = x.rows;
  args.hidden = x.cols;
  args.router = device_matrix(w.router);
  args.w1 = w1_;
  args.w3 = w3_;
  args.w2 = w2_;
  args.top_k = w.top_k;
  args.operands = operands(Rounding::kAllowed);
  args.out = out.data;
  cuda::moe(args, moe_workspace_, stream_);
}

std::unique_ptr<Backend> create_cuda_backend(const BackendOptions& options) {
  if (options.reference_kernels) fail("device 'cuda': reference kernels run on the CPU only");
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) fail("device 'cuda': no usable CUDA device ({})", cudaGetErrorString(status));
  if (count == 0) fail("device 'cuda': no usable CUDA device (none found)");
  int device = 0;
  M1_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp properties{};
  M1_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  // bf16 tensor cores (wmma on __nv_bfloat16) need compute capability 8.0.
  if (properties.major < 8)
    fail("device 'cuda': no usable CUDA device ({} has compute capability {}.{}; m1 needs 8.0 or newer)", properties.name,
         properties.major, properties.minor);
  return std::make_unique<CudaBackend>(options.precision, properties.name);
}

}  // namespace m1::cuda
