#include "cuda_backend.h"

#include <algorithm>
#include <bit>
#include <functional>
#include <type_traits>

#include "cuda_check.h"
#include "cuda_state.h"
#include "elementwise.h"
#include "m1/error.h"
#include "matmul.h"
#include "memory_epoch.h"
#include "quantized_matmul.h"

namespace m1::cuda {
namespace {

CudaState& cuda_state(SequenceState* s) { return *static_cast<CudaState*>(s); }

DeviceMatrix device_matrix(const Weight& w) {
  return DeviceMatrix{w.data, w.dtype, w.rows, w.cols, w.scales, w.scale_dtype, w.group_size};
}

// Batches up to this many decode rows are replayed as graphs; larger ones are not launch-bound.
constexpr size_t kMaxGraphBatch = 256;

// A call argument as 64 bits of a graph step's signature.
template <class T>
uint64_t signature_bits(const T& value) {
  if constexpr (std::is_pointer_v<T>)
    return uint64_t(reinterpret_cast<uintptr_t>(value));
  else if constexpr (std::is_enum_v<T>)
    return uint64_t(value);
  else if constexpr (std::is_same_v<T, float>)
    return std::bit_cast<uint32_t>(value);
  else if constexpr (std::is_same_v<T, double>)
    return std::bit_cast<uint64_t>(value);
  else
    return uint64_t(value);
}

}  // namespace

OwnedStream::OwnedStream() { M1_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }

OwnedStream::~OwnedStream() {
  // Errors are ignored: a destructor cannot report them (a failed step has reported its own).
  cudaStreamSynchronize(stream_);
  cudaStreamDestroy(stream_);
}

CudaBackend::CudaBackend(Precision precision, const DeviceInfo& device, const std::string& device_name, bool graphs,
                         std::unique_ptr<Communicator> communicator, bool time_collectives)
    : Backend(device),
      device_(device.index),
      graphs_(stream_, graphs),
      precision_(precision),
      device_name_(device_name),
      communicator_(std::move(communicator)),
      time_collectives_(time_collectives),
      index_scratch_(stream_),
      segment_scratch_(stream_),
      matmul_scratch_(stream_),
      attention_scratch_(stream_),
      lightning_scratch_(stream_),
      sample_scratch_(stream_),
      draw_scratch_(stream_),
      moe_workspace_(stream_, matmul_scratch_) {}

CudaBackend::~CudaBackend() {
  const DeviceGuard current(device_.index());
  // Errors are ignored: a destructor cannot report them (a failed step has reported its own).
  graphs_.abandon();
  cudaStreamSynchronize(stream_);
  for (void* p : weights_) cudaFree(p);
  for (const auto* events : {&timed_, &spare_events_})
    for (const EventPair& pair : *events) cudaEventDestroy(pair.start), cudaEventDestroy(pair.end);
}

// The kernels' arithmetic, as snapshot files record it: raised whenever a change moves the bits
// a state holds (2: the bf16 lightning prefill adds each block's state term by one fused
// multiply-add; 3: softmax prefill rows past 4,096 keys fold their chunks' states), so that a file
// written before is skipped rather than resumed with other bits.
constexpr int kArithmeticRevision = 3;

std::string CudaBackend::numerics() const {
  const char* precision = precision_ == Precision::kFast ? "fast" : "exact";
  if (!communicator_) return fmt::format("cuda ({}, {} precision, arithmetic {})", device_name_, precision, kArithmeticRevision);
  return fmt::format("cuda ({}, {} precision, arithmetic {}, {} collectives)", device_name_, precision,
                     kArithmeticRevision, communicator_->name());
}

std::string CudaBackend::name() const {
  const char* precision = precision_ == Precision::kFast ? "fast" : "exact";
  if (!communicator_) return fmt::format("cuda ({}, {} precision)", device_name_, precision);
  return fmt::format("cuda rank {}/{} (GPU {}, {}, {} precision, {} collectives)", device().rank, device().world,
                     device_.index(), device_name_, precision, communicator_->name());
}

void CudaBackend::attach_thread() { M1_CUDA_CHECK(cudaSetDevice(device_.index())); }

// Lightning prefill blocks (32 or 64 tokens) and attention prefill tiles (64 or 128 query rows
// of a group's heads, so at most 128 tokens) all count from a segment's first token: cuts at
// multiples of 128 leave each tile on the same tokens.
int64_t CudaBackend::prefill_alignment() const { return 128; }

GemmOperands CudaBackend::operands(Rounding rounding) const {
  return precision_ == Precision::kFast && rounding == Rounding::kAllowed ? GemmOperands::kBf16 : GemmOperands::kFp32;
}

void* CudaBackend::upload_bytes(const void* host, size_t bytes) {
  void* device = nullptr;
  M1_CUDA_CHECK(cudaMalloc(&device, std::max<size_t>(bytes, 1)));
  weights_.push_back(device);
  // On the backend's stream: a pageable copy may still be landing when cudaMemcpy returns, and
  // the stream (non-blocking) would not wait for the default stream.
  M1_CUDA_CHECK(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_));
  return device;
}

