#include "cpu/matmul.h"

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as uninitialised.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/aligned_vector.h"
#include "cpu/isa.h"
#include "cpu/quantized_matmul.h"
#include "cpu/vectorize.h"
#include "m1/error.h"
#include "m1/quantize.h"

namespace m1::cpu {
namespace {

const Isa kIsa = cpu_isa();
const bool kBf16Dot = cpu_bf16_dot();

// Operand pointers of one tile: R rows of x against C rows of w, over the whole inner dimension.
struct Tile {
  const void* x;  // fp32, or bf16 for the bf16 kernels
  int64_t ldx;    // x row stride in elements
  const void* w;  // first weight row
  int64_t ldw;    // weight row stride in elements
  int64_t k;
  float* out;
  int64_t ldo;
};

template <class T>
const T* at(const void* p, int64_t i) {
  return static_cast<const T*>(p) + i;
}

template <DType T>
const void* weight_at(const void* w, int64_t i) {
  return static_cast<const char*>(w) + i * int64_t(dtype_bits(T) / 8);
}

// The last, partial chunk of a tile's inner dimension, copied into zero-padded rows. Zeros add
// nothing, so every element is summed chunk by chunk in the same order whatever tile it is in.
template <int R, int C, int Lanes, class XT, class WT>
struct PaddedTail {
  alignas(64) XT x[R][Lanes] = {};
  alignas(64) WT w[C][Lanes] = {};
  PaddedTail(const Tile& t, int64_t k) {
    const size_t rest = size_t(t.k - k);
    for (int r = 0; r < R; ++r) std::memcpy(x[r], at<XT>(t.x, r * t.ldx + k), rest * sizeof(XT));
    for (int c = 0; c < C; ++c) std::memcpy(w[c], at<WT>(t.w, c * t.ldw + k), rest * sizeof(WT));
  }
};

template <DType T>
using Stored = std::conditional_t<T == DType::kF32, float, uint16_t>;

// ---- AVX-512: 16 fp32 lanes, tiles up to 4 x 4 ----

template <DType T>
__attribute__((target("avx512f"))) inline __m512 load16(const Stored<T>* p) {
  if constexpr (T == DType::kF32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (T == DType::kBF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// One chunk: C weight vectors against R x vectors, into R x C accumulators.
template <int R, int C, DType T>
__attribute__((target("avx512f"), always_inline)) inline void fma_chunk(__m512 (&acc)[R][C], const float* x,
                                                                        int64_t ldx, const Stored<T>* w, int64_t ldw) {
  __m512 wv[C];
  for (int c = 0; c < C; ++c) wv[c] = load16<T>(w + c * ldw);
  for (int r = 0; r < R; ++r) {
    const __m512 xv = _mm512_loadu_ps(x + r * ldx);
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
  }
}

template <int R, int C, DType T>
__attribute__((target("avx512f"))) void tile_avx512(const Tile& t) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* x = at<float>(t.x, 0);
  const Stored<T>* w = at<Stored<T>>(t.w, 0);
  int64_t k = 0;
  for (; k + 16 <= t.k; k += 16) fma_chunk<R, C, T>(acc, x + k, t.ldx, w + k, t.ldw);
  if (k < t.k) {
    PaddedTail<R, C, 16, float, Stored<T>> tail(t, k);
    fma_chunk<R, C, T>(acc, tail.x[0], 16, tail.w[0], 16);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) t.out[r * t.ldo + c] = _mm512_reduce_add_ps(acc[r][c]);
}

template <int R, int C>
__attribute__((target("avx512f,avx512bf16"), always_inline)) inline void dp_chunk(__m512 (&acc)[R][C], const uint16_t* x,
                                                                                  int64_t ldx, const uint16_t* w, int64_t ldw) {
  __m512bh wv[C];
  for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * ldw);
  for (int r = 0; r < R; ++r) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * ldx);
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
  }
}

// bf16 x bf16 pairs accumulated into 16 fp32 lanes, 32 elements a step.
template <int R, int C>
__attribute__((target("avx512f,avx512bf16"))) void tile_avx512_bf16(const Tile& t) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint16_t* x = at<uint16_t>(t.x, 0);
  const uint16_t* w = at<uint16_t>(t.w, 0);
  int64_t k = 0;
  for (; k + 32 <= t.k; k += 32) dp_chunk<R, C>(acc, x + k, t.ldx, w + k, t.ldw);
  if (k < t.k) {
    PaddedTail<R, C, 32, uint16_t, uint16_t> tail(t, k);
    dp_chunk<R, C>(acc, tail.x[0], 32, tail.w[0], 32);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) t.out[r * t.ldo + c] = _mm512_reduce_add_ps(acc[r][c]);
}

