// bench_cuda: the CUDA backend against the GPU's limits measured in the same run (device-to-device
// copy bandwidth, cuBLAS bf16 GEMM throughput): matrix products (BF16 weights, and int8 / int4
// weights at the real model's one-row shapes and in prefill), lightning attention at the real
// model's layer shape, flash-style softmax prefill, token sampling at the real vocabulary, and
// whole decode steps of the bench preset (CUDA graphs on and off).
// Prints a table; --json FILE writes the same figures; --only TEXT keeps the benchmarks whose
// names start with TEXT, --skip TEXT leaves those out. The last two decode steps of each decode benchmark run between
// cudaProfilerStart and cudaProfilerStop, for a per-kernel profile (ncu --profile-from-start off).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>
#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <nlohmann/json.hpp>

#include "attention.h"
#include "bench_measure.h"
#include "bench_models.h"
#include "cuda_backend.h"
#include "device_array.h"
#include "lightning.h"
#include "m1/backends.h"
#include "m1/error.h"
#include "m1/model.h"
#include "m1/synthetic.h"
#include "m1/weights.h"
#include "matmul.h"
#include "sampling.h"

namespace {

using m1::cuda::DeviceMatrix;

using m1::cuda::DeviceArray;

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) m1::fail("cuBLAS error {} in {}", cublasGetStatusName(status), call);
}
#define M1_CUBLAS_CHECK(call) check_cublas((call), #call)

// Fills a device array of float or bf16 (uint16_t) with copies of one random block of values in
// [-scale, scale], or of uint32_t with random bits: enough variety for timing, without generating
// gigabytes on the host.
template <class T>
void fill_random(DeviceArray<T>& array, float scale, uint64_t seed) {
  constexpr size_t kBlock = size_t(4) << 20;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<T> block(std::min(array.size(), kBlock));
  for (T& v : block) {
    if constexpr (std::is_same_v<T, float>)
      v = dist(rng);
    else if constexpr (std::is_same_v<T, uint32_t>)
      v = uint32_t(rng());  // random bytes (packed int8 / int4 codes)
    else
      v = m1::f32_to_bf16(dist(rng));
  }
  for (size_t off = 0; off < array.size(); off += block.size())
    M1_CUDA_CHECK(cudaMemcpy(array.get() + off, block.data(), std::min(block.size(), array.size() - off) * sizeof(T),
                             cudaMemcpyHostToDevice));
}

// Median milliseconds of `repeats` timed runs of `work` on `stream`, after one warm-up run.
double time_ms(cudaStream_t stream, int repeats, const std::function<void()>& work) {
  cudaEvent_t start, stop;
  M1_CUDA_CHECK(cudaEventCreate(&start));
  M1_CUDA_CHECK(cudaEventCreate(&stop));
  work();
  M1_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    M1_CUDA_CHECK(cudaEventRecord(start, stream));
    work();
    M1_CUDA_CHECK(cudaEventRecord(stop, stream));
    M1_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    M1_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return m1::bench::median(times);
}

struct Row {
  std::string name;
  double ms = 0;
  double value = 0;
  std::string unit;
  double fraction = -1;  // of the matching limit; negative: none
};

class Report {
 public:
  void add(Row row) {
    std::printf("%-58s %10.3f ms %10.1f %-7s", row.name.c_str(), row.ms, row.value, row.unit.c_str());
    if (row.fraction >= 0) std::printf(" %5.1f%% of limit", 100 * row.fraction);
    std::printf("\n");
    std::fflush(stdout);
    rows_.push_back(std::move(row));
  }
  nlohmann::ordered_json json() const {
    nlohmann::ordered_json results = nlohmann::ordered_json::array();
    for (const Row& r : rows_) {
      nlohmann::ordered_json j{{"name", r.name}, {"ms", r.ms}, {"value", r.value}, {"unit", r.unit}};
      if (r.fraction >= 0) j["fraction_of_limit"] = r.fraction;
      results.push_back(j);
    }
    return results;
  }

 private:
  std::vector<Row> rows_;
};

struct Limits {
  double copy_gb_s = 0, cublas_tflops = 0;
};

