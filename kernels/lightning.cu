// Lightning attention kernels (lightning.h): a one-pass decode over each fp32 state, batched over
// sequences and heads, and the chunked prefill with the state kept in shared memory across blocks.

#include "lightning.h"

#include <algorithm>
#include <climits>

#include <cuda_pipeline.h>

#include "cuda_check.h"
#include "launch.h"
#include "m1/error.h"

namespace m1::cuda {
namespace {

constexpr int64_t kMaxHeadDim = 128;

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
};

// ---------------------------------------------------------------------------------------------
// Decode: S <- exp(-s) S + k^T v and o = q S' in one pass over S. Thread (lane, group) owns
// columns [group*V, group*V + V) of rows lane, lane + lanes, ...; it issues kRowsInFlight row
// loads before using any, so a CTA keeps enough bytes in flight to stream S at memory speed.

constexpr int kDecodeMaxThreads = 512;
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
  const int groups = d / V;                // column groups of V floats
  const int lanes = blockDim.x / groups;   // threads sharing a column group, one row in `lanes` each
  const int group = threadIdx.x % groups, lane = threadIdx.x / groups;

  extern __shared__ float smem[];
  float* q = smem;             // [q | k | v] of this head
  float* k = smem + d;
  float* v = smem + 2 * d;
  float* partial = smem + 3 * d;  // lanes x d partial outputs
  const float* row = p.qkv + seg.row * p.qkv_stride + int64_t(head) * 3 * d;
  for (int i = threadIdx.x; i < 3 * d; i += blockDim.x) smem[i] = row[i];
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
  for (int u = 0; u < V; ++u) partial[lane * d + group * V + u] = o[u];
  __syncthreads();
  // The lanes' partial sums in a fixed order, so the result does not depend on scheduling.
  float* out = p.out + seg.row * p.out_stride + int64_t(head) * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float sum = 0.0f;
    for (int r = 0; r < lanes; ++r) sum += partial[r * d + c];
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
    // Tiles in, all copies in flight at once. A warp reads 4 tokens x 8 features of Q (whole
    // sectors) and stores them transposed to 32 distinct banks; K and V go row by row.
    for (int idx = tid; idx < B * DP; idx += T) {
      const int i = (idx & 3) | ((idx / (4 * DP)) << 2), a = (idx >> 2) % DP;
      copy_or_zero(qt + swizzled(a, i, B), rows + i * p.qkv_stride + a, i < n && a < d, p.qkv);
    }
    for (int idx = tid; idx < B * DP; idx += T) {
      const int j = idx / DP, a = idx % DP;
      copy_or_zero(ks + swizzled(j, a, DP), rows + j * p.qkv_stride + d + a, j < n && a < d, p.qkv);
    }
    for (int idx = tid; idx < B * DV; idx += T) {
      const int j = idx / DV, c = col0 + idx % DV;
      copy_or_zero(vs + idx, rows + j * p.qkv_stride + 2 * d + c, j < n && c < d, p.qkv);
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
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
      for (int g = 0; g < kValueGroups; ++g) {
        const float4 sa = load4(S + a * DV + g * kSpan + tn * 4);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float qr = component(qa, r);
          o[r][g * 4 + 0] = fmaf(qr, sa.x, o[r][g * 4 + 0]);
          o[r][g * 4 + 1] = fmaf(qr, sa.y, o[r][g * 4 + 1]);
          o[r][g * 4 + 2] = fmaf(qr, sa.z, o[r][g * 4 + 2]);
          o[r][g * 4 + 3] = fmaf(qr, sa.w, o[r][g * 4 + 3]);
        }
      }
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
      for (int g = 0; g < kValueGroups; ++g) {
        const float4 vj = load4(vs + j * DV + g * kSpan + tn * 4);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float pr_j = component(pj, r);
          o[r][g * 4 + 0] = fmaf(pr_j, vj.x, o[r][g * 4 + 0]);
          o[r][g * 4 + 1] = fmaf(pr_j, vj.y, o[r][g * 4 + 1]);
          o[r][g * 4 + 2] = fmaf(pr_j, vj.z, o[r][g * 4 + 2]);
          o[r][g * 4 + 3] = fmaf(pr_j, vj.w, o[r][g * 4 + 3]);
        }
      }
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
// Launchers.