// One row of x against one weight row: the 1 x 1 tile's arithmetic (a single accumulator over the
// chunks in order, zero-padded tail, one final reduction) in a loop tight enough for decode to
// run at memory speed.
template <DType T>
__attribute__((target("avx512f"))) float row_dot_avx512(const float* x, const Stored<T>* w, int64_t k) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load16<T>(w + i), acc);
  if (i < k) {
    alignas(64) float xt[16] = {};
    alignas(64) Stored<T> wt[16] = {};
    std::memcpy(xt, x + i, size_t(k - i) * sizeof(float));
    std::memcpy(wt, w + i, size_t(k - i) * sizeof(Stored<T>));
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(xt), load16<T>(wt), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

__attribute__((target("avx512f,avx512bf16"))) float row_dot_avx512_bf16(const uint16_t* x, const uint16_t* w, int64_t k) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(w + i));
  if (i < k) {
    alignas(64) uint16_t xt[32] = {}, wt[32] = {};
    std::memcpy(xt, x + i, size_t(k - i) * sizeof(uint16_t));
    std::memcpy(wt, w + i, size_t(k - i) * sizeof(uint16_t));
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(xt), (__m512bh)_mm512_loadu_si512(wt));
  }
  return _mm512_reduce_add_ps(acc);
}

// ---- AVX2 + FMA + F16C: 8 lanes, tiles up to 2 x 4 ----

template <DType T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const Stored<T>* p) {
  if constexpr (T == DType::kF32) {
    return _mm256_loadu_ps(p);
  } else if constexpr (T == DType::kBF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

__attribute__((target("avx2,fma,f16c"))) inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int C, DType T>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void fma_chunk8(__m256 (&acc)[R][C], const float* x,
                                                                               int64_t ldx, const Stored<T>* w, int64_t ldw) {
  __m256 wv[C];
  for (int c = 0; c < C; ++c) wv[c] = load8<T>(w + c * ldw);
  for (int r = 0; r < R; ++r) {
    const __m256 xv = _mm256_loadu_ps(x + r * ldx);
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
  }
}

template <int R, int C, DType T>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const Tile& t) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const float* x = at<float>(t.x, 0);
  const Stored<T>* w = at<Stored<T>>(t.w, 0);
  int64_t k = 0;
  for (; k + 8 <= t.k; k += 8) fma_chunk8<R, C, T>(acc, x + k, t.ldx, w + k, t.ldw);
  if (k < t.k) {
    PaddedTail<R, C, 8, float, Stored<T>> tail(t, k);
    fma_chunk8<R, C, T>(acc, tail.x[0], 8, tail.w[0], 8);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) t.out[r * t.ldo + c] = reduce8(acc[r][c]);
}

// ---- Portable fallback: 8 partial sums per element ----

template <int R, int C, DType T>
void tile_scalar(const Tile& t) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float partial[8] = {};
      const float* x = at<float>(t.x, r * t.ldx);
      for (int64_t k = 0; k < t.k; ++k) partial[k % 8] += x[k] * load_as_f32(t.w, T, size_t(c * t.ldw + k));
      float sum = 0;
      for (float p : partial) sum += p;
      t.out[r * t.ldo + c] = sum;
    }
}

// ---- Row-major products a b (no transpose): broadcast a, stream rows of b ----

