// Top-k mixture of SwiGLU experts on the GPU (DESIGN.md §1 "MoE"), the device twin of
// src/cpu/moe.cpp: fp32 router logits on the batch-invariant matmul, one warp per token for the
// softmax and top-k, tokens grouped by expert on the host (a small copy of the choices) so each
// expert's weights stream once per step, expert products on the matmul, and a weighted sum in
// rank order. Every step is per row, so a row's output never depends on the rows beside it.

#include "moe.h"

#include <climits>
#include <cmath>
#include <span>
#include <string_view>

#include "cuda_check.h"
#include "elementwise.h"
#include "launch.h"
#include "m1/error.h"
#include "matmul.h"

namespace m1::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRouteWarps = 4;  // tokens per routing block
constexpr int kCombineThreads = 256;
// Each routing warp keeps its token's probabilities in shared memory.
constexpr int64_t kMaxExperts = 2048;

// One warp per token. The exponentials are summed by one lane in index order, like the CPU; the
// top k are k warp-wide arg-max passes, each taking the highest probability and, among equals,
// the lowest index, then striking it out.
__global__ void route_kernel(const float* __restrict__ logits, int64_t rows, int experts, int top_k,
                             int32_t* __restrict__ chosen, float* __restrict__ weights) {
  extern __shared__ float warp_probs[];
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  const int64_t t = int64_t(blockIdx.x) * kRouteWarps + warp;
  if (t >= rows) return;  // a whole warp leaves together; the kernel has no block-wide barrier
  float* p = warp_probs + warp * experts;
  const float* row = logits + t * experts;

  float max_logit = -INFINITY;
  for (int e = lane; e < experts; e += kWarp) max_logit = fmaxf(max_logit, row[e]);
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    max_logit = fmaxf(max_logit, __shfl_xor_sync(0xffffffffu, max_logit, offset));
  for (int e = lane; e < experts; e += kWarp) p[e] = expf(row[e] - max_logit);
  __syncwarp();
  float total = 0.0f;
  if (lane == 0)
    for (int e = 0; e < experts; ++e) total += p[e];
  total = __shfl_sync(0xffffffffu, total, 0);
  // From here on each lane touches only its own experts e = lane (mod 32).
  for (int e = lane; e < experts; e += kWarp) p[e] /= total;

  int32_t* chosen_row = chosen + t * top_k;
  float* weight_row = weights + t * top_k;
  float kept = 0.0f;
  for (int r = 0; r < top_k; ++r) {
    // Probabilities are >= 0 and struck-out ones -1, so the start value loses to every expert;
    // only non-finite logits leave the index at INT_MAX, which the host rejects.
    float best = -2.0f;
    int best_index = INT_MAX;
    for (int e = lane; e < experts; e += kWarp)
      if (p[e] > best) best = p[e], best_index = e;
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
      if (other > best || (other == best && other_index < best_index)) best = other, best_index = other_index;
    }
    if (best_index != INT_MAX && best_index % kWarp == lane) p[best_index] = -1.0f;
    kept += best;
    if (lane == 0) chosen_row[r] = best_index, weight_row[r] = best;
  }
  if (lane == 0)
    for (int r = 0; r < top_k; ++r) weight_row[r] /= kept;
}

// out[t] = sum over ranks r, in rank order, of weight[t, r] * down[position of slot (t, r)]: a
// fixed order per element and no atomics, so the sum is deterministic.
__global__ void combine_kernel(const float* __restrict__ down, const float* __restrict__ weights,
                               const int64_t* __restrict__ position_of, int64_t rows, int64_t hidden, int top_k,
                               float* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * hidden) return;
  const int64_t t = i / hidden, c = i % hidden;
  float sum = 0.0f;
  for (int r = 0; r < top_k; ++r) {
    const int64_t slot = t * top_k + r;
    sum += weights[slot] * down[position_of[slot] * hidden + c];
  }
  out[i] = sum;
}

