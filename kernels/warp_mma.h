#pragma once
// Warp-level tensor-core building blocks shared by the attention and lightning kernels: bf16
// fragment pairs, ldmatrix loads of 8x8 bf16 tiles from shared memory and the m16n8k16 bf16
// product with fp32 accumulation (PTX ISA fragment layouts, sm_80 and later).

#include <cstdint>

#include <cuda_bf16.h>

namespace m1::cuda {

// (lo, hi) rounded to bf16, lo in the low half: the order of a fragment's element pair.
__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
  __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&pair);
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8 and receives
// register i = elements (row l / 4, cols 2 (l % 4), +1) of matrix i.
__device__ __forceinline__ void load_matrices(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
// Two matrices, addressed by lanes 0..15 as above (the other lanes' addresses are ignored).
__device__ __forceinline__ void load_matrices(uint32_t (&r)[2], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}
// Four matrices transposed: register i = elements (rows 2 (l % 4), +1, col l / 4) of matrix i.
__device__ __forceinline__ void load_matrices_transposed(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// c[16x8] += a[16x16] b[16x8]. Lane l (g = l / 4, t = l % 4): a = {(g, 2t..), (g+8, 2t..),
// (g, 2t+8..), (g+8, 2t+8..)}, b = {(2t.., g), (2t+8.., g)}, c = {(g, 2t), (g, 2t+1), (g+8, 2t),
// (g+8, 2t+1)}. A pure register operation, so not volatile: the compiler may interleave it with
// the shared-memory loads (which are volatile, and so stay between the barriers).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace m1::cuda
