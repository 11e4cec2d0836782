#include "cpu/matmul.h"

// GCC 12 reports its own _mm512_undefined_* placeholders inside the intrinsics as uninitialised.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace m1::cpu {
namespace {

enum class Isa { kAvx512, kAvx2, kScalar };

// The best the CPU offers, or a lesser one named by M1_CPU_ISA (so tests cover every path).
Isa detect_isa() {
  __builtin_cpu_init();
  const char* forced = std::getenv("M1_CPU_ISA");
  const std::string_view cap = forced ? forced : "";
  if (cap.empty() && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (cap != "scalar" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
  return Isa::kScalar;
}

const Isa kIsa = detect_isa();

// Operand pointers of one tile: R rows of x against C rows of w, over the whole inner dimension.
struct Tile {
  const float* x;
  int64_t ldx;
  const void* w;  // first weight row, dtype T
  int64_t ldw;    // weight row stride in elements
  int64_t k;
  float* out;
  int64_t ldo;
};

template <DType T>
const void* weight_at(const void* w, int64_t i) {
  return static_cast<const char*>(w) + i * int64_t(dtype_size(T));
}

// ---- AVX-512: 16 lanes, tiles up to 4 x 4 ----

template <DType T>
__attribute__((target("avx512f"))) inline __m512 load16(const void* p) {
  if constexpr (T == DType::kF32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (T == DType::kBF16) {
    __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  }
}

template <int R, int C, DType T>
__attribute__((target("avx512f"))) void tile_avx512(const Tile& t) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  auto step = [&](const float* const* xs, const void* const* ws) __attribute__((target("avx512f"))) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load16<T>(ws[c]);
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(xs[r]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  };
  const float* xs[R];
  const void* ws[C];
  int64_t k = 0;
  for (; k + 16 <= t.k; k += 16) {
    for (int r = 0; r < R; ++r) xs[r] = t.x + r * t.ldx + k;
    for (int c = 0; c < C; ++c) ws[c] = weight_at<T>(t.w, c * t.ldw + k);
    step(xs, ws);
  }
  if (k < t.k) {  // zero-padded tail: adds exact zeros, so the sum order stays that of the lanes
    alignas(64) float xtail[R][16] = {};
    alignas(64) char wtail[C][64] = {};
    size_t rest = size_t(t.k - k);
    for (int r = 0; r < R; ++r) {
      std::memcpy(xtail[r], t.x + r * t.ldx + k, rest * sizeof(float));
      xs[r] = xtail[r];
    }
    for (int c = 0; c < C; ++c) {
      std::memcpy(wtail[c], weight_at<T>(t.w, c * t.ldw + k), rest * dtype_size(T));
      ws[c] = wtail[c];
    }
    step(xs, ws);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) t.out[r * t.ldo + c] = _mm512_reduce_add_ps(acc[r][c]);
}

// ---- AVX2 + FMA + F16C: 8 lanes, tiles up to 2 x 4 ----

template <DType T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* p) {
  if constexpr (T == DType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else if constexpr (T == DType::kBF16) {
    __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  }
}

__attribute__((target("avx2,fma,f16c"))) inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int C, DType T>
__attribute__((target("avx2,fma,f16c"))) void tile_avx2(const Tile& t) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  auto step = [&](const float* const* xs, const void* const* ws) __attribute__((target("avx2,fma,f16c"))) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load8<T>(ws[c]);
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(xs[r]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  };
  const float* xs[R];
  const void* ws[C];
  int64_t k = 0;
  for (; k + 8 <= t.k; k += 8) {
    for (int r = 0; r < R; ++r) xs[r] = t.x + r * t.ldx + k;
    for (int c = 0; c < C; ++c) ws[c] = weight_at<T>(t.w, c * t.ldw + k);
    step(xs, ws);
  }
  if (k < t.k) {
    alignas(32) float xtail[R][8] = {};
    alignas(32) char wtail[C][32] = {};
    size_t rest = size_t(t.k - k);
    for (int r = 0; r < R; ++r) {
      std::memcpy(xtail[r], t.x + r * t.ldx + k, rest * sizeof(float));
      xs[r] = xtail[r];
    }
    for (int c = 0; c < C; ++c) {
      std::memcpy(wtail[c], weight_at<T>(t.w, c * t.ldw + k), rest * dtype_size(T));
      ws[c] = wtail[c];
    }
    step(xs, ws);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) t.out[r * t.ldo + c] = reduce8(acc[r][c]);
}

// ---- Portable fallback: one element at a time, 8 partial sums ----

template <int R, int C, DType T>
void tile_scalar(const Tile& t) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float partial[8] = {};
      const float* x = t.x + r * t.ldx;
      for (int64_t k = 0; k < t.k; ++k) partial[k % 8] += x[k] * load_as_f32(t.w, T, size_t(c * t.ldw + k));
      float sum = 0;
      for (float p : partial) sum += p;
      t.out[r * t.ldo + c] = sum;
    }
}

