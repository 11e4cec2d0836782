#pragma once
// The CPU backend: host memory, weights read in place from the mapped checkpoint, and the CPU
// kernels (or their naive references, for testing).

#include "cpu/matmul.h"
#include "cpu/moe.h"
#include "cpu/numa.h"
#include "cpu/shared_memory_group.h"
#include "cpu/softmax_attention.h"
#include "cpu/threadpool.h"
#include "cpu/weight_arena.h"

#include <memory>
#include <utility>
#include <vector>
#include "m1/backend.h"

namespace m1::cpu {

// One rank of a group of CPU ranks: where it runs and the group it reduces with.
struct CpuRank {
  DeviceInfo device;                         // kind "cpu", index: the NUMA node
  RankPlacement placement;                   // its threads and the cores they are pinned to
  std::shared_ptr<SharedMemoryGroup> group;  // shared by the ranks; null for a group of one
};

class CpuBackend final : public Backend {
 public:
  // The one rank of a group of one. Its weights are copied into huge pages (WeightArena), or with
  // `map_weights` read in place from the host memory given (a mapped checkpoint's file pages).
  CpuBackend(int threads, Precision precision, bool reference_kernels, bool map_weights = false);
  // A rank of a larger group: its weights are copied into huge pages its own (pinned) thread
  // touches first, so they live in its NUMA node's memory; upload from the thread attach_thread()
  // pinned.
  CpuBackend(CpuRank rank, Precision precision, bool reference_kernels);
  ~CpuBackend() override;

  std::string name() const override;
  void attach_thread() override;
  int64_t prefill_alignment() const override;
  std::string numerics() const override;
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
  void blend_sigmoid(Mat x, const Mat& y, const Mat& coef) override;
  void lightning_attention(Mat qkv, std::span<const Segment> segments, int64_t layer, const Weight& decay,
                           Mat out, Rounding rounding) override;
  void softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                         const AttentionParams& params, Mat out) override;
  void moe(const Mat& x, const MoeWeights& w, Mat out) override;
  std::vector<DrawOutcome> sample(const Mat& logits, std::span<const DrawRequest> draws) override;
  void all_reduce_sum(Mat x) override;
  void gather_columns(const Mat& part, std::span<const int64_t> widths, Mat out) override;
  CollectiveStats collective_stats() const override { return collective_stats_; }
  void abort_collectives(const std::string& why) override;

 private:
  // The kernels and the precision they run in: "avx512bf16 kernels, fast precision".
  std::string kernels() const;
  // Runs fn(row) over rows, split across the pool in contiguous blocks.
  template <class Fn>
  void for_rows(int64_t rows, Fn&& fn);

  // The operands products allowed to round use.
  Operands operands(Rounding rounding) const;

  // Times a collective into collective_stats_.
  template <class Fn>
  void timed_collective(Fn&& fn);

  std::vector<int> cpus_;  // the cores this rank is pinned to; empty: not pinned
  ThreadPool pool_;
  Precision precision_;
  bool reference_;
  std::shared_ptr<SharedMemoryGroup> group_;
  bool map_weights_ = false;
  WeightArena weights_;  // the copies of the weights
  CollectiveStats collective_stats_;
  MoeScratch moe_scratch_;
  std::vector<MatmulJob> matmul_jobs_;  // matmuls' products as one batch
  struct AttentionTask {
    size_t segment;
    int64_t first, rows;  // the segment's query rows [first, first + rows)
  };
  std::vector<AttentionTask> attention_tasks_;
  std::vector<AttentionGroup> attention_groups_;  // the units: task t, key/value head h at t * kv_heads + h
  // A unit (task x key/value head) whole (end_chunk 0), or chunks [first_chunk, end_chunk) of its
  // keys, whose states go to chunk_states_ at `states` (softmax_attention.h).
  struct AttentionPiece {
    int64_t unit, first_chunk, end_chunk;
    size_t states;
  };
  std::vector<AttentionPiece> attention_pieces_;
  std::vector<AttentionPiece> attention_folds_;  // each split unit, all its chunks, from its first state
  std::vector<float> chunk_states_;
  std::vector<float> sample_row_;  // the row a draw may use as scratch
  SampleScratch sample_scratch_;
};

}  // namespace m1::cpu