// Device-to-device copy of 1 GiB: bytes read plus bytes written per second.
double copy_bandwidth(cudaStream_t stream) {
  const size_t bytes = size_t(1) << 30;
  DeviceArray<uint8_t> a(bytes), b(bytes);
  M1_CUDA_CHECK(cudaMemsetAsync(a.get(), 1, bytes, stream));
  const double ms = time_ms(stream, 20, [&] { M1_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, stream)); });
  return 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
}

// cuBLAS bf16 x bf16 -> fp32, fp32 accumulation, n x n x n.
double cublas_bf16_tflops(cudaStream_t stream, int64_t n) {
  DeviceArray<uint16_t> a(size_t(n * n)), b(size_t(n * n));
  DeviceArray<float> c(size_t(n * n));
  fill_random(a, 1, 1);
  fill_random(b, 1, 2);
  cublasHandle_t handle;
  M1_CUBLAS_CHECK(cublasCreate(&handle));
  M1_CUBLAS_CHECK(cublasSetStream(handle, stream));
  const float one = 1, zero = 0;
  const double ms = time_ms(stream, 10, [&] {
    M1_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(n), int(n), &one, a.get(), CUDA_R_16BF, int(n),
                                 b.get(), CUDA_R_16BF, int(n), &zero, c.get(), CUDA_R_32F, int(n), CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT));
  });
  cublasDestroy(handle);
  return 2.0 * double(n) * double(n) * double(n) / (ms * 1e-3) / 1e12;
}

// Our product out = x w^T with BF16 weights [n, k] and m rows, in both operand modes.
void bench_matmul(Report& report, const Limits& limits, cudaStream_t stream, m1::cuda::Device& device, int64_t m, int64_t n, int64_t k) {
  DeviceArray<float> x(size_t(m * k)), out(size_t(m * n));
  DeviceArray<uint16_t> w(size_t(n * k));
  fill_random(x, 1, 3);
  fill_random(w, 0.05f, 4);
  m1::cuda::DeviceScratch scratch(stream);
  const DeviceMatrix weight{w.get(), m1::DType::kBF16, n, k};
  // Where the tiles run on the warpgroup tensor cores (M1_WGMMA=1 on a Hopper), the mma.sync tiles
  // beside them, named ", mma.sync".
  m1::cuda::Device mma = device.with_warpgroup_mma(false);
  for (auto [operands, on, suffix] :
       {std::tuple{m1::cuda::GemmOperands::kBf16, &device, ""}, {m1::cuda::GemmOperands::kFp32, &device, ""},
        {m1::cuda::GemmOperands::kBf16, &mma, ", mma.sync"}, {m1::cuda::GemmOperands::kFp32, &mma, ", mma.sync"}}) {
    if (on == &mma && (m <= 64 || !device.limits().warpgroup_mma)) continue;
    const char* mode = operands == m1::cuda::GemmOperands::kBf16 ? "fast" : "exact";
    const double ms = time_ms(stream, m > 64 ? 5 : 50, [&] {
      m1::cuda::matmul(x.get(), k, m, weight, out.get(), n, operands, scratch, *on, stream);
    });
    const double flops = 2.0 * double(m) * double(n) * double(k), bytes = double(n * k) * 2 + double(m * (k + n)) * 4;
    const std::string name = fmt::format("matmul {} m={} n={} k={}{}", mode, m, n, k, suffix);
    if (m > 64)
      report.add({name, ms, flops / (ms * 1e-3) / 1e12, "TFLOP/s", flops / (ms * 1e-3) / 1e12 / limits.cublas_tflops});
    else
      report.add({name, ms, bytes / (ms * 1e-3) / 1e9, "GB/s", bytes / (ms * 1e-3) / 1e9 / limits.copy_gb_s});
  }
}

