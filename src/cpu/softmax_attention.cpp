#include "cpu/softmax_attention.h"

#include <algorithm>
#include <cmath>

namespace m1::cpu {

void apply_rope(float* x, int64_t rows, int64_t stride, int64_t heads, int64_t d, int64_t rotary_dim,
                double theta, int64_t pos0) {
  const int64_t half = rotary_dim / 2;
  std::vector<float> cos_t(static_cast<size_t>(half)), sin_t(static_cast<size_t>(half));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < half; ++j) {
      double angle = double(pos0 + i) * std::pow(theta, -2.0 * double(j) / double(rotary_dim));
      cos_t[size_t(j)] = float(std::cos(angle));
      sin_t[size_t(j)] = float(std::sin(angle));
    }
    for (int64_t hd = 0; hd < heads; ++hd) {
      float* v = x + i * stride + hd * d;
      for (int64_t j = 0; j < half; ++j) {
        float a = v[j], b = v[j + half];
        v[j] = a * cos_t[size_t(j)] - b * sin_t[size_t(j)];
        v[j + half] = b * cos_t[size_t(j)] + a * sin_t[size_t(j)];
      }
    }
  }
}

void attention_head(const AttentionHead& h, std::vector<float>& scores) {
  const float scale = 1.0f / std::sqrt(float(h.d));
  scores.resize(size_t(h.pos0 + h.count));
  for (int64_t i = 0; i < h.count; ++i) {
    const float* q = h.q + i * h.q_stride;
    const int64_t keys = h.pos0 + i + 1;
    float max_score = -INFINITY;
    for (int64_t t = 0; t < keys; ++t) {
      const float* k = h.keys + t * h.kv_stride;
      float s = 0;
      for (int64_t c = 0; c < h.d; ++c) s += q[c] * k[c];
      scores[size_t(t)] = s * scale;
      max_score = std::max(max_score, scores[size_t(t)]);
    }
    float total = 0;
    for (int64_t t = 0; t < keys; ++t) total += scores[size_t(t)] = std::exp(scores[size_t(t)] - max_score);
    float* o = h.out + i * h.out_stride;
    std::fill(o, o + h.d, 0.0f);
    for (int64_t t = 0; t < keys; ++t) {
      const float p = scores[size_t(t)] / total;
      const float* v = h.values + t * h.kv_stride;
      for (int64_t c = 0; c < h.d; ++c) o[c] += p * v[c];
    }
  }
}

void attention_head_reference(const AttentionHead& h) {
  const double scale = 1.0 / std::sqrt(double(h.d));
  for (int64_t i = 0; i < h.count; ++i) {
    const int64_t keys = h.pos0 + i + 1;
    std::vector<double> scores(static_cast<size_t>(keys));
    for (int64_t t = 0; t < keys; ++t) {
      double s = 0;
      for (int64_t c = 0; c < h.d; ++c) s += double(h.q[i * h.q_stride + c]) * h.keys[t * h.kv_stride + c];
      scores[size_t(t)] = s * scale;
    }
    double max_score = *std::max_element(scores.begin(), scores.end()), total = 0;
    for (double& s : scores) total += s = std::exp(s - max_score);
    for (int64_t c = 0; c < h.d; ++c) {
      double o = 0;
      for (int64_t t = 0; t < keys; ++t) o += scores[size_t(t)] * h.values[t * h.kv_stride + c];
      h.out[i * h.out_stride + c] = float(o / total);
    }
  }
}

}  // namespace m1::cpu
