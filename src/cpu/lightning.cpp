#include "cpu/lightning.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/vectorize.h"

namespace m1::cpu {
namespace {

M1_INLINE float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

M1_INLINE void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// One block of `n` tokens starting at token `t0`; decay[m] = exp(-s m) for m in [0, n].
M1_INLINE void lightning_block(const LightningHead& h, int64_t t0, int64_t n, const std::vector<float>& decay,
                     std::vector<float>& weights) {
  const int64_t d = h.d;
  weights.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    const float* q = h.q + (t0 + i) * h.stride;
    float* o = h.out + (t0 + i) * h.out_stride;
    // Inter-block: exp(-s (i+1)) q S, with S the state before the block.
    std::fill(o, o + d, 0.0f);
    for (int64_t a = 0; a < d; ++a) axpy(q[a], h.state + a * d, o, d);
    const float qdec = decay[size_t(i + 1)];
    for (int64_t c = 0; c < d; ++c) o[c] *= qdec;
    // Intra-block: sum_{j<=i} exp(-s (i-j)) (q . k_j) v_j.
    for (int64_t j = 0; j <= i; ++j) weights[size_t(j)] = dot(q, h.k + (t0 + j) * h.stride, d) * decay[size_t(i - j)];
    for (int64_t j = 0; j <= i; ++j) axpy(weights[size_t(j)], h.v + (t0 + j) * h.stride, o, d);
  }
  // S <- exp(-s n) S + sum_j exp(-s (n-1-j)) k_j^T v_j.
  const float block_decay = decay[size_t(n)];
  for (int64_t a = 0; a < d * d; ++a) h.state[a] *= block_decay;
  for (int64_t j = 0; j < n; ++j) {
    const float* k = h.k + (t0 + j) * h.stride;
    const float* v = h.v + (t0 + j) * h.stride;
    const float kdec = decay[size_t(n - 1 - j)];
    for (int64_t a = 0; a < d; ++a) axpy(k[a] * kdec, v, h.state + a * d, d);
  }
}

}  // namespace

M1_VECTOR_CLONES void lightning_chunked(const LightningHead& h, int64_t block) {
  thread_local std::vector<float> decay, weights;  // no allocation per call once warm
  decay.resize(size_t(block + 1));
  for (int64_t m = 0; m <= block; ++m) decay[size_t(m)] = std::exp(-h.decay * float(m));
  for (int64_t t0 = 0; t0 < h.count; t0 += block)
    lightning_block(h, t0, std::min(block, h.count - t0), decay, weights);
}

M1_VECTOR_CLONES void lightning_decode_token(const LightningHead& h) {
  const int64_t d = h.d;
  const float decay = std::exp(-h.decay);
  float* o = h.out;
  std::fill(o, o + d, 0.0f);
  for (int64_t a = 0; a < d; ++a) {
    float* row = h.state + a * d;
    const float ka = h.k[a], qa = h.q[a];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) {
      row[c] = decay * row[c] + ka * h.v[c];
      o[c] += qa * row[c];
    }
  }
}

void lightning_reference(const LightningHead& h) {
  const int64_t d = h.d;
  const double decay = std::exp(-double(h.decay));
  std::vector<double> S(h.state, h.state + d * d);
  for (int64_t t = 0; t < h.count; ++t) {
    const float* q = h.q + t * h.stride;
    const float* k = h.k + t * h.stride;
    const float* v = h.v + t * h.stride;
    for (int64_t a = 0; a < d; ++a)
      for (int64_t c = 0; c < d; ++c) S[size_t(a * d + c)] = decay * S[size_t(a * d + c)] + double(k[a]) * v[c];
    for (int64_t c = 0; c < d; ++c) {
      double o = 0;
      for (int64_t a = 0; a < d; ++a) o += double(q[a]) * S[size_t(a * d + c)];
      h.out[t * h.out_stride + c] = float(o);
    }
  }
  for (int64_t a = 0; a < d * d; ++a) h.state[a] = float(S[size_t(a)]);
}

}  // namespace m1::cpu
