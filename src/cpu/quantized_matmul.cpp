#include "cpu/quantized_matmul.h"

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as uninitialised.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/isa.h"
#include "cpu/matmul.h"
#include "m1/quantize.h"

namespace m1::cpu {
namespace {

const Isa kIsa = cpu_isa();

constexpr int64_t kBlockRows = 64;       // x rows per prefill task
constexpr int64_t kSkinnyRows = 4;       // up to this many x rows, weight rows stream once each
constexpr int64_t kWideSkinnyRows = 8;   // the same on AVX-512, 2 weight rows at a time from 5 rows
constexpr int64_t kSkinnyOutputs = 256;  // weight rows per task of a skinny product
constexpr int64_t kPrefetchRows = 8;     // how far ahead a streamed weight row is prefetched
// Up to how many x rows the weight rows stream (decode) rather than being decoded into blocks for
// the tiles (prefill). On Zen 4, 8 rows stream at 1.3-1.5x the tiles' rate, fp32 or bf16 x
// (bench_kernels batch8/lm_head); the other ISAs decode a row into cache either way.
int64_t skinny_limit() { return kIsa == Isa::kAvx512 ? kWideSkinnyRows : kSkinnyRows; }
// Weight rows per prefill task: the dequantized block (rows x k floats) should stay within L2.
int64_t block_outputs(int64_t k) { return std::clamp<int64_t>((256 << 10) / (k * 4) / 4 * 4, 4, 64); }

// One weight row as the kernels read it: its packed codes and one fp32 scale per group. With bf16
// operands and one scale per row, the scale is 1 here and multiplies the sum afterwards.
struct QRow {
  const uint8_t* codes;
  const float* scales;
  int64_t cols, group;
  const uint8_t* ahead;  // the codes of the row kPrefetchRows further on (or the last row)
};

// Whether bf16 operands meet a row's bare codes (exact in bf16), its scale applied to the sum.
bool codes_only(const Weight& w, bool bf16) { return bf16 && w.groups() == 1; }

QRow quantized_row(const Weight& w, int64_t j, bool bf16, std::vector<float>& scales) {
  const auto* codes = static_cast<const uint8_t*>(packed_row(w, j));
  const int64_t groups = w.groups(), a = std::min(w.rows - 1, j + kPrefetchRows);
  const auto* ahead = static_cast<const uint8_t*>(packed_row(w, a));
  const int64_t scale_bytes = int64_t(row_bytes(w.scale_dtype, groups));  // that row's scales, prefetched now
  for (int64_t b = 0; b < scale_bytes; b += 64) __builtin_prefetch(static_cast<const char*>(w.scales) + a * scale_bytes + b);
  if (codes_only(w, bf16)) {
    scales.assign(1, 1.0f);
  } else if (w.scale_dtype == DType::kF32) {
    return {codes, static_cast<const float*>(w.scales) + j * groups, w.cols, w.group_size, ahead};
  } else {
    scales.resize(size_t(groups));
    const auto* stored = static_cast<const uint16_t*>(w.scales) + j * groups;
    if (w.scale_dtype == DType::kBF16)
      for (int64_t g = 0; g < groups; ++g) scales[size_t(g)] = bf16_to_f32(stored[g]);
    else
      for (int64_t g = 0; g < groups; ++g) scales[size_t(g)] = f16_to_f32(stored[g]);
  }
  return {codes, scales.data(), w.cols, w.group_size, ahead};
}

// The codes of [first, first + count) of a row copied into zeroed bytes: a tail chunk reads
// whole vectors without reading past the row.
template <int Bytes>
struct TailBytes {
  alignas(64) uint8_t bytes[Bytes] = {};
  TailBytes(const QRow& w, DType q, int64_t first) {
    const int64_t count = w.cols - first;
    if (q == DType::kQ8)
      std::memcpy(bytes, w.codes + first, size_t(count));
    else
      std::memcpy(bytes, w.codes + first / 2, size_t((count + 1) / 2));
  }
};

// ---- AVX-512: 16 fp32 weights a chunk; 32 bf16 weights a chunk (AVX-512 BF16) ----

// Lane v holds v - 8: the values of the 16 int4 codes.
__attribute__((target("avx512f"))) inline __m512 int4_values() {
  return _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
}

// The values code - 128 of 16 int8 codes, as fp32 (exact).
__attribute__((target("avx512f"), always_inline)) inline __m512 int8_values(const uint8_t* codes) {
  const __m512i widened = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(widened, _mm512_set1_epi32(128)));
}

// What a group's chunks are decoded with: int4, a table of the 16 values times the scale; int8,
// the scale.
template <DType Q>
__attribute__((target("avx512f"), always_inline)) inline __m512 f32_decoder(float s) {
  if constexpr (Q == DType::kQ4) return _mm512_mul_ps(_mm512_set1_ps(s), int4_values());
  return _mm512_set1_ps(s);
}

// Weights [k, k + 16) as fp32 code * scale: int4 from 8 bytes (element 2i in the low nibble of
// byte i: each byte widened to 64 bits holds its two nibbles in the low 4 bits of its two 32-bit
// halves, the table's indices), int8 from 16 bytes.
template <DType Q>
__attribute__((target("avx512f"), always_inline)) inline __m512 f32_chunk(const uint8_t* codes, int64_t k, __m512 decoder) {
  if constexpr (Q == DType::kQ4) {
    __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + uint64_t(k) / 2)));
    q = _mm512_or_si512(q, _mm512_slli_epi64(q, 28));
    return _mm512_permutexvar_ps(q, decoder);
  } else {
    return _mm512_mul_ps(int8_values(codes + k), decoder);
  }
}