// 16 values of b as fp32: the first `tail` of them with Masked (zeros after), a bf16 b (raw bits,
// uint16_t) widened exactly.
template <bool Masked>
__attribute__((target("avx512f"))) inline __m512 load_b(const float* b, __mmask16 last, int) {
  return Masked ? _mm512_maskz_loadu_ps(last, b) : _mm512_loadu_ps(b);
}
template <bool Masked>
__attribute__((target("avx512f"))) inline __m512 load_b(const uint16_t* b, __mmask16, int tail) {
  __m256i bits;
  if constexpr (Masked) {
    alignas(32) uint16_t part[16] = {};
    std::memcpy(part, b, size_t(tail) * sizeof(uint16_t));
    bits = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
  } else {
    bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  }
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// R rows of a against V vectors of 16 columns of b; with Masked, the last vector is only `tail`
// columns wide. (Masked loads inside the loop make GCC 12 keep the accumulators in memory, so full
// vectors get a mask-free instance.)
template <int R, int V, bool Masked, class B>
__attribute__((target("avx512f"))) void nn_tile_avx512(const float* a, int64_t lda, const B* b, int64_t ldb, int64_t k,
                                                       float* out, int64_t ldo, int tail) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const __mmask16 last = Masked ? __mmask16((1u << tail) - 1) : __mmask16(0xffff);
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[V];
    for (int v = 0; v < V; ++v)
      bv[v] = Masked && v + 1 == V ? load_b<true>(b + p * ldb + 16 * v, last, tail) : load_b<false>(b + p * ldb + 16 * v, last, tail);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + p]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      if (Masked && v + 1 == V)
        _mm512_mask_storeu_ps(out + r * ldo + 16 * v, last, acc[r][v]);
      else
        _mm512_storeu_ps(out + r * ldo + 16 * v, acc[r][v]);
    }
}

template <class B>
using NnTileFn = void (*)(const float*, int64_t, const B*, int64_t, int64_t, float*, int64_t, int);

template <bool Masked, class B, int... I>
constexpr std::array<NnTileFn<B>, 16> nn_tiles(std::integer_sequence<int, I...>) {
  return {&nn_tile_avx512<I / 4 + 1, I % 4 + 1, Masked, B>...};
}
// [(rows - 1) * 4 + vectors - 1]
template <class B>
constexpr std::array<NnTileFn<B>, 16> kNnTiles = nn_tiles<false, B>(std::make_integer_sequence<int, 16>{});
template <class B>
constexpr std::array<NnTileFn<B>, 16> kNnTilesMasked = nn_tiles<true, B>(std::make_integer_sequence<int, 16>{});

template <class B>
void gemm_nn_avx512(const float* a, int64_t lda, const B* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* out,
                    int64_t ldo) {
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t cols = std::min<int64_t>(64, n - j), vectors = (cols + 15) / 16;
    const int tail = int(cols - 16 * (vectors - 1));
    const auto& tiles = tail == 16 ? kNnTiles<B> : kNnTilesMasked<B>;
    for (int64_t i = 0; i < m; i += 4) {
      const int64_t r = std::min<int64_t>(4, m - i);
      tiles[size_t((r - 1) * 4 + vectors - 1)](a + i * lda, lda, b + j, ldb, k, out + i * ldo + j, ldo, tail);
    }
  }
}

inline float widened(float v) { return v; }
inline float widened(uint16_t v) { return bf16_to_f32(v); }

template <class B>
M1_VECTOR_CLONES void gemm_nn_portable(const float* a, int64_t lda, const B* b, int64_t ldb, int64_t m, int64_t n,
                                       int64_t k, float* out, int64_t ldo) {
  for (int64_t i = 0; i < m; ++i) {
    float* o = out + i * ldo;
    for (int64_t j = 0; j < n; ++j) o[j] = 0.0f;
    for (int64_t p = 0; p < k; ++p) {
      const float av = a[i * lda + p];
      const B* row = b + p * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] += av * widened(row[j]);
    }
  }
}

// ---- Dispatch: kernels[r - FirstRow][c - 1] computes an r x c tile ----

using TileFn = void (*)(const Tile&);

template <DType T, bool Bf16, int R, int C>
void run_tile(const Tile& t) {
  if constexpr (Bf16) {
    tile_avx512_bf16<R, C>(t);
  } else if constexpr (R > 4) {
    tile_avx512<R, C, T>(t);  // the wide tiles: AVX-512 only
  } else {
    switch (kIsa) {
      case Isa::kAvx512: return tile_avx512<R, C, T>(t);
      case Isa::kAvx2: return tile_avx2<R, C, T>(t);
      case Isa::kScalar: return tile_scalar<R, C, T>(t);
    }
  }
}

