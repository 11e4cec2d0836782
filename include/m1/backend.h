#pragma once
// The interface the model forward is written against, once. A backend owns device memory, the
// per-sequence state and the kernels; the CPU backend (src/cpu) and the CUDA backend (kernels/) implement it.
// All activations are fp32; weights stay in their stored dtype, or are int8/int4 quantized. A
// backend knows its device and its place in a tensor-parallel group, and makes the group's
// collectives (DESIGN.md §2, "Sharding").

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "m1/dtype.h"
#include "m1/safetensors.h"
#include "m1/sampler.h"

namespace m1 {

// Precision of matrix products (DESIGN.md §4). kExact: fp32 activations times the stored
// weights. kFast: where the hardware multiplies bf16, projection and expert products round their
// activations to bf16 (fp32 accumulation); norms, softmax, routing, lightning state and the LM
// head stay fp32.
enum class Precision { kExact, kFast };

// Whether a matrix product may round its operands under Precision::kFast.
enum class Rounding { kAllowed, kNever };

// fp32 activations on the backend's device: rows x cols, row-major, contiguous.
struct Mat {
  float* data = nullptr;
  int64_t rows = 0, cols = 0;

  Mat row_range(int64_t begin, int64_t count) const { return {data + begin * cols, count, cols}; }
  int64_t size() const { return rows * cols; }
};

// A weight tensor on the backend's device (or on the host, before upload); a matrix is
// [rows = outputs, cols = inputs], a vector has rows = 1. A float weight is `data` in its stored
// dtype. A quantized weight (dtype kQ8 or kQ4) is one value of two arrays: `data`, the packed
// integer codes, and `scales`, rows x groups() of `scale_dtype`, one per `group_size` consecutive
// inputs of a row; element (r, c) = code(r, c) * scale(r, c / group_size). The layout of both,
// byte for byte, is described in m1/quantize.h. A backend copies data_bytes() from `data` and
// scale_bytes() from `scales`, whatever the type.
struct Weight {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0;
  // Quantized weights only.
  const void* scales = nullptr;
  DType scale_dtype = DType::kBF16;  // kBF16 (what m1 writes), kF16 or kF32
  int64_t group_size = 0;            // inputs per scale: a multiple of 32, or cols (one scale per row)

  bool quantized() const { return is_quantized(dtype); }
  int64_t groups() const { return quantized() ? (cols + group_size - 1) / group_size : 0; }
  size_t row_bytes() const { return m1::row_bytes(dtype, cols); }
  size_t data_bytes() const { return matrix_bytes(dtype, rows, cols); }
  size_t scale_bytes() const { return quantized() ? matrix_bytes(scale_dtype, rows, groups()) : 0; }
};

// The host Weight of a float checkpoint tensor, read in place; throws m1::Error naming the tensor
// and its file if it is not F32, F16 or BF16.
Weight host_weight(const TensorView& tensor);

// One of several products of the same activations (Backend::matmuls): out = x w^T.
struct Product {
  const Weight* w = nullptr;
  Mat out;
};

// Sizes of the per-sequence state (DESIGN.md §2).
struct StateShape {
  int64_t lightning_layers = 0, heads = 0, head_dim = 0;  // a fp32 heads x d x d state per layer
  int64_t softmax_layers = 0, kv_heads = 0;               // a KV cache of 2 * kv_heads * d per token
  // Whether the KV cache may hold its keys and values rounded to bf16 under Precision::kFast:
  // kAllowed when every softmax layer's attention may round its operands (AttentionParams::
  // rounding). The CPU backend then keeps a bf16 cache where it multiplies bf16: its prefill
  // blocks get the bits they got when they rounded an fp32 cache as they read it, and decode rows
  // read the rounded keys and values. The CUDA backend's cache is bf16 in any case.
  Rounding kv_rounding = Rounding::kNever;
};

// One sequence's memory: a lightning state per lightning layer and a KV cache per softmax layer.
class SequenceState {
 public:
  explicit SequenceState(const StateShape& shape) : shape_(shape) {}
  virtual ~SequenceState() = default;
  SequenceState(const SequenceState&) = delete;
  SequenceState& operator=(const SequenceState&) = delete;