// Our product out = x w^T with quantized weights [n, k] (int8: one bf16 scale per row; int4: one per
// 32 inputs) and m rows. Few rows stream the packed codes and scales, against the copy bandwidth
// (the bar for int4 at one row: 70%); many rows against cuBLAS bf16.
void bench_quantized_matmul(Report& report, const Limits& limits, cudaStream_t stream, m1::cuda::Device& device, m1::DType type, int64_t m,
                            int64_t n, int64_t k, m1::cuda::GemmOperands operands, const char* what) {
  const int64_t group = type == m1::DType::kQ4 ? 32 : k, groups = (k + group - 1) / group;
  const size_t code_bytes = m1::matrix_bytes(type, n, k), scale_bytes = size_t(n * groups) * 2;
  DeviceArray<float> x(size_t(m * k)), out(size_t(m * n));
  DeviceArray<uint32_t> codes(code_bytes / 4);
  DeviceArray<uint16_t> scales(size_t(n * groups));
  fill_random(x, 1, 11);
  fill_random(codes, 0, 12);
  fill_random(scales, 0.01f, 13);
  m1::cuda::DeviceScratch scratch(stream);
  const DeviceMatrix weight{codes.get(), type, n, k, scales.get(), m1::DType::kBF16, group};
  const char* mode = operands == m1::cuda::GemmOperands::kBf16 ? "fast" : "exact";
  // Where fast tiles run on the warpgroup tensor cores (M1_WGMMA=1 on a Hopper), the mma.sync
  // tiles beside them, named ", mma.sync".
  m1::cuda::Device mma = device.with_warpgroup_mma(false);
  const bool both = m > 64 && operands == m1::cuda::GemmOperands::kBf16 && device.limits().warpgroup_mma;
  for (auto [on, suffix] : {std::pair{&device, ""}, {&mma, ", mma.sync"}}) {
    if (on == &mma && !both) continue;
    const double ms = time_ms(stream, m > 64 ? 5 : 50, [&] {
      m1::cuda::matmul(x.get(), k, m, weight, out.get(), n, operands, scratch, *on, stream);
    });
    const double flops = 2.0 * double(m) * double(n) * double(k);
    const double bytes = double(code_bytes + scale_bytes) + double(m * (k + n)) * 4;
    const std::string name = fmt::format("quantized matmul {}{} {} m={} n={} k={} ({}){}", m1::dtype_name(type),
                                         type == m1::DType::kQ4 ? " g32" : "", mode, m, n, k, what, suffix);
    if (m > 64)
      report.add({name, ms, flops / (ms * 1e-3) / 1e12, "TFLOP/s", flops / (ms * 1e-3) / 1e12 / limits.cublas_tflops});
    else
      report.add({name, ms, bytes / (ms * 1e-3) / 1e9, "GB/s", bytes / (ms * 1e-3) / 1e9 / limits.copy_gb_s});
  }
}

// Lightning attention of one layer of the real model's shape (64 heads, d = 128; 8 heads are one
// rank's under 8-way tensor parallelism, where the bf16 kernel splits the sequence into parts
// unless `split` is off) over `tokens` tokens of one sequence, fed as chunks of at most `chunk` tokens with the state carried between
// them (a 1M-token qkv in fp32 alone would need 100 GB); bf16 operands on tensor cores (the fast
// precision) or fp32 (exact). qkv is the projection's output: the kernels apply SiLU as they load
// it (since 2026-12-05; the model's separate SiLU pass before that is not in these rows).
void bench_lightning_prefill(Report& report, const Limits& limits, cudaStream_t stream, m1::cuda::Device& device, int64_t tokens, int64_t chunk,
                             bool bf16_operands, int64_t heads = 64, bool split = true) {
  const int64_t d = 128, rows = std::min(tokens, chunk);
  DeviceArray<float> qkv(size_t(rows * heads * 3 * d)), out(size_t(rows * heads * d)), state(size_t(heads * d * d));
  DeviceArray<float> decay(m1::lightning_decay(heads, 0, 80));
  DeviceArray<m1::cuda::LightningSegment> segment(1);
  m1::cuda::DeviceScratch scratch(stream);
  fill_random(qkv, 0.3f, 5);
  auto run = [&] {
    M1_CUDA_CHECK(cudaMemsetAsync(state.get(), 0, state.size() * sizeof(float), stream));
    for (int64_t done = 0; done < tokens; done += rows) {
      const m1::cuda::LightningSegment seg{0, std::min(rows, tokens - done), state.get()};
      M1_CUDA_CHECK(cudaMemcpyAsync(segment.get(), &seg, sizeof seg, cudaMemcpyHostToDevice, stream));
      m1::cuda::LightningArgs args{qkv.get(), heads * 3 * d, out.get(), heads * d, heads, d, decay.get(),
                                   std::span(&seg, 1), segment.get(), bf16_operands, split};
      m1::cuda::lightning_attention(args, scratch, device, stream);
    }
  };
  const double ms = time_ms(stream, tokens > chunk ? 1 : 3, run);
  // Nominal work of the chunked form both kernels implement, with B = 64-token blocks, per token
  // and head: Q S and K^T V (2 d^2 each), Q K^T and its product with V (2 B d each, counted
  // whole although the kernels skip the tiles above the diagonal). The kernels also move 16 bytes
  // of fp32 q, k, v and output per token, head and feature: at ~3 TB/s that caps them near
  // (4 d^2 + 4 B d) / (16 d) FLOP/B * 3 TB/s ~ 144 TFLOP/s at d = 128.
  const double flops = double(tokens) * double(heads) * (4.0 * d * d + 4.0 * 64 * d);
  const std::string parts = heads == 64 ? "" : split ? ", split" : ", whole";
  report.add({fmt::format("lightning prefill {}x128 {}, {} tokens{} (per layer)", heads, bf16_operands ? "bf16" : "fp32",
                          tokens, parts),
              ms, flops / (ms * 1e-3) / 1e12, "TFLOP/s", flops / (ms * 1e-3) / 1e12 / limits.cublas_tflops});
}