template <int R, int C, DType T>
void run_tile(const Tile& t) {
  switch (kIsa) {
    case Isa::kAvx512: return tile_avx512<R, C, T>(t);
    case Isa::kAvx2: return tile_avx2<R, C, T>(t);
    case Isa::kScalar: return tile_scalar<R, C, T>(t);
  }
}

using TileFn = void (*)(const Tile&);

template <DType T, int R, int... Cs>
constexpr void fill_row(TileFn (&row)[4], std::integer_sequence<int, Cs...>) {
  ((row[Cs] = &run_tile<R, Cs + 1, T>), ...);
}

// kernels[r - 1][c - 1] computes an r x c tile.
template <DType T>
struct TileTable {
  TileFn kernels[4][4];
  constexpr TileTable() : kernels{} {
    fill_row<T, 1>(kernels[0], std::make_integer_sequence<int, 4>{});
    fill_row<T, 2>(kernels[1], std::make_integer_sequence<int, 4>{});
    fill_row<T, 3>(kernels[2], std::make_integer_sequence<int, 4>{});
    fill_row<T, 4>(kernels[3], std::make_integer_sequence<int, 4>{});
  }
};

template <DType T>
constexpr TileTable<T> kTiles{};

constexpr int64_t kBlockRows = 64;     // x rows per task
constexpr int64_t kBlockOutputs = 64;  // weight rows per task

template <DType T>
void matmul_typed(ThreadPool& pool, const Mat& x, const Weight& w, Mat out) {
  const int64_t max_r = kIsa == Isa::kAvx512 ? 4 : 2;
  const int64_t row_blocks = (x.rows + kBlockRows - 1) / kBlockRows;
  const int64_t out_blocks = (w.rows + kBlockOutputs - 1) / kBlockOutputs;
  pool.parallel_for(row_blocks * out_blocks, [&](int64_t task) {
    int64_t i0 = (task % row_blocks) * kBlockRows, j0 = (task / row_blocks) * kBlockOutputs;
    int64_t i1 = std::min(x.rows, i0 + kBlockRows), j1 = std::min(w.rows, j0 + kBlockOutputs);
    for (int64_t j = j0; j < j1; j += 4) {
      int64_t c = std::min<int64_t>(4, j1 - j);
      for (int64_t i = i0; i < i1; i += max_r) {
        int64_t r = std::min(max_r, i1 - i);
        Tile t{x.data + i * x.cols, x.cols, weight_at<T>(w.data, j * w.cols), w.cols, w.cols,
               out.data + i * out.cols + j, out.cols};
        kTiles<T>.kernels[r - 1][c - 1](t);
      }
    }
  });
}

}  // namespace

void matmul(ThreadPool& pool, const Mat& x, const Weight& w, Mat out) {
  switch (w.dtype) {
    case DType::kF32: return matmul_typed<DType::kF32>(pool, x, w, out);
    case DType::kF16: return matmul_typed<DType::kF16>(pool, x, w, out);
    case DType::kBF16: return matmul_typed<DType::kBF16>(pool, x, w, out);
  }
}

void matmul_reference(const Mat& x, const Weight& w, Mat out) {
  for (int64_t i = 0; i < x.rows; ++i)
    for (int64_t j = 0; j < w.rows; ++j) {
      double sum = 0;
      for (int64_t k = 0; k < w.cols; ++k)
        sum += double(x.data[i * x.cols + k]) * load_as_f32(w.data, w.dtype, size_t(j * w.cols + k));
      out.data[i * out.cols + j] = float(sum);
    }
}

const char* matmul_isa() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: return "scalar";
  }
  return "?";
}

}  // namespace m1::cpu