  // Tokens consumed so far: the position of the next token.
  int64_t length() const { return length_; }
  const StateShape& shape() const { return shape_; }
  // Bytes held now: lightning states plus the KV cache of `length()` tokens.
  virtual size_t bytes() const = 0;
  // An independent copy (a fork: same tokens consumed, same future).
  virtual std::unique_ptr<SequenceState> clone() const = 0;

  // Called by the model once a step has consumed `tokens` more.
  void advance(int64_t tokens) { length_ += tokens; }

  // The portable form of a state, in host memory: what prefix-cache snapshots and cache files
  // hold, and how a snapshot moves off the device. Lightning states: fp32, [layer][head][d][d].
  // KV rows of tokens [begin, end): per softmax layer the keys of those tokens, then their values,
  // each row kv_heads * d values of kv_dtype() (the backend's own cache type, copied bit for bit).
  virtual DType kv_dtype() const = 0;
  size_t lightning_bytes() const {
    return size_t(shape_.lightning_layers * shape_.heads * shape_.head_dim * shape_.head_dim) * sizeof(float);
  }
  size_t kv_bytes(int64_t tokens) const {
    return matrix_bytes(kv_dtype(), shape_.softmax_layers * 2 * tokens, shape_.kv_heads * shape_.head_dim);
  }
  // `out` must be exactly lightning_bytes() / kv_bytes(end - begin); 0 <= begin <= end <= length().
  void save_lightning(std::span<std::byte> out) const;
  void save_kv(int64_t begin, int64_t end, std::span<std::byte> out) const;
  // Restoring: a state takes the KV rows of its tokens in order, one range after another (each
  // append advances length() by `tokens`, leaving the lightning states alone), then the lightning
  // states that belong to its length. What it holds in between is not a state to run.
  void append_kv(std::span<const std::byte> rows, int64_t tokens);
  void load_lightning(std::span<const std::byte> in);

 protected:
  // The copies behind the methods above, their sizes checked; copies from and to the device are
  // complete when these return.
  virtual void read_lightning(std::byte* out) const = 0;
  virtual void read_kv(int64_t begin, int64_t end, std::byte* out) const = 0;
  virtual void write_kv(const std::byte* rows, int64_t tokens) = 0;  // rows for [length(), length() + tokens)
  virtual void write_lightning(const std::byte* in) = 0;

  StateShape shape_;
  int64_t length_ = 0;
};

// One sequence's share of a batched step: rows [row, row + count) of the step's activations are
// its new tokens, at positions [state->length(), state->length() + count).
struct Segment {
  int64_t row = 0, count = 0;
  SequenceState* state = nullptr;
};

struct MoeWeights {
  Weight router;                 // [E, H]: every expert, whichever of them this backend holds
  std::vector<Weight> w1, w3;    // per expert held [F, H]: gate and up
  std::vector<Weight> w2;        // per expert held [H, F]: down
  int64_t top_k = 0;
  // The experts held are [first_expert, first_expert + w1.size()) of the router's E. Holding a
  // part of them (expert parallel), moe() sums only the outputs of those a row chose.
  int64_t first_expert = 0;
};

struct AttentionParams {
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  int64_t rotary_dim = 0;  // RoPE on the first rotary_dim dims of each head
  double rope_theta = 0;
  // Whether fast precision may round the operands of attention's two products (q k^T and the
  // weights times v) to bf16, as it rounds those of a product on weights that allow it.
  Rounding rounding = Rounding::kNever;
};

// Where a backend computes, and its place in a tensor-parallel group.
struct DeviceInfo {
  std::string kind = "cpu";  // "cpu" or "cuda"
  int index = 0;             // the GPU (cuda) or the NUMA node (cpu) it computes on
  int rank = 0, world = 1;   // its rank among the `world` ranks of its group
};

// Collective calls made so far and the wall time spent in them, waiting for peers included.
struct CollectiveStats {
  int64_t calls = 0;
  double seconds = 0;
};

class Backend {
 public:
  explicit Backend(DeviceInfo device = {}) : device_(std::move(device)) {}
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  const DeviceInfo& device() const { return device_; }

