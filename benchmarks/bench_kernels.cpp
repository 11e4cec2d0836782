// Microbenchmarks of the CPU kernels at the `bench` preset's shapes (hidden 1024, 8 heads of 128,
// 2 KV heads, 8 experts top-2 of width 1536, vocabulary 200064), BF16 weights (matrix products also
// on int8 and int4 weights). Each reports
// FLOP/s and B/s of the bytes a call must touch, counting the arithmetic of the algorithm the
// kernel runs; the naive references run beside them (tagged _reference) where they are cheap
// enough, so the speedup shows in the times. Matrices of a few MB stay in the caches across
// iterations; the 410 MB LM head shows the rate at which weights stream from memory. Weights live
// in a WeightArena (huge pages), as the CPU backend keeps them.
//   bench_kernels [--threads=N] [Google Benchmark flags]
// This is the only benchmark that reaches the CPU backend's internal headers.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <memory>
#include <string>
#include <vector>

#include "cpu/aligned_vector.h"
#include "cpu/lightning.h"
#include "cpu/matmul.h"
#include "cpu/moe.h"
#include "cpu/softmax_attention.h"
#include "cpu/threadpool.h"
#include "cpu/weight_arena.h"
#include "m1/dtype.h"
#include "m1/quantize.h"

namespace m1::cpu {
namespace {

constexpr int64_t kHidden = 1024, kHeads = 8, kHeadDim = 128, kKvHeads = 2, kRotaryDim = 64;
constexpr int64_t kExperts = 8, kTopK = 2, kFfn = 1536, kVocab = 200064;
constexpr int64_t kPrefillRows = 512, kLightningTokens = 4096, kDecodeDepth = 4096;
// A cache far larger than the last-level cache: decode at depth reads it from memory.
constexpr int64_t kDeepDecodeDepth = 131072;
constexpr float kDecay = 0.01f;  // a slow head: the state stays bounded over many iterations
constexpr double kRopeTheta = 1e7;

int g_threads = 0;  // --threads; 0: one per core

ThreadPool& pool() {
  static ThreadPool p(g_threads);
  return p;
}

// Uniform in [-scale, scale) from a fast generator: filling the 200k-row LM head with
// std::normal_distribution would take longer than benchmarking it. Timings ignore the distribution.
std::vector<float> random_floats(size_t n, float scale) {
  uint64_t s = 0x9e3779b97f4a7c15ull ^ n;
  std::vector<float> v(n);
  for (float& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = scale * (float(s >> 40) / float(1 << 23) - 1.0f);
  }
  return v;
}

// `w`'s codes (or values) and scales copied into the backend's kind of memory: read through 4 KiB
// pages, streamed products ran 10-30% slower than in the model.
Weight in_arena(Weight w) {
  static WeightArena arena;
  w.data = arena.copy(w.data, w.data_bytes());
  if (w.quantized()) w.scales = arena.copy(w.scales, w.scale_bytes());
  return w;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& values) {
  std::vector<uint16_t> bits(values.size());
  for (size_t i = 0; i < values.size(); ++i) bits[i] = f32_to_bf16(values[i]);
  return bits;
}

// BF16 weight matrix number `index` of shape [rows, cols], built once and kept for every
// benchmark using it. Distinct indices are distinct memory, as distinct experts are.
const Weight& bf16_weight(int64_t rows, int64_t cols, int64_t index = 0) {
  static std::map<std::tuple<int64_t, int64_t, int64_t>, Weight> cache;
  auto [it, inserted] = cache.try_emplace({rows, cols, index});
  if (inserted) {
    const std::vector<uint16_t> bits = to_bf16(random_floats(size_t(rows * cols), 1.0f / 32));
    it->second = in_arena(Weight{bits.data(), DType::kBF16, rows, cols});
  }
  return it->second;
}

// weight_of(kind, ...): the BF16 weight, or it quantized to int8 (a scale per row) or int4 (groups of
// 32), built once.
const Weight& weight_of(const std::string& kind, int64_t rows, int64_t cols) {
  if (kind == "bf16") return bf16_weight(rows, cols);
  static std::map<std::tuple<std::string, int64_t, int64_t>, Weight> cache;
  auto [it, inserted] = cache.try_emplace({kind, rows, cols});
  if (inserted)
    it->second = in_arena(quantize(bf16_weight(rows, cols), kind == "int8" ? QuantScheme{DType::kQ8, 0} : QuantScheme{DType::kQ4, 32},
                                   kind, int(pool().size()))
                              .weight());
  return it->second;
}

double weight_bytes(const Weight& w) { return double(w.data_bytes() + w.scale_bytes()); }

void report(benchmark::State& state, double flops, double bytes) {
  state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["B/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
}

const char* operands_name(Operands operands) { return operands == Operands::kBf16 ? "bf16" : "fp32"; }

void bm_matmul(benchmark::State& state, const std::string& kind, int64_t rows, int64_t out_features, int64_t in_features,
               Operands operands, bool reference) {
  const Weight& w = weight_of(kind, out_features, in_features);
  // 64-byte aligned, as the backend's activations are: a vector's 16-byte alignment splits every
  // vector load of x over two cache lines, and costs the streamed kernels (more loads of x per
  // weight) up to 2x.
  const std::vector<float> values = random_floats(size_t(rows * in_features), 1.0f);
  AlignedVector<float> x(values.begin(), values.end()), out(size_t(rows * out_features));
  const Mat xm{x.data(), rows, in_features}, om{out.data(), rows, out_features};
  for (auto _ : state) {
    if (reference)
      matmul_reference(xm, w, om, operands);
    else
      matmul(pool(), xm, w, om, operands);
    benchmark::DoNotOptimize(out.data());
  }
  report(state, 2.0 * double(rows * out_features * in_features), weight_bytes(w) + 4.0 * double(x.size() + out.size()));
}

// One head's q, k, v interleaved per token as in the model's qkv activations, and its output.
struct LightningInputs {
  std::vector<float> qkv, out, state;
  LightningInputs(int64_t tokens, int64_t d)
      : qkv(random_floats(size_t(tokens * 3 * d), 0.1f)), out(size_t(tokens * d)), state(size_t(d * d), 0.0f) {}
  LightningHead head(int64_t tokens, int64_t d) {
    return {qkv.data(), qkv.data() + d, qkv.data() + 2 * d, 3 * d, out.data(), d, tokens, d, kDecay, state.data()};
  }
};

// Bytes of one lightning call: q, k, v and out of every token, and the state read and written.
double lightning_bytes(int64_t tokens, int64_t d) { return 4.0 * double(4 * tokens * d + 2 * d * d); }

void bm_lightning_prefill(benchmark::State& state, bool reference) {
  const int64_t n = kLightningTokens, d = kHeadDim, b = kLightningBlock;
  LightningInputs in(n, d);
  const LightningHead h = in.head(n, d);
  for (auto _ : state) {
    if (reference)
      lightning_reference(h);
    else
      lightning_chunked(h, b);
    benchmark::DoNotOptimize(in.out.data());
  }
  // Chunked: per token 4Bd for the masked block products and 4d^2 against the state;
  // recurrent: 4d^2 per token.
  const double per_token = reference ? 4.0 * double(d * d) : 4.0 * double(b * d + d * d);
  report(state, per_token * double(n), lightning_bytes(n, d));
}

void bm_lightning_decode(benchmark::State& state, bool reference) {
  const int64_t d = kHeadDim;
  LightningInputs in(1, d);
  const LightningHead h = in.head(1, d);
  for (auto _ : state) {
    if (reference)
      lightning_reference(h);
    else
      lightning_decode_token(h);
    benchmark::DoNotOptimize(in.state.data());
  }
  report(state, 4.0 * double(d * d), lightning_bytes(1, d));
}

// The query heads sharing one KV head, `count` queries after `pos0` cached tokens; keys and values
// interleaved per cache row as one KV head's slice of the cache. Run as the CPU backend runs it:
// blocks of query rows, each walking the cache; fp32 operands in blocks of 16 rows, bf16 ones
// (fast precision on AVX-512 BF16) in the backend's merged blocks of 64, or the double oracle.
// The cache is fp32, or bf16 (kBf16Cache: what fast precision keeps, each block taking the form
// its size picks, so a decode row takes the fp32 form on the bf16 cache).
enum class AttentionForm { kFp32, kBf16, kBf16Cache, kReference };

// One key/value head's group, laid out as the model's cache is (head-major, cpu_state.h): the
// head's keys and its values as two arrays of rows of d.
void bm_attention(benchmark::State& state, int64_t count, int64_t pos0, AttentionForm form) {
  const int64_t d = kHeadDim, heads = kHeads / kKvHeads, cached = pos0 + count;
  const bool bf16 = form == AttentionForm::kBf16 || form == AttentionForm::kBf16Cache;
  const int64_t block = bf16 ? 64 : 16;
  const bool bf16_cache = form == AttentionForm::kBf16Cache;
  std::vector<float> q = random_floats(size_t(count * heads * d), 1.0f);
  std::vector<float> keys_f32, values_f32;
  std::vector<uint16_t> keys_bf16, values_bf16;
  const size_t cache = size_t(cached * d);
  if (bf16_cache) {
    keys_bf16 = to_bf16(random_floats(cache, 1.0f));
    values_bf16 = to_bf16(random_floats(cache, 1.0f));
  } else {
    keys_f32 = random_floats(cache, 1.0f);
    values_f32 = random_floats(cache, 1.0f);
  }
  const void* keys = bf16_cache ? static_cast<const void*>(keys_bf16.data()) : keys_f32.data();
  const void* values = bf16_cache ? static_cast<const void*>(values_bf16.data()) : values_f32.data();
  std::vector<float> out(q.size());
  AttentionScratch scratch;
  for (auto _ : state) {
    for (int64_t first = 0; first < count; first += block) {
      const AttentionGroup g{q.data() + first * heads * d, heads * d, heads, keys, values, d,
                             out.data() + first * heads * d, heads * d, std::min(block, count - first), pos0 + first, d,
                             bf16, bf16_cache ? DType::kBF16 : DType::kF32};
      if (form == AttentionForm::kReference)
        attention_group_reference(g);
      else
        attention_group(g, scratch);
    }
    benchmark::DoNotOptimize(out.data());
  }
  // Query i scores and mixes pos0 + i + 1 keys: 4d per key and head.
  const double keys_attended = double(count) * double(pos0) + double(count) * double(count + 1) / 2;
  report(state, 4.0 * double(d * heads) * keys_attended,
         (bf16_cache ? 2.0 : 4.0) * double(2 * cache) + 4.0 * double(q.size() + out.size()));
}

void bm_rope(benchmark::State& state) {
  const int64_t rows = kPrefillRows, width = kHeads * kHeadDim;
  std::vector<float> x = random_floats(size_t(rows * width), 1.0f);
  for (auto _ : state) {
    apply_rope(x.data(), rows, width, kHeads, kHeadDim, kRotaryDim, kRopeTheta, 0);
    benchmark::DoNotOptimize(x.data());
  }
  // Each rotated pair: four multiplies and two adds.
  report(state, 6.0 * double(rows * kHeads * kRotaryDim / 2), 8.0 * double(x.size()));
}

MoeWeights moe_weights() {
  MoeWeights w;
  w.router = bf16_weight(kExperts, kHidden);
  for (int64_t e = 0; e < kExperts; ++e) {
    w.w1.push_back(bf16_weight(kFfn, kHidden, 2 * e + 1));  // w1 and w3 share a shape, not memory
    w.w3.push_back(bf16_weight(kFfn, kHidden, 2 * e + 2));
    w.w2.push_back(bf16_weight(kHidden, kFfn, e + 1));
  }
  w.top_k = kTopK;
  return w;
}

void bm_moe(benchmark::State& state, int64_t tokens, Operands operands, bool reference) {
  const MoeWeights w = moe_weights();
  std::vector<float> x = random_floats(size_t(tokens * kHidden), 1.0f), out(x.size());
  const Mat xm{x.data(), tokens, kHidden}, om{out.data(), tokens, kHidden};
  MoeScratch scratch;
  for (auto _ : state) {
    if (reference)
      moe_reference(xm, w, om, operands);
    else
      moe(pool(), xm, w, om, operands, scratch);
    benchmark::DoNotOptimize(out.data());
  }
  const double expert_bytes = weight_bytes(w.w1[0]) + weight_bytes(w.w2[0]) + weight_bytes(w.w3[0]);
  const double experts_touched = double(std::min(kExperts, tokens * kTopK));
  const double flops = double(tokens) * (2.0 * double(kExperts * kHidden) + double(kTopK) * 6.0 * double(kFfn * kHidden));
  report(state, flops, weight_bytes(w.router) + experts_touched * expert_bytes + 8.0 * double(x.size()));
}

template <class Fn>
void add(const std::string& name, Fn&& fn) {
  benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn))->Unit(benchmark::kMicrosecond)->UseRealTime();
}

void register_matmuls() {
  struct Shape {
    const char* name;
    int64_t out, in;
    bool gemm, reference;  // also at 512 rows; also the reference GEMV
  };
  const Shape shapes[] = {{"qkv_3072x1024", 3 * kHeads * kHeadDim, kHidden, true, true},
                          {"expert_1536x1024", kFfn, kHidden, true, true},
                          {"lm_head_200064x1024", kVocab, kHidden, false, false}};
  std::vector<Operands> operands{Operands::kFp32};
  if (bf16_products_available()) operands.push_back(Operands::kBf16);
  // BF16 weights, and the same quantized (int8 with a scale per row, int4 in groups of 32).
  for (const std::string kind : {"bf16", "int8", "int4"})
    for (const Shape& s : shapes)
      for (Operands op : operands) {
        const std::string suffix = std::string(s.name) + "/" + (kind == "bf16" ? "" : kind + "/") + operands_name(op);
        add("gemv/" + suffix, [=](benchmark::State& st) { bm_matmul(st, kind, 1, s.out, s.in, op, false); });
        if (s.reference)
          add("gemv/" + suffix + "_reference", [=](benchmark::State& st) { bm_matmul(st, kind, 1, s.out, s.in, op, true); });
        // Eight and sixteen sequences decoding together (batched server steps; 16 is m1-serve's
        // default --max-batch, where the products leave the streamed decode kernels for tiles).
        add("batch8/" + suffix, [=](benchmark::State& st) { bm_matmul(st, kind, 8, s.out, s.in, op, false); });
        add("batch16/" + suffix, [=](benchmark::State& st) { bm_matmul(st, kind, 16, s.out, s.in, op, false); });
        if (s.gemm)
          add("gemm512/" + suffix, [=](benchmark::State& st) { bm_matmul(st, kind, kPrefillRows, s.out, s.in, op, false); });
      }
}

void register_attention() {
  for (bool ref : {false, true}) {
    const std::string tag = ref ? "_reference" : "";
    add("lightning/prefill_4096" + tag, [=](benchmark::State& st) { bm_lightning_prefill(st, ref); });
    add("lightning/decode" + tag, [=](benchmark::State& st) { bm_lightning_decode(st, ref); });
  }
  std::vector<std::pair<std::string, AttentionForm>> forms{{"", AttentionForm::kFp32},
                                                            {"_reference", AttentionForm::kReference}};
  if (bf16_products_available()) {
    forms.emplace_back("_bf16", AttentionForm::kBf16);
    forms.emplace_back("_bf16_cache", AttentionForm::kBf16Cache);
  }
  for (const auto& [tag, form] : forms) {
    add("attention/decode_depth4096" + tag, [=](benchmark::State& st) { bm_attention(st, 1, kDecodeDepth, form); });
    add("attention/prefill_512" + tag, [=](benchmark::State& st) { bm_attention(st, kPrefillRows, 0, form); });
    if (form == AttentionForm::kReference) continue;  // 18 GFLOP a call: the oracle would take minutes
    add("attention/prefill_512_depth16384" + tag,
        [=](benchmark::State& st) { bm_attention(st, kPrefillRows, 16384, form); });
    add("attention/decode_depth131072" + tag, [=](benchmark::State& st) { bm_attention(st, 1, kDeepDecodeDepth, form); });
  }
  add("rope/512_rows", [](benchmark::State& st) { bm_rope(st); });
}

void register_moe() {
  std::vector<Operands> operands{Operands::kFp32};
  if (bf16_products_available()) operands.push_back(Operands::kBf16);
  for (Operands op : operands) {
    const std::string name = operands_name(op);
    add("moe/1_token/" + name, [=](benchmark::State& st) { bm_moe(st, 1, op, false); });
    add("moe/1_token/" + name + "_reference", [=](benchmark::State& st) { bm_moe(st, 1, op, true); });
    add("moe/512_tokens/" + name, [=](benchmark::State& st) { bm_moe(st, kPrefillRows, op, false); });
  }
}

}  // namespace
}  // namespace m1::cpu

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      m1::cpu::g_threads = std::atoi(argv[i] + 10);
      continue;
    }
    std::fprintf(stderr, "bench_kernels: unknown argument %s (expected --threads=N or Google Benchmark flags)\n", argv[i]);
    return 1;
  }
  benchmark::AddCustomContext("threads", std::to_string(m1::cpu::pool().size()));
  benchmark::AddCustomContext("isa", m1::cpu::matmul_isa());
  m1::cpu::register_matmuls();
  m1::cpu::register_attention();
  m1::cpu::register_moe();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
