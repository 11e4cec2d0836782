#include "m1/synthetic.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <unordered_map>

#include "m1/error.h"

namespace m1 {
namespace {

constexpr int64_t kFullVocab = 200064;
constexpr int64_t kAddedTokens = 64;

ModelConfig base_config(int64_t hidden, int64_t heads, int64_t head_dim, int64_t kv_heads, int64_t layers,
                        int64_t ffn, int64_t experts, int64_t vocab) {
  ModelConfig c;
  c.architecture = "MiniMaxM1ForCausalLM";
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = head_dim;
  c.rotary_dim = head_dim / 2;  // the real model rotates 64 of 128 dims
  c.intermediate_size = ffn;
  c.num_local_experts = experts;
  c.num_experts_per_tok = 2;
  c.max_position_embeddings = 10240000;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 1e7;
  c.postnorm = true;
  // The release's residual scaling.
  const double alpha = 3.5565588200778455;
  c.linear_attention_alpha = c.full_attention_alpha = c.mlp_alpha = alpha;
  c.attn_type_list = hybrid_attention(layers);
  return c;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t hash_name(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// Approximately standard normal: a centred sum of four 16-bit uniforms (Irwin-Hall), cheap
// enough for the real model's 10 GB layers.
float approx_normal(uint64_t& state) {
  uint64_t r = splitmix64(state);
  float sum = 0;
  for (int i = 0; i < 4; ++i) sum += float((r >> (16 * i)) & 0xffff);
  return (sum / 65536.0f - 2.0f) * 1.7320508f;
}

void store(std::span<std::byte> out, DType dtype, size_t i, float v) {
  switch (dtype) {
    case DType::kF32: std::memcpy(out.data() + 4 * i, &v, 4); return;
    case DType::kF16: {
      uint16_t h = f32_to_f16(v);
      std::memcpy(out.data() + 2 * i, &h, 2);
      return;
    }
    case DType::kBF16: {
      uint16_t b = f32_to_bf16(v);
      std::memcpy(out.data() + 2 * i, &b, 2);
      return;
    }
    default: fail("random weights: dtype {} is not a float type", dtype_name(dtype));
  }
}

}  // namespace

std::vector<int> hybrid_attention(int64_t layers) {
  std::vector<int> types(size_t(std::max<int64_t>(layers, 0)), 0);
  for (int64_t l = 7; l < layers; l += 8) types[size_t(l)] = 1;
  if (layers > 0 && layers < 8) types.back() = 1;
  return types;
}

std::vector<std::string> preset_names() { return {"tiny", "demo", "bench", "m1"}; }

Preset preset(const std::string& name) {
  if (name == "tiny") {
    Preset p{name, base_config(64, 4, 16, 2, 4, 96, 4, 0), 2000};
    p.config.rotary_dim = 8;
    p.config.vocab_size = 256 + p.tokenizer_merges + kAddedTokens;
    return p;
  }
  if (name == "demo") {
    Preset p{name, base_config(512, 8, 64, 2, 8, 768, 8, 0), 32000};
    p.config.vocab_size = 256 + p.tokenizer_merges + kAddedTokens;
    return p;
  }
  if (name == "bench") return Preset{name, base_config(1024, 8, 128, 2, 8, 1536, 8, kFullVocab), -1};
  if (name == "m1") {
    Preset p{name, base_config(6144, 64, 128, 8, 8, 9216, 32, kFullVocab), -1};
    p.config.rotary_dim = 64;
    return p;
  }
  fail("preset '{}' is unknown (expected tiny, demo, bench or m1)", name);
}

void fill_random_weight(const WeightSpec& spec, DType dtype, uint64_t seed, std::span<std::byte> out) {
  const size_t n = out.size() * 8 / size_t(dtype_bits(dtype));
  const int64_t fan_in = spec.shape.back();
  const bool norm = is_norm(spec.role);
  const float scale = spec.role == WeightRole::kEmbed ? 1.0f : norm ? 0.05f : 1.0f / std::sqrt(float(fan_in));
  const float offset = norm ? 1.0f : 0.0f;
  const uint64_t base = seed ^ hash_name(spec.name);
  // Fixed-size chunks with their own streams: the same numbers whatever the thread count.
  constexpr size_t kChunk = size_t(1) << 16;
  const size_t chunks = (n + kChunk - 1) / kChunk;
  auto fill_chunks = [&](size_t first, size_t step) {
    for (size_t c = first; c < chunks; c += step) {
      uint64_t state = base + c * 0x632be59bd9b4e019ull;
      for (size_t i = c * kChunk, end = std::min(n, i + kChunk); i < end; ++i)
        store(out, dtype, i, offset + scale * approx_normal(state));
    }
  };
  const size_t threads = std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()), chunks);
  std::vector<std::thread> workers;
  for (size_t t = 1; t < threads; ++t) workers.emplace_back(fill_chunks, t, threads);
  fill_chunks(0, std::max<size_t>(threads, 1));
  for (auto& w : workers) w.join();
}

std::vector<TensorSpec> checkpoint_tensors(const ModelConfig& config, DType dtype) {
  std::vector<TensorSpec> tensors;
  for (const WeightSpec& w : weight_specs(config)) tensors.push_back(TensorSpec{w.name, dtype, w.shape});
  return tensors;
}

TensorFiller random_weights(const ModelConfig& config, DType dtype, uint64_t seed) {
  auto by_name = std::make_shared<std::unordered_map<std::string, WeightSpec>>();
  for (WeightSpec& w : weight_specs(config)) by_name->emplace(w.name, std::move(w));
  return [by_name, dtype, seed](const TensorSpec& t, std::span<std::byte> out) {
    fill_random_weight(by_name->at(t.name), dtype, seed, out);
  };
}

Checkpoint random_checkpoint(const ModelConfig& config, DType dtype, uint64_t seed) {
  return Checkpoint::in_memory(checkpoint_tensors(config, dtype), random_weights(config, dtype, seed));
}

}  // namespace m1
