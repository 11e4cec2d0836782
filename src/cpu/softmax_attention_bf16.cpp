// attention_group with bf16 operands (softmax_attention.h), for fast precision on CPUs with
// AVX-512 BF16: both products of each key tile on vdpbf16ps, fp32 accumulation, the softmax in
// fp32.
//
// Every operand is laid out so that its products need no transposition per tile:
//   queries   pairs of their scaled values, transposed once per call: qp[cp][qi] holds (q[2cp],
//             q[2cp + 1]) of query vector qi as one 32-bit lane;
//   keys      each cache row rounded to bf16 as it is (a bf16 cache's taken as stored): row j
//             read as 32-bit pairs (k[2cp], k[2cp + 1]), one broadcast per pair against 16
//             queries' pairs, so the tile's scores come out key-major, st[j][qi];
//   weights   the softmax runs down each query's column, 16 queries to a vector; each pair of
//             keys' weights is packed into one lane per query: pp[jp][qi] = (p[2jp], p[2jp + 1]);
//   values    each pair of cache rows interleaved column by column: vp[jp][c] = (v[2jp][c],
//             v[2jp + 1][c]), one broadcast weight pair per query against 16 columns.
// Each score is summed over the head dim's pairs in order, each output over the tile's key pairs
// in order, then folded into the running sums tile by tile: every query vector's arithmetic is
// its own lane's, the same however many queries share the call. So a row gets the same bits
// alone (decode) or in any block (prefill), and keys a query does not see (the causal mask, a
// short last tile) carry weight exactly 0 against zero-padded rows.

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as uninitialised.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/softmax_attention.h"
#include "m1/dtype.h"

namespace m1::cpu {
namespace {

#define M1_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kKeys = 64;      // keys per tile, at absolute positions t0 = 0, 64, ...
constexpr int64_t kKeyPairs = kKeys / 2;
constexpr int64_t kLanes = 16;     // fp32 lanes of a vector: queries per softmax step, columns per value vector
constexpr int64_t kColumns = 64;   // output columns per product tile (4 vectors)

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// exp_nonpositive's arithmetic (fast_exp.h) on 16 lanes: e^x for x <= 0 to within 2 ulp, 0 below
// -87. (GCC contracts a multiply and an add into an FMA here as it may in the scalar form, so the
// two need not agree to the bit; within this form every lane computes alike.)
M1_BF16_TARGET inline __m512 exp_nonpositive16(__m512 x) {
  const __m512i lowest = _mm512_set1_epi32(int32_t(0xC2AE0000u));  // bits of -87.0f
  const __m512i bits = _mm512_castps_si512(x);
  const __mmask16 underflows = _mm512_cmpgt_epu32_mask(bits, lowest);
  x = _mm512_castsi512_ps(_mm512_mask_mov_epi32(bits, underflows, lowest));
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), shifter), shifter);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e_r = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
  const __m512i exponent = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 e = _mm512_mul_ps(e_r, _mm512_castsi512_ps(exponent));
  return _mm512_maskz_mov_ps(__mmask16(~underflows), e);
}

