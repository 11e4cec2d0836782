#pragma once
// Hopper's warpgroup tensor-core product (wgmma, sm_90a): shared-memory matrix descriptors for
// K-major and N-major bf16 tiles in the 128-byte swizzle, the m64n128k16 and m64n64k16 bf16
// products with fp32 accumulators (A in shared memory, or in registers), and the fences and group
// waits that order them (PTX ISA, "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate"). The four warps of a warpgroup (128 consecutive threads, the first a
// multiple of 128) issue each of these together.
//
// Layouts. A K-major tile of R rows of 64 bf16 (128 bytes a row) in the 128-byte swizzle: row r
// at byte 128 r, its eight 16-byte units u stored at unit u ^ (r % 8), the tile 1024-byte aligned
// in the shared window (the swizzle reads the address bits). The descriptor of the 16 columns
// starting at column 16 s points 32 s bytes into the tile; 8-row groups are 1024 bytes apart.
// The accumulators of m64nNk16: warp w of the warpgroup, lane 4 g + t, holds for each block of 8
// columns i: d[4 i] = (16 w + g, 8 i + 2 t), d[4 i + 1] = (16 w + g, 8 i + 2 t + 1),
// d[4 i + 2] = (16 w + g + 8, 8 i + 2 t), d[4 i + 3] = (16 w + g + 8, 8 i + 2 t + 1).

#include <cstdint>

namespace m1::cuda {

inline constexpr int kSwizzleRowBytes = 128;   // one row of a 128-byte-swizzled tile: 64 bf16
inline constexpr int kSwizzleAtomBytes = 1024;  // 8 rows: the swizzle's period, and the alignment

// Byte offset within a 128-byte-swizzled K-major tile of the 16-byte unit `unit` (0..7) of `row`.
__host__ __device__ constexpr int swizzled_unit_offset(int row, int unit) {
  return row * kSwizzleRowBytes + ((unit ^ (row % 8)) * 16);
}

// The accumulators of a warpgroup product as asm operands: n / 2 of them for n columns, d[i] as %i.
#define M1_WGMMA_ACCUMULATOR_NAMES_32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define M1_WGMMA_ACCUMULATOR_NAMES_64 \
  M1_WGMMA_ACCUMULATOR_NAMES_32 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define M1_WGMMA_ACCUMULATORS_32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define M1_WGMMA_ACCUMULATORS_64 \
  M1_WGMMA_ACCUMULATORS_32, \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// The descriptor of a K-major bf16 operand in the 128-byte swizzle whose first element is at
// shared-window address `address` (a 1024-byte-aligned tile plus 32 bytes per 16 columns): start
// address >> 4 in bits 0-13, leading byte offset 16 (unused by this layout) in bits 16-29, stride
// byte offset 1024 (between 8-row groups) >> 4 in bits 32-45, base offset 0, swizzle mode 1
// (128-byte) in bits 62-63.
__device__ __forceinline__ uint64_t swizzled_descriptor(uint32_t address) {
  return uint64_t((address & 0x3ffff) >> 4) | uint64_t(16 >> 4) << 16 | uint64_t(kSwizzleAtomBytes >> 4) << 32 |
         uint64_t(1) << 62;
}

// Orders this thread's register accesses before the warpgroup products that follow (needed before
// the first product and after the accumulators were touched by other instructions).
__device__ __forceinline__ void warpgroup_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Makes this thread's generic-proxy shared-memory writes (stores, cp.async copies that have
// landed) visible to the async proxy, through which the warpgroup products read shared memory.
__device__ __forceinline__ void fence_shared_for_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Pins the accumulators in their registers across the asynchronous products (no instruction the
// compiler would otherwise place between an issue and its wait may move or read them).
template <int N>
__device__ __forceinline__ void warpgroup_pin(float (&d)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) asm volatile("" : "+f"(d[e])::"memory");
}

// Closes the group of the products issued since the last commit.
__device__ __forceinline__ void warpgroup_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most `kPending` committed groups are still running: their accumulators may then
// be read, and the shared memory they read be written.
template <int kPending>
__device__ __forceinline__ void warpgroup_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// d[64 x 128] = A[64 x 16] B[16 x 128] + (accumulate ? d : 0), A and B K-major bf16 in shared
// memory (descriptors a and b), fp32 accumulators in the layout above. Asynchronous: d may be
// read, and the tiles written, only after a warpgroup_wait that covers its group.
__device__ __forceinline__ void warpgroup_mma_128(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{" M1_WGMMA_ACCUMULATOR_NAMES_64 "}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : M1_WGMMA_ACCUMULATORS_64
      : "l"(a), "l"(b), "r"(accumulate)
      : "memory");
}