Weight CudaBackend::upload(const Weight& host) {
  // Quantized: the packed codes and their scales, each in its own allocation (256-byte aligned,
  // so the kernels copy whole 16-byte units of rows that are).
  if (host.quantized()) check_quantized(device_matrix(host), "upload");
  const DeviceGuard current(device_.index());
  Weight w = host;
  w.data = upload_bytes(host.data, host.data_bytes());
  if (host.quantized()) w.scales = upload_bytes(host.scales, host.scale_bytes());
  return w;
}

Mat CudaBackend::alloc(int64_t rows, int64_t cols) {
  const DeviceGuard current(device_.index());
  void* p = nullptr;
  M1_CUDA_CHECK(cudaMallocAsync(&p, size_t(std::max<int64_t>(rows * cols, 1)) * sizeof(float), stream_));
  return Mat{static_cast<float*>(p), rows, cols};
}

void CudaBackend::free(Mat m) {
  const DeviceGuard current(device_.index());
  cudaFreeAsync(m.data, stream_);
  memory_moved();
}

void CudaBackend::begin_step(std::span<const Segment> segments, int64_t logit_rows) {
  const DeviceGuard current(device_.index());
  bool decode = !segments.empty() && segments.size() <= kMaxGraphBatch;
  for (const Segment& seg : segments) {
    // Here rather than in softmax_attention: growing moves memory, which the key must see.
    cuda_state(seg.state).reserve(seg.state->length() + seg.count);
    decode = decode && seg.count == 1;
  }
  // Everything a decode step's launches depend on besides the memory epoch: the rows of logits
  // and the sequences' memory in order (their lengths reach the kernels through staged
  // descriptors). Layouts rather than addresses: a new state may reuse a freed one's address.
  std::vector<uint64_t> key;
  if (decode) {
    key.push_back(uint64_t(logit_rows));
    for (const Segment& seg : segments) key.push_back(cuda_state(seg.state).layout());
  }
  // With replay off, nothing is ever recorded: launches keep their length-sized grids.
  graph_candidate_ = decode && graphs_.enabled();
  graphs_.begin(std::move(key));
}

bool CudaBackend::end_step() {
  const DeviceGuard current(device_.index());
  graph_candidate_ = false;
  return graphs_.end();
}

bool CudaBackend::abandon_step() {
  const DeviceGuard current(device_.index());
  graph_candidate_ = false;
  return graphs_.abandon();
}

template <class... Args>
bool CudaBackend::replaying(std::string_view call, const Args&... args) {
  if (graphs_.mode() == StepGraphs::Mode::kEager) return false;
  graphs_.note({std::hash<std::string_view>{}(call), signature_bits(args)...});
  return graphs_.mode() == StepGraphs::Mode::kReplay;
}

