#include "cpu/softmax_attention.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/matmul.h"
#include "cpu/vectorize.h"
#include "fast_exp.h"
#include "m1/error.h"

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
// From this many query vectors on, transposing each key tile pays for itself. The choice depends
// only on the sequence's own block, never on other sequences in the step.
constexpr int64_t kQueriesToTranspose = 16;
// From this many query vectors on, the bf16 form (when allowed) pays: it computes 16 query vectors
// at a time, so a decode row's few (one row of 4 to 8 heads) would waste most of its lanes, where
// the fp32 form's dot products stream the cache at memory speed. Like the transposition, the
// choice depends only on the sequence's own block.
constexpr int64_t kQueriesForBf16 = 16;

// Online-softmax update of one query vector's running state with its scores against one key tile
// (the first `visible` of them unmasked): turns the scores into weights in place and returns the
// factor the earlier accumulation must be scaled by.
M1_INLINE float absorb_scores(float* scores, int64_t tile, int64_t visible, float& max, float& sum) {
  float tile_max = -INFINITY;
  for (int64_t j = 0; j < visible; ++j) tile_max = std::max(tile_max, scores[j]);
  const float new_max = std::max(max, tile_max);
  float tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
  for (int64_t j = 0; j < visible; ++j) tile_sum += scores[j] = exp_nonpositive(scores[j] - new_max);
  for (int64_t j = std::max<int64_t>(visible, 0); j < tile; ++j) scores[j] = 0.0f;
  const float rescale = visible > 0 ? exp_nonpositive(max - new_max) : 1.0f;
  sum = sum * rescale + tile_sum;
  max = visible > 0 ? new_max : max;
  return rescale;
}

// Rows this far ahead of the ones being multiplied are asked for (cache-line prefetches) as the
// few-query form reads the cache: from memory, a tile's keys, then its values, arrive in bursts
// too short for the hardware prefetchers to run ahead. 16 rows of d = 128 is 4 KB of bf16 keys and
// 4 KB of values ahead; bench_kernels attention/decode_depth131072_bf16_cache went from 10.6 ms
// to 4.1 ms with the head-major cache (cpu_state.h), median of 5.
constexpr int64_t kPrefetchRows = 16;

template <class T>
M1_INLINE void prefetch_row(const T* row, int64_t d) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (size_t at = 0; at < size_t(d) * sizeof(T); at += 64) __builtin_prefetch(bytes + at);
}

// The few-query form's scores of a tile: gemm_nt four keys at a time (the blocks gemm_nt takes
// itself, so the same bits), each block asking for the keys and values kPrefetchRows ahead.
template <class T>
M1_INLINE void scores_streamed(const float* q, int64_t queries, int64_t d, const T* keys, const T* values,
                               int64_t stride, int64_t t0, int64_t tile, int64_t keys_needed, float* scores) {
  for (int64_t j = 0; j < tile; j += 4) {
    const int64_t ahead_end = std::min(t0 + j + 4 + kPrefetchRows, keys_needed);
    for (int64_t t = t0 + j + kPrefetchRows; t < ahead_end; ++t) {
      prefetch_row(keys + t * stride, d);
      prefetch_row(values + t * stride, d);
    }
    gemm_nt(q, d, keys + (t0 + j) * stride, stride, queries, std::min<int64_t>(4, tile - j), d, scores + j, kKeyTile);
  }
}

}  // namespace

bool attention_takes_bf16(int64_t queries, bool bf16_operands) {
  return bf16_operands && queries >= kQueriesForBf16 && bf16_products_available();
}

