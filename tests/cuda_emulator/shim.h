// Whole-backend CPU emulation, kernel side: one fiber per CUDA thread (asm stack switch), blocks
// run one after another. Fibers run until their next __syncthreads, named barrier or warp
// collective; a block barrier releases when every live thread of the block waits at the same
// line, a warp collective when every lane of the warp waits at the same one (a lane that exited
// or waits elsewhere aborts), a named barrier (bar.sync / bar.arrive id, count) as soon as its
// waiting and arrived threads make its count, and a block where nothing can be released aborts.
// EMU_ORDER=forward|reverse|random|skew picks the order fibers run in between release points;
// EMU_COPIES=deferred|eager when cp.async copies land (below); EMU_BLOCKS=forward|reverse|random
// the order a launch's blocks run in.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "m1/dtype.h"

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __restrict__
#define __restrict__ __restrict

namespace emu {
struct Index { unsigned x = 0, y = 0, z = 0; };
enum State { kReady, kBlockBarrier, kNamedBarrier, kWarpSync, kDone };
struct PendingCopy { void* dst; const void* src; size_t size; int group; };
// A warpgroup product issued and not yet waited for: its accumulators, computed as issued, land
// in `d` at the wait.
// A in registers (the register form): `a_rows`, this thread's two rows of A, gathered as issued.
// B N-major (imm-trans-b 1): `b_mn_major`.
struct PendingMma {
  float* d;
  int n;
  uint64_t a, b;
  bool accumulate, a_in_registers, b_mn_major;
  int group;
  float a_rows[2][16];
  float result[256];
};
struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  Index idx;
  unsigned flat = 0;
  State state = kReady;
  int line = 0;
  int barrier = 0, barrier_threads = 0;  // the named barrier it waits at (kNamedBarrier)
  uint64_t slot[8] = {}, published[8] = {};
  std::vector<PendingCopy> pending;
  int open_group = 0;
  std::vector<PendingMma> pending_mma;
  int mma_group = 0;
  bool paused = false;  // yielded to poll again (__nanosleep), not to wait at a barrier
};

// Runtime side (fake_runtime.cpp).
void enqueue_launch(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, std::function<void()> body);
[[noreturn]] void die(const char* fmt, ...);

// Per host thread: each thread runs the kernels of the streams it flushes on fibers of its own.
extern thread_local Fiber* cur;
extern thread_local std::vector<Fiber> fibers;
extern thread_local Index block_idx, block_dim, grid_dim;
extern thread_local uint64_t block_generation;
void yield(State s, int line);
// bar.sync id, threads: waits until `threads` threads (this one included) wait or have arrived.
void named_barrier_sync(int id, int threads, int line);
// bar.arrive id, threads: counts this thread at the barrier without waiting for it.
void named_barrier_arrive(int id, int threads, int line);
// Lets the block's other fibers run (and, when every fiber of the block only polls, other host
// threads): a thread polling memory another stream's kernel will write.
void pause(int line);
unsigned char* shared_mem();
size_t shared_size();

inline bool lane0() { return cur->flat % 32 == 0; }
inline unsigned lane() { return cur->flat % 32; }

template <class F>
const void* fn_id(F* f) { return reinterpret_cast<const void*>(f); }

// Kernel arguments are copied at launch time, as CUDA copies them; the body may run later (a
// stream's queue) or many times (a graph).
bool device_pointer(const void* p);
template <class T>
void check_argument(const T& value, int index) {
  if constexpr (std::is_pointer_v<T>)
    if (value && !device_pointer(value)) die("kernel argument %d (%p) is not device memory", index, (const void*)value);
}
template <class F, class... A>
void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, F f, A... args) {
  int index = 0;
  (check_argument(args, index++), ...);
  enqueue_launch(kernel, grid, block, smem, stream, [f, tup = std::make_tuple(args...)] { std::apply(f, tup); });
}