template <DType Q>
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) inline __m512i bf16_decoder(float s) {
  if constexpr (Q == DType::kQ4) return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(f32_decoder<Q>(s)));
  return _mm512_castps_si512(_mm512_set1_ps(s));
}

// Weights [k, k + 32) as bf16 code * scale (rounded to nearest even): int4 from 16 bytes, each
// byte's nibbles the indices of the two 16-bit halves of its 32-bit lane into the 16-entry table;
// int8 from 32 bytes. `Bare`: int8 codes whose scale multiplies the sum instead (codes_only), the
// values alone (the multiplication by 1 left out: two of the nine instructions per 32 weights).
template <DType Q, bool Bare = false>
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) inline __m512i bf16_chunk(const uint8_t* codes, int64_t k,
                                                                                                __m512i decoder) {
  static_assert(!Bare || Q == DType::kQ8, "int4 decodes by its table, scaled or not");
  if constexpr (Q == DType::kQ4) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + uint64_t(k) / 2)));
    const __m512i index = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
    return _mm512_permutexvar_epi16(index, decoder);
  } else {
    if constexpr (Bare) return (__m512i)_mm512_cvtne2ps_pbh(int8_values(codes + k + 16), int8_values(codes + k));
    const __m512 s = _mm512_castsi512_ps(decoder);
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(int8_values(codes + k + 16), s), _mm512_mul_ps(int8_values(codes + k), s));
  }
}

// At a cache line's first weight k, the same line of the rows kPrefetchRows further on: a core
// decoding codes in registers leaves too few loads in flight for the hardware prefetcher alone.
template <DType Q, int C>
__attribute__((always_inline)) inline void prefetch_ahead(const QRow* w, int64_t k) {
  if (k % (Q == DType::kQ4 ? 128 : 64) != 0) return;
  for (int c = 0; c < C; ++c) __builtin_prefetch(reinterpret_cast<const char*>(w[c].ahead + (Q == DType::kQ4 ? k / 2 : k)));
}

// R rows of fp32 x against C consecutive weight rows: per output the arithmetic of the 16-lane
// fp32 tiles (one accumulator over the chunks in order, a zero-padded tail, one final reduction),
// with the weights decoded in registers as they stream. C rows at once keep C independent
// accumulator chains in flight.
template <int R, int C, DType Q>
__attribute__((target("avx512f,avx512bw"))) void rows_f32_avx512(const float* x, int64_t ldx, const QRow* w, float* out,
                                                                 int64_t ldo) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t cols = w[0].cols, group = w[0].group, full = cols / 16 * 16;
  // One flat loop over the chunks, the decoders renewed at each group's first chunk (a loop nest
  // per group of 32 cost more than its two chunks).
  __m512 decoder[C];
  for (int64_t k = 0, g = 0, left = 0; k < full; k += 16, --left) {
    if (left == 0) {
      for (int c = 0; c < C; ++c) decoder[c] = f32_decoder<Q>(w[c].scales[g]);
      ++g;
      left = group / 16;
    }
    prefetch_ahead<Q, C>(w, k);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = f32_chunk<Q>(w[c].codes, k, decoder[c]);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (full < cols) {
    const __mmask16 mask = __mmask16((1u << (cols - full)) - 1);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) {
      const TailBytes<16> tail(w[c], Q, full);
      wv[c] = _mm512_maskz_mov_ps(mask, f32_chunk<Q>(tail.bytes, 0, f32_decoder<Q>(w[c].scales[(cols - 1) / group])));
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * ldx + full);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ldo + c] = _mm512_reduce_add_ps(acc[r][c]);
}