template <DType T, bool Bf16, int FirstRow, int Rows, int Cols>
struct TileTable {
  TileFn kernels[Rows][Cols];
  constexpr TileTable() : kernels{} { fill(std::make_integer_sequence<int, Rows * Cols>{}); }
  template <int... I>
  constexpr void fill(std::integer_sequence<int, I...>) {
    ((kernels[I / Cols][I % Cols] = &run_tile<T, Bf16, I / Cols + FirstRow, I % Cols + 1>), ...);
  }
};

// Tiles of 1-4 rows of x against 1-4 weight rows.
template <DType T, bool Bf16>
constexpr TileTable<T, Bf16, 1, 4, 4> kTiles{};
// AVX-512 tiles of 5-8 rows of x against 1-2 weight rows: 16 accumulators at most, so that a
// batched decode step's rows all meet a weight row while it is in registers.
template <DType T, bool Bf16>
constexpr TileTable<T, Bf16, 5, 4, 2> kWideTiles{};

constexpr int64_t kBlockRows = 64;       // x rows per prefill task
constexpr int64_t kSkinnyRows = 4;       // up to this many x rows, weight rows stream once each
constexpr int64_t kWideSkinnyRows = 8;   // the same on AVX-512, by tiles of all the rows
// How far ahead those tiles prefetch their weight rows: two rows in flight leave the hardware
// prefetcher behind (bench_kernels batch8/lm_head, BF16 weights: 1.25-1.4x with it).
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kSkinnyOutputs = 256;  // weight rows per task of a skinny product
// Weight rows per prefill task: a block widened to fp32 (rows x k floats) should stay within L2.
int64_t block_outputs(int64_t k) { return std::clamp<int64_t>((256 << 10) / (k * 4) / 4 * 4, 4, 64); }

// One product of a batch, with x as the kernels read it (fp32, or rounded to bf16).
struct Product {
  const void* x;
  int64_t rows;
  Weight w;
  Mat out;
  bool bf16;

  int64_t row_blocks() const { return (rows + kBlockRows - 1) / kBlockRows; }
  bool skinny() const { return rows <= (kIsa == Isa::kAvx512 ? kWideSkinnyRows : kSkinnyRows); }
  int64_t tasks() const {
    if (w.quantized()) return quantized_tasks(rows, w);
    if (skinny()) return (w.rows + kSkinnyOutputs - 1) / kSkinnyOutputs;
    return row_blocks() * ((w.rows + block_outputs(w.cols) - 1) / block_outputs(w.cols));
  }
};

// A weight block converted to fp32, reused by each thread. (A function-local thread_local: GCC 12
// never destroys thread_local variable templates, which would leak one per thread.)
template <DType T>
std::vector<float>& widened() {
  thread_local std::vector<float> block;
  return block;
}