namespace {

// The fp32 form's query vectors (row i, head h is row i * heads + h of the packed block), each
// pre-scaled by 1/sqrt(d), and its buffers for one tile.
void prepare_fp32(const AttentionGroup& g, AttentionScratch& s) {
  const int64_t queries = g.count * g.heads, d = g.d;
  const float scale = 1.0f / std::sqrt(float(d));
  s.q.resize(size_t(queries * d));
  for (int64_t i = 0; i < g.count; ++i)
    for (int64_t h = 0; h < g.heads; ++h)
      for (int64_t c = 0; c < d; ++c) s.q[size_t((i * g.heads + h) * d + c)] = g.q[i * g.q_stride + h * d + c] * scale;
  s.scores.resize(size_t(queries * kKeyTile));
  s.keys_t.resize(size_t(d * kKeyTile));
  s.partial.resize(size_t(queries * d));
  s.rescale.resize(size_t(queries));
}

// One chunk of keys, [c * kAttentionChunkKeys, ...) up to what the block needs, from a fresh
// online-softmax state into `state` (each query vector's max, then sums, then accumulated values),
// tile by tile. The fp32 form over a cache of T: float, or uint16_t (bf16 bits, widened as they
// are read; the products widen them as they load them, giving the sums they give on the widened
// values).
template <class T>
M1_VECTOR_CLONES void walk_chunk(const AttentionGroup& g, AttentionScratch& s, int64_t chunk, float* state) {
  const T* const keys = static_cast<const T*>(g.keys);
  const T* const values = static_cast<const T*>(g.values);
  const int64_t queries = g.count * g.heads, d = g.d, keys_needed = g.pos0 + g.count;
  float* const max = state;
  float* const sum = state + queries;
  float* const acc = state + 2 * queries;
  std::fill(max, max + queries, -INFINITY);
  std::fill(sum, sum + queries, 0.0f);
  std::fill(acc, acc + queries * d, 0.0f);
  const int64_t end = std::min(keys_needed, (chunk + 1) * kAttentionChunkKeys);
  for (int64_t t0 = chunk * kAttentionChunkKeys; t0 < end; t0 += kKeyTile) {
    const int64_t tile = std::min(kKeyTile, end - t0);
    const T* const tile_keys = keys + t0 * g.kv_stride;
    if (queries < kQueriesToTranspose) {
      scores_streamed(s.q.data(), queries, d, keys, values, g.kv_stride, t0, tile, keys_needed, s.scores.data());
    } else {
      for (int64_t j = 0; j < tile; ++j)  // the tile's keys transposed: d rows of `tile` columns
        for (int64_t c = 0; c < d; ++c) {
          const T key = tile_keys[j * g.kv_stride + c];
          if constexpr (std::is_same_v<T, uint16_t>)
            s.keys_t[size_t(c * kKeyTile + j)] = bf16_to_f32(key);
          else
            s.keys_t[size_t(c * kKeyTile + j)] = key;
        }
      gemm_nn(s.q.data(), d, s.keys_t.data(), kKeyTile, queries, tile, d, s.scores.data(), kKeyTile);
    }
    for (int64_t qi = 0; qi < queries; ++qi) {
      const int64_t visible = std::min(tile, g.pos0 + qi / g.heads + 1 - t0);  // causal: row i sees keys <= pos0 + i
      s.rescale[size_t(qi)] = absorb_scores(s.scores.data() + qi * kKeyTile, tile, visible, max[qi], sum[qi]);
    }
    gemm_nn(s.scores.data(), kKeyTile, values + t0 * g.kv_stride, g.kv_stride, queries, d, tile, s.partial.data(), d);
    for (int64_t qi = 0; qi < queries; ++qi) {
      float* a = acc + qi * d;
      const float* part = s.partial.data() + qi * d;
      const float r = s.rescale[size_t(qi)];
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) a[c] = a[c] * r + part[c];
    }
  }
}

void walk_chunk(const AttentionGroup& g, AttentionScratch& s, int64_t chunk, float* state) {
  if (g.kv_dtype == DType::kBF16) return walk_chunk<uint16_t>(g, s, chunk, state);
  walk_chunk<float>(g, s, chunk, state);
}

// Folds chunk state `b` into the running `a`, per query vector: max = max(max_a, max_b); acc and sum
// = a's times e^(max_a - max) plus b's times e^(max_b - max). A chunk with no key the query sees
// (max -inf: only the last chunk of a block whose rows end before it) leaves a as it was. One
// compiled function for every caller, so a row's bits are the same whoever folds its chunks.
[[gnu::noinline]] void fold_chunk(float* a, const float* b, int64_t queries, int64_t d) {
  float* const max_a = a;
  float* const sum_a = a + queries;
  float* const acc_a = a + 2 * queries;
  const float* const max_b = b;
  const float* const sum_b = b + queries;
  const float* const acc_b = b + 2 * queries;
  for (int64_t qi = 0; qi < queries; ++qi) {
    if (max_b[qi] == -INFINITY) continue;
    const float m = std::max(max_a[qi], max_b[qi]);
    const float wa = exp_nonpositive(max_a[qi] - m), wb = exp_nonpositive(max_b[qi] - m);
    sum_a[qi] = sum_a[qi] * wa + sum_b[qi] * wb;
    float* acc = acc_a + qi * d;
    const float* other = acc_b + qi * d;
    for (int64_t c = 0; c < d; ++c) acc[c] = acc[c] * wa + other[c] * wb;
    max_a[qi] = m;
  }
}

