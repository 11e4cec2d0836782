#pragma once
// The CPU backend: host memory, weights read in place from the mapped checkpoint, and the CPU
// kernels (or their naive references, for testing).

#include "cpu/matmul.h"
#include "cpu/moe.h"
#include "cpu/threadpool.h"

#include <utility>
#include <vector>
#include "m1/backend.h"

namespace m1::cpu {

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, Precision precision, bool reference_kernels);

  std::string name() const override;
  int64_t prefill_alignment() const override;
  std::string numerics() const override;
  Weight upload(const Weight& host) override;
  Mat alloc(int64_t rows, int64_t cols) override;
  void free(Mat m) override;
  void to_host(const Mat& m, float* host) override;
  std::unique_ptr<SequenceState> new_state(const StateShape& shape) override;

  void embed(const Weight& table, std::span<const int32_t> tokens, Mat out) override;
  void gather_rows(const Mat& x, std::span<const int64_t> rows, Mat out) override;
  void rmsnorm(const Mat& x, const Weight& w, float eps, Mat out) override;
  void matmul(const Mat& x, const Weight& w, Mat out, Rounding rounding) override;
  void silu(Mat x) override;
  void rmsnorm_gated(const Mat& x, const Weight& w, float eps, const Mat& gate, Mat out) override;
  void swiglu(Mat gate, const Mat& up) override;
  void add_scaled(const Mat& a, float alpha, const Mat& b, float beta, Mat out) override;
  void blend_sigmoid(Mat x, const Mat& y, const Mat& coef) override;
  void lightning_attention(const Mat& qkv, std::span<const Segment> segments, int64_t layer,
                           const Weight& decay, Mat out) override;
  void softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                         const AttentionParams& params, Mat out) override;
  void moe(const Mat& x, const MoeWeights& w, Mat out) override;
  std::vector<DrawOutcome> sample(const Mat& logits, std::span<const DrawRequest> draws) override;

 private:
  // The kernels and the precision they run in: "avx512bf16 kernels, fast precision".
  std::string kernels() const;
  // Runs fn(row) over rows, split across the pool in contiguous blocks.
  template <class Fn>
  void for_rows(int64_t rows, Fn&& fn);

  // The operands products allowed to round use.
  Operands operands(Rounding rounding) const;

  ThreadPool pool_;
  Precision precision_;
  bool reference_;
  MoeScratch moe_scratch_;
  std::vector<std::pair<size_t, int64_t>> attention_tasks_;  // (segment, first query row)
  std::vector<float> sample_row_;  // the row a draw may use as scratch
  SampleScratch sample_scratch_;
};

}  // namespace m1::cpu
