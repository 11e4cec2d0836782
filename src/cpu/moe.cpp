#include "cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "cpu/elementwise.h"

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

// Orders the (token, rank) slots by expert: position p of the grouped rows holds slot
// slot_at[p], and expert e owns positions [begin[e], begin[e + 1]).
void group_by_expert(const std::vector<int32_t>& chosen, int64_t experts, MoeScratch& s) {
  s.expert_begin.assign(size_t(experts + 1), 0);
  for (int32_t e : chosen) ++s.expert_begin[size_t(e + 1)];
  std::partial_sum(s.expert_begin.begin(), s.expert_begin.end(), s.expert_begin.begin());
  s.slot_at.resize(chosen.size());
  s.position_of.resize(chosen.size());
  s.fill.assign(s.expert_begin.begin(), s.expert_begin.end() - 1);
  for (size_t slot = 0; slot < chosen.size(); ++slot) {
    const int64_t p = s.fill[size_t(chosen[slot])]++;
    s.slot_at[size_t(p)] = int64_t(slot);
    s.position_of[slot] = p;
  }
}

}  // namespace

void moe(ThreadPool& pool, const Mat& x, const MoeWeights& w, Mat out, Operands operands, MoeScratch& s) {
  const int64_t n = x.rows, hidden = x.cols, experts = w.router.rows, k = w.top_k, ffn = w.w1[0].rows;
  const int64_t first = w.first_expert, held = int64_t(w.w1.size());
  const int64_t slots = n * k;
  s.logits.resize(size_t(n * experts));
  matmul(pool, x, w.router, Mat{s.logits.data(), n, experts});  // routing stays fp32
  s.chosen.resize(size_t(slots));
  s.weights.resize(size_t(slots));
  route(s.logits.data(), n, experts, k, s.chosen.data(), s.weights.data());
  group_by_expert(s.chosen, experts, s);

  // The held experts' slots are the grouped positions [low, high): only those are computed.
  const int64_t low = s.expert_begin[size_t(first)], high = s.expert_begin[size_t(first + held)], rows = high - low;
  s.gathered.resize(size_t(rows * hidden));
  s.gate.resize(size_t(rows * ffn));
  s.up.resize(size_t(rows * ffn));
  s.down.resize(size_t(rows * hidden));
  for (int64_t p = 0; p < rows; ++p)
    std::copy_n(x.data + (s.slot_at[size_t(low + p)] / k) * hidden, hidden, s.gathered.data() + p * hidden);
  // Every expert's gate and up products in one loop, then every down product in another.
  s.jobs.clear();
  for (int64_t e = 0; e < held; ++e) {
    const int64_t begin = s.expert_begin[size_t(first + e)] - low, m = s.expert_begin[size_t(first + e + 1)] - low - begin;
    if (m == 0) continue;
    const Mat xs{s.gathered.data() + begin * hidden, m, hidden};
    s.jobs.push_back({xs, w.w1[size_t(e)], Mat{s.gate.data() + begin * ffn, m, ffn}});
    s.jobs.push_back({xs, w.w3[size_t(e)], Mat{s.up.data() + begin * ffn, m, ffn}});
  }
  matmul_batch(pool, s.jobs, operands);
  pool.parallel_for(rows, [&](int64_t p) { swiglu(s.gate.data() + p * ffn, s.up.data() + p * ffn, ffn); });
  s.jobs.clear();
  for (int64_t e = 0; e < held; ++e) {
    const int64_t begin = s.expert_begin[size_t(first + e)] - low, m = s.expert_begin[size_t(first + e + 1)] - low - begin;
    if (m == 0) continue;
    s.jobs.push_back({Mat{s.gate.data() + begin * ffn, m, ffn}, w.w2[size_t(e)], Mat{s.down.data() + begin * hidden, m, hidden}});
  }
  matmul_batch(pool, s.jobs, operands);
  // Weighted sum in rank order, whatever order the experts ran in; experts held elsewhere add
  // nothing here.
  pool.parallel_for(n, [&](int64_t t) {
    float* o = out.data + t * out.cols;
    std::fill(o, o + hidden, 0.0f);
    for (int64_t r = 0; r < k; ++r) {
      const int64_t p = s.position_of[size_t(t * k + r)];
      if (p < low || p >= high) continue;
      const float weight = s.weights[size_t(t * k + r)];
      const float* y = s.down.data() + (p - low) * hidden;
      for (int64_t c = 0; c < hidden; ++c) o[c] += weight * y[c];
    }
  });
}

void moe_reference(const Mat& x, const MoeWeights& w, Mat out, Operands operands) {
  const int64_t hidden = x.cols, experts = w.router.rows, k = w.top_k, ffn = w.w1[0].rows;
  const int64_t first = w.first_expert, held = int64_t(w.w1.size());
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
      const int64_t e = chosen[size_t(r)] - first;
      if (e < 0 || e >= held) continue;  // held by another rank
      matmul_reference(row, w.w1[size_t(e)], Mat{gate.data(), 1, ffn}, operands);
      matmul_reference(row, w.w3[size_t(e)], Mat{up.data(), 1, ffn}, operands);
      swiglu(gate.data(), up.data(), ffn);
      matmul_reference(Mat{gate.data(), 1, ffn}, w.w2[size_t(e)], Mat{y.data(), 1, hidden}, operands);
      for (int64_t c = 0; c < hidden; ++c) o[c] += weights[size_t(r)] * y[size_t(c)];
    }
  }
}

}  // namespace m1::cpu