// The segments of one kind lie in [first, last]; the kernel's grid spans just that range.
struct SegmentRange {
  int first = -1, last = -1;
  bool empty() const { return first < 0; }
  int size() const { return last - first + 1; }
};

void launch_decode(const LightningArgs& args, LightningParams p, SegmentRange range, cudaStream_t stream) {
  bool aligned = args.d % 4 == 0;
  for (int i = range.first; i <= range.last; ++i)
    if (args.segments[size_t(i)].count == 1)
      aligned = aligned && aligned16(args.segments[size_t(i)].state);
  const int d = int(args.d), vec = aligned ? 4 : 1, groups = d / vec;
  const int lanes = std::min(d, kDecodeMaxThreads / groups);
  const size_t smem = size_t(3 * d + lanes * d) * sizeof(float);
  p.first = range.first;
  const dim3 grid(unsigned(range.size()), unsigned(args.heads));
  if (aligned)
    lightning_decode_kernel<4><<<grid, groups * lanes, smem, stream>>>(p);
  else
    lightning_decode_kernel<1><<<grid, groups * lanes, smem, stream>>>(p);
  M1_CUDA_CHECK_LAUNCH();
}

// What the prefill launchers need to know of the device, read once per process (like the
// shared-memory opt-ins here and in the other kernels, on the device current at first use).
struct DeviceLimits {
  int sms = 0;               // streaming multiprocessors
  int shared_per_block = 0;  // bytes of shared memory a block may opt into
};

const DeviceLimits& device_limits() {
  static const DeviceLimits limits = [] {
    int device = 0;
    DeviceLimits l;
    M1_CUDA_CHECK(cudaGetDevice(&device));
    M1_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device));
    M1_CUDA_CHECK(cudaDeviceGetAttribute(&l.shared_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return l;
  }();
  return limits;
}

// A device without the shared memory the kernel needs fails clearly; otherwise the kernel is
// opted into it once per process, before its first launch.
template <int DP, int DV, int G>
void launch_prefill_shape(const LightningArgs& args, LightningParams p, SegmentRange range, cudaStream_t stream) {
  using Shape = PrefillShape<DP, DV, G>;
  const int limit = device_limits().shared_per_block;
  if (size_t(limit) < Shape::kSmemBytes)
    fail("lightning prefill at head dim {} needs {} bytes of shared memory per block; the device allows {}", args.d,
         Shape::kSmemBytes, limit);
  static const bool prepared = (allow_shared_memory(lightning_prefill_kernel<DP, DV, G>, Shape::kSmemBytes), true);
  (void)prepared;
  p.first = range.first;
  const dim3 grid(unsigned(range.size()), unsigned(args.heads), unsigned(Shape::kSlices));
  lightning_prefill_kernel<DP, DV, G><<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  M1_CUDA_CHECK_LAUNCH();
}

// At d > 64 one CTA per (segment, head) is a whole SM's worth of work; when those CTAs would
// leave at least half the SMs idle, each takes half the value columns instead.
void launch_prefill(const LightningArgs& args, LightningParams p, SegmentRange range, cudaStream_t stream) {
  if (args.d <= 32) return launch_prefill_shape<32, 32, 8>(args, p, range, stream);
  if (args.d <= 64) return launch_prefill_shape<64, 64, 16>(args, p, range, stream);
  int64_t segments = 0;
  for (int i = range.first; i <= range.last; ++i) segments += args.segments[size_t(i)].count > 1;
  if (2 * segments * args.heads <= device_limits().sms)
    return launch_prefill_shape<128, 64, 16>(args, p, range, stream);
  launch_prefill_shape<128, 128, 16>(args, p, range, stream);
}

}  // namespace

void lightning_attention(const LightningArgs& args, cudaStream_t stream) {
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
    SegmentRange& range = count == 1 ? decode : prefill;
    if (range.empty()) range.first = int(i);
    range.last = int(i);
  }
  const LightningParams p{args.qkv, args.qkv_stride, args.out, args.out_stride, int(args.d), args.decay,
                          args.device_segments, 0};
  if (!decode.empty()) launch_decode(args, p, decode, stream);
  if (!prefill.empty()) launch_prefill(args, p, prefill, stream);
}

}  // namespace m1::cuda