// d[64 x 64] = A[64 x 16] B[16 x 64] + (accumulate ? d : 0), A and B K-major bf16 in shared
// memory: as warpgroup_mma_128 with 64 columns (32 accumulators a thread).
__device__ __forceinline__ void warpgroup_mma_64(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{" M1_WGMMA_ACCUMULATOR_NAMES_32 "}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : M1_WGMMA_ACCUMULATORS_32
      : "l"(a), "l"(b), "r"(accumulate)
      : "memory");
}

// The descriptor of an N-major bf16 B operand (B[k][n], n contiguous) in the 128-byte swizzle
// whose element (k, n) = (0, 0) is at shared-window address `address` (1024-byte aligned): k rows
// of 64 consecutive n values, 128 bytes each, 8-row groups 1024 bytes apart (stride byte offset)
// and 64-column blocks `block_bytes` apart (leading byte offset); swizzle mode 1. The PTX
// manual's canonical MN-major 128-byte layout, ((8, 8, m), (8, k)) : ((1, 8, LBO), (64, SBO))
// in elements.
__device__ __forceinline__ uint64_t n_major_swizzled_descriptor(uint32_t address, uint32_t block_bytes) {
  return uint64_t((address & 0x3ffff) >> 4) | uint64_t((block_bytes & 0x3ffff) >> 4) << 16 |
         uint64_t(kSwizzleAtomBytes >> 4) << 32 | uint64_t(1) << 62;
}

// d[64 x 128] = A[64 x 16] B[16 x 128] + (accumulate ? d : 0), A in registers (each warp's 16 rows
// as mma.m16n8k16's A fragments: lane 4 g + t holds row g's k 2t, 2t + 1 in a[0], row g + 8's in
// a[1], and the same at k + 8 in a[2], a[3]), B N-major in shared memory (descriptor b,
// imm-trans-b 1). Asynchronous as the shared-memory form; a's registers too must stay unchanged
// until the wait.
__device__ __forceinline__ void warpgroup_mma_128_registers(float (&d)[64], const uint32_t (&a)[4], uint64_t b,
                                                            int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{" M1_WGMMA_ACCUMULATOR_NAMES_64 "}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : M1_WGMMA_ACCUMULATORS_64
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate)
      : "memory");
}

// After a k-tile's products are committed: at a chunk's end (`close`), waits for them all and adds
// each accumulator, as value(e, part[e]) gives it, to total[e] (round to nearest); otherwise leaves
// the newest group running, so the products of one k-tile overlap the staging of the next.
template <class Value>
__device__ __forceinline__ void warpgroup_close_or_go_on(bool close, float (&part)[64], float (&total)[64],
                                                         Value value) {
  warpgroup_pin(part);
  if (close) {
    warpgroup_wait<0>();
    warpgroup_pin(part);
#pragma unroll
    for (int e = 0; e < 64; ++e) total[e] = __fadd_rn(total[e], value(e, part[e]));
  } else {
    warpgroup_wait<1>();
    warpgroup_pin(part);
  }
}

// Column (of 128) of accumulator e of the calling thread (lane 4 g + c: 8 (e / 4) + 2 c + e % 2).
__device__ __forceinline__ int warpgroup_column(int e) { return 8 * (e / 4) + 2 * int(threadIdx.x % 4) + e % 2; }

// Stores the calling thread's accumulators of a 64 x 128 warpgroup tile whose first row is row0 and
// first column n0 into out (rows ldo apart), those inside [0, m) x [0, n).
__device__ __forceinline__ void store_warpgroup_tile(const float (&d)[64], float* out, int64_t ldo, int64_t m,
                                                     int64_t n, int64_t row0, int64_t n0) {
  const int64_t r0 = row0 + (threadIdx.x % 128) / 32 * 16 + threadIdx.x % 32 / 4;
#pragma unroll
  for (int e = 0; e < 64; ++e) {
    const int64_t r = r0 + 8 * (e % 4 / 2), col = n0 + warpgroup_column(e);
    if (r < m && col < n) out[r * ldo + col] = d[e];
  }
}

}  // namespace m1::cuda
