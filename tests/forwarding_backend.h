#pragma once
// A backend that hands every call to another one: tests derive from it to change one behaviour
// (inject a fault, play a recording backend) and keep the rest real. matmuls takes Backend's
// default (each product through matmul), so a test that changes matmul changes both.

#include <memory>

#include "m1/backend.h"
#include "m1/backends.h"

namespace m1 {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : Backend(inner->device()), inner_(std::move(inner)) {}

  std::string name() const override { return inner_->name(); }
  void attach_thread() override { inner_->attach_thread(); }
  void begin_step(std::span<const Segment> segments, int64_t logit_rows) override {
    inner_->begin_step(segments, logit_rows);
  }
  bool end_step() override { return inner_->end_step(); }
  bool abandon_step() override { return inner_->abandon_step(); }
  int64_t prefill_alignment() const override { return inner_->prefill_alignment(); }
  std::string numerics() const override { return inner_->numerics(); }
  Weight upload(const Weight& host) override { return inner_->upload(host); }
  Mat alloc(int64_t rows, int64_t cols) override { return inner_->alloc(rows, cols); }
  void free(Mat m) override { inner_->free(m); }
  void to_host(const Mat& m, float* host) override { inner_->to_host(m, host); }
  std::unique_ptr<SequenceState> new_state(const StateShape& shape) override { return inner_->new_state(shape); }
  void embed(const Weight& table, int64_t first_token, std::span<const int32_t> tokens, Mat out) override {
    inner_->embed(table, first_token, tokens, out);
  }
  void gather_rows(const Mat& x, std::span<const int64_t> rows, Mat out) override { inner_->gather_rows(x, rows, out); }
  void rmsnorm(const Mat& x, const Weight& w, float eps, Mat out) override { inner_->rmsnorm(x, w, eps, out); }
  void matmul(const Mat& x, const Weight& w, Mat out, Rounding rounding) override { inner_->matmul(x, w, out, rounding); }
  void rmsnorm_gated(const Mat& x, const Weight& w, float eps, const Mat& gate, Mat out) override {
    inner_->rmsnorm_gated(x, w, eps, gate, out);
  }
  void row_sum_squares(const Mat& x, Mat sums) override { inner_->row_sum_squares(x, sums); }
  void rmsnorm_gated_split(const Mat& x, const Mat& sums, int64_t width, const Weight& w, float eps, const Mat& gate,
                           Mat out) override {
    inner_->rmsnorm_gated_split(x, sums, width, w, eps, gate, out);
  }
  void swiglu(Mat gate, const Mat& up) override { inner_->swiglu(gate, up); }
  void add_scaled(const Mat& a, float alpha, const Mat& b, float beta, Mat out) override {
    inner_->add_scaled(a, alpha, b, beta, out);
  }
  void add_scaled_rmsnorm(const Mat& a, float alpha, const Mat& b, float beta, Mat out, const Weight& w, float eps,
                          Mat normed) override {
    inner_->add_scaled_rmsnorm(a, alpha, b, beta, out, w, eps, normed);
  }
  void blend_sigmoid(Mat x, const Mat& y, const Mat& coef) override { inner_->blend_sigmoid(x, y, coef); }
  void lightning_attention(Mat qkv, std::span<const Segment> segments, int64_t layer, const Weight& decay,
                           Mat out, Rounding rounding) override {
    inner_->lightning_attention(qkv, segments, layer, decay, out, rounding);
  }
  void softmax_attention(Mat q, Mat k, const Mat& v, std::span<const Segment> segments, int64_t layer,
                         const AttentionParams& params, Mat out) override {
    inner_->softmax_attention(q, k, v, segments, layer, params, out);
  }
  void moe(const Mat& x, const MoeWeights& w, Mat out) override { inner_->moe(x, w, out); }
  std::vector<DrawOutcome> sample(const Mat& logits, std::span<const DrawRequest> draws) override {
    return inner_->sample(logits, draws);
  }
  void all_reduce_sum(Mat x) override { inner_->all_reduce_sum(x); }
  void gather_columns(const Mat& part, std::span<const int64_t> widths, Mat out) override {
    inner_->gather_columns(part, widths, out);
  }
  void synchronize() override { inner_->synchronize(); }
  CollectiveStats collective_stats() const override { return inner_->collective_stats(); }
  void abort_collectives(const std::string& why) override { inner_->abort_collectives(why); }

 protected:
  std::unique_ptr<Backend> inner_;
};

}  // namespace m1