// Two vectors of 16 floats as 16 lanes of bf16 pairs: lo in the low half of each lane.
M1_BF16_TARGET inline __m512i pair_lanes(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

// Rows [0, rows) of x (d floats each, stride ldx) as bf16 in rows of `pairs` 32-bit pairs; rows
// [rows, kKeys) and the pad past d are zeros.
M1_BF16_TARGET void round_rows(const float* x, int64_t ldx, int64_t rows, int64_t d, int64_t pairs, uint32_t* out) {
  for (int64_t j = 0; j < kKeys; ++j) {
    uint32_t* row = out + j * pairs;
    for (int64_t c = 0; c < 2 * pairs; c += 2 * kLanes) {
      const int64_t left = j < rows ? std::clamp<int64_t>(d - c, 0, 2 * kLanes) : 0;
      const __mmask16 lo = __mmask16((1u << std::min<int64_t>(left, kLanes)) - 1);
      const __mmask16 hi = __mmask16((1u << std::clamp<int64_t>(left - kLanes, 0, kLanes)) - 1);
      const float* src = x + j * ldx + c;
      const __m512 a = _mm512_maskz_loadu_ps(lo, src), b = _mm512_maskz_loadu_ps(hi, src + kLanes);
      const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a's 16 values, then b's
      _mm512_mask_storeu_epi32(row + c / 2, __mmask16((1u << std::min<int64_t>(pairs - c / 2, kLanes)) - 1), packed);
    }
  }
}

// The same rows of a bf16 cache, as they are.
M1_BF16_TARGET void round_rows(const uint16_t* x, int64_t ldx, int64_t rows, int64_t d, int64_t pairs, uint32_t* out) {
  for (int64_t j = 0; j < kKeys; ++j) {
    uint32_t* row = out + j * pairs;
    for (int64_t c = 0; c < 2 * pairs; c += 2 * kLanes) {
      const int64_t left = j < rows ? std::clamp<int64_t>(d - c, 0, 2 * kLanes) : 0;
      const __m512i packed = _mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << left) - 1), x + j * ldx + c);
      _mm512_mask_storeu_epi32(row + c / 2, __mmask16((1u << std::min<int64_t>(pairs - c / 2, kLanes)) - 1), packed);
    }
  }
}

// Value rows [0, rows) of the tile (d floats each, stride ldv) as key pairs: vp[jp][c] holds
// (v[2jp][c], v[2jp + 1][c]) for c < width; rows past `rows` and columns past d are zeros.
M1_BF16_TARGET void pair_values(const float* v, int64_t ldv, int64_t rows, int64_t d, int64_t width, uint32_t* vp) {
  for (int64_t jp = 0; jp < kKeyPairs; ++jp)
    for (int64_t c = 0; c < width; c += kLanes) {
      const __mmask16 columns = __mmask16((1u << std::clamp<int64_t>(d - c, 0, kLanes)) - 1);
      const __m512 lo = _mm512_maskz_loadu_ps(2 * jp < rows ? columns : 0, v + 2 * jp * ldv + c);
      const __m512 hi = _mm512_maskz_loadu_ps(2 * jp + 1 < rows ? columns : 0, v + (2 * jp + 1) * ldv + c);
      _mm512_storeu_si512(vp + jp * width + c, pair_lanes(lo, hi));
    }
}

// The same pairs from the rows of a bf16 cache.
M1_BF16_TARGET void pair_values(const uint16_t* v, int64_t ldv, int64_t rows, int64_t d, int64_t width, uint32_t* vp) {
  for (int64_t jp = 0; jp < kKeyPairs; ++jp)
    for (int64_t c = 0; c < width; c += kLanes) {
      const __mmask16 columns = __mmask16((1u << std::clamp<int64_t>(d - c, 0, kLanes)) - 1);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(2 * jp < rows ? columns : 0, v + 2 * jp * ldv + c));
      const __m512i hi =
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(2 * jp + 1 < rows ? columns : 0, v + (2 * jp + 1) * ldv + c));
      _mm512_storeu_si512(vp + jp * width + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

// st[j][q0 + 16c + lane] for j in [j0, j0 + 4): key row j's pairs (kr, `pairs` each) against the
// queries' pairs (qp, stride qpad), summed over the pairs in order.
template <int C>
M1_BF16_TARGET void score_tile(const uint32_t* kr, int64_t pairs, const uint32_t* qp, int64_t qpad, int64_t j0,
                               int64_t q0, float* st) {
  __m512 acc[4][C];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t cp = 0; cp < pairs; ++cp) {
    __m512bh q[C];
    for (int c = 0; c < C; ++c) q[c] = (__m512bh)_mm512_loadu_si512(qp + cp * qpad + q0 + c * kLanes);
    for (int r = 0; r < 4; ++r) {
      const __m512bh k = (__m512bh)_mm512_set1_epi32(int32_t(kr[(j0 + r) * pairs + cp]));
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], k, q[c]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(st + (j0 + r) * qpad + q0 + c * kLanes, acc[r][c]);
}

// The running sums of query vectors [q0, q0 + R) over columns [c0, c0 + kColumns): acc <- acc *
// rescale + (the tile's weight pairs pp times the value pairs vp, summed over the pairs in order).
template <int R>
M1_BF16_TARGET void value_tile(const uint32_t* pp, int64_t qpad, const uint32_t* vp, int64_t width, const float* rescale,
                               int64_t q0, int64_t c0, float* acc, int64_t ld_acc) {
  constexpr int G = kColumns / kLanes;
  __m512 part[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) part[r][g] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < kKeyPairs; ++jp) {
    __m512bh v[G];
    for (int g = 0; g < G; ++g) v[g] = (__m512bh)_mm512_loadu_si512(vp + jp * width + c0 + g * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512bh p = (__m512bh)_mm512_set1_epi32(int32_t(pp[jp * qpad + q0 + r]));
      for (int g = 0; g < G; ++g) part[r][g] = _mm512_dpbf16_ps(part[r][g], p, v[g]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 scale = _mm512_set1_ps(rescale[q0 + r]);
    for (int g = 0; g < G; ++g) {
      float* a = acc + (q0 + r) * ld_acc + c0 + g * kLanes;
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(a), scale), part[r][g]));
    }
  }
}