// Decode steps (a few rows of x): weight rows are streamed one at a time, each met by every row
// of x, four at a time, while it is in cache (several interleaved weight-row streams reach only
// about half the memory bandwidth). One row of x takes the tight one-row kernels; 5-8 rows (a
// batched step, AVX-512) meet two weight rows at a time in one tile, the rows ahead prefetched.
template <DType T, bool Bf16>
void skinny_task(const Product& p, int64_t task) {
  const Weight& w = p.w;
  const int64_t begin = task * kSkinnyOutputs, end = std::min(w.rows, begin + kSkinnyOutputs);
  const auto* rows = static_cast<const Stored<T>*>(w.data);
  if (p.rows == 1 && (Bf16 || kIsa == Isa::kAvx512)) {
    for (int64_t j = begin; j < end; ++j) {
      if constexpr (Bf16)
        p.out.data[j] = row_dot_avx512_bf16(at<uint16_t>(p.x, 0), rows + j * w.cols, w.cols);
      else
        p.out.data[j] = row_dot_avx512<T>(at<float>(p.x, 0), rows + j * w.cols, w.cols);
    }
    return;
  }
  if (p.rows > kSkinnyRows) {  // AVX-512: two weight rows at a time against every row of x (5-8)
    for (int64_t j = begin; j < end; j += 2) {
      const int64_t c = std::min<int64_t>(2, end - j);
      if (j + kPrefetchRows + c <= w.rows) {  // the rows kPrefetchRows further on, whole
        const char* ahead = static_cast<const char*>(weight_at<T>(w.data, (j + kPrefetchRows) * w.cols));
        const int64_t bytes = c * w.cols * int64_t(sizeof(Stored<T>));
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(ahead + b);
      }
      kWideTiles<T, Bf16>.kernels[p.rows - 5][c - 1](Tile{p.x, w.cols, rows + j * w.cols, w.cols, w.cols, p.out.data + j, p.out.cols});
    }
    return;
  }
  const int64_t max_r = Bf16 || kIsa == Isa::kAvx512 ? 4 : 2;
  const size_t x_size = Bf16 ? sizeof(uint16_t) : sizeof(float);
  for (int64_t j = begin; j < end; ++j)
    for (int64_t i = 0; i < p.rows; i += max_r) {
      const int64_t r = std::min(max_r, p.rows - i);
      const void* xi = static_cast<const char*>(p.x) + size_t(i * w.cols) * x_size;
      kTiles<T, Bf16>.kernels[r - 1][0](Tile{xi, w.cols, rows + j * w.cols, w.cols, w.cols, p.out.data + i * p.out.cols + j,
                                             p.out.cols});
    }
}

// Widens `n` stored weights to fp32 (exact).
template <DType T>
void widen(const Stored<T>* in, size_t n, float* out) {
  if constexpr (T == DType::kBF16) {
    for (size_t i = 0; i < n; ++i) out[i] = std::bit_cast<float>(uint32_t(in[i]) << 16);
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = load_as_f32(in, T, i);
  }
}

// Register tiles over a block of x rows and a block of weight rows, with the weights as `B`:
// stored, or already widened to fp32.
template <DType B, bool Bf16>
void block_tiles(const Product& p, const void* block, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  const Weight& w = p.w;
  const int64_t max_r = Bf16 || kIsa == Isa::kAvx512 ? 4 : 2;
  const size_t x_size = Bf16 ? sizeof(uint16_t) : sizeof(float);
  for (int64_t j = j0; j < j1; j += 4) {
    const int64_t c = std::min<int64_t>(4, j1 - j);
    for (int64_t i = i0; i < i1; i += max_r) {
      const int64_t r = std::min(max_r, i1 - i);
      const void* xi = static_cast<const char*>(p.x) + size_t(i * w.cols) * x_size;
      Tile t{xi, w.cols, weight_at<B>(block, (j - j0) * w.cols), w.cols, w.cols, p.out.data + i * p.out.cols + j,
             p.out.cols};
      kTiles<B, Bf16>.kernels[r - 1][c - 1](t);
    }
  }
}

// Below this many x rows a widened weight block is met too few times to repay widening it (a
// batched decode step: the LM head at 8 rows ran at a third of the fp32 rate).
constexpr int64_t kWidenRows = 16;

// Prefill and batched decode: register tiles over blocks of x rows and weight rows. With enough
// rows, the fp32 path first widens the weight block (exact, so the sums are unchanged) to spare
// every tile the conversion; either way each output is the same sequence of operations.
template <DType T, bool Bf16>
void blocked_task(const Product& p, int64_t task) {
  const Weight& w = p.w;
  const int64_t outputs = block_outputs(w.cols);
  const int64_t i0 = (task % p.row_blocks()) * kBlockRows, j0 = (task / p.row_blocks()) * outputs;
  const int64_t i1 = std::min(p.rows, i0 + kBlockRows), j1 = std::min(w.rows, j0 + outputs);
  const void* block = weight_at<T>(w.data, j0 * w.cols);
  if constexpr (!Bf16 && T != DType::kF32) {
    if (i1 - i0 >= kWidenRows) {
      std::vector<float>& f = widened<T>();
      f.resize(size_t((j1 - j0) * w.cols));
      cpu::widen<T>(static_cast<const Stored<T>*>(block), f.size(), f.data());
      return block_tiles<DType::kF32, false>(p, f.data(), i0, i1, j0, j1);
    }
  }
  block_tiles<T, Bf16>(p, block, i0, i1, j0, j1);
}