// The same with bf16 x and weights: the arithmetic of the bf16 tiles (32 elements a step).
template <int R, int C, DType Q, bool Bare>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_bf16_avx512(const uint16_t* x, int64_t ldx, const QRow* w, float* out,
                                                                             int64_t ldo) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t cols = w[0].cols, group = w[0].group, full = cols / 32 * 32;
  __m512i decoder[C];
  for (int64_t k = 0, g = 0, left = 0; k < full; k += 32, --left) {
    if (left == 0) {
      for (int c = 0; c < C; ++c) decoder[c] = bf16_decoder<Q>(w[c].scales[g]);
      ++g;
      left = group / 32;
    }
    prefetch_ahead<Q, C>(w, k);
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) wv[c] = (__m512bh)bf16_chunk<Q, Bare>(w[c].codes, k, decoder[c]);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  }
  if (full < cols) {
    const __mmask32 mask = __mmask32((uint64_t(1) << (cols - full)) - 1);
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) {
      const TailBytes<32> tail(w[c], Q, full);
      wv[c] = (__m512bh)_mm512_maskz_mov_epi16(mask, bf16_chunk<Q, Bare>(tail.bytes, 0, bf16_decoder<Q>(w[c].scales[(cols - 1) / group])));
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * ldx + full);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ldo + c] = _mm512_reduce_add_ps(acc[r][c]);
}

// A weight row decoded into memory for the tiles, by the same chunks as the streaming kernels.
template <DType Q>
__attribute__((target("avx512f,avx512bw"))) void decode_f32_avx512(const QRow& w, float* out) {
  const int64_t full = w.cols / 16 * 16;
  for (int64_t g0 = 0, g = 0; g0 < full; g0 += w.group, ++g) {
    const __m512 decoder = f32_decoder<Q>(w.scales[g]);
    for (int64_t k = g0, end = std::min(full, g0 + w.group); k < end; k += 16) _mm512_storeu_ps(out + k, f32_chunk<Q>(w.codes, k, decoder));
  }
  if (full < w.cols) {
    const TailBytes<16> tail(w, Q, full);
    _mm512_mask_storeu_ps(out + full, __mmask16((1u << (w.cols - full)) - 1),
                          f32_chunk<Q>(tail.bytes, 0, f32_decoder<Q>(w.scales[(w.cols - 1) / w.group])));
  }
}

template <DType Q, bool Bare>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void decode_bf16_avx512(const QRow& w, uint16_t* out) {
  const int64_t full = w.cols / 32 * 32;
  for (int64_t g0 = 0, g = 0; g0 < full; g0 += w.group, ++g) {
    const __m512i decoder = bf16_decoder<Q>(w.scales[g]);
    for (int64_t k = g0, end = std::min(full, g0 + w.group); k < end; k += 32)
      _mm512_storeu_si512(out + k, bf16_chunk<Q, Bare>(w.codes, k, decoder));
  }
  if (full < w.cols) {
    const TailBytes<32> tail(w, Q, full);
    _mm512_mask_storeu_epi16(out + full, __mmask32((uint64_t(1) << (w.cols - full)) - 1),
                             bf16_chunk<Q, Bare>(tail.bytes, 0, bf16_decoder<Q>(w.scales[(w.cols - 1) / w.group])));
  }
}

// ---- AVX2: 8 fp32 weights a chunk; portable: one at a time. Both decode a row for the tiles. ----

template <DType Q>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 f32_chunk_avx2(const uint8_t* codes, int64_t k, __m256 s) {
  __m256i q;
  if constexpr (Q == DType::kQ4) {
    int32_t packed;
    std::memcpy(&packed, codes + uint64_t(k) / 2, 4);
    q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(packed));
    q = _mm256_and_si256(_mm256_or_si256(q, _mm256_slli_epi64(q, 28)), _mm256_set1_epi32(15));
    q = _mm256_sub_epi32(q, _mm256_set1_epi32(8));
  } else {
    q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k))), _mm256_set1_epi32(128));
  }
  return _mm256_mul_ps(_mm256_cvtepi32_ps(q), s);
}