// A __shared__ variable: one per kernel, poisoned (0xff bytes: NaN) whenever a new block starts.
template <class T>
struct BlockStatic {
  alignas(128) unsigned char bytes[sizeof(T)];
  uint64_t generation = ~uint64_t(0);
  T& get() {
    if (generation != block_generation) {
      std::memset(bytes, 0xff, sizeof(T));
      generation = block_generation;
    }
    return *reinterpret_cast<T*>(bytes);
  }
};

template <class T>
T shuffle(T v, int src_lane, bool keep_own, int line) {
  static_assert(sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  cur->slot[0] = bits;
  yield(kWarpSync, line);
  if (keep_own) return v;
  const Fiber& from = fibers[(cur->flat & ~31u) | unsigned(src_lane & 31)];
  T out;
  std::memcpy(&out, &from.published[0], sizeof(T));
  return out;
}
// The lanes of this warp whose published value passes `pick`, as a mask.
template <class Pick>
unsigned lanes_where(Pick pick) {
  unsigned r = 0;
  const unsigned base = cur->flat & ~31u;
  for (unsigned l = 0; l < 32 && base + l < fibers.size(); ++l)
    if (pick(fibers[base + l].published[0])) r |= 1u << l;
  return r;
}
inline unsigned ballot(bool pred, int line) {
  cur->slot[0] = pred;
  yield(kWarpSync, line);
  return lanes_where([](uint64_t published) { return published != 0; });
}
inline unsigned match_any(uint64_t v, int line) {
  cur->slot[0] = v;
  yield(kWarpSync, line);
  return lanes_where([v](uint64_t published) { return published == v; });
}

// cp.async: a copy lands when its thread waits for its group (so a read before the wait sees the
// poison), or, under EMU_COPIES=eager, as it is issued (so a slot refilled while another thread
// still reads it shows the new bytes); a GPU's copy lands anywhere between the two.
bool eager_copies();
inline void copy_async(void* dst, const void* src, size_t size, size_t zfill) {
  unsigned char* base = shared_mem();
  auto* d = static_cast<unsigned char*>(dst);
  if (d < base || d + size > base + shared_size()) die("cp.async destination outside dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % size || (zfill < size && reinterpret_cast<uintptr_t>(src) % size))
    die("cp.async misaligned (%zu bytes)", size);
  if (zfill) std::memset(d + size - zfill, 0, zfill);
  if (zfill == size) return;
  if (eager_copies()) std::memcpy(dst, src, size - zfill);
  else cur->pending.push_back({dst, src, size - zfill, cur->open_group});
}
inline void copy_async_commit() { ++cur->open_group; }
// Lands every copy of the groups committed before the newest `keep` ones, after letting the
// block's other threads run (the wait is where a GPU's thread stalls while others go on).
inline void copy_async_wait(int keep) {
  yield(kReady, -3);
  const int limit = cur->open_group - keep;
  auto& pending = cur->pending;
  size_t kept = 0;
  for (auto& c : pending) {
    if (c.group < limit) std::memcpy(c.dst, c.src, c.size);
    else pending[kept++] = c;
  }
  pending.resize(kept);
}
}  // namespace emu

#define threadIdx (::emu::cur->idx)
#define blockIdx ::emu::block_idx
#define blockDim ::emu::block_dim
#define gridDim ::emu::grid_dim
#define __syncthreads() ::emu::yield(::emu::kBlockBarrier, __LINE__)
#define __syncwarp(...) ::emu::yield(::emu::kWarpSync, __LINE__)
#define __shfl_xor_sync(mask, v, offset) ::emu::shuffle((v), int(::emu::lane()) ^ (offset), false, __LINE__)
#define __shfl_sync(mask, v, src) ::emu::shuffle((v), (src), false, __LINE__)
#define __shfl_up_sync(mask, v, delta) \
  ::emu::shuffle((v), int(::emu::lane()) - int(delta), int(::emu::lane()) < int(delta), __LINE__)
#define __ballot_sync(mask, pred) ::emu::ballot((pred), __LINE__)
#define __match_any_sync(mask, v) ::emu::match_any(uint64_t(uint32_t(v)), __LINE__)

#define __nanosleep(ns) ::emu::pause(__LINE__)
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define __threadfence_system() std::atomic_thread_fence(std::memory_order_seq_cst)
#define __trap() ::emu::die("__trap: a kernel gave up")

inline int __popc(unsigned v) { return std::popcount(v); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fdiv_rn(float a, float b) { return a / b; }
// __tanhf is tanh.approx.f32, whose relative error reaches about 2^-11: here tanh with its
// significand cut to 11 bits (error below 2^-11, always toward zero), so that tests see at least
// the hardware's error, not less.
inline float __tanhf(float x) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(std::tanh(x)) & ~uint32_t(0xfff));
}
inline float __uint_as_float(uint32_t v) { return std::bit_cast<float>(v); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned atomicOr(unsigned* p, unsigned v) { unsigned old = *p; *p |= v; return old; }
inline int atomicAdd(int* p, int v) { int old = *p; *p += v; return old; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned old = *p; *p += v; return old; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long old = *p;
  *p += v;
  return old;
}
template <class T>
inline T __ldcg(const T* p) { return *p; }  // no L1 to bypass here
using std::isfinite;
using std::max;
using std::min;

// ldmatrix / mma.m16n8k16 in their PTX fragment layouts; every lane of the warp calls them.
namespace emu {
// The shared window: dynamic shared memory starts at this address, 128-byte but not 1024-byte
// aligned, so a kernel that needs an aligned tile (the warpgroup products' swizzle) must align it.
inline constexpr uint32_t kSharedWindowBase = 0x480;
inline uint32_t __cvta_generic_to_shared_impl(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < shared_mem() || q > shared_mem() + shared_size()) die("shared address of memory outside dynamic shared memory");
  return kSharedWindowBase + uint32_t(q - shared_mem());
}
inline void ldmatrix(uint32_t* r, int count, const uint16_t* row, bool trans) {
  if (lane() < unsigned(8 * count)) {
    auto* base = shared_mem();
    auto* q = reinterpret_cast<const unsigned char*>(row);
    if (q < base || q + 16 > base + shared_size() || reinterpret_cast<uintptr_t>(row) % 16)
      die("ldmatrix row address outside dynamic shared memory or misaligned");
  }
  std::memcpy(&cur->slot[0], &row, sizeof(row));
  yield(kWarpSync, -1);
  const unsigned base = cur->flat & ~31u, l = lane();
  for (int i = 0; i < count; ++i) {
    auto at = [&](int rr, int cc) {
      const uint16_t* p;
      std::memcpy(&p, &fibers[base + 8 * i + rr].published[0], sizeof(p));
      return p[cc];
    };
    uint16_t lo, hi;
    if (!trans) { lo = at(l / 4, 2 * (l % 4)); hi = at(l / 4, 2 * (l % 4) + 1); }
    else { lo = at(2 * (l % 4), l / 4); hi = at(2 * (l % 4) + 1, l / 4); }
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}
// A tensor-core step's result: the products exact, their sum with the accumulator rounded toward
// zero once, as Hopper's tensor cores do (they truncate), so a kernel that carries a long sum
// through them drifts here as it does there.
inline float tensor_core_round(double sum) {
  const double magnitude = std::fabs(sum);
  // In float's normal range, toward zero drops the 29 significand bits a double has past a float's.
  if (magnitude >= 0x1p-126 && magnitude < 0x1p128)
    return float(std::bit_cast<double>(std::bit_cast<uint64_t>(sum) & ~((uint64_t(1) << 29) - 1)));
  const float rounded = float(sum);  // zero, subnormal, infinite or NaN
  return std::fabs(double(rounded)) > magnitude ? std::nextafter(rounded, 0.0f) : rounded;
}
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  for (int i = 0; i < 4; ++i) cur->slot[i] = a[i];
  cur->slot[4] = b0;
  cur->slot[5] = b1;
  yield(kWarpSync, -2);
  const unsigned l = lane(), g = l / 4, t = l % 4;
  const Fiber* warp = fibers.data() + (cur->flat & ~31u);  // one thread-local lookup, not 128
  // This lane's rows of A (g and g + 8) and columns of B (2t and 2t + 1), each read once: lane
  // 4r + f holds k = 2f, 2f + 1 of row (A) or column (B) r in its lower registers, and k + 8 in its
  // upper ones.
  double a_rows[2][16], b_columns[2][16];
  auto unpack = [](uint64_t w, double* to) {
    to[0] = double(m1::bf16_to_f32(uint16_t(w & 0xffff)));
    to[1] = double(m1::bf16_to_f32(uint16_t(w >> 16)));
  };
  for (unsigned f = 0; f < 4; ++f) {
    const uint64_t *a = warp[g * 4 + f].published, *b0 = warp[2 * t * 4 + f].published,
                   *b1 = warp[(2 * t + 1) * 4 + f].published;
    for (unsigned upper = 0; upper < 2; ++upper) {
      const unsigned k = 8 * upper + 2 * f;
      unpack(a[2 * upper], a_rows[0] + k);
      unpack(a[2 * upper + 1], a_rows[1] + k);
      unpack(b0[4 + upper], b_columns[0] + k);
      unpack(b1[4 + upper], b_columns[1] + k);
    }
  }
  // Each output's sum in k order, the four interleaved so that their additions overlap.
  double sums[4] = {c[0], c[1], c[2], c[3]};
  for (int k = 0; k < 16; ++k)
    for (int e = 0; e < 4; ++e) sums[e] += a_rows[e >> 1][k] * b_columns[e & 1][k];  // exact products
  for (int e = 0; e < 4; ++e) c[e] = tensor_core_round(sums[e]);
}

// wgmma (sm_90a): one thread's share of the warpgroup's product, its accumulators computed as it is
// issued from the operands its descriptors name, chained onto the products still pending on the
// same accumulators, and written at the wait that covers its group. Under EMU_COPIES=eager the
// wait computes them again and stops the kernel if shared memory changed under the product (a
// GPU may read it anywhere between the issue and the wait).
// The element (row, k) of a bf16 operand whose descriptor is `desc` (k < 16), as the PTX manual's
// canonical layouts place it (row: A's M or B's N index).
// K-major: the 8-row groups `stride` bytes apart; unswizzled, 8 x 8 core matrices `leading` bytes
// apart along k, 16 bytes a row; in the 128-byte swizzle, 128-byte rows of 64 k values.
// MN-major (B with imm-trans-b 1): unswizzled, core matrices of 8 k rows of 8 consecutive row
// values (16 bytes each), `stride` bytes apart along the rows and `leading` bytes apart along k;
// in the 128-byte swizzle, 128-byte k rows of 64 consecutive row values, 64-value blocks `leading`
// bytes apart and 8-k groups `stride` bytes apart.
// Both swizzles XOR the 16-byte unit (address bits 4-6) with address bits 7-9.
inline float descriptor_element(uint64_t desc, int row, int k, bool mn_major = false) {
  const uint32_t start = uint32_t(desc & 0x3fff) << 4, leading = uint32_t((desc >> 16) & 0x3fff) << 4,
                 stride = uint32_t((desc >> 32) & 0x3fff) << 4, base_offset = uint32_t((desc >> 49) & 7),
                 swizzle = uint32_t(desc >> 62);
  if (base_offset) die("wgmma descriptor: base offset %u not emulated", base_offset);
  if (swizzle > 1) die("wgmma descriptor: swizzle mode %u not emulated", swizzle);
  const uint32_t r = uint32_t(row), kk = uint32_t(k);
  uint32_t address;
  if (!mn_major)
    address = swizzle == 0 ? start + r / 8 * stride + kk / 8 * leading + r % 8 * 16 + kk % 8 * 2
                           : start + r / 8 * stride + r % 8 * 128 + kk * 2;
  else
    address = swizzle == 0 ? start + r / 8 * stride + kk / 8 * leading + kk % 8 * 16 + r % 8 * 2
                           : start + r / 64 * leading + kk / 8 * stride + kk % 8 * 128 + r % 64 * 2;
  if (swizzle == 1) address ^= ((address >> 7) & 7) << 4;
  if (address < kSharedWindowBase || address + 2 > kSharedWindowBase + shared_size())
    die("wgmma operand (row %d, k %d) at shared address %#x outside dynamic shared memory", row, k, address);
  uint16_t bits;
  std::memcpy(&bits, shared_mem() + (address - kSharedWindowBase), 2);
  return m1::bf16_to_f32(bits);
}
void warpgroup_product(const PendingMma& op, const float* in, float* out);  // fake_runtime.cpp
inline void warpgroup_fence() {}
inline void fence_proxy_async() {}  // the emulator has one proxy
inline void warpgroup_commit() { ++cur->mma_group; }
inline void check_warpgroup_mma(int n) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  if (threads % 128) die("wgmma in a block of %u threads: not whole warpgroups", threads);
  if (n % 8 || n > 256) die("wgmma n%d", n);
}
// Queues the product after computing it onto the newest pending product on the same accumulators.
inline void issue_warpgroup_mma(PendingMma& op) {
  const float* in = op.d;
  for (const PendingMma& p : cur->pending_mma)
    if (p.d == op.d) in = p.result;
  warpgroup_product(op, in, op.result);
  cur->pending_mma.push_back(op);
}
// A and B in shared memory (A K-major).
inline void warpgroup_mma(float* d, int n, uint64_t a, uint64_t b, int accumulate, int trans_b) {
  check_warpgroup_mma(n);
  yield(kWarpSync, -4);  // every lane of the warp issues it
  PendingMma op{d, n, a, b, accumulate != 0, false, trans_b != 0, cur->mma_group, {}, {}};
  issue_warpgroup_mma(op);
}
// A in registers: the warp's 16 rows as mma.m16n8k16's A fragments (lane 4g + f: k 2f, 2f + 1 of
// row g in a[0], of row g + 8 in a[1], and k + 8 in a[2], a[3]); B in shared memory.
inline void warpgroup_mma_registers(float* d, int n, const uint32_t* a, uint64_t b, int accumulate, int trans_b) {
  check_warpgroup_mma(n);
  for (int i = 0; i < 4; ++i) cur->slot[i] = a[i];
  yield(kWarpSync, -6);
  PendingMma op{d, n, 0, b, accumulate != 0, true, trans_b != 0, cur->mma_group, {}, {}};
  const Fiber* warp = fibers.data() + (cur->flat & ~31u);
  const unsigned g = lane() / 4;
  for (unsigned f = 0; f < 4; ++f)
    for (unsigned r = 0; r < 2; ++r)
      for (unsigned upper = 0; upper < 2; ++upper) {
        const uint64_t w = warp[g * 4 + f].published[2 * upper + r];
        op.a_rows[r][8 * upper + 2 * f] = m1::bf16_to_f32(uint16_t(w & 0xffff));
        op.a_rows[r][8 * upper + 2 * f + 1] = m1::bf16_to_f32(uint16_t(w >> 16));
      }
  issue_warpgroup_mma(op);
}
void warpgroup_wait(int keep);  // fake_runtime.cpp
}  // namespace emu
#define __cvta_generic_to_shared(p) ::emu::__cvta_generic_to_shared_impl(p)
template <class T>
cudaError_t cudaFuncSetAttribute(T* f, cudaFuncAttribute a, int v) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}