// One decode token for `batch` sequences, 64 heads (or 8: one rank's under 8-way tensor
// parallelism, whose CTAs take slices of the value columns), d = 128: the state is read and
// written once.
void bench_lightning_decode(Report& report, const Limits& limits, cudaStream_t stream, m1::cuda::Device& device, int64_t batch,
                            int64_t heads = 64) {
  const int64_t d = 128;
  DeviceArray<float> qkv(size_t(batch * heads * 3 * d)), out(size_t(batch * heads * d)), states(size_t(batch * heads * d * d));
  DeviceArray<float> decay(m1::lightning_decay(heads, 0, 80));
  fill_random(qkv, 0.3f, 6);
  M1_CUDA_CHECK(cudaMemset(states.get(), 0, states.size() * sizeof(float)));
  std::vector<m1::cuda::LightningSegment> segs;
  for (int64_t b = 0; b < batch; ++b) segs.push_back({b, 1, states.get() + b * heads * d * d});
  DeviceArray<m1::cuda::LightningSegment> segments(segs);
  m1::cuda::LightningArgs args{qkv.get(), heads * 3 * d, out.get(), heads * d, heads, d, decay.get(), segs, segments.get()};
  m1::cuda::DeviceScratch scratch(stream);
  const double ms = time_ms(stream, 50, [&] { m1::cuda::lightning_attention(args, scratch, device, stream); });
  const double bytes = 2.0 * double(states.size()) * sizeof(float);
  report.add({fmt::format("lightning decode {}x128, batch {} (per layer; {:.1f} us)", heads, batch, ms * 1e3), ms,
              bytes / (ms * 1e-3) / 1e9, "GB/s", bytes / (ms * 1e-3) / 1e9 / limits.copy_gb_s});
}

// The draws bench_sampling times.
enum class DrawKind {
  kGreedy,
  kTopP09Logprobs,  // temperature 0.8, top-p 0.9, 5 alternatives' log-probabilities
  kTopP095,         // MiniMax-M1's recommended sampling: temperature 1.0, top-p 0.95
  kTopK50TopP095,   // the same under top-k 50 (two radix searches: top-k's, then top-p's among its kept)
};

