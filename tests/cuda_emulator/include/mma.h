#pragma once
// wmma m16n16k16 on the CPU emulator: a fragment holds the whole 16 x 16 tile (a(i,k) at i*16+k,
// col-major b(k,j) at j*16+k, c(i,j) at i*16+j). Only lane 0 of a warp loads, multiplies and
// stores (the other lanes' copies are never stored), which keeps the emulation affordable.
#include <cstdint>
#include "cuda_bf16.h"
namespace emu {
bool lane0();
float tensor_core_round(double sum);
}  // namespace emu
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  float x[256] = {};
};
template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major>& a, const __nv_bfloat16* p, unsigned ldm) {
  if (!emu::lane0()) return;
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) a.x[i * 16 + k] = __bfloat162float(p[i * ldm + k]);
}
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major>& b, const __nv_bfloat16* p, unsigned ldm) {
  if (!emu::lane0()) return;
  for (int j = 0; j < 16; ++j)
    for (int k = 0; k < 16; ++k) b.x[j * 16 + k] = __bfloat162float(p[j * ldm + k]);
}
template <class L>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float, L>& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major>& b,
                     const fragment<accumulator, 16, 16, 16, float, L>& c) {
  if (!emu::lane0()) return;
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double s = c.x[i * 16 + j];  // a fixed function of row i of a, column j of b and c(i, j)
      for (int k = 0; k < 16; ++k) s += double(a.x[i * 16 + k]) * double(b.x[j * 16 + k]);
      out[i * 16 + j] = emu::tensor_core_round(s);
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}
template <class L>
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float, L>& c, unsigned ldm, layout_t layout) {
  if (!emu::lane0()) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      if (layout == mem_row_major) p[i * ldm + j] = c.x[i * 16 + j];
      else p[j * ldm + i] = c.x[i * 16 + j];
    }
}
}  // namespace nvcuda::wmma
