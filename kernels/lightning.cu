// Lightning attention kernels (lightning.h): a one-pass decode over each fp32 state, batched over
// sequences and heads, and the chunked prefill with the state kept on chip across blocks, in fp32
// (exact) or on bf16 tensor cores (fast). Each applies SiLU to q, k and v as it stages them.

#include "lightning.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_pipeline.h>

#include "cuda_check.h"
#include "device_scratch.h"
#include "launch.h"
#include "m1/error.h"
#include "named_barrier.h"
#include "warp_mma.h"

namespace m1::cuda {
namespace {

constexpr int64_t kMaxHeadDim = 128;

// SiLU with the elementwise kernel's arithmetic (v / (1 + e^-v) through e^-|v|, IEEE division):
// the fp32 kernels give the bits a separate SiLU pass gave them.
__device__ __forceinline__ float silu_exact(float v) {
  const float e = expf(-fabsf(v));
  const float inv = 1.0f / (1.0f + e);
  return v * (v >= 0.0f ? inv : e * inv);
}

// SiLU of operands about to be rounded to bf16 (relative error up to 2^-9), in the bf16 kernel's
// convert step, which lies on its serial chain: v sigmoid(v) = h + h tanh(h) with h = v / 2 is one
// special-function op (tanh.approx, relative error about 2^-11: an error in silu below |v| 2^-12)
// and one FMA, where e^-|v| and a reciprocal take two special-function ops, the unit's rate
// (16 per cycle per SM) being the limit there.
__device__ __forceinline__ float silu_fast(float v) {
  const float h = 0.5f * v;
  return fmaf(h, __tanhf(h), h);
}

// The step's segments and tensors as the kernels see them. Each kernel runs one CTA per
// (segment, head) over the segments [first, first + gridDim.x) and skips those not its kind.
struct LightningParams {
  const float* qkv;
  int64_t qkv_stride;
  float* out;
  int64_t out_stride;
  int d;
  const float* decay;
  const LightningSegment* segments;
  int first;
  // The bf16 prefill only: when set, CTA x takes part x / slices instead of a segment (see
  // LightningPart), so one segment's blocks can be walked by several CTAs.
  const struct LightningPart* parts = nullptr;
};

// A run of whole blocks of one segment for the bf16 prefill, from the state before its first
// block (state_in, heads x d x d). With `terms` set it only writes each block's state term
// K^T (kdec V) there (block b, head h at terms + (b heads + h) d d); else it writes its output
// rows, and its final state to state_out unless that is null.
struct LightningPart {
  int64_t row = 0, count = 0;
  const float* state_in = nullptr;
  float* state_out = nullptr;
  float* terms = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Decode: S <- exp(-s) S + k^T v and o = q S' in one pass over S. Thread (lane, group) owns
// columns [group*V, group*V + V) of rows lane, lane + lanes, ...; it issues kRowsInFlight row
// loads before using any, so a CTA keeps enough bytes in flight to stream S at memory speed.
// A CTA takes the column groups of one slice of the value columns (grid z): columns never mix,
// and `lanes` is fixed by d alone, so each column sums the same terms in the same order however
// many slices there are. Few decode rows (one rank's 8 heads under tensor parallelism) then still
// spread over many SMs.

constexpr int kDecodeMaxThreads = 512;
constexpr int kDecodeMinThreads = 64;  // a sliced CTA keeps at least two warps
constexpr int kDecodeRowsInFlight = 8;

template <int V>
struct alignas(4 * V) Floats {
  float x[V];
};

template <int V>
__global__ void __launch_bounds__(kDecodeMaxThreads) lightning_decode_kernel(LightningParams p) {
  const LightningSegment seg = p.segments[p.first + blockIdx.x];
  if (seg.count != 1) return;
  const int d = p.d, head = blockIdx.y;
  const int groups = d / V / gridDim.z;    // column groups of V floats in this CTA's slice
  const int lanes = blockDim.x / groups;   // threads sharing a column group, one row in `lanes` each
  const int cols = groups * V, col0 = blockIdx.z * cols;
  const int group = blockIdx.z * groups + threadIdx.x % groups, lane = threadIdx.x / groups;

  extern __shared__ float smem[];
  float* q = smem;             // [q | k | v] of this head
  float* k = smem + d;
  float* v = smem + 2 * d;
  float* partial = smem + 3 * d;  // lanes x cols partial outputs
  const float* row = p.qkv + seg.row * p.qkv_stride + int64_t(head) * 3 * d;
  for (int i = threadIdx.x; i < 3 * d; i += blockDim.x) smem[i] = silu_exact(row[i]);
  __syncthreads();

  const float decay = expf(-p.decay[head]);
  float* state = seg.state + int64_t(head) * d * d;
  float vv[V], o[V];
#pragma unroll
  for (int u = 0; u < V; ++u) {
    vv[u] = v[group * V + u];
    o[u] = 0.0f;
  }
  for (int base = lane; base < d; base += lanes * kDecodeRowsInFlight) {
    Floats<V> s[kDecodeRowsInFlight];
#pragma unroll
    for (int i = 0; i < kDecodeRowsInFlight; ++i) {
      const int a = base + i * lanes;
      if (a < d) s[i] = *reinterpret_cast<const Floats<V>*>(state + a * d + group * V);
    }
#pragma unroll
    for (int i = 0; i < kDecodeRowsInFlight; ++i) {
      const int a = base + i * lanes;
      if (a < d) {
        const float ka = k[a], qa = q[a];
#pragma unroll
        for (int u = 0; u < V; ++u) {
          s[i].x[u] = fmaf(decay, s[i].x[u], ka * vv[u]);
          o[u] = fmaf(qa, s[i].x[u], o[u]);
        }
        *reinterpret_cast<Floats<V>*>(state + a * d + group * V) = s[i];
      }
    }
  }
#pragma unroll
  for (int u = 0; u < V; ++u) partial[lane * cols + group * V - col0 + u] = o[u];
  __syncthreads();
  // The lanes' partial sums in a fixed order, so the result does not depend on scheduling.
  float* out = p.out + seg.row * p.out_stride + int64_t(head) * d + col0;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float sum = 0.0f;
    for (int r = 0; r < lanes; ++r) sum += partial[r * cols + c];
    out[c] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill: the chunked form, one CTA per (segment, head, slice of DV value columns) walking the
// segment in blocks of B tokens with its DP x DV slice of the state resident in shared memory.
// Value columns never mix (O[:, c] and S[:, c] only read V[:, c]), so slicing them costs just a
// second Q K^T and gives the same bits; it fills the GPU when few (segment, head) pairs run.
// Every tile is zero-padded to DP >= d key features and B tokens, so padded rows and columns add
// nothing and any d <= DP and any length work. Per block, with G x G threads (tm = tid / G,
// tn = tid % G) register-tiling each product:
//   O  = qdec * (Q S)           thread tile: rows tm*4 + r, columns g*4G + tn*4 + u
//   P  = (Q K^T) * D            rows tm*4 + r, columns tn + c*G
//   O += P V                    as O, walking only the P columns j <= its last row
//   S  = exp(-s n) S + (K*kdec)^T V   rows g*4G + tm*4 + r, columns g'*4G + tn*4 + u
// Q is kept transposed (Qt[a][i]) so both products reading it load four tokens as one float4;
// Qt, K and P^T (which reuses Qt's space) permute their float4 column groups per row
// (swizzled()) so the column walks down rows in the transposing stores and in Q K^T hit distinct
// banks.

template <int DP, int DV, int G>
struct PrefillShape {
  static constexpr int kBlock = 4 * G;              // tokens per block (B)
  static constexpr int kThreads = G * G;
  static constexpr int kSpan = 4 * G;               // distance between a thread's column groups
  static constexpr int kKeyGroups = DP / kSpan;     // float4 groups per thread across key features
  static constexpr int kValueGroups = DV / kSpan;   // ... and across value columns
  static constexpr int kSlices = DP / DV;
  static constexpr int kTableFloats = (kBlock + 1 + 3) / 4 * 4;  // exp(-s m), m in [0, B]
  static constexpr int kSmemFloats = DP * DV + 2 * kBlock * DP + kBlock * DV + kTableFloats;
  static constexpr size_t kSmemBytes = size_t(kSmemFloats) * sizeof(float);
  static_assert(DP % kSpan == 0 && DV % kSpan == 0 && DP % DV == 0, "tiles must cover the state");
  static_assert(kBlock <= DP, "P^T must fit in Qt's space");
  static_assert(kBlock % 32 == 0 && DP % 32 == 0, "swizzled() needs rows of at least 8 float4 groups");
};

// Index of (r, c) in a row-major tile `cols` wide whose float4 column groups are permuted per
// row by r mod 8; four consecutive columns starting at a multiple of 4 stay contiguous.
__device__ __forceinline__ int swizzled(int r, int c, int cols) {
  return r * cols + ((((c >> 2) ^ (r & 7)) << 2) | (c & 3));
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void store4(float* p, float4 x) { *reinterpret_cast<float4*>(p) = x; }

// One float from global to shared memory without passing through registers (cp.async on
// sm_80+), or a zero where the tile extends past the data; `anywhere` is a valid address to name
// then, since nothing is read from it.
__device__ __forceinline__ void copy_or_zero(float* shared, const float* global, bool inside, const float* anywhere) {
  __pipeline_memcpy_async(shared, inside ? global : anywhere, sizeof(float), inside ? 0 : sizeof(float));
}

__device__ __forceinline__ float component(const float4& x, int u) {
  return u == 0 ? x.x : u == 1 ? x.y : u == 2 ? x.z : x.w;
}

// o[r][4g .. 4g + 3] += a[r] * v for the tile's four rows: one rank-1 step of a 4 x 4 block.
template <int N>
__device__ __forceinline__ void add_outer(float (&o)[4][N], int g, const float4& a, const float4& v) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float ar = component(a, r);
    o[r][g * 4 + 0] = fmaf(ar, v.x, o[r][g * 4 + 0]);
    o[r][g * 4 + 1] = fmaf(ar, v.y, o[r][g * 4 + 1]);
    o[r][g * 4 + 2] = fmaf(ar, v.z, o[r][g * 4 + 2]);
    o[r][g * 4 + 3] = fmaf(ar, v.w, o[r][g * 4 + 3]);
  }
}

template <int DP, int DV, int G>
__global__ void __launch_bounds__(G * G, 1) lightning_prefill_kernel(LightningParams p) {
  using Shape = PrefillShape<DP, DV, G>;
  constexpr int B = Shape::kBlock, T = Shape::kThreads, kSpan = Shape::kSpan;
  constexpr int kKeyGroups = Shape::kKeyGroups, kValueGroups = Shape::kValueGroups;
  const LightningSegment seg = p.segments[p.first + blockIdx.x];
  if (seg.count < 2) return;
  const int d = p.d, head = blockIdx.y, tid = threadIdx.x;
  const int col0 = blockIdx.z * DV;  // this CTA's first value column
  const int tm = tid / G, tn = tid % G;

  extern __shared__ float4 smem4[];
  float* S = reinterpret_cast<float*>(smem4);  // DP x DV: S[a][col0 + c] at a*DV + c
  float* qt = S + DP * DV;                      // DP x B swizzled: Q^T, later P^T (B x B)
  float* ks = qt + DP * B;                      // B x DP swizzled
  float* vs = ks + B * DP;                      // B x DV
  float* power = vs + B * DV;                   // power[m] = exp(-s m)

  float* state = seg.state + int64_t(head) * d * d;
  for (int idx = tid; idx < DP * DV; idx += T) {
    const int a = idx / DV, c = col0 + idx % DV;
    S[idx] = a < d && c < d ? state[a * d + c] : 0.0f;
  }
  const float s = p.decay[head];
  for (int m = tid; m <= B; m += T) power[m] = expf(-s * float(m));
  const int d4 = (d + 3) & ~3;  // features walked by Q K^T: padding past d4 is zero anyway

  for (int64_t t0 = 0; t0 < seg.count; t0 += B) {
    const int n = int(min(int64_t(B), seg.count - t0));
    const float* rows = p.qkv + (seg.row + t0) * p.qkv_stride + int64_t(head) * 3 * d;
    // fn(tile cell, its source, whether the source is inside the data) for this thread's cells of
    // the block's tiles. A warp reads 4 tokens x 8 features of Q (whole sectors) and stores them
    // transposed to 32 distinct banks; K and V go row by row.
    auto for_my_cells = [&](auto fn) {
      for (int idx = tid; idx < B * DP; idx += T) {
        const int i = (idx & 3) | ((idx / (4 * DP)) << 2), a = (idx >> 2) % DP;
        fn(qt + swizzled(a, i, B), rows + i * p.qkv_stride + a, i < n && a < d);
      }
      for (int idx = tid; idx < B * DP; idx += T) {
        const int j = idx / DP, a = idx % DP;
        fn(ks + swizzled(j, a, DP), rows + j * p.qkv_stride + d + a, j < n && a < d);
      }
      for (int idx = tid; idx < B * DV; idx += T) {
        const int j = idx / DV, c = col0 + idx % DV;
        fn(vs + idx, rows + j * p.qkv_stride + 2 * d + c, j < n && c < d);
      }
    };
    // Tiles in, all copies in flight at once; once a thread's copies have landed (visible to it
    // alone before the barrier), it applies SiLU to them in place.
    for_my_cells([&](float* cell, const float* source, bool inside) { copy_or_zero(cell, source, inside, p.qkv); });
    __pipeline_commit();
    __pipeline_wait_prior(0);
    for_my_cells([](float* cell, const float*, bool inside) {
      if (inside) *cell = silu_exact(*cell);
    });
    __syncthreads();

    // O = qdec * (Q S), with S the state before the block.
    float o[4][4 * kValueGroups];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4 * kValueGroups; ++c) o[r][c] = 0.0f;
#pragma unroll 4
    for (int a = 0; a < d; ++a) {
      const float4 qa = load4(qt + swizzled(a, tm * 4, B));
#pragma unroll
      for (int g = 0; g < kValueGroups; ++g) add_outer(o, g, qa, load4(S + a * DV + g * kSpan + tn * 4));
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float qdec = power[tm * 4 + r + 1];
#pragma unroll
      for (int c = 0; c < 4 * kValueGroups; ++c) o[r][c] *= qdec;
    }

    // P = (Q K^T) * D over four features per step: Q[tm*4 + r][a + u] and K[tn + c*G][a + u].
    float pr[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) pr[r][c] = 0.0f;
    for (int a = 0; a < d4; a += 4) {
      float4 qa[4], kc[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) qa[u] = load4(qt + swizzled(a + u, tm * 4, B));
#pragma unroll
      for (int c = 0; c < 4; ++c) kc[c] = load4(ks + swizzled(tn + c * G, a, DP));
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float acc = pr[r][c];
          acc = fmaf(component(qa[0], r), kc[c].x, acc);
          acc = fmaf(component(qa[1], r), kc[c].y, acc);
          acc = fmaf(component(qa[2], r), kc[c].z, acc);
          acc = fmaf(component(qa[3], r), kc[c].w, acc);
          pr[r][c] = acc;
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = tm * 4 + r, j = tn + c * G;
        pr[r][c] = j <= i ? pr[r][c] * power[i - j] : 0.0f;
      }
    __syncthreads();  // every read of Q^T is done before P^T overwrites it
#pragma unroll
    for (int c = 0; c < 4; ++c)
      store4(qt + swizzled(tn + c * G, tm * 4, B), make_float4(pr[0][c], pr[1][c], pr[2][c], pr[3][c]));
    __syncthreads();

    // O += P V; P[i][j] = 0 for j > i, so a thread stops after its last row.
    const float* pt = qt;
    const int j_end = min(n, tm * 4 + 4);
    for (int j = 0; j < j_end; ++j) {
      const float4 pj = load4(pt + swizzled(j, tm * 4, B));
#pragma unroll
      for (int g = 0; g < kValueGroups; ++g) add_outer(o, g, pj, load4(vs + j * DV + g * kSpan + tn * 4));
    }
    float* out = p.out + (seg.row + t0) * p.out_stride + int64_t(head) * d + col0;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = tm * 4 + r;
      if (i >= n) continue;
#pragma unroll
      for (int g = 0; g < kValueGroups; ++g)
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int c = g * kSpan + tn * 4 + u;
          if (col0 + c < d) out[i * p.out_stride + c] = o[r][g * 4 + u];
        }
    }