// Token draws for `batch` rows of the real model's 200,064 logits (uniform in [-3, 3]: a wide
// nucleus). Bytes: the logits, read once.
void bench_sampling(Report& report, const Limits& limits, cudaStream_t stream, m1::cuda::Device& device, int64_t batch,
                    DrawKind kind) {
  const int64_t vocab = 200064;
  DeviceArray<float> logits(size_t(batch * vocab));
  fill_random(logits, 3, 10);
  std::vector<m1::cuda::DeviceDraw> draws(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    m1::cuda::DeviceDraw& d = draws[size_t(b)];
    d.row = b;
    d.temperature = kind == DrawKind::kGreedy ? 0.0f : kind == DrawKind::kTopP09Logprobs ? 0.8f : 1.0f;
    d.top_p = kind == DrawKind::kGreedy ? 1.0f : kind == DrawKind::kTopP09Logprobs ? 0.9f : 0.95f;
    d.top_k = kind == DrawKind::kTopK50TopP095 ? 50 : 0;
    d.top_logprobs = kind == DrawKind::kTopP09Logprobs ? 5 : 0;
    d.uniform = double(b + 1) / double(batch + 2);
  }
  DeviceArray<m1::cuda::DeviceDraw> device_draws(draws);
  DeviceArray<m1::cuda::DrawResult> results(draws.size());
  DeviceArray<int32_t> none(1);
  m1::cuda::DeviceScratch scratch(stream);
  const m1::cuda::SampleArgs args{.logits = logits.get(), .vocab = vocab, .draws = draws, .device_draws = device_draws.get(),
                                  .seen = none.get(), .generated_counts = none.get(), .results = results.get()};
  const double ms = time_ms(stream, 20, [&] { m1::cuda::sample(args, scratch, device, stream); });
  const double bytes = double(batch * vocab) * sizeof(float);
  report.add({fmt::format("sampling, vocab 200064, batch {}, {} ({:.1f} us)", batch,
                          kind == DrawKind::kGreedy           ? "greedy"
                          : kind == DrawKind::kTopP09Logprobs ? "top-p 0.9 + 5 logprobs, temperature 0.8"
                          : kind == DrawKind::kTopP095        ? "top-p 0.95, temperature 1.0"
                                                              : "top-k 50 + top-p 0.95, temperature 1.0",
                          ms * 1e3),
              ms, bytes / (ms * 1e-3) / 1e9, "GB/s", bytes / (ms * 1e-3) / 1e9 / limits.copy_gb_s});
}

// Causal flash-style prefill: `tokens` rows after `depth` cached ones (random keys and values),
// d = 128, RoPE on 64 dims; q and the softmax weights rounded to bf16 once (fast) or carried as two
// bf16 terms (exact). `device` sizes the launch (a device seen as having 1 SM forces wide CTAs);
// `prefill` as AttentionArgs::prefill. Returns milliseconds per call.
struct FlashCase {
  int64_t heads, kv_heads, tokens, depth;
  bool bf16_operands;
  m1::cuda::PrefillChoices prefill = {};
};
double time_flash_prefill(const FlashCase& c, cudaStream_t stream, m1::cuda::Device& device) {
  const int64_t d = 128, rows = c.depth + c.tokens;
  DeviceArray<float> q(size_t(c.tokens * c.heads * d)), k(size_t(c.tokens * c.kv_heads * d)),
      v(size_t(c.tokens * c.kv_heads * d)), out(size_t(c.tokens * c.heads * d));
  DeviceArray<uint16_t> keys(size_t(rows * c.kv_heads * d)), values(size_t(rows * c.kv_heads * d));
  fill_random(q, 1, 7);
  fill_random(k, 1, 8);
  fill_random(v, 1, 9);
  fill_random(keys, 1, 10);
  fill_random(values, 1, 11);
  const m1::cuda::AttentionSegment seg{0, c.tokens, c.depth, keys.get(), values.get()};
  DeviceArray<m1::cuda::AttentionSegment> segment(std::vector{seg});
  m1::cuda::DeviceScratch scratch(stream);
  m1::cuda::AttentionArgs args{q.get(), c.heads * d, k.get(), c.kv_heads * d, v.get(), c.kv_heads * d, out.get(),
                               c.heads * d, c.heads, c.kv_heads, d, 64, 1e7, std::span(&seg, 1), segment.get(),
                               c.bf16_operands, c.prefill};
  // Each run appends the same rows at the same positions, so the cache does not grow.
  return time_ms(stream, c.heads * c.tokens > 16384 * 64 ? 1 : 3,
                 [&] { m1::cuda::softmax_attention(args, scratch, device, stream); });
}

void report_flash_prefill(Report& report, const Limits& limits, const FlashCase& c, double ms, std::string name) {
  const double flops = 4.0 * 128 * double(c.heads) * double(c.tokens) * (double(c.depth) + double(c.tokens + 1) / 2);
  report.add({std::move(name), ms, flops / (ms * 1e-3) / 1e12, "TFLOP/s", flops / (ms * 1e-3) / 1e12 / limits.cublas_tflops});
}

