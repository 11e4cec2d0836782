#include "cpu/cpu_backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "cpu/cpu_state.h"
#include "cpu/elementwise.h"
#include "cpu/lightning.h"
#include "cpu/matmul.h"
#include "cpu/softmax_attention.h"
#include "m1/error.h"

namespace m1::cpu {
namespace {

CpuState& cpu_state(SequenceState* s) { return *static_cast<CpuState*>(s); }

// Rows per task for elementwise work: large enough to amortise the hand-out.
constexpr int64_t kRowsPerTask = 16;

}  // namespace

CpuBackend::CpuBackend(int threads, Precision precision, bool reference_kernels, bool map_weights)
    : pool_(threads), precision_(precision), reference_(reference_kernels), map_weights_(map_weights) {}

CpuBackend::CpuBackend(CpuRank rank, Precision precision, bool reference_kernels)
    : Backend(rank.device),
      cpus_(rank.placement.cpus),
      pool_(rank.placement.threads, rank.placement.cpus),
      precision_(precision),
      reference_(reference_kernels),
      group_(std::move(rank.group)) {}

CpuBackend::~CpuBackend() = default;

std::string CpuBackend::name() const {
  if (device().world == 1) return fmt::format("cpu ({} threads, {})", pool_.size(), kernels());
  return fmt::format("cpu rank {}/{} (node {}, {} threads, {})", device().rank, device().world, device().index,
                     pool_.size(), kernels());
}

std::string CpuBackend::kernels() const {
  return fmt::format("{} kernels, {} precision", reference_ ? "reference" : matmul_isa(),
                     precision_ == Precision::kFast && bf16_products_available() ? "fast" : "exact");
}

void CpuBackend::attach_thread() { pin_current_thread(cpus_); }

// Lightning blocks of kLightningBlock tokens and attention tasks of 16 queries both count from a
// segment's first token, so cuts at multiples of the block leave every sum as it was.
int64_t CpuBackend::prefill_alignment() const { return kLightningBlock; }

// The kernels' arithmetic, as snapshot files record it: raised whenever a change moves the bits a
// sequence's state or results get, so that files written before are skipped, not resumed. 1: the
// fp32 attention form folds chunks of 4,096 keys (softmax_attention.h).
constexpr int kArithmeticRevision = 1;

std::string CpuBackend::numerics() const { return fmt::format("cpu ({}, arithmetic {})", kernels(), kArithmeticRevision); }

Operands CpuBackend::operands(Rounding rounding) const {
  return precision_ == Precision::kFast && rounding == Rounding::kAllowed ? Operands::kBf16 : Operands::kFp32;
}

template <class Fn>
void CpuBackend::for_rows(int64_t rows, Fn&& fn) {
  pool_.parallel_for((rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    for (int64_t r = task * kRowsPerTask, end = std::min(rows, r + kRowsPerTask); r < end; ++r) fn(r);
  });
}

Weight CpuBackend::upload(const Weight& host) {
  if (map_weights_) return host;  // only a group of one is given map_weights
  Weight w = host;
  w.data = weights_.copy(host.data, host.data_bytes());
  if (host.quantized()) w.scales = weights_.copy(host.scales, host.scale_bytes());
  return w;
}

Mat CpuBackend::alloc(int64_t rows, int64_t cols) {
  size_t bytes = (size_t(std::max<int64_t>(rows * cols, 1)) * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return Mat{static_cast<float*>(p), rows, cols};
}

void CpuBackend::free(Mat m) { std::free(m.data); }

void CpuBackend::to_host(const Mat& m, float* host) { std::memcpy(host, m.data, size_t(m.size()) * sizeof(float)); }

// The cache holds bf16 where fast precision rounds every softmax layer's attention operands
// anyway: the same numbers for the bf16 form, half the memory and half the bytes read at depth.
std::unique_ptr<SequenceState> CpuBackend::new_state(const StateShape& shape) {
  const bool bf16 = precision_ == Precision::kFast && shape.kv_rounding == Rounding::kAllowed && bf16_products_available();
  return std::make_unique<CpuState>(shape, bf16 ? DType::kBF16 : DType::kF32);
}

void CpuBackend::embed(const Weight& table, int64_t first_token, std::span<const int32_t> tokens, Mat out) {
  for_rows(int64_t(tokens.size()), [&](int64_t i) {
    float* row = out.data + i * out.cols;
    const int64_t id = tokens[size_t(i)] - first_token;
    if (id < 0 || id >= table.rows) {
      std::fill(row, row + table.cols, 0.0f);
      return;
    }
    const size_t base = size_t(id) * size_t(table.cols);
    for (int64_t c = 0; c < table.cols; ++c) row[c] = load_as_f32(table.data, table.dtype, base + size_t(c));
  });
}

void CpuBackend::gather_rows(const Mat& x, std::span<const int64_t> rows, Mat out) {
  for (size_t i = 0; i < rows.size(); ++i) std::memcpy(out.data + int64_t(i) * out.cols, x.data + rows[i] * x.cols, size_t(x.cols) * sizeof(float));
}

void CpuBackend::rmsnorm(const Mat& x, const Weight& w, float eps, Mat out) {
  for_rows(x.rows, [&](int64_t r) { rmsnorm_row(x.data + r * x.cols, w.data, w.dtype, eps, out.data + r * out.cols, x.cols); });
}

void CpuBackend::matmul(const Mat& x, const Weight& w, Mat out, Rounding rounding) {
  if (reference_)
    matmul_reference(x, w, out, operands(rounding));
  else
    cpu::matmul(pool_, x, w, out, operands(rounding));
}

// One batch: the products' tasks share one pass of the pool, and x is rounded to bf16 once.
void CpuBackend::matmuls(const Mat& x, std::span<const Product> products, Rounding rounding) {
  if (reference_) return Backend::matmuls(x, products, rounding);
  matmul_jobs_.clear();
  for (const Product& p : products) matmul_jobs_.push_back({x, *p.w, p.out});
  cpu::matmul_batch(pool_, matmul_jobs_, operands(rounding));
}

void CpuBackend::rmsnorm_gated(const Mat& x, const Weight& w, float eps, const Mat& gate, Mat out) {
  for_rows(x.rows, [&](int64_t r) {
    float* row = out.data + r * out.cols;
    rmsnorm_row(x.data + r * x.cols, w.data, w.dtype, eps, row, x.cols);
    cpu::sigmoid_gate(gate.data + r * gate.cols, row, x.cols);
  });
}

void CpuBackend::row_sum_squares(const Mat& x, Mat sums) {
  for_rows(x.rows, [&](int64_t r) { sums.data[r * sums.cols] = float(sum_squares(x.data + r * x.cols, x.cols)); });
}

void CpuBackend::rmsnorm_gated_split(const Mat& x, const Mat& sums, int64_t width, const Weight& w, float eps,
                                     const Mat& gate, Mat out) {
  for_rows(x.rows, [&](int64_t r) {
    float* row = out.data + r * out.cols;
    rmsnorm_row_with(double(sums.data[r * sums.cols]), width, x.data + r * x.cols, w.data, w.dtype, eps, row, x.cols);
    cpu::sigmoid_gate(gate.data + r * gate.cols, row, x.cols);
  });
}

void CpuBackend::swiglu(Mat gate, const Mat& up) {
  for_rows(gate.rows, [&](int64_t r) { cpu::swiglu(gate.data + r * gate.cols, up.data + r * up.cols, gate.cols); });
}

void CpuBackend::add_scaled(const Mat& a, float alpha, const Mat& b, float beta, Mat out) {
  for_rows(out.rows, [&](int64_t r) {
    cpu::add_scaled(a.data + r * a.cols, alpha, b.data + r * b.cols, beta, out.data + r * out.cols, out.cols);
  });
}

void CpuBackend::blend_sigmoid(Mat x, const Mat& y, const Mat& coef) {
  for_rows(x.rows, [&](int64_t r) { cpu::blend_sigmoid(x.data + r * x.cols, y.data + r * y.cols, coef.data[r * coef.cols], x.cols); });
}

// SiLU in place on the task's own rows of its head's q, k and v (tasks touch disjoint cells), then
// the recurrence on them while they are in cache: the arithmetic of a separate SiLU pass.
// The recurrence stays fp32 in either precision, so `rounding` changes nothing here.
void CpuBackend::lightning_attention(Mat qkv, std::span<const Segment> segments, int64_t layer, const Weight& decay_weight,
                                     Mat out, Rounding) {
  const int64_t heads = decay_weight.cols, d = out.cols / heads;
  const auto* decay = static_cast<const float*>(decay_weight.data);  // uploaded in place: host memory
  pool_.parallel_for(int64_t(segments.size()) * heads, [&](int64_t task) {
    const Segment& seg = segments[size_t(task / heads)];
    const int64_t head = task % heads;
    float* base = qkv.data + seg.row * qkv.cols + head * 3 * d;
    for (int64_t t = 0; t < seg.count; ++t) silu_inplace(base + t * qkv.cols, 3 * d);
    LightningHead h{base, base + d, base + 2 * d, qkv.cols,
                    out.data + seg.row * out.cols + head * d, out.cols, seg.count, d, decay[head],
                    cpu_state(seg.state).lightning(layer) + head * d * d};
    lightning_head(h, reference_);
  });
}

void CpuBackend::softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                                   const AttentionParams& p, Mat out) {
  const int64_t d = p.head_dim, group = p.heads / p.kv_heads;
  // Rotate, then append this step's keys and values to each sequence's cache.
  for (const Segment& seg : segments) {
    CpuState& state = cpu_state(seg.state);
    const int64_t pos0 = state.length();
    apply_rope(q.data + seg.row * q.cols, seg.count, q.cols, p.heads, d, p.rotary_dim, p.rope_theta, pos0);
    apply_rope(k.data + seg.row * k.cols, seg.count, k.cols, p.kv_heads, d, p.rotary_dim, p.rope_theta, pos0);
    state.store_kv(layer, pos0, k.data + seg.row * k.cols, k.cols, v.data + seg.row * v.cols, v.cols, seg.count);
  }
  // One task per (segment, key/value head, block of query rows): each task reads the cache once for
  // every query head of its group. Blocks are 16 rows counted from the segment's first, and which
  // form a row takes depends on its block alone. The bf16 form gives every query vector its own
  // lane's bits, so consecutive blocks that take it merge into one task (up to 4, while there are
  // at least twice as many tasks as threads): fewer passes over the cache, the same bits.
  constexpr int64_t kBlockRows = 16, kMaxMergedBlocks = 4;
  const bool bf16 = precision_ == Precision::kFast && p.rounding == Rounding::kAllowed;
  int64_t blocks = 0;
  for (const Segment& seg : segments) blocks += (seg.count + kBlockRows - 1) / kBlockRows;
  const int64_t merge = std::clamp<int64_t>(blocks * p.kv_heads / (2 * int64_t(pool_.size())), 1, kMaxMergedBlocks);
  attention_tasks_.clear();
  for (size_t s = 0; s < segments.size(); ++s)
    for (int64_t first = 0, count = segments[s].count; first < count;) {
      int64_t rows = std::min(kBlockRows, count - first);
      if (!reference_ && attention_takes_bf16(rows * group, bf16))
        for (int64_t b = 1; b < merge && first + rows < count; ++b) {
          const int64_t next = std::min(kBlockRows, count - first - rows);
          if (!attention_takes_bf16(next * group, bf16)) break;
          rows += next;
        }
      attention_tasks_.push_back({s, first, rows});
      first += rows;
    }
  // The units: each task's query rows against one key/value head.
  attention_groups_.clear();
  for (const AttentionTask& t : attention_tasks_) {
    const Segment& seg = segments[t.segment];
    CpuState& state = cpu_state(seg.state);
    const int64_t row = seg.row + t.first;
    for (int64_t kv_head = 0; kv_head < p.kv_heads; ++kv_head) {
      const int64_t head = kv_head * group;
      attention_groups_.push_back({q.data + row * q.cols + head * d, q.cols, group, state.keys(layer, kv_head),
                                   state.values(layer, kv_head), d, out.data + row * out.cols + head * d, out.cols,
                                   t.rows, state.length() + t.first, d, bf16, state.kv_dtype()});
    }
  }
  // A unit whose share of the step's work (keys times query vectors) is more than a thread's, as a
  // decode row at depth beside few or shallow others, spreads its chunks of keys (the fp32 form's,
  // softmax_attention.h) over the threads: pieces of whole chunks, each about half a thread's
  // share, whose states go to chunk_states_ and are folded in order after. The bits are those of
  // one task walking every chunk, whatever the threads or the step. Few-query blocks only (their
  // states are small), within a budget of states.
  constexpr int64_t kMaxSplitQueries = 15;
  constexpr size_t kChunkStateBudget = size_t(16) << 20;  // floats: 64 MB
  const int64_t units = int64_t(attention_groups_.size()), threads = int64_t(pool_.size());
  auto work = [](const AttentionGroup& g) { return (g.pos0 + g.count) * g.count * g.heads; };
  int64_t total_work = 0;
  for (const AttentionGroup& g : attention_groups_) total_work += work(g);
  const int64_t piece_work = std::max<int64_t>(1, total_work / (2 * threads));
  attention_pieces_.clear();
  attention_folds_.clear();
  size_t state_floats = 0;
  for (int64_t unit = 0; unit < units; ++unit) {
    const AttentionGroup& g = attention_groups_[size_t(unit)];
    const int64_t queries = g.count * g.heads, chunks = attention_chunks(g);
    const size_t chunk_floats = attention_chunk_state_floats(g), floats = size_t(chunks) * chunk_floats;
    if (reference_ || threads == 1 || chunks < 2 || work(g) * threads <= total_work || queries > kMaxSplitQueries ||
        attention_takes_bf16(queries, bf16) || state_floats + floats > kChunkStateBudget) {
      attention_pieces_.push_back({unit, 0, 0, 0});
      continue;
    }
    const int64_t parts = std::min(chunks, (work(g) + piece_work - 1) / piece_work);
    for (int64_t i = 0; i < parts; ++i) {
      const int64_t first = chunks * i / parts;
      attention_pieces_.push_back({unit, first, chunks * (i + 1) / parts, state_floats + size_t(first) * chunk_floats});
    }
    attention_folds_.push_back({unit, 0, chunks, state_floats});
    state_floats += floats;
  }
  chunk_states_.resize(state_floats);
  pool_.parallel_for(int64_t(attention_pieces_.size()), [&](int64_t i) {
    const AttentionPiece& piece = attention_pieces_[size_t(i)];
    const AttentionGroup& g = attention_groups_[size_t(piece.unit)];
    thread_local AttentionScratch scratch;
    if (reference_)
      attention_group_reference(g);
    else if (piece.end_chunk == 0)
      attention_group(g, scratch);
    else
      attention_group_chunks(g, piece.first_chunk, piece.end_chunk, scratch, chunk_states_.data() + piece.states);
  });
  pool_.parallel_for(int64_t(attention_folds_.size()), [&](int64_t i) {
    const AttentionPiece& fold = attention_folds_[size_t(i)];
    thread_local AttentionScratch scratch;
    attention_fold_chunks(attention_groups_[size_t(fold.unit)], chunk_states_.data() + fold.states, scratch);
  });
}

void CpuBackend::moe(const Mat& x, const MoeWeights& w, Mat out) {
  if (reference_)
    moe_reference(x, w, out, operands(Rounding::kAllowed));
  else
    cpu::moe(pool_, x, w, out, operands(Rounding::kAllowed), moe_scratch_);
}

std::vector<DrawOutcome> CpuBackend::sample(const Mat& logits, std::span<const DrawRequest> draws) {
  std::vector<DrawOutcome> outcomes(draws.size());
  for (size_t i = 0; i < draws.size(); ++i) {
    const DrawRequest& draw = draws[i];
    if (draw.row < 0 || draw.row >= logits.rows) fail("sample: row {} is outside the {} rows of logits", draw.row, logits.rows);
    const float* row = logits.data + draw.row * logits.cols;
    sample_row_.assign(row, row + logits.cols);
    try {
      outcomes[i].token = sample_row(sample_row_, draw, sample_scratch_);
    } catch (const Error& error) {
      outcomes[i].error = error.what();
    }
  }
  return outcomes;
}

template <class Fn>
void CpuBackend::timed_collective(Fn&& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  collective_stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++collective_stats_.calls;
}

void CpuBackend::all_reduce_sum(Mat x) {
  if (!group_) return;
  timed_collective([&] { group_->all_reduce_sum(device().rank, x.data, x.size(), pool_); });
}

void CpuBackend::gather_columns(const Mat& part, std::span<const int64_t> widths, Mat out) {
  if (group_) {
    timed_collective([&] { group_->gather_columns(device().rank, part.data, part.rows, widths, out.data); });
    return;
  }
  if (out.data != part.data) std::memcpy(out.data, part.data, size_t(part.size()) * sizeof(float));
}

void CpuBackend::abort_collectives(const std::string& why) {
  if (group_) group_->abort(why);
}

}  // namespace m1::cpu