  // Binds the calling thread to the backend's device (a GPU made current, CPU cores pinned), for
  // a thread that will drive this backend from now on. Calls work from any thread without it.
  virtual void attach_thread() {}

  // Brackets the calls of one forward step over `segments` with `logit_rows` rows of logits. A
  // backend may record a step's calls and replay them later instead of making them (the CUDA
  // backend does so for decode steps). end_step() false: the calls since begin_step() were not
  // carried out, and the caller makes them again. After an exception inside the bracket,
  // abandon_step() true: nothing of the step ran, so the calls may be made again.
  virtual void begin_step(std::span<const Segment> segments, int64_t logit_rows) {}
  virtual bool end_step() { return true; }
  virtual bool abandon_step() { return false; }

  // Prefill chunks that start at multiples of this many tokens compute the same numbers however
  // a prompt is cut into them (the blocks of the kernels' chunked forms then fall on the same
  // tokens), provided a final block of one token runs alone (prefill_chunk_end, m1/prefill.h).
  // A snapshot taken at such a cut resumes bit for bit. 1: no such promise.
  virtual int64_t prefill_alignment() const { return 1; }
  // What the numbers a state holds depend on: device kind, kernels and precision (name() less
  // what does not change them, such as the thread count). Cache files record it.
  virtual std::string numerics() const { return name(); }

  // Memory. Weights are uploaded once at load from host memory: a backend copies them to its
  // device (the CPU backend into huge pages), or reads them in place (the CPU backend with
  // BackendOptions::map_weights: the mapped file, or the quantized copy the model then holds).
  virtual Weight upload(const Weight& host) = 0;
  virtual Mat alloc(int64_t rows, int64_t cols) = 0;
  virtual void free(Mat m) = 0;
  virtual void to_host(const Mat& m, float* host) = 0;
  virtual std::unique_ptr<SequenceState> new_state(const StateShape& shape) = 0;

  // out[i] = table[tokens[i] - first_token] for tokens in [first_token, first_token + table.rows),
  // zeros for the others (a rank's rows of a table split by vocabulary).
  virtual void embed(const Weight& table, int64_t first_token, std::span<const int32_t> tokens, Mat out) = 0;
  // out[i] = rows[i] of x.
  virtual void gather_rows(const Mat& x, std::span<const int64_t> rows, Mat out) = 0;
  // out = w * x / sqrt(mean(x^2) + eps), per row; out may alias x.
  virtual void rmsnorm(const Mat& x, const Weight& w, float eps, Mat out) = 0;
  // out = x w^T, accumulated in fp32.
  virtual void matmul(const Mat& x, const Weight& w, Mat out, Rounding rounding) = 0;
  // Each product of the same x, with the bits matmul gives it; a backend may run them as one pass
  // (a decode step's q, k and v, or qkv and the lightning output gate: one launch instead of
  // several).
  virtual void matmuls(const Mat& x, std::span<const Product> products, Rounding rounding) {
    for (const Product& p : products) matmul(x, *p.w, p.out, rounding);
  }
  // out = rmsnorm(x, w, eps) * sigmoid(gate), elementwise after the norm (the lightning output
  // gate, one pass); out may alias x.
  virtual void rmsnorm_gated(const Mat& x, const Weight& w, float eps, const Mat& gate, Mat out) = 0;
  // sums[r] = the sum of x[r, c]^2 over the row, in fp32; sums: [rows, 1].
  virtual void row_sum_squares(const Mat& x, Mat sums) = 0;
  // rmsnorm_gated of a row split across ranks: x is this rank's columns of rows `width` wide, and
  // sums [rows, 1] holds the sums of squares of the whole rows (all-reduced row_sum_squares).
  virtual void rmsnorm_gated_split(const Mat& x, const Mat& sums, int64_t width, const Weight& w, float eps,
                                   const Mat& gate, Mat out) = 0;
  // gate = silu(gate) * up, elementwise.
  virtual void swiglu(Mat gate, const Mat& up) = 0;
  // out = alpha * a + beta * b; out may alias a or b.
  virtual void add_scaled(const Mat& a, float alpha, const Mat& b, float beta, Mat out) = 0;
  // add_scaled(a, alpha, b, beta, out), then normed = rmsnorm(out, w, eps): a residual add and the
  // norm after it, which a backend may run as one pass with the same bits. out may alias a or b;
  // normed may alias a (post-norm layers), not out.
  virtual void add_scaled_rmsnorm(const Mat& a, float alpha, const Mat& b, float beta, Mat out, const Weight& w,
                                  float eps, Mat normed) {
    add_scaled(a, alpha, b, beta, out);
    rmsnorm(out, w, eps, normed);
  }
  // x = x * (1 - c) + y * c with c = sigmoid(coef[row]); coef is one column.
  virtual void blend_sigmoid(Mat x, const Mat& y, const Mat& coef) = 0;