// The whole model's softmax layer (64 query heads on 8 kv heads) prefilling one prompt from the
// start, with the planned K/V stages or `kv_stages` forced; `suffix` ends the row's name.
void bench_flash_prefill(Report& report, const Limits& limits, cudaStream_t stream, m1::cuda::Device& device,
                         int64_t tokens, bool bf16_operands, int kv_stages = 0, std::string_view suffix = "") {
  const FlashCase c{64, 8, tokens, 0, bf16_operands, {.kv_stages = kv_stages}};
  report_flash_prefill(report, limits, c, time_flash_prefill(c, stream, device),
                       fmt::format("flash prefill 64q/8kv x128 {}, {} tokens{}{}", bf16_operands ? "bf16" : "2xbf16",
                                   tokens, kv_stages ? fmt::format(", {} stages", kv_stages) : "", suffix));
}

// One rank's share of a softmax layer under 8-way tensor parallelism (8 query heads, 1 kv head):
// a 512-token step at depth `depth`, as the launcher plans it on this GPU (its chunks of 4,096
// keys split over CTAs), or not split: narrow CTAs (2 warps, the launcher's pick on a GPU with
// SMs to spare) or wide ones (8 warps, forced by a device seen as having 1 SM). The same bits.
enum class RankForm { kSplit, kNarrow, kWide };
void bench_flash_prefill_rank(Report& report, const Limits& limits, cudaStream_t stream, m1::cuda::Device& device,
                              int64_t depth, RankForm form) {
  m1::cuda::Device one_sm(device.index(), m1::cuda::DeviceLimits{1, device.limits().shared_per_block,
                                                                 device.limits().partial_bytes});
  const FlashCase c{8, 1, 512, depth, true, {.split = form == RankForm::kSplit ? 0 : -1}};
  report_flash_prefill(report, limits, c, time_flash_prefill(c, stream, form == RankForm::kWide ? one_sm : device),
                       fmt::format("flash prefill 8q/1kv x128 bf16, 512 tokens at depth {}, {}", depth,
                                   form == RankForm::kSplit    ? "split chunks"
                                   : form == RankForm::kNarrow ? "narrow CTAs"
                                                               : "wide CTAs"));
}

std::string decode_step_name(int64_t batch, int64_t context, bool graphs) {
  return fmt::format("decode step, bench preset, batch {} at depth {}, {}", batch, context,
                     graphs ? "CUDA graph" : "eager launches");
}

