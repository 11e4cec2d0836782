#include "cpu/softmax_attention.h"

#include <algorithm>
#include <cmath>

#include "cpu/vectorize.h"

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

namespace {

constexpr int64_t kKeyTile = 64;

M1_INLINE float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

M1_VECTOR_CLONES void attention_group(const AttentionGroup& g, AttentionScratch& s) {
  const float scale = 1.0f / std::sqrt(float(g.d));
  const int64_t queries = g.count * g.heads, keys_needed = g.pos0 + g.count;
  s.scores.resize(size_t(kKeyTile));
  s.acc.assign(size_t(queries * g.d), 0.0f);
  s.max.assign(size_t(queries), -INFINITY);
  s.sum.assign(size_t(queries), 0.0f);
  for (int64_t t0 = 0; t0 < keys_needed; t0 += kKeyTile) {
    for (int64_t i = 0; i < g.count; ++i) {
      const int64_t visible = std::min(t0 + kKeyTile, g.pos0 + i + 1) - t0;  // keys of this tile row i sees
      if (visible <= 0) continue;
      for (int64_t h = 0; h < g.heads; ++h) {
        const int64_t qi = i * g.heads + h;
        const float* q = g.q + i * g.q_stride + h * g.d;
        float tile_max = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) {
          s.scores[size_t(j)] = dot(q, g.keys + (t0 + j) * g.kv_stride, g.d) * scale;
          tile_max = std::max(tile_max, s.scores[size_t(j)]);
        }
        const float new_max = std::max(s.max[size_t(qi)], tile_max);
        const float rescale = std::exp(s.max[size_t(qi)] - new_max);
        float* acc = s.acc.data() + qi * g.d;
        float tile_sum = 0;
        for (int64_t c = 0; c < g.d; ++c) acc[c] *= rescale;
        for (int64_t j = 0; j < visible; ++j) {
          const float p = std::exp(s.scores[size_t(j)] - new_max);
          tile_sum += p;
          const float* v = g.values + (t0 + j) * g.kv_stride;
#pragma omp simd
          for (int64_t c = 0; c < g.d; ++c) acc[c] += p * v[c];
        }
        s.sum[size_t(qi)] = s.sum[size_t(qi)] * rescale + tile_sum;
        s.max[size_t(qi)] = new_max;
      }
    }
  }
  for (int64_t i = 0; i < g.count; ++i)
    for (int64_t h = 0; h < g.heads; ++h) {
      const int64_t qi = i * g.heads + h;
      const float inv = 1.0f / s.sum[size_t(qi)];
      float* o = g.out + i * g.out_stride + h * g.d;
      for (int64_t c = 0; c < g.d; ++c) o[c] = s.acc[size_t(qi * g.d + c)] * inv;
    }
}

void attention_group_reference(const AttentionGroup& g) {
  const double scale = 1.0 / std::sqrt(double(g.d));
  for (int64_t i = 0; i < g.count; ++i)
    for (int64_t h = 0; h < g.heads; ++h) {
      const float* q = g.q + i * g.q_stride + h * g.d;
      const int64_t keys = g.pos0 + i + 1;
      std::vector<double> scores(static_cast<size_t>(keys));
      for (int64_t t = 0; t < keys; ++t) {
        double dot_qk = 0;
        for (int64_t c = 0; c < g.d; ++c) dot_qk += double(q[c]) * g.keys[t * g.kv_stride + c];
        scores[size_t(t)] = dot_qk * scale;
      }
      double max_score = *std::max_element(scores.begin(), scores.end()), total = 0;
      for (double& v : scores) total += v = std::exp(v - max_score);
      for (int64_t c = 0; c < g.d; ++c) {
        double o = 0;
        for (int64_t t = 0; t < keys; ++t) o += scores[size_t(t)] * g.values[t * g.kv_stride + c];
        g.out[i * g.out_stride + h * g.d + c] = float(o / total);
      }
    }
}

}  // namespace m1::cpu
