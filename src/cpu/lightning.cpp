#include "cpu/lightning.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/matmul.h"
#include "cpu/vectorize.h"

namespace m1::cpu {
namespace {

// Buffers of one thread, kept between calls so the step loop does not allocate.
struct BlockScratch {
  std::vector<float> decay;    // decay[m] = exp(-s m), m in [0, block]
  std::vector<float> weights;  // (Q K^T) * D, block x block
  std::vector<float> intra;    // weights V, block x d
  std::vector<float> keys_t;   // (K * kdec)^T, d x block
  std::vector<float> update;   // (K * kdec)^T V, d x d
};

// One block of `n` tokens starting at token `t0`, as four matrix products.
void lightning_block(const LightningHead& h, int64_t t0, int64_t n, int64_t block, BlockScratch& s) {
  const int64_t d = h.d;
  const float* q = h.q + t0 * h.stride;
  const float* k = h.k + t0 * h.stride;
  const float* v = h.v + t0 * h.stride;
  float* out = h.out + t0 * h.out_stride;
  // Inter-block: O = (Q S) * qdec, with S the state before the block.
  gemm_nn(q, h.stride, h.state, d, n, d, d, out, h.out_stride);
  for (int64_t i = 0; i < n; ++i) {
    const float qdec = s.decay[size_t(i + 1)];
    for (int64_t c = 0; c < d; ++c) out[i * h.out_stride + c] *= qdec;
  }
  // Intra-block: O += ((Q K^T) * D) V, D[i][j] = exp(-s (i - j)) for j <= i, else 0.
  gemm_nt(q, h.stride, k, h.stride, n, n, d, s.weights.data(), block);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) s.weights[size_t(i * block + j)] *= j <= i ? s.decay[size_t(i - j)] : 0.0f;
  gemm_nn(s.weights.data(), block, v, h.stride, n, d, n, s.intra.data(), d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; ++c) out[i * h.out_stride + c] += s.intra[size_t(i * d + c)];
  // S <- exp(-s n) S + (K * kdec)^T V, kdec[j] = exp(-s (n - 1 - j)).
  for (int64_t j = 0; j < n; ++j) {
    const float kdec = s.decay[size_t(n - 1 - j)];
    for (int64_t a = 0; a < d; ++a) s.keys_t[size_t(a * block + j)] = k[j * h.stride + a] * kdec;
  }
  gemm_nn(s.keys_t.data(), block, v, h.stride, d, d, n, s.update.data(), d);
  const float block_decay = s.decay[size_t(n)];
  for (int64_t a = 0; a < d * d; ++a) h.state[a] = h.state[a] * block_decay + s.update[size_t(a)];
}

}  // namespace

M1_VECTOR_CLONES void lightning_chunked(const LightningHead& h, int64_t block) {
  thread_local BlockScratch s;
  s.decay.resize(size_t(block + 1));
  for (int64_t m = 0; m <= block; ++m) s.decay[size_t(m)] = std::exp(-h.decay * float(m));
  s.weights.resize(size_t(block * block));
  s.intra.resize(size_t(block * h.d));
  s.keys_t.resize(size_t(h.d * block));
  s.update.resize(size_t(h.d * h.d));
  for (int64_t t0 = 0; t0 < h.count; t0 += block) lightning_block(h, t0, std::min(block, h.count - t0), block, s);
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

void lightning_head(const LightningHead& h, bool reference) {
  if (reference)
    lightning_reference(h);
  else if (h.count == 1)
    lightning_decode_token(h);
  else
    lightning_chunked(h, kLightningBlock);
}

}  // namespace m1::cpu