// Whole decode steps of the bench preset through the model, each ending with a greedy draw per
// sequence on the device (the token ids back on the host): `batch` sequences after a
// `context`-token prompt each, with decode steps replayed as CUDA graphs or launched eagerly.
// Bytes per step: the weights the step reads (the experts some token picked, in expectation under
// uniform routing: decode_weight_bytes), each lightning state read and written, and the KV cache
// read.
void bench_decode_step(Report& report, const Limits& limits, int64_t batch, int64_t context, bool graphs) {
  const m1::ModelConfig config = m1::preset("bench").config;
  auto backend = m1::create_backend({"cuda", 0, m1::Precision::kFast, false, graphs});
  m1::Checkpoint checkpoint = m1::random_checkpoint(config, m1::DType::kBF16, 1);
  const uint64_t weight_bytes = m1::bench::decode_weight_bytes(config, checkpoint, {}, batch);
  m1::Model model(config, std::move(checkpoint), *backend);

  std::vector<std::unique_ptr<m1::SequenceState>> states;
  std::vector<int32_t> prompt(static_cast<size_t>(context));
  for (int64_t i = 0; i < context; ++i) prompt[size_t(i)] = int32_t((i * 7919) % config.vocab_size);
  m1::StepLogits logits;
  for (int64_t b = 0; b < batch; ++b) {
    states.push_back(model.new_sequence());
    const m1::BatchEntry entry{states.back().get(), prompt};
    model.forward(std::span(&entry, 1), logits);
  }
  std::vector<int32_t> next(size_t(batch), 1);
  std::vector<m1::BatchEntry> step;
  for (int64_t b = 0; b < batch; ++b) step.push_back({states[size_t(b)].get(), std::span(&next[size_t(b)], 1)});
  std::vector<m1::DrawRequest> draws(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    draws[size_t(b)].row = b;
    draws[size_t(b)].params.temperature = 0;
  }
  std::vector<double> times;
  const int steps = 23, profiled = 2;
  for (int i = 0; i < steps; ++i) {
    if (i == steps - profiled) M1_CUDA_CHECK(cudaProfilerStart());
    const auto start = std::chrono::steady_clock::now();
    model.forward(step, logits);
    backend->sample(logits.device(), draws);  // waits for the step
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  M1_CUDA_CHECK(cudaProfilerStop());
  // The first steps run eagerly and record the graph.
  const double ms = m1::bench::median(std::vector<double>(times.begin() + 3, times.end()));
  const m1::StateShape s = model.state_shape();
  const double state_bytes = double(batch) * (2.0 * double(s.lightning_layers * s.heads * s.head_dim * s.head_dim) * 4 +
                                              double(s.softmax_layers * 2 * s.kv_heads * s.head_dim) * 2 * double(context));
  const double bytes = double(weight_bytes) + state_bytes;
  // The kernels of a step, as its CUDA graph holds them (an eager step launches the same ones).
  const int64_t kernels = graphs ? static_cast<m1::cuda::CudaBackend&>(*backend).graph_stats().kernels : 0;
  const std::string count = kernels ? fmt::format(" ({} kernels)", kernels) : "";
  report.add({decode_step_name(batch, context, graphs) + count, ms, bytes / (ms * 1e-3) / 1e9, "GB/s",
              bytes / (ms * 1e-3) / 1e9 / limits.copy_gb_s});
}

int run(const std::string& json_path, const std::string& only, const std::string& skip) {
  // Whether the benchmarks named `name...` are wanted.
  auto wanted = [&](std::string_view name) {
    return (only.empty() || name.starts_with(only) || only.starts_with(name)) && (skip.empty() || !name.starts_with(skip));
  };
  const std::vector<std::string_view> groups = {"matmul", "quantized matmul", "lightning decode", "lightning prefill", "flash prefill", "sampling", "decode step"};
  if (std::none_of(groups.begin(), groups.end(), wanted))
    m1::fail("--only '{}' and --skip '{}' leave no benchmark (names start with {})", only, skip, fmt::join(groups, ", "));
  m1::cuda::Device gpu = m1::cuda::Device::current();
  cudaDeviceProp prop{};
  M1_CUDA_CHECK(cudaGetDeviceProperties(&prop, gpu.index()));
  std::printf("bench_cuda on %s (sm_%d%d, %.0f GiB)\n", prop.name, prop.major, prop.minor,
              double(prop.totalGlobalMem) / double(1 << 30));
  cudaStream_t stream;
  M1_CUDA_CHECK(cudaStreamCreate(&stream));

  Report report;
  Limits limits;
  limits.copy_gb_s = copy_bandwidth(stream);
  report.add({"limit: device-to-device copy (read + write)", 0, limits.copy_gb_s, "GB/s"});
  limits.cublas_tflops = cublas_bf16_tflops(stream, 8192);
  report.add({"limit: cuBLAS bf16 GEMM 8192^3, fp32 accumulate", 0, limits.cublas_tflops, "TFLOP/s"});

  if (wanted("matmul")) {
    bench_matmul(report, limits, stream, gpu, 1, 8192, 8192);
    // The real model's one-row BF16 products (an expert's gate and up, its down, a lightning
    // layer's qkv and out_proj) and the most rows the streamed kernel takes (bf16_stream.h).
    for (const auto& [n, k] : {std::pair<int64_t, int64_t>{9216, 6144}, {6144, 9216}, {24576, 6144}, {6144, 8192}})
      bench_matmul(report, limits, stream, gpu, 1, n, k);
    bench_matmul(report, limits, stream, gpu, 8, 8192, 8192);
    bench_matmul(report, limits, stream, gpu, 32, 8192, 8192);
    bench_matmul(report, limits, stream, gpu, 8192, 8192, 8192);
  }
  if (wanted("quantized matmul")) {
    using m1::cuda::GemmOperands;
    // The real model's one-row products: an expert's gate and up, its down, a lightning layer's
    // qkv and out_proj.
    const struct {
      int64_t n, k;
      const char* what;
    } shapes[] = {{9216, 6144, "expert w1/w3"}, {6144, 9216, "expert w2"}, {24576, 6144, "qkv_proj"}, {6144, 8192, "out_proj"}};
    for (m1::DType type : {m1::DType::kQ4, m1::DType::kQ8})
      for (const auto& s : shapes) bench_quantized_matmul(report, limits, stream, gpu, type, 1, s.n, s.k, GemmOperands::kBf16, s.what);
    bench_quantized_matmul(report, limits, stream, gpu, m1::DType::kQ4, 1, 9216, 6144, GemmOperands::kFp32, "expert w1/w3");
    bench_quantized_matmul(report, limits, stream, gpu, m1::DType::kQ4, 32, 9216, 6144, GemmOperands::kBf16, "expert w1/w3");
    for (m1::DType type : {m1::DType::kQ4, m1::DType::kQ8})
      bench_quantized_matmul(report, limits, stream, gpu, type, 8192, 8192, 8192, GemmOperands::kBf16, "prefill");
  }
  if (wanted("lightning decode")) {
    for (int64_t batch : {1, 32}) bench_lightning_decode(report, limits, stream, gpu, batch);
    bench_lightning_decode(report, limits, stream, gpu, 1, 8);
  }
  if (wanted("lightning prefill")) {
    for (int64_t tokens : {8192, 65536, 1 << 20})
      bench_lightning_prefill(report, limits, stream, gpu, tokens, 65536, true);
    bench_lightning_prefill(report, limits, stream, gpu, 8192, 65536, false);
    // One rank of 8: the sequence split into parts against one CTA walking it whole, at the
    // server's step size and at a long prompt in one call.
    for (int64_t tokens : {512, 8192})
      for (bool split : {true, false}) bench_lightning_prefill(report, limits, stream, gpu, tokens, 65536, true, 8, split);
  }
  if (wanted("flash prefill")) {
    for (bool bf16_operands : {true, false})
      for (int64_t tokens : {8192, 65536}) bench_flash_prefill(report, limits, stream, gpu, tokens, bf16_operands);
    // The planned 3 stages of the fast wide CTAs against 2.
    bench_flash_prefill(report, limits, stream, gpu, 65536, true, 2);
    // Where the fast wide CTAs run on the warpgroup tensor cores (M1_WGMMA=1 or attention on a
    // Hopper), the mma.sync CTAs beside them, named ", mma.sync".
    if (gpu.limits().warpgroup_attention) {
      m1::cuda::Device mma = gpu.with_warpgroup_mma(false);
      bench_flash_prefill(report, limits, stream, mma, 65536, true, 0, ", mma.sync");
    }
    for (RankForm form : {RankForm::kSplit, RankForm::kNarrow, RankForm::kWide})
      bench_flash_prefill_rank(report, limits, stream, gpu, 32768, form);
  }
  if (wanted("sampling"))
    for (int64_t batch : {1, 32})
      for (DrawKind kind : {DrawKind::kGreedy, DrawKind::kTopP09Logprobs, DrawKind::kTopP095, DrawKind::kTopK50TopP095})
        bench_sampling(report, limits, stream, gpu, batch, kind);
  for (int64_t batch : {1, 32})
    for (bool graphs : {false, true})
      if (wanted(decode_step_name(batch, 512, graphs))) bench_decode_step(report, limits, batch, 512, graphs);

  if (!json_path.empty()) {
    nlohmann::ordered_json j{{"device", prop.name},
                             {"limits", {{"copy_gb_s", limits.copy_gb_s}, {"cublas_bf16_tflops", limits.cublas_tflops}}},
                             {"results", report.json()}};
    std::ofstream out(json_path);
    out << j.dump(2) << "\n";
    if (!out.flush()) m1::fail("--json: cannot write {}", json_path);
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_cuda: the CUDA kernels against the GPU's measured limits"};
  std::string json, only, skip;
  app.add_option("--json", json, "write the figures to FILE as JSON");
  app.add_option("--only", only, "run only the benchmarks whose names start with TEXT (matmul, quantized matmul, "
                                 "lightning decode, lightning prefill, flash prefill, sampling, decode step)");
  app.add_option("--skip", skip, "leave out the benchmarks whose names start with TEXT");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(json, only, skip);
  } catch (const m1::Error& e) {
    std::fprintf(stderr, "bench_cuda: %s\n", e.what());
    return 1;
  }
}