  // Lightning attention of DESIGN.md §1 on q, k, v = silu(qkv), with qkv = xn qkv_proj^T laid
  // out per head [q | k | v] x heads: the op applies the SiLU itself (no pass of its own over
  // qkv), and may leave silu(qkv) or the projection in qkv. `decay` (an F32 vector uploaded like
  // a weight) holds s per head; state slot `layer` of each segment's sequence is read and
  // updated. out: [rows, heads * d]. `rounding`: whether fast precision may round q, k and v to
  // bf16 for its products, as it rounds those of the projection before it (the CUDA backend's
  // prefill does; the CPU's lightning attention stays fp32).
  virtual void lightning_attention(Mat qkv, std::span<const Segment> segments, int64_t layer, const Weight& decay,
                                   Mat out, Rounding rounding) = 0;
  // Causal grouped-query softmax attention with partial NeoX RoPE applied to q and k at each
  // token's position; appends k and v to KV-cache slot `layer`. q: [rows, h*d], k and v:
  // [rows, g*d] (q and k are rotated in place), out: [rows, h*d].
  virtual void softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                                 const AttentionParams& params, Mat out) = 0;
  // Top-k mixture of SwiGLU experts with renormalised softmax routing (fp32); expert products
  // follow the precision.
  virtual void moe(const Mat& x, const MoeWeights& w, Mat out) = 0;

  // Draws tokens from rows of `logits` [rows, vocab] as m1::sample_row does, one outcome per
  // request; several requests may read one row (each sees it unpenalised). Only the outcomes
  // reach the host, not the rows.
  virtual std::vector<DrawOutcome> sample(const Mat& logits, std::span<const DrawRequest> draws) = 0;

  // Collectives over the device().world ranks of the group: every rank makes the same calls, in
  // the same order, with the same shapes. With one rank they leave the data as it is.
  // x = the sum over ranks of each rank's x, added in rank order, so that every rank gets the same
  // bits and an element's sum depends on nothing but that element's addends.
  virtual void all_reduce_sum(Mat x) = 0;
  // Rank 0's out [rows, sum of widths] receives each rank's part [rows, widths[rank]] at the
  // columns after the widths of the ranks before it; the other ranks pass an empty out.
  virtual void gather_columns(const Mat& part, std::span<const int64_t> widths, Mat out) = 0;
  // Returns once the work given so far has run on the device.
  virtual void synchronize() {}
  virtual CollectiveStats collective_stats() const { return {}; }
  // After a rank failed inside a step (`why`): this rank's collectives fail from now on instead of
  // waiting for that rank. (A GPU kernel already waiting for a peer gives up on its own, after a
  // bounded wait.)
  virtual void abort_collectives(const std::string& why) {}

 private:
  DeviceInfo device_;
};

// RAII ownership of a backend allocation.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& backend, int64_t rows, int64_t cols) : backend_(&backend), mat_(backend.alloc(rows, cols)) {}
  Buffer(Buffer&& o) noexcept : backend_(o.backend_), mat_(o.mat_) { o.mat_ = {}; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(backend_, o.backend_);
    std::swap(mat_, o.mat_);
    return *this;
  }
  ~Buffer() {
    if (mat_.data) backend_->free(mat_);
  }
  // The start of the buffer seen as a rows x cols matrix (rows * cols must fit).
  Mat as(int64_t rows, int64_t cols) const { return Mat{mat_.data, rows, cols}; }
  const Mat& mat() const { return mat_; }

 private:
  Backend* backend_ = nullptr;
  Mat mat_;
};

}  // namespace m1