template <DType Q>
void decode_f32_portable(const QRow& w, int64_t from, float* out) {
  for (int64_t c = from; c < w.cols; ++c) out[c] = float(packed_code(w.codes, Q, c)) * w.scales[c / w.group];
}

template <DType Q>
__attribute__((target("avx2,fma,f16c"))) void decode_f32_avx2(const QRow& w, float* out) {
  const int64_t full = w.cols / 8 * 8;
  for (int64_t g0 = 0, g = 0; g0 < full; g0 += w.group, ++g) {
    const __m256 s = _mm256_set1_ps(w.scales[g]);
    for (int64_t k = g0, end = std::min(full, g0 + w.group); k < end; k += 8) _mm256_storeu_ps(out + k, f32_chunk_avx2<Q>(w.codes, k, s));
  }
  decode_f32_portable<Q>(w, full, out);  // the same fp32 products, one at a time
}

// ---- Dispatch ----

template <DType Q>
void decode_f32(const QRow& w, float* out) {
  switch (kIsa) {
    case Isa::kAvx512: return decode_f32_avx512<Q>(w, out);
    case Isa::kAvx2: return decode_f32_avx2<Q>(w, out);
    case Isa::kScalar: return decode_f32_portable<Q>(w, 0, out);
  }
}

using RowsF32 = void (*)(const float*, int64_t, const QRow*, float*, int64_t);
using RowsBf16 = void (*)(const uint16_t*, int64_t, const QRow*, float*, int64_t);
constexpr int kStreamRows = 4;  // the most weight rows streamed together
// Weight rows streamed together against r rows of x: r x c accumulators stay within 16 of the
// 32 vector registers, leaving the rest to the decoders, decoded weights and x.
constexpr int stream_width(int64_t r) { return r <= kSkinnyRows ? kStreamRows : 2; }

// [r - 1][c - 1]: r rows of x against c <= stream_width(r) weight rows; Bare: bf16_chunk's.
template <class Fn, DType Q, bool Bf16, bool Bare = false>
struct RowsTable {
  Fn kernels[kWideSkinnyRows][kStreamRows];
  constexpr RowsTable() : kernels{} { fill(std::make_integer_sequence<int, kWideSkinnyRows * kStreamRows>{}); }
  template <int I>
  static constexpr Fn kernel() {
    constexpr int r = I / kStreamRows + 1, c = I % kStreamRows + 1;
    if constexpr (c > stream_width(r))
      return nullptr;
    else if constexpr (Bf16)
      return &rows_bf16_avx512<r, c, Q, Bare>;
    else
      return &rows_f32_avx512<r, c, Q>;
  }
  template <int... I>
  constexpr void fill(std::integer_sequence<int, I...>) {
    ((kernels[I / kStreamRows][I % kStreamRows] = kernel<I>()), ...);
  }
};
template <DType Q>
constexpr RowsTable<RowsF32, Q, false> kRowsF32{};
template <DType Q, bool Bare>
constexpr RowsTable<RowsBf16, Q, true, Bare> kRowsBf16{};

// Whether an int8 row's codes meet bf16 x bare (bf16_chunk's Bare).
template <DType Q>
bool bare_codes(const Weight& w, bool bf16) {
  return Q == DType::kQ8 && codes_only(w, bf16);
}

// Per thread: a row's scales, and decoded rows or blocks.
thread_local std::vector<float> row_scale_buffer, output_scales, f32_block;
thread_local std::vector<float> stream_scales[kStreamRows];
thread_local std::vector<uint16_t> bf16_block;

// Multiplies outputs [i0, i1) x [j0, j1) by their rows' scales (bf16 operands, one scale a row),
// an output row at a time: walking a column instead strides by out.cols, and at the products'
// widths (multiples of 4 KiB) every row of a column falls in the same few L1 sets.
void apply_row_scales(const Weight& w, Mat out, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  output_scales.resize(size_t(j1 - j0));
  float* s = output_scales.data();
  for (int64_t j = j0; j < j1; ++j) s[j - j0] = scale_at(w, j, 0);
  for (int64_t i = i0; i < i1; ++i) {
    float* o = out.data + i * out.cols + j0;
    for (int64_t j = 0; j < j1 - j0; ++j) o[j] *= s[j];
  }
}