    // S <- exp(-s n) S + (K * kdec)^T V, kdec_j = exp(-s (n - 1 - j)); each thread updates
    // its own tile of S, which nobody reads until the barrier below.
    float acc[4 * kKeyGroups][4 * kValueGroups];
#pragma unroll
    for (int r = 0; r < 4 * kKeyGroups; ++r)
#pragma unroll
      for (int c = 0; c < 4 * kValueGroups; ++c) acc[r][c] = 0.0f;
    for (int j = 0; j < n; ++j) {
      const float kdec = power[n - 1 - j];
      float kj[4 * kKeyGroups], vj[4 * kValueGroups];
#pragma unroll
      for (int g = 0; g < kKeyGroups; ++g) {
        const float4 kg = load4(ks + swizzled(j, g * kSpan + tm * 4, DP));
        kj[g * 4 + 0] = kg.x * kdec, kj[g * 4 + 1] = kg.y * kdec, kj[g * 4 + 2] = kg.z * kdec, kj[g * 4 + 3] = kg.w * kdec;
      }
#pragma unroll
      for (int g = 0; g < kValueGroups; ++g) {
        const float4 vg = load4(vs + j * DV + g * kSpan + tn * 4);
        vj[g * 4 + 0] = vg.x, vj[g * 4 + 1] = vg.y, vj[g * 4 + 2] = vg.z, vj[g * 4 + 3] = vg.w;
      }
#pragma unroll
      for (int r = 0; r < 4 * kKeyGroups; ++r)
#pragma unroll
        for (int c = 0; c < 4 * kValueGroups; ++c) acc[r][c] = fmaf(kj[r], vj[c], acc[r][c]);
    }
    const float block_decay = power[n];
#pragma unroll
    for (int ga = 0; ga < kKeyGroups; ++ga)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int a = ga * kSpan + tm * 4 + r;
#pragma unroll
        for (int gc = 0; gc < kValueGroups; ++gc) {
          float* sp = S + a * DV + gc * kSpan + tn * 4;
          float4 sv = load4(sp);
          const float* add = acc[ga * 4 + r] + gc * 4;
          sv.x = fmaf(block_decay, sv.x, add[0]);
          sv.y = fmaf(block_decay, sv.y, add[1]);
          sv.z = fmaf(block_decay, sv.z, add[2]);
          sv.w = fmaf(block_decay, sv.w, add[3]);
          store4(sp, sv);
        }
      }
    __syncthreads();  // S is whole again and the tiles may be overwritten
  }

  for (int idx = tid; idx < DP * DV; idx += T) {
    const int a = idx / DV, c = col0 + idx % DV;
    if (a < d && c < d) state[a * d + c] = S[idx];
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill on tensor cores, for callers that allow bf16 operands: the same chunked form with every
// product on mma.m16n8k16 (bf16 operands, fp32 accumulation). One CTA per (segment, head, 64 value
// columns) walks the segment in blocks of B = 64 tokens. The head dim is padded with zeros to D
// (64 or 128), so any d <= D works; the staging copies move 16 bytes at a time, so the launcher
// sends d not a multiple of 4, or unaligned rows, to the fp32 kernel instead.
//
// The CTA's warps take roles, so that loading never waits on the products nor they on it:
//   4 loader warps   stream the fp32 q, k, v rows in pieces of a few tokens through a ring of
//                    stages (cp.async; StageRing), apply SiLU and write each block's bf16 tiles
//                    (Q, K, V, kdec * V) into one of 2 tile sets;
//   16 product warps per block, once its tile set is full:
//                      O = qdec * (Q S) and P = (Q K^T) * D   (sharing each Q fragment; P as bf16)
//                      S = exp(-s n) S + K^T (kdec * V)        (into the state registers)
//                      O += P V, O out, the tile set handed back; then the new bf16 S.
// The sets pass between the roles by named barriers (full: the loaders arrive and the product
// warps wait; empty: the other way round), so block b + 1's rows are converted while block b is
// multiplied and block b + 2's are in flight.
// The fp32 state lives in the product warps' accumulator registers (warp w: rows 16 (w % (D/16))
// .. +15, a run of NS n-tiles); a bf16 copy of it in shared memory is the operand of Q S. Each
// block's term K^T (kdec * V) is summed from zero and added by one fused multiply-add,
// S = fma(S, exp(-s n), term), so the state before any block is a fixed function of the blocks'
// terms. That lets one segment run as parts (LightningPart) when its (segment, head) CTAs would
// leave SMs idle, as under tensor parallelism, where a rank holds 8 of the 64 heads: a first
// launch writes the terms of every part's blocks but the last part's, a scan
// (lightning_scan_kernel) composes each part's starting state from them with the same
// multiply-adds, and a second launch runs every part from its state. The bits are those of one
// CTA walking the segment whole.
// Output warp roles: rows 16r..16r+15, value columns 16h..16h+15 of the slice; warps w, w+4, w+8
// and w+12 share a scheduler, so they take row blocks r, 3 - r, r, 3 - r and the causal work
// evens out, and each scheduler has one loader warp. The CTA takes a whole SM (its shared memory).
// Each output and state element sums the same products in the same order whatever the roles
// (the tiles hold the same bf16 values), so the bits are those of the kernel that staged and
// multiplied in turn. Value columns never mix, and the slices are fixed by D alone, so a segment's
// arithmetic does not depend on the rest of the step. A segment's slices are neighbours in the
// grid, so the q and k rows they both read come from L2 the second time.

constexpr int kFastBlock = 64;     // tokens per block (B)
constexpr int kFastColumns = 64;   // value columns per CTA
constexpr int kFastWarps = 16;     // the products' warps
constexpr int kLoaderWarps = 4;    // the warps that stage and convert, one per scheduler
constexpr int kFastThreads = 32 * (kFastWarps + kLoaderWarps);
constexpr int kProductThreads = 32 * kFastWarps;
constexpr int kLoaderThreads = 32 * kLoaderWarps;
constexpr int kTileSets = 2;       // bf16 tile sets: one multiplied while the next is filled
// Splitting a segment into parts (lightning_prefill_parts): at least this many blocks per part,
// and at most this much memory for the blocks' state terms, or the call runs unsplit.
constexpr int64_t kMinPartBlocks = 2;
constexpr size_t kMaxPartTermBytes = size_t(256) << 20;
// Blocks of a segment of `count` tokens, and parts of `per` blocks they make.
constexpr int64_t fast_blocks(int64_t count) { return (count + kFastBlock - 1) / kFastBlock; }
constexpr int64_t part_count(int64_t count, int64_t per) { return (fast_blocks(count) + per - 1) / per; }

// The loaders' fp32 ring: pieces of `Tokens` rows, `Pieces` stages, all but one in flight while
// one is converted. The wide ring keeps 60 KB in flight per SM at D = 128 and needs 211 KB of
// shared memory in all (H100, H200: 227 KB); the compact one, 20 KB in flight, fits 162 KB (A100:
// 163 KB). The tiles, and so the bits, are the same with either.
template <int Tokens, int Pieces>
struct StageRing {
  static constexpr int kPieceTokens = Tokens, kStagePieces = Pieces;
};
using WideRing = StageRing<16, 4>;
using CompactRing = StageRing<8, 3>;

// Named barriers (id 0 is __syncthreads'): the product warps among themselves; tile set i full
// (the loaders arrive, the product warps wait) and empty (the other way round).
constexpr int kProductBarrier = 1;
constexpr int kFullBarrier = 2;
constexpr int kEmptyBarrier = kFullBarrier + kTileSets;

template <int D, class Ring>
struct FastShape {
  static constexpr int kPieceTokens = Ring::kPieceTokens, kStagePieces = Ring::kStagePieces;
  static constexpr int kPiecesPerBlock = kFastBlock / kPieceTokens;
  static constexpr int kSlices = D / kFastColumns;
  static constexpr int kStageWidth = 2 * D + kFastColumns;  // fp32 per staged token: q | k | v slice
  // bf16 rows padded by 16 bytes, so the eight rows an ldmatrix phase reads hit distinct banks.
  static constexpr int kKeyPitch = D + 8;                // Q and K tiles, B x D
  static constexpr int kColumnPitch = kFastColumns + 8;  // V, kdec*V (B x 64) and S (D x 64)
  static constexpr int kTokenPitch = kFastBlock + 8;     // P, B x B
  static constexpr int kTableFloats = (kFastBlock + 1 + 3) / 4 * 4;  // exp(-s m), m in [0, B]
  static constexpr int kStateRowTiles = D / 16;
  static constexpr int kStateTiles = kFastColumns / 8 * kStateRowTiles / kFastWarps;  // n-tiles per warp (NS)
  static constexpr int kPieceFloats = kPieceTokens * kStageWidth;
  static constexpr int kLoaderVectors = kPieceFloats / 4 / kLoaderThreads;  // float4 per loader thread and piece
  static constexpr size_t kStageBytes = size_t(kStagePieces) * kPieceFloats * 4;
  static constexpr size_t kTableBytes = size_t(kTableFloats) * 4;
  static constexpr size_t kKeyTileBytes = size_t(kFastBlock) * kKeyPitch * 2;
  static constexpr size_t kColumnTileBytes = size_t(kFastBlock) * kColumnPitch * 2;
  static constexpr size_t kTileSetBytes = 2 * kKeyTileBytes + 2 * kColumnTileBytes;  // Q, K, V, kdec*V
  static constexpr size_t kStateBytes = size_t(D) * kColumnPitch * 2;
  static constexpr size_t kPBytes = size_t(kFastBlock) * kTokenPitch * 2;
  static constexpr size_t kSmemBytes = kStageBytes + kTableBytes + kTileSets * kTileSetBytes + kStateBytes + kPBytes;
  static_assert(D % kFastColumns == 0 && kFastWarps % kStateRowTiles == 0 && kStateTiles % 2 == 0,
                "the warps must tile the state in pairs of n-tiles");
  static_assert(kFastBlock % kPieceTokens == 0 && kPieceFloats % (4 * kLoaderThreads) == 0,
                "pieces must split a block, and the loaders a piece, evenly");
  static_assert(kSmemBytes <= 227 * 1024, "tiles must fit in the 227 KB of shared memory a block may take");
};

__device__ __forceinline__ void store_bf16x4(uint16_t* p, float4 x) {
  *reinterpret_cast<uint2*>(p) = make_uint2(bf16_pair(x.x, x.y), bf16_pair(x.z, x.w));
}

// Where staged column c (D q features, D k features, then this CTA's 64 value columns) comes
// from in the head's [q | k | v] row, or -1 for padding past d.
template <int D>
__device__ __forceinline__ int source_column(int c, int d, int col0) {
  const int part = c < D ? 0 : c < 2 * D ? 1 : 2;
  const int x = part < 2 ? c - part * D : col0 + c - 2 * D;
  return x < d ? part * d + x : -1;
}

// One block's bf16 operands: Q, K (B x D), V and kdec * V (B x 64), kdec_j = exp(-s (n-1-j)).
struct FastTiles {
  uint16_t *q, *k, *v, *vd;
};
template <class Shape>
__device__ __forceinline__ FastTiles fast_tiles(unsigned char* sets, int64_t block) {
  auto* q = reinterpret_cast<uint16_t*>(sets + size_t(block % kTileSets) * Shape::kTileSetBytes);
  uint16_t* k = q + kFastBlock * Shape::kKeyPitch;
  uint16_t* v = k + kFastBlock * Shape::kKeyPitch;
  return {q, k, v, v + kFastBlock * Shape::kColumnPitch};
}

// The loader warps: the segment's rows in pieces of a few tokens through the ring of fp32 stages
// (cp.async), each piece with SiLU applied written as bf16 into its block's tile set, zeros for
// padding and rows past the segment. Each thread converts exactly the floats it copied, so its
// own cp.async wait orders them; the tile sets are handed over by the named barriers. A part that
// only writes its blocks' state terms copies no q.
template <int D, class Ring>
__device__ void load_fast_tiles(const LightningParams& p, const LightningPart& seg, int head, int col0,
                                float* stage, const float* power, unsigned char* sets) {
  using Shape = FastShape<D, Ring>;
  constexpr int B = kFastBlock, W = Shape::kStageWidth, KP = Shape::kKeyPitch, CP = Shape::kColumnPitch;
  constexpr int kPieceTokens = Shape::kPieceTokens, kStagePieces = Shape::kStagePieces;
  constexpr int kPiecesPerBlock = Shape::kPiecesPerBlock;
  const int d = p.d, loader = threadIdx.x - kProductThreads;
  const float* head_rows = p.qkv + seg.row * p.qkv_stride + int64_t(head) * 3 * d;
  const int64_t blocks = (seg.count + B - 1) / B, pieces = blocks * kPiecesPerBlock;
  const bool terms_only = seg.terms != nullptr;  // q is not read: its tile stays zero
  // Piece u's copies into stage slot u % kStagePieces; one group per piece, empty past the end.
  auto issue = [&](int64_t u) {
    if (u < pieces) {
      float* slot = stage + (u % kStagePieces) * Shape::kPieceFloats;
      const int64_t t0 = u * kPieceTokens;
#pragma unroll
      for (int i = 0; i < Shape::kLoaderVectors; ++i) {
        const int idx = loader + i * kLoaderThreads, j = idx / (W / 4), c = idx % (W / 4) * 4;
        const int source = source_column<D>(c, d, col0);
        if (t0 + j < seg.count && source >= 0 && (c >= D || !terms_only))
          __pipeline_memcpy_async(slot + j * W + c, head_rows + (t0 + j) * p.qkv_stride + source, 16);
      }
    }
    __pipeline_commit();
  };
  for (int u = 0; u < kStagePieces - 1; ++u) issue(u);
  for (int64_t u = 0; u < pieces; ++u) {
    issue(u + kStagePieces - 1);
    __pipeline_wait_prior(kStagePieces - 1);  // piece u's copies (this thread's) have landed
    const int64_t block = u / kPiecesPerBlock;
    const int set = int(block % kTileSets), first = int(u % kPiecesPerBlock) * kPieceTokens;
    if (first == 0 && block >= kTileSets) named_barrier_sync(kEmptyBarrier + set, kFastThreads);
    const int n = int(min(int64_t(B), seg.count - block * B));
    const FastTiles tiles = fast_tiles<Shape>(sets, block);
    const float* slot = stage + (u % kStagePieces) * Shape::kPieceFloats;
#pragma unroll
    for (int i = 0; i < Shape::kLoaderVectors; ++i) {
      const int idx = loader + i * kLoaderThreads, jp = idx / (W / 4), c = idx % (W / 4) * 4, j = first + jp;
      float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (j < n && source_column<D>(c, d, col0) >= 0 && (c >= D || !terms_only)) {
        x = load4(slot + jp * W + c);
        x = make_float4(silu_fast(x.x), silu_fast(x.y), silu_fast(x.z), silu_fast(x.w));
      }
      if (c < D) {
        store_bf16x4(tiles.q + j * KP + c, x);
      } else if (c < 2 * D) {
        store_bf16x4(tiles.k + j * KP + c - D, x);
      } else {
        store_bf16x4(tiles.v + j * CP + c - 2 * D, x);
        const float kdec = j < n ? power[n - 1 - j] : 0.0f;
        store_bf16x4(tiles.vd + j * CP + c - 2 * D, make_float4(x.x * kdec, x.y * kdec, x.z * kdec, x.w * kdec));
      }
    }
    if (first + kPieceTokens == B) named_barrier_arrive(kFullBarrier + set, kFastThreads);
  }
}

template <int D, class Ring>
__global__ void __launch_bounds__(kFastThreads, 1) lightning_prefill_bf16_kernel(LightningParams p) {
  using Shape = FastShape<D, Ring>;
  constexpr int B = kFastBlock, NS = Shape::kStateTiles;
  constexpr int KP = Shape::kKeyPitch, CP = Shape::kColumnPitch, TP = Shape::kTokenPitch;
  LightningPart seg;
  if (p.parts) {
    seg = p.parts[blockIdx.x / Shape::kSlices];
  } else {
    const LightningSegment whole = p.segments[p.first + blockIdx.x / Shape::kSlices];
    if (whole.count < 2) return;
    seg = {whole.row, whole.count, whole.state, whole.state, nullptr};
  }
  const bool terms_only = seg.terms != nullptr;
  const int d = p.d, head = blockIdx.y, col0 = blockIdx.x % Shape::kSlices * kFastColumns;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  extern __shared__ __align__(16) unsigned char smem_bytes[];
  float* stage = reinterpret_cast<float*>(smem_bytes);  // the ring's pieces, kPieceTokens x W fp32 each
  float* power = stage + Shape::kStagePieces * Shape::kPieceFloats;  // power[m] = exp(-s m)
  unsigned char* sets = smem_bytes + Shape::kStageBytes + Shape::kTableBytes;
  uint16_t* s_tile = reinterpret_cast<uint16_t*>(sets + kTileSets * Shape::kTileSetBytes);  // bf16 S, D x 64
  uint16_t* p_tile = s_tile + D * CP;                                                        // P, B x B

  // This warp's state tile: rows 16 sm + g (+8), columns 8 (sn0 + nt) + 2t (+1) of the slice.
  const int sm = warp % Shape::kStateRowTiles, sn0 = warp / Shape::kStateRowTiles * NS;
  auto store_state_operand = [&](const float (&s)[NS][4]) {
#pragma unroll
    for (int nt = 0; nt < NS; ++nt) {
      uint16_t* at = s_tile + (16 * sm + g) * CP + 8 * (sn0 + nt) + 2 * t;
      *reinterpret_cast<uint32_t*>(at) = bf16_pair(s[nt][0], s[nt][1]);
      *reinterpret_cast<uint32_t*>(at + 8 * CP) = bf16_pair(s[nt][2], s[nt][3]);
    }
  };
  // Visits this warp's state elements: n-tile nt, entry e, at row a and column c of the head's d x d.
  auto each_state_element = [&](auto&& visit) {
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) visit(nt, e, 16 * sm + g + 8 * (e >> 1), col0 + 8 * (sn0 + nt) + 2 * t + (e & 1));
  };
  float s[NS][4];
  if (warp < kFastWarps && !terms_only) {
    const float* state = seg.state_in + int64_t(head) * d * d;
    each_state_element([&](int nt, int e, int a, int c) { s[nt][e] = a < d && c < d ? state[a * d + c] : 0.0f; });
    store_state_operand(s);
  }
  const float decay = p.decay[head];
  for (int m = threadIdx.x; m <= B; m += kFastThreads) power[m] = expf(-decay * float(m));
  __syncthreads();  // the power table and the bf16 S are complete; from here on the roles part
  if (warp >= kFastWarps) return load_fast_tiles<D, Ring>(p, seg, head, col0, stage, power, sets);

  const int h = warp >> 2, r = h & 1 ? 3 - (warp & 3) : warp & 3;  // output rows 16r.., columns 16h..
  // This warp's P n-tiles: 4u + h, those at or left of the diagonal block (<= 2r + 1).
  auto has_p_tile = [&](int u) { return 4 * u + h <= 2 * r + 1; };
  const int64_t blocks = (seg.count + B - 1) / B;
  const bool paired_stores = p.out_stride % 2 == 0 && reinterpret_cast<uintptr_t>(p.out) % 8 == 0;
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t t0 = block * B;
    const int n = int(min(int64_t(B), seg.count - t0)), set = int(block % kTileSets);
    const FastTiles tiles = fast_tiles<Shape>(sets, block);
    named_barrier_sync(kFullBarrier + set, kFastThreads);  // the loaders have filled the block's tiles

    // The block's state term K^T (kdec * V), from zero (A = K^T through transposed loads of the K
    // tile). Then S = exp(-s n) S + term, one fused multiply-add per element: a scan over the
    // blocks' terms (lightning_scan_kernel) gives the same states, so parts of a segment may run
    // apart and still give the bits of one CTA walking it whole.
    float term[NS][4];
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) term[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < B / 16; ++kk) {
      if (kk * 16 >= n) break;  // the rest of the tokens are zero padding
      uint32_t kf[4];
      load_matrices_transposed(kf, tiles.k + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * KP + 16 * sm + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t b[4];
        load_matrices_transposed(b, tiles.vd + (kk * 16 + (lane & 15)) * CP + 8 * sn0 + np * 16 + (lane >> 4) * 8);
        mma_bf16(term[2 * np], kf, b[0], b[1]);
        mma_bf16(term[2 * np + 1], kf, b[2], b[3]);
      }
    }
    if (terms_only) {
      if (block + kTileSets < blocks) named_barrier_arrive(kEmptyBarrier + set, kFastThreads);
      float* out = seg.terms + (block * gridDim.y + head) * int64_t(d) * d;
      each_state_element([&](int nt, int e, int a, int c) {
        if (a < d && c < d) out[a * d + c] = term[nt][e];
      });
      continue;
    }
    const float block_decay = power[n];
