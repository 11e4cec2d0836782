#include "cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace m1::cpu {

void route(const float* logits, int64_t n, int64_t experts, int64_t top_k, int32_t* chosen, float* weights) {
  std::vector<float> p(static_cast<size_t>(experts));
  std::vector<int32_t> order(static_cast<size_t>(experts));
  for (int64_t t = 0; t < n; ++t) {
    const float* row = logits + t * experts;
    float max_logit = *std::max_element(row, row + experts), total = 0;
    for (int64_t e = 0; e < experts; ++e) total += p[size_t(e)] = std::exp(row[e] - max_logit);
    for (float& v : p) v /= total;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)] || (p[size_t(a)] == p[size_t(b)] && a < b); });
    float kept = 0;
    for (int64_t r = 0; r < top_k; ++r) kept += p[size_t(order[size_t(r)])];
    for (int64_t r = 0; r < top_k; ++r) {
      chosen[t * top_k + r] = order[size_t(r)];
      weights[t * top_k + r] = p[size_t(order[size_t(r)])] / kept;
    }
  }
}

namespace {

float silu(float v) { return v / (1.0f + std::exp(-v)); }

// Groups (token, rank) slots by expert: slots of expert e are rows_of_expert[begin[e], begin[e+1]).
void group_by_expert(const std::vector<int32_t>& chosen, int64_t experts, MoeScratch& s) {
  s.expert_begin.assign(size_t(experts + 1), 0);
  for (int32_t e : chosen) ++s.expert_begin[size_t(e + 1)];
  std::partial_sum(s.expert_begin.begin(), s.expert_begin.end(), s.expert_begin.begin());
  s.rows_of_expert.resize(chosen.size());
  std::vector<int64_t> fill(s.expert_begin.begin(), s.expert_begin.end() - 1);
  for (size_t slot = 0; slot < chosen.size(); ++slot) s.rows_of_expert[size_t(fill[size_t(chosen[slot])]++)] = int64_t(slot);
}

}  // namespace

void moe(ThreadPool& pool, const Mat& x, const MoeWeights& w, Mat out, Operands operands, MoeScratch& s) {
  const int64_t n = x.rows, hidden = x.cols, experts = w.router.rows, k = w.top_k, ffn = w.w1[0].rows;
  s.logits.resize(size_t(n * experts));
  matmul(pool, x, w.router, Mat{s.logits.data(), n, experts});
  s.chosen.resize(size_t(n * k));
  s.weights.resize(size_t(n * k));
  route(s.logits.data(), n, experts, k, s.chosen.data(), s.weights.data());
  group_by_expert(s.chosen, experts, s);

  s.partial.resize(size_t(n * k * hidden));  // each (token, rank) expert output
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t begin = s.expert_begin[size_t(e)], m = s.expert_begin[size_t(e + 1)] - begin;
    if (m == 0) continue;
    s.gathered.resize(size_t(m * hidden));
    for (int64_t i = 0; i < m; ++i) {
      const int64_t token = s.rows_of_expert[size_t(begin + i)] / k;
      std::copy_n(x.data + token * hidden, hidden, s.gathered.data() + i * hidden);
    }
    s.gate.resize(size_t(m * ffn));
    s.up.resize(size_t(m * ffn));
    s.down.resize(size_t(m * hidden));
    Mat xs{s.gathered.data(), m, hidden}, gate{s.gate.data(), m, ffn}, up{s.up.data(), m, ffn};
    matmul(pool, xs, w.w1[size_t(e)], gate, operands);
    matmul(pool, xs, w.w3[size_t(e)], up, operands);
    for (int64_t i = 0; i < m * ffn; ++i) s.gate[size_t(i)] = silu(s.gate[size_t(i)]) * s.up[size_t(i)];
    matmul(pool, gate, w.w2[size_t(e)], Mat{s.down.data(), m, hidden}, operands);
    for (int64_t i = 0; i < m; ++i)
      std::copy_n(s.down.data() + i * hidden, hidden, s.partial.data() + s.rows_of_expert[size_t(begin + i)] * hidden);
  }
  for (int64_t t = 0; t < n; ++t) {
    float* o = out.data + t * out.cols;
    std::fill(o, o + hidden, 0.0f);
    for (int64_t r = 0; r < k; ++r) {
      const float weight = s.weights[size_t(t * k + r)];
      const float* y = s.partial.data() + (t * k + r) * hidden;
      for (int64_t c = 0; c < hidden; ++c) o[c] += weight * y[c];
    }
  }
}

void moe_reference(const Mat& x, const MoeWeights& w, Mat out, Operands operands) {
  const int64_t hidden = x.cols, experts = w.router.rows, k = w.top_k, ffn = w.w1[0].rows;
  const size_t ex = size_t(experts), kk = size_t(k), ff = size_t(ffn), hh = size_t(hidden);
  std::vector<float> logits(ex), weights(kk), gate(ff), up(ff), y(hh);
  std::vector<int32_t> chosen(kk);
  for (int64_t t = 0; t < x.rows; ++t) {
    Mat row = x.row_range(t, 1);
    matmul_reference(row, w.router, Mat{logits.data(), 1, experts});
    route(logits.data(), 1, experts, k, chosen.data(), weights.data());
    float* o = out.data + t * out.cols;
    std::fill(o, o + hidden, 0.0f);
    for (int64_t r = 0; r < k; ++r) {
      const size_t e = size_t(chosen[size_t(r)]);
      matmul_reference(row, w.w1[e], Mat{gate.data(), 1, ffn}, operands);
      matmul_reference(row, w.w3[e], Mat{up.data(), 1, ffn}, operands);
      for (int64_t i = 0; i < ffn; ++i) gate[size_t(i)] = silu(gate[size_t(i)]) * up[size_t(i)];
      matmul_reference(Mat{gate.data(), 1, ffn}, w.w2[e], Mat{y.data(), 1, hidden}, operands);
      for (int64_t c = 0; c < hidden; ++c) o[c] += weights[size_t(r)] * y[size_t(c)];
    }
  }
}

}  // namespace m1::cpu