// Decode (a few rows of x): each weight row streams once, met by every row of x. On AVX-512 the
// codes are decoded in registers, kStreamRows weight rows at a time; elsewhere a row is decoded
// into cache for the tiles.
template <DType Q>
void skinny_rows(const void* x, int64_t rows, const Weight& w, Mat out, bool bf16, int64_t begin, int64_t end) {
  if (kIsa == Isa::kAvx512) {
    const bool bare = bare_codes<Q>(w, bf16);
    const int width = stream_width(rows);
    for (int64_t j = begin; j < end; j += width) {
      const int c = int(std::min<int64_t>(width, end - j));
      QRow stream[kStreamRows];
      for (int i = 0; i < c; ++i) stream[i] = quantized_row(w, j + i, bf16, stream_scales[i]);
      if (bf16) {
        const RowsBf16 kernel = bare ? kRowsBf16<Q, Q == DType::kQ8>.kernels[rows - 1][c - 1]
                                     : kRowsBf16<Q, false>.kernels[rows - 1][c - 1];
        kernel(static_cast<const uint16_t*>(x), w.cols, stream, out.data + j, out.cols);
      } else {
        kRowsF32<Q>.kernels[rows - 1][c - 1](static_cast<const float*>(x), w.cols, stream, out.data + j, out.cols);
      }
    }
  } else {
    f32_block.resize(size_t(w.cols));
    for (int64_t j = begin; j < end; ++j) {
      decode_f32<Q>(quantized_row(w, j, false, row_scale_buffer), f32_block.data());
      gemm_nt(static_cast<const float*>(x), w.cols, f32_block.data(), w.cols, rows, 1, w.cols, out.data + j, out.cols);
    }
  }
  if (codes_only(w, bf16)) apply_row_scales(w, out, 0, rows, begin, end);
}

// Prefill: a block of weight rows decoded once (fp32, or bf16 for bf16 operands) and met by a
// block of x rows in the tiles.
template <DType Q>
void block_product(const void* x, const Weight& w, Mat out, bool bf16, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  const int64_t k = w.cols, n = j1 - j0, m = i1 - i0;
  float* o = out.data + i0 * out.cols + j0;
  if (bf16) {
    bf16_block.resize(size_t(n * k));
    const auto decode = bare_codes<Q>(w, true) ? &decode_bf16_avx512<Q, Q == DType::kQ8> : &decode_bf16_avx512<Q, false>;
    for (int64_t j = j0; j < j1; ++j) decode(quantized_row(w, j, true, row_scale_buffer), bf16_block.data() + (j - j0) * k);
    gemm_nt_bf16(static_cast<const uint16_t*>(x) + i0 * k, k, bf16_block.data(), k, m, n, k, o, out.cols);
    if (codes_only(w, true)) apply_row_scales(w, out, i0, i1, j0, j1);
  } else {
    f32_block.resize(size_t(n * k));
    for (int64_t j = j0; j < j1; ++j) decode_f32<Q>(quantized_row(w, j, false, row_scale_buffer), f32_block.data() + (j - j0) * k);
    gemm_nt(static_cast<const float*>(x) + i0 * k, k, f32_block.data(), k, m, n, k, o, out.cols);
  }
}

template <DType Q>
void task_of(const void* x, int64_t rows, const Weight& w, Mat out, bool bf16, int64_t task) {
  if (rows <= skinny_limit()) {
    const int64_t begin = task * kSkinnyOutputs;
    return skinny_rows<Q>(x, rows, w, out, bf16, begin, std::min(w.rows, begin + kSkinnyOutputs));
  }
  const int64_t row_blocks = (rows + kBlockRows - 1) / kBlockRows, outputs = block_outputs(w.cols);
  const int64_t i0 = (task % row_blocks) * kBlockRows, j0 = (task / row_blocks) * outputs;
  block_product<Q>(x, w, out, bf16, i0, std::min(rows, i0 + kBlockRows), j0, std::min(w.rows, j0 + outputs));
}

}  // namespace

int64_t quantized_tasks(int64_t rows, const Weight& w) {
  if (rows <= skinny_limit()) return (w.rows + kSkinnyOutputs - 1) / kSkinnyOutputs;
  return (rows + kBlockRows - 1) / kBlockRows * ((w.rows + block_outputs(w.cols) - 1) / block_outputs(w.cols));
}

void quantized_task(const void* x, int64_t rows, const Weight& w, Mat out, bool bf16, int64_t task) {
  if (w.dtype == DType::kQ8)
    task_of<DType::kQ8>(x, rows, w, out, bf16, task);
  else
    task_of<DType::kQ4>(x, rows, w, out, bf16, task);
}

}  // namespace m1::cpu