#pragma unroll
    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = fmaf(s[nt][e], block_decay, term[nt][e]);

    // O = Q S (the bf16 copy of the state before this block) and this warp's P n-tiles, each Q
    // fragment used for both.
    float o[2][4], pr[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][e] = pr[i][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      if (ks * 16 >= d) break;  // the rest of the features are zero padding
      uint32_t qf[4], b[4];
      load_matrices(qf, tiles.q + (16 * r + (lane & 15)) * KP + ks * 16 + (lane >> 4) * 8);
      load_matrices_transposed(b, s_tile + (ks * 16 + (lane & 15)) * CP + 16 * h + (lane >> 4) * 8);
      mma_bf16(o[0], qf, b[0], b[1]);
      mma_bf16(o[1], qf, b[2], b[3]);
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (!has_p_tile(u)) break;
        uint32_t kb[2];
        load_matrices(kb, tiles.k + (8 * (4 * u + h) + (lane & 7)) * KP + ks * 16 + ((lane >> 3) & 1) * 8);
        mma_bf16(pr[u], qf, kb[0], kb[1]);
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float qdec = power[16 * r + g + 8 * (e >> 1) + 1];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) o[nt][e] *= qdec;
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!has_p_tile(u)) break;
      float x[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * r + g + 8 * (e >> 1), j = 8 * (4 * u + h) + 2 * t + (e & 1);
        x[e] = j <= i ? pr[u][e] * power[i - j] : 0.0f;
      }
      uint16_t* at = p_tile + (16 * r + g) * TP + 8 * (4 * u + h) + 2 * t;
      *reinterpret_cast<uint32_t*>(at) = bf16_pair(x[0], x[1]);
      *reinterpret_cast<uint32_t*>(at + 8 * TP) = bf16_pair(x[2], x[3]);
    }

    named_barrier_sync(kProductBarrier, kProductThreads);  // P is complete, and every read of the old bf16 S is done

    // O += P V over the keys of rows 16r..16r+15: P is zero past the diagonal.
    for (int kk = 0; kk <= r; ++kk) {
      uint32_t pf[4];
      uint32_t b[4];
      load_matrices(pf, p_tile + (16 * r + (lane & 15)) * TP + kk * 16 + (lane >> 4) * 8);
      load_matrices_transposed(b, tiles.v + (kk * 16 + (lane & 15)) * CP + 16 * h + (lane >> 4) * 8);
      mma_bf16(o[0], pf, b[0], b[1]);
      mma_bf16(o[1], pf, b[2], b[3]);
    }
    // This warp is done with the tile set; the loaders refill it with block + kTileSets.
    if (block + kTileSets < blocks) named_barrier_arrive(kEmptyBarrier + set, kFastThreads);
    // Columns 2t and 2t + 1 in one 8-byte store where the rows allow it (d is a multiple of 4).
    float* out = p.out + (seg.row + t0) * p.out_stride + int64_t(head) * d;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; e += 2) {
        const int i = 16 * r + g + 8 * (e >> 1), c = col0 + 16 * h + 8 * nt + 2 * t;
        if (i >= n || c >= d) continue;
        float* at = out + i * p.out_stride + c;
        if (paired_stores) {
          *reinterpret_cast<float2*>(at) = make_float2(o[nt][e], o[nt][e + 1]);
        } else {
          at[0] = o[nt][e];
          at[1] = o[nt][e + 1];
        }
      }

    store_state_operand(s);
    named_barrier_sync(kProductBarrier, kProductThreads);  // P is read and the new bf16 S is whole
  }

  if (terms_only || !seg.state_out) return;
  float* state = seg.state_out + int64_t(head) * d * d;
  each_state_element([&](int nt, int e, int a, int c) {
    if (a < d && c < d) state[a * d + c] = s[nt][e];
  });
}