// The online softmax of one tile for query vectors [q0, q0 + 16): st's scores (key-major) become
// weights packed in pairs into pp, and max, sum and rescale move on. Query vector qi (row qi /
// heads) sees the tile's first `visible` keys: pos0 + row + 1 - t0 of them, at most the tile.
M1_BF16_TARGET void softmax_tile(float* st, int64_t qpad, int64_t q0, int64_t heads, int64_t pos0, int64_t t0,
                                 int64_t tile, float* max, float* sum, float* rescale, uint32_t* pp) {
  alignas(64) int32_t visible[kLanes];
  for (int64_t l = 0; l < kLanes; ++l)
    visible[l] = int32_t(std::clamp<int64_t>(pos0 + (q0 + l) / heads + 1 - t0, 0, tile));
  const __m512i vis = _mm512_load_si512(visible);
  const __mmask16 any = _mm512_cmpgt_epi32_mask(vis, _mm512_setzero_si512());
  __m512 tile_max = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < tile; ++j) {
    const __mmask16 sees = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(int32_t(j)));
    tile_max = _mm512_mask_max_ps(tile_max, sees, tile_max, _mm512_loadu_ps(st + j * qpad + q0));
  }
  const __m512 old_max = _mm512_loadu_ps(max + q0);
  const __m512 new_max = _mm512_mask_max_ps(old_max, any, old_max, tile_max);
  __m512 tile_sum = _mm512_setzero_ps();
  __m512 previous = _mm512_setzero_ps();  // the even key's weights, waiting for the odd one's
  for (int64_t j = 0; j < kKeys; ++j) {
    const __mmask16 sees = j < tile ? _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(int32_t(j))) : 0;
    const __m512 shifted = _mm512_sub_ps(_mm512_maskz_loadu_ps(sees, st + j * qpad + q0), new_max);
    const __m512 w = _mm512_maskz_mov_ps(sees, exp_nonpositive16(_mm512_maskz_mov_ps(sees, shifted)));
    tile_sum = _mm512_add_ps(tile_sum, w);
    if (j % 2 == 0)
      previous = w;
    else
      _mm512_storeu_si512(pp + (j / 2) * qpad + q0, pair_lanes(previous, w));
  }
  // rescale = e^(old - new) where the tile has keys to see (the first such tile: e^-inf = 0), else 1.
  const __m512 factor = _mm512_mask_blend_ps(any, _mm512_set1_ps(1.0f), exp_nonpositive16(_mm512_maskz_sub_ps(any, old_max, new_max)));
  _mm512_storeu_ps(rescale + q0, factor);
  _mm512_storeu_ps(sum + q0, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(sum + q0), factor), tile_sum));
  _mm512_storeu_ps(max + q0, new_max);
}

}  // namespace