template <DType T, bool Bf16>
void product_task(const Product& p, int64_t task) {
  if (p.skinny())
    skinny_task<T, Bf16>(p, task);
  else
    blocked_task<T, Bf16>(p, task);
}

void run_task(const Product& p, int64_t task) {
  if (p.w.quantized()) return quantized_task(p.x, p.rows, p.w, p.out, p.bf16, task);
  if (p.bf16) return product_task<DType::kBF16, true>(p, task);
  switch (p.w.dtype) {
    case DType::kF32: return product_task<DType::kF32, false>(p, task);
    case DType::kF16: return product_task<DType::kF16, false>(p, task);
    case DType::kBF16: return product_task<DType::kBF16, false>(p, task);
    default: return;  // matmul_batch refuses other types
  }
}

// Per calling thread: the batch being run, and its activations rounded to bf16.
thread_local std::vector<Product> products;
thread_local std::vector<int64_t> first_task;
thread_local AlignedVector<uint16_t> rounded;

// Elements of `rounded` a job's x takes: whole cache lines, so that each job's rows start on one.
size_t rounded_extent(const Mat& x) { return (size_t(x.size()) + 31) / 32 * 32; }

// BF16 and quantized weights (whose codes are exact in bf16) meet bf16 activations.
bool uses_bf16(const Weight& w, Operands operands) {
  return operands == Operands::kBf16 && kBf16Dot && (w.dtype == DType::kBF16 || w.quantized());
}

void round_to_bf16(ThreadPool& pool, const float* x, int64_t n, uint16_t* dst) {
  constexpr int64_t kPerTask = 1 << 14;
  pool.parallel_for((n + kPerTask - 1) / kPerTask, [&](int64_t task) {
    for (int64_t i = task * kPerTask, end = std::min(n, i + kPerTask); i < end; ++i) dst[i] = f32_to_bf16(x[i]);
  });
}

}  // namespace

void matmul_batch(ThreadPool& pool, std::span<const MatmulJob> jobs, Operands operands) {
  // A job whose x is the previous rounded job's (several products of the same activations)
  // reads the same rounded copy.
  auto same_x = [](const Mat* a, const Mat& b) { return a && a->data == b.data && a->rows == b.rows && a->cols == b.cols; };
  size_t rounded_size = 0;
  const Mat* last = nullptr;
  for (const MatmulJob& j : jobs) {
    if (!is_float(j.w.dtype) && !j.w.quantized()) fail("matmul: weights of dtype {} cannot be multiplied", dtype_name(j.w.dtype));
    if (uses_bf16(j.w, operands) && !same_x(last, j.x)) rounded_size += rounded_extent(j.x), last = &j.x;
  }
  rounded.resize(rounded_size);
  products.clear();
  first_task.assign(1, 0);
  size_t offset = 0;
  last = nullptr;
  const uint16_t* last_rounded = nullptr;
  for (const MatmulJob& j : jobs) {
    const bool bf16 = uses_bf16(j.w, operands);
    const void* x = j.x.data;
    if (bf16) {
      if (!same_x(last, j.x)) {
        last_rounded = rounded.data() + offset;
        round_to_bf16(pool, j.x.data, j.x.size(), rounded.data() + offset);
        offset += rounded_extent(j.x);
        last = &j.x;
      }
      x = last_rounded;
    }
    products.push_back(Product{x, j.x.rows, j.w, j.out, bf16});
    first_task.push_back(first_task.back() + products.back().tasks());
  }
  const std::vector<Product>& batch = products;
  const std::vector<int64_t>& first = first_task;
  pool.parallel_for(first.back(), [&](int64_t task) {
    const size_t p = size_t(std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1);
    run_task(batch[p], task - first[p]);
  });
}

void matmul(ThreadPool& pool, const Mat& x, const Weight& w, Mat out, Operands operands) {
  const MatmulJob job{x, w, out};
  matmul_batch(pool, {&job, 1}, operands);
}