// The state before each part of the segments split into parts, one thread per (state element,
// head, segment): from the segment's state, S = exp(-s B) S + term_b over the blocks before each
// part, with the arithmetic of the prefill kernel's own update (one fused multiply-add by the
// same exp), so a part that starts from it continues exactly as one CTA walking the segment.
struct ScanSegment {
  const float* state;  // heads x d x d, before the segment
  const float* terms;  // the blocks' terms of every part but the last
  float* starts;       // part i, head h at starts + (i heads + h) d d
  int64_t part_blocks;
  int parts;
};

__global__ void lightning_scan_kernel(const ScanSegment* segments, int d, const float* decay) {
  const ScanSegment seg = segments[blockIdx.z];
  const int64_t heads = gridDim.y, head = blockIdx.y, dd = int64_t(d) * d;
  const int64_t element = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (element >= dd) return;
  const float block_decay = expf(-decay[head] * float(kFastBlock));  // every block before the last part is whole
  float state = seg.state[head * dd + element];
  for (int part = 0;; ++part) {
    seg.starts[(part * heads + head) * dd + element] = state;
    if (part + 1 == seg.parts) break;
    for (int64_t b = part * seg.part_blocks; b < (part + 1) * seg.part_blocks; ++b)
      state = fmaf(state, block_decay, seg.terms[(b * heads + head) * dd + element]);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

// The segments of one kind lie in [first, last]; the kernel's grid spans just that range.
struct SegmentRange {
  int first = -1, last = -1;
  bool empty() const { return first < 0; }
  int size() const { return last - first + 1; }
};

// Float4 loads whenever d allows them: a choice made by the head dim alone, so a segment gets the
// same bits whatever shares its call (lightning_attention checked the states' alignment).
void launch_decode(const LightningArgs& args, LightningParams p, SegmentRange range, Device& device, cudaStream_t stream) {
  const bool vectors = args.d % 4 == 0;
  const int d = int(args.d), vec = vectors ? 4 : 1, groups = d / vec;
  const int lanes = std::min(d, kDecodeMaxThreads / groups);
  int64_t rows = 0;
  for (int i = range.first; i <= range.last; ++i) rows += args.segments[size_t(i)].count == 1;
  const int slices = lightning_decode_slices(rows, args.heads, args.d, device.limits().sms);
  const int threads = groups / slices * lanes;
  const size_t smem = size_t(3 * d + lanes * (d / slices)) * sizeof(float);
  p.first = range.first;
  const dim3 grid(unsigned(range.size()), unsigned(args.heads), unsigned(slices));
  if (vectors)
    lightning_decode_kernel<4><<<grid, threads, smem, stream>>>(p);
  else
    lightning_decode_kernel<1><<<grid, threads, smem, stream>>>(p);
  M1_CUDA_CHECK_LAUNCH();
}

// A device without the shared memory a prefill kernel needs fails clearly; otherwise the kernel
// is opted into it before its first launch.
template <auto Kernel>
void prepare_prefill_kernel(size_t bytes, int64_t d, Device& device) {
  const int limit = device.limits().shared_per_block;
  if (size_t(limit) < bytes)
    fail("lightning prefill at head dim {} needs {} bytes of shared memory per block; the device allows {}", d, bytes,
         limit);
  device.allow_shared_memory<Kernel>(bytes);
}

template <int DP, int DV, int G>
void launch_prefill_shape(const LightningArgs& args, LightningParams p, SegmentRange range, Device& device, cudaStream_t stream) {
  using Shape = PrefillShape<DP, DV, G>;
  prepare_prefill_kernel<lightning_prefill_kernel<DP, DV, G>>(Shape::kSmemBytes, args.d, device);
  p.first = range.first;
  const dim3 grid(unsigned(range.size()), unsigned(args.heads), unsigned(Shape::kSlices));
  lightning_prefill_kernel<DP, DV, G><<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  M1_CUDA_CHECK_LAUNCH();
}

// At d > 64 one CTA per (segment, head) is a whole SM's worth of work; when those CTAs would
// leave at least half the SMs idle, each takes half the value columns instead.
void launch_prefill(const LightningArgs& args, LightningParams p, SegmentRange range, Device& device, cudaStream_t stream) {
  if (args.d <= 32) return launch_prefill_shape<32, 32, 8>(args, p, range, device, stream);
  if (args.d <= 64) return launch_prefill_shape<64, 64, 16>(args, p, range, device, stream);
  int64_t segments = 0;
  for (int i = range.first; i <= range.last; ++i) segments += args.segments[size_t(i)].count > 1;
  if (2 * segments * args.heads <= device.limits().sms)
    return launch_prefill_shape<128, 64, 16>(args, p, range, device, stream);
  launch_prefill_shape<128, 128, 16>(args, p, range, device, stream);
}

template <int D, class Ring>
void launch_fast_prefill_kernel(const LightningArgs& args, LightningParams p, int64_t ctas, cudaStream_t stream) {
  using Shape = FastShape<D, Ring>;
  const dim3 grid(unsigned(ctas * Shape::kSlices), unsigned(args.heads));
  lightning_prefill_bf16_kernel<D, Ring><<<grid, kFastThreads, Shape::kSmemBytes, stream>>>(p);
  M1_CUDA_CHECK_LAUNCH();
}

// A call whose segments split into parts (lightning_prefill_parts) runs in three launches: the
// blocks' state terms of every part but each segment's last, the scan of the states before each
// part, then every part's outputs from its state (the last one writing the segment's state) beside
// the segments that stay whole.
template <int D, class Ring>
void launch_fast_prefill_parts(const LightningArgs& args, LightningParams p, SegmentRange range,
                               std::span<const int64_t> part_blocks, DeviceScratch& scratch, cudaStream_t stream) {
  const int64_t heads = args.heads, dd = args.d * args.d, B = kFastBlock;
  int64_t term_parts = 0, parts = 0, split = 0, term_blocks = 0, starts = 0;
  for (int i = range.first; i <= range.last; ++i) {
    const int64_t count = args.segments[size_t(i)].count, per = part_blocks[size_t(i - range.first)];
    if (count < 2) continue;
    if (!per) {
      ++parts;
      continue;
    }
    const int64_t n = part_count(count, per);
    parts += n, term_parts += n - 1, term_blocks += (n - 1) * per, starts += n, ++split;
  }
  auto [term_descs, part_descs, scan_descs, terms, start_states] = carve_scratch(scratch, [&](ScratchCarver& c) {
    return std::tuple{c.take<LightningPart>(term_parts), c.take<LightningPart>(parts), c.take<ScanSegment>(split),
                      c.take<float>(term_blocks * heads * dd), c.take<float>(starts * heads * dd)};
  });
  std::vector<LightningPart> term_host, part_host;
  std::vector<ScanSegment> scan_host;
  float *next_terms = terms, *next_starts = start_states;
  for (int i = range.first; i <= range.last; ++i) {
    const LightningSegment& seg = args.segments[size_t(i)];
    const int64_t per = part_blocks[size_t(i - range.first)];
    if (seg.count < 2) continue;
    if (!per) {
      part_host.push_back({seg.row, seg.count, seg.state, seg.state, nullptr});
      continue;
    }
    const int n = int(part_count(seg.count, per));
    for (int k = 0; k < n; ++k) {
      const int64_t t0 = k * per * B, count = std::min(per * B, seg.count - t0);
      if (k + 1 < n) term_host.push_back({seg.row + t0, count, nullptr, nullptr, next_terms + k * per * heads * dd});
      part_host.push_back({seg.row + t0, count, next_starts + k * heads * dd, k + 1 == n ? seg.state : nullptr, nullptr});
    }
    scan_host.push_back({seg.state, next_terms, next_starts, per, n});
    next_terms += (n - 1) * per * heads * dd;
    next_starts += n * heads * dd;
  }
  auto upload = [&](auto* device, const auto& host) {
    M1_CUDA_CHECK(cudaMemcpyAsync(device, host.data(), host.size() * sizeof(host[0]), cudaMemcpyHostToDevice, stream));
  };
  upload(term_descs, term_host);
  upload(part_descs, part_host);
  upload(scan_descs, scan_host);

  p.parts = term_descs;
  launch_fast_prefill_kernel<D, Ring>(args, p, term_parts, stream);
  constexpr int kScanThreads = 256;
  const dim3 grid(unsigned((dd + kScanThreads - 1) / kScanThreads), unsigned(heads), unsigned(split));
  lightning_scan_kernel<<<grid, kScanThreads, 0, stream>>>(scan_descs, int(args.d), args.decay);
  M1_CUDA_CHECK_LAUNCH();
  p.parts = part_descs;
  launch_fast_prefill_kernel<D, Ring>(args, p, parts, stream);
}

template <int D, class Ring>
void launch_fast_prefill_ring(const LightningArgs& args, LightningParams p, SegmentRange range, DeviceScratch& scratch,
                              Device& device, cudaStream_t stream) {
  using Shape = FastShape<D, Ring>;
  prepare_prefill_kernel<lightning_prefill_bf16_kernel<D, Ring>>(Shape::kSmemBytes, args.d, device);
  // Under stream capture the parts' descriptors could not be copied from pageable memory; a
  // captured step decodes anyway.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  M1_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const auto segments = args.segments.subspan(size_t(range.first), size_t(range.size()));
  const bool may_split = args.split_segments && capture == cudaStreamCaptureStatusNone;
  const std::vector<int64_t> part_blocks = may_split
                                               ? lightning_prefill_parts(segments, args.heads, args.d, device.limits().sms)
                                               : std::vector<int64_t>(segments.size(), 0);
  if (std::any_of(part_blocks.begin(), part_blocks.end(), [](int64_t per) { return per > 0; }))
    return launch_fast_prefill_parts<D, Ring>(args, p, range, part_blocks, scratch, stream);
  p.first = range.first;
  launch_fast_prefill_kernel<D, Ring>(args, p, range.size(), stream);
}

// The wide ring where the device's shared memory holds it, else the compact one (same bits).
template <int D>
void launch_fast_prefill_shape(const LightningArgs& args, LightningParams p, SegmentRange range, DeviceScratch& scratch,
                               Device& device, cudaStream_t stream) {
  if (FastShape<D, WideRing>::kSmemBytes <= size_t(device.limits().shared_per_block))
    return launch_fast_prefill_ring<D, WideRing>(args, p, range, scratch, device, stream);
  launch_fast_prefill_ring<D, CompactRing>(args, p, range, scratch, device, stream);
}

// The tensor-core kernel stages rows 16 bytes at a time, which needs d, the row stride and qkv
// itself aligned to 4 floats; other calls (and callers that want fp32 operands) take the fp32
// kernel. The choice depends on the call's layout alone, never on which segments share it.
void launch_any_prefill(const LightningArgs& args, LightningParams p, SegmentRange range, DeviceScratch& scratch,
                        Device& device, cudaStream_t stream) {
  const bool fast = args.bf16_operands && args.d % 4 == 0 && args.qkv_stride % 4 == 0 && aligned16(args.qkv);
  if (!fast) return launch_prefill(args, p, range, device, stream);
  if (args.d <= 64) return launch_fast_prefill_shape<64>(args, p, range, scratch, device, stream);
  launch_fast_prefill_shape<128>(args, p, range, scratch, device, stream);
}

}  // namespace

int lightning_decode_slices(int64_t rows, int64_t heads, int64_t d, int sms) {
  const int groups = int(d % 4 == 0 ? d / 4 : d), lanes = std::min(int(d), kDecodeMaxThreads / groups);
  int slices = 1;
  while (groups % (2 * slices) == 0 && groups / (2 * slices) * lanes >= kDecodeMinThreads &&
         rows * heads * 2 * slices <= sms)
    slices *= 2;
  return slices;
}

std::vector<int64_t> lightning_prefill_parts(std::span<const LightningSegment> segments, int64_t heads, int64_t d,
                                             int sms) {
  std::vector<int64_t> part_blocks(segments.size(), 0);
  const int64_t slices = d <= kFastColumns ? 1 : 2, ctas_per_segment = heads * slices;
  int64_t ctas = 0, work = 0;
  for (const LightningSegment& seg : segments)
    if (seg.count > 1) ctas += ctas_per_segment, work += fast_blocks(seg.count) * ctas_per_segment;
  if (ctas >= sms) return part_blocks;
  // Each CTA takes a whole SM, so the parts must fit in one wave: the shortest parts (at least an
  // even share of the work) whose CTAs, with those of the segments that stay whole, fit the SMs.
  auto split = [](const LightningSegment& seg, int64_t per) { return seg.count > 1 && fast_blocks(seg.count) >= 2 * per; };
  auto ctas_with = [&](int64_t per) {
    int64_t total = 0;
    for (const LightningSegment& seg : segments)
      if (seg.count > 1)
        total += (split(seg, per) ? part_count(seg.count, per) : 1) * ctas_per_segment;
    return total;
  };
  int64_t per = std::max(kMinPartBlocks, (work + sms - 1) / sms);
  while (ctas_with(per) > sms) ++per;
  size_t term_bytes = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    if (!split(segments[i], per)) continue;
    part_blocks[i] = per;
    term_bytes += size_t(part_count(segments[i].count, per) - 1) * size_t(per * heads * d * d) * sizeof(float);
  }
  if (term_bytes > kMaxPartTermBytes) std::fill(part_blocks.begin(), part_blocks.end(), 0);
  return part_blocks;
}