void CudaBackend::to_host(const Mat& m, float* host) {
  const DeviceGuard current(device_.index());
  M1_CUDA_CHECK(cudaMemcpyAsync(host, m.data, size_t(m.size()) * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  M1_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::unique_ptr<SequenceState> CudaBackend::new_state(const StateShape& shape) {
  const DeviceGuard current(device_.index());
  return std::make_unique<CudaState>(shape, device_.index(), stream_);
}

void* CudaBackend::upload_to(DeviceScratch& scratch, const void* host, size_t bytes) {
  if (graphs_.mode() != StepGraphs::Mode::kEager) return graphs_.stage(host, bytes);
  void* device = scratch.get(std::max<size_t>(bytes, 1));
  if (bytes) M1_CUDA_CHECK(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_));
  return device;
}

void CudaBackend::embed(const Weight& table, int64_t first_token, std::span<const int32_t> tokens, Mat out) {
  const DeviceGuard current(device_.index());
  const auto* ids = static_cast<const int32_t*>(upload_to(index_scratch_, tokens.data(), tokens.size_bytes()));
  if (replaying("embed", table.data, first_token, ids, tokens.size(), out.data)) return;
  cuda::embed(device_matrix(table), first_token, ids, int64_t(tokens.size()), out.data, stream_);
}

void CudaBackend::gather_rows(const Mat& x, std::span<const int64_t> rows, Mat out) {
  const DeviceGuard current(device_.index());
  const auto* ids = static_cast<const int64_t*>(upload_to(index_scratch_, rows.data(), rows.size_bytes()));
  if (replaying("gather_rows", x.data, x.cols, ids, rows.size(), out.data)) return;
  cuda::gather_rows(x.data, x.cols, ids, int64_t(rows.size()), out.data, stream_);
}

void CudaBackend::rmsnorm(const Mat& x, const Weight& w, float eps, Mat out) {
  const DeviceGuard current(device_.index());
  if (replaying("rmsnorm", x.data, x.rows, x.cols, w.data, eps, out.data)) return;
  cuda::rmsnorm(x.data, x.rows, x.cols, device_matrix(w), eps, nullptr, out.data, stream_);
}

void CudaBackend::rmsnorm_gated(const Mat& x, const Weight& w, float eps, const Mat& gate, Mat out) {
  const DeviceGuard current(device_.index());
  if (replaying("rmsnorm_gated", x.data, x.rows, x.cols, w.data, eps, gate.data, out.data)) return;
  cuda::rmsnorm(x.data, x.rows, x.cols, device_matrix(w), eps, gate.data, out.data, stream_);
}

void CudaBackend::row_sum_squares(const Mat& x, Mat sums) {
  const DeviceGuard current(device_.index());
  if (replaying("row_sum_squares", x.data, x.rows, x.cols, sums.data)) return;
  cuda::row_sum_squares(x.data, x.rows, x.cols, sums.data, stream_);
}

void CudaBackend::rmsnorm_gated_split(const Mat& x, const Mat& sums, int64_t width, const Weight& w, float eps,
                                      const Mat& gate, Mat out) {
  const DeviceGuard current(device_.index());
  if (replaying("rmsnorm_gated_split", x.data, x.rows, x.cols, sums.data, width, w.data, eps, gate.data, out.data))
    return;
  cuda::rmsnorm_with_sums(x.data, x.rows, x.cols, sums.data, width, device_matrix(w), eps, gate.data, out.data, stream_);
}

void CudaBackend::matmul(const Mat& x, const Weight& w, Mat out, Rounding rounding) {
  const DeviceGuard current(device_.index());
  if (replaying("matmul", x.data, x.rows, x.cols, w.data, w.rows, out.data, out.cols, rounding)) return;
  cuda::matmul(x.data, x.cols, x.rows, device_matrix(w), out.data, out.cols, operands(rounding), matmul_scratch_, device_,
              stream_);
}

void CudaBackend::matmuls(const Mat& x, std::span<const Product> products, Rounding rounding) {
  const DeviceGuard current(device_.index());
  bool replay = false;  // each product noted as a call of its own
  for (const Product& p : products)
    replay = replaying("matmuls", x.data, x.rows, x.cols, p.w->data, p.w->rows, p.out.data, p.out.cols, rounding);
  if (replay) return;
  std::vector<cuda::PlainProduct> device_products;
  for (const Product& p : products) device_products.push_back({device_matrix(*p.w), p.out.data, p.out.cols});
  cuda::matmuls(x.data, x.cols, x.rows, device_products, operands(rounding), matmul_scratch_, device_, stream_);
}

void CudaBackend::swiglu(Mat gate, const Mat& up) {
  const DeviceGuard current(device_.index());
  if (replaying("swiglu", gate.data, up.data, gate.size())) return;
  cuda::swiglu(gate.data, up.data, gate.size(), stream_);
}

void CudaBackend::add_scaled(const Mat& a, float alpha, const Mat& b, float beta, Mat out) {
  const DeviceGuard current(device_.index());
  if (replaying("add_scaled", a.data, alpha, b.data, beta, out.data, out.size())) return;
  cuda::add_scaled(a.data, alpha, b.data, beta, out.data, out.size(), stream_);
}

void CudaBackend::add_scaled_rmsnorm(const Mat& a, float alpha, const Mat& b, float beta, Mat out, const Weight& w,
                                     float eps, Mat normed) {
  const DeviceGuard current(device_.index());
  if (replaying("add_scaled_rmsnorm", a.data, alpha, b.data, beta, out.data, out.rows, out.cols, w.data, eps,
                normed.data))
    return;
  cuda::add_scaled_rmsnorm(a.data, alpha, b.data, beta, out.data, out.rows, out.cols, device_matrix(w), eps,
                           normed.data, stream_);
}

void CudaBackend::blend_sigmoid(Mat x, const Mat& y, const Mat& coef) {
  const DeviceGuard current(device_.index());
  if (replaying("blend_sigmoid", x.data, x.rows, x.cols, y.data, coef.data)) return;
  cuda::blend_sigmoid(x.data, y.data, coef.data, x.rows, x.cols, stream_);
}

void CudaBackend::lightning_attention(Mat qkv, std::span<const Segment> segments, int64_t layer, const Weight& decay,
                                      Mat out, Rounding rounding) {
  const DeviceGuard current(device_.index());
  const int64_t heads = decay.cols;
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
  args.decay = static_cast<const float*>(decay.data);
  args.segments = lightning_segments_;
  args.device_segments = static_cast<const LightningSegment*>(
      upload_to(segment_scratch_, lightning_segments_.data(), lightning_segments_.size() * sizeof(LightningSegment)));
  args.bf16_operands = precision_ == Precision::kFast && rounding == Rounding::kAllowed;
  if (replaying("lightning_attention", qkv.data, qkv.rows, qkv.cols, args.decay, args.device_segments,
                lightning_segments_.size(), out.data, out.cols))
    return;
  cuda::lightning_attention(args, lightning_scratch_, device_, stream_);
}

void CudaBackend::softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                                    const AttentionParams& p, Mat out) {
  const DeviceGuard current(device_.index());
  attention_segments_.clear();
  for (const Segment& seg : segments) {
    const CudaState& state = cuda_state(seg.state);
    // begin_step makes the room; growing here could allocate inside a graph recording.
    if (state.length() + seg.count > state.capacity())
      fail("softmax attention: the KV cache holds {} tokens, the step needs {} (begin_step was not called)",
           state.capacity(), state.length() + seg.count);
    // A graph's launch must serve the lengths of later replays, so it is sized by the room; the
    // eager step before a recording too, so that it grows the scratch to what the graph needs.
    const int64_t capacity = graph_candidate_ ? state.capacity() : 0;
    attention_segments_.push_back(
        AttentionSegment{seg.row, seg.count, state.length(), state.keys(layer), state.values(layer), capacity});
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
  args.bf16_operands = precision_ == Precision::kFast && p.rounding == Rounding::kAllowed;
  args.segments = attention_segments_;
  args.device_segments = static_cast<const AttentionSegment*>(
      upload_to(segment_scratch_, attention_segments_.data(), attention_segments_.size() * sizeof(AttentionSegment)));
  if (replaying("softmax_attention", q.data, k.data, v.data, q.rows, args.device_segments, attention_segments_.size(),
                layer, out.data))
    return;
  cuda::softmax_attention(args, attention_scratch_, device_, stream_);
}

void CudaBackend::moe(const Mat& x, const MoeWeights& w, Mat out) {
  const DeviceGuard current(device_.index());
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
  args.first_expert = w.first_expert;
  args.operands = operands(Rounding::kAllowed);
  args.out = out.data;
  if (replaying("moe", x.data, x.rows, x.cols, w.router.data, w.top_k, w.first_expert, out.data)) return;
  cuda::moe(args, moe_workspace_, device_, stream_);
}

std::vector<DrawOutcome> CudaBackend::sample(const Mat& logits, std::span<const DrawRequest> draws) {
  const DeviceGuard current(device_.index());
  std::vector<DrawOutcome> outcomes(draws.size());
  device_draws_.clear();
  seen_ids_.clear();
  generated_counts_.clear();
  biases_.clear();
  allowed_words_.clear();
  draw_of_.clear();
  for (size_t i = 0; i < draws.size(); ++i) {
    const DrawRequest& r = draws[i];
    if (r.row < 0 || r.row >= logits.rows) fail("sample: row {} is outside the {} rows of logits", r.row, logits.rows);
    const SamplingParams& p = r.params;
    outcomes[i].error = penalty_ids_error(r, logits.cols);
    if (!outcomes[i].error.empty()) continue;
    DeviceDraw d;
    d.row = r.row;
    d.temperature = p.temperature;
    d.top_p = p.top_p;
    d.min_p = p.min_p;
    d.top_k = p.top_k;
    d.top_logprobs = p.top_logprobs;  // validate() keeps it within kMaxTopLogprobs
    d.uniform = r.uniform;
    d.presence_penalty = p.presence_penalty;
    d.frequency_penalty = p.frequency_penalty;
    d.repetition_penalty = p.repetition_penalty;
    if (has_penalties(p)) {
      d.seen_begin = int64_t(seen_ids_.size());
      d.seen_count = int64_t(r.seen.size());
      seen_ids_.insert(seen_ids_.end(), r.seen.begin(), r.seen.end());
      d.counts_begin = int64_t(generated_counts_.size() / 2);
      d.counts_count = int64_t(r.generated_counts.size());
      for (auto [id, count] : r.generated_counts) generated_counts_.insert(generated_counts_.end(), {id, count});
    }
    d.bias_begin = int64_t(biases_.size());
    d.bias_count = int64_t(r.logit_bias.size());
    biases_.insert(biases_.end(), r.logit_bias.begin(), r.logit_bias.end());
    if (!r.allowed.empty()) {  // penalty_ids_error checked its size
      d.allowed_begin = int64_t(allowed_words_.size());
      allowed_words_.insert(allowed_words_.end(), r.allowed.begin(), r.allowed.end());
    }
    device_draws_.push_back(d);
    draw_of_.push_back(i);
  }
  if (device_draws_.empty()) return outcomes;

  // Everything the draws read and write, laid out in one scratch buffer.
  SampleArgs args = carve_scratch(draw_scratch_, [&](ScratchCarver& c) {
    SampleArgs a;
    a.device_draws = c.take<DeviceDraw>(std::ssize(device_draws_));
    a.seen = c.take<int32_t>(std::ssize(seen_ids_));
    a.generated_counts = c.take<int32_t>(std::ssize(generated_counts_));
    a.biases = c.take<TokenBias>(std::ssize(biases_));
    a.allowed = c.take<uint32_t>(std::ssize(allowed_words_));
    a.results = c.take<DrawResult>(std::ssize(device_draws_));
    return a;
  });
  args.logits = logits.data;
  args.vocab = logits.cols;
  args.draws = device_draws_;
  auto copy_in = [&](const void* to, const auto& from) {
    if (!from.empty())
      M1_CUDA_CHECK(cudaMemcpyAsync(const_cast<void*>(to), from.data(), from.size() * sizeof(from[0]),
                                    cudaMemcpyHostToDevice, stream_));
  };
  copy_in(args.device_draws, device_draws_);
  copy_in(args.seen, seen_ids_);
  copy_in(args.generated_counts, generated_counts_);
  copy_in(args.biases, biases_);
  copy_in(args.allowed, allowed_words_);
  cuda::sample(args, sample_scratch_, device_, stream_);

  draw_results_.resize(device_draws_.size());
  M1_CUDA_CHECK(cudaMemcpyAsync(draw_results_.data(), args.results, draw_results_.size() * sizeof(DrawResult),
                                cudaMemcpyDeviceToHost, stream_));
  M1_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (size_t j = 0; j < draw_results_.size(); ++j) {
    const DrawResult& result = draw_results_[j];
    DrawOutcome& outcome = outcomes[draw_of_[j]];
    if (result.status != kDrawOk) {
      outcome.error = draw_status_message(result.status);
      continue;
    }
    outcome.token.id = result.id;
    outcome.token.logprob = result.logprob;
    for (int32_t t = 0; t < result.top_count; ++t) outcome.token.top.emplace_back(result.top_ids[t], result.top_logprobs[t]);
  }
  return outcomes;
}

template <class Fn>
void CudaBackend::timed_collective(Fn&& fn) {
  if (!time_collectives_ || graphs_.mode() != StepGraphs::Mode::kEager) return fn();
  EventPair pair;
  if (spare_events_.empty()) {
    M1_CUDA_CHECK(cudaEventCreate(&pair.start));
    M1_CUDA_CHECK(cudaEventCreate(&pair.end));
  } else {
    pair = spare_events_.back();
    spare_events_.pop_back();
  }
  M1_CUDA_CHECK(cudaEventRecord(pair.start, stream_));
  fn();
  M1_CUDA_CHECK(cudaEventRecord(pair.end, stream_));
  timed_.push_back(pair);
}

CollectiveStats CudaBackend::collective_stats() const {
  const DeviceGuard current(device_.index());
  for (const EventPair& pair : timed_) {
    float ms = 0;
    M1_CUDA_CHECK(cudaEventSynchronize(pair.end));
    M1_CUDA_CHECK(cudaEventElapsedTime(&ms, pair.start, pair.end));
    collective_stats_.seconds += double(ms) / 1000;
    ++collective_stats_.calls;
    spare_events_.push_back(pair);
  }
  timed_.clear();
  return collective_stats_;
}

void CudaBackend::all_reduce_sum(Mat x) {
  if (!communicator_) return;
  const DeviceGuard current(device_.index());
  if (replaying("all_reduce_sum", x.data, x.size())) return;
  timed_collective([&] { communicator_->all_reduce_sum(x.data, x.size(), stream_); });
}

void CudaBackend::gather_columns(const Mat& part, std::span<const int64_t> widths, Mat out) {
  const DeviceGuard current(device_.index());
  if (replaying("gather_columns", part.data, part.rows, part.cols, out.data)) return;
  if (communicator_) {
    timed_collective([&] { communicator_->gather_columns(part.data, part.rows, widths, out.data, stream_); });
  } else if (out.data != part.data && part.size() > 0) {
    M1_CUDA_CHECK(cudaMemcpyAsync(out.data, part.data, size_t(part.size()) * sizeof(float), cudaMemcpyDeviceToDevice,
                                  stream_));
  }
}

void CudaBackend::synchronize() {
  const DeviceGuard current(device_.index());
  M1_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace m1::cuda