namespace {

// gemm_nt on fp32 x and weights of dtype W (F32, or BF16 widened as the tiles read it).
template <DType W>
void gemm_nt_fp32(const float* x, int64_t ldx, const Stored<W>* w, int64_t ldw, int64_t m, int64_t n, int64_t k,
                  float* out, int64_t ldo) {
  const int64_t max_r = kIsa == Isa::kAvx512 ? 4 : 2;
  for (int64_t j = 0; j < n; j += 4) {
    const int64_t c = std::min<int64_t>(4, n - j);
    for (int64_t i = 0; i < m; i += max_r) {
      const int64_t r = std::min(max_r, m - i);
      kTiles<W, false>.kernels[r - 1][c - 1](Tile{x + i * ldx, ldx, w + j * ldw, ldw, k, out + i * ldo + j, ldo});
    }
  }
}

template <class B>
void gemm_nn_any(const float* a, int64_t lda, const B* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* out,
                 int64_t ldo) {
  if (kIsa == Isa::kAvx512)
    gemm_nn_avx512(a, lda, b, ldb, m, n, k, out, ldo);
  else
    gemm_nn_portable(a, lda, b, ldb, m, n, k, out, ldo);
}

}  // namespace

void gemm_nt(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t m, int64_t n, int64_t k, float* out,
             int64_t ldo) {
  gemm_nt_fp32<DType::kF32>(x, ldx, w, ldw, m, n, k, out, ldo);
}

void gemm_nt(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t m, int64_t n, int64_t k, float* out,
             int64_t ldo) {
  gemm_nt_fp32<DType::kBF16>(x, ldx, w, ldw, m, n, k, out, ldo);
}

void gemm_nt_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t m, int64_t n, int64_t k,
                  float* out, int64_t ldo) {
  for (int64_t j = 0; j < n; j += 4) {
    const int64_t c = std::min<int64_t>(4, n - j);
    for (int64_t i = 0; i < m; i += 4) {
      const int64_t r = std::min<int64_t>(4, m - i);
      kTiles<DType::kBF16, true>.kernels[r - 1][c - 1](Tile{x + i * ldx, ldx, w + j * ldw, ldw, k, out + i * ldo + j, ldo});
    }
  }
}

void gemm_nn(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* out,
             int64_t ldo) {
  gemm_nn_any(a, lda, b, ldb, m, n, k, out, ldo);
}

void gemm_nn(const float* a, int64_t lda, const uint16_t* b, int64_t ldb, int64_t m, int64_t n, int64_t k, float* out,
             int64_t ldo) {
  gemm_nn_any(a, lda, b, ldb, m, n, k, out, ldo);
}

void matmul_reference(const Mat& x, const Weight& w, Mat out, Operands operands) {
  const bool round = uses_bf16(w, operands);
  // Quantized weights with bf16 activations: a row's codes times its one scale (applied after
  // the sum), or with several groups per row, each code times its scale rounded to bf16.
  const bool scale_after = round && w.quantized() && w.groups() == 1;
  std::vector<float> row(size_t(w.cols));
  for (int64_t j = 0; j < w.rows; ++j) {
    for (int64_t k = 0; k < w.cols; ++k) {
      row[size_t(k)] = scale_after ? float(packed_code(packed_row(w, j), w.dtype, k)) : weight_value(w, j, k);
      if (round && w.quantized() && !scale_after) row[size_t(k)] = bf16_to_f32(f32_to_bf16(row[size_t(k)]));
    }
    for (int64_t i = 0; i < x.rows; ++i) {
      double sum = 0;
      for (int64_t k = 0; k < w.cols; ++k) {
        float xv = x.data[i * x.cols + k];
        if (round) xv = bf16_to_f32(f32_to_bf16(xv));
        sum += double(xv) * row[size_t(k)];
      }
      out.data[i * out.cols + j] = float(scale_after ? sum * scale_at(w, j, 0) : sum);
    }
  }
}

bool bf16_products_available() { return kBf16Dot; }

const char* matmul_isa() {
  switch (kIsa) {
    case Isa::kAvx512: return kBf16Dot ? "avx512-bf16" : "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: return "scalar";
  }
  return "?";
}

}  // namespace m1::cpu