// Each query vector's output: its accumulated values (rows `width` apart) over its weights' sum.
void write_outputs(const AttentionGroup& g, const float* sum, const float* acc, int64_t width) {
  for (int64_t i = 0; i < g.count; ++i)
    for (int64_t h = 0; h < g.heads; ++h) {
      const int64_t qi = i * g.heads + h;
      const float inv = 1.0f / sum[qi];
      float* o = g.out + i * g.out_stride + h * g.d;
      for (int64_t c = 0; c < g.d; ++c) o[c] = acc[qi * width + c] * inv;
    }
}

// The outputs of a folded chunk state.
void write_folded(const AttentionGroup& g, const float* state) {
  const int64_t queries = g.count * g.heads;
  write_outputs(g, state + queries, state + 2 * queries, g.d);
}

// The fp32 form: each chunk's state in turn, folded into the first's.
void attention_group_fp32(const AttentionGroup& g, AttentionScratch& s) {
  prepare_fp32(g, s);
  const size_t floats = attention_chunk_state_floats(g);
  s.folded.resize(floats);
  s.chunk.resize(floats);
  walk_chunk(g, s, 0, s.folded.data());
  for (int64_t c = 1, chunks = attention_chunks(g); c < chunks; ++c) {
    walk_chunk(g, s, c, s.chunk.data());
    fold_chunk(s.folded.data(), s.chunk.data(), g.count * g.heads, g.d);
  }
  write_folded(g, s.folded.data());
}

}  // namespace

void attention_group(const AttentionGroup& g, AttentionScratch& s) {
  if (attention_takes_bf16(g.count * g.heads, g.bf16_operands)) return attention_group_bf16(g, s);
  attention_group_fp32(g, s);
}

int64_t attention_chunks(const AttentionGroup& g) {
  return (g.pos0 + g.count + kAttentionChunkKeys - 1) / kAttentionChunkKeys;
}

size_t attention_chunk_state_floats(const AttentionGroup& g) { return size_t(g.count * g.heads * (g.d + 2)); }

void attention_group_chunks(const AttentionGroup& g, int64_t first, int64_t end, AttentionScratch& s, float* states) {
  if (first < 0 || first >= end || end > attention_chunks(g))
    fail("attention_group_chunks: chunks [{}, {}) of {}", first, end, attention_chunks(g));
  prepare_fp32(g, s);
  const size_t floats = attention_chunk_state_floats(g);
  for (int64_t c = first; c < end; ++c) walk_chunk(g, s, c, states + size_t(c - first) * floats);
}

void attention_fold_chunks(const AttentionGroup& g, const float* states, AttentionScratch& s) {
  const size_t floats = attention_chunk_state_floats(g);
  s.folded.assign(states, states + floats);
  for (int64_t c = 1, chunks = attention_chunks(g); c < chunks; ++c)
    fold_chunk(s.folded.data(), states + size_t(c) * floats, g.count * g.heads, g.d);
  write_folded(g, s.folded.data());
}

void AttentionScratch::start_running_sums(int64_t queries, int64_t width) {
  acc.assign(size_t(queries * width), 0.0f);
  max.assign(size_t(queries), -INFINITY);
  sum.assign(size_t(queries), 0.0f);
}

void AttentionScratch::write_outputs(const AttentionGroup& g, int64_t width) const {
  m1::cpu::write_outputs(g, sum.data(), acc.data(), width);
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
        for (int64_t c = 0; c < g.d; ++c) dot_qk += double(q[c]) * load_as_f32(g.keys, g.kv_dtype, size_t(t * g.kv_stride + c));
        scores[size_t(t)] = dot_qk * scale;
      }
      double max_score = *std::max_element(scores.begin(), scores.end()), total = 0;
      for (double& v : scores) total += v = std::exp(v - max_score);
      for (int64_t c = 0; c < g.d; ++c) {
        double o = 0;
        for (int64_t t = 0; t < keys; ++t)
          o += scores[size_t(t)] * load_as_f32(g.values, g.kv_dtype, size_t(t * g.kv_stride + c));
        g.out[i * g.out_stride + h * g.d + c] = float(o / total);
      }
    }
}

}  // namespace m1::cpu