void check_matrix(const DeviceMatrix& m, int64_t rows, int64_t cols, std::string_view what, int64_t expert) {
  if (m.data == nullptr || m.rows != rows || m.cols != cols)
    fail("MoE: {} of expert {} is [{}, {}], expected [{}, {}]", what, expert, m.rows, m.cols, rows, cols);
}

// Device scratch pieces, each 256-byte aligned, carved from one allocation: DeviceScratch::get
// may reallocate, so everything is sized first and taken at once.
class Carver {
 public:
  explicit Carver(char* base = nullptr) : base_(base) {}
  template <class T>
  T* take(int64_t count) {
    T* piece = reinterpret_cast<T*>(base_ + used_);
    used_ += (size_t(count) * sizeof(T) + 255) / 256 * 256;
    return piece;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

struct MoeBuffers {
  float* logits;      // [rows, experts]
  int32_t* chosen;    // [slots]: expert of slot (t, r) = t * k + r
  float* weights;     // [slots]
  int64_t* token_at;  // [slots] then position_of [slots], uploaded together
  float* gathered;    // [slots, hidden]: x rows in expert order; later the down products
  float* gate;        // [slots, ffn]
  float* up;          // [slots, ffn]
};

MoeBuffers carve(Carver& carver, int64_t rows, int64_t experts, int64_t slots, int64_t hidden, int64_t ffn) {
  MoeBuffers b;
  b.logits = carver.take<float>(rows * experts);
  b.chosen = carver.take<int32_t>(slots);
  b.weights = carver.take<float>(slots);
  b.token_at = carver.take<int64_t>(2 * slots);
  b.gathered = carver.take<float>(slots * hidden);
  b.gate = carver.take<float>(slots * ffn);
  b.up = carver.take<float>(slots * ffn);
  return b;
}

}  // namespace

void route(const float* logits, int64_t rows, int64_t experts, int64_t top_k, int32_t* chosen, float* weights,
           cudaStream_t stream) {
  if (experts < 1 || experts > kMaxExperts) fail("MoE: {} experts (supported: 1 to {})", experts, kMaxExperts);
  if (top_k < 1 || top_k > experts) fail("MoE: top_k {} with {} experts", top_k, experts);
  if (rows == 0) return;
  const int64_t blocks = ceil_div(rows, kRouteWarps);
  if (blocks > INT_MAX) fail("MoE: {} rows is too many to route in one launch", rows);
  const size_t shared = size_t(kRouteWarps) * size_t(experts) * sizeof(float);
  route_kernel<<<unsigned(blocks), kRouteWarps * kWarp, shared, stream>>>(logits, rows, int(experts), int(top_k),
                                                                          chosen, weights);
  M1_CUDA_CHECK_LAUNCH();
}

void moe(const MoeArgs& a, MoeWorkspace& ws, cudaStream_t stream) {
  const int64_t rows = a.rows, hidden = a.hidden, experts = a.router.rows, k = a.top_k;
  if (rows < 0 || hidden < 1) fail("MoE: bad activation shape [{}, {}]", rows, hidden);
  if (a.router.data == nullptr || a.router.cols != hidden)
    fail("MoE: router is [{}, {}], expected {} columns", a.router.rows, a.router.cols, hidden);
  if (int64_t(a.w1.size()) != experts || int64_t(a.w3.size()) != experts || int64_t(a.w2.size()) != experts)
    fail("MoE: {} experts in the router but {}, {}, {} in w1, w3, w2", experts, a.w1.size(), a.w3.size(),
         a.w2.size());
  if (k < 1 || k > experts) fail("MoE: top_k {} with {} experts", k, experts);
  if (experts > kMaxExperts) fail("MoE: {} experts (supported: 1 to {})", experts, kMaxExperts);
  const int64_t ffn = a.w1[0].rows;
  for (int64_t e = 0; e < experts; ++e) {
    check_matrix(a.w1[size_t(e)], ffn, hidden, "w1", e);
    check_matrix(a.w3[size_t(e)], ffn, hidden, "w3", e);
    check_matrix(a.w2[size_t(e)], hidden, ffn, "w2", e);
  }
  if (rows == 0) return;
  const int64_t slots = rows * k;

  Carver sizing;
  carve(sizing, rows, experts, slots, hidden, ffn);
  Carver carver(static_cast<char*>(ws.device.get(sizing.used())));
  const MoeBuffers b = carve(carver, rows, experts, slots, hidden, ffn);

  // Routing is always fp32, whatever the expert products use.
  matmul(a.x, hidden, rows, a.router, b.logits, experts, GemmOperands::kFp32, ws.matmul, stream);
  route(b.logits, rows, experts, k, b.chosen, b.weights, stream);

  // Group the (token, rank) slots by expert with a counting sort in slot order, as the CPU does:
  // position p of the grouped rows holds token token_at[p], slot s sits at position_of[s], and
  // expert e owns positions [begin[e], begin[e + 1]).
  ws.chosen.resize(size_t(slots));
  M1_CUDA_CHECK(cudaMemcpyAsync(ws.chosen.data(), b.chosen, size_t(slots) * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                stream));
  M1_CUDA_CHECK(cudaStreamSynchronize(stream));
  ws.host_index.assign(size_t(2 * slots + 2 * experts + 1), 0);
  const std::span<int64_t> all(ws.host_index.data(), ws.host_index.size());
  const std::span<int64_t> token_at = all.subspan(0, size_t(slots));
  const std::span<int64_t> position_of = all.subspan(size_t(slots), size_t(slots));
  const std::span<int64_t> begin = all.subspan(size_t(2 * slots), size_t(experts + 1));
  const std::span<int64_t> fill = all.subspan(size_t(2 * slots + experts + 1), size_t(experts));
  for (int32_t e : ws.chosen) {
    if (e < 0 || e >= experts) fail("MoE: routing chose no expert (non-finite router logits?)");
    ++begin[size_t(e) + 1];
  }
  for (int64_t e = 0; e < experts; ++e) begin[size_t(e + 1)] += begin[size_t(e)];
  for (int64_t e = 0; e < experts; ++e) fill[size_t(e)] = begin[size_t(e)];
  for (int64_t slot = 0; slot < slots; ++slot) {
    const int64_t p = fill[size_t(ws.chosen[size_t(slot)])]++;
    token_at[size_t(p)] = slot / k;
    position_of[size_t(slot)] = p;
  }
  // From pageable memory the copy is staged before it returns, so host_index may change after.
  M1_CUDA_CHECK(cudaMemcpyAsync(b.token_at, ws.host_index.data(), size_t(2 * slots) * sizeof(int64_t),
                                cudaMemcpyHostToDevice, stream));
  const int64_t* device_position_of = b.token_at + slots;

  gather_rows(a.x, hidden, b.token_at, slots, b.gathered, stream);
  // Every expert's gate and up products, one SwiGLU over all slots, then every down product. The
  // down products overwrite the gathered rows, which the stream has finished reading by then.
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = begin[size_t(e)], m = begin[size_t(e + 1)] - first;
    if (m == 0) continue;
    const float* xs = b.gathered + first * hidden;
    matmul(xs, hidden, m, a.w1[size_t(e)], b.gate + first * ffn, ffn, a.operands, ws.matmul, stream);
    matmul(xs, hidden, m, a.w3[size_t(e)], b.up + first * ffn, ffn, a.operands, ws.matmul, stream);
  }
  swiglu(b.gate, b.up, slots * ffn, stream);
  float* down = b.gathered;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = begin[size_t(e)], m = begin[size_t(e + 1)] - first;
    if (m == 0) continue;
    matmul(b.gate + first * ffn, ffn, m, a.w2[size_t(e)], down + first * hidden, hidden, a.operands, ws.matmul,
           stream);
  }

  const int64_t blocks = ceil_div(rows * hidden, kCombineThreads);
  if (blocks > INT_MAX) fail("MoE: {} x {} outputs is too many for one launch", rows, hidden);
  combine_kernel<<<unsigned(blocks), kCombineThreads, 0, stream>>>(down, b.weights, device_position_of, rows, hidden,
                                                                   int(k), a.out);
  M1_CUDA_CHECK_LAUNCH();
}

}  // namespace m1::cuda