M1_BF16_TARGET void attention_group_bf16(const AttentionGroup& g, AttentionScratch& s) {
  const int64_t queries = g.count * g.heads, d = g.d, keys_needed = g.pos0 + g.count;
  const int64_t qpad = round_up(queries, 4 * kLanes), pairs = (d + 1) / 2, width = round_up(d, kColumns);
  const float scale = 1.0f / std::sqrt(float(d));
  // The queries' scaled values as bf16 pairs, transposed once: qp[cp][qi].
  s.qp.assign(size_t(pairs * qpad), 0u);
  for (int64_t i = 0; i < g.count; ++i)
    for (int64_t h = 0; h < g.heads; ++h) {
      const int64_t qi = i * g.heads + h;
      const float* q = g.q + i * g.q_stride + h * d;
      for (int64_t c = 0; c < d; ++c) s.qp[size_t((c / 2) * qpad + qi)] |= uint32_t(f32_to_bf16(q[c] * scale)) << (16 * (c % 2));
    }
  s.kr.resize(size_t(kKeys * pairs));
  s.vp.resize(size_t(kKeyPairs * width));
  s.pp.resize(size_t(kKeyPairs * qpad));
  s.scores.resize(size_t(kKeys * qpad));
  s.start_running_sums(qpad, width);
  s.rescale.resize(size_t(qpad));
  for (int64_t t0 = 0; t0 < keys_needed; t0 += kKeys) {
    const int64_t tile = std::min(kKeys, keys_needed - t0);
    if (g.kv_dtype == DType::kBF16) {
      round_rows(static_cast<const uint16_t*>(g.keys) + t0 * g.kv_stride, g.kv_stride, tile, d, pairs, s.kr.data());
      pair_values(static_cast<const uint16_t*>(g.values) + t0 * g.kv_stride, g.kv_stride, tile, d, width, s.vp.data());
    } else {
      round_rows(static_cast<const float*>(g.keys) + t0 * g.kv_stride, g.kv_stride, tile, d, pairs, s.kr.data());
      pair_values(static_cast<const float*>(g.values) + t0 * g.kv_stride, g.kv_stride, tile, d, width, s.vp.data());
    }
    for (int64_t q0 = 0; q0 < qpad; q0 += 4 * kLanes) {
      const int64_t vectors = std::min<int64_t>(4, (round_up(queries, kLanes) - q0) / kLanes);
      for (int64_t j0 = 0; j0 < round_up(tile, 4); j0 += 4) {
        switch (vectors) {
          case 1: score_tile<1>(s.kr.data(), pairs, s.qp.data(), qpad, j0, q0, s.scores.data()); break;
          case 2: score_tile<2>(s.kr.data(), pairs, s.qp.data(), qpad, j0, q0, s.scores.data()); break;
          case 3: score_tile<3>(s.kr.data(), pairs, s.qp.data(), qpad, j0, q0, s.scores.data()); break;
          default: score_tile<4>(s.kr.data(), pairs, s.qp.data(), qpad, j0, q0, s.scores.data()); break;
        }
      }
      for (int64_t v = 0; v < vectors; ++v)
        softmax_tile(s.scores.data(), qpad, q0 + v * kLanes, g.heads, g.pos0, t0, tile, s.max.data(), s.sum.data(),
                     s.rescale.data(), s.pp.data());
    }
    for (int64_t q0 = 0; q0 < queries; q0 += 4)
      for (int64_t c0 = 0; c0 < width; c0 += kColumns) {
        switch (std::min<int64_t>(4, queries - q0)) {
          case 1: value_tile<1>(s.pp.data(), qpad, s.vp.data(), width, s.rescale.data(), q0, c0, s.acc.data(), width); break;
          case 2: value_tile<2>(s.pp.data(), qpad, s.vp.data(), width, s.rescale.data(), q0, c0, s.acc.data(), width); break;
          case 3: value_tile<3>(s.pp.data(), qpad, s.vp.data(), width, s.rescale.data(), q0, c0, s.acc.data(), width); break;
          default: value_tile<4>(s.pp.data(), qpad, s.vp.data(), width, s.rescale.data(), q0, c0, s.acc.data(), width); break;
        }
      }
  }
  s.write_outputs(g, width);
}

}  // namespace m1::cpu