void lightning_attention(const LightningArgs& args, DeviceScratch& scratch, Device& device, cudaStream_t stream) {
  if (args.d < 1 || args.d > kMaxHeadDim)
    fail("lightning attention supports head dim 1..{}, got {}", kMaxHeadDim, args.d);
  if (args.heads < 1 || args.heads > 65535) fail("lightning attention supports 1..65535 heads, got {}", args.heads);
  if (args.segments.size() > size_t(INT_MAX)) fail("lightning attention: {} segments is too many", args.segments.size());
  if (args.segments.empty()) return;
  if (!args.qkv || !args.out || !args.decay || !args.device_segments)
    fail("lightning attention: qkv, out, decay and device segments must be device pointers");

  SegmentRange decode, prefill;
  for (size_t i = 0; i < args.segments.size(); ++i) {
    const int64_t count = args.segments[i].count;
    if (count < 1) continue;
    if (count == 1 && args.d % 4 == 0 && !aligned16(args.segments[i].state))
      fail("lightning attention: the state of segment {} is not 16-byte aligned (head dim {} decodes with float4 loads)",
           i, args.d);
    SegmentRange& range = count == 1 ? decode : prefill;
    if (range.empty()) range.first = int(i);
    range.last = int(i);
  }
  const LightningParams p{args.qkv, args.qkv_stride, args.out, args.out_stride, int(args.d), args.decay,
                          args.device_segments, 0};
  if (!decode.empty()) launch_decode(args, p, decode, device, stream);
  if (!prefill.empty()) launch_any_prefill(args, p, prefill, scratch, device, stream);
}

}  // namespace m1::cuda
